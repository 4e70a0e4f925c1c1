"""Tests of the serving loop (offloadlab.sim.serving), the memory plan (offloadlab.sim.memory) and
the workload entry point ``offloadlab.sim.simulate``.

Small models (4-6 layers, KB-sized layers) keep every run in milliseconds; small KV capacities make
preemption happen. The loop is built from its pieces as sim/run.py builds it when a test needs to
look inside (fast-forward on/off, block accounting).
"""
from __future__ import annotations

import math

import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from offloadlab.catalog import get_gpu, get_model
from offloadlab.errors import ConfigError, DoesNotFitError, OffloadLabError
from offloadlab.policy import NoOffload, Prefetch, VllmCopy, interval
from offloadlab.specs import GiB, HardwareSpec, ModelSpec
from offloadlab.sim import EngineConfig, plan_memory, simulate
from offloadlab.sim.costs import StepShape, cost_model
from offloadlab.sim.serving import WATERMARK, ServingLoop, _extra_blocks, _kind, _most_steps, _steps_that_fit
from offloadlab.sim.step import StepModel
from offloadlab.sim.workload import Request, Workload, fixed, make_workload

SETTINGS = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])

MODEL = ModelSpec("tiny", layers=6, hidden=256, heads=4, kv_heads=2, head_dim=64, intermediate=512, vocab=1000,
                  max_context=4096)
# a GPU with a slow link, so that copies matter for this tiny model (a layer is 1.2 MB: ~0.15 ms)
HW = HardwareSpec("toy", memory_bytes=8 * GiB, hbm_bw=1e12, peak_flops=1e14, host_link_bw=1e10)
POLICIES = [NoOffload(), interval(2), interval(3, 1), Prefetch(3, 2, 2), VllmCopy(2.5 * MODEL.layer_bytes / GiB)]
IDS = ["none", "interval2", "interval3-1buf", "prefetch3-2-2", "vllm2.5layers"]


def engine(**kw) -> EngineConfig:
    base = dict(max_model_len=512, max_num_batched_tokens=512, max_num_seqs=16, block_size=16, overhead_bytes=0)
    base.update(kw)
    return EngineConfig(**base)


def hw_with_kv(model, policy, eng: EngineConfig, kv_tokens: int, hw: HardwareSpec = HW) -> HardwareSpec:
    """``hw`` with just enough GPU memory for ``kv_tokens`` of KV cache under ``policy``."""
    fixed_bytes = (model.weight_total_bytes - policy.place(model).offloaded_bytes
                   + policy.place(model).staging_bytes + eng.overhead_bytes
                   + eng.max_num_batched_tokens * model.activation_bytes_per_token()
                   + eng.max_num_seqs * model.vocab * 4)
    need = fixed_bytes + (kv_tokens + 0.5) * model.kv_bytes_per_token
    return hw.replace(memory_bytes=need / eng.gpu_memory_utilization)


class CheckedLoop(ServingLoop):
    """A ServingLoop that checks its KV-block accounting after every allocation and release (a request on
    V0's shared decode clock by its counters from the clock: ``ServingLoop.counters``)."""

    def _check(self):
        assert 0 <= self.pool.free <= self.total_blocks
        held = sum(self.counters(s)[2] for s in self.seqs)
        assert held + self.pool.free == self.total_blocks, "blocks leaked or double-freed"
        self.max_used = max(getattr(self, "max_used", 0), held)

    def _check_queues(self):
        self._check()
        for s in self.waiting:  # only running requests hold KV blocks
            assert s.blocks == 0 and s not in self.running

    def _grow(self, s, tokens):
        ok = super()._grow(s, tokens)
        if ok:
            assert s.blocks * self.cfg.block_size >= tokens
        self._check()
        return ok

    def _release(self, s):
        super()._release(s)
        self._check()

    def _schedule(self):
        batch = super()._schedule()
        self._check_queues()
        for s, k in batch:  # the KV of every token computed this step has a block
            generated, computed, blocks = self.counters(s)
            assert blocks * self.cfg.block_size >= computed + k
            assert 1 <= k <= s.req.prompt_len + generated - computed
        assert sum(k for _, k in batch) <= self.cfg.max_num_batched_tokens
        assert len(self.running) <= self.cfg.max_num_seqs
        return batch

    def _sample(self, s, now):
        assert s.blocks * self.cfg.block_size >= s.computed  # the sampled sequence's KV is all there
        assert s.uncomputed == 0
        super()._sample(s, now)
        self._check_queues()


def run_loop(policy, eng: EngineConfig, requests, kv_tokens: int, fast_forward: bool, model=MODEL, hw=HW,
             clock: bool = True):
    placement = policy.place(model)
    sm = StepModel(placement, cost_model(model, hw))
    loop = CheckedLoop(sm, eng, kv_tokens, fast_forward=fast_forward, clock=clock)
    loop.run(list(requests))
    return loop


@st.composite
def scenarios(draw):
    """(policy, engine, requests, kv_tokens): small workloads that preempt on a small KV cache."""
    chunked = draw(st.booleans())
    block = draw(st.sampled_from([4, 16]))
    max_len = draw(st.sampled_from([64, 128, 256]))
    n = draw(st.integers(1, 12))
    short = draw(st.booleans())
    pmax = 16 if short else max_len - 1
    reqs = []
    for i in range(n):
        p = draw(st.integers(1, pmax))
        o = draw(st.integers(1, max(1, min(48, max_len - p))))
        reqs.append((p, o))
    if draw(st.booleans()):
        rate = draw(st.floats(50.0, 5000.0))
        gaps = draw(st.lists(st.floats(0.0, 5.0), min_size=n, max_size=n))
        arrivals, t = [], 0.0
        for g in gaps:  # exponential-like gaps of mean 1/rate
            t += g / rate
            arrivals.append(t)
    else:
        arrivals = [0.0] * n
    requests = [Request(i, p, o, a) for i, ((p, o), a) in enumerate(zip(reqs, arrivals))]
    eng = engine(chunked_prefill=chunked, block_size=block, max_model_len=max_len,
                 max_num_batched_tokens=draw(st.sampled_from([max_len, 2 * max_len, 1024])) if not chunked
                 else draw(st.sampled_from([16, 48, 256])),
                 max_num_seqs=draw(st.sampled_from([2, 4, 16])),
                 mode=draw(st.sampled_from(["prefill+decode", "prefill+decode", "prefill-only"])))
    # the KV cache holds one max-length sequence with room to spare (vLLM V0's 1% watermark must
    # still admit it: see test_a_request_needing_the_whole_cache_is_served) and at most ~3 of them
    longest = max(p + o for p, o in reqs)
    min_blocks = math.ceil((-(-max_len // block)) / (1 - WATERMARK)) + 1
    blocks = draw(st.integers(min_blocks, max(min_blocks, 3 * max_len // block)))
    policy = draw(st.sampled_from(POLICIES))
    assert longest <= max_len
    return policy, eng, requests, blocks * block


def outcome(loop):
    return [(s.req.id, s.generated, s.preempted, s.first, s.finish) for s in sorted(loop.seqs, key=lambda s: s.req.id)]


# ---------------------------------------------------------------- the loop's invariants
@SETTINGS
@given(scenarios())
def test_every_request_finishes_and_blocks_never_overflow(sc):
    policy, eng, requests, kv_tokens = sc
    loop = run_loop(policy, eng, requests, kv_tokens, fast_forward=True)
    assert len(loop.seqs) == len(requests) and loop.unfinished == 0
    assert loop.pool.free == loop.total_blocks  # everything released at the end
    assert loop.max_used <= loop.total_blocks
    assert not loop.running and not loop.waiting
    for s in loop.seqs:
        want = 1 if eng.mode == "prefill-only" else s.req.output_len
        assert s.generated == want
        assert s.first > s.req.arrival  # TTFT > 0
        assert s.finish >= s.first
        assert s.computed == s.req.prompt_len + s.generated - 1  # the last token is never fed back
    # engine steps are back to back or idle, never overlapping, and inside the run
    for (a0, a1, _, _), (b0, b1, _, _) in zip(loop.steps, loop.steps[1:]):
        assert a1 > a0 and b0 >= a1 * (1 - 1e-12)
    assert sum(loop.n_steps.values()) == len(loop.steps)
    assert max(s.finish for s in loop.seqs) == pytest.approx(loop.steps[-1][1], rel=1e-12)


@SETTINGS
@given(scenarios())
def test_fast_forward_equals_step_by_step(sc):
    policy, eng, requests, kv_tokens = sc
    slow = run_loop(policy, eng, requests, kv_tokens, fast_forward=False)
    fast = run_loop(policy, eng, requests, kv_tokens, fast_forward=True)
    a, b = outcome(slow), outcome(fast)
    assert [x[:3] for x in a] == [x[:3] for x in b]  # ids, tokens, preemptions
    for x, y in zip(a, b):
        assert x[3] == pytest.approx(y[3], rel=1e-9)  # first token
        assert x[4] == pytest.approx(y[4], rel=1e-9)  # finish
    assert slow.n_steps == fast.n_steps
    assert slow.preemptions == fast.preemptions
    assert len(slow.steps) == len(fast.steps)
    for (a0, a1, ak, an), (b0, b1, bk, bn) in zip(slow.steps, fast.steps):
        assert (ak, an) == (bk, bn)
        assert a1 == pytest.approx(b1, rel=1e-9)
    for lane in slow.busy:
        assert slow.busy[lane] == pytest.approx(fast.busy[lane], rel=1e-9, abs=1e-15)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from([1, 2, 16, 32]),
       st.lists(st.tuples(st.integers(1, 3000), st.integers(0, 3)), min_size=1, max_size=40),
       st.integers(1, 400), st.integers(0, 200))
def test_a_decode_runs_blocks_by_slack_are_the_per_request_sum(bs, reqs, n, free):
    """_extra_blocks (requests counted by their slack) is the per-request sum it replaces, for any
    blocks held (the tokens' own, or more), and _most_steps over it is the longest run that fits."""
    known = [(k, -(-k // bs) + more) for k, more in reqs]  # (tokens known, blocks held)
    slack = {}
    for k, b in known:
        e = k + bs - 1 - b * bs
        slack[e] = slack.get(e, 0) + 1

    def plain(m):  # extra blocks for m steps, request by request (step j writes token known + j - 1)
        return sum(max(0, -(-(k + m - 1) // bs) - b) for k, b in known)
    for m in range(1, n + 1):
        assert _extra_blocks(slack, m - 1, bs) == plain(m)
    most = _most_steps(n, lambda m: _extra_blocks(slack, m - 1, bs), free)
    assert most == max([1] + [m for m in range(1, n + 1) if plain(m) <= free])


@settings(max_examples=500, deadline=None)
@given(st.sampled_from([1, 2, 4, 16, 32]), st.data(), st.integers(1, 600), st.integers(0, 3000))
def test_the_steps_that_fit_in_closed_form_are_the_bisections(bs, data, n, free):
    """_steps_that_fit (requests that hold just their tokens' blocks: every slack in [0, block_size)) is
    _most_steps' bisection over _extra_blocks."""
    slack = data.draw(st.dictionaries(st.integers(0, bs - 1), st.integers(1, 300), min_size=1))
    assert _steps_that_fit(n, slack, bs, free) == _most_steps(n, lambda m: _extra_blocks(slack, m - 1, bs), free)


@SETTINGS
@given(scenarios(), st.integers(0, 3))
def test_the_v0_decode_clock_is_the_per_request_decode_run_exactly(sc, seed):
    """V0's shared decode clock (decode runs kept as cohort sums, preemptions worked out from the members
    that take a block) gives exactly what decode runs request by request give: every token, time and
    sum to the last bit. Some scenarios arrive over time (runs stopped by an arrival)."""
    policy, eng, requests, kv_tokens = sc
    if seed:
        requests = [Request(r.id, r.prompt_len, r.output_len, 1e-3 * ((r.id * 7919 * seed) % 13))
                    for r in requests]
    plain = run_loop(policy, eng, requests, kv_tokens, fast_forward=True, clock=False)
    clock = run_loop(policy, eng, requests, kv_tokens, fast_forward=True, clock=True)
    assert clock.clock == (not eng.chunked_prefill)
    assert outcome(plain) == outcome(clock)
    assert [s.computed for s in plain.seqs] == [s.computed for s in clock.seqs]
    assert (plain.steps, plain.busy, plain.stall, plain.n_steps, plain.preemptions) == \
        (clock.steps, clock.busy, clock.stall, clock.n_steps, clock.preemptions)


@pytest.mark.parametrize("budget, kv_tokens", [(40, 4096), (40, 700), (512, 600)],
                         ids=["budget-below-batch", "budget-below-batch-preempting", "preempting"])
def test_the_v0_decode_clock_with_a_small_budget_or_cache(budget, kv_tokens):
    """More running requests than the token budget (the clock steps aside: every member written back, the
    walk request by request) and a cache that preempts at most decode runs' ends: still exactly the same."""
    eng = engine(max_num_batched_tokens=budget, max_num_seqs=64, block_size=4, max_model_len=40)
    requests = [Request(i, 3 + i % 9, 5 + (i * 5) % 23, 0.0) for i in range(90)]
    plain = run_loop(interval(2), eng, requests, kv_tokens, fast_forward=True, clock=False)
    clock = run_loop(interval(2), eng, requests, kv_tokens, fast_forward=True, clock=True)
    assert outcome(plain) == outcome(clock)
    assert (plain.steps, plain.busy, plain.stall, plain.n_steps, plain.preemptions) == \
        (clock.steps, clock.busy, clock.stall, clock.n_steps, clock.preemptions)
    if kv_tokens < 1000:
        assert clock.preemptions > 0


def test_small_cache_preempts_and_fast_forward_agrees():
    """A concrete run where decodes outgrow the cache: preemption happens in both modes alike."""
    eng = engine(block_size=16, max_model_len=128, max_num_batched_tokens=256, max_num_seqs=8)
    requests = [Request(i, 60, 60, 0.0) for i in range(4)]  # 4 x 120 tokens on a 160-token cache
    slow = run_loop(interval(2), eng, requests, 160, fast_forward=False)
    fast = run_loop(interval(2), eng, requests, 160, fast_forward=True)
    assert slow.preemptions > 0
    for x, y in zip(outcome(slow), outcome(fast)):
        assert x[:3] == y[:3]
        assert x[3] == pytest.approx(y[3], rel=1e-9) and x[4] == pytest.approx(y[4], rel=1e-9)
    assert all(s.generated == 60 for s in fast.seqs)


# Regression (found in 65c4593): a fast-forwarded run of 1-token steps that included a request whose
# prompt the run's first step completed (a 1-token prompt, or the 1-token last chunk of a chunked
# prefill) stamped that request's first token at the end of the whole run: TTFT = e2e latency.
@pytest.mark.parametrize("eng, req", [
    (engine(), Request(0, 1, 2, 0.0)),  # a 1-token prompt
    # 33 tokens with a 32-token budget: chunk 32, then the last token alone, then 9 decodes
    (engine(chunked_prefill=True, max_num_batched_tokens=32, max_model_len=64), Request(0, 33, 10, 0.0)),
], ids=["one-token-prompt", "chunked-last-chunk-1"])
def test_fast_forward_stamps_the_first_token_after_the_first_step(eng, req):
    slow = run_loop(NoOffload(), eng, [req], 256, fast_forward=False)
    fast = run_loop(NoOffload(), eng, [req], 256, fast_forward=True)
    # step-by-step: the first token comes with the step that computed the prompt's last token
    first_step_end = [t1 for t0, t1, kind, n in slow.steps][-req.output_len]
    assert slow.seqs[0].first == pytest.approx(first_step_end)
    assert fast.seqs[0].first == pytest.approx(slow.seqs[0].first, rel=1e-9)


@pytest.mark.parametrize("chunked", [False, True])
def test_decode_only_steps_batch_every_running_request(chunked):
    # 3 requests of 10 + 5 tokens arrive together: one prefill (3 x 10 tokens), then 4 decode steps
    # of 3 sequences each (the first token comes from the prefill)
    eng = engine(chunked_prefill=chunked, max_model_len=64, max_num_batched_tokens=64)
    loop = run_loop(NoOffload(), eng, [Request(i, 10, 5, 0.0) for i in range(3)], 256, fast_forward=False)
    kinds = [(k, n) for _, _, k, n in loop.steps]
    assert kinds == [("prefill", 3)] + [("decode", 3)] * 4
    assert len({s.first for s in loop.seqs}) == 1 and len({s.finish for s in loop.seqs}) == 1


def test_chunked_prefill_splits_long_prompts():
    # a 100-token prompt with a 32-token budget: chunks 32, 32, 32, 4 then 2 decode steps
    eng = engine(chunked_prefill=True, max_model_len=128, max_num_batched_tokens=32)
    loop = run_loop(NoOffload(), eng, [Request(0, 100, 3, 0.0)], 256, fast_forward=False)
    assert [k for _, _, k, _ in loop.steps] == ["prefill"] * 4 + ["decode"] * 2
    assert loop.seqs[0].first == pytest.approx(loop.steps[3][1])


def test_prefill_only_mode_stops_after_the_first_token():
    eng = engine(mode="prefill-only")
    loop = run_loop(interval(2), eng, [Request(i, 50, 40, 0.0) for i in range(5)], 1024, fast_forward=True)
    assert all(s.generated == 1 and s.finish == s.first for s in loop.seqs)
    assert loop.n_steps["decode"] == 0


# Regression (found in 65c4593): a request whose KV needs more than 99% of the blocks (vLLM V0's
# admission watermark) was never admitted nor rejected; the engine waited for an arrival that never
# came and simulate() returned NaN makespan and throughput without an error.
def test_a_request_needing_the_whole_cache_is_served_or_refused():
    # kv_tokens == max_model_len == 256 (plan_memory's own minimum): a 250 + 5 request
    eng = engine(max_model_len=256, max_num_batched_tokens=512, max_num_seqs=8)
    hw = hw_with_kv(MODEL, NoOffload(), eng, 256)
    wl = Workload("one", (Request(0, 250, 5, 0.0), Request(1, 20, 5, 0.0)))
    # simulate() refuses it up front, naming the request (vLLM ignores it): 255 tokens > 99% of 256
    with pytest.raises(OffloadLabError, match="request 0"):
        simulate(MODEL, hw, NoOffload(), wl, eng)
    # one that fits under the watermark is served, with a finite throughput
    fits = Workload("fits", (Request(0, 230, 5, 0.0), Request(1, 20, 5, 0.0)))
    res = simulate(MODEL, hw, NoOffload(), fits, eng)
    assert res.memory.kv_tokens == 256
    assert res.requests["output_len"].tolist() == [5, 5]
    assert math.isfinite(res.summary["throughput_rps"])
    # the loop itself never returns with a request silently left unserved: it says it stalled
    loop = ServingLoop(StepModel(NoOffload().place(MODEL), cost_model(MODEL, hw)), eng, 256)
    with pytest.raises(RuntimeError, match="never be scheduled"):
        loop.run(list(wl.requests))


# ---------------------------------------------------------------- simulate(): the public entry point
def poisson_workload(n=24, seed=3, rate=200.0, prompt=(64,), output=24):
    return make_workload("fixed", n=n, seed=seed, rate=rate, prompt_len=prompt[0], output_len=output)


@pytest.mark.parametrize("policy", POLICIES, ids=IDS)
def test_simulate_is_deterministic(policy):
    wl = make_workload("multi_news", n=20, seed=7, rate=3000.0, prompt_mean=120, output_len=16, max_prompt=400)
    eng = engine(max_model_len=512, max_num_batched_tokens=1024)
    hw = hw_with_kv(MODEL, policy, eng, 1200)
    a = simulate(MODEL, hw, policy, wl, eng)
    b = simulate(MODEL, hw, policy, wl, eng)
    pd.testing.assert_frame_equal(a.requests, b.requests, check_exact=True)
    sa, sb = dict(a.summary), dict(b.summary)
    sa.pop("wall_s"), sb.pop("wall_s")
    assert sa == sb
    assert a.steps == b.steps and a.memory == b.memory and a.config == b.config
    assert a.summary["preemptions"] > 0  # the small cache is exercised
    # a different arrival seed gives different numbers (the seed is actually used)
    wl2 = make_workload("multi_news", n=20, seed=8, rate=3000.0, prompt_mean=120, output_len=16, max_prompt=400)
    c = simulate(MODEL, hw, policy, wl2, eng)
    assert not c.requests["finish"].equals(a.requests["finish"])


@SETTINGS
@given(scenarios())
def test_simulate_requests_are_complete_and_ordered(sc):
    policy, eng, requests, kv_tokens = sc
    if not eng.chunked_prefill:
        eng = EngineConfig(**{**eng.__dict__, "max_num_batched_tokens": max(eng.max_num_batched_tokens,
                                                                            eng.max_model_len)})
    hw = hw_with_kv(MODEL, policy, eng, kv_tokens)
    res = simulate(MODEL, hw, policy, Workload("w", tuple(requests)), eng)
    assert res.memory.kv_tokens == kv_tokens
    f = res.requests
    assert list(f["id"]) == sorted(r.id for r in requests)
    by_id = {r.id: r for r in requests}
    want = [1 if eng.mode == "prefill-only" else by_id[i].output_len for i in f["id"]]
    assert f["output_len"].tolist() == want
    assert (f["ttft"] > 0).all()
    assert (f["finish"] >= f["first_token"]).all() and (f["first_token"] >= f["arrival"]).all()
    assert (f["e2e"] >= f["ttft"]).all()
    s = res.summary
    assert s["requests"] == len(requests)
    assert s["makespan_s"] == pytest.approx(f["finish"].max() - f["arrival"].min())
    assert s["throughput_rps"] == pytest.approx(len(requests) / s["makespan_s"])
    for lane in ("host", "compute", "copy", "link"):
        assert 0 <= s[f"util_{lane}"] <= 1 + 1e-9


@pytest.mark.parametrize("mode", ["prefill+decode", "prefill-only"])
@pytest.mark.parametrize("policy", POLICIES[1:], ids=IDS[1:])
def test_more_host_bandwidth_never_lowers_throughput(policy, mode):
    # arrivals at t = 0, so every scheduling decision is independent of step times and the makespan
    # is a sum of step times (with timed arrivals a faster step may legitimately batch differently)
    wl = make_workload("multi_news", n=16, seed=1, prompt_mean=150, output_len=12, max_prompt=400)
    eng = engine(max_model_len=512, max_num_batched_tokens=1024, mode=mode)
    hw = hw_with_kv(MODEL, policy, eng, 2000)
    last = 0.0
    for bw in (2e9, 8e9, 16e9, 32e9, 64e9, 450e9):
        tput = simulate(MODEL, hw.replace(host_link_bw=bw), policy, wl, eng).summary["throughput_rps"]
        assert tput >= last * (1 - 1e-9), f"{bw / 1e9:g} GB/s is slower"
        last = tput
    # the copies do matter at the slowest link: resident is faster
    slow = simulate(MODEL, hw.replace(host_link_bw=2e9), policy, wl, eng).summary["throughput_rps"]
    none = simulate(MODEL, hw.replace(host_link_bw=2e9), NoOffload(), wl, eng).summary["throughput_rps"]
    assert slow < none


@pytest.mark.parametrize("k", [MODEL.layers + 1, MODEL.layers + 7])
@pytest.mark.parametrize("chunked", [False, True])
def test_interval_beyond_layers_is_no_offload(k, chunked):
    wl = poisson_workload()
    eng = engine(chunked_prefill=chunked, max_num_batched_tokens=256)
    hw = hw_with_kv(MODEL, NoOffload(), eng, 600)
    a = simulate(MODEL, hw, NoOffload(), wl, eng)
    b = simulate(MODEL, hw, interval(k), wl, eng)
    sa, sb = dict(a.summary), dict(b.summary)
    sa.pop("wall_s"), sb.pop("wall_s")
    assert sa == sb
    pd.testing.assert_frame_equal(a.requests, b.requests, check_exact=True)
    assert a.memory == b.memory
    assert b.config["offloaded_layers"] == 0


def test_request_longer_than_max_model_len_is_rejected():
    eng = engine(max_model_len=128)
    wl = Workload("w", (Request(0, 10, 5), Request(1, 100, 29)))
    with pytest.raises(ConfigError) as e:
        simulate(MODEL, HW, NoOffload(), wl, eng)
    assert "request 1" in str(e.value) and "max_model_len=128" in str(e.value) and e.value.value == 129
    simulate(MODEL, HW, NoOffload(), Workload("w", (Request(1, 100, 28),)), eng)  # exactly 128 is fine


def test_without_chunked_prefill_requests_must_fit_one_step():
    eng = engine(max_model_len=512, max_num_batched_tokens=128)
    wl = Workload("w", (Request(0, 120, 20),))
    with pytest.raises(ConfigError, match="max_num_batched_tokens=128"):
        simulate(MODEL, HW, NoOffload(), wl, eng)
    res = simulate(MODEL, HW, NoOffload(), wl, engine(max_model_len=512, max_num_batched_tokens=128,
                                                      chunked_prefill=True))
    assert res.requests["output_len"].tolist() == [20]


@pytest.mark.parametrize("kw, field", [
    (dict(gpu_memory_utilization=0), "gpu_memory_utilization"),
    (dict(gpu_memory_utilization=1.2), "gpu_memory_utilization"),
    (dict(max_num_seqs=0), "max_num_seqs"),
    (dict(block_size=True), "block_size"),
    (dict(max_model_len=1.5), "max_model_len"),
    (dict(mode="decode"), "mode"),
    (dict(overhead_bytes=-1), "overhead_bytes"),
])
def test_engine_config_errors(kw, field):
    with pytest.raises(ConfigError) as e:
        EngineConfig(**kw)
    assert e.value.field == field


# ---------------------------------------------------------------- memory
def plan(model, hw, policy, util=0.9, tokens=8192, seqs=256, max_len=8192, block=16, overhead=0.5 * GiB):
    return plan_memory(model, hw, policy.place(model), gpu_memory_utilization=util, max_batched_tokens=tokens,
                       max_seqs=seqs, max_model_len=max_len, block_size=block, overhead=overhead)


def test_memory_plan_for_the_papers_setup():
    """Llama-3.1-8B on an A100-40GB at gpu_memory_utilization 0.8, by hand."""
    m, a100 = get_model("llama-3.1-8b"), get_gpu("A100-SXM4-40GB")
    weights = 2 * 8_030_261_248
    layer = 436_224_000
    # activations: 8192 tokens x 2 bytes x (2 x 4096 + 4096 + 2 x 1024 + 3 x 14336), logits 256 x 128256 fp32
    act = 8192 * 2 * (2 * 4096 + 4096 + 2 * 1024 + 3 * 14336) + 256 * 128256 * 4
    capacity = 0.8 * 40 * GiB
    for policy, resident, staging in [(NoOffload(), weights, 0),
                                      (interval(2), weights - 16 * layer, 2 * layer),
                                      (interval(4, 3), weights - 8 * layer, 3 * layer)]:
        p = plan(m, a100, policy, util=0.8)
        assert p.capacity == capacity
        assert p.weights_resident == resident and p.staging == staging
        assert p.activations == act and p.overhead == 0.5 * GiB
        kv = capacity - resident - staging - act - 0.5 * GiB
        assert p.kv_cache == pytest.approx(kv)
        assert p.kv_tokens == int(kv // (131072 * 16)) * 16
        assert p.host_offloaded == weights - resident
    # the paper's point: k=2 leaves 14 layers' worth of bytes more for the KV cache than no offload
    gain = plan(m, a100, interval(2), util=0.8).kv_tokens - plan(m, a100, NoOffload(), util=0.8).kv_tokens
    assert gain == pytest.approx(14 * layer / 131072, abs=16)


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(["llama-3.1-8b", "llama-3.2-1b", "llama-3.2-3b"]),
       st.sampled_from(["A100-SXM4-40GB", "L40S-48GB", "H100-SXM5-80GB"]),
       st.sampled_from([NoOffload(), interval(1), interval(2), interval(3, 4), Prefetch(4, 2, 2), VllmCopy(1.0)]),
       st.floats(0.5, 1.0), st.sampled_from([2048, 8192]), st.sampled_from([16, 32]))
def test_memory_plan_parts_fit_in_capacity(model, gpu, policy, util, tokens, block):
    m, hw = get_model(model), get_gpu(gpu)
    try:
        p = plan(m, hw, policy, util=util, tokens=tokens, max_len=4096, block=block)
    except DoesNotFitError as e:
        assert "does not fit" in str(e) or "host memory" in str(e)
        return
    used = p.weights_resident + p.staging + p.activations + p.overhead + p.kv_tokens * m.kv_bytes_per_token
    assert used <= p.capacity * (1 + 1e-12)
    assert p.capacity <= p.gpu_memory
    assert p.kv_tokens % block == 0 and p.kv_tokens >= 4096
    # whole blocks: one more block would not fit
    assert used + block * m.kv_bytes_per_token > p.capacity
    assert p.kv_blocks == p.kv_tokens // block
    assert p.weights_resident + p.host_offloaded == m.weight_total_bytes


def test_explicit_kv_cache_bytes_replace_the_profiled_budget():
    """vLLM's kv_cache_memory_bytes: the KV cache is what was given, whatever gpu_memory_utilization
    says (vllm/v1/worker/gpu_worker.py); more than the GPU holds besides the weights does not fit."""
    m, h100 = get_model("llama-3.1-8b"), get_gpu("H100-SXM5-80GB")
    base = dict(gpu_memory_utilization=0.5, max_batched_tokens=2048, max_seqs=256, max_model_len=4096)
    for kv_bytes in (2 * GiB, 10 * GiB + 12345):
        p = plan_memory(m, h100, NoOffload().place(m), kv_cache_bytes=kv_bytes, **base)
        assert p.kv_tokens == int(kv_bytes // (16 * m.kv_bytes_per_token)) * 16
        assert p.kv_cache == kv_bytes
        assert plan_memory(m, h100, NoOffload().place(m), gpu_memory_utilization=0.9, max_batched_tokens=2048,
                           max_seqs=256, max_model_len=4096, kv_cache_bytes=kv_bytes).kv_tokens == p.kv_tokens
    with pytest.raises(DoesNotFitError, match="kv_cache_memory_bytes"):
        plan_memory(m, h100, NoOffload().place(m), kv_cache_bytes=70 * GiB, **base)
    with pytest.raises(ConfigError, match="kv_cache_memory_bytes"):
        EngineConfig(kv_cache_memory_bytes=0)


@settings(max_examples=40, deadline=None)
@given(blocks=st.integers(1, 200_000), util=st.floats(0.05, 1.0), block_size=st.sampled_from([8, 16, 32]))
def test_num_gpu_blocks_override_is_the_block_count(blocks, util, block_size):
    """vLLM's num_gpu_blocks_override (vllm/v1/core/kv_cache_utils.py): exactly that many blocks, whatever the
    budget or kv_cache_memory_bytes give, while the rest fits; beyond the GPU's memory: does not fit, named."""
    m, h100 = get_model("llama-3.1-8b"), get_gpu("H100-SXM5-80GB")
    kw = dict(gpu_memory_utilization=util, max_batched_tokens=2048, max_seqs=256, max_model_len=block_size,
              block_size=block_size, kv_cache_bytes=GiB)
    per_block = block_size * m.kv_bytes_per_token
    try:
        p = plan_memory(m, h100, NoOffload().place(m), num_blocks=blocks, **kw)
    except DoesNotFitError as e:
        assert "num_gpu_blocks_override" in str(e)
        assert m.weight_total_bytes + blocks * per_block > h100.memory_bytes - GiB  # only a cache that cannot fit
        return
    assert p.kv_blocks == blocks and p.kv_cache == blocks * per_block
    assert p.capacity <= h100.memory_bytes


def test_an_unknown_engine_generation_is_named():
    m = get_model("llama-3.1-8b")
    with pytest.raises(ConfigError, match="scheduler='v2'"):
        plan_memory(m, get_gpu("H100-SXM5-80GB"), NoOffload().place(m), gpu_memory_utilization=0.9,
                    max_batched_tokens=2048, max_seqs=256, max_model_len=4096, scheduler="v2")


def test_num_gpu_blocks_override_must_be_a_count():
    for bad in (0, -3, 2.5, "100"):
        with pytest.raises(ConfigError, match="num_gpu_blocks_override"):
            EngineConfig(num_gpu_blocks_override=bad)


def test_a_policy_that_does_not_fit_raises():
    m, a100 = get_model("llama-3.1-70b"), get_gpu("A100-SXM4-40GB")
    with pytest.raises(DoesNotFitError) as e:
        plan(m, a100, NoOffload())
    assert "llama-3.1-70b" in str(e.value) and "max_model_len" in str(e.value)
    # offloading every layer makes it fit (2.1 GB embedding + LM head, 3.4 GB of staging)
    assert plan(m, a100, interval(1), max_len=4096).kv_tokens >= 4096
    with pytest.raises(DoesNotFitError):  # 20 resident layers are 34 GB: still too much
        plan(m, a100, Prefetch(4, 3, 2), max_len=4096)
    # and simulate() refuses before running anything
    with pytest.raises(DoesNotFitError):
        simulate("llama-3.1-70b", "a100", None, fixed(1, 10, 10), EngineConfig())


def test_max_model_len_must_fit_in_the_kv_cache():
    eng = engine(max_model_len=512)
    hw = hw_with_kv(MODEL, NoOffload(), eng, 500)  # 496 KV tokens in whole blocks < 512
    with pytest.raises(DoesNotFitError, match="max_model_len=512"):
        simulate(MODEL, hw, NoOffload(), fixed(1, 10, 10), eng)
    simulate(MODEL, hw, NoOffload(), fixed(1, 10, 10), engine(max_model_len=496))


def test_too_much_offload_for_host_memory_raises():
    m = get_model("llama-3.1-8b")
    small_host = get_gpu("A100-SXM4-40GB").replace(host_memory_bytes=8 * GiB)
    with pytest.raises(DoesNotFitError, match="host memory"):
        plan(m, small_host, interval(1))  # 32 x 0.41 GiB = 13 GiB offloaded
    plan(m, small_host, interval(2))  # 16 layers = 6.5 GiB: fits
    with pytest.raises(DoesNotFitError, match="host memory"):
        simulate(m, small_host, VllmCopy(9), fixed(1, 10, 10), EngineConfig())


def test_chunked_prefill_preempts_instead_of_stalling():
    """Two long prompts whose chunks together outgrow a small KV cache: the later one is preempted
    and recomputed (vLLM's policy), not left holding blocks while the scheduler stalls."""
    from offloadlab.sim.serving import ServingLoop
    from offloadlab.sim.step import StepModel
    from offloadlab.sim.costs import cost_model

    m = get_model("llama-3.2-1b").replace(layers=2)
    eng = EngineConfig(chunked_prefill=True, max_num_batched_tokens=64, max_model_len=192, max_num_seqs=4)
    sm = StepModel(NoOffload().place(m), cost_model(m, get_gpu("h100")))
    loop = ServingLoop(sm, eng, kv_tokens=256, trace_steps=True)
    reqs = [Request(0, 150, 20, 0.0), Request(1, 150, 20, 0.0)]
    loop.run(reqs)
    assert all(s.generated == 20 for s in loop.seqs)
    assert loop.preemptions >= 1 and loop.pool.free == loop.total_blocks
    for t0, t1, kind, n in loop.steps:
        assert n >= 1


def _bursts_and_one_by_one(wl, engine: str) -> list:
    """``wl`` run on ``engine`` with same-instant arrivals handed over whole (Feed.bursts), then one event each."""
    from offloadlab.sim.serving import Feed

    eng = {"v0": EngineConfig(max_num_batched_tokens=2048, max_model_len=2048),
           "v0-chunked": EngineConfig(max_num_batched_tokens=512, max_model_len=2048, chunked_prefill=True),
           "v1": EngineConfig(max_num_batched_tokens=512, max_model_len=2048, chunked_prefill=True,
                              scheduler="v1", prefix_caching=True)}[engine]
    runs = []
    for bursts in (True, False):
        Feed.bursts = bursts
        try:
            runs.append(simulate("llama-3.1-8b", "A100-SXM4-40GB", interval(2), wl, eng, trace_steps=True))
        finally:
            Feed.bursts = True
    return runs


@pytest.mark.parametrize("engine", ["v0", "v0-chunked", "v1"])
def test_under_a_client_limit_the_engine_takes_requests_as_the_feed_sends_them(engine):
    """Under max_concurrency a request finishing at a step's end frees a slot and the feed sends the next
    one at that instant, before the next step is scheduled: the engine must see it then. V0 took what had
    been handed over at once and left such a request for a step later (makespans 2-5% off on every one of
    20 random workloads like this one); now V0 takes requests one event each under a limit, as V1 does
    whenever another event is due, and the burst hand-off is exact again."""
    import random

    rng = random.Random(0)
    reqs = sorted((Request(i, rng.randint(20, 600), rng.randint(1, 12), round(rng.random() * 2, 1)) for i in range(120)),
                  key=lambda r: (r.arrival, r.id))
    wl = Workload("limited", tuple(reqs), max_concurrency=8)
    runs = _bursts_and_one_by_one(wl, engine)
    assert runs[0].steps == runs[1].steps
    pd.testing.assert_frame_equal(runs[0].requests, runs[1].requests)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(1, 1500), st.integers(1, 300), st.sampled_from([0.0, 0.0, 0.5, 1.25, 3.0])),
                min_size=1, max_size=60),
       st.sampled_from(["v0", "v0-chunked", "v1"]), st.sampled_from([None, 7]))
def test_a_burst_handed_over_whole_serves_as_one_handed_over_request_by_request(reqs, engine, limit):
    """Requests that arrive at one instant go to a lone engine as one burst (Feed.bursts); one event per
    request, as before, gives the same run but for the event count: the engine took every request already
    handed over before it scheduled, at t=0 and at later ties alike (a step may end at that instant)."""
    reqs = sorted(reqs, key=lambda r: r[2])
    wl = Workload("ties", tuple(Request(i, p, o, a) for i, (p, o, a) in enumerate(reqs)), max_concurrency=limit)
    runs = _bursts_and_one_by_one(wl, engine)
    whole, one_by_one = runs
    assert whole.steps == one_by_one.steps
    pd.testing.assert_frame_equal(whole.requests, one_by_one.requests)
    assert whole.summary["simpy_events"] <= one_by_one.summary["simpy_events"]
    for k, v in whole.summary.items():
        if k not in ("wall_s", "simpy_events"):
            assert v == one_by_one.summary[k] or (v != v and one_by_one.summary[k] != one_by_one.summary[k]), k


@SETTINGS
@given(st.lists(st.tuples(st.integers(1, 40), st.integers(0, 500)), min_size=1, max_size=12))
def test_a_steps_kind_read_off_its_shape_is_the_batch_rule(seqs):
    """The records' step kind from the StepShape (decode_only, decodes) is the rule the engines applied to the
    batch: decode when every request adds one token, prefill when none does, mixed otherwise."""
    news = [k for k, _ in seqs]
    rule = "decode" if all(k == 1 for k in news) else ("prefill" if all(k > 1 for k in news) else "mixed")
    assert _kind(StepShape.of(seqs)) == rule
