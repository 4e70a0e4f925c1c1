"""One forward step as a SimPy discrete-event simulation of the GPU's lanes.

Lanes (SimPy processes and resources):
- host: Python launching each layer's kernels (and, on vLLM's copy path, issuing its copies);
- compute: the compute stream; a layer's kernels run once launched and, for prefetched layers,
  once its copy's CUDA event fired; on vLLM's copy path the per-parameter copies run here too;
- copy: the prefetch copy stream, filling ``slots`` staging buffers in order; a copy into a slot
  waits for the event recorded after the last layer that read that slot;
- link: the GPU's host link, shared equally by the transfers in flight (processor sharing): the
  copies, UVA's zero-copy reads (an offloaded layer under UVA takes max(gpu, its reads over the
  link), the reads growing with the step's tokens: ``uva_read``, sim/costs.py) and, for tensor parallelism without NVLink, the layer's all-reduces (``LayerCost.link_comm``,
  run at the end of the layer), which slow a prefetch copy in flight and are slowed by it.

A compute span cannot end before the host launched the layer's last kernel: it ends at
max(start + gpu, host_done + tail). While a copy is in flight, compute runs ``copy_slowdown``
times slower (copies compete for HBM).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import simpy

from ..errors import ConfigError
from ..policy import Placement
from ..trace import Span, Trace
from .costs import LayerCost, StepShape


@dataclass(frozen=True)
class StepResult:
    time: float  # seconds from the step's start until the LM head finished
    busy: dict[str, float]  # lane -> busy seconds
    stall: float  # compute-stream seconds spent waiting on copies
    events: int  # SimPy events processed
    trace: Trace | None = field(default=None, compare=False)


class SharedLink:
    """A link shared equally by the transfers in flight (processor sharing), each given as its solo
    seconds. A transfer runs in its own SimPy process (``transfer`` is ``yield from``-ed); when one
    starts or ends, the others are interrupted to re-plan their end at the new rate."""

    def __init__(self, env: simpy.Environment):
        self.env = env
        self.left: dict = {}  # process -> solo seconds of its transfer still to go
        self.last = 0.0

    def _advance(self) -> None:
        n, dt = len(self.left), self.env.now - self.last
        if n and dt > 0:
            for p in self.left:
                self.left[p] -= dt / n
        self.last = self.env.now

    def _replan(self, skip) -> None:
        for p in self.left:
            if p is not skip:
                p.interrupt()

    def transfer(self, seconds: float):
        me = self.env.active_process
        self._advance()
        self.left[me] = seconds
        self._replan(me)
        while True:
            try:
                yield self.env.timeout(max(self.left[me], 0.0) * len(self.left))
                break
            except simpy.Interrupt:
                continue  # whoever interrupted has advanced everybody's progress
        self._advance()
        del self.left[me]
        self._replan(None)


COPY_ISSUE = 10e-6  # host seconds to allocate and enqueue one per-parameter copy (vLLM's copy path)


JOINS = ("eager", "full", "piecewise")


def simulate_layers(placement: Placement, layer: LayerCost, head: float, transfer, copy_slowdown: float = 1.0,
                    trace: bool = False, wrap: bool = False, uva_read=None, join: str = "eager") -> StepResult:
    """Simulate one forward pass of ``placement.layers`` identical layers (then the LM head).

    ``uva_read(nbytes)``: link seconds the layer's kernels spend reading ``nbytes`` of UVA-offloaded
    weights in this step (default ``transfer``: each weight read once, as for a single M-tile).

    ``wrap``: prefetch keeps copying across steps (vLLM's prefetch backend preloads the first
    ``slots`` offloaded layers of the next step as soon as their slots are free). Two identical
    steps are simulated back to back and the second is reported; its first copies may have started
    during the first (negative start times in the trace).

    ``join`` (with ``wrap``): how vLLM's prefetch backend joins its copy stream, by how the step runs
    (vllm/model_executor/offloader/prefetch.py ``join_after_forward``/``sync_prev_onload``, called
    around every CUDA-graph capture and replay in vllm/compilation/cuda_graph.py):
    - ``eager``: no join; the next step's first copies overlap this step's tail, its LM head and the
      next step's start.
    - ``full`` (a FULL CUDA graph, vLLM's decode steps): the copies started inside the graph for the
      next step's first layers are joined before the graph ends, so the forward (before the LM
      head, which runs outside the graph) waits for them; the next replay's ``sync_prev_onload``
      then finds nothing outstanding.
    - ``piecewise`` (piecewise graphs, split at attention): each piece joins the copies it started,
      so a copy issued after layer i must end before the piece reaching layer i+1's attention ends;
      modelled as: before layer i+1's compute ends (before the forward ends after the last layer).
    """
    if join not in JOINS:
        raise ValueError(f"join={join!r}: expected one of {JOINS}")
    env = simpy.Environment()
    L = placement.layers
    P = 2 if wrap and placement.mechanism == "prefetch" and placement.offloaded_layers else 1
    copy_path = placement.mechanism == "copy"
    uva = placement.mechanism == "uva"
    offloaded = placement.offloaded_layers if placement.mechanism == "prefetch" else ()
    prefetched = [p * L + j for p in range(P) for j in offloaded]  # global layer index, pass-major
    slots = placement.slots
    join_layer: dict[int, list[int]] = {}  # global layer -> copies its compute cannot end before
    join_end: dict[int, list[int]] = {}  # pass -> copies its forward (before the LM head) waits for
    if P > 1 and join != "eager":
        # the last pass also starts the next step's first copies inside its graph, and joins them
        prefetched += [P * L + j for j in offloaded[:slots]]
        for m in range(slots, len(prefetched)):
            by, g = prefetched[m - slots], prefetched[m]  # the copy into by's slot, issued after by ran
            if join == "piecewise" and (by + 1) % L:
                join_layer.setdefault(by + 1, []).append(g)
            elif g // L != by // L:  # full graph: only copies for the next step outlive a layer's wait
                join_end.setdefault(by // L, []).append(g)
    link = SharedLink(env)
    host_start = [env.event() for _ in range(P * L)]
    host_done = [env.event() for _ in range(P * L)]
    host_done_at = [0.0] * (P * L)
    pass_done = [env.event() for _ in range(P)]
    pass_end = [0.0] * P
    copy_done = {g: env.event() for g in prefetched}
    released = {g: env.event() for g in prefetched}
    spans: list[Span] = []
    busy = {"host": 0.0, "compute": 0.0, "copy": 0.0, "link": 0.0}
    state = {"copying": 0, "stall": 0.0}

    def record(lane, kind, t0, g, layer=None):
        """Account the span that just ended on ``lane`` if it belongs to the reported (last) pass.
        ``g`` is the global layer index, pass * L + layer; ``layer`` overrides the layer (L: LM head)."""
        if g // L != P - 1:
            return
        if kind == "wait":
            state["stall"] += env.now - t0
        else:
            busy[lane] += env.now - t0
        if trace:
            spans.append(Span(lane, kind, t0, env.now, layer=g % L if layer is None else layer))

    def host():
        for p in range(P):
            if p:
                yield pass_done[p - 1]  # the next step is launched after the last one's tokens are back
            for i in range(L):
                g = p * L + i
                host_start[g].succeed()
                t0 = env.now
                issue = len(placement.offloaded[i]) * COPY_ISSUE if copy_path else 0.0
                yield env.timeout(layer.host + issue)
                record("host", "launch", t0, g)
                host_done_at[g] = env.now
                host_done[g].succeed()

    def copy(seconds, lane, g):
        t0 = env.now
        state["copying"] += 1
        yield from link.transfer(seconds)
        state["copying"] -= 1
        record(lane, "copy", t0, g)
        if g // L == P - 1:
            busy["link"] += seconds

    def copier():
        for m, g in enumerate(prefetched):
            if m >= slots:
                prev = prefetched[m - slots]
                if not released[prev].processed:
                    yield released[prev]
            yield from copy(transfer(placement.layer_offloaded_bytes(g % L)), "copy", g)
            copy_done[g].succeed()

    def compute():
        for p in range(P):
            for i in range(L):
                g = p * L + i
                if not host_start[g].processed:
                    yield host_start[g]
                if copy_path and placement.offloaded[i]:
                    # the layer's per-parameter copies, back to back on the compute stream: one span
                    yield from copy(sum(transfer(b) for b in placement.offloaded[i]), "compute", g)
                if g in copy_done and not copy_done[g].processed:
                    t0 = env.now
                    yield copy_done[g]
                    record("compute", "wait", t0, g)
                t0 = env.now
                gpu = (layer.gpu - layer.link_comm) * (copy_slowdown if state["copying"] else 1.0)
                if uva and placement.offloaded[i]:
                    # zero-copy: the kernels stream the offloaded weights over the host link as they run
                    reading = sum((uva_read or transfer)(b) for b in placement.offloaded[i])
                    yield env.all_of([env.timeout(gpu), env.process(link.transfer(reading))])
                    if p == P - 1:
                        busy["link"] += reading
                else:
                    yield env.timeout(gpu)
                if layer.link_comm:  # the layer's all-reduces, over the host link: shared with copies
                    yield from link.transfer(layer.link_comm)
                    if p == P - 1:
                        busy["link"] += layer.link_comm
                for c in join_layer.get(g, ()):  # piecewise graph: the piece joins the copies it started
                    if not copy_done[c].processed:
                        t1 = env.now
                        yield copy_done[c]
                        record("compute", "wait", t1, g)
                if not host_done[g].processed:
                    yield host_done[g]
                late = host_done_at[g] + layer.tail - env.now  # the last kernel, launched late, still runs
                if late > 0:
                    yield env.timeout(late)
                record("compute", "compute", t0, g)
                if g in released:
                    released[g].succeed()
            for c in join_end.get(p, ()):  # join_after_forward: the graph ends after the copies it started
                if not copy_done[c].processed:
                    t0 = env.now
                    yield copy_done[c]
                    record("compute", "wait", t0, p * L + L - 1)
            t0 = env.now
            yield env.timeout(head)
            record("compute", "compute", t0, p * L, layer=L)  # the LM head
            pass_end[p] = env.now
            pass_done[p].succeed()

    env.process(host())
    if prefetched:
        env.process(copier())
    done = env.process(compute())
    env.run(until=done)
    events = events_processed(env)
    start = pass_end[P - 2] if P > 1 else 0.0
    tr = Trace(spans=[dataclasses.replace(sp, start=sp.start - start, end=sp.end - start) for sp in spans],
               meta={"source": "sim"}) if trace else None
    return StepResult(env.now - start, busy, state["stall"], events, tr)


def events_processed(env: simpy.Environment) -> int:
    """Events scheduled so far (SimPy's own counter; 0 if a SimPy version lacks it)."""
    return next(env._eid) if hasattr(env, "_eid") else 0


def _bin(x: float, q: float) -> float:
    """Round ``x`` > 0 to the centre of its relative bin of width ``q`` (deterministic)."""
    if x <= 0 or q == 0:
        return max(x, 0.0)
    return math.exp(round(math.log(x) / q) * q)


def join_mode(cost, shape: StepShape) -> str:
    """How a step joins vLLM's prefetch copy stream: ``full`` when it replays a CUDA graph (the cost
    model's rule: decode batches up to the capture size), else ``eager``. The engine's piecewise
    graphs for mixed batches are chosen explicitly (StepModel(join="piecewise"))."""
    rf = getattr(cost, "roofline", cost)
    return "full" if rf.replays_graph(shape) else "eager"


class StepModel:
    """Step times for one (model, placement, cost model), memoized.

    Steps whose per-layer costs fall in the same relative bin (width ``quantum``, 0.2% by default: at most 0.1% off)
    are identical steps: the second costs a dictionary look-up, not a SimPy run. ``quantum=0``
    keys on the exact costs. This is how a whole
    workload of thousands of steps stays fast.
    """

    def __init__(self, placement: Placement, cost, quantum: float = 2e-3, join: str | None = None):
        self.placement, self.cost, self.quantum = placement, cost, quantum
        if join is not None and join not in JOINS:
            raise ConfigError("join", join, f"one of {JOINS} or None (by the step: see join_mode)")
        self.join = join
        self._cache: dict[tuple, StepResult] = {}
        self.simulated = 0  # SimPy runs
        self.events = 0  # SimPy events over all runs

    def layer_cost(self, shape: StepShape) -> tuple[LayerCost, float]:
        c, q = self.cost.layer(shape), self.quantum
        return (LayerCost(_bin(c.gpu, q), _bin(c.host, q), _bin(c.tail, q), _bin(c.link_comm, q)),
                _bin(self.cost.head(shape), q))

    def run(self, shape: StepShape, trace: bool = False) -> StepResult:
        layer, head = self.layer_cost(shape)
        uva_read, uva_key = None, None
        if self.placement.mechanism == "uva":  # UVA reads grow with the step's tokens (sim/costs.py)
            uva_read = lambda b, tokens=shape.tokens: self.cost.uva_read(b, tokens)  # noqa: E731
            uva_key = _bin(uva_read(self.placement.layer_bytes), self.quantum)
        join = self.join or join_mode(self.cost, shape)
        key = (layer, head, uva_key, join if self.placement.wrap else None)
        if not trace and key in self._cache:
            return self._cache[key]
        res = simulate_layers(self.placement, layer, head, self.cost.transfer, self.cost.copy_slowdown, trace,
                              wrap=self.placement.wrap, uva_read=uva_read, join=join)
        self.simulated += 1
        self.events += res.events
        if not trace:
            self._cache[key] = res
        return res
