"""Calibration that transfers: efficiencies learnt against the measured GPU and model's roofline,
applied to another's; Vidur's profiles as a source; held-out checks; error bands and their coverage;
bad profiles as one-line errors before any simulation."""
import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from offloadlab import ConfigError, interval
from offloadlab.catalog import get_gpu, get_model
from offloadlab.apps.cli import main
from offloadlab.profile import Profile
from offloadlab.sim import Roofline, StepShape, cost_model, simulate, simulate_band, simulate_step, make_workload
from offloadlab.sim.costs import Corner
from offloadlab.validation import ProbeFile, error_summary, leave_one_shape_out, predict_probe

VIDUR = Path(__file__).parent / "data" / "vidur_a100"  # trimmed copy of shared/data/profiles
M8, M70 = get_model("llama-3.1-8b"), get_model("llama-3.1-70b")
H100, H200, A100, A100_80 = get_gpu("h100"), get_gpu("h200"), get_gpu("a100"), get_gpu("a100-80gb")


@pytest.fixture(scope="module")
def vidur():
    return Profile.from_vidur(VIDUR)


@pytest.fixture
def probe(probe_path):
    return Profile.load(probe_path)


# ---- what a profile measured ----

def test_profiles_name_their_model_and_gpu(probe, vidur):
    assert (probe.source_model().name, probe.source_model().layers, probe.source_gpu().name) == \
        ("llama-3.1-8b", 32, "H100-SXM5-80GB")
    assert probe.link_kind == "PCIe Gen5 x16"
    # Vidur's CSVs say the shape (Llama-3-8B = llama-3.1-8b's layer) and, by file name, the GPU
    assert (vidur.source_model().name, vidur.source_gpu().name) == ("llama-3.1-8b", "A100-SXM4-80GB")
    assert {k[0] for k in vidur.kernels} == {"qkv_proj", "o_proj", "gate_up_proj", "down_proj", "elementwise"}
    assert {n for _, n, _ in vidur.allreduce} == {2, 4, 8}


def test_vidur_gemms_read_weights_at_about_55_percent_of_hbm(vidur):
    """A measured fact the file must reproduce (units and column mapping): at 128 tokens the four
    GEMMs of an 8B layer read its 436 MB of weights at 50-60% of the A100-80GB's 2.04 TB/s."""
    t = sum(sec for op, tok, tp, sec in vidur.kernels if tok == 128 and tp == 1 and op != "elementwise")
    bw = M8.layer_matmul_params * 2 / t
    assert 0.5 < bw / A100_80.hbm_bw < 0.6, bw / A100_80.hbm_bw


def test_profile_with_kernels_and_shape_round_trips(tmp_path, vidur):
    p = dataclasses.replace(vidur, model="", model_shape=(("heads", 32), ("hidden", 4096), ("intermediate", 14336),
                                                           ("kv_heads", 8), ("head_dim", 128), ("vocab", 128256)))
    back = Profile.load(p.save(tmp_path / "v.json"))
    assert back == p and back.source_model().layer_bytes == M8.layer_bytes


# ---- transfer, not reuse ----

def test_same_gpu_and_model_keeps_the_probe_accuracy(probe_path):
    s = error_summary(predict_probe(probe_path))
    assert s["mape"] <= 0.021 and s["max_abs_error"] <= 0.055, s


def test_efficiency_not_time_is_transferred(probe):
    """At a measured shape, the 70B-on-H200 layer keeps the 8B-on-H100 ratio to its own roofline
    (the old reuse divided the 8B's time by the 70B's roofline)."""
    cal = cost_model(M70, H200, probe, cuda_graphs=False)
    src = Roofline(M8, H100, cuda_graphs=False)
    dst = Roofline(M70, H200, cuda_graphs=False)
    s = StepShape.uniform(1, 2048, 0)
    measured = next(sec for b, t, c, sec in probe.layer_times if (b, t, c) == (1, 2048, 0))
    assert cal.layer(s).gpu / dst.gpu_time(s) == pytest.approx(measured / src.gpu_time(s), rel=1e-9)
    # the example: compute of a 70B prefill step is no longer a third of the datasheet's
    step = simulate_step("llama-3.1-70b", "h200", interval(4), new_tokens=2048, profile=probe)
    roof = simulate_step("llama-3.1-70b", "h200", interval(4), new_tokens=2048)
    assert step.busy["compute"] >= roof.busy["compute"]


def test_copy_curve_kept_on_the_same_link_kind_else_datasheet_at_measured_efficiency(probe):
    same = cost_model(M8, H200, probe)  # H200: PCIe Gen5 x16 like the H100 measured
    own = cost_model(M8, H100, probe)
    assert same.transfer(M8.layer_bytes) == own.transfer(M8.layer_bytes)
    other = cost_model(M8, A100, probe)  # PCIe Gen4 x16: half the spec
    eff = own._rate / H100.host_link_bw
    assert other._rate == pytest.approx(A100.host_link_bw * eff) and 0.8 < eff < 0.9
    # launch time is the host's: kept across GPUs
    assert other.layer(StepShape.uniform(1, 2048, 0)).host == own.layer(StepShape.uniform(1, 2048, 0)).host


def test_sources_combine_nearest_first(probe, vidur):
    """A100-80GB target: compute from Vidur (that GPU), copies and launch from the probe (Vidur
    measured neither); the order the sources are given in does not matter."""
    a = cost_model(M8, A100_80, (probe, vidur))
    b = cost_model(M8, A100_80, (vidur, probe))
    s = StepShape.uniform(4, 128, 512)
    assert a.layer(s) == b.layer(s) and a.transfer(1e8) == b.transfer(1e8)
    assert a._compute.profile is vidur and a._copies.profile is probe and a._launch_src.profile is probe
    assert "A100 llama-3.1-8b" in a.describe() and "H100 llama-3.1-8b" in a.describe()
    # an H100 target takes compute from the H100 probe
    assert cost_model(M8, H100, (vidur, probe))._compute.profile is probe


def test_paper_scenario_runs_on_vidur_efficiencies(vidur):
    wl = make_workload("multi_news", n=20, seed=0)
    roof = simulate("llama-3.1-8b", "a100", None, wl).summary["throughput_rps"]
    meas = simulate("llama-3.1-8b", "a100", None, wl, profile=vidur).summary["throughput_rps"]
    assert meas < roof  # measured GEMMs are slower than the roofline's 80%-of-HBM assumption


# ---- held out: nothing of the target in the calibration ----

def test_leave_one_shape_out_on_the_probe(probe_path):
    s = error_summary(leave_one_shape_out(probe_path), exclude_eager_decode=True)
    assert s["rows"] == 38 and s["mape"] <= 0.05 and s["max_abs_error"] <= 0.15, s


def test_vidur_a100_predicts_the_h100_probe(probe_path, vidur):
    """Another GPU (A100 operator timings -> H100 stack), datasheets for the rest: the issue's
    cross-GPU target (MAPE <= 5%, worst <= 15%, eager resident decode rows excluded)."""
    df = predict_probe(probe_path, source=vidur)
    assert not df["calibration"].any()  # every row predicted
    s = error_summary(df, exclude_eager_decode=True)
    assert s["rows"] == 38 and s["mape"] <= 0.05 and s["max_abs_error"] <= 0.15, s


def test_tensor_parallel_shards_from_tp1_kernels(vidur):
    """Another model shape: tp-1 GEMM and elementwise efficiencies predict the tp-4 shard's layer
    (summed operators) at 128 tokens and up within BAND_TRANSFER_MODEL on most token counts."""
    tp1 = dataclasses.replace(vidur, kernels=tuple(k for k in vidur.kernels if k[2] == 1))
    m = M8.shard(4)
    cal = cost_model(m, A100_80, tp1)
    shapes = {n.split(".")[-2]: sh for n, sh in m.layer_param_shapes if len(sh) == 2}
    layer: dict = {}
    for op, t, tp, sec in vidur.kernels:
        if tp != 4 or t < 128:
            continue
        rf = cal.roofline
        pred = rf.elementwise_time(t) * cal._elementwise_ratio(t) if op == "elementwise" else \
            rf.gemm_time(shapes[op], t) * cal._gemm_ratio(shapes[op], t)
        acc = layer.setdefault(t, [0.0, 0.0])
        acc[0] += pred
        acc[1] += sec
    errs = sorted(abs(p / s - 1) for p, s in layer.values())
    assert len(errs) > 10 and errs[int(0.8 * len(errs))] <= 0.12, errs


# ---- error bands ----

def test_band_for_another_gpu_is_the_p90_of_the_stored_evidence(vidur):
    """BAND_TRANSFER_GPU is what moving GEMM efficiencies between the GPUs this project holds profiles of
    costs at the 90th percentile (validation/efficiency.py): neither narrower (overconfident, as the 8%
    it replaced was: an H100 profile moved to the RTX 4090 run missed its measured TTFT) nor padded."""
    from offloadlab.sim.costs import BAND_TRANSFER_GPU
    from offloadlab.validation.efficiency import gemm_efficiency, stored_profiles, transfer_errors

    profiles = {**stored_profiles(), vidur.gpu: vidur}
    assert len(profiles) >= 6, sorted(profiles)
    errs = [abs(e) for *_, e in transfer_errors(profiles)]
    assert len(errs) >= 5 * 4 * 6
    p90 = float(np.quantile(errs, 0.9))
    assert p90 <= BAND_TRANSFER_GPU <= 1.1 * p90, (p90, BAND_TRANSFER_GPU)
    # a profile's efficiency on its own GPU is 1 x itself: no error without a transfer
    assert all(e == 0 for a, b, _, e in transfer_errors({"x": vidur, "y": vidur}))
    assert set(gemm_efficiency(vidur)) == {1, 8, 32, 128, 512, 2048}


def _coverage(df, exclude=True):
    return error_summary(df, exclude_eager_decode=exclude)


def test_bands_cover_the_development_data_at_the_stated_rate(probe_path, vidur):
    """Bands aim to hold the measured value 90% of the time: on the probe predicted from itself,
    held out by shape, and from another GPU; and they widen with the distance of the transfer."""
    own, held, other = predict_probe(probe_path), leave_one_shape_out(probe_path), predict_probe(probe_path, source=vidur)
    for df in (own, held, other):
        assert _coverage(df)["coverage"] >= 0.9, _coverage(df)
    datasheet = predict_probe(probe_path, source=())  # no measurement: the datasheet roofline
    widths = [_coverage(df)["band_halfwidth"] for df in (own, other, datasheet)]
    assert widths == sorted(widths) and widths[0] < 0.08, widths  # same GPU narrowest, datasheet widest


@settings(max_examples=25, deadline=None)
@given(b=st.integers(1, 64), t=st.integers(1, 4096), c=st.integers(0, 4096), k=st.integers(1, 5))
def test_corners_bracket_the_prediction(b, t, c, k):
    prof = Profile.load(Path(__file__).parents[1] / "validation" / "traces" / "h100_llama8b_probe.json")
    times = [simulate_step("llama-3.1-70b", "h200", interval(k), batch=b, new_tokens=t, context=c, profile=prof,
                           corner=x).time for x in ("low", None, "high")]
    assert times[0] <= times[1] <= times[2]


def test_run_band_orders_and_contains_the_value(probe):
    wl = make_workload("multi_news", n=10, seed=0)
    r = simulate("llama-3.1-8b", "h100", interval(2), wl, profile=probe).summary
    band = simulate_band("llama-3.1-8b", "h100", interval(2), wl, profile=probe)
    for k in ("throughput_rps", "ttft_mean_s", "tpot_mean_s"):
        lo, hi = band[k]
        assert lo <= r[k] <= hi and lo < hi, (k, lo, r[k], hi)


def test_corner_scales_costs_by_the_band(probe):
    cal = cost_model(M70, H200, probe)
    s = StepShape.uniform(1, 2048, 0)
    b = cal.band(s)
    assert Corner(cal, 1).layer(s).gpu == pytest.approx(cal.layer(s).gpu * b.gpu[1])
    assert Corner(cal, 0).transfer(1e9) == pytest.approx(cal.transfer(1e9) * b.copy[0])
    with pytest.raises(ConfigError, match="side"):
        Corner(cal, 2)


# ---- bad input: one line, before any simulation ----

@pytest.mark.parametrize("fields,needle", [
    ({"gpu": ""}, "gpu"),
    ({"gpu": "Mystery GPU 9000"}, "gpu"),
    ({"model": ""}, "model"),
    ({"model": "my-llama"}, "model_shape"),
])
def test_unidentified_profile_names_the_field_to_add(probe, fields, needle):
    p = dataclasses.replace(probe, **fields)
    with pytest.raises(ConfigError, match=needle):
        cost_model(M8, H100, p)


@pytest.mark.parametrize("row", [(1, 2048, 0, float("nan")), (1, 2048, 0, 0.0), (1, 2048, 0, -1e-3)])
def test_nan_or_nonpositive_times_are_rejected(row):
    with pytest.raises(ConfigError, match="layer_times"):
        Profile(h2d=((1e6, 1e9),), layer_times=(row,), gpu="h100", model="llama-3.1-8b")
    with pytest.raises(ConfigError, match="kernels"):
        Profile(kernels=(("qkv_proj", 128, 1, row[3]),), gpu="a100", model="llama-3.1-8b")


def test_probe_with_nan_time_is_one_line_error(tmp_path, probe_path, capsys):
    d = json.loads(probe_path.read_text())
    d["forward"][0]["ms"] = float("nan")
    f = tmp_path / "nan.json"
    f.write_text(json.dumps(d))
    assert main(["step", "--gpu", "h100", "--profile", str(f)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "forward[0].ms" in err and "nan.json" in err


def test_old_probe_without_model_infers_it_from_layer_bytes(tmp_path, probe_path):
    d = json.loads(probe_path.read_text())
    del d["model"]
    f = tmp_path / "old.json"
    f.write_text(json.dumps(d))
    assert Profile.from_probe(f).source_model().name == "llama-3.1-8b"
    d["layer_bytes"] = 123
    f.write_text(json.dumps(d))
    with pytest.raises(ConfigError, match="add the field model"):
        Profile.from_probe(f)


def test_no_measured_row_near_the_step_is_an_error(probe):
    decode_only = dataclasses.replace(probe, layer_times=tuple(r for r in probe.layer_times if r[1] == 1 and r[0] <= 32))
    with pytest.raises(ConfigError, match="near"):
        simulate_step("llama-3.1-8b", "h100", None, new_tokens=8192, profile=decode_only)
    with pytest.raises(ConfigError, match="near"):
        simulate("llama-3.1-8b", "h100", None, make_workload("multi_news", n=2), profile=decode_only)
    simulate_step("llama-3.1-8b", "h100", None, new_tokens=16, profile=decode_only)  # within 32x: fine


# ---- the command line ----

@pytest.mark.parametrize("cmd", [
    ["step", "--model", "llama-3.1-70b", "--gpu", "h200", "--policy", "interval:4"],
    ["run", "--requests", "4", "--no-band"],
    ["compare", "--requests", "4", "--policy", "none", "--no-band"],
])
def test_every_profile_command_says_what_it_transferred(cmd, probe_path, capsys):
    assert main([*cmd, "--profile", str(probe_path)]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("profile: ")]
    assert len(lines) == 1 and "H100 llama-3.1-8b profile applied to" in lines[0]
    assert "by efficiency transfer" in lines[0]  # to an H200, or to the default A100-40GB


def test_validate_target_from_another_source_writes_rows(tmp_path, probe_path, capsys):
    out = tmp_path / "v.json"
    assert main(["validate", str(probe_path), "--profile", str(VIDUR), "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "every row predicted from --profile alone" in text and "A100 llama-3.1-8b profile applied" in text
    rows = json.loads(out.read_text())
    assert len(rows) == 42 and not any(r["calibration"] for r in rows)
    for r in rows:
        assert {"B", "T", "C", "policy", "param", "nbuf", "measured_ms", "predicted_ms",
                "predicted_lo_ms", "predicted_hi_ms"} <= set(r)
        assert r["predicted_lo_ms"] <= r["predicted_ms"] <= r["predicted_hi_ms"]


def test_step_prints_value_and_band(probe_path, capsys):
    assert main(["step", "--gpu", "h100", "--profile", str(probe_path)]) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("step time"))
    v, lo, hi = (float(x) for x in
                 __import__("re").match(r"step time ([\d.]+) ms \(band ([\d.]+)-([\d.]+) ms", line).groups())
    assert lo < v < hi


def test_optimizer_says_which_choices_are_within_each_others_bands(probe):
    from offloadlab.apps.optimize import optimize
    from offloadlab.policy import parse_policy

    wl = make_workload("multi_news", n=6, seed=0)
    cands = [parse_policy(p) for p in ("interval:2", "interval:2,4", "vllm:6.5")]
    r = optimize("llama-3.1-8b", "h100", wl, candidates=cands, profile=probe, band=True)
    note = r.explanation.splitlines()[-1]
    assert note.startswith("Band of throughput_rps")
    # interval k=2 with 2 or 4 buffers: the same copies, bands overlapping; named as such
    other = "interval k=2 buf=4" if r.policy.label == "interval k=2 buf=2" else "interval k=2 buf=2"
    assert other in note and "Within each other's bands" in note


def test_validate_leave_one_shape_out_from_the_cli(probe_path, capsys):
    assert main(["validate", str(probe_path), "--leave-one-shape-out"]) == 0
    out = capsys.readouterr().out
    assert "held out" in out and "MAPE 2.57%" in out  # without eager resident decode rows
    assert main(["validate", "--leave-one-shape-out", "--profile", str(probe_path)]) == 2


def test_sweep_rows_carry_bands_when_asked(probe_path):
    from offloadlab.apps.sweep import SimConfig, sweep

    wl = make_workload("multi_news", n=4, seed=0)
    base = SimConfig(gpu="h100", profile=probe_path)
    df = sweep([base, base.replace(band=True)], wl, executor="serial", progress=False)
    assert "throughput_rps_lo" in df and df["throughput_rps_lo"].isna().iloc[0]
    r = df.iloc[1]
    assert r["throughput_rps_lo"] < r["throughput_rps"] < r["throughput_rps_hi"]
    assert base.key(wl) != base.replace(band=True).key(wl)
    with pytest.raises(ConfigError, match="band"):
        SimConfig(band="yes")


def test_measured_all_reduce_replaces_the_ring_model(vidur):
    """tp 4 on the A100-80GB Vidur measured: a layer's two all-reduces take what NCCL measured at
    that message size (the ring model's 5 us per hop underestimates small messages)."""
    m = get_model("llama-3.1-70b").shard(4)
    cal, rf = cost_model(m, A100_80, vidur), Roofline(m, A100_80)
    tokens = 64
    nbytes = tokens * m.hidden * 2
    near = min((r for r in vidur.allreduce if r[1] == 4), key=lambda r: abs(math.log(r[0] / nbytes)))
    assert abs(math.log(near[0] / nbytes)) < 0.5
    assert cal._allreduce_time(tokens) == pytest.approx(2 * near[2], rel=0.25)
    assert cal._allreduce_time(tokens) > 2 * rf.allreduce_time(tokens)


def test_the_work_before_attention_is_the_measured_qkv_projection(vidur):
    """Calibrated.pre_attention (where a piecewise CUDA graph's piece ends: sim/step.py) on the profile's
    own GPU and model is the measured QKV projection; a band's corners scale it with the GPU time."""
    cal = cost_model(M8, A100_80, profile=vidur)
    measured = {t: sec for op, t, tp, sec in vidur.kernels if op == "qkv_proj" and tp == 1}
    for t in (128, 512, 2048):
        assert cal.pre_attention(StepShape.uniform(1, t, 0)) == pytest.approx(measured[t], rel=1e-9)
    s = StepShape.of([(300, 0)] + [(1, 900)] * 16)
    lo, mid, hi = (Corner(cal, 0).pre_attention(s), cal.pre_attention(s), Corner(cal, 1).pre_attention(s))
    assert lo < mid < hi


# ---- a held-out real run on measured kernels of another A100 and another model ----

A100_RUNS = Path(__file__).parent.parent / "validation" / "traces" / "serving" / "a100x8_llama-3.3-70b_tp8"


@pytest.mark.parametrize("name, warm, ttft_tol", [("qps_01.json", False, 0.10), ("qps_04.json", True, 0.25),
                                                  ("qps_inf.json", True, 0.45)])
def test_vidurs_a100_kernels_carry_to_the_a100_tp8_runs(name, warm, ttft_tol):
    """Vidur's A100-80GB operators of Llama-3-8B's TP shards and its DGX NCCL all-reduce, moved by efficiency to
    Llama-3.3-70B at TP 8 on A100-40GB (held out: nothing fitted to these runs): decode within 10% where the
    datasheet roofline (its all-reduce an assumed ring) errs +10% to +20%; TTFT of the all-at-once run is the client's
    and API server's (index.yaml band_misses), not the engine's."""
    from offloadlab.validation.serving_run import plan_replay, replay_serving_run

    run = A100_RUNS / name
    s = replay_serving_run(plan_replay(run, profile=str(VIDUR), prefix_cache_warm=warm), trace_steps=False).summary
    ds = replay_serving_run(plan_replay(run, prefix_cache_warm=warm), trace_steps=False, band=False).summary
    assert abs(s["error_tpot_mean_s"]) <= 0.10, s["error_tpot_mean_s"]
    assert abs(s["error_tpot_mean_s"]) < abs(ds["error_tpot_mean_s"]), (s["error_tpot_mean_s"], ds["error_tpot_mean_s"])
    assert abs(s["error_e2e_mean_s"]) <= 0.10 and abs(s["error_throughput_rps"]) <= 0.06
    assert abs(s["error_ttft_mean_s"]) <= ttft_tol
    held = ("tpot_mean_s", "e2e_mean_s", "throughput_rps", "makespan_s") + (("ttft_mean_s",) * (name != "qps_inf.json"))
    for k in held:
        assert s[f"inside_band_{k}"], (k, s[f"band_lo_{k}"], s[f"measured_{k}"], s[f"band_hi_{k}"])
