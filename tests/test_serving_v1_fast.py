"""The V1 scheduler's fast paths (sim/serving_v1.py: run-length block pool, inlined loops, the shared
decode clock) against the engine as it was before them (tests/v1_reference.py): the same requests, the
same times, exactly."""
from __future__ import annotations


from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from offloadlab.policy import NoOffload
from offloadlab.sim.costs import cost_model
from offloadlab.sim.serving import _Seq
from offloadlab.sim.serving_v1 import BlockPool, V1ServingLoop
from offloadlab.sim.step import StepModel
from offloadlab.sim.workload import Request
from test_serving_v1 import HW, MODEL, v1
from v1_reference import BlockPool as RefPool
from v1_reference import V1ServingLoop as RefLoop


def _run(cls, wl, eng, kv_tokens, bulk, **kw):
    sm = StepModel(NoOffload().place(MODEL), cost_model(MODEL, HW, graph_mode="piecewise", max_graph_batch=64))
    lp = cls(sm, eng, kv_tokens, bulk=bulk, **kw)
    lp.run(wl)
    return ([(s.first, s.finish, s.preempted, s.generated) for s in lp.seqs], lp.steps, lp.occupancy,
            lp.cached_tokens, lp.preemptions)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(reqs=st.lists(st.tuples(st.integers(1, 200), st.integers(1, 80), st.floats(0, 0.05)), min_size=1, max_size=14),
       blocks=st.integers(16, 60), budget=st.integers(16, 96), seqs=st.integers(1, 8), caching=st.booleans(),
       reserve=st.booleans(), bulk=st.booleans(), lazy=st.booleans())
def test_fast_v1_reproduces_the_reference_engine_exactly(reqs, blocks, budget, seqs, caching, reserve, bulk, lazy):
    wl = [Request(i, p, o, a) for i, (p, o, a) in enumerate(reqs)]
    if any(r.total_tokens > (blocks - 1) * 16 for r in wl):
        return  # simulate() refuses these
    eng = v1(max_num_batched_tokens=budget, max_num_seqs=seqs, prefix_caching=caching, reserve_full_isl=reserve)
    assert _run(V1ServingLoop, wl, eng, blocks * 16, bulk, lazy=lazy) == _run(RefLoop, wl, eng, blocks * 16, bulk)


@settings(max_examples=200, deadline=None)
@given(ops=st.lists(st.tuples(st.sampled_from(["admit", "free", "grow"]), st.integers(0, 7), st.integers(0, 12)),
                    max_size=60), blocks=st.integers(2, 40), caching=st.booleans())
def test_run_length_pool_equals_one_entry_per_block(ops, blocks, caching):
    """Random admissions (with cache hits), growth and frees: free counts and hits agree at every step."""
    pools = [BlockPool(blocks, caching, 16), RefPool(blocks, caching, 16)]
    seqs = [[_Seq(Request(i, 1 + 37 * i, 5, 0.0), 5) for i in range(8)] for _ in pools]
    for op, who, n in ops:
        for pool, ss in zip(pools, seqs):
            s = ss[who]
            s.req = Request(who, 16 * n + 1, 5, 0.0)  # known - 1 = 16 n: up to n full blocks may hit
            if op == "admit" and not s.blocks:
                hit = pool.hits(s)
                pool.touch(s, hit)
                s.gen += 1
                s.blocks = s.hashed = hit
            elif op in ("admit", "grow") and s.blocks:
                take = min(n, pool.free)
                pool.take(take)
                s.blocks += take
                s.hashed = s.blocks if n % 2 else s.blocks // 2
            elif op == "free" and s.blocks:
                pool.give_back(s)
        assert pools[0].free == pools[1].free
        assert [pools[0].hits(s) for s in seqs[0]] == [pools[1].hits(s) for s in seqs[1]]
