"""vLLM offload flags <-> Policy, UVA and parameter filters in the simulator."""
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from offloadlab import ConfigError, get_gpu, get_model
from offloadlab.cli import main
from offloadlab.policy import NoOffload, Prefetch, VllmCopy, VllmUva, interval
from offloadlab.sim import simulate_step
from offloadlab.vllm_flags import format_vllm, policy_from_vllm, unmodelled_flags, vllm_args

M8 = get_model("llama-3.1-8b")
PARAMS = st.sampled_from([(), ("gate_up_proj",), ("mlp",), ("self_attn.qkv_proj", "down_proj")])


@settings(max_examples=60, deadline=None)
@given(st.one_of(
    st.just(NoOffload()),
    st.builds(VllmCopy, st.floats(0.25, 12).map(lambda x: round(x, 3)), PARAMS),
    st.builds(VllmUva, st.floats(0.25, 12).map(lambda x: round(x, 3)), PARAMS),
    st.integers(1, 8).flatmap(lambda g: st.builds(Prefetch, st.just(g), st.integers(1, g), st.integers(1, 4), PARAMS,
                                                  st.just(True))),
))
def test_flags_round_trip(policy):
    args, env = vllm_args(policy)
    assert policy_from_vllm(args, env) == policy
    assert policy_from_vllm(format_vllm(policy)) == policy  # the shell line, environment first


def test_auto_backend_and_defaults_follow_vllm():
    assert policy_from_vllm("--cpu-offload-gb 8") == VllmUva(8.0)
    assert policy_from_vllm("--cpu-offload-gb 8", env={"VLLM_WEIGHT_OFFLOADING_DISABLE_UVA": "1"}) == VllmCopy(8.0)
    assert policy_from_vllm("--offload-group-size 2") == Prefetch(2, 1, 1, wrap=True)  # defaults: n=1, s=1
    assert policy_from_vllm("vllm serve meta-llama/Llama-3.1-8B --max-model-len 8192") == NoOffload()
    # the paper's interval k=2 deploys as vLLM's prefetch backend, which also prefetches across steps
    assert policy_from_vllm(format_vllm(interval(2, 2))) == Prefetch(2, 1, 2, wrap=True)


@pytest.mark.parametrize("flags,field", [
    ("--offload-group-size 2 --offload-num-in-group 3", "--offload-num-in-group"),
    ("--offload-group-size 4 --offload-prefetch-step 0", "--offload-prefetch-step"),
    ("--offload-num-in-group 2", "--offload-num-in-group"),
    ("--offload-backend prefetch", "--offload-group-size"),
    ("--cpu-offload-gb -1", "--cpu-offload-gb"),
    ("--offload-backend magic", "--vllm --offload-backend"),
    ("--offload-group-size two", "--vllm --offload-group-size"),
])
def test_combinations_vllm_rejects(flags, field):
    with pytest.raises(ConfigError, match=field):
        policy_from_vllm(flags)


def test_offload_larger_than_the_model_is_rejected_at_placement():
    with pytest.raises(ConfigError, match="cpu_offload_gb"):
        policy_from_vllm("--cpu-offload-gb 100").place(M8)
    # a parameter filter shrinks what may be offloaded: gate_up is 234,881,024 bytes x 32 layers = 7 GiB
    with pytest.raises(ConfigError, match="7.00 GiB"):
        VllmUva(7.5, params=("gate_up_proj",)).place(M8)
    with pytest.raises(ConfigError, match="params"):
        VllmUva(1, params=("gate",)).place(M8)  # segments match whole, like vLLM's


def test_parameter_filter_offloads_only_matching_parameters():
    pl = Prefetch(4, 1, 2, params=("mlp",)).place(M8)
    mlp = 2 * 14336 * 4096 * 2 + 4096 * 14336 * 2
    assert all(pl.names[i] == ("mlp.gate_up_proj.weight", "mlp.down_proj.weight") for i in pl.offloaded_layers)
    assert pl.offloaded_bytes == 8 * mlp and pl.staging_bytes == 2 * mlp
    uva = VllmUva(1.0, params=("down_proj",)).place(M8)
    assert {n for names in uva.names for n in names} == {"mlp.down_proj.weight"}


def test_pinned_host_memory_is_rounded_to_powers_of_two():
    pl = VllmCopy(0.4).place(get_model("llama-3.1-8b"))  # layer 0: qkv, o, gate_up, down (and the norms)
    sizes = pl.offloaded[0]
    assert pl.host_pinned_bytes == sum(1 << (b - 1).bit_length() for b in sizes)
    # 50.3 MB -> 64 MiB, 33.5 MB stays 32 MiB, 235 MB -> 256 MiB, 117 MB -> 128 MiB
    assert pl.host_pinned_bytes >= 1.15 * pl.offloaded_bytes
    flat = interval(2).place(M8)  # one flat 436 MB tensor per layer -> 512 MiB each
    assert flat.host_pinned_bytes == 16 * 512 * 1024**2


def test_uva_reads_weights_over_the_link_every_step():
    # decode: the GPU is done in well under a millisecond per layer, so UVA layers are link-bound
    uva = simulate_step("llama-3.1-8b", "h100", VllmUva(6.5), batch=8, new_tokens=1, context=1024)
    none = simulate_step("llama-3.1-8b", "h100", NoOffload(), batch=8, new_tokens=1, context=1024)
    link_time = 16 * M8.layer_bytes / get_gpu("h100").h2d_bw
    assert uva.time == pytest.approx(none.time + link_time, rel=0.05)
    assert uva.busy["link"] == pytest.approx(link_time, rel=0.01) and uva.busy["copy"] == 0
    # a long prefill computes longer than it reads: UVA costs (almost) nothing
    pre_uva = simulate_step("llama-3.1-8b", "h100", VllmUva(6.5), new_tokens=16384)
    pre_none = simulate_step("llama-3.1-8b", "h100", NoOffload(), new_tokens=16384)
    assert pre_uva.time == pytest.approx(pre_none.time, rel=0.01)


def test_cli_accepts_vllm_flags(capsys):
    assert main(["run", "--requests", "5", "--vllm", "--offload-group-size 4 --offload-prefetch-step 2"]) == 0
    out = capsys.readouterr().out
    assert "vllm-prefetch g=4 n=1 s=2" in out and "--offload-group-size 4" in out
    assert main(["run", "--vllm", "--offload-group-size 2 --offload-num-in-group 3"]) == 2
    assert "--offload-num-in-group=3" in capsys.readouterr().err


@settings(max_examples=40, deadline=None)
@given(g=st.integers(1, 5), n=st.integers(1, 5), s=st.integers(1, 3), layers=st.integers(2, 10),
       gpu=st.floats(1e-4, 1e-2), host=st.floats(1e-5, 1e-2), bw=st.floats(1e8, 1e11), head=st.floats(0, 1e-2))
def test_prefetching_across_steps_is_never_slower(g, n, s, layers, gpu, host, bw, head):
    from offloadlab.sim import LayerCost, simulate_layers

    n = min(n, g)
    m = get_model("llama-3.2-1b").replace(layers=layers)
    cost = LayerCost(gpu, host, 0.0)
    tr = lambda b: 1e-5 + b / bw
    plain = simulate_layers(Prefetch(g, n, s).place(m), cost, head, tr)
    wrapped = simulate_layers(Prefetch(g, n, s, wrap=True).place(m), cost, head, tr, wrap=True)
    assert wrapped.time <= plain.time * (1 + 1e-9)
    assert wrapped.busy["copy"] == pytest.approx(plain.busy["copy"])  # the same copies, per step
    # and never faster than its copies or its compute
    assert wrapped.time >= max(plain.busy["copy"], layers * gpu + head) * (1 - 1e-9)


def test_engine_flags_of_a_vllm_command_line():
    from offloadlab.vllm_flags import engine_from_vllm

    line = ("VLLM_WEIGHT_OFFLOADING_DISABLE_UVA=1 vllm serve meta-llama/Llama-3.1-70B -tp 4 --pipeline-parallel-size 2 "
            "--gpu-memory-utilization 0.85 --max-model-len 16384 --max-num-seqs 128 --max-num-batched-tokens 4096 "
            "--block-size 32 --enable-chunked-prefill --kv-cache-dtype fp8 --cpu-offload-gb 8 --swap-space 4")
    assert engine_from_vllm(line) == dict(tensor_parallel=4, pipeline_parallel=2, gpu_memory_utilization=0.85,
                                          max_model_len=16384, max_num_seqs=128, max_num_batched_tokens=4096,
                                          block_size=32, chunked_prefill=True, kv_cache_dtype="fp8")
    assert engine_from_vllm("--no-enable-chunked-prefill") == {"chunked_prefill": False}
    assert engine_from_vllm("--cpu-offload-gb 8") == {}  # nothing set: the caller's defaults stand
    with pytest.raises(ConfigError, match="did you mean --max-model-len"):  # a prefix: the whole name, please
        engine_from_vllm("--max-model 4096")
    # vLLM's parser takes underscores for dashes in flag names (vllm/utils/argparse_utils.py)
    assert engine_from_vllm("--max_model_len=4096 --gpu_memory_utilization 0.8") == {
        "max_model_len": 4096, "gpu_memory_utilization": 0.8}
    assert policy_from_vllm("--cpu_offload_gb 8 --offload_backend uva") == VllmUva(8.0)
    assert unmodelled_flags("--enforce_eager --port=8000 --offload-group-size 2") == ["--enforce-eager", "--port"]
    with pytest.raises(ConfigError, match="--vllm --tensor-parallel-size='four': expected an integer"):
        engine_from_vllm("-tp four")


def test_format_vllm_adds_the_parallel_sizes():
    from offloadlab.sim import EngineConfig

    pol = policy_from_vllm("--cpu-offload-gb 8")
    assert format_vllm(pol, EngineConfig(tensor_parallel=4, pipeline_parallel=2)) == (
        "vllm serve MODEL --tensor-parallel-size 4 --pipeline-parallel-size 2 --cpu-offload-gb 8.0 --offload-backend uva")
    assert format_vllm(pol, EngineConfig()) == format_vllm(pol)
