"""One forward step as a SimPy discrete-event simulation of the GPU's lanes.

Lanes (SimPy processes and resources):
- host: Python launching each layer's kernels (and, on vLLM's copy path, issuing its copies);
- compute: the compute stream; a layer's kernels run once launched and, for prefetched layers,
  once its copy's CUDA event fired; on vLLM's copy path the per-parameter copies run here too;
- copy: the prefetch copy stream, filling ``slots`` staging buffers in order; a copy into a slot
  waits for the event recorded after the last layer that read that slot;
- link: the host link (a Resource shared by every transfer). With UVA (zero-copy) an offloaded
  layer's kernels hold the link while they run: the layer takes max(gpu, its bytes over the link).

A compute span cannot end before the host launched the layer's last kernel: it ends at
max(start + gpu, host_done + tail). While a copy is in flight, compute runs ``copy_slowdown``
times slower (copies compete for HBM).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import simpy

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


COPY_ISSUE = 10e-6  # host seconds to allocate and enqueue one per-parameter copy (vLLM's copy path)


def simulate_layers(placement: Placement, layer: LayerCost, head: float, transfer, copy_slowdown: float = 1.0,
                    trace: bool = False) -> StepResult:
    """Simulate one forward pass of ``placement.layers`` identical layers (then the LM head)."""
    env = simpy.Environment()
    L = placement.layers
    copy_path = placement.mechanism == "copy"
    uva = placement.mechanism == "uva"
    prefetched = placement.offloaded_layers if placement.mechanism == "prefetch" else ()
    slots = placement.slots
    link = simpy.Resource(env, capacity=1)
    host_start = [env.event() for _ in range(L)]
    host_done = [env.event() for _ in range(L)]
    host_done_at = [0.0] * L
    copy_done = {j: env.event() for j in prefetched}
    released = {j: env.event() for j in prefetched}
    spans: list[Span] = []
    busy = {"host": 0.0, "compute": 0.0, "copy": 0.0, "link": 0.0}
    state = {"copying": 0, "stall": 0.0, "events": 0}

    def span(lane, kind, t0, i=-1):
        if trace:
            spans.append(Span(lane, kind, t0, env.now, layer=i))

    def host():
        for i in range(L):
            host_start[i].succeed()
            t0 = env.now
            issue = len(placement.offloaded[i]) * COPY_ISSUE if copy_path else 0.0
            yield env.timeout(layer.host + issue)
            busy["host"] += env.now - t0
            span("host", "launch", t0, i)
            host_done_at[i] = env.now
            host_done[i].succeed()

    def copy(seconds, lane, i):
        with link.request() as req:
            yield req
            t0 = env.now
            state["copying"] += 1
            yield env.timeout(seconds)
            state["copying"] -= 1
            busy[lane] += seconds
            busy["link"] += seconds
            span(lane, "copy", t0, i)

    def copier():
        for m, j in enumerate(prefetched):
            if m >= slots:
                prev = prefetched[m - slots]
                if not released[prev].processed:
                    yield released[prev]
            yield from copy(transfer(placement.layer_offloaded_bytes(j)), "copy", j)
            copy_done[j].succeed()

    def compute():
        for i in range(L):
            if not host_start[i].processed:
                yield host_start[i]
            if copy_path and placement.offloaded[i]:
                # the layer's per-parameter copies, back to back on the compute stream: one span
                yield from copy(sum(transfer(b) for b in placement.offloaded[i]), "compute", i)
            if i in copy_done and not copy_done[i].processed:
                t0 = env.now
                yield copy_done[i]
                state["stall"] += env.now - t0
                span("compute", "wait", t0, i)
            t0 = env.now
            gpu = layer.gpu * (copy_slowdown if state["copying"] else 1.0)
            if uva and placement.offloaded[i]:
                # zero-copy: the kernels stream the offloaded weights over the host link as they run
                with link.request() as req:
                    yield req
                    reading = sum(transfer(b) for b in placement.offloaded[i])
                    yield env.timeout(max(gpu, reading))
                    busy["link"] += reading
            else:
                yield env.timeout(gpu)
            if not host_done[i].processed:
                yield host_done[i]
            late = host_done_at[i] + layer.tail - env.now  # the last kernel, launched late, still runs
            if late > 0:
                yield env.timeout(late)
            busy["compute"] += env.now - t0
            span("compute", "compute", t0, i)
            if i in released:
                released[i].succeed()
        t0 = env.now
        yield env.timeout(head)
        busy["compute"] += head
        span("compute", "compute", t0, L)

    env.process(host())
    if prefetched:
        env.process(copier())
    done = env.process(compute())
    env.run(until=done)
    events = next(env._eid) if hasattr(env, "_eid") else 0  # SimPy's own event counter
    tr = Trace(spans=spans, meta={"source": "sim"}) if trace else None
    return StepResult(env.now, busy, state["stall"], events, tr)


def _bin(x: float, q: float) -> float:
    """Round ``x`` > 0 to the centre of its relative bin of width ``q`` (deterministic)."""
    if x <= 0 or q == 0:
        return max(x, 0.0)
    return math.exp(round(math.log(x) / q) * q)


class StepModel:
    """Step times for one (model, placement, cost model), memoized.

    Steps whose per-layer costs fall in the same relative bin (width ``quantum``, 0.2% by default: at most 0.1% off)
    are identical steps: the second costs a dictionary look-up, not a SimPy run. ``quantum=0``
    keys on the exact costs. This is how a whole
    workload of thousands of steps stays fast.
    """

    def __init__(self, placement: Placement, cost, quantum: float = 2e-3):
        self.placement, self.cost, self.quantum = placement, cost, quantum
        self._cache: dict[tuple, StepResult] = {}
        self.simulated = 0  # SimPy runs
        self.events = 0  # SimPy events over all runs

    def layer_cost(self, shape: StepShape) -> tuple[LayerCost, float]:
        c, q = self.cost.layer(shape), self.quantum
        return LayerCost(_bin(c.gpu, q), _bin(c.host, q), _bin(c.tail, q)), _bin(self.cost.head(shape), q)

    def run(self, shape: StepShape, trace: bool = False) -> StepResult:
        layer, head = self.layer_cost(shape)
        key = (layer, head)
        if not trace and key in self._cache:
            return self._cache[key]
        res = simulate_layers(self.placement, layer, head, self.cost.transfer, self.cost.copy_slowdown, trace)
        self.simulated += 1
        self.events += res.events
        if not trace:
            self._cache[key] = res
        return res
