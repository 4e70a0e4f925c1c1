"""Tensor and pipeline parallelism: per-GPU shards and stages, communication, shared host links,
node and host-memory limits, pipelined serving."""
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from offloadlab import ConfigError, DoesNotFitError, NoOffload, get_gpu, get_model, interval
from offloadlab.sim import EngineConfig, Roofline, layout, serving_memory, simulate, simulate_step
from offloadlab.sim.workload import fixed


def test_shard_of_70b_by_hand():
    s = get_model("llama-3.1-70b").shard(4)
    # per GPU: 16 of 64 query heads, 2 of 8 KV heads, 7168 of 28672 MLP columns, 32064 of 128256 vocab rows
    assert (s.heads, s.kv_heads, s.intermediate, s.vocab, s.tensor_parallel) == (16, 2, 7168, 32064, 4)
    layer = (16 * 128 + 2 * 2 * 128) * 8192 + 8192 * 16 * 128 + 2 * 7168 * 8192 + 8192 * 7168 + 2 * 8192
    assert s.layer_params == layer
    assert s.params == 80 * layer + 2 * 32064 * 8192 + 8192
    assert s.kv_bytes_per_token == 80 * 2 * 2 * 128 * 2  # K and V of 2 heads, bf16, 80 layers


def test_fewer_kv_heads_than_gpus_are_replicated():
    s = get_model("llama-3.1-405b").shard(16)
    assert s.kv_heads == 1 and s.heads == 8


@pytest.mark.parametrize("tp", [3, 0])
def test_bad_tensor_parallel(tp):
    with pytest.raises(ConfigError, match="tensor_parallel"):
        get_model("llama-3.1-70b").shard(tp)


def test_allreduce_time_by_hand():
    hw = get_gpu("h100")  # NVLink4, 450 GB/s per direction
    rf = Roofline(get_model("llama-3.1-70b").shard(8), hw)
    # ring all-reduce of 1024 tokens x 8192 x 2 bytes over 8 GPUs: 2*7/8 of the bytes per GPU + 14 hops
    assert rf.allreduce_time(1024) == pytest.approx(2 * 7 / 8 * 1024 * 8192 * 2 / 450e9 + 14 * 5e-6)
    assert Roofline(get_model("llama-3.1-70b"), hw).allreduce_time(1024) == 0
    # a GPU without NVLink all-reduces over PCIe: the ring's traffic at the measured 51% of the link's
    # 32 GB/s, 4.4 us a step (sim/costs.py PCIE_ALLREDUCE_RATE, PCIE_ALLREDUCE_HOP)
    l40s = Roofline(get_model("llama-3.1-8b").shard(2), get_gpu("l40s"))
    assert l40s.allreduce_time(1024) == pytest.approx(1 / 2 * 2 * 1024 * 4096 * 2 / (0.51 * 32e9) + 2 * 4.4e-6)


def test_gpus_behind_one_host_link_share_it():
    assert layout("llama-3.1-70b", "h100", 8).link_share == 2  # HGX: two GPUs per PCIe switch (catalog assumption)
    assert layout("llama-3.1-70b", "h100", 1, 2).link_share == 2  # two busy pipeline stages behind one switch
    assert layout("llama-3.1-70b", "h100", 1).link_share == 1
    assert layout("llama-3.1-70b", "a100-40gb", 4).link_share == 1  # Polaris: one x16 link per GPU
    rf = Roofline(get_model("llama-3.1-8b"), get_gpu("h100"), link_share=2)
    assert rf.transfer(1e9) == pytest.approx(10e-6 + 2e9 / get_gpu("h100").h2d_bw)


def test_memory_per_gpu_and_host_memory_for_the_node():
    eng = EngineConfig(tensor_parallel=4)
    mem = serving_memory("llama-3.1-70b", "h100", interval(4), eng)
    shard = get_model("llama-3.1-70b").shard(4)
    assert mem.weights_resident == shard.weight_total_bytes - 20 * shard.layer_bytes
    assert mem.host_offloaded == 4 * 20 * shard.layer_bytes  # every GPU pins its shard in the same host


def test_more_gpus_fit_what_one_cannot():
    with pytest.raises(DoesNotFitError):
        serving_memory("llama-3.1-70b", "h100", NoOffload(), EngineConfig())
    assert serving_memory("llama-3.1-70b", "h100", NoOffload(), EngineConfig(tensor_parallel=2)).kv_tokens > 8192


def test_node_limit_and_model_that_fits_no_node():
    with pytest.raises(ConfigError, match="at most the 4 GPUs"):
        serving_memory("llama-3.1-8b", "a100-40gb", NoOffload(), EngineConfig(tensor_parallel=8))
    # 405B on a Polaris node (4 x A100-40GB, 512 GB host): offloading every layer overflows the host
    # (748 GiB of shards, 1008 GiB once pinned), offloading half overflows the GPUs
    with pytest.raises(DoesNotFitError, match="host memory"):
        serving_memory("llama-3.1-405b", "a100-40gb", interval(1, 2), EngineConfig(tensor_parallel=4))
    with pytest.raises(DoesNotFitError, match="does not fit"):
        serving_memory("llama-3.1-405b", "a100-40gb", interval(2), EngineConfig(tensor_parallel=4))
    # on 8 x H200 it fits without offload
    assert serving_memory("llama-3.1-405b", "h200", NoOffload(), EngineConfig(tensor_parallel=8)).kv_tokens > 8192


def test_tensor_parallel_serving_scales_throughput():
    wl = fixed(32, 1024, 64)
    one = simulate("llama-3.1-8b", "h100", NoOffload(), wl, EngineConfig()).summary
    four = simulate("llama-3.1-8b", "h100", NoOffload(), wl, EngineConfig(tensor_parallel=4)).summary
    assert one["throughput_rps"] < four["throughput_rps"] < 4 * one["throughput_rps"]
    assert four["output_tok_s_per_gpu"] == pytest.approx(four["output_tok_s"] / 4)


def test_measured_copy_rate_is_shared_too(probe_path):
    """Calibrated costs split the measured host link among the GPUs behind it, as the roofline does."""
    from offloadlab.sim import simulate_step

    shard = get_model("llama-3.1-8b").shard(2)  # 2 GPUs of an HGX H100 share one PCIe switch
    one = simulate_step("llama-3.1-8b", "h100", interval(2), new_tokens=64, profile=probe_path)
    two = simulate_step("llama-3.1-8b", "h100", interval(2), new_tokens=64, profile=probe_path, tensor_parallel=2)
    # each GPU copies half the bytes at half the rate: the same copy time per step
    assert two.busy["copy"] == pytest.approx(one.busy["copy"] * shard.layer_bytes * 2 / get_model("llama-3.1-8b").layer_bytes,
                                             rel=0.01)


# ---- pipeline parallelism ----

@pytest.mark.parametrize("layers,pp,sizes", [(61, 2, [31, 30]), (61, 4, [15, 15, 16, 15]), (80, 3, [27, 27, 26]),
                                             (22, 4, [5, 6, 6, 5]), (32, 4, [8, 8, 8, 8])])
def test_stage_sizes_as_vllm_splits_layers(layers, pp, sizes):
    """vLLM's get_pp_indices: even split, remainder to the stages before the last, from the back."""
    m = get_model("llama-3.1-8b").replace(layers=layers)
    st = m.stages(pp)
    assert [s.layers for s in st] == sizes
    assert [s.stage for s in st] == list(range(pp)) and {s.pipeline_parallel for s in st} == {pp}


@settings(max_examples=60, deadline=None)
@given(layers=st.integers(1, 130), pp=st.integers(1, 16), tied=st.booleans(), tp=st.sampled_from([1, 2, 4, 8]))
def test_stages_hold_the_whole_model_once(layers, pp, tied, tp):
    """Every layer on exactly one stage; embedding on the first, head and norm on the last (a tied
    head is the embedding, held again by a last stage that is not the first)."""
    assume(pp <= layers)
    m = get_model("llama-3.1-70b").replace(layers=layers, tied_embeddings=tied).shard(tp)
    st = m.stages(pp)
    assert sum(s.layers for s in st) == layers
    assert max(s.layers for s in st) - min(s.layers for s in st) <= 1
    extra = m.embedding_params if tied and pp > 1 else 0
    assert sum(s.params for s in st) == m.params + extra
    assert sum(s.kv_bytes_per_token for s in st) == m.kv_bytes_per_token
    assert [s.has_head for s in st] == [False] * (pp - 1) + [True]


def test_stage_non_layer_params_by_hand():
    first, mid, last = get_model("llama-3.1-8b").stages(3)
    assert first.non_layer_params == 128256 * 4096  # the embedding
    assert mid.non_layer_params == 0
    assert last.non_layer_params == 128256 * 4096 + 4096  # LM head and final norm


@pytest.mark.parametrize("pp", [0, 33, 2.0, True])
def test_bad_pipeline_parallel(pp):
    with pytest.raises(ConfigError, match="pipeline_parallel"):
        get_model("llama-3.1-8b").stages(pp)


def test_layout_nodes_and_sends_by_hand():
    lay = layout("llama-3.1-405b", "h100", 8, 2)  # two HGX H100 nodes
    assert (lay.gpus, lay.nodes, lay.node_of(0), lay.node_of(1)) == (16, 2, 0, 1)
    # 1024 tokens x 16384 hidden x 2 bytes over a 50 GB/s (400 Gb/s) NIC, 5 us latency
    assert lay.send_time(0, 1024) == pytest.approx(5e-6 + 1024 * 16384 * 2 / 50e9)
    inside = layout("llama-3.1-70b", "h100", 2, 4)  # one node: NVLink4, 450 GB/s
    assert inside.nodes == 1 and inside.send_time(2, 1024) == pytest.approx(10e-6 + 1024 * 8192 * 2 / 450e9)
    polaris = layout("llama-3.1-405b", "a100-40gb", 4, 4)  # 4 Polaris nodes, 12.5 GB/s per GPU between them
    assert polaris.nodes == 4 and polaris.send_time(0, 1000) == pytest.approx(5e-6 + 1000 * 16384 * 2 / 12.5e9)
    with pytest.raises(ConfigError, match="straddle"):
        layout("llama-3.1-8b", get_gpu("h100").replace(gpus_per_node=6), 4, 2)
    with pytest.raises(ConfigError, match="tensor_parallel"):
        layout("llama-3.1-8b", "a100-40gb", 8, 1)


def test_pipeline_memory_per_gpu_and_per_node():
    eng = EngineConfig(pipeline_parallel=2)
    mem = serving_memory("llama-3.1-70b", "h100", NoOffload(), eng)
    first, last = get_model("llama-3.1-70b").stages(2)
    # the last stage holds the head and its logits: fewer KV tokens; that stage is reported
    assert mem.weights_resident == last.weight_total_bytes
    assert mem.kv_tokens == min(serving_memory(s, "h100", NoOffload(), EngineConfig()).kv_tokens
                                for s in (first, last))
    # interval(2) pins 20 layers per GPU, 40 on the node, rounded up to powers of two each
    off = serving_memory("llama-3.1-70b", "h100", interval(2), eng)
    assert off.host_offloaded == 40 * first.layer_bytes
    assert off.host_pinned == interval(2).place(first).host_pinned_bytes + interval(2).place(last).host_pinned_bytes
    # two stages of 4 GPUs on one HGX node: each stage's pins fit the host, the node's do not
    stage = get_model("llama-3.1-405b").shard(4).stages(2)[0]
    one_stage = 4 * interval(1, 2).place(stage).host_pinned_bytes
    hw = get_gpu("h100").replace(host_memory_bytes=1.5 * one_stage)
    with pytest.raises(DoesNotFitError, match="on node 0"):
        serving_memory("llama-3.1-405b", hw, interval(1, 2), EngineConfig(tensor_parallel=4, pipeline_parallel=2))
    # on two nodes (tp=8: a stage per node) each node holds one stage's pins
    spread = serving_memory("llama-3.1-405b", hw, interval(1, 2), EngineConfig(tensor_parallel=8, pipeline_parallel=2))
    eighth = get_model("llama-3.1-405b").shard(8).stages(2)[0]  # 63 layers, as the other stage
    assert spread.host_pinned == 8 * interval(1, 2).place(eighth).host_pinned_bytes
    with pytest.raises(ConfigError, match="placement"):
        serving_memory("llama-3.1-70b", "h100", interval(2).place(first), eng)


def test_one_request_takes_the_pipeline_pass():
    """Alone, a request's prefill goes through every stage and the sends between them, one after the other."""
    wl = fixed(1, 2048, 1)
    r = simulate("llama-3.1-70b", "h100", interval(4), wl, EngineConfig(pipeline_parallel=2, mode="prefill-only"))
    step = simulate_step("llama-3.1-70b", "h100", interval(4), new_tokens=2048, pipeline_parallel=2)
    assert r.requests["first_token"].iloc[0] == pytest.approx(step.time, rel=2e-3)
    one = simulate_step("llama-3.1-70b", "h100", interval(4), new_tokens=2048, pipeline_parallel=1)
    assert step.time > one.time / 2  # each GPU runs half the layers, but one after the other


def test_pipeline_overlaps_steps_of_its_virtual_engines():
    """N one-request prefills on 2 stages: the slower (last, with the head) stage bounds the rate, so the
    makespan is stage0 + send + N x stage1, not N full passes."""
    n, prompt = 12, 1024
    eng = EngineConfig(pipeline_parallel=2, mode="prefill-only", max_num_seqs=1)
    r = simulate("llama-3.1-8b", "h100", NoOffload(), fixed(n, prompt, 1), eng)
    step = simulate_step("llama-3.1-8b", "h100", NoOffload(), new_tokens=prompt, pipeline_parallel=2)
    s0 = max(sp.end for sp in step.trace.spans if sp.gpu == 0 and sp.kind != "send")
    send = next(sp.end - sp.start for sp in step.trace.spans if sp.kind == "send")
    s1 = step.time - s0 - send
    assert s1 > s0 + send  # the head makes the last stage the bottleneck
    assert r.summary["makespan_s"] == pytest.approx(s0 + send + n * s1, rel=2e-3)
    assert r.summary["makespan_s"] < 0.6 * n * step.time


def test_pipeline_splits_the_kv_cache_among_virtual_engines():
    """vLLM V0 gives each of the pp schedulers 1/pp of the KV blocks: a request larger than that share
    is refused even though the whole cache would hold it."""
    eng = EngineConfig(pipeline_parallel=4, max_model_len=131072, max_num_batched_tokens=131072, chunked_prefill=True)
    kv = serving_memory("llama-3.1-70b", "h100", NoOffload(), eng).kv_tokens
    share = kv // 16 // 4 * 16
    assert share < 120000 < kv
    with pytest.raises(DoesNotFitError, match="virtual engines"):
        simulate("llama-3.1-70b", "h100", NoOffload(), fixed(1, 120000, 10), eng)
    r = simulate("llama-3.1-70b", "h100", NoOffload(), fixed(1, share // 2, 10), eng)
    assert r.requests["finish"].notna().all()


def test_pipeline_serving_is_deterministic_and_serves_everything():
    wl = fixed(40, 512, 32)
    eng = EngineConfig(tensor_parallel=2, pipeline_parallel=2)
    a = simulate("llama-3.1-70b", "h100", interval(4), wl, eng)
    b = simulate("llama-3.1-70b", "h100", interval(4), wl, eng)
    assert a.summary == {**b.summary, "wall_s": a.summary["wall_s"]}
    assert a.requests["finish"].notna().all() and (a.requests["output_len"] == 32).all()
    assert a.config["gpus"] == 4 and a.summary["output_tok_s_per_gpu"] == pytest.approx(a.summary["output_tok_s"] / 4)
    assert 0 < a.summary["util_compute"] <= 1
    # one trace lane per virtual engine; each engine's own steps never overlap
    lanes = a.trace.to_frame().query("kind == 'step'").groupby("lane")
    assert set(lanes.groups) == {"engine 0", "engine 1"}
    for _, g in lanes:
        g = g.sort_values("start")
        assert (g["start"].to_numpy()[1:] >= g["end"].to_numpy()[:-1] - 1e-12).all()


@settings(max_examples=25, deadline=None)
@given(pp=st.integers(1, 4), chunked=st.booleans(),
       reqs=st.lists(st.tuples(st.integers(1, 3000), st.integers(1, 64), st.floats(0, 2.0)), min_size=1, max_size=24))
def test_pipelined_serving_serves_every_request_in_order_of_its_tokens(pp, chunked, reqs):
    """Any workload on any pipeline depth: every request gets all its tokens, first token after arrival,
    last after first, and no later than the run's end."""
    from offloadlab.sim.workload import Request, Workload

    wl = Workload("random", tuple(Request(i, p, o, a) for i, (p, o, a) in enumerate(reqs)))
    eng = EngineConfig(pipeline_parallel=pp, chunked_prefill=chunked, max_num_batched_tokens=4096)
    r = simulate("llama-3.1-8b", "h100", interval(4), wl, eng)
    q = r.requests
    assert len(q) == len(reqs) and (q["output_len"] == [o for _, o, _ in reqs]).all()
    assert (q["first_token"] > q["arrival"]).all() and (q["finish"] >= q["first_token"]).all()
    assert q["finish"].max() <= r.summary["makespan_s"] + q["arrival"].min() + 1e-9
