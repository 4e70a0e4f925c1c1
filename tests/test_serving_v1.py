"""vLLM's V1 engine (sim/serving_v1.py) and its per-version defaults (sim/vllm_engine.py)."""
from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from offloadlab.catalog import get_gpu, get_model
from offloadlab.errors import ConfigError
from offloadlab.policy import NoOffload
from offloadlab.sim import EngineConfig, simulate
from offloadlab.sim.costs import cost_model
from offloadlab.sim.serving_v1 import V1ServingLoop
from offloadlab.sim.step import StepModel
from offloadlab.sim.vllm_engine import attention_kernel, batch_defaults, engine_generation, parse_version, vllm_engine
from offloadlab.sim.workload import Request, Workload, fixed
from offloadlab.specs import GiB, HardwareSpec, ModelSpec

MODEL = ModelSpec("tiny", layers=4, hidden=256, heads=4, kv_heads=2, head_dim=64, intermediate=512, vocab=1000,
                  max_context=4096)
HW = HardwareSpec("toy", memory_bytes=8 * GiB, hbm_bw=1e12, peak_flops=1e14, host_link_bw=1e10)


def v1(**kw) -> EngineConfig:
    base = dict(scheduler="v1", chunked_prefill=True, max_model_len=1024, max_num_batched_tokens=64,
                max_num_seqs=8, block_size=16, prefix_caching=True, reserve_full_isl=True)
    return EngineConfig(**{**base, **kw})


class Checked(V1ServingLoop):
    """Checks block accounting and the step limits at every scheduling decision (requests decoding with
    the shared clock counted from it: ``scheduled``)."""

    def _schedule(self):
        batch = super()._schedule()
        step = self.scheduled(batch)
        assert len(step) == len(batch) + self._ndec
        held = sum(s.blocks for s in self.seqs if s.off is None) + sum(b for s, _, _, b in step if s.off is not None)
        assert held + self.pool.free == self.total_blocks - 1, "blocks leaked (block 0 is the null block)"
        assert sum(k for _, k, _, _ in step) <= self.cfg.max_num_batched_tokens
        assert len(self.running) <= self.cfg.max_num_seqs
        assert len({id(s) for s, _, _, _ in step}) == len(step)
        for s, k, computed, blocks in step:
            assert blocks * self.cfg.block_size >= computed + k, "a scheduled token without a KV slot"
        self.batches.append([(s.req.id, k, computed) for s, k, computed, _ in step])
        return batch


def loop(eng: EngineConfig, kv_tokens: int) -> Checked:
    sm = StepModel(NoOffload().place(MODEL), cost_model(MODEL, HW, graph_mode="piecewise", max_graph_batch=64))
    lp = Checked(sm, eng, kv_tokens)
    lp.batches = []
    return lp


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(reqs=st.lists(st.tuples(st.integers(1, 200), st.integers(1, 60), st.floats(0, 0.05)), min_size=1, max_size=12),
       blocks=st.integers(16, 60), budget=st.integers(16, 96), seqs=st.integers(1, 6),
       caching=st.booleans(), reserve=st.booleans())
def test_every_request_is_served_with_blocks_conserved(reqs, blocks, budget, seqs, caching, reserve):
    eng = v1(max_num_batched_tokens=budget, max_num_seqs=seqs, prefix_caching=caching, reserve_full_isl=reserve)
    wl = [Request(i, p, o, a) for i, (p, o, a) in enumerate(reqs)]
    if any(r.total_tokens > (blocks - 1) * 16 for r in wl):
        return  # simulate() refuses these (vLLM would ignore them)
    lp = loop(eng, blocks * 16)
    lp.run(wl)
    for s in lp.seqs:
        assert s.generated == s.req.output_len and s.finish >= s.first >= s.req.arrival
    assert lp.pool.free == blocks - 1  # everything back in the pool at the end


def test_running_requests_go_first_then_prompt_chunks_fill_the_budget():
    wl = [Request(0, 40, 5, 0.0), Request(1, 40, 5, 0.0), Request(2, 200, 5, 0.0)]
    lp = loop(v1(max_num_batched_tokens=64), 4096)
    lp.run(wl)
    # step 1: request 0 whole (40) + 24 tokens of request 1; step 2: 16 of request 1, then 48 of request 2
    assert lp.batches[0] == [(0, 40, 0), (1, 24, 0)]
    assert lp.batches[1] == [(0, 1, 40), (1, 16, 24), (2, 47, 0)]  # request 0 decodes first


def test_reserve_full_isl_waits_for_the_whole_prompt():
    # 10 usable blocks (160 tokens): request 0 holds 4 blocks; request 1's prompt needs 8 blocks
    wl = [Request(0, 60, 40, 0.0), Request(1, 120, 2, 0.001)]
    admitted = {}
    for reserve in (True, False):
        lp = loop(v1(max_num_batched_tokens=32, reserve_full_isl=reserve), 11 * 16)
        lp.run(wl)
        admitted[reserve] = next(i for i, b in enumerate(lp.batches) if any(r == 1 for r, _, _ in b))
    # without the reservation it starts on its first 32-token chunk right away (and preempts later)
    assert admitted[False] < admitted[True]


def test_prefix_cache_makes_recompute_after_preemption_cheaper():
    wl = Workload("w", tuple(Request(i, 150, 120, 0.0) for i in range(4)))
    runs = {}
    for caching in (False, True):
        lp = loop(v1(max_num_batched_tokens=256, prefix_caching=caching), 30 * 16)
        lp.run(list(wl.requests))
        computed = sum(k for b in lp.batches for _, k, _ in b)
        runs[caching] = (lp.preemptions, computed, lp.cached_tokens, lp.env.now)
    assert runs[False][0] > 0 and runs[True][0] > 0, runs  # the KV cache is too small: preemption
    assert runs[True][2] > 0 and runs[False][2] == 0
    assert runs[True][1] < runs[False][1]  # fewer tokens computed again


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(reqs=st.lists(st.tuples(st.integers(1, 200), st.integers(1, 30), st.floats(0, 0.05)), min_size=1, max_size=10),
       budget=st.integers(16, 96), seqs=st.integers(1, 6))
def test_a_warm_prefix_cache_serves_every_prompt_but_its_last_partial_block(reqs, budget, seqs):
    """Room for every prompt's cached blocks and every request at once: each finds its full prompt blocks at its
    first admission, at most prompt - 1 tokens (vLLM recomputes the last token to sample from)."""
    wl = [Request(i, p, o, a) for i, (p, o, a) in enumerate(reqs)]
    blocks = 1 + sum(p // 16 + -(-(p + o) // 16) for p, o, _ in reqs)
    lp = loop(v1(max_num_batched_tokens=budget, max_num_seqs=seqs, prefix_cache_warm=True), blocks * 16)
    lp.run(wl)
    hit = {r.id: (r.prompt_len - 1) // 16 * 16 for r in wl}
    assert lp.cached_tokens == sum(hit.values())
    first = {}
    for b in lp.batches:
        for rid, _, computed in b:
            first.setdefault(rid, computed)
    assert first == hit  # each request's first step starts past its cached tokens
    for s in lp.seqs:
        assert s.generated == s.req.output_len and s.preempted == 0
    assert lp.pool.free == blocks - 1
    cold = loop(v1(max_num_batched_tokens=budget, max_num_seqs=seqs), blocks * 16)
    cold.run(wl)
    assert cold.cached_tokens == 0
    prompt = {r.id: r.prompt_len for r in wl}

    def prefilled(run):  # prompt tokens computed (prefill chunks are always scheduled steps, never a decode run)
        return sum(min(k, prompt[rid] - c) for b in run.batches for rid, k, c in b if c < prompt[rid])
    assert prefilled(lp) == prefilled(cold) - sum(hit.values()) == sum(prompt.values()) - sum(hit.values())


def test_a_warm_pool_keeps_the_latest_prompts_and_hands_out_never_used_blocks_first():
    from offloadlab.sim.serving import _Seq
    from offloadlab.sim.serving_v1 import BlockPool

    pool = BlockPool(8, True, 16)  # 7 usable
    pool.warm([(0, 3), (1, 3), (2, 3)])  # freed in this order: request 0's oldest, so it loses 2 of its 3 blocks
    seqs = {i: _Seq(Request(i, 4 * 16 + 1, 1, 0.0), 1) for i in range(3)}
    assert [pool.hits(seqs[i]) for i in range(3)] == [1, 3, 3] and pool.free == 7
    pool.take(1)  # the head: request 0's last cached block
    assert [pool.hits(seqs[i]) for i in range(3)] == [0, 3, 3]
    pool.take(1)  # then request 1's highest block
    assert [pool.hits(seqs[i]) for i in range(3)] == [0, 2, 3]
    roomy = BlockPool(12, True, 16)  # 11 usable: 2 never used, popped before any cached block
    roomy.warm([(0, 3), (1, 3), (2, 3)])
    roomy.take(2)
    assert [roomy.hits(seqs[i]) for i in range(3)] == [3, 3, 3]
    short = _Seq(Request(3, 32, 1, 0.0), 1)  # a 2-block prompt finds at most 1 block: 31 tokens, not 32
    fresh = BlockPool(12, True, 16)
    fresh.warm([(3, 2)])
    assert fresh.hits(short) == 1


def test_a_warm_prefix_cache_needs_prefix_caching_on_one_engine():
    with pytest.raises(ConfigError, match="prefix_cache_warm"):
        v1(prefix_caching=False, prefix_cache_warm=True)
    with pytest.raises(ConfigError, match="prefix_cache_warm"):
        v1(pipeline_parallel=2, prefix_cache_warm=True)


def test_v1_needs_a_v1_scheduler_for_its_features():
    with pytest.raises(ConfigError, match="scheduler"):
        EngineConfig(prefix_caching=True)
    with pytest.raises(ConfigError, match="scheduler"):
        EngineConfig(scheduler="v2")


def test_simulate_runs_v1_and_v0_and_v1_records_occupancy():
    wl = fixed(20, 300, 50)
    r1 = simulate("llama-3.1-8b", "rtx4090", None, wl, v1(max_model_len=4096, max_num_batched_tokens=2048,
                                                            max_num_seqs=256))
    r0 = simulate("llama-3.1-8b", "rtx4090", None, wl, EngineConfig(max_model_len=4096, max_num_batched_tokens=2048))
    assert r1.summary["requests"] == r0.summary["requests"] == 20
    assert r1.config["scheduler"] == "v1" and r0.config["scheduler"] == "v0"
    assert r1.occupancy and not r0.occupancy
    assert all(run + wait <= 20 for _, run, wait in r1.occupancy)
    # V1 sizes its KV cache after profiling the sampler on max_num_seqs rows (more than V0's fp32 logits)
    assert r1.memory.activations > r0.memory.activations


@pytest.mark.parametrize("gpu,entry,expected", [
    ("rtx4090", "serve", (2048, 256)), ("rtx4090", "llm", (8192, 256)),
    ("h100", "serve", (8192, 1024)), ("h100", "llm", (16384, 1024)),
    ("a100-80gb", "serve", (2048, 256)),  # an A100 gets the small defaults whatever its memory
    ("l4", "serve", (2048, 256)), ("h200", "serve", (8192, 1024)),
])
def test_batch_defaults_follow_vllm_arg_utils(gpu, entry, expected):
    assert batch_defaults(get_gpu(gpu), entry) == expected


@pytest.mark.parametrize("gpu,kernel", [
    ("rtx4090", "fa2"), ("a100", "fa2"), ("a10g", "fa2"), ("rtx-pro-6000", "fa2"), ("rtx5090", "fa2"),
    ("h100", "packed"), ("h200", "packed"), ("gh200", "packed"), ("h20", "packed"),  # FA3 packs GQA
    ("b200", "packed"),  # FlashInfer first on compute capability 10.x
    ("mi300x", "packed"),  # not a CUDA device: no rule known, the plain roofline
])
def test_v1_attention_kernel_by_compute_capability(gpu, kernel):
    assert attention_kernel(get_gpu(gpu)) == kernel
    assert vllm_engine("0.19.0", get_gpu(gpu), get_model("llama-3.1-8b"))[1]["attention_kernel"] == kernel
    assert "attention_kernel" not in vllm_engine("0.7.3", get_gpu(gpu), get_model("llama-3.1-8b"))[1]  # V0: apart


def test_vllm_engine_per_version():
    m, hw = get_model("llama-3.1-8b"), get_gpu("rtx4090")
    eng, kw = vllm_engine("0.19.0", hw, m)
    assert (eng.scheduler, eng.chunked_prefill, eng.prefix_caching, eng.reserve_full_isl, eng.async_scheduling) == \
        ("v1", True, True, True, True)
    assert (eng.max_num_batched_tokens, eng.max_num_seqs, eng.max_model_len) == (2048, 256, 131072)
    assert kw == {"cuda_graphs": True, "graph_mode": "piecewise", "max_graph_batch": 512, "attention_kernel": "fa2"}
    eng, kw = vllm_engine("0.10.1", hw, m, max_num_seqs=4, enforce_eager=True)
    assert eng.scheduler == "v1" and not eng.async_scheduling and not eng.reserve_full_isl
    assert eng.max_num_seqs == 4 and kw["cuda_graphs"] is False and kw["max_graph_batch"] == 8
    eng, kw = vllm_engine("v0.7.3", hw, m, max_model_len=8192)
    assert eng.scheduler == "v0" and not eng.chunked_prefill and kw == {"cuda_graphs": True}
    assert engine_generation("0.8.0") == "v1" and parse_version("0.10.1.dev3+gabc") == (0, 10, 1)
    with pytest.raises(ConfigError, match="vllm_version"):
        parse_version("latest")
    with pytest.raises(ConfigError, match="swap_space"):
        vllm_engine("0.19.0", hw, m, swap_space=4)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(reqs=st.lists(st.tuples(st.integers(1, 150), st.integers(1, 80), st.floats(0, 0.02)), min_size=1, max_size=10),
       blocks=st.integers(20, 60), caching=st.booleans())
def test_bulk_decode_runs_change_nothing(reqs, blocks, caching):
    wl = [Request(i, p, o, a) for i, (p, o, a) in enumerate(reqs)]
    if any(r.total_tokens > (blocks - 1) * 16 for r in wl):
        return
    eng = v1(max_num_batched_tokens=64, max_num_seqs=6, prefix_caching=caching)
    out = []
    for bulk in (False, True):
        sm = StepModel(NoOffload().place(MODEL), cost_model(MODEL, HW, graph_mode="piecewise", max_graph_batch=64))
        lp = V1ServingLoop(sm, eng, blocks * 16, bulk=bulk)
        lp.run(wl)
        out.append([(s.first, s.finish, s.preempted, s.generated) for s in lp.seqs])
    assert [o[2:] for o in out[0]] == [o[2:] for o in out[1]]
    times = [[t for o in run for t in o[:2]] for run in out]
    assert times[0] == pytest.approx(times[1], rel=1e-12)  # summation order only


def test_pipeline_parallel_v1_serves_everything_and_keeps_a_token_per_traversal():
    m, hw = get_model("llama-3.1-8b"), get_gpu("h100")
    one = fixed(1, 500, 40)
    base = dict(max_model_len=4096, max_num_batched_tokens=2048, max_num_seqs=64)
    r1 = simulate(m, hw, None, one, v1(**base))
    r2 = simulate(m, hw, None, one, v1(**base, pipeline_parallel=2))
    # one request: each token crosses both stages (half the layers each) one after the other
    assert r2.requests["output_len"].iloc[0] == 40
    assert r2.summary["tpot_mean_s"] == pytest.approx(r1.summary["tpot_mean_s"], rel=0.15)
    # many requests: two batches in flight, every request served once, blocks within the pool
    many = Workload("w", tuple(Request(i, 300 + 37 * i, 20 + i, 0.01 * i) for i in range(40)))
    r = simulate(m, hw, None, many, v1(**base, pipeline_parallel=2))
    assert (r.requests["output_len"] == [20 + i for i in range(40)]).all()
    assert r.summary["throughput_rps"] > 0 and r.config["pipeline_parallel"] == 2


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(reqs=st.lists(st.tuples(st.integers(1, 150), st.integers(1, 40), st.floats(0, 0.02)), min_size=1, max_size=10),
       blocks=st.integers(20, 50), depth=st.integers(2, 4))
def test_pipelined_v1_conserves_blocks_and_finishes(reqs, blocks, depth):
    from offloadlab.sim.serving import Pipeline  # noqa: F401  (the stages V1PipelinedServing drives)
    from offloadlab.sim.serving_v1 import V1PipelinedServing

    wl = [Request(i, p, o, a) for i, (p, o, a) in enumerate(reqs)]
    if any(r.total_tokens > (blocks - 1) * 16 for r in wl):
        return
    stage = MODEL.replace(layers=2)
    sms = [StepModel(NoOffload().place(stage), cost_model(stage, HW, graph_mode="piecewise", max_graph_batch=64))
           for _ in range(depth)]
    lp = V1PipelinedServing(sms, lambda i, tokens: 1e-6, v1(max_num_batched_tokens=64, max_num_seqs=6), blocks * 16)
    lp.run(wl)
    for s in lp.seqs:
        assert s.generated == s.req.output_len and s.finish >= s.first >= s.req.arrival
    assert lp.pool.free == blocks - 1 and lp.in_flight == 0
