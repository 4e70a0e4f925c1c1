"""vLLM offload flags <-> Policy, UVA and parameter filters in the simulator."""
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from offloadlab import ConfigError, get_gpu, get_model
from offloadlab.apps.cli import main
from offloadlab.policy import NoOffload, Prefetch, VllmCopy, VllmUva, interval
from offloadlab.sim import simulate_step
from offloadlab.vllm_flags import format_vllm, policy_from_vllm, unmodelled_flags, vllm_args

M8 = get_model("llama-3.1-8b")
PARAMS = st.sampled_from([(), ("gate_up_proj",), ("mlp",), ("self_attn.qkv_proj", "down_proj")])
PIN = st.booleans()


@settings(max_examples=60, deadline=None)
@given(st.one_of(
    st.just(NoOffload()),
    st.builds(VllmCopy, st.floats(0.25, 12).map(lambda x: round(x, 3)), PARAMS, PIN),
    st.builds(VllmUva, st.floats(0.25, 12).map(lambda x: round(x, 3)), PARAMS, PIN),
    st.integers(1, 8).flatmap(lambda g: st.builds(Prefetch, st.just(g), st.integers(1, g), st.integers(1, 4), PARAMS,
                                                  st.just(True), PIN)),
))
def test_flags_round_trip(policy):
    args, env = vllm_args(policy)
    assert policy_from_vllm(args, env) == policy
    assert policy_from_vllm(format_vllm(policy)) == policy  # the shell line, environment first
    assert policy_from_vllm(format_vllm(policy, vllm_version="0.29.0"), vllm_version="0.29.0") == policy


def test_auto_backend_and_defaults_follow_vllm():
    assert policy_from_vllm("--cpu-offload-gb 8") == VllmUva(8.0)
    assert policy_from_vllm("--cpu-offload-gb 8", env={"VLLM_WEIGHT_OFFLOADING_DISABLE_UVA": "1"}) == VllmCopy(8.0)
    assert policy_from_vllm("--offload-group-size 2") == Prefetch(2, 1, 1, wrap=True)  # defaults: n=1, s=1
    assert policy_from_vllm("vllm serve meta-llama/Llama-3.1-8B --max-model-len 8192") == NoOffload()
    # the paper's interval k=2 deploys as vLLM's prefetch backend, which also prefetches across steps
    assert policy_from_vllm(format_vllm(interval(2, 2))) == Prefetch(2, 1, 2, wrap=True)


def test_parameter_names_are_space_separated_like_vllms_nargs_plus():
    # vllm/engine/arg_utils.py: set[str] fields become nargs="+"; vLLM's own tests pass
    # `--offload-params gate_up_proj down_proj`
    pol = policy_from_vllm("--offload-group-size 4 --offload-params gate_up_proj down_proj --max-model-len 4096")
    assert pol == Prefetch(4, 1, 1, params=("gate_up_proj", "down_proj"), wrap=True)
    uva = policy_from_vllm("vllm serve M --cpu-offload-gb 2 --cpu-offload-params qkv_proj down_proj -tp 2")
    assert uva == VllmUva(2.0, params=("qkv_proj", "down_proj"))
    args, _ = vllm_args(pol)
    assert args[args.index("--offload-params"):] == ["--offload-params", "gate_up_proj", "down_proj"]
    assert "--cpu-offload-params qkv_proj down_proj" in format_vllm(uva)
    # a comma list is one name to vLLM, matching nothing: rejected with the reason
    with pytest.raises(ConfigError, match="--offload-params.*space-separated"):
        policy_from_vllm("--offload-group-size 4 --offload-params gate_up_proj,down_proj")
    with pytest.raises(ConfigError, match="--cpu-offload-params"):
        policy_from_vllm("--cpu-offload-gb 2 --cpu-offload-params qkv_proj,down_proj")


def test_num_in_group_without_a_group_size_is_accepted_and_ignored():
    # vllm/config/offload.py validates offload_num_in_group only once prefetch is enabled
    assert policy_from_vllm("--offload-num-in-group 2") == NoOffload()
    assert policy_from_vllm("--offload-num-in-group 3 --cpu-offload-gb 4") == VllmUva(4.0)


def test_deploy_lines_turn_off_the_v2_model_runner_where_it_ignores_offload():
    # vllm/config/vllm.py: V2 runner default for dense models from 0.25; it installs no offloader
    pol = VllmUva(4.0)
    assert format_vllm(pol).startswith("VLLM_USE_V2_MODEL_RUNNER=0 vllm serve MODEL")
    assert format_vllm(pol, vllm_version="0.25.1").startswith("VLLM_USE_V2_MODEL_RUNNER=0 ")
    assert format_vllm(pol, vllm_version="0.19.0") == "vllm serve MODEL --cpu-offload-gb 4.0 --offload-backend uva"
    assert format_vllm(NoOffload(), vllm_version="0.29") == "vllm serve MODEL"
    assert format_vllm(VllmCopy(4.0), vllm_version="0.19") == (
        "VLLM_WEIGHT_OFFLOADING_DISABLE_UVA=1 vllm serve MODEL --cpu-offload-gb 4.0")
    with pytest.raises(ConfigError, match="0.17"):
        format_vllm(interval(2), vllm_version="0.16.0")  # no prefetch backend before 0.17
    # a line that the version would silently not offload is refused, naming the fix
    with pytest.raises(ConfigError, match="VLLM_USE_V2_MODEL_RUNNER.*#51396"):
        policy_from_vllm("vllm serve M --cpu-offload-gb 4", vllm_version="0.26.0")
    with pytest.raises(ConfigError, match="VLLM_USE_V2_MODEL_RUNNER"):
        policy_from_vllm("VLLM_USE_V2_MODEL_RUNNER=1 vllm serve M --offload-group-size 2")
    assert policy_from_vllm("vllm serve M --cpu-offload-gb 4", vllm_version="0.24.0") == pol
    assert policy_from_vllm("VLLM_USE_V2_MODEL_RUNNER=0 vllm serve M --cpu-offload-gb 4", vllm_version="0.29") == pol
    assert policy_from_vllm(format_vllm(pol, vllm_version="0.29"), vllm_version="0.29") == pol
    assert policy_from_vllm("VLLM_USE_V2_MODEL_RUNNER=1 vllm serve M") == NoOffload()  # nothing to lose


@pytest.mark.parametrize("flags,field", [
    ("--offload-group-size 2 --offload-num-in-group 3", "--offload-num-in-group"),
    ("--offload-group-size 4 --offload-prefetch-step 0", "--offload-prefetch-step"),
    ("--offload-num-in-group 0", "--offload-num-in-group"),
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
    # the prefetch backend as released also pins each parameter (prefetch.py _CpuParamOffloader):
    # qkv 50.3 MB -> 64 MiB, o 32 MiB, gate_up 235 MB -> 256 MiB, down 117 MB -> 128 MiB, norms 8 KiB
    per_param = interval(2).place(M8)
    assert per_param.host_pinned_bytes == 16 * ((64 + 32 + 256 + 128) * 1024**2 + 2 * 8192)
    # newer vLLM packs a layer into one slab (slab.py): 436 MB < 2 GiB, one chunk -> 512 MiB
    assert Prefetch(2, 1, 2, slab=True).place(M8).host_pinned_bytes == 16 * 512 * 1024**2
    # VLLM_WEIGHT_OFFLOADING_DISABLE_PIN_MEMORY=1: exact sizes (UVA maps an exact cudaHostAlloc)
    exact = policy_from_vllm("VLLM_WEIGHT_OFFLOADING_DISABLE_PIN_MEMORY=1 vllm serve M --cpu-offload-gb 0.4")
    assert exact == VllmUva(0.4, pin_memory=False) and exact.place(M8).host_pinned_bytes == pl.offloaded_bytes
    assert "VLLM_WEIGHT_OFFLOADING_DISABLE_PIN_MEMORY=1" in format_vllm(exact)


def test_slab_chunks_follow_vllms_chunk_ranges():
    from offloadlab.policy import slab_chunks

    GiB, MiB = 1024**3, 1024**2
    assert slab_chunks(436_224_000) == [436_224_000]
    assert slab_chunks(4 * GiB) == [2 * GiB, 2 * GiB]
    assert slab_chunks(5 * GiB) == [2 * GiB, 2 * GiB, GiB]  # tail >= 128 MiB: kept
    # a 10 MiB tail becomes 128 MiB, taken from the chunk before it (build_slab_chunk_ranges)
    assert slab_chunks(4 * GiB + 10 * MiB) == [2 * GiB, 2 * GiB + 10 * MiB - 128 * MiB, 128 * MiB]
    for total in (1, 2 * GiB - 1, 2 * GiB + 1, 7 * GiB + 3):
        chunks = slab_chunks(total)
        assert sum(chunks) == total and all(0 < c <= 2 * GiB for c in chunks)


def test_uva_reads_weights_over_the_link_every_step():
    # decode: the GPU is done in well under a millisecond per layer, so UVA layers are link-bound
    uva = simulate_step("llama-3.1-8b", "h100", VllmUva(6.5), batch=8, new_tokens=1, context=1024)
    none = simulate_step("llama-3.1-8b", "h100", NoOffload(), batch=8, new_tokens=1, context=1024)
    link_time = 16 * M8.layer_bytes / get_gpu("h100").h2d_bw
    assert uva.time == pytest.approx(none.time + link_time, rel=0.05)
    assert uva.busy["link"] == pytest.approx(link_time, rel=0.01) and uva.busy["copy"] == 0
    # a prefill's GEMMs read each weight once per 64-token M-tile (sim/costs.py): 16384 tokens read
    # the offloaded 16 layers 256 times over the link, far slower than computing them
    pre_uva = simulate_step("llama-3.1-8b", "h100", VllmUva(6.5), new_tokens=16384)
    assert pre_uva.busy["link"] == pytest.approx(256 * link_time, rel=0.01)
    assert pre_uva.time > 10 * simulate_step("llama-3.1-8b", "h100", NoOffload(), new_tokens=16384).time


@settings(max_examples=30, deadline=None)
@given(tokens=st.lists(st.integers(1, 4096), min_size=2, max_size=4, unique=True), gib=st.sampled_from([2.0, 6.5]))
def test_uva_time_rises_with_tokens_per_step_on_a_fixed_offload(tokens, gib):
    from offloadlab.sim import Roofline

    lo, hi = sorted(tokens)[:2]
    t = [simulate_step("llama-3.1-8b", "h100", VllmUva(gib), new_tokens=n).busy["link"] for n in (lo, hi)]
    assert t[1] >= t[0] * (1 - 1e-9)
    cost = Roofline(M8, get_gpu("h100"))
    if cost.uva_reads(hi) > cost.uva_reads(lo):  # another M-tile: the weights cross the link again
        assert t[1] > t[0] * (1 + 0.9 * (cost.uva_reads(hi) - cost.uva_reads(lo)) / cost.uva_reads(lo))


def test_uva_reads_calibrate_from_a_measured_uva_gemm():
    from offloadlab.profile import Profile
    from offloadlab.sim import StepModel, StepShape, cost_model
    from offloadlab.sim.costs import uva_seconds_per_byte

    rows = ((1, 1e8, 0.005), (64, 1e8, 0.02), (256, 1e8, 0.08))  # seconds per 1e8-byte weight by M
    assert uva_seconds_per_byte(rows, 1) == pytest.approx(5e-11)
    assert uva_seconds_per_byte(rows, 8) == pytest.approx(5e-11 + 0.5 * 1.5e-10)  # log-interpolated
    assert uva_seconds_per_byte(rows, 1024) == pytest.approx(4 * 8e-10)  # beyond: one read per M-tile more
    prof = Profile(h2d=((1 << 20, 2e10), (1 << 30, 5e10)), layer_times=(), uva_gemm=rows, model="llama-3.1-8b",
                   gpu="H100-SXM5-80GB")
    cost = cost_model(M8, get_gpu("h100"), prof)
    pl = VllmUva(6.5).place(M8)
    for tokens in (1, 64, 256):
        res = StepModel(pl, cost, quantum=0).run(StepShape.uniform(1, tokens, 0))
        assert res.busy["link"] == pytest.approx(pl.offloaded_bytes * uva_seconds_per_byte(rows, tokens), rel=1e-9)
    with pytest.raises(ConfigError, match="uva_gemm"):
        Profile(h2d=((1, 1),), layer_times=(), uva_gemm=((0, 1e8, 0.1),))


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
        "VLLM_USE_V2_MODEL_RUNNER=0 vllm serve MODEL --tensor-parallel-size 4 --pipeline-parallel-size 2 "
        "--cpu-offload-gb 8.0 --offload-backend uva")
    assert format_vllm(pol, EngineConfig()) == format_vllm(pol)
