"""The shared decode clock (sim/serving.py ``_Cohort``, used by the V0 and the V1 engine) against its members
counted one by one: who takes a block at a tick, the blocks of a decode run, the longest run that fits, and
the counters it writes back when the clock moves on. And V1's hand-off of arrivals in the loop it shares
with V0 (ServingLoop._engine) against a get event each."""
from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from offloadlab.policy import NoOffload
from offloadlab.sim.costs import cost_model
from offloadlab.sim.serving import _Cohort, _Seq
from offloadlab.sim.serving_v1 import V1ServingLoop
from offloadlab.sim.step import StepModel
from offloadlab.sim.workload import Request
from test_serving_v1 import HW, MODEL, v1


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


@settings(max_examples=300, deadline=None)
@given(bs=st.sampled_from([1, 2, 4, 16, 32]), tick=st.integers(0, 10_000),
       members=st.lists(st.tuples(st.integers(1, 300), st.integers(1, 90), st.integers(1, 70)), min_size=1,
                        max_size=12),
       free=st.integers(0, 40), caching=st.booleans(), data=st.data())
def test_the_cohort_counts_as_its_members_one_by_one(bs, tick, members, free, caching, data):
    c = _Cohort(bs, caching)
    c.tick = tick
    plain = []  # (seq, generated, computed) as each member's own counters would be
    for i, (prompt, generated, more) in enumerate(members):
        s = _Seq(Request(i, prompt, generated + more, 0.0), generated + more)
        s.generated, s.computed, s.adm = generated, prompt + generated - 1, i
        s.blocks = _ceil(s.computed, bs)
        c.join(s)
        plain.append((s, generated, s.computed))
    assert c.size == len(plain) and c.kv() == sum(k for _, _, k in plain)
    assert c.needers() == {s for s, _, k in plain if k % bs == 0}  # their computed tokens fill their blocks
    for s, g, k in plain:
        assert c.counters(s) == (g, k, _ceil(k, bs))
    c.taken = True  # the step's blocks allocated, as the engines do before a step
    for s, g, k in plain:
        assert c.counters(s) == (g, k, _ceil(k + 1, bs))
    n = min(s.output_len - g for s, g, _ in plain)  # steps until the first member finishes

    def blocks(m):  # what the members take in steps 2 .. m, one by one
        return sum(_ceil(k + m, bs) - _ceil(k + 1, bs) for _, _, k in plain)

    for m in range(1, n + 1):
        assert c.run_blocks(m) == blocks(m)
    kv = sum(k for _, _, k in plain) + len(plain)  # the first step reads every member's context and new token
    assert c.plan(free) == (len(plain), max(m for m in range(1, n + 1) if blocks(m) <= free), kv)
    m = data.draw(st.integers(1, n))
    done = c.advance(m)
    assert not c.taken
    finished = [s for s, g, _ in plain if s.output_len - g == m]
    assert done == finished  # by admission
    for s, g, k in plain:
        if s in finished:
            assert (s.off, s.generated, s.computed, s.blocks) == (None, s.output_len, k + m, _ceil(k + m, bs))
        else:
            assert c.counters(s) == (g + m, k + m, _ceil(k + m, bs))
            assert c.leave(s) == k + m and (s.off, s.generated, s.blocks) == (None, g + m, _ceil(k + m, bs))
        assert s.hashed == ((k + m) // bs if caching else 0)  # V1's prefix caching: its full blocks
    assert c.size == 0 and c.base == 0 and c.last == -1 and not any(c.phase)


class _EveryArrivalByAGet(V1ServingLoop):
    """V1 taking every handed-over request with a get event (the hand-off as SimPy defines it)."""

    def _handed_over(self) -> bool:
        return False


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(reqs=st.lists(st.tuples(st.integers(1, 200), st.integers(1, 12), st.sampled_from([0.0, 0.0, 0.0, 0.01])),
                     min_size=2, max_size=30),
       limit=st.sampled_from([None, 2, 3, 4, 6]), caching=st.booleans(), budget=st.sampled_from([32, 64, 512]))
def test_v1_takes_arrivals_as_a_get_each_would(reqs, limit, caching, budget):
    """V1's loop (ServingLoop._engine) takes a handed-over request without an event only when the get would
    be the next event anyway (V1ServingLoop._handed_over): the same run as a get each, client limit or not
    (short outputs at one instant under a limit: requests finish at consecutive step ends, each freeing a
    slot for the next, which taking every handed-over request at once would leave out of the next step)."""
    wl = sorted((Request(i, p, o, a) for i, (p, o, a) in enumerate(reqs)), key=lambda r: (r.arrival, r.id))
    eng = v1(max_num_batched_tokens=budget, prefix_caching=caching)
    sm = StepModel(NoOffload().place(MODEL), cost_model(MODEL, HW, graph_mode="piecewise", max_graph_batch=64))
    runs = []
    for cls in (V1ServingLoop, _EveryArrivalByAGet):
        lp = cls(sm, eng, 40 * 16)
        lp.run(list(wl), limit)
        runs.append(([(s.req.id, s.sent, s.first, s.finish, s.preempted) for s in lp.seqs], lp.steps, lp.occupancy,
                     lp.env.scheduled))
    (seqs, steps, occ, events), (seqs1, steps1, occ1, events1) = runs
    assert (seqs, steps, occ) == (seqs1, steps1, occ1)
    assert events <= events1
