"""LLMServingSim's kernel profile bundle as a Profile (offloadlab/profile.py from_llmservingsim), and the
stored RTX 4090 serving run replayed with the stored kernel profile of that GPU."""
from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest

from offloadlab.errors import OffloadLabError
from offloadlab.profile import GEMM_OPS, Profile
from offloadlab.validation.serving_run import plan_replay, replay_serving_run

TRACES = Path(__file__).resolve().parents[1] / "validation" / "traces"
BUNDLE = TRACES / "profiles" / "rtx4090_llama-3.1-8b"
RUN = TRACES / "serving" / "rtx4090_llama-3.1-8b"


def _dense() -> dict[tuple[str, int], float]:
    with open(BUNDLE / "tp1" / "dense.csv") as f:
        return {(r["layer"], int(r["tokens"])): float(r["time_us"]) / 1e6 for r in csv.DictReader(f)}


def test_the_bundle_is_the_rtx4090_and_llama_8b_with_every_gemm_and_the_elementwise_sum():
    p = Profile.load(BUNDLE)
    assert (p.model, p.gpu) == ("llama-3.1-8b", "RTX-4090-24GB")
    dense = _dense()
    tokens = sorted({t for _, t in dense})
    got = {(op, t): s for op, t, tp, s in p.kernels}
    assert {tp for _, _, tp, _ in p.kernels} == {1}
    for t in tokens:
        for op in GEMM_OPS:
            assert got[op, t] == dense[op, t]
        # two RMSNorms a layer (their residual adds fused in), the rotary embedding and the SiLU-and-mul
        want = 2 * dense["layernorm", t] + dense["rotary_emb", t] + dense["act_fn", t]
        assert got["elementwise", t] == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("edit, needle", [
    (lambda d: (d / "tp1" / "dense.csv").unlink(), "tp1/dense.csv"),
    (lambda d: (d / "tp1" / "dense.csv").write_text("layer,tokens,time_us\nqkv_proj,1,-3\n"), "time_us > 0"),
    (lambda d: (d / "tp1" / "dense.csv").write_text("layer,tokens,time_us\nqkv_proj,x,3\n"), "tokens (an integer)"),
    (lambda d: (d / "tp1" / "dense.csv").write_text("layer,tokens,time_us\nlayernorm,1,3\n"), "rows of qkv_proj"),
    (lambda d: (d / "meta.yaml").write_text("gpu: NVIDIA GeForce RTX 4090\nengine_effective: {}\n"), "hf_overrides"),
    (lambda d: (d / "meta.yaml").write_text("gpu: NVIDIA GeForce RTX 4090\nengine_effective: null\n"), "hf_overrides"),
    (lambda d: (d / "meta.yaml").write_text((d / "meta.yaml").read_text().replace("intermediate_size: 14336",
                                                                                "intermediate_size: 99")),
     "a catalog model of this shape"),
    (lambda d: (d / "meta.yaml").write_text((d / "meta.yaml").read_text().replace(
        "gpu: NVIDIA GeForce RTX 4090", "gpu: ACME Tensor Brick")), "ACME"),
])
def test_a_bad_bundle_is_one_error_naming_what(tmp_path, edit, needle):
    d = tmp_path / "bundle"
    shutil.copytree(BUNDLE, d)
    edit(d)
    with pytest.raises(OffloadLabError) as e:  # a ConfigError, or the catalog's UnknownNameError for the GPU
        Profile.load(d)
    assert needle in str(e.value) and "\n" not in str(e.value)


# Largest |predicted/measured - 1| per summary figure when the stored run is replayed on the stored kernel
# profile of its GPU (measured 2026-12-02: TTFT mean +0.3%, p50 +13.0%; TPOT mean -4.6%, p50 -3.4%; e2e mean
# -0.8%, p50 +2.2%; throughput +1.2%): the 10% regression guard, TTFT p50 at 15%.
PROFILED_TOLERANCE = {"ttft_mean_s": 0.10, "ttft_p50_s": 0.15, "tpot_mean_s": 0.10, "tpot_p50_s": 0.10,
                      "e2e_mean_s": 0.10, "e2e_p50_s": 0.10, "throughput_rps": 0.10}


def test_the_run_replayed_on_its_gpus_kernel_profile_is_within_ten_percent():
    s = replay_serving_run(plan_replay(RUN, profile=str(BUNDLE)), trace_steps=False).summary
    errors = {k: s[f"error_{k}"] for k in PROFILED_TOLERANCE}
    assert all(abs(errors[k]) <= tol for k, tol in PROFILED_TOLERANCE.items()), errors
    datasheet = replay_serving_run(plan_replay(RUN), trace_steps=False).summary
    for k in ("ttft_mean_s", "tpot_mean_s", "e2e_mean_s", "throughput_rps"):  # the measured GEMMs are what helps
        assert abs(s[f"error_{k}"]) < abs(datasheet[f"error_{k}"]), k
    for k in ("ttft_mean_s", "tpot_mean_s", "e2e_mean_s", "throughput_rps", "makespan_s"):
        assert s[f"inside_band_{k}"], (k, s[f"band_lo_{k}"], s[f"measured_{k}"], s[f"band_hi_{k}"])


V0_BUNDLES = {"rtx3090_llama-3.1-8b_v0": "RTX-3090-24GB", "rtx-a6000_llama-3.1-8b_v0": "RTX-A6000-48GB",
              "h100_llama-3.1-8b_v0": "H100-SXM5-80GB"}


@pytest.mark.parametrize("name, gpu", V0_BUNDLES.items())
def test_the_first_profiler_format_fuses_the_split_gemms(name, gpu):
    """layers.csv (LLMServingSim's first profiler) times q/k/v and gate/up apart, in ns: their sums are the
    fused GEMMs, the two norms + rope + act_fn the elementwise work; attention rows (kv_cache > 0) are not read."""
    d = TRACES / "profiles" / name
    with open(d / "tp1" / "layers.csv") as f:
        ns = {(r["layer_name"], int(r["input"])): float(r["latency(ns)"]) for r in csv.DictReader(f)
              if r["kv_cache"] == "0"}
    p = Profile.load(d)
    assert (p.model, p.gpu) == ("llama-3.1-8b", gpu)
    got = {(op, t): s for op, t, _, s in p.kernels}
    for t in sorted({t for _, t in ns}):
        assert got["qkv_proj", t] == pytest.approx(sum(ns[k, t] for k in ("q_proj", "k_proj", "v_proj")) / 1e9, rel=1e-12)
        assert got["gate_up_proj", t] == pytest.approx((ns["gate_proj", t] + ns["up_proj", t]) / 1e9, rel=1e-12)
        assert got["o_proj", t] == ns["o_proj", t] / 1e9 and got["down_proj", t] == ns["down_proj", t] / 1e9
        elem = sum(ns[k, t] for k in ("input_layernorm", "post_layernorm", "rope", "act_fn")) / 1e9
        assert got["elementwise", t] == pytest.approx(elem, rel=1e-12)
