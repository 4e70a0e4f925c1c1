"""Tests of the SimPy step engine (offloadlab.sim.step): lane invariants, bounds, monotonicity,
hand-computed schedules and StepModel memoization.

Expected values are derived from the schedule rules in DESIGN.md ("The simulator's model"), not
from the engine's code: a lane runs one span at a time, a prefetched layer computes only after its
copy, a copy into a staging slot waits for the slot's last reader, vLLM's copy path runs each
offloaded layer's copies on the compute stream right before the layer.
"""
from __future__ import annotations

import math

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from offloadlab.policy import NoOffload, Placement, Prefetch, VllmCopy, VllmUva, interval
from offloadlab import ConfigError, get_gpu, get_model
from offloadlab.specs import GiB, HardwareSpec, ModelSpec
from offloadlab.sim.costs import LayerCost, Roofline, StepShape
from offloadlab.sim.step import (COPY_ISSUE, StepModel, StepResult, lane_recurrence, recurrence_applies,
                                 simulate_layers)

EPS = 1e-12  # absolute slack for float sums of seconds
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ---------------------------------------------------------------- strategies and helpers
def tiny_model(layers: int = 4, hidden: int = 256, intermediate: int = 512) -> ModelSpec:
    return ModelSpec("tiny", layers=layers, hidden=hidden, heads=4, kv_heads=2, head_dim=64,
                     intermediate=intermediate, vocab=1000, max_context=4096)


@st.composite
def models(draw) -> ModelSpec:
    return tiny_model(layers=draw(st.integers(2, 8)), hidden=draw(st.sampled_from([128, 256, 512])),
                      intermediate=draw(st.sampled_from([256, 512, 1024])))


@st.composite
def policies(draw, model: ModelSpec):
    kind = draw(st.sampled_from(["none", "vllm", "prefetch", "interval"]))
    if kind == "none":
        return NoOffload()
    if kind == "vllm":
        frac = draw(st.floats(0.0, 1.0))
        return VllmCopy(frac * model.layers * model.layer_bytes / GiB)
    if kind == "interval":
        return interval(draw(st.integers(1, model.layers + 2)), draw(st.integers(1, 4)))
    g = draw(st.integers(1, model.layers + 1))
    return Prefetch(group=g, per_group=draw(st.integers(1, g)), slots=draw(st.integers(1, 4)))


@st.composite
def layer_costs(draw) -> LayerCost:
    gpu = draw(st.floats(1e-4, 5e-3))
    host = draw(st.floats(1e-6, 5e-3))
    tail = draw(st.floats(0.0, 1.0)) * gpu  # the last kernel is part of the layer's GPU work
    # tensor parallelism without NVLink: part of the layer is all-reduces over the host link
    comm = draw(st.one_of(st.just(0.0), st.floats(0.0, 0.5))) * gpu
    return LayerCost(gpu, host, tail, comm)


def link(lat: float, bw: float):
    return lambda b: lat + b / bw


@st.composite
def cases(draw, slowdown: bool = True):
    """(placement, layer cost, head, latency, bandwidth, copy_slowdown)."""
    m = draw(models())
    placement = draw(policies(m)).place(m)
    cost = draw(layer_costs())
    head = draw(st.floats(0.0, 2e-3))
    lat = draw(st.floats(0.0, 5e-5))
    bw = draw(st.floats(1e8, 1e11))  # a layer of ~0.2-6 MB copies in 2 us .. 60 ms
    sd = draw(st.one_of(st.just(1.0), st.floats(1.0, 2.0))) if slowdown else 1.0
    return placement, cost, head, lat, bw, sd


def spans(res: StepResult, lane: str, kind: str | None = None):
    return [s for s in res.trace.spans if s.lane == lane and (kind is None or s.kind == kind)]


def compute_span(res: StepResult, layer: int):
    (s,) = [s for s in spans(res, "compute", "compute") if s.layer == layer]
    return s


def copy_seconds(placement: Placement, transfer) -> float:
    """All host->device copy time of one step: one flat copy per prefetched layer, one copy per
    parameter on vLLM's copy path."""
    if placement.mechanism == "prefetch":
        return sum(transfer(placement.layer_offloaded_bytes(j)) for j in placement.offloaded_layers)
    if placement.mechanism == "copy":
        return sum(transfer(b) for p in placement.offloaded for b in p)
    return 0.0


def resident(placement: Placement) -> Placement:
    return Placement(tuple(() for _ in range(placement.layers)), placement.layer_bytes, "none")


# ---------------------------------------------------------------- lane invariants
@SETTINGS
@given(cases())
def test_no_lane_runs_two_spans_at_once(case):
    placement, cost, head, lat, bw, sd = case
    res = simulate_layers(placement, cost, head, link(lat, bw), sd, trace=True)
    for lane in ("host", "compute", "copy"):
        ss = sorted(spans(res, lane), key=lambda s: (s.start, s.end))
        for a, b in zip(ss, ss[1:]):
            assert b.start >= a.end - EPS, f"{lane}: {a} overlaps {b}"
    # every layer computes exactly once, in order, then the LM head (layer index L)
    comp = spans(res, "compute", "compute")
    assert [s.layer for s in comp] == list(range(placement.layers + 1))
    assert res.time == pytest.approx(comp[-1].end, abs=EPS)
    assert comp[-1].end - comp[-1].start == pytest.approx(head, abs=EPS)
    # every layer launches once, in order, on the host lane
    assert [s.layer for s in spans(res, "host")] == list(range(placement.layers))


@SETTINGS
@given(cases())
def test_busy_seconds_match_the_trace(case):
    placement, cost, head, lat, bw, sd = case
    res = simulate_layers(placement, cost, head, link(lat, bw), sd, trace=True)
    for lane in ("host", "compute", "copy"):
        traced = sum(s.end - s.start for s in spans(res, lane) if s.kind != "wait")
        assert res.busy[lane] == pytest.approx(traced, rel=1e-9, abs=EPS)
    assert res.stall == pytest.approx(sum(s.end - s.start for s in spans(res, "compute", "wait")), abs=EPS)
    link_work = copy_seconds(placement, link(lat, bw)) + placement.layers * cost.link_comm
    assert res.busy["link"] == pytest.approx(link_work, rel=1e-9, abs=EPS)
    for lane in ("host", "compute", "copy", "link"):
        assert res.busy[lane] <= res.time + EPS


@st.composite
def prefetch_cases(draw):
    m = draw(models())
    g = draw(st.integers(1, m.layers))
    pol = Prefetch(group=g, per_group=draw(st.integers(1, g)), slots=draw(st.integers(1, 4)))
    placement = pol.place(m)
    _, cost, head, lat, bw, sd = draw(cases())
    return placement, cost, head, lat, bw, sd


@SETTINGS
@given(prefetch_cases())
def test_prefetch_waits_for_copies_and_for_slot_readers(case):
    placement, cost, head, lat, bw, sd = case
    res = simulate_layers(placement, cost, head, link(lat, bw), sd, trace=True)
    pref = placement.offloaded_layers
    assert pref, "a Prefetch with group <= layers offloads something"
    copies = {s.layer: s for s in spans(res, "copy", "copy")}
    assert sorted(copies) == list(pref)
    # one copy per offloaded layer, of the whole layer's offloaded bytes; all-reduces sharing the link
    # stretch it, by at most their own seconds
    for j in pref:
        solo = lat + placement.layer_offloaded_bytes(j) / bw
        took = copies[j].end - copies[j].start
        if cost.link_comm == 0:
            assert took == pytest.approx(solo, rel=1e-9)
        assert solo * (1 - 1e-9) <= took <= solo + placement.layers * cost.link_comm + EPS
    # a layer never computes before its copy ended
    for j in pref:
        assert compute_span(res, j).start >= copies[j].end - EPS
    # copies are issued in layer order, and the copy into slot m % s waits for offloaded layer m - s
    s = placement.slots
    for m, j in enumerate(pref):
        if m:
            assert copies[j].start >= copies[pref[m - 1]].end - EPS
        if m >= s:
            assert copies[j].start >= compute_span(res, pref[m - s]).end - EPS
    # no copy span at all on the compute lane for prefetch
    assert not spans(res, "compute", "copy")


@st.composite
def copy_cases(draw):
    m = draw(models())
    frac = draw(st.floats(0.01, 1.0))
    placement = VllmCopy(frac * m.layers * m.layer_bytes / GiB).place(m)
    _, cost, head, lat, bw, sd = draw(cases())
    return placement, cost, head, lat, bw, sd


@SETTINGS
@given(copy_cases())
def test_copy_path_copies_right_before_the_layer(case):
    placement, cost, head, lat, bw, sd = case
    tr = link(lat, bw)
    res = simulate_layers(placement, cost, head, tr, sd, trace=True)
    assert placement.offloaded_layers
    assert not spans(res, "copy"), "the copy path has no copy stream"
    lane_copies = {s.layer: s for s in spans(res, "compute", "copy")}
    assert sorted(lane_copies) == list(placement.offloaded_layers)
    for i in placement.offloaded_layers:
        c, k = lane_copies[i], compute_span(res, i)
        assert c.end == pytest.approx(k.start, abs=EPS), "the layer runs right after its own copies"
        # one synchronous copy per parameter, back to back
        assert c.end - c.start == pytest.approx(sum(tr(b) for b in placement.offloaded[i]), rel=1e-9)
        # and nothing else sits between them on the compute lane
        between = [s for s in spans(res, "compute") if c.end - EPS < s.start < k.start - EPS]
        assert not between
    # compute runs with no copy in flight, so the slowdown never applies: each layer's span is
    # exactly max(gpu, whatever the host's last launch forces)
    for i in range(placement.layers):
        assert compute_span(res, i).end - compute_span(res, i).start >= cost.gpu - EPS
    assert res.stall == 0.0


# ---------------------------------------------------------------- bounds
@SETTINGS
@given(cases())
def test_step_time_lower_bounds(case):
    placement, cost, head, lat, bw, sd = case
    tr = link(lat, bw)
    res = simulate_layers(placement, cost, head, tr, sd)
    L = placement.layers
    assert res.time >= L * cost.gpu + head - EPS  # the compute stream is serial
    # the link is shared, never faster than its solo rate: all its work takes at least its seconds
    assert res.time >= copy_seconds(placement, tr) + L * cost.link_comm - EPS
    # the host launches every layer, and the last layer's last kernel runs after its launch
    host = L * cost.host + (sum(len(p) for p in placement.offloaded) * COPY_ISSUE
                            if placement.mechanism == "copy" else 0.0)
    assert res.time >= host + cost.tail + head - 1e-9


@SETTINGS
@given(prefetch_cases())
def test_prefetch_is_at_most_resident_plus_all_copies(case):
    placement, cost, head, lat, bw, sd = case
    tr = link(lat, bw)
    res = simulate_layers(placement, cost, head, tr, sd)
    # the resident run with every layer slowed down as if a copy were always in flight
    slow = LayerCost((cost.gpu - cost.link_comm) * sd + cost.link_comm, cost.host, cost.tail, cost.link_comm)
    bound = simulate_layers(resident(placement), slow, head, tr).time + copy_seconds(placement, tr)
    assert res.time <= bound * (1 + 1e-9) + 1e-9
    # and never faster than the resident run
    assert res.time >= simulate_layers(resident(placement), cost, head, tr).time * (1 - 1e-9)


@SETTINGS
@given(copy_cases(), st.floats(2.0, 10.0))
def test_copy_path_adds_its_copies_when_gpu_bound(case, ratio):
    placement, cost, head, lat, bw, sd = case
    # GPU-bound: every layer's GPU time exceeds the host's launch time, its copy issue time and
    # its last kernel (launched at the end of the host's work)
    most = max(len(p) for p in placement.offloaded)  # parameters copied by the busiest layer
    host = (cost.gpu - cost.tail) / ratio - most * COPY_ISSUE
    assume(host > 0)
    cost = LayerCost(cost.gpu, host, cost.tail)
    tr = link(lat, bw)
    base = simulate_layers(resident(placement), cost, head, tr).time
    assert base == pytest.approx(placement.layers * cost.gpu + head, rel=1e-9)
    res = simulate_layers(placement, cost, head, tr, sd)
    assert res.time == pytest.approx(base + copy_seconds(placement, tr), rel=1e-9)


# ---------------------------------------------------------------- monotonicity and limits
@SETTINGS
@given(cases(), st.floats(1.0, 20.0), st.floats(0.0, 1.0))
def test_more_host_bandwidth_is_never_slower(case, factor, less_latency):
    placement, cost, head, lat, bw, sd = case
    slow = simulate_layers(placement, cost, head, link(lat, bw), sd).time
    fast = simulate_layers(placement, cost, head, link(lat * less_latency, bw * factor), sd).time
    # slack: the two runs sum different float durations (seen: 1.6e-8 relative); a behavioural
    # regression (a compute span slowed by a copy it now overlaps) costs a whole span
    assert fast <= slow * (1 + 1e-7) + EPS


@SETTINGS
@given(models(), st.integers(0, 5), st.integers(1, 4), layer_costs(), st.floats(0, 2e-3), st.floats(1e8, 1e11),
       st.floats(1.0, 2.0))
def test_interval_beyond_the_layer_count_is_no_offload(m, extra, buffers, cost, head, bw, sd):
    k = m.layers + 1 + extra
    p = interval(k, buffers).place(m)
    assert p.offloaded_layers == () and p.offloaded_bytes == 0 and p.staging_bytes == 0
    tr = link(1e-5, bw)
    res = simulate_layers(p, cost, head, tr, sd)
    ref = simulate_layers(NoOffload().place(m), cost, head, tr, sd)
    assert res.time == ref.time
    assert res == ref


@SETTINGS
@given(cases())
def test_deterministic(case):
    placement, cost, head, lat, bw, sd = case
    a = simulate_layers(placement, cost, head, link(lat, bw), sd, trace=True)
    b = simulate_layers(placement, cost, head, link(lat, bw), sd, trace=True)
    assert a == b
    assert a.trace.spans == b.trace.spans
    assert a.events == b.events > 0


@settings(max_examples=30, deadline=None)
@given(models(), st.floats(0.05, 0.95))
def test_more_offload_on_the_copy_path_is_never_faster(m, frac):
    """vLLM's copy path only adds synchronous copies as the budget grows."""
    cost, tr = LayerCost(1e-3, 1e-4, 1e-5), link(1e-5, 2e10)
    total = m.layers * m.layer_bytes / GiB
    t1 = simulate_layers(VllmCopy(frac * total / 2).place(m), cost, 5e-4, tr).time
    t2 = simulate_layers(VllmCopy(frac * total).place(m), cost, 5e-4, tr).time
    assert t2 >= t1


# ---------------------------------------------------------------- the recurrence is the SimPy model
@st.composite
def recurrence_cases(draw):
    m = draw(models())
    kind = draw(st.sampled_from(["none", "copy", "uva", "prefetch", "wrap"]))
    if kind in ("copy", "uva"):
        gib = draw(st.floats(0.0, 1.0)) * m.layers * m.layer_bytes / GiB
        policy = VllmCopy(gib) if kind == "copy" else VllmUva(gib)
    elif kind == "none":
        policy = NoOffload()
    else:
        g = draw(st.integers(1, m.layers + 1))
        policy = Prefetch(g, draw(st.integers(1, g)), draw(st.integers(1, 5)), wrap=kind == "wrap")
    cost = draw(layer_costs())
    if kind in ("prefetch", "wrap"):  # copies beside all-reduces on the link need processor sharing
        cost = LayerCost(cost.gpu, cost.host, cost.tail, 0.0)
    tr = link(draw(st.floats(0.0, 5e-5)), draw(st.floats(1e8, 1e11)))
    reads = draw(st.integers(1, 8))  # UVA: M-tiles that each read the weight again
    # piecewise joins wait after the layer's first pre_attention seconds (beyond its GPU time: at its end)
    pre = draw(st.sampled_from([0.0, 0.1, 0.5, 1.0, 1.5])) * cost.gpu
    return (policy.place(m), cost, draw(st.floats(0.0, 2e-3)), tr, lambda b: tr(b * reads),
            draw(st.sampled_from(["eager", "full", "piecewise"])), pre)


@SETTINGS
@given(recurrence_cases())
def test_the_lane_recurrence_equals_the_simpy_model(case):
    placement, cost, head, tr, uva_read, join, pre = case
    assert recurrence_applies(placement, cost, 1.0)
    sim = simulate_layers(placement, cost, head, tr, wrap=placement.wrap, engine="simpy", uva_read=uva_read, join=join,
                          pre_attention=pre)
    fast = lane_recurrence(placement, cost, head, tr, wrap=placement.wrap, uva_read=uva_read, join=join,
                           pre_attention=pre)
    assert fast.time == pytest.approx(sim.time, rel=1e-9, abs=EPS)
    assert fast.stall == pytest.approx(sim.stall, rel=1e-9, abs=EPS)
    for lane in ("host", "compute", "copy", "link"):
        assert fast.busy[lane] == pytest.approx(sim.busy[lane], rel=1e-9, abs=EPS), lane


@settings(max_examples=60, deadline=None)
@given(recurrence_cases(), st.floats(0.5, 2.0))
def test_a_kept_recurrence_plan_gives_what_a_fresh_one_gives(case, scale):
    """simulate_layers(plans=...) (a StepModel's): one plan per join mode, built at the first call and run
    again for other layer costs, to the last bit what a plan built for each call gives; a SimPy run
    (a trace) neither builds nor uses one."""
    placement, cost, head, tr, uva_read, join, pre = case
    plans: dict = {}
    other = LayerCost(cost.gpu * scale, cost.host, cost.tail * scale, cost.link_comm * scale)
    kw = dict(wrap=placement.wrap, uva_read=uva_read, join=join, pre_attention=pre)
    for c in (cost, other, cost):
        kept = simulate_layers(placement, c, head, tr, plans=plans, **kw)
        fresh = simulate_layers(placement, c, head, tr, **kw)
        assert (kept.time, kept.busy, kept.stall) == (fresh.time, fresh.busy, fresh.stall)
    assert list(plans) == [join]
    plan = plans[join]
    simulate_layers(placement, other, head, tr, trace=True, plans=plans, **kw)
    assert plans == {join: plan}


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 80), st.floats(1e-7, 1e-2), st.floats(1e-7, 1e-2), st.floats(0.0, 1e-3),
       st.sampled_from([0.0, 1e-6, 3e-5]), st.floats(0.0, 1e-2))
def test_the_resident_recurrence_is_the_general_one_to_the_last_bit(layers, gpu, host, tail, comm, head):
    """A placement that offloads nothing takes a shorter loop (_resident_recurrence): the same float
    operations in the same order as lane_recurrence's general walk, so bit-identical results."""
    import offloadlab.sim.step as step_mod

    gpu = max(gpu, comm)
    placement, cost = NoOffload().place(tiny_model(layers)), LayerCost(gpu, host, tail, comm)
    short = lane_recurrence(placement, cost, head, const_copy(1.0))
    step_mod.any = lambda _: True  # the general walk (module-level name lookup shadows the builtin)
    try:
        general = lane_recurrence(placement, cost, head, const_copy(1.0))
    finally:
        del step_mod.any
    assert (short.time, short.busy, short.stall) == (general.time, general.busy, general.stall)


def test_the_recurrence_is_not_used_where_transfers_share_the_link_or_slow_compute():
    m = tiny_model(4)
    comm = LayerCost(1e-3, 1e-4, 0.0, 2e-4)
    assert not recurrence_applies(interval(2).place(m), comm, 1.0)  # copies beside all-reduces: SimPy
    assert recurrence_applies(VllmCopy(0.0001).place(m), comm, 1.0)  # the copy path copies on the compute stream
    assert not recurrence_applies(NoOffload().place(m), HAND, 1.2)


# ---------------------------------------------------------------- hand-computed schedules
def const_copy(seconds: float):
    return lambda nbytes: seconds


HAND = LayerCost(gpu=1.0, host=0.1, tail=0.0)


def test_hand_no_offload():
    # host launches at 0, .1, .2, .3 and is always ahead; compute 0-1, 1-2, 2-3, 3-4; head 4-4.5
    res = simulate_layers(NoOffload().place(tiny_model(4)), HAND, 0.5, const_copy(3.0), trace=True)
    assert res.time == pytest.approx(4.5)
    assert res.stall == 0.0
    assert res.busy["compute"] == pytest.approx(4.5)
    assert res.busy["host"] == pytest.approx(0.4)


def test_hand_interval2_two_buffers():
    # k=2: layers 1 and 3 offloaded; copies take 3 s each, back to back on the copy stream.
    # copy L1 0-3, copy L3 3-6 (slot 1 is free from the start).
    # compute L0 0-1, wait 1-3, L1 3-4, L2 4-5, wait 5-6, L3 6-7, head 7-7.5
    res = simulate_layers(interval(2, 2).place(tiny_model(4)), HAND, 0.5, const_copy(3.0), trace=True)
    assert res.time == pytest.approx(7.5)
    assert res.stall == pytest.approx(2.0 + 1.0)
    assert [(s.layer, s.start, s.end) for s in spans(res, "copy")] == [(1, 0.0, 3.0), (3, 3.0, 6.0)]
    assert [(s.layer, s.start, s.end) for s in spans(res, "compute", "wait")] == [(1, 1.0, 3.0), (3, 5.0, 6.0)]


def test_hand_interval2_one_buffer():
    # one slot: the copy of L3 waits until L1 (the slot's reader) finished at 4.
    # copy L1 0-3, copy L3 4-7; compute L0 0-1, wait 1-3, L1 3-4, L2 4-5, wait 5-7, L3 7-8, head 8-8.5
    res = simulate_layers(interval(2, 1).place(tiny_model(4)), HAND, 0.5, const_copy(3.0), trace=True)
    assert res.time == pytest.approx(8.5)
    assert res.stall == pytest.approx(2.0 + 2.0)
    assert [(s.layer, s.start, s.end) for s in spans(res, "copy")] == [(1, 0.0, 3.0), (3, 4.0, 7.0)]


def test_hand_wrap_waits_for_the_slots_last_reader():
    # 3 layers, all offloaded (k=1), 2 static slots, prefetch across steps (vLLM's backend); copies 0.5 s,
    # layers 1 s, no host time. Layers 0 and 2 compute from slot 0, layer 1 from slot 1.
    # step 1: copy L0 0-.5, L1 .5-1; L0 .5-1.5; copy L2 (slot 0, after L0) 1.5-2; L1 1.5-2.5; L2 2.5-3.5.
    # The next step's copy of L0 goes into slot 0, whose last reader is L2: 3.5-4 (vLLM's
    # (index + prefetch_step) % n would start it after L1, at 2.5, under L2's reads); L1 follows in
    # order 4-4.5. step 2 (from 3.5): L0 4-5, L1 5-6, copy L2 after L0 5-5.5, L2 6-7: 3.5 s.
    cost = LayerCost(gpu=1.0, host=0.0, tail=0.0)
    res = simulate_layers(Prefetch(1, 1, 2, wrap=True).place(tiny_model(3)), cost, 0.0, const_copy(0.5),
                          trace=True, wrap=True)
    assert res.time == pytest.approx(3.5)
    assert [(s.layer, s.start, s.end) for s in spans(res, "copy")] == pytest.approx(
        [(0, 0.0, 0.5), (1, 0.5, 1.0), (2, 1.5, 2.0)])
    assert [(s.layer, s.start, s.end) for s in spans(res, "compute", "compute") if s.layer < 3] == pytest.approx(
        [(0, 0.5, 1.5), (1, 1.5, 2.5), (2, 2.5, 3.5)])


@st.composite
def wrap_cases(draw):
    m = draw(models())
    g = draw(st.integers(1, m.layers))
    pol = Prefetch(group=g, per_group=draw(st.integers(1, g)), slots=draw(st.integers(1, 5)), wrap=True)
    _, cost, head, lat, bw, sd = draw(cases())
    return pol.place(m), cost, head, lat, bw, sd


@SETTINGS
@given(wrap_cases())
def test_wrapped_copies_never_overwrite_a_slot_still_read(case):
    # Static slots (offloaded layer m reads slot m % ring in every step, as vLLM binds them): in the
    # reported step, the copy into a slot starts after every earlier reader of that slot in this step.
    # (The trace holds one step; the wait across steps is pinned by the hand test above and, on the
    # runtime that follows the same schedule, by tests/test_races.py.)
    placement, cost, head, lat, bw, sd = case
    res = simulate_layers(placement, cost, head, link(lat, bw), sd, trace=True, wrap=True)
    pref = placement.offloaded_layers
    ring = min(placement.slots, len(pref))
    copies = {s.layer: s for s in spans(res, "copy", "copy")}
    assert sorted(copies) == list(pref)
    for m, j in enumerate(pref):
        for earlier in pref[:m]:
            if pref.index(earlier) % ring == m % ring:
                assert copies[j].start >= compute_span(res, earlier).end - EPS, (m, earlier)
        assert compute_span(res, j).start >= copies[j].end - EPS


def test_hand_interval2_copies_hidden():
    # copies of 0.5 s hide behind layer 0 (and layer 2): no stall, time = resident time 4.5
    res = simulate_layers(interval(2, 2).place(tiny_model(4)), HAND, 0.5, const_copy(0.5))
    assert res.time == pytest.approx(4.5)
    assert res.stall == 0.0


def test_hand_copy_slowdown():
    # copy of L1 (0.5 s) is in flight when L0 starts: L0 runs 1.5x slower, 0-1.5; L3's copy
    # 0.5-1.0 ends before L1 starts; L1..L3 run at full speed: 1.5-4.5; head 4.5-5.0
    res = simulate_layers(interval(2, 2).place(tiny_model(4)), HAND, 0.5, const_copy(0.5), copy_slowdown=1.5)
    assert res.time == pytest.approx(5.0)


def test_hand_vllm_copy_path():
    # a budget of exactly one layer offloads the 6 parameters of layer 0; each copy takes 0.5 s on
    # the compute stream: copies 0-3, L0 3-4, L1..L3 4-7, head 7-7.5
    m = tiny_model(4)
    p = VllmCopy(m.layer_bytes / GiB).place(m)
    assert p.offloaded_layers == (0,) and len(p.offloaded[0]) == 6
    res = simulate_layers(p, HAND, 0.5, const_copy(0.5), trace=True)
    assert res.time == pytest.approx(7.5)
    assert res.busy["host"] == pytest.approx(0.4 + 6 * COPY_ISSUE)
    (c,) = spans(res, "compute", "copy")
    assert (c.layer, c.start, c.end) == (0, 0.0, pytest.approx(3.0))


def test_hand_launch_bound_tail():
    # host 1.0 per layer, GPU 0.2, tail 0.1: layer i launches during [i, i+1], so its compute span
    # starts at i and ends at max(i + 0.2, (i + 1) + 0.1) = i + 1.1; the last ends at 4.1, head 4.1-4.6
    res = simulate_layers(NoOffload().place(tiny_model(4)), LayerCost(0.2, 1.0, 0.1), 0.5, const_copy(1.0))
    assert res.time == pytest.approx(4.6)


# Regression (found in 65c4593): the tail used to be added only when the host's last launch came
# after start + gpu, so a launch in (start + gpu - tail, start + gpu] was ignored.
def test_hand_last_kernel_waits_for_its_launch():
    # one layer: the host launches its last kernel at 0.6; that kernel takes 0.5 on the GPU, so the
    # layer cannot end before 1.1 although its GPU work (1.0) alone would end at 1.0.
    # Docstring: the compute span ends at max(start + gpu, host_done + tail) = max(1.0, 1.1) = 1.1.
    res = simulate_layers(NoOffload().place(tiny_model(1)), LayerCost(1.0, 0.6, 0.5), 0.0, const_copy(1.0))
    assert res.time == pytest.approx(1.1)


def test_hand_offloading_a_layer_never_makes_the_step_faster():
    # one layer, host launch 1.5, GPU 1.0 of which the last kernel is 0.5.
    # resident: compute 0-1.0, then waits for the last launch at 1.5: ends 1.5 + 0.5 = 2.0.
    # interval(1) with a 0.6 s copy: wait 0-0.6, compute 0.6-1.6; its last kernel was launched at
    # 1.5 and runs 0.5, so it ends at 2.0 too (65c4593 ended it at 1.6, faster than resident).
    m, cost = tiny_model(1), LayerCost(1.0, 1.5, 0.5)
    res_t = simulate_layers(NoOffload().place(m), cost, 0.0, const_copy(0.6)).time
    off_t = simulate_layers(interval(1).place(m), cost, 0.0, const_copy(0.6)).time
    assert res_t == pytest.approx(2.0)
    assert off_t == pytest.approx(2.0)


def test_hand_more_bandwidth_never_slower_copy_path():
    # vLLM copy path, one layer offloaded whole; host launch 1.5 (+ 6 copy issues), GPU 1.0, tail 0.5.
    # slow link, copies 0-0.6: the layer computes 0.6-1.6; its last kernel is launched at ~1.5 and
    #   takes 0.5, so it ends at ~2.0 (65c4593 said 1.6, making the faster link slower).
    # 2x link, copies 0-0.3: compute 0.3-1.3, then the last kernel 1.5-2.0.
    m = tiny_model(1)
    p = VllmCopy(m.layer_bytes / GiB).place(m)
    cost, bw = LayerCost(1.0, 1.5, 0.5), m.layer_bytes / 0.6
    slow = simulate_layers(p, cost, 0.0, link(0.0, bw)).time
    fast = simulate_layers(p, cost, 0.0, link(0.0, 2 * bw)).time
    assert fast == pytest.approx(2.0 + 6 * COPY_ISSUE)
    assert slow == pytest.approx(2.0 + 6 * COPY_ISSUE)


def test_hand_last_kernel_waits_for_a_late_launch():
    # the last launch at 1.5 is after start + gpu = 1.0, so the layer ends at 1.5 + 0.5 = 2.0
    res = simulate_layers(NoOffload().place(tiny_model(1)), LayerCost(1.0, 1.5, 0.5), 0.0, const_copy(1.0))
    assert res.time == pytest.approx(2.0)


# ---------------------------------------------------------------- StepModel
def toy_hw(bw: float = 32e9) -> HardwareSpec:
    return HardwareSpec("toy", memory_bytes=16 * GiB, hbm_bw=2e12, peak_flops=3e14, host_link_bw=bw)


@st.composite
def shapes(draw):
    return StepShape.uniform(draw(st.integers(1, 64)), draw(st.sampled_from([1, 1, 7, 64, 512])),
                             draw(st.integers(0, 4096)))


@settings(max_examples=100, deadline=None)
@given(models(), st.data(), shapes())
def test_step_model_within_the_quantum(m, data, shape):
    cost = Roofline(m, toy_hw(), cuda_graphs=data.draw(st.booleans()),
                    copy_slowdown=data.draw(st.sampled_from([1.0, 1.3])))
    placement = data.draw(policies(m)).place(m)
    sm = StepModel(placement, cost)  # quantum 0.2%: every cost at most 0.1% off
    exact = simulate_layers(placement, cost.layer(shape), cost.head(shape), cost.transfer, cost.copy_slowdown)
    got = sm.run(shape)
    half_bin = math.exp(sm.quantum / 2) - 1
    assert abs(got.time - exact.time) <= half_bin * exact.time * (1 + 1e-9)
    # a second run of the same shape is a look-up, not a SimPy run
    assert sm.run(shape) is got
    assert sm.simulated == 1


def test_step_model_memoizes_within_a_bin_and_not_across():
    m = tiny_model(4)
    cost = Roofline(m, toy_hw())
    sm = StepModel(interval(2).place(m), cost)
    a = sm.run(StepShape.uniform(8, 1, 1000))
    b = sm.run(StepShape.uniform(8, 1, 1001))  # 0.1% more context: same bin of layer cost
    assert b is a and sm.simulated == 1
    c = sm.run(StepShape.uniform(8, 512, 0))  # a prefill: another bin
    assert sm.simulated == 2 and c.time > a.time
    t = sm.run(StepShape.uniform(8, 1, 1000), trace=True)  # traced runs are simulated afresh
    assert t.trace is not None and sm.simulated == 3 and t == a
    assert sm.events == a.events + c.events + t.events


def test_step_model_tiny_quantum_is_exact():
    m = tiny_model(6)
    cost = Roofline(m, toy_hw())
    shape = StepShape.uniform(4, 32, 100)
    p = Prefetch(3, 1, 2).place(m)
    exact = simulate_layers(p, cost.layer(shape), cost.head(shape), cost.transfer, cost.copy_slowdown)
    assert StepModel(p, cost, quantum=1e-12).run(shape).time == pytest.approx(exact.time, rel=1e-9)


# ---------------------------------------------------------------- the shared host link
def _flows(specs):
    """Run transfers (start, solo seconds) on one SharedLink; their end times."""
    import simpy

    from offloadlab.sim.step import SharedLink

    env = simpy.Environment()
    link_ = SharedLink(env)
    ends = [None] * len(specs)

    def flow(i, start, seconds):
        yield env.timeout(start)
        yield from link_.transfer(seconds)
        ends[i] = env.now

    for i, (start, seconds) in enumerate(specs):
        env.process(flow(i, start, seconds))
    env.run()
    return ends


def test_hand_shared_link_processor_sharing():
    assert _flows([(0, 2.0)]) == [2.0]
    # together from 0: 1 s and 3 s -> the short one ends at 2 (half rate), the long one at 4
    assert _flows([(0, 1.0), (0, 3.0)]) == pytest.approx([2.0, 4.0])
    # 2 s from 0, 1 s from 1: both have 1 s of solo work left at t=1, at half rate both end at 3
    assert _flows([(0, 2.0), (1, 1.0)]) == pytest.approx([3.0, 3.0])
    # three at once then one leaves: 1, 2, 4 -> 3 (3 x 1), 5 (3 + 2 x 1), 7 (5 + 2)
    assert _flows([(0, 1.0), (0, 2.0), (0, 4.0)]) == pytest.approx([3.0, 5.0, 7.0])


def test_hand_all_reduce_over_pcie_shares_the_link_with_prefetch():
    # HAND with half of each layer's second in all-reduces over the host link (no NVLink), k=2,
    # copies of 3 s. L0 computes 0-0.5, all-reduces from 0.5 sharing with copy L1 (2.5 s left): the
    # all-reduce ends at 1.5, copy L1 at 3.5. L1 3.5-4, all-reduce 4-5 with copy L3 (started 3.5,
    # 2.5 left at 4), which ends at 7; L2 5-5.5, all-reduce 5.5-6.5, copy L3 ends 7.5; L3 7.5-8,
    # all-reduce alone 8-8.5, head 8.5-9.
    cost = LayerCost(gpu=1.0, host=0.1, tail=0.0, link_comm=0.5)
    res = simulate_layers(interval(2, 2).place(tiny_model(4)), cost, 0.5, const_copy(3.0), trace=True)
    assert res.time == pytest.approx(9.0)
    copies = spans(res, "copy")
    assert [s.layer for s in copies] == [1, 3]
    assert [v for s in copies for v in (s.start, s.end)] == pytest.approx([0.0, 3.5, 3.5, 7.5])
    assert res.busy["link"] == pytest.approx(6.0 + 4 * 0.5)
    # the same all-reduces over NVLink leave the copies alone: the plain schedule (7.5 s)
    nvlink = simulate_layers(interval(2, 2).place(tiny_model(4)), HAND, 0.5, const_copy(3.0))
    assert nvlink.time == pytest.approx(7.5)


def test_tensor_parallel_without_nvlink_slows_offload():
    """L40S (PCIe only) with tp=2: the all-reduces compete with prefetch copies; the same GPU with an
    NVLink at the rate its PCIe all-reduce reaches does not contend, and the difference is at most the
    all-reduce time."""
    from offloadlab.catalog import get_gpu, get_model
    from offloadlab.sim import simulate_step
    from offloadlab.sim.costs import PCIE_ALLREDUCE_RATE

    pcie = get_gpu("l40s")
    nvl = pcie.replace(name="L40S+NVLink", gpu_link="NVLink", gpu_link_bw=PCIE_ALLREDUCE_RATE * pcie.host_link_bw)
    kw = dict(new_tokens=4096, tensor_parallel=2)
    a = simulate_step("llama-3.1-8b", pcie, interval(2), **kw)
    b = simulate_step("llama-3.1-8b", nvl, interval(2), **kw)
    comm = 32 * 2 * Roofline(get_model("llama-3.1-8b").shard(2), pcie).allreduce_time(4096)
    assert b.time < a.time <= b.time + comm + 1e-9
    assert a.busy["link"] == pytest.approx(b.busy["link"] + comm, rel=1e-9)


@SETTINGS
@given(st.lists(st.tuples(st.floats(0.0, 5.0), st.floats(1e-3, 3.0)), min_size=1, max_size=8))
def test_shared_link_is_work_conserving_and_never_faster_than_solo(flows):
    """Processor sharing moves the same work as one transfer at a time: the last transfer ends when a
    FIFO link would finish; none ends before its own solo time, and equal transfers started together
    end together."""
    ends = _flows(flows)
    t = 0.0
    for start, seconds in sorted(flows):
        t = max(t, start) + seconds
    assert max(ends) == pytest.approx(t, rel=1e-9, abs=1e-9)
    for (start, seconds), end in zip(flows, ends):
        assert end >= start + seconds - 1e-9
    for (s1, w1), e1 in zip(flows, ends):
        for (s2, w2), e2 in zip(flows, ends):
            if s1 == s2 and w1 == w2:
                assert e1 == pytest.approx(e2, abs=1e-9)


# ---- vLLM's prefetch backend across steps: joined in CUDA graphs, overlapped in eager steps ----


def test_graph_steps_join_the_next_steps_copies_eager_steps_overlap_them():
    # 2 layers, layer 1 offloaded, one slot; 1 ms per layer, a 3 ms copy, a 2 ms LM head
    from offloadlab.sim import LayerCost, simulate_layers

    m = get_model("llama-3.2-1b").replace(layers=2)
    pl = Prefetch(2, 1, 1, wrap=True).place(m)
    cost, tr = LayerCost(1e-3, 1e-6, 0.0), (lambda b: 3e-3)
    eager = simulate_layers(pl, cost, 2e-3, tr, wrap=True, join="eager")
    full = simulate_layers(pl, cost, 2e-3, tr, wrap=True, join="full")
    # eager: the next step's copy runs during the LM head and layer 0: hidden
    assert eager.time == pytest.approx(4e-3, rel=1e-3) and eager.stall == pytest.approx(0, abs=1e-9)
    # full graph (join_after_forward): the forward waits for it before the head: 3 + 2 + 1 + 1 ms
    assert full.time == pytest.approx(7e-3, rel=1e-3) and full.stall == pytest.approx(3e-3, rel=1e-3)
    assert full.busy["copy"] == pytest.approx(eager.busy["copy"])  # the same copies, per step


@settings(max_examples=40, deadline=None)
@given(g=st.integers(1, 4), n=st.integers(1, 4), s=st.integers(1, 3), layers=st.integers(2, 9),
       gpu=st.floats(1e-4, 1e-2), bw=st.floats(1e8, 1e11), head=st.floats(0, 1e-2))
def test_joining_the_copy_stream_never_speeds_a_step_up(g, n, s, layers, gpu, bw, head):
    from offloadlab.sim import LayerCost, simulate_layers

    m = get_model("llama-3.2-1b").replace(layers=layers)
    pl = Prefetch(g, min(n, g), s, wrap=True).place(m)
    # more slots than offloaded layers: vLLM's ring wraps inside one step ((index + s) % n, prefetch.py);
    # the copier's slot indexing for it is issue 15's (offloadlab/schedule.py)
    assume(s <= len(pl.offloaded_layers))
    cost, tr = LayerCost(gpu, 1e-5, 0.0), (lambda b: 1e-5 + b / bw)
    t = {j: simulate_layers(pl, cost, head, tr, wrap=True, join=j) for j in ("eager", "full", "piecewise")}
    assert t["eager"].time <= t["full"].time * (1 + 1e-9) <= t["piecewise"].time * (1 + 1e-9) ** 2
    assert t["piecewise"].busy["copy"] == pytest.approx(t["eager"].busy["copy"])
    # a piece that reaches further into the next layer before its attention lets its copies overlap more:
    # joined at the next layer's start (0), a third of the way in, at its end (the whole layer)
    pw = [simulate_layers(pl, cost, head, tr, wrap=True, join="piecewise", pre_attention=f * gpu).time
          for f in (0.0, 1 / 3, 1.0)]
    assert pw[0] * (1 + 1e-9) >= pw[1] and pw[1] * (1 + 1e-9) >= pw[2] >= t["eager"].time * (1 - 1e-9)


def test_step_model_joins_decode_graph_steps_and_overlaps_eager_ones():
    from offloadlab.sim import Roofline, StepModel, StepShape

    m, hw = get_model("llama-3.1-8b"), get_gpu("h100")
    pl = Prefetch(4, 1, 1, wrap=True).place(m)
    graphs, eager = Roofline(m, hw), Roofline(m, hw, cuda_graphs=False)
    decode = StepShape.uniform(64, 1, 1024)
    # a decode batch within the capture size replays a graph: joined, as if join="full" were asked
    assert StepModel(pl, graphs).run(decode).time == pytest.approx(StepModel(pl, graphs, join="full").run(decode).time)
    assert StepModel(pl, eager).run(decode).time == pytest.approx(StepModel(pl, eager, join="eager").run(decode).time)
    assert StepModel(pl, graphs).run(decode).time > StepModel(pl, graphs, join="eager").run(decode).time
    with pytest.raises(ConfigError, match="join"):
        StepModel(pl, graphs, join="sometimes")


@settings(max_examples=60, deadline=None)
@given(models(), st.data(), st.integers(1, 300), st.integers(1, 200_000), st.integers(1, 400), st.booleans())
def test_decode_runs_in_bins_equal_step_by_step(m, data, seqs, kv0, n, corner):
    """StepModel.decodes takes a run of decode steps that fall in one cost bin from its ends: the
    results must be exactly those of running every step (the roofline is monotone in the context)."""
    from offloadlab.sim.costs import Corner

    cost = Roofline(m, toy_hw(), cuda_graphs=data.draw(st.booleans()))
    cost = Corner(cost, data.draw(st.integers(0, 1))) if corner else cost
    placement = data.draw(policies(m)).place(m)
    runs = list(StepModel(placement, cost).decodes(seqs, kv0, n))
    assert sum(k for _, k in runs) == n and all(k >= 1 for _, k in runs)
    got = [res for res, k in runs for _ in range(k)]
    one = StepModel(placement, cost)
    want = [one.run(StepShape.decode(seqs, kv0 + seqs * j)) for j in range(n)]
    assert got == want
    # each bin's steps come as its first step, then those of the KV interval already known to be in
    # its bin, then the rest found by probing: at most three runs per bin
    assert len(runs) <= 3 * len({id(r) for r, _ in runs})
    # a caller taking every step (whole=True): one run per bin, the same results, the same simulations
    model = StepModel(placement, cost)
    whole = list(model.decodes(seqs, kv0, n, whole=True))
    assert [res for res, k in whole for _ in range(k)] == want
    assert [r for r, _ in whole] == [r for i, (r, _) in enumerate(runs) if not i or runs[i - 1][0] is not r]
    assert model.simulated == len(whole)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 64), st.lists(st.tuples(st.integers(1, 300_000), st.integers(1, 300), st.integers(1, 40)),
                                    min_size=1, max_size=8))
def test_decode_runs_on_a_warm_model_equal_step_by_step(seqs, runs):
    """Decode runs on one StepModel (overlapping KV ranges: later runs answer from the intervals earlier
    ones found in one bin), with the hints a decode run sends (steps it expects), give exactly the
    results of every step run on a fresh model."""
    m = get_model("llama-3.1-8b")
    cost = Roofline(m, toy_hw())
    placement = NoOffload().place(m)
    warm, fresh = StepModel(placement, cost), StepModel(placement, cost)
    for kv0, n, hint in runs:
        got, gen = [], warm.decodes(seqs, kv0, n)
        item = next(gen)
        while True:
            got += [item[0]] * item[1]
            try:
                item = gen.send(hint)
            except StopIteration:
                break
        want = [fresh.run(StepShape.decode(seqs, kv0 + seqs * j)) for j in range(n)]
        assert got == want
    starts, ends, keys = warm._decode_bins[seqs]
    assert all(a <= b < c for a, b, c in zip(starts, ends, starts[1:]))  # disjoint, by start
