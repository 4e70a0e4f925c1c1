"""`offloadlab validate RESULT.json`: a `vllm bench serve --save-result --save-detailed` file replayed as a run.

Reading (client-side metrics, failed requests, arrivals), bad input (one line, exit 2, nothing simulated),
vLLM 0.8.3's arrival timing against numpy drawn as its benchmark draws, and the stored runs' own clock.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from offloadlab.apps.cli import main
from offloadlab.sim.workload import from_vllm_result, vllm_arrivals
from offloadlab.validation import stored_measurements
from offloadlab.validation.serving_run import is_serving_run, load_serving_run, plan_replay, replay_serving_run

ROOT = Path(__file__).resolve().parents[1]
PROBE = ROOT / "validation" / "traces" / "h100_llama8b_probe.json"
STORED_RESULTS = [m for m in stored_measurements() if m.kind == "serving" and m.path.is_file()]
SIDECAR = {"model": "meta-llama/Llama-3.1-8B", "vllm_version": "0.8.3",
           "hardware": {"device_name": "NVIDIA H100 80GB HBM3"}}


def result_file(tmp_path: Path, sidecar: dict | None = SIDECAR, **over) -> Path:
    """A tiny result file as vLLM 0.8.3 writes one (request_rate "inf" is a string there), request 1 failed."""
    data = {"model_id": "meta-llama/Llama-3.1-8B", "request_rate": 2.0, "burstiness": 1.0, "max_concurrency": None,
            "duration": 3.5, "input_lens": [120, 300, 80, 64], "output_lens": [5, 0, 1, 9],
            "ttfts": [0.1, 0.0, 0.25, 0.2], "itls": [[0.02, 0.03, 0.02, 0.03], [], [], [0.01] * 8],
            "errors": ["", "Bad Request", "", ""]}
    data.update(over)
    path = tmp_path / "res.json"
    path.write_text(json.dumps(data))
    if sidecar is not None:
        (tmp_path / "res.meta.json").write_text(json.dumps(sidecar))
    return path


def test_measured_as_the_benchmark_client_defines_it(tmp_path):
    run = load_serving_run(result_file(tmp_path))
    c = run.columns
    assert list(c["request_id"]) == ["0", "2", "3"] and run.failed == 1  # the failed one is left out, counted
    assert c["ttft"].tolist() == [0.1, 0.25, 0.2]
    assert c["e2e"] == pytest.approx([0.2, 0.25, 0.28])  # TTFT + the inter-token gaps
    assert c["tpot"][0] == pytest.approx(0.1 / 4) and c["tpot"][2] == pytest.approx(0.08 / 8)
    assert math.isnan(c["tpot"][1])  # one token: vLLM's benchmark counts no TPOT
    assert run.duration_s == 3.5 and run.meta["vllm_version"] == "0.8.3"
    assert "failed requests left out: 1 of 4" in run.notes


def test_arrivals_regenerated_as_the_versions_client_sent_them(tmp_path):
    run = load_serving_run(result_file(tmp_path))
    sent = vllm_arrivals(4, 2.0, 1.0, 0, "0.8.3")  # request 0 at t = 0, the failed request 1 kept its place
    assert run.columns["arrival"] == pytest.approx(sent[[0, 2, 3]])
    newer = load_serving_run(result_file(tmp_path), vllm_version="0.19.0")  # --vllm-version overrides the sidecar
    new = vllm_arrivals(4, 2.0, 1.0, 0)
    assert newer.columns["arrival"] == pytest.approx(new[[0, 2, 3]] - new[0])
    seeded = load_serving_run(result_file(tmp_path, sidecar={**SIDECAR, "benchmark_seed": 7}))
    assert seeded.columns["arrival"] == pytest.approx(vllm_arrivals(4, 2.0, 1.0, 7, "0.8.3")[[0, 2, 3]])
    at_once = load_serving_run(result_file(tmp_path, request_rate="inf"))
    assert not at_once.columns["arrival"].any() and "request_rate inf" in at_once.notes[0]


def test_start_times_less_queue_times_are_the_arrivals(tmp_path):
    run = load_serving_run(result_file(tmp_path, request_rate=None, start_times=[10.0, 10.5, 11.0, 12.0],
                                       queue_times=[0.0, 0.0, 0.5, 0.25]))
    assert run.columns["arrival"].tolist() == [0.0, 0.5, 1.75]
    assert from_vllm_result(result_file(tmp_path, start_times=[10.0, 10.5, 11.0, 12.0])).n == 3


def test_a_result_file_is_a_run_and_a_probe_is_not(tmp_path):
    assert is_serving_run(result_file(tmp_path)) and not is_serving_run(PROBE)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert not is_serving_run(bad)


def test_validate_prints_client_side_and_writes_json(tmp_path, capsys):
    out = tmp_path / "r.json"
    assert main(["validate", str(result_file(tmp_path)), "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "measured client-side: vLLM's benchmark client" in printed
    assert "failed requests left out: 1 of 4" in printed
    assert ("regenerated as vLLM 0.8.3's client drew them (request_rate 2, burstiness 1, seed 0 = the benchmark "
            "default)") in printed
    doc = json.loads(out.read_text())  # valid JSON: the one-token request's TPOT is null
    assert [r["request_id"] for r in doc["requests"]] == ["0", "2", "3"]
    assert doc["requests"][1]["measured_tpot_s"] is None
    s = doc["summary"]
    assert s["failed_requests"] == 1 and s["measured_makespan_s"] == 3.5  # the client's duration
    assert s["measured_tpot_mean_s"] == pytest.approx((0.1 / 4 + 0.08 / 8) / 2)  # one-token outputs left out


def test_without_sidecar_the_flags_say_what_ran(tmp_path, capsys):
    path = result_file(tmp_path, sidecar=None)
    err = _error(capsys, ["validate", str(path), "--gpu", "h100"])
    assert "vllm_version=None" in err and "--vllm-version" in err
    assert main(["validate", str(path), "--gpu", "h100", "--vllm-version", "0.8.3"]) == 0  # model: the file's model_id


def test_the_recorded_node_size_holds_a_tensor_parallel_8_run(tmp_path, capsys):
    side = {**SIDECAR, "model": "meta-llama/Llama-3.3-70B-Instruct", "engine_kwargs": {"tensor_parallel_size": 8},
            "hardware": {"device_name": "NVIDIA A100-SXM4-40GB"}}
    err = _error(capsys, ["validate", str(result_file(tmp_path, sidecar=side))])
    assert "tensor_parallel=8" in err and "4 GPUs of a A100-SXM4-40GB node" in err  # the catalog's assumed node
    side["hardware"]["device_count"] = 8
    plan = plan_replay(result_file(tmp_path, sidecar=side))
    assert plan.gpu.gpus_per_node == 8 and plan.engine.tensor_parallel == 8


def _error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    return err


@pytest.mark.parametrize("over,sidecar,needle", [
    ({"ttfts": None}, SIDECAR, "ttfts=None: expected a list of 4 entries, one per request (saved with "
                               "--save-detailed)"),
    ({"itls": None}, SIDECAR, "itls=None"),
    ({"input_lens": None}, SIDECAR, "input_lens=None"),
    ({"ttfts": [0.1, 0.0, 0.2]}, SIDECAR, "ttfts='list': expected a list of 4 entries"),
    ({"output_lens": [5, 0, 1]}, SIDECAR, "output_lens='3 entries': expected 4, as many as input_lens"),
    ({"request_rate": None}, SIDECAR, "request_rate=None: expected a rate"),
    ({"request_rate": -1}, SIDECAR, "request_rate=-1"),
    ({"ttfts": [-0.1, 0.0, 0.25, 0.2]}, SIDECAR, "ttfts[0]=-0.1: expected a finite number of seconds >= 0"),
    ({"itls": [0.02, [], [], [0.01] * 8]}, SIDECAR, "itls[0]='float': expected a list of inter-token gaps"),
    ({"itls": [[0.02, "x"], [], [], []]}, SIDECAR, "itls[0][1]='x'"),
    ({"max_concurrency": 0}, SIDECAR, "max_concurrency=0"),
    ({}, {**SIDECAR, "hardware": {"device_name": "NVIDIA H100 80GB HBM3", "device_count": 0}},
     "hardware.device_count=0"),
    ({}, {**SIDECAR, "benchmark_seed": -3}, "benchmark_seed=-3"),
    ({}, {**SIDECAR, "engine_kwargs": [1]}, "engine_kwargs=[1]: expected an object"),
])
def test_bad_result_file_is_one_line_before_any_simulation(tmp_path, capsys, monkeypatch, over, sidecar, needle):
    import offloadlab.sim as sim

    def boom(*a, **k):
        raise AssertionError("simulated despite bad input")

    monkeypatch.setattr(sim, "simulate", boom)
    assert needle in _error(capsys, ["validate", str(result_file(tmp_path, sidecar=sidecar, **over))])


# ---- vLLM 0.8.3's arrivals ---------------------------------------------------------------------
@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 300), rate=st.floats(0.01, 1e4), b=st.sampled_from([0.1, 0.5, 1.0, 3.0]),
       seed=st.integers(0, 2**32 - 1), version=st.sampled_from(["0.8.3", "0.6.1", "v0.8.5"]))
def test_vllm_083_arrivals_as_its_get_request_makes_them(n, rate, b, seed, version):
    # vLLM 0.8.3 benchmarks/benchmark_serving.py: main() np.random.seed(args.seed); get_request yields a request,
    # then draws np.random.gamma(shape=burstiness, scale=1 / (request_rate * burstiness)) and sleeps that long
    np.random.seed(seed)
    ref, now = [], 0.0
    for _ in range(n):
        ref.append(now)
        now += np.random.gamma(shape=b, scale=1.0 / (rate * b))
    assert np.allclose(vllm_arrivals(n, rate, b, seed, version), ref, rtol=1e-12, atol=0)


def test_vllm_083_arrivals_at_inf_rate_or_even_gaps():
    assert not vllm_arrivals(5, float("inf"), 1.0, 3, "0.8.3").any()
    assert vllm_arrivals(4, 2.0, float("inf"), 0, "0.8.3").tolist() == [0.0, 0.5, 1.0, 1.5]


@pytest.mark.parametrize("m", STORED_RESULTS, ids=[m.path.name for m in STORED_RESULTS])
def test_stored_results_regenerated_arrivals_fit_the_clients_own_clock(m):
    """The last request to finish (its regenerated send time + its measured e2e) ends within the benchmark's
    measured duration and just before it (the client's loop lags its sleeps a little); with the newer
    client's timing (first gap before the first request, rescaled) the qps-1 run would end 3 s after it."""
    run = load_serving_run(m.path)
    if run.notes[0].startswith("arrivals: all at t = 0"):
        return
    end = float(np.max(run.columns["arrival"] + run.columns["e2e"]))
    assert run.duration_s * 0.995 <= end <= run.duration_s


def test_stored_result_replays_with_its_sidecar():
    m = next(m for m in STORED_RESULTS if m.path.name == "qps_01.json")
    c = replay_serving_run(m.path, band=False, trace_steps=False)
    s = c.summary
    assert (c.gpu.name, c.gpu.gpus_per_node, c.engine.tensor_parallel, c.engine.scheduler) == (
        "A100-SXM4-40GB", 8, 8, "v1")
    # the file's own figures (vLLM's calculate_metrics), reproduced from its per-request lists
    doc = json.loads(m.path.read_text())
    assert s["measured_ttft_mean_s"] * 1e3 == pytest.approx(doc["mean_ttft_ms"], rel=1e-9)
    assert s["measured_tpot_mean_s"] * 1e3 == pytest.approx(doc["mean_tpot_ms"], rel=1e-6)
    assert s["measured_throughput_rps"] == pytest.approx(doc["request_throughput"], rel=1e-12)
