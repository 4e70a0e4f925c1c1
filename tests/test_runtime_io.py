"""The runtime's inputs and outputs on CPU: checkpoints, workloads, the microbenchmark's Profile,
the probe file."""
import json
import sys
from types import SimpleNamespace

import pytest

torch = pytest.importorskip("torch")

from offloadlab import ConfigError, ModelSpec  # noqa: E402
from offloadlab.policy import NoOffload, interval  # noqa: E402
from offloadlab.profile import Profile  # noqa: E402
from offloadlab.runtime import Tracer, build, run_workload  # noqa: E402
from offloadlab.runtime import microbench, probe  # noqa: E402

torch.set_num_threads(1)

SPEC = ModelSpec("tiny", layers=4, hidden=64, heads=4, kv_heads=2, head_dim=16, intermediate=128, vocab=256,
                 max_context=512)


def _logits(model, ids=((5, 17, 33, 2),)):
    from offloadlab.runtime.generate import prefill

    with torch.inference_mode():
        return prefill(model, [list(i) for i in ids], 8)[0]


# ---- checkpoints ----


@pytest.fixture
def checkpoint(tmp_path):
    pytest.importorskip("safetensors")
    from offloadlab.runtime import save_hf_checkpoint

    model = build(SPEC, NoOffload(), "cpu", seed=7)
    save_hf_checkpoint(model, tmp_path / "model.safetensors")
    return tmp_path, model


@pytest.mark.parametrize("policy", [NoOffload(), interval(2, 1)], ids=["none", "interval2"])
def test_checkpoint_round_trip_gives_the_same_model(checkpoint, policy):
    path, model = checkpoint
    loaded = build(SPEC, policy, "cpu", checkpoint=path)
    assert torch.equal(_logits(loaded), _logits(model))


def test_checkpoint_with_wrong_shape_fails_naming_the_tensor(checkpoint):
    path, _ = checkpoint
    with pytest.raises(ConfigError, match=r"model\.embed_tokens\.weight.*\(256, 64\)"):
        build(SPEC.replace(hidden=64, vocab=512), NoOffload(), "cpu", checkpoint=path)
    with pytest.raises(ConfigError, match="self_attn.q_proj.weight"):
        build(SPEC.replace(heads=8, kv_heads=2), NoOffload(), "cpu", checkpoint=path)


def test_checkpoint_layer_count_and_config_json_are_checked(checkpoint):
    path, model = checkpoint
    two = SPEC.replace(layers=2)
    with pytest.raises(ConfigError, match="checkpoint layers=4.*truncate=True"):
        build(two, NoOffload(), "cpu", checkpoint=path)
    assert build(two, NoOffload(), "cpu", checkpoint=path, truncate=True).spec.layers == 2
    (path / "config.json").write_text(json.dumps({"hidden_size": 128, "rope_theta": 10000.0}))
    with pytest.raises(ConfigError, match="hidden_size=128"):
        build(SPEC, NoOffload(), "cpu", checkpoint=path)
    (path / "config.json").write_text(json.dumps({"hidden_size": 64, "rope_theta": 10000.0, "rms_norm_eps": 1e-6}))
    loaded = build(SPEC, NoOffload(), "cpu", checkpoint=path)
    assert loaded.arch.rope_theta == 10000.0 and loaded.arch.norm_eps == 1e-6


def test_checkpoint_missing_or_without_safetensors_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "safetensors", None)
    with pytest.raises(ConfigError, match="pip install safetensors"):
        build(SPEC, NoOffload(), "cpu", checkpoint=tmp_path)


def test_checkpoint_path_without_files_is_a_clear_error(tmp_path):
    pytest.importorskip("safetensors")
    with pytest.raises(ConfigError, match="safetensors file"):
        build(SPEC, NoOffload(), "cpu", checkpoint=tmp_path)


# ---- workloads ----


def test_run_workload_reports_the_simulators_metrics():
    lengths = [(5, 3), (9, 1), (4, 4), (7, 2), (3, 2)]
    reqs = [SimpleNamespace(prompt_len=p, output_len=o, arrival=0.0) for p, o in lengths]
    model = build(SPEC, interval(2), "cpu")
    tracer = Tracer(model.dev)
    res = run_workload(model, reqs, batch_size=2, tracer=tracer)
    f = res.requests
    assert list(f.id) == [0, 1, 2, 3, 4] and list(f.batch) == [0, 0, 1, 1, 2]
    assert (f.ttft > 0).all() and (f.e2e >= f.ttft).all()
    assert f.tpot.isna().tolist() == [False, True, False, False, False]  # one output token: no TPOT
    assert res.summary["requests"] == 5 and res.summary["throughput_rps"] > 0
    assert {"ttft_mean_s", "tpot_p90_s", "e2e_p99_s", "output_tok_s"} <= set(res.summary)
    assert len(res.trace.requests) == 5
    # 3 batches: prefill + (longest output - 1) decode steps each
    assert res.trace.to_frame().step.max() + 1 == (1 + 2) + (1 + 3) + (1 + 1)


def test_run_workload_takes_the_simulators_workloads():
    workload = pytest.importorskip("offloadlab.sim.workload")
    res = run_workload(build(SPEC, NoOffload(), "cpu"), workload.fixed(3, 6, 2), batch_size=3)
    assert len(res.requests) == 3 and (res.requests.prompt_len == 6).all() and (res.requests.output_len == 2).all()


def test_run_workload_bad_input():
    model = build(SPEC, NoOffload(), "cpu")
    with pytest.raises(ConfigError, match="batch_size"):
        run_workload(model, [SimpleNamespace(prompt_len=3, output_len=2, arrival=0.0)], batch_size=0)
    with pytest.raises(ConfigError, match="prompt_len, output_len and arrival"):
        run_workload(model, [object()])
    with pytest.raises(ConfigError, match="sum <= 512"):
        run_workload(model, [SimpleNamespace(prompt_len=500, output_len=20, arrival=0.0)])


# ---- microbenchmark and probe ----


def test_microbench_writes_a_profile_that_loads(tmp_path):
    out = tmp_path / "profile.json"
    assert microbench.main(["--tiny", "--device", "cpu", "--reps", "1", "--out", str(out), "--quiet"]) == 0
    prof = Profile.load(out)
    assert prof.model == "tiny-llama" and prof.layers == microbench.TINY.layers
    assert [r[:3] for r in prof.layer_times] == [tuple(g) for g in microbench.CPU_GRID]
    assert all(r[3] > 0 for r in prof.layer_times) and len(prof.h2d) == len(microbench.CPU_SIZES_MIB)
    assert prof.copy_slowdown == 1.0 and prof.launch_per_layer is None
    assert prof.meta["torch"] == torch.__version__ and "device" in prof.meta
    # the UVA GEMM ran by token rows on the down_proj shape; on CPU it is not a link rate: meta only
    down = microbench.TINY.hidden * microbench.TINY.intermediate * 2  # the model dtype (bf16)
    assert [r[:2] for r in prof.meta["uva_gemm_cpu"]] == [[m, down] for m in microbench.CPU_UVA_TOKENS]
    assert prof.uva_gemm == ()


def test_uva_gemm_rows_by_tokens_round_trip_through_a_profile_file(tmp_path):
    from offloadlab.runtime.device import resolve_device

    rows = microbench.uva_gemm_times(resolve_device("cpu"), 32, 64, tokens=(1, 4, 16), reps=1, dtype=torch.float32)
    assert [(m, b) for m, b, _ in rows] == [(1, 32 * 64 * 4), (4, 32 * 64 * 4), (16, 32 * 64 * 4)]
    assert all(sec > 0 for *_, sec in rows)
    prof = Profile(h2d=((1 << 20, 1e10),), layer_times=((1, 1, 0, 1e-4),), uva_gemm=tuple(rows))
    assert Profile.load(prof.save(tmp_path / "p.json")).uva_gemm == tuple(rows)


def test_microbench_bad_input_is_a_clean_error(tmp_path, capsys):
    assert microbench.main(["--model", "no-such-model", "--device", "cpu", "--out", str(tmp_path / "p.json")]) == 2
    assert "unknown model" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        microbench.main(["--tiny", "--grid", "1,2"])


def test_microbench_without_cuda_asks_for_a_device_before_measuring(tmp_path, monkeypatch, capsys):
    """The default is a GPU; without one, a whole model's layers on the CPU would take minutes and its RAM."""
    monkeypatch.setattr(microbench.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(microbench, "run", lambda *a, **k: pytest.fail("measured without a device"))
    assert microbench.main(["--out", str(tmp_path / "p.json")]) == 2
    assert "device=None: expected a CUDA device" in capsys.readouterr().err
    assert not (tmp_path / "p.json").exists()


@pytest.mark.parametrize("where", ["dir", "under_file", "empty"])
def test_microbench_checks_its_out_path_before_measuring(tmp_path, monkeypatch, capsys, where):
    """Minutes of measuring must not end in a path that cannot be written."""
    (tmp_path / "f").write_text("x")
    out = {"dir": str(tmp_path), "under_file": str(tmp_path / "f" / "p.json"), "empty": " "}[where]
    monkeypatch.setattr(microbench, "run", lambda *a, **k: pytest.fail("measured before checking --out"))
    assert microbench.main(["--tiny", "--device", "cpu", "--out", out]) == 2
    err = capsys.readouterr().err
    assert f"--out={out!r}" in err and err.count("\n") == 1
    assert sorted(q.name for q in tmp_path.iterdir()) == ["f"]


def test_probe_file_has_the_public_format(tmp_path):
    data = probe.measure(SPEC, "cpu", grid=((1, 8, 0), (2, 1, 8)), sizes_mib=(1,), reps=1,
                         policies=probe.default_policies(SPEC.layers))
    for key in ("gpu", "torch", "model", "layers", "layer_bytes", "layer_copy_ms", "h2d_bandwidth", "layer", "forward"):
        assert key in data
    assert data["layer_bytes"] == SPEC.layer_bytes and data["layers"] == SPEC.layers
    rows = data["forward"]
    assert {r["policy"] for r in rows} == {"resident", "sync_prefix", "async_k"}
    assert all(set(r) >= {"B", "T", "C", "policy", "param", "nbuf", "offloaded_layers", "ms"} for r in rows)
    assert {(r["param"], r["offloaded_layers"]) for r in rows if r["policy"] == "async_k"} >= {(2, 2), (4, 1)}
    path = probe.save(data, tmp_path / "probe.json")
    prof = Profile.load(path)  # the project's reader takes it
    assert prof.layers == SPEC.layers and len(prof.layer_times) == 2


def test_accelerate_cpu_offload_reference_computes_the_same_model():
    pytest.importorskip("accelerate")
    from offloadlab.runtime.gpu_check import accelerate_offload

    ref = _logits(build(SPEC, NoOffload(), "cpu"))
    model = build(SPEC, NoOffload(), "cpu")
    assert torch.equal(_logits(accelerate_offload(model, model.dev)), ref)
