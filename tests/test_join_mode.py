"""How a step joins vLLM's prefetch copy stream follows the CUDA graphs it replays (sim/step.py
``join_mode``): one FULL graph joins only the next step's first copies, at its end; PIECEWISE graphs
join the copies each piece started before that piece ends (vllm/compilation/cuda_graph.py
``CUDAGraphWrapper.__call__`` calls ``join_after_forward`` in every piece's capture; vLLM 0.19.0); an
eager step joins nothing."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from offloadlab import get_gpu, get_model
from offloadlab.policy import Prefetch
from offloadlab.sim.costs import Roofline, StepShape
from offloadlab.sim.step import StepModel, join_mode

JOIN_OF_GRAPH = {"full": "full", "piecewise": "piecewise", None: "eager"}


def _gh200_8b():
    # a fast host link (NVLink-C2C): a copy takes about as long as a few layers of a small mixed
    # step, so where it is joined decides whether it is hidden
    return get_model("llama-3.1-8b"), get_gpu("gh200")


def test_v1_mixed_step_within_the_capture_size_joins_piece_by_piece():
    m, hw = _gh200_8b()
    pl = Prefetch(8, 1, 2, wrap=True).place(m)  # 4 offloaded layers, two slots, copies across steps
    rf = Roofline(m, hw, graph_mode="piecewise", max_graph_batch=512)  # V1's FULL_AND_PIECEWISE
    mixed = StepShape.of([(200, 0)] + [(1, 1000)] * 64)  # a prefill chunk with 64 decodes: 264 tokens
    assert rf.graph_kind(mixed) == "piecewise" and join_mode(rf, mixed) == "piecewise"
    by_step = StepModel(pl, rf).run(mixed)
    piecewise = StepModel(pl, rf, join="piecewise").run(mixed)
    full = StepModel(pl, rf, join="full").run(mixed)
    assert by_step.time == piecewise.time and by_step.stall == piecewise.stall
    # joined as one full graph (the rule before), the copies would overlap more layers: faster
    assert by_step.time > full.time * 1.05 and by_step.stall > full.stall


def test_a_piece_ends_at_the_next_layers_attention():
    """vLLM's pieces are split at the attention ops, so the piece that issued a copy ends after the next
    layer's QKV projection (Roofline.pre_attention): the join waits there, between the bounds of joining
    at that layer's start and at its end."""
    from offloadlab.sim.step import simulate_layers

    m, hw = _gh200_8b()
    pl = Prefetch(8, 1, 2, wrap=True).place(m)
    rf = Roofline(m, hw, graph_mode="piecewise", max_graph_batch=512)
    mixed = StepShape.of([(200, 0)] + [(1, 1000)] * 64)
    qkv = rf.gemm_time((6144, 4096), mixed.tokens)  # Llama-3.1-8B's fused QKV weight
    assert rf.pre_attention(mixed) == qkv and 0 < qkv < rf.layer(mixed).gpu
    layer, head = rf.layer(mixed), rf.head(mixed)
    t = {f: simulate_layers(pl, layer, head, rf.transfer, wrap=True, join="piecewise", pre_attention=f).time
         for f in (0.0, qkv, layer.gpu)}
    by_step = StepModel(pl, rf, quantum=0).run(mixed).time
    assert by_step == t[qkv] and t[0.0] > by_step > t[layer.gpu]


def test_the_other_steps_of_v1_join_as_their_graphs():
    m, hw = _gh200_8b()
    pl = Prefetch(8, 1, 2, wrap=True).place(m)
    rf = Roofline(m, hw, graph_mode="piecewise", max_graph_batch=512)
    decode = StepShape.decode(64, 64 * 1000)  # uniform decode: one FULL graph
    big = StepShape.of([(2000, 0)] + [(1, 1000)] * 64)  # beyond the capture size: eager
    assert join_mode(rf, decode) == "full" and join_mode(rf, big) == "eager"
    assert StepModel(pl, rf).run(decode) == StepModel(pl, rf, join="full").run(decode)
    assert StepModel(pl, rf).run(big) == StepModel(pl, rf, join="eager").run(big)
    # cudagraph_mode PIECEWISE: decode steps replay the pieces too
    pieces = Roofline(m, hw, graph_mode="piecewise_only", max_graph_batch=512)
    assert join_mode(pieces, decode) == "piecewise"
    assert StepModel(pl, pieces).run(decode) == StepModel(pl, pieces, join="piecewise").run(decode)
    # V0 captures decode steps only, as full graphs; no graphs at all: nothing joins
    v0, none = Roofline(m, hw, graph_mode="decode"), Roofline(m, hw, cuda_graphs=False)
    assert join_mode(v0, decode) == "full" and join_mode(v0, StepShape.of([(200, 0)])) == "eager"
    assert join_mode(none, decode) == "eager"


shapes = st.lists(st.tuples(st.integers(1, 300), st.integers(0, 4000)), min_size=1, max_size=6).map(StepShape.of)


@settings(max_examples=40, deadline=None)
@given(mode=st.sampled_from(["decode", "piecewise", "piecewise_only", "full"]), graphs=st.booleans(),
       cap=st.sampled_from([8, 64, 512]), g=st.integers(3, 8), s=st.integers(1, 2),
       steps=st.lists(shapes, min_size=1, max_size=6))
def test_a_warm_step_model_joins_each_step_as_the_graph_it_replays(mode, graphs, cap, g, s, steps):
    """One StepModel over steps of every graph kind (its memo shared between them) gives each step
    exactly what a fresh model told that step's join gives. (Groups of 3 or more layers: a copy then
    has layers to overlap, so where it is joined shows in the step's time.)"""
    m, hw = _gh200_8b()
    pl = Prefetch(g, 1, s, wrap=True).place(m)
    rf = Roofline(m, hw, cuda_graphs=graphs, graph_mode=mode, max_graph_batch=cap)
    warm = StepModel(pl, rf)
    for shape in steps:
        want = StepModel(pl, rf, join=JOIN_OF_GRAPH[rf.graph_kind(shape)]).run(shape)
        assert warm.run(shape) == want


@pytest.mark.parametrize("mode", ["piecewise", "piecewise_only"])
def test_wrapped_costs_join_as_their_roofline(mode):
    """A cost model wrapping the roofline (``.roofline``) is asked through it."""
    from offloadlab.sim.costs import Corner

    m, hw = _gh200_8b()
    rf = Roofline(m, hw, graph_mode=mode, max_graph_batch=512)
    mixed = StepShape.of([(200, 0)] + [(1, 1000)] * 8)
    assert join_mode(Corner(rf, 1), mixed) == "piecewise"
