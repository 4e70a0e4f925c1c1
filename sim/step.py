"""One forward step as a SimPy discrete-event simulation of the GPU's lanes.

Lanes (SimPy processes of ``_Lanes``, one method each):
- host: Python launching each layer's kernels (and, on vLLM's copy path, issuing its copies);
- compute: the compute stream; a layer's kernels run once launched and, for prefetched layers,
  once its copy's CUDA event fired; on vLLM's copy path the per-parameter copies run here too;
- copy: the prefetch copy stream, filling the staging slots in order; a copy into a slot waits for
  the event recorded after the last layer that read that slot (``Placement.schedule``, the one
  schedule the runtime follows too: offloadlab/schedule.py);
- link: the GPU's host link, shared equally by the transfers in flight (processor sharing): the
  copies, UVA's zero-copy reads (an offloaded layer under UVA takes max(gpu, its reads over the
  link), the reads growing with the step's tokens: ``uva_read``, sim/costs.py) and, for tensor
  parallelism without NVLink, the layer's all-reduces (``LayerCost.link_comm``, run at the end of
  the layer), which slow a prefetch copy in flight and are slowed by it.

A compute span cannot end before the host launched the layer's last kernel: it ends at
max(start + gpu, host_done + tail). While a copy is in flight, compute runs ``copy_slowdown``
times slower (copies compete for HBM).
"""
from __future__ import annotations

import dataclasses
import math
from bisect import bisect_right
from dataclasses import dataclass, field

import simpy

from ..errors import ConfigError
from ..policy import Placement
from ..trace import Span, Trace, idle_lanes
from .costs import LayerCost, StepShape


@dataclass(frozen=True)
class StepResult:
    time: float  # seconds from the step's start until the LM head finished
    busy: dict[str, float]  # lane -> busy seconds
    stall: float  # compute-stream seconds spent waiting on copies
    events: int = field(compare=False)  # SimPy events processed (0: taken by the lane recurrence)
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


def _joins(placement: Placement, passes: int, join: str) -> tuple[dict, dict]:
    """Where vLLM's prefetch backend joins the copies it started (see ``simulate_layers``): global
    layer -> copies its compute is joined with (piecewise), and pass -> copies its forward joins
    before the LM head. Copies are global layer indices, pass * L + layer; pass ``passes`` is the
    step after the last one simulated (its first copies are started, and joined, in the last)."""
    if join == "eager" or not placement.wrap or not placement.offloaded_layers:
        return {}, {}
    L, off, sched = placement.layers, placement.offloaded_layers, placement.schedule
    at_layer: dict[int, list[int]] = {}
    at_end: dict[int, list[int]] = {}
    for p in range(passes + 1):
        for m in range(len(off) if p < passes else sched.ring):
            who = sched.issuer(m)
            if who is None or p + who[0] < 0:
                continue
            q, by = p + who[0], off[who[1]]  # issued right after layer ``by`` of pass q
            copy = p * L + off[m]
            if join == "piecewise" and by + 1 < L:  # the piece reaching the next layer joins it
                at_layer.setdefault(q * L + by + 1, []).append(copy)
            elif join == "piecewise" or q != p:  # full graph: copies for the next step outlive the forward
                at_end.setdefault(q, []).append(copy)
    return at_layer, at_end


def simulate_layers(placement: Placement, layer: LayerCost, head: float, transfer, copy_slowdown: float = 1.0,
                    trace: bool = False, wrap: bool = False, engine: str = "auto", uva_read=None,
                    join: str = "eager", pre_attention: float = 0.0, plans: dict | None = None) -> StepResult:
    """Simulate one forward pass of ``placement.layers`` identical layers (then the LM head).

    ``wrap``: prefetch keeps copying across steps (vLLM's prefetch backend preloads the first
    ``slots`` offloaded layers of the next step as soon as their slots are free). Two identical
    steps are simulated back to back and the second is reported; its first copies may have started
    during the first (negative start times in the trace).

    ``uva_read(nbytes)``: link seconds the layer's kernels spend reading ``nbytes`` of UVA-offloaded
    weights in this step (default ``transfer``: each weight read once, as for a single M-tile).

    ``join`` (with ``wrap``): how vLLM's prefetch backend joins its copy stream, by how the step runs
    (vllm/model_executor/offloader/prefetch.py ``join_after_forward``/``sync_prev_onload``, called
    around every CUDA-graph capture and replay in vllm/compilation/cuda_graph.py):
    - ``eager``: no join; the next step's first copies overlap this step's tail, its LM head and the
      next step's start.
    - ``full`` (a FULL CUDA graph, vLLM's decode steps): the copies started inside the graph for the
      next step's first layers are joined before the graph ends, so the forward (before the LM
      head, which runs outside the graph) waits for them.
    - ``piecewise`` (piecewise graphs, split at attention): each piece joins the copies it started,
      so a copy issued after layer i must end before the piece reaching layer i+1's attention ends:
      a wait after the first ``pre_attention`` GPU seconds of layer i+1 (its QKV projection: the cost
      model's ``pre_attention``; 0 joins at the layer's start), the rest of the layer after it (after
      the last layer: before the LM head).
    A joined copy that is still running is a ``wait`` span on the compute lane.

    ``engine``: "simpy" runs the lanes as SimPy processes; "auto" (the default) takes the same lanes
    through ``lane_recurrence`` when no trace is asked for and no transfer ever shares the link or
    changes a compute span's speed (``recurrence_applies``: the common case), else SimPy. ``plans``: where
    the recurrence's plans (``Recurrence``) for this placement, ``transfer`` and ``wrap`` are kept, by join
    mode, to be built once for many calls (a StepModel's); None: built for this call.
    """
    if join not in JOINS:
        raise ConfigError("join", join, f"one of {JOINS}")
    if engine not in ("auto", "simpy"):
        raise ConfigError("engine", engine, "'auto' or 'simpy'")
    uva_read = uva_read or transfer
    if engine == "auto" and not trace and recurrence_applies(placement, layer, copy_slowdown):
        plan = None if plans is None else plans.get(join)
        if plan is None:
            plan = Recurrence(placement, transfer, wrap, join)
            if plans is not None:
                plans[join] = plan
        return plan.run(layer, head, uva_read, pre_attention)
    return _Lanes(placement, layer, head, transfer, copy_slowdown, trace, wrap, uva_read, join, pre_attention).run()


class CountingEnvironment(simpy.Environment):
    """A SimPy environment that counts the events it schedules (for the benchmarks' figures)."""

    def __init__(self):
        super().__init__()
        self.scheduled = 0

    def schedule(self, event, priority=simpy.core.NORMAL, delay=0):
        self.scheduled += 1
        super().schedule(event, priority, delay)


class _Lanes:
    """The SimPy model of one step: a host process launching layers, a compute process, a copier
    process for the prefetch copy stream, and the shared host link. Global layer index g = pass * L
    + layer; with wrap two passes (steps) run back to back and the second is reported."""

    def __init__(self, placement: Placement, layer: LayerCost, head: float, transfer, copy_slowdown: float,
                 trace: bool, wrap: bool, uva_read, join: str, pre_attention: float = 0.0):
        self.env = env = CountingEnvironment()
        self.placement, self.layer, self.head, self.transfer = placement, layer, head, transfer
        self.pre_attention = pre_attention
        self.uva_read = uva_read
        self.copy_slowdown, self.trace = copy_slowdown, trace
        self.L = L = placement.layers
        self.offloaded = placement.offloaded_layers if placement.mechanism == "prefetch" else ()
        self.P = P = 2 if wrap and self.offloaded else 1
        self.sched = placement.schedule if self.offloaded else None
        self.link = SharedLink(env)
        self.host_start = [env.event() for _ in range(P * L)]
        self.host_done = [env.event() for _ in range(P * L)]
        self.host_done_at = [0.0] * (P * L)
        self.pass_done = [env.event() for _ in range(P)]
        self.pass_end = [0.0] * P
        self.join_layer, self.join_end = _joins(placement, P, join) if P > 1 else ({}, {})
        self.extra = 1 if self.join_end or self.join_layer else 0  # the next step's first copies, joined
        prefetched = [p * L + j for p in range(P) for j in self.offloaded]
        prefetched += [P * L + j for j in self.offloaded[:self.sched.ring]] if self.extra else []
        self.copy_done = {g: env.event() for g in prefetched}
        self.released = {g: env.event() for g in prefetched}
        self.spans: list[Span] = []
        self.busy = idle_lanes()
        self.copying = 0  # copies in flight (compute runs copy_slowdown times slower meanwhile)
        self.stall = 0.0

    def reported(self, g: int) -> bool:
        return g // self.L == self.P - 1

    def record(self, lane: str, kind: str, t0: float, g: int, layer: int | None = None) -> None:
        """Account the span that just ended on ``lane`` if it belongs to the reported (last) pass;
        ``layer`` overrides g's layer (L: the LM head)."""
        if not self.reported(g):
            return
        if kind == "wait":
            self.stall += self.env.now - t0
        else:
            self.busy[lane] += self.env.now - t0
        if self.trace:
            self.spans.append(Span(lane, kind, t0, self.env.now, layer=g % self.L if layer is None else layer))

    def host(self):
        """Python launching each layer's kernels (and, on vLLM's copy path, issuing its copies)."""
        env, pl = self.env, self.placement
        for p in range(self.P):
            if p:
                yield self.pass_done[p - 1]  # the next step is launched after the last one's tokens are back
            for i in range(self.L):
                g = p * self.L + i
                self.host_start[g].succeed()
                t0 = env.now
                issue = len(pl.offloaded[i]) * COPY_ISSUE if pl.mechanism == "copy" else 0.0
                yield env.timeout(self.layer.host + issue)
                self.record("host", "launch", t0, g)
                self.host_done_at[g] = env.now
                self.host_done[g].succeed()

    def copy(self, seconds: float, lane: str, g: int):
        """One copy over the shared link, recorded on ``lane`` (the copy stream, or the compute stream
        for the copy path)."""
        t0 = self.env.now
        self.copying += 1
        yield from self.link.transfer(seconds)
        self.copying -= 1
        self.record(lane, "copy", t0, g)
        if self.reported(g):
            self.busy["link"] += seconds

    def copier(self):
        """The copy stream: copies in order, each into its slot once the read it must follow is done
        (offloadlab/schedule.py, shared with the runtime)."""
        for p in range(self.P + self.extra):
            for m, i in enumerate(self.offloaded if p < self.P else self.offloaded[:self.sched.ring]):
                after = self.sched.waits_for(m)
                if after is not None and p + after[0] >= 0:
                    prev = self.released[(p + after[0]) * self.L + self.offloaded[after[1]]]
                    if not prev.processed:
                        yield prev
                g = p * self.L + i
                yield from self.copy(self.transfer(self.placement.layer_offloaded_bytes(i)), "copy", g)
                self.copy_done[g].succeed()

    def compute(self):
        """The compute stream: each layer once launched (and, prefetched, once its copy is done), then
        the LM head; the copy path's copies and UVA's zero-copy reads happen here too."""
        env, pl, layer = self.env, self.placement, self.layer
        for p in range(self.P):
            for i in range(self.L):
                g = p * self.L + i
                if not self.host_start[g].processed:
                    yield self.host_start[g]
                if pl.mechanism == "copy" and pl.offloaded[i]:
                    # the layer's per-parameter copies, back to back on the compute stream: one span
                    yield from self.copy(sum(self.transfer(b) for b in pl.offloaded[i]), "compute", g)
                if g in self.copy_done and not self.copy_done[g].processed:
                    t0 = env.now
                    yield self.copy_done[g]
                    self.record("compute", "wait", t0, g)
                t0 = env.now
                gpu = (layer.gpu - layer.link_comm) * (self.copy_slowdown if self.copying else 1.0)
                joins = self.join_layer.get(g, ())
                if joins:  # piecewise: the piece ending at this layer's attention joins the copies it started
                    pre = min(self.pre_attention, gpu)
                    yield env.timeout(pre)
                    self.record("compute", "compute", t0, g)
                    yield from self.joined(joins, g)
                    gpu, t0 = gpu - pre, env.now
                if pl.mechanism == "uva" and pl.offloaded[i]:
                    # zero-copy: the kernels stream the offloaded weights over the host link as they run
                    reading = sum(self.uva_read(b) for b in pl.offloaded[i])
                    yield env.all_of([env.timeout(gpu), env.process(self.link.transfer(reading))])
                    if self.reported(g):
                        self.busy["link"] += reading
                else:
                    yield env.timeout(gpu)
                if layer.link_comm:  # the layer's all-reduces, over the host link: shared with copies
                    yield from self.link.transfer(layer.link_comm)
                    if self.reported(g):
                        self.busy["link"] += layer.link_comm
                if not self.host_done[g].processed:
                    yield self.host_done[g]
                late = self.host_done_at[g] + layer.tail - env.now  # the last kernel, launched late, still runs
                if late > 0:
                    yield env.timeout(late)
                self.record("compute", "compute", t0, g)
                if g in self.released:
                    self.released[g].succeed()
            yield from self.joined(self.join_end.get(p, ()), p * self.L + self.L - 1)  # join_after_forward
            t0 = env.now
            yield env.timeout(self.head)
            self.record("compute", "compute", t0, p * self.L, layer=self.L)  # the LM head
            self.pass_end[p] = env.now
            self.pass_done[p].succeed()

    def joined(self, copies, g: int):
        """Wait (a ``wait`` span at layer g) for the copies a CUDA graph joins."""
        for c in copies:
            if not self.copy_done[c].processed:
                t0 = self.env.now
                yield self.copy_done[c]
                self.record("compute", "wait", t0, g)

    def run(self) -> StepResult:
        env = self.env
        env.process(self.host())
        if self.offloaded:
            env.process(self.copier())
        env.run(until=env.process(self.compute()))
        start = self.pass_end[self.P - 2] if self.P > 1 else 0.0
        tr = Trace(spans=[dataclasses.replace(sp, start=sp.start - start, end=sp.end - start) for sp in self.spans],
                   meta={"source": "sim"}) if self.trace else None
        return StepResult(env.now - start, self.busy, self.stall, env.scheduled, tr)


def recurrence_applies(placement: Placement, layer: LayerCost, copy_slowdown: float) -> bool:
    """The lanes reduce to a recurrence when no two transfers are ever on the link at once (no
    all-reduce over the host link beside prefetch copies) and copies never slow compute."""
    prefetching = placement.mechanism == "prefetch" and bool(placement.offloaded_layers)
    return copy_slowdown == 1.0 and not (prefetching and layer.link_comm)


def lane_recurrence(placement: Placement, layer: LayerCost, head: float, transfer, wrap: bool = False,
                    uva_read=None, join: str = "eager", pre_attention: float = 0.0) -> StepResult:
    """The same lanes as the SimPy model (host, compute, copy, link; the same staging-slot schedule),
    walked in dependency order: each span starts at the max of the ends it waits for. Exact where
    ``recurrence_applies`` (a property test holds it to the SimPy model); no trace, no SimPy events.
    (``Recurrence``: the walk's plan, built once and run for any layer costs.)"""
    return Recurrence(placement, transfer, wrap, join).run(layer, head, uva_read or transfer, pre_attention)


class Recurrence:
    """``lane_recurrence``'s plan for one (placement, transfer, wrap, join): everything that does not depend
    on the layer costs (which layers copy what, each copy's seconds and the read it waits for, the
    joins) worked out once, so ``run`` is the walk alone (a StepModel keeps one per join mode)."""

    __slots__ = ("L", "P", "resident", "layers", "copies", "join_end")

    def __init__(self, placement: Placement, transfer, wrap: bool = False, join: str = "eager"):
        self.L = L = placement.layers
        self.resident = not any(placement.offloaded)  # every weight resident: host and compute lanes only
        if self.resident:
            return
        offloaded = placement.offloaded_layers if placement.mechanism == "prefetch" else ()
        self.P = P = 2 if wrap and offloaded else 1
        copy_path, uva = placement.mechanism == "copy", placement.mechanism == "uva"
        sched = placement.schedule if offloaded else None
        slot_of = {i: m for m, i in enumerate(offloaded)}
        n = len(offloaded)
        join_layer, join_end = _joins(placement, P, join) if P > 1 else ({}, {})
        extra = 1 if join_layer or join_end else 0  # the step after: its first copies are joined in the last
        # the copy stream, pass-major: copy k = p * n + m (seconds, the released read it waits for as
        # p' * n + m' or -1, whether it is in the reported pass)
        copy_s = [transfer(placement.layer_offloaded_bytes(i)) for i in offloaded]
        self.copies = []
        for k in range(P * n + (sched.ring if extra else 0)):
            p, m = divmod(k, n)
            after = sched.waits_for(m)
            wait = (p + after[0]) * n + after[1] if after is not None and p + after[0] >= 0 else -1
            self.copies.append((copy_s[m], wait, p == P - 1))

        def flat(c: int) -> int:  # a joined copy (global layer index) as its copy number
            return c // L * n + slot_of[c % L]
        # per pass and layer: (its copy number or -1, the copy path's issue seconds, its copies'
        # seconds (None: none), its UVA-offloaded parameters (None: none), copies its piece joins)
        self.layers = [
            [(p * n + slot_of[i] if i in slot_of else -1,
              len(placement.offloaded[i]) * COPY_ISSUE if copy_path else 0.0,
              sum(transfer(b) for b in placement.offloaded[i]) if copy_path and placement.offloaded[i] else None,
              placement.offloaded[i] if uva and placement.offloaded[i] else None,
              [flat(c) for c in join_layer.get(p * L + i, ())])
             for i in range(L)]
            for p in range(P)]
        self.join_end = [[flat(c) for c in join_end.get(p, ())] for p in range(P)]  # before the LM head

    def run(self, layer: LayerCost, head: float, uva_read=None, pre_attention: float = 0.0) -> StepResult:
        """The step's result for these layer costs (``uva_read``, ``pre_attention``: as in ``simulate_layers``)."""
        if self.resident:
            return _resident_recurrence(self.L, layer, head)
        P, copies = self.P, self.copies
        last = P - 1
        copy_end = [0.0] * len(copies)
        released = [0.0] * len(copies)  # by copy number: when the layer computing from that copy ended
        b_host = b_compute = b_copy = b_link = stall = 0.0
        host_free = compute_free = copier_free = pass_end = prev_end = 0.0
        issued = 0  # copies placed on the copy stream so far (pass-major)
        host, tail, comm = layer.host, layer.tail, layer.link_comm
        gpu0 = layer.gpu - comm

        def ended(c: int) -> float:
            """When copy c ends: every copy up to it placed first, in order (the copy stream is FIFO), each
            once the read it must follow is known."""
            nonlocal issued, copier_free, b_copy, b_link
            while issued <= c:
                s, wait, rep = copies[issued]
                start = copier_free
                if wait >= 0 and released[wait] > start:  # max(start, released[wait])
                    start = released[wait]
                copier_free = copy_end[issued] = start + s
                if rep:
                    b_copy += s
                    b_link += s
                issued += 1
            return copy_end[c]

        for p in range(P):
            reported = p == last
            if p:
                host_free = max(host_free, pass_end)  # the next step is launched after the last one's tokens
            for k, issue, cp, uva_parts, joins in self.layers[p]:
                h0 = host_free
                host_free = h0 + host + issue
                t = h0 if h0 > compute_free else compute_free  # max(compute_free, h0), without the call
                if reported:
                    b_host += host_free - h0
                if cp is not None:
                    t += cp
                    if reported:
                        b_compute += cp
                        b_link += cp
                if k >= 0:
                    e = ended(k)
                    if e > t:
                        if reported:
                            stall += e - t
                        t = e
                gpu = gpu0
                if joins:  # piecewise: the piece ending at this layer's attention joins the copies it started
                    pre = pre_attention if pre_attention < gpu else gpu
                    mid = t + pre
                    if reported:
                        b_compute += mid - t
                    for c in joins:
                        e = ended(c)
                        if e > mid:
                            if reported:
                                stall += e - mid
                            mid = e
                    t, gpu = mid, gpu - pre
                if uva_parts is not None:
                    reading = sum(uva_read(b) for b in uva_parts)
                    gpu = max(gpu, reading)
                    if reported:
                        b_link += reading
                end = t + gpu + comm
                if comm and reported:
                    b_link += comm
                late = host_free + tail
                if late > end:  # the last kernel, launched late, still runs: max(end, late)
                    end = late
                if reported:
                    b_compute += end - t
                if k >= 0:
                    released[k] = end
                compute_free = end
            for c in self.join_end[p]:  # join_after_forward, before the LM head
                e = ended(c)
                if e > compute_free:
                    if reported:
                        stall += e - compute_free
                    compute_free = e
            prev_end, pass_end = pass_end, compute_free + head
            if reported:
                b_compute += head
            compute_free = pass_end
        busy = idle_lanes()
        busy["host"], busy["compute"], busy["copy"], busy["link"] = b_host, b_compute, b_copy, b_link
        return StepResult(pass_end - (prev_end if P > 1 else 0.0), busy, stall, 0)


def _resident_recurrence(L: int, layer: LayerCost, head: float) -> StepResult:
    """``lane_recurrence`` of a placement that offloads nothing (no copies, no joins, one pass): the same
    operations on the same numbers in the same order, so the same result to the last bit."""
    host, tail, comm = layer.host, layer.tail, layer.link_comm
    gpu = layer.gpu - comm
    host_free = compute_free = b_host = b_compute = b_link = 0.0
    for _ in range(L):
        h0 = host_free
        host_free = h0 + host
        t = compute_free if compute_free >= h0 else h0  # max(compute_free, h0)
        b_host += host_free - h0
        end = t + gpu + comm
        if comm:
            b_link += comm
        late = host_free + tail
        if late > end:  # the last kernel, launched late, still runs
            end = late
        b_compute += end - t
        compute_free = end
    busy = idle_lanes()
    busy["host"], busy["compute"], busy["link"] = b_host, b_compute + head, b_link
    return StepResult(compute_free + head, busy, 0.0, 0)


def events_processed(env: simpy.Environment) -> int:
    """Events an environment scheduled (a CountingEnvironment counts them; 0 for a plain one)."""
    return getattr(env, "scheduled", 0)


def _bin(x: float, q: float) -> float:
    """Round ``x`` > 0 to the centre of its relative bin of width ``q`` (deterministic)."""
    if x <= 0 or q == 0:
        return max(x, 0.0)
    return math.exp(round(math.log(x) / q) * q)


def join_mode(cost, shape: StepShape) -> str:
    """How a step joins vLLM's prefetch copy stream: as the CUDA graphs it replays (the cost model's
    ``graph_kind``): "full", "piecewise", or "eager" when it replays none. V1's mixed steps up to the
    capture size replay piecewise graphs (FULL_AND_PIECEWISE, vllm/v1/cudagraph_dispatcher.py
    ``dispatch``) and join piece by piece. In vLLM 0.19.0:
    - vllm/compilation/backends.py ``wrap_with_cudagraph_if_needed`` (and, with Inductor's graph
      partition, vllm/compilation/decorators.py ``maybe_use_cudagraph_partition_wrapper``) wraps each
      piece, split at the attention ops (vllm/config/compilation.py ``_attention_ops``; the offloader's
      ops are not among them), in its own CUDAGraphWrapper; vllm/compilation/cuda_graph.py
      ``CUDAGraphWrapper.__call__`` calls ``get_offloader().join_after_forward()`` inside every
      capture, so each piece's graph waits for the copies started in it;
    - vllm/model_executor/offloader/prefetch.py: a layer's hook starts its copy after the layer's
      forward (``start_prefetch``, vllm/model_executor/offloader/prefetch_ops.py), inside the piece
      that runs into the next layer's attention; ``join_after_forward`` joins "only layers prefetched
      by THIS subgraph's layers" and clears ``_prefetch_in_capture``, so the ``_wait_for_layer`` of a
      reading layer in a later piece returns without a wait: the piece's join is the one that counts;
    - under one FULL graph (vllm/v1/worker/gpu_model_runner.py wraps the model in
      ``CUDAGraphWrapper(runtime_mode=FULL)``; the pieces' wrappers, their mode not the step's, just
      call their code inside that one capture) a copy is waited for by the layer that reads it
      (``_wait_for_layer``: ``wait_event``) and ``join_after_forward`` joins only the copies for the
      next step's first layers, at the end;
    - in an eager step nothing joins: ``_wait_for_layer`` waits for the layer's own event.
    ``sync_prev_onload`` before every replay waits only for copies queued outside a graph (after an
    eager step), which a step simulated on its own has none of."""
    rf = getattr(cost, "roofline", cost)
    return rf.graph_kind(shape) or "eager"


class StepModel:
    """Step times for one (model, placement, cost model), memoized.

    Steps whose per-layer costs fall in the same relative bin (width ``quantum``, 0.2% by default: at
    most 0.1% off) are identical steps: the second costs a dictionary look-up, not a simulation.
    ``quantum=0`` keys on the exact costs. This is how a whole workload of thousands of steps stays
    fast.
    """

    def __init__(self, placement: Placement, cost, quantum: float = 2e-3, join: str | None = None):
        self.placement, self.cost, self.quantum = placement, cost, quantum
        if join is not None and join not in JOINS:
            raise ConfigError("join", join, f"one of {JOINS} or None (by the step: see join_mode)")
        self.join = join
        self._cache: dict[tuple, StepResult] = {}
        self._plans: dict[str, Recurrence] = {}  # join mode -> the lane recurrence's plan (simulate_layers)
        self._binned: dict[float, float] = {}  # seconds -> _bin(seconds, quantum), for _binned_costs
        self._monotone = bool(getattr(cost, "context_monotone", False))  # see decodes
        # decode steps, where the cost model is context_monotone: sequences -> (starts, ends, keys), the
        # disjoint KV-token intervals found to share one memo key, by start (see _decode_key)
        self._decode_bins: dict[int, tuple[list, list, list]] = {}
        self.simulated = 0  # steps simulated (memo misses and traced steps: the recurrence or SimPy)
        self.events = 0  # SimPy events over all of them (the recurrence takes none)

    def _binned_costs(self, shape: StepShape) -> tuple[float, float, float, float, float]:
        """(GPU, host, tail, all-reduce seconds of one layer, head seconds), each binned (``_bin``)."""
        c, q, binned = self.cost.layer(shape), self.quantum, self._binned
        # host, tail, all-reduce and head seconds take few values (they follow the batch, not the
        # context): their bins are remembered; the GPU seconds, nearly one value per step, are not
        host, tail, comm, head = c.host, c.tail, c.link_comm, self.cost.head(shape)
        bh, bt, bc, bhd = binned.get(host), binned.get(tail), binned.get(comm), binned.get(head)
        if bh is None:
            bh = binned[host] = _bin(host, q)
        if bt is None:
            bt = binned[tail] = _bin(tail, q)
        if bc is None:
            bc = binned[comm] = _bin(comm, q)
        if bhd is None:
            bhd = binned[head] = _bin(head, q)
        return _bin(c.gpu, q), bh, bt, bc, bhd

    def decodes(self, seqs: int, kv0: int, n: int, whole: bool = False):
        """The results of ``n`` decode steps of ``seqs`` sequences, step j reading ``kv0 + seqs * j`` KV
        tokens (a decode run: sim/serving.py), as (result, steps) runs in order. Where the cost model is
        ``context_monotone`` (the roofline), every cost is monotone in j, so two steps in one bin have
        every step between them in it too: a run's end is found by galloping and bisection, evaluating
        the cost model O(log run) times instead of once per step, and not at all inside a KV interval
        an earlier run already found in one bin (``_decode_key``). The results are exactly those of
        ``run`` step by step (tests/test_step.py). Other cost models: one step per run.

        A caller may ``send`` the number of steps it expects to take in all (a hint: galloping then
        probes no further than that until the caller asks for more; the results are the same). ``whole``:
        the caller takes all ``n`` steps whatever comes (it sends no hints): each bin's steps come as one
        run, not its first step alone and then the rest; the same probes, the same results."""
        if not self._monotone:
            for j in range(n):
                kv = kv0 + seqs * j
                yield self.run(StepShape.decode(seqs, kv)), 1
            return
        bins = self._decode_bins.get(seqs)
        if bins is None:
            bins = self._decode_bins[seqs] = ([], [], [])
        ends = bins[1]
        j, guess, hint = 0, 1, None
        while j < n:
            kv = kv0 + seqs * j
            key, i = self._decode_key(seqs, kv, bins)
            res = self._cache.get(key)
            if res is None:
                res = self._simulate(key, StepShape.decode(seqs, kv))
            if not whole:
                hint = (yield res, 1) or hint  # first alone: a caller that stops after it spends no probes
            # every step up to the end of kv's interval is in res's bin: those first, without probes
            lo = min((ends[i] - kv0) // seqs, n - 1)
            if lo > j and not whole:
                hint = (yield res, lo - j) or hint
            # then galloping and bisection: lo the last step known in res's bin, hi the first known
            # outside it (None: not found yet); up to the hint, or the end once the caller passed it
            start, step, hi = lo, guess, None
            last = n - 1 if hint is None or lo + 1 >= hint else min(n - 1, hint - 1)
            if lo < last and i + 1 < len(ends) and bins[0][i + 1] <= kv0 + seqs * (lo + 1) and bins[2][i + 1] != key:
                hi = lo + 1  # the next step reads into the next known interval, of another key: no probes
            while hi is None and lo < last:
                probe = min(lo + step, last)
                if self._decode_key(seqs, kv0 + seqs * probe, bins)[0] == key:
                    lo = probe
                    step *= 2
                else:
                    hi = probe
            if hi is not None:
                while hi - lo > 1:
                    mid = (lo + hi) // 2
                    if self._decode_key(seqs, kv0 + seqs * mid, bins)[0] == key:
                        lo = mid
                    else:
                        hi = mid
            guess = max(1, lo + 1 - j)
            if whole:
                yield res, lo + 1 - j
            elif lo > start:
                hint = (yield res, lo - start) or hint
            j = lo + 1

    def _decode_key(self, seqs: int, kv: int, bins: tuple[list, list, list]) -> tuple[tuple, int]:
        """(the memo key of a decode step of ``seqs`` sequences reading ``kv`` KV tokens, the index of the
        interval in ``bins`` holding ``kv``). With a context_monotone cost model, the key is monotone in
        ``kv`` at fixed ``seqs`` (every binned cost is), so two KV counts with one key have every count
        between them in that key too: ``bins`` keeps such intervals (disjoint, by start) and answers
        inside one without evaluating the cost model; a new key extends a neighbour with that key."""
        starts, ends, keys = bins
        i = bisect_right(starts, kv) - 1
        if i >= 0 and kv <= ends[i]:
            return keys[i], i
        key = self._key(StepShape.decode(seqs, kv))
        right = i + 1 < len(starts) and keys[i + 1] == key
        if i >= 0 and keys[i] == key:
            if right:  # kv joins the intervals on either side
                ends[i] = ends[i + 1]
                del starts[i + 1], ends[i + 1], keys[i + 1]
            else:
                ends[i] = kv
            return key, i
        if right:
            starts[i + 1] = kv
            return key, i + 1
        starts.insert(i + 1, kv)
        ends.insert(i + 1, kv)
        keys.insert(i + 1, key)
        return key, i + 1

    def _key(self, shape: StepShape) -> tuple:
        """The memo key of a step: its binned layer and head costs (``_binned_costs``, flat: a tuple of
        floats compares fast), UVA reads, the graph join (None without wrap) and, for a piecewise join, the
        binned seconds before the joining layer's attention (``pre_attention``)."""
        uva_key = join = pre = None
        if self.placement.mechanism == "uva":  # UVA reads grow with the step's tokens (sim/costs.py)
            uva_key = _bin(self.cost.uva_read(self.placement.layer_bytes, shape.tokens), self.quantum)
        if self.placement.wrap:
            join = self.join or join_mode(self.cost, shape)
            if join == "piecewise":  # where in a layer its piece joins (simulate_layers)
                pre = _bin(self.cost.pre_attention(shape), self.quantum)
        return (*self._binned_costs(shape), uva_key, join, pre)

    def run(self, shape: StepShape, trace: bool = False) -> StepResult:
        key = self._key(shape)
        if not trace and key in self._cache:
            return self._cache[key]
        return self._simulate(key, shape, trace)

    def _simulate(self, key: tuple, shape: StepShape, trace: bool = False) -> StepResult:
        """Simulate the step of memo key ``key`` (``_key(shape)``) and, without a trace, memoize it."""
        layer, head = LayerCost(*key[:4]), key[4]
        uva_read = None
        if self.placement.mechanism == "uva":
            uva_read = lambda b, tokens=shape.tokens: self.cost.uva_read(b, tokens)  # noqa: E731
        join, pre = key[-2] or "eager", key[-1] or 0.0  # no wrap (join None): no copies to join
        res = simulate_layers(self.placement, layer, head, self.cost.transfer, self.cost.copy_slowdown, trace,
                              wrap=self.placement.wrap, uva_read=uva_read, join=join, pre_attention=pre,
                              plans=self._plans)
        self.simulated += 1
        self.events += res.events
        if not trace:
            self._cache[key] = res
        return res
