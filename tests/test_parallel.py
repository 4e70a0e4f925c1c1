"""Tensor parallelism: per-GPU shards, all-reduce cost, shared host links, node limits."""
import pytest

from offloadlab import ConfigError, DoesNotFitError, NoOffload, get_gpu, get_model, interval
from offloadlab.sim import EngineConfig, Roofline, per_gpu, serving_memory, simulate
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
    # a GPU without NVLink all-reduces over PCIe
    l40s = Roofline(get_model("llama-3.1-8b").shard(2), get_gpu("l40s"))
    assert l40s.allreduce_time(1024) == pytest.approx(1 / 2 * 2 * 1024 * 4096 * 2 / 32e9 + 2 * 5e-6)


def test_gpus_behind_one_host_link_share_it():
    _, hw, link = per_gpu("llama-3.1-70b", "h100", 8)  # HGX: two GPUs per PCIe switch (catalog assumption)
    assert link.h2d_bw == pytest.approx(hw.h2d_bw / 2)
    _, hw, link = per_gpu("llama-3.1-70b", "a100-40gb", 4)  # Polaris: one x16 link per GPU
    assert link.h2d_bw == hw.h2d_bw


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
