"""Serving-run directories: reading, bad input (one line, exit 2, nothing simulated), replay and --json."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from offloadlab.apps.cli import main
from offloadlab.errors import ConfigError, DoesNotFitError
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


ROW = '{"request_id": "x", "input_toks": 5, "output_toks": 2, "queued_ts": 1.0, "first_token_ts": 2.0'


@pytest.mark.parametrize("break_it,needle", [  # one style: file[, line]: field=value: expected ...
    (lambda d: (d / "meta.json").unlink(), "run: meta.json=None: expected present in the serving-run directory"),
    (lambda d: (d / "requests.jsonl").unlink(), "run: requests.jsonl=None: expected present"),
    (lambda d: (d / "requests.jsonl").write_text(ROW + "}\n"),
     "requests.jsonl, line 1: last_token_ts=None: expected present"),
    (lambda d: (d / "requests.jsonl").write_text(ROW + ', "last_token_ts": 1.5}\n'),
     "requests.jsonl, line 1: last_token_ts=1.5: expected >= first_token_ts (2.0)"),
    (lambda d: (d / "requests.jsonl").write_text(ROW.replace('"first_token_ts": 2.0', '"first_token_ts": 0.5')
                                                  + ', "last_token_ts": 3}\n'),
     "requests.jsonl, line 1: first_token_ts=0.5: expected >= queued_ts (1.0)"),
    (lambda d: (d / "requests.jsonl").write_text(ROW.replace('"input_toks": 5', '"input_toks": 0')
                                                  + ', "last_token_ts": 3}\n'),
     "requests.jsonl, line 1: input_toks=0: expected an integer >= 1"),
    (lambda d: (d / "requests.jsonl").write_text(ROW + ', "last_token_ts": 3}\n\n' + ROW + ', "last_token_ts": 4}\n'),
     "requests.jsonl, line 3: request_id='x': expected unique (line 1 has it too)"),
    (lambda d: (d / "requests.jsonl").write_text(ROW + ', "last_token_ts": 3}\n[1]\n'),
     "requests.jsonl, line 2: row='[1]': expected a JSON object"),
    (lambda d: (d / "requests.jsonl").write_text("\n \n"), "requests.jsonl: rows=0: expected at least one request"),
    (lambda d: (d / "timeseries.csv").write_bytes(b"\xff\xfe"), "UTF-8"),
    (lambda d: (d / "timeseries.csv").write_text("t,running\n1,2\n"),
     "timeseries.csv: columns=['running', 't']: expected at least ['t', 'running', 'waiting']"),
    (lambda d: (d / "timeseries.csv").write_text("t,running,waiting\n1,2,x\n"),
     "timeseries.csv, line 2: waiting='x': expected a finite number"),
    (lambda d: (d / "timeseries.csv").write_text("t,running,waiting\n1,2,3\n\n2,3\n"),
     "timeseries.csv, line 4: waiting='': expected a finite number"),
    (lambda d: (d / "timeseries.csv").write_text("t,running,waiting\n1,2,3,4\n"),
     "timeseries.csv, line 2: row='1,2,3,4': expected at most 3 cells"),
    (lambda d: (d / "timeseries.csv").write_text('t,running,waiting\n1,2,3\n"open'), "expected a CSV table"),
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


def test_no_band_skips_the_corner_replays_and_changes_nothing_else(tmp_path, capsys, monkeypatch):
    import offloadlab.sim as sim

    d = small_run(tmp_path)
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    assert main(["validate", str(d), "--json", str(a)]) == 0
    assert "band (every cost" in capsys.readouterr().out
    calls = []
    real = sim.simulate
    monkeypatch.setattr(sim, "simulate", lambda *x, **k: calls.append(k.get("corner")) or real(*x, **k))
    assert main(["validate", str(d), "--json", str(b), "--no-band"]) == 0
    out = capsys.readouterr().out
    assert calls == [None] and "band (" not in out and "inside" not in out
    with_band, without = json.loads(a.read_text()), json.loads(b.read_text())
    assert without["requests"] == with_band["requests"]
    assert without["summary"] == {k: v for k, v in with_band["summary"].items()
                                  if not k.startswith(("band_", "inside_band_"))}
    assert "serving runs only" in _error(capsys, ["validate", "--no-band"])  # probes: nothing to skip


def test_warm_prefix_cache_replay_serves_prompts_from_the_cache(tmp_path, capsys):
    d = small_run(tmp_path)
    cold, warm = tmp_path / "cold.json", tmp_path / "warm.json"
    assert main(["validate", str(d), "--no-band", "--json", str(cold)]) == 0
    assert main(["validate", str(d), "--no-band", "--json", str(warm), "--warm-prefix-cache"]) == 0
    c, w = (json.loads(p.read_text())["summary"] for p in (cold, warm))
    assert c["predicted_prefix_cached_tokens"] == 0
    assert w["predicted_prefix_cached_tokens"] == sum((100 + 50 * i - 1) // 16 * 16 for i in range(5))
    assert w["predicted_ttft_mean_s"] < c["predicted_ttft_mean_s"]
    capsys.readouterr()
    meta = json.loads((RUN / "meta.json").read_text())
    (tmp_path / "off").mkdir()
    off = small_run(tmp_path / "off", meta={"engine_kwargs": {**meta["engine_kwargs"], "enable_prefix_caching": False}})
    assert "--warm-prefix-cache=True: expected a run with prefix caching on" in _error(
        capsys, ["validate", str(off), "--warm-prefix-cache"])
    assert "serving runs only" in _error(capsys, ["validate", "--warm-prefix-cache"])


def test_recorded_kv_cache_replays_on_the_runs_own_blocks(tmp_path, capsys):
    """--recorded-kv-cache: the block count meta.json recorded (2,588 on the stored 4090 run), not the
    memory model's; a run that records none, or a probe file, is one line and exit 2."""
    d = small_run(tmp_path)
    recorded = json.loads((d / "meta.json").read_text())["kv_cache"]["num_gpu_blocks"]
    modelled = plan_replay(d)
    plan = plan_replay(d, recorded_kv_cache=True)
    assert modelled.engine.num_gpu_blocks_override is None and plan.engine.num_gpu_blocks_override == recorded
    out = tmp_path / "kv.json"
    assert main(["validate", str(d), "--no-band", "--json", str(out), "--recorded-kv-cache"]) == 0
    assert f"(given: num_gpu_blocks_override={recorded})" in capsys.readouterr().out
    s = json.loads(out.read_text())["summary"]
    assert s["predicted_kv_blocks"] == s["measured_kv_blocks"] == recorded
    (tmp_path / "none").mkdir()
    meta = json.loads((RUN / "meta.json").read_text())
    none = small_run(tmp_path / "none", meta={"kv_cache": {**meta["kv_cache"], "num_gpu_blocks": None}})
    err = _error(capsys, ["validate", str(none), "--recorded-kv-cache"])
    assert "meta.json" in err and "kv_cache.num_gpu_blocks" in err and "None" in err
    assert "serving runs only" in _error(capsys, ["validate", "--recorded-kv-cache"])


@pytest.mark.parametrize("recorded_kv_cache", [True, False])
def test_the_engine_model_alone_meets_the_5_percent_target_on_the_development_run(recorded_kv_cache):
    """On the GPU's measured kernels (LLMServingSim's profile of the 4090 and the model, not of this run), with
    the KV blocks the run recorded or those the memory model computes, the V1 engine model puts every figure
    issue 12's target names within 5% of the real vLLM run: what is left of the datasheet replay's error is
    the GPU's kernel times."""
    profile = RUN.parents[1] / "profiles" / "rtx4090_llama-3.1-8b"
    s = replay_serving_run(RUN, profile=profile, recorded_kv_cache=recorded_kv_cache, band=False,
                           trace_steps=False).summary
    for m in ("ttft_mean_s", "ttft_p50_s", "tpot_mean_s", "tpot_p50_s", "e2e_mean_s", "e2e_p50_s", "throughput_rps"):
        assert abs(s[f"error_{m}"]) < 0.05, (m, s[f"error_{m}"])


def test_num_gpu_blocks_override_sizes_the_cache_over_kv_bytes(tmp_path):
    """engine_kwargs.num_gpu_blocks_override: that many blocks (vllm/v1/core/kv_cache_utils.py), over
    kv_cache_memory_bytes too; more than the GPU holds besides the weights does not fit."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    both = _kwargs(num_gpu_blocks_override=3000, kv_cache_memory_bytes=2**30)
    assert replay_serving_run(small_run(tmp_path / "a", meta=both), band=False).summary["predicted_kv_blocks"] == 3000
    with pytest.raises(DoesNotFitError, match="num_gpu_blocks_override"):  # 20,000 blocks = 39 GiB on a 24 GB 4090
        replay_serving_run(small_run(tmp_path / "b", meta=_kwargs(num_gpu_blocks_override=20000)), band=False)


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
    # the offline LLM(...) class's defaults (vllm/engine/arg_utils.py get_batch_defaults): 8192 on a 24 GiB GPU
    assert main(["run", "--gpu", "rtx4090", "--policy", "none", "--workload", str(wl), "--max-model-len", "8192",
                 "--vllm-version", "0.19.0", "--entry-point", "llm", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["max_num_batched_tokens"] == 8192


def test_an_entry_point_without_a_vllm_version_is_named(tmp_path, capsys):
    wl = tmp_path / "w.csv"
    wl.write_text("prompt_len,output_len,arrival\n300,20,0\n")
    err = _error(capsys, ["run", "--gpu", "rtx4090", "--policy", "none", "--workload", str(wl), "--entry-point", "llm"])
    assert "--entry-point" in err and "--vllm-version" in err


# ---- runs recorded on other engines, GPUs and models (what a held-out run may carry) ----
RUNNER_KWARGS = {  # what LLMServingSim's bench runner records beside the engine's own settings
    "disable_custom_all_reduce": True, "kv_cache_memory_bytes": None, "load_format": "dummy",
    "skip_tokenizer_init": True, "enforce_eager": False,
    "compilation_config": {"pass_config": {"fuse_allreduce_rms": False, "fuse_gemm_comms": False}}}


def _kwargs(**kw) -> dict:
    return {"engine_kwargs": {**json.loads((RUN / "meta.json").read_text())["engine_kwargs"], **kw}}


def test_runner_kwargs_that_do_not_change_timing_replay_as_the_plain_run(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    plain = plan_replay(small_run(tmp_path / "a", meta=_kwargs()))
    recorded = plan_replay(small_run(tmp_path / "b", meta=_kwargs(**RUNNER_KWARGS)))
    assert recorded.engine == plain.engine and recorded.cost_kw == plain.cost_kw


@pytest.mark.parametrize("kw,field", [
    ({"data_parallel_size": 2}, "data_parallel_size=2"),
    ({"compilation_config": {"pass_config": {}, "custom_ops": ["+rms_norm"]}}, "compilation_config.custom_ops"),
    ({"speculative_config": {"num_speculative_tokens": 3}}, "speculative_config"),
])
def test_settings_not_modelled_are_named(tmp_path, kw, field):
    with pytest.raises(ConfigError, match=field.replace("+", r"\+")):
        plan_replay(small_run(tmp_path, meta=_kwargs(**kw)))


def test_kv_cache_dtype_and_explicit_kv_bytes_size_the_cache(tmp_path):
    runs = {}
    for name, kw in (("auto", {}), ("fp8", {"kv_cache_dtype": "fp8"}), ("bytes", {"kv_cache_memory_bytes": 4 * 2**30})):
        (tmp_path / name).mkdir()
        runs[name] = replay_serving_run(small_run(tmp_path / name, meta=_kwargs(**kw)), band=False).summary
    auto, fp8 = runs["auto"]["predicted_kv_blocks"], runs["fp8"]["predicted_kv_blocks"]
    assert abs(fp8 - 2 * auto) <= 1  # one byte per element instead of two: twice the blocks in the same budget
    # vllm/v1/worker/gpu_worker.py: kv_cache_memory_bytes is the cache, whatever gpu_memory_utilization says
    per_block = 16 * model_for_hf_id("meta-llama/Llama-3.1-8B").kv_bytes_per_token
    assert runs["bytes"]["predicted_kv_blocks"] == 4 * 2**30 // per_block


@pytest.mark.parametrize("recorded,graphs,mode", [
    ([2, 1], True, "piecewise"), (0, False, None), (1, True, "piecewise_only"), ([2, 0], True, "decode"),
    ("CUDAGraphMode.FULL", True, "full")])
def test_resolved_cudagraph_mode_sets_the_graph_replay(tmp_path, recorded, graphs, mode):
    meta = json.loads((RUN / "meta.json").read_text())
    meta["resolved_config"]["compilation_config"]["cudagraph_mode"] = recorded
    kw = plan_replay(small_run(tmp_path, meta=meta)).cost_kw
    assert kw["cuda_graphs"] is graphs and (not graphs or kw["graph_mode"] == mode)


def test_unknown_cudagraph_mode_is_named(tmp_path):
    meta = json.loads((RUN / "meta.json").read_text())
    meta["resolved_config"]["compilation_config"]["cudagraph_mode"] = [3, 3]
    with pytest.raises(ConfigError, match="cudagraph_mode"):
        plan_replay(small_run(tmp_path, meta=meta))


def test_multi_gpu_runs_replay_on_per_gpu_shards(tmp_path):
    meta = _kwargs(model="meta-llama/Llama-3.1-70B-Instruct", tensor_parallel_size=2, max_model_len=8192)
    meta.update(model="meta-llama/Llama-3.1-70B-Instruct",
                hardware={"device_name": "NVIDIA H100 80GB HBM3", "device_total_memory_bytes": 85029158912})
    c = replay_serving_run(small_run(tmp_path, meta=meta), band=False)
    assert c.engine.tensor_parallel == 2 and c.gpu.name == "H100-SXM5-80GB"
    # each GPU holds half of the 70B's 141 GB, so its KV cache is what the other half of 0.9 x 79.2 GiB leaves
    assert c.result.memory.weights_resident == pytest.approx(c.model.weight_total_bytes / 2, rel=0.01)
    assert c.summary["predicted_ttft_mean_s"] > 0


@pytest.mark.parametrize("hf_id,name", [
    ("Qwen/Qwen3-32B", "qwen3-32b"), ("Qwen/Qwen2.5-7B-Instruct", "qwen2.5-7b"),
    ("mistralai/Mistral-7B-Instruct-v0.3", "mistral-7b-v0.3"), ("meta-llama/Llama-3.2-3B-Instruct", "llama-3.2-3b")])
def test_hf_ids_of_other_families_map_to_catalog_shapes(hf_id, name):
    assert model_for_hf_id(hf_id).name == name


@pytest.mark.parametrize("config", [
    {"architectures": ["Qwen3ForCausalLM"], "hidden_size": 5120, "num_hidden_layers": 64, "num_attention_heads": 64,
     "num_key_value_heads": 8, "head_dim": 128, "intermediate_size": 25600, "vocab_size": 151936,
     "max_position_embeddings": 40960, "tie_word_embeddings": False, "sliding_window": None,
     "use_sliding_window": False, "torch_dtype": "bfloat16", "_name_or_path": "Qwen/Qwen3-32B"},
    {"architectures": ["Qwen2ForCausalLM"], "hidden_size": 3584, "num_hidden_layers": 28, "num_attention_heads": 28,
     "num_key_value_heads": 4, "intermediate_size": 18944, "vocab_size": 152064, "max_position_embeddings": 32768,
     "tie_word_embeddings": False, "sliding_window": 131072, "use_sliding_window": False, "torch_dtype": "bfloat16",
     "_name_or_path": "Qwen/Qwen2.5-7B-Instruct"},
])
def test_catalog_qwen_shapes_are_what_their_published_config_builds(tmp_path, config):
    """The catalog's Qwen entries and --model config.json agree (biases, q/k norms, GQA, vocab)."""
    import dataclasses

    from offloadlab.hf_config import model_from_hf_config

    (tmp_path / "config.json").write_text(json.dumps(config))
    built = model_from_hf_config(tmp_path / "config.json")
    catalog = model_for_hf_id(config["_name_or_path"])
    assert dataclasses.replace(built, name=catalog.name) == catalog


@pytest.mark.parametrize("version", [None, "unknown", ""])
def test_a_run_without_a_readable_vllm_version_says_how_to_give_one(tmp_path, version):
    d = small_run(tmp_path, meta={"vllm_version": version})
    with pytest.raises(ConfigError, match="--vllm-version"):
        plan_replay(d)
    assert plan_replay(d, vllm_version="0.19.0").engine.scheduler == "v1"
    with pytest.raises(ConfigError, match="--vllm-version='x.y'"):
        plan_replay(d, vllm_version="x.y")
