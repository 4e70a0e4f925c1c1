"""Serving-run directories: reading, bad input (one line, exit 2, nothing simulated), replay and --json."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from offloadlab.apps.cli import main
from offloadlab.errors import ConfigError
from offloadlab.validation.serving_run import (load_serving_run, model_for_hf_id, plan_replay, replay_serving_run,
                                               serving_requests)

RUN = Path(__file__).resolve().parents[1] / "validation" / "traces" / "serving" / "rtx4090_llama-3.1-8b"
ROW_FIELDS = ["request_id", "measured_ttft_s", "predicted_ttft_s", "measured_tpot_s", "predicted_tpot_s",
              "measured_e2e_s", "predicted_e2e_s"]


def small_run(tmp_path: Path, rows: list[dict] | None = None, meta: dict | None = None) -> Path:
    """A run directory: the stored run's meta.json with ``meta`` merged in, and ``rows``."""
    d = tmp_path / "run"
    d.mkdir()
    m = json.loads((RUN / "meta.json").read_text())
    m.update(meta or {})
    (d / "meta.json").write_text(json.dumps(m))
    if rows is None:
        rows = [{"request_id": f"r{i}", "input_toks": 100 + 50 * i, "output_toks": 20 + i, "arrival_time": 0.0,
                 "queued_ts": 10.0 + 0.1 * i, "scheduled_ts": 10.0 + 0.1 * i, "first_token_ts": 10.5 + 0.1 * i,
                 "last_token_ts": 11.5 + 0.2 * i} for i in range(5)]
    (d / "requests.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


def test_measured_metrics_as_the_data_readme_defines_them(tmp_path):
    rows = [{"request_id": "a", "input_toks": 10, "output_toks": 5, "queued_ts": 100.0, "first_token_ts": 100.4,
             "last_token_ts": 101.2},
            {"request_id": "b", "input_toks": 20, "output_toks": 1, "queued_ts": 100.5, "first_token_ts": 101.0,
             "last_token_ts": 101.0}]
    run = load_serving_run(small_run(tmp_path, rows))
    r = run.requests.set_index("request_id")
    assert r.loc["a", "ttft"] == pytest.approx(0.4) and r.loc["a", "tpot"] == pytest.approx(0.8 / 4)
    assert r.loc["a", "e2e"] == pytest.approx(1.2)
    assert r.loc["b", "tpot"] == 0.0  # max(1, output - 1): a one-token output divides by 1
    assert serving_requests(run) == [
        {"request_id": "a", "prompt_len": 10, "output_len": 5, "arrival": 0.0},
        {"request_id": "b", "prompt_len": 20, "output_len": 1, "arrival": 0.5}]


def test_stored_run_reads_as_a_workload():
    reqs = serving_requests(RUN)
    assert len(reqs) == 300 and reqs[0]["arrival"] == 0.0
    assert min(r["arrival"] for r in reqs) == 0.0 and max(r["arrival"] for r in reqs) == pytest.approx(29.12, abs=0.01)
    assert sum(r["prompt_len"] for r in reqs) == 257239 and sum(r["output_len"] for r in reqs) == 195753


def test_hf_ids_map_to_catalog_shapes():
    assert model_for_hf_id("meta-llama/Llama-3.1-8B").name == "llama-3.1-8b"
    assert model_for_hf_id("meta-llama/Meta-Llama-3.1-70B-Instruct").name == "llama-3.1-70b"
    with pytest.raises(Exception, match="Mixtral"):
        model_for_hf_id("mistralai/Mixtral-8x7B-v0.1")


def _error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("offloadlab: error:") and "\n" not in err, err
    return err


@pytest.mark.parametrize("break_it,needle", [
    (lambda d: (d / "meta.json").unlink(), "meta.json"),
    (lambda d: (d / "requests.jsonl").unlink(), "requests.jsonl"),
    (lambda d: (d / "requests.jsonl").write_text('{"request_id": "x", "input_toks": 5, "output_toks": 2, '
                                                  '"queued_ts": 1.0, "first_token_ts": 2.0}\n'), "last_token_ts"),
    (lambda d: (d / "requests.jsonl").write_text('{"request_id": "x", "input_toks": 5, "output_toks": 2, '
                                                  '"queued_ts": 1.0, "first_token_ts": 2.0, "last_token_ts": 1.5}\n'),
     "last_token_ts=1.5: expected >= first_token_ts"),
    (lambda d: (d / "requests.jsonl").write_text('{"request_id": "x", "input_toks": 0, "output_toks": 2, '
                                                  '"queued_ts": 1.0, "first_token_ts": 2.0, "last_token_ts": 3}\n'),
     "input_toks"),
])
def test_bad_run_directory_is_one_line(tmp_path, capsys, break_it, needle):
    d = small_run(tmp_path)
    break_it(d)
    assert needle in _error(capsys, ["validate", str(d)])


def test_unknown_or_missing_device_says_how_to_give_one(tmp_path, capsys):
    meta = json.loads((RUN / "meta.json").read_text())
    d = small_run(tmp_path, meta={"hardware": {**meta["hardware"], "device_name": "NVIDIA Quadro P400"}})
    err = _error(capsys, ["validate", str(d)])
    assert "Quadro P400" in err and "--gpu" in err
    (d / "meta.json").write_text(json.dumps({**meta, "hardware": {}}))
    assert "--gpu" in _error(capsys, ["validate", str(d)])
    assert main(["validate", str(d), "--gpu", "rtx4090"]) == 0  # --gpu gives it


def test_bad_input_stops_before_any_simulation(tmp_path, capsys, monkeypatch):
    import offloadlab.sim as sim

    def boom(*a, **k):
        raise AssertionError("simulated despite bad input")

    monkeypatch.setattr(sim, "simulate", boom)
    good = small_run(tmp_path)
    bad = tmp_path / "empty"
    bad.mkdir()
    assert "meta.json" in _error(capsys, ["validate", str(good), str(bad)])


def test_replay_json_rows_and_summary(tmp_path, capsys):
    d = small_run(tmp_path)
    out = tmp_path / "r.json"
    assert main(["validate", str(d), "--json", str(out), "--plot", str(tmp_path / "p.png")]) == 0
    printed = capsys.readouterr().out
    assert "TTFT mean" in printed and "KV blocks" in printed and "preemptions" in printed
    doc = json.loads(out.read_text())
    assert [list(r) for r in doc["requests"]] == [ROW_FIELDS] * 5
    assert [r["request_id"] for r in doc["requests"]] == [f"r{i}" for i in range(5)]
    assert doc["requests"][0]["measured_ttft_s"] == pytest.approx(0.5)
    s = doc["summary"]
    assert s["measured_kv_blocks"] == 2588 and s["predicted_kv_blocks"] > 0
    assert s["scheduler"] == "v1" and s["vllm_version"] == "0.19.0"
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"


def test_engine_kwargs_absent_take_the_versions_defaults(tmp_path):
    d = small_run(tmp_path, meta={"engine_kwargs": {"model": "meta-llama/Llama-3.1-8B", "max_num_seqs": None}})
    plan = plan_replay(d)
    assert (plan.engine.max_num_seqs, plan.engine.max_num_batched_tokens) == (256, 2048)  # vllm serve on a 4090
    assert plan.engine.max_model_len == 131072
    old = plan_replay(d, vllm_version="0.7.3")
    assert old.engine.scheduler == "v0"
    with pytest.raises(ConfigError, match="swap_space"):
        (tmp_path / "x").mkdir()
        plan_replay(small_run(tmp_path / "x", meta={"engine_kwargs": {"swap_space": 4}}))


def test_replay_is_deterministic(tmp_path):
    d = small_run(tmp_path)
    a, b = replay_serving_run(d).requests, replay_serving_run(d).requests
    assert a.equals(b)


def test_run_with_a_vllm_version_takes_its_engine_and_defaults(tmp_path):
    wl = tmp_path / "w.csv"
    wl.write_text("prompt_len,output_len,arrival\n3000,20,0\n500,30,0.1\n")
    for version, scheduler, budget in (("0.19.0", "v1", 2048), ("0.7.3", "v0", 8192)):
        out = tmp_path / f"{version}.json"
        assert main(["run", "--gpu", "rtx4090", "--policy", "none", "--workload", str(wl), "--max-model-len", "8192",
                     "--vllm-version", version, "--json", str(out)]) == 0
        row = json.loads(out.read_text())
        assert (row["scheduler"], row["max_num_batched_tokens"]) == (scheduler, budget)
        assert row["chunked_prefill"] is (scheduler == "v1")
    # a flag given on the command line wins over the version's default
    assert main(["run", "--gpu", "rtx4090", "--policy", "none", "--workload", str(wl), "--max-model-len", "8192",
                 "--vllm-version", "0.19.0", "--max-num-batched-tokens", "4096", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["max_num_batched_tokens"] == 4096
