"""Tests of offloadlab.sim.workload: generators, arrivals, files and the CLI builder."""
from __future__ import annotations

import csv
import io
import json
import math
import tempfile
from importlib import resources
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from offloadlab.errors import ConfigError
from offloadlab.sim.workload import (
    Request,
    Workload,
    all_at_once,
    dataset_names,
    fixed,
    from_dataset_stats,
    from_file,
    from_vllm_result,
    longbench_multi_news,
    make_workload,
    poisson,
)


def catalog() -> dict[str, dict[str, str]]:
    """The packaged workloads.csv, read independently of the module under test."""
    text = resources.files("offloadlab.catalog").joinpath("workloads.csv").read_text()
    return {row["dataset"]: row for row in csv.DictReader(io.StringIO(text))}


FITTED = [name for name, row in catalog().items() if row["prompt_p50"] and row["output_p50"]]
MULTI_NEWS = catalog()["longbench_multi_news"]


def lengths(w: Workload) -> list[tuple[int, int, int, float]]:
    return [(r.id, r.prompt_len, r.output_len, r.arrival) for r in w.requests]


# ---- Request / Workload ------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(id=0, prompt_len=0, output_len=1), "prompt_len"),
        (dict(id=0, prompt_len=1, output_len=0), "output_len"),
        (dict(id=0, prompt_len=1.5, output_len=1), "prompt_len"),
        (dict(id=0, prompt_len=True, output_len=1), "prompt_len"),
        (dict(id=-1, prompt_len=1, output_len=1), "id"),
        (dict(id=0, prompt_len=1, output_len=1, arrival=-0.1), "arrival"),
        (dict(id=0, prompt_len=1, output_len=1, arrival=float("nan")), "arrival"),
    ],
)
def test_request_rejects_bad_fields(kwargs, field):
    with pytest.raises(ConfigError) as e:
        Request(**kwargs)
    assert field in str(e.value)


def test_request_is_frozen_with_slots_and_normalizes_numpy_ints():
    r = Request(np.int64(3), np.int32(10), 5, 1)
    assert type(r.id) is int and type(r.prompt_len) is int and type(r.arrival) is float
    assert not hasattr(r, "__dict__")
    with pytest.raises(AttributeError):
        r.prompt_len = 2  # type: ignore[misc]


def test_workload_sorts_by_arrival_then_id_and_rejects_duplicates():
    w = Workload("w", (Request(2, 1, 1, 0.5), Request(1, 1, 1, 0.5), Request(0, 1, 1, 1.0)))
    assert [r.id for r in w.requests] == [1, 2, 0]
    assert w.n == len(w) == 3
    with pytest.raises(ConfigError, match="id"):
        Workload("w", (Request(0, 1, 1), Request(0, 2, 2)))
    with pytest.raises(ConfigError, match="requests"):
        Workload("w", ())


def test_to_frame_and_describe():
    w = Workload("w", tuple(Request(i, 10 * (i + 1), i + 1, float(i)) for i in range(4)))
    df = w.to_frame()
    assert list(df.columns) == ["id", "prompt_len", "output_len", "arrival"]
    assert df["prompt_len"].tolist() == [10, 20, 30, 40]
    assert df.dtypes["arrival"] == np.float64
    d = w.describe()
    assert d["requests"] == 4
    assert d["prompt_mean"] == 25.0 and d["prompt_p50"] == 25.0 and d["prompt_max"] == 40
    assert d["output_mean"] == 2.5
    assert d["prompt_p90"] == pytest.approx(np.percentile([10, 20, 30, 40], 90))
    assert d["total_tokens"] == 100 + 10 == d["prompt_tokens"] + d["output_tokens"]
    assert d["duration_s"] == 3.0


def test_with_arrivals_assigns_by_id_and_resorts():
    w = fixed(3, 8, 4).with_arrivals([2.0, 0.0, 1.0])
    assert [(r.id, r.arrival) for r in w.requests] == [(1, 0.0), (2, 1.0), (0, 2.0)]
    # assigning again still goes by id, not by the current order
    w2 = w.with_arrivals([0.0, 1.0, 2.0])
    assert [(r.id, r.arrival) for r in w2.requests] == [(0, 0.0), (1, 1.0), (2, 2.0)]
    with pytest.raises(ConfigError, match="arrivals"):
        w.with_arrivals([0.0, 1.0])
    with pytest.raises(ConfigError, match="arrivals"):
        w.with_arrivals([0.0, -1.0, 1.0])


# ---- length generators ----------------------------------------------------------------------------
def test_fixed():
    w = fixed(5, 128, 16)
    assert w.n == 5
    assert {(r.prompt_len, r.output_len, r.arrival) for r in w.requests} == {(128, 16, 0.0)}
    with pytest.raises(ConfigError, match="n"):
        fixed(0, 1, 1)
    with pytest.raises(ConfigError, match="prompt_len"):
        fixed(1, 0, 1)


@pytest.mark.parametrize(
    "make",
    [
        lambda seed: longbench_multi_news(n=300, seed=seed),
        *[(lambda d: lambda seed: from_dataset_stats(d, 300, seed=seed))(d) for d in FITTED],
        lambda seed: make_workload("sharegpt_8k", n=50, seed=seed, rate=3.0),
    ],
)
def test_generators_are_deterministic(make):
    assert lengths(make(7)) == lengths(make(7))
    assert make(7) == make(7)
    assert lengths(make(7)) != lengths(make(8))


def test_multi_news_defaults_match_the_published_figures():
    w = longbench_multi_news()
    assert w.n == int(MULTI_NEWS["requests"])
    assert {r.output_len for r in w.requests} == {int(MULTI_NEWS["output_p99"])}
    # "within a few percent" for the paper's 200 requests
    assert w.describe()["prompt_mean"] == pytest.approx(float(MULTI_NEWS["prompt_mean"]), rel=0.05)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_multi_news_large_sample_mean_and_outputs(seed):
    w = longbench_multi_news(n=2000, seed=seed)
    d = w.describe()
    assert d["prompt_mean"] == pytest.approx(float(MULTI_NEWS["prompt_mean"]), rel=0.05)
    assert all(r.output_len == 512 for r in w.requests)
    assert min(r.prompt_len for r in w.requests) >= 16


def test_multi_news_options():
    w = longbench_multi_news(n=500, seed=0, prompt_mean=1000, output_len=64, sigma=0.0)
    assert {(r.prompt_len, r.output_len) for r in w.requests} == {(1000, 64)}
    w = longbench_multi_news(n=2000, seed=0, max_prompt=2500)
    assert max(r.prompt_len for r in w.requests) == 2500
    for kw, field in [({"sigma": -1.0}, "sigma"), ({"prompt_mean": 0}, "prompt_mean"),
                      ({"max_prompt": 4}, "max_prompt"), ({"seed": -1}, "seed"), ({"n": 0}, "n")]:
        with pytest.raises(ConfigError, match=field):
            longbench_multi_news(**kw)


@pytest.mark.parametrize("dataset", FITTED)
def test_fitted_datasets_reproduce_published_percentiles(dataset):
    row = catalog()[dataset]
    w = from_dataset_stats(dataset, 20000, seed=0)
    df = w.to_frame()
    for which in ("prompt", "output"):
        col = df[f"{which}_len"]
        assert col.median() == pytest.approx(float(row[f"{which}_p50"]), rel=0.10)
        assert col.quantile(0.9) == pytest.approx(float(row[f"{which}_p90"]), rel=0.10)
        assert col.min() >= 1
        assert col.max() <= math.ceil(1.5 * float(row[f"{which}_p99"]))


def test_dataset_multi_news_redirects_and_unknown_dataset_lists_known():
    assert lengths(from_dataset_stats("longbench_multi_news", 50, seed=3)) == lengths(
        longbench_multi_news(n=50, seed=3))
    with pytest.raises(ConfigError) as e:
        from_dataset_stats("no_such_dataset", 10)
    for name in catalog():
        assert name in str(e.value)
    assert set(dataset_names()) == set(catalog())


# ---- arrivals ------------------------------------------------------------------------------------
def test_all_at_once():
    a = all_at_once(4)
    assert a.dtype == np.float64 and a.tolist() == [0.0] * 4


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 500), rate=st.floats(1e-3, 1e4), seed=st.integers(0, 2**32 - 1))
def test_poisson_arrivals_non_decreasing_and_deterministic(n, rate, seed):
    a = poisson(n, rate, seed)
    assert a.shape == (n,)
    assert np.all(a >= 0) and np.all(np.isfinite(a))
    assert np.all(np.diff(a) >= 0)
    assert np.array_equal(a, poisson(n, rate, seed))


@pytest.mark.parametrize("rate", [0.5, 4.0, 100.0])
def test_poisson_mean_rate(rate):
    n = 20000
    a = poisson(n, rate, seed=1)
    assert n / a[-1] == pytest.approx(rate, rel=0.03)
    assert np.mean(np.diff(a)) == pytest.approx(1 / rate, rel=0.03)


@pytest.mark.parametrize("rate", [0, -1.0, float("nan"), float("inf"), "2"])
def test_poisson_rejects_bad_rate(rate):
    with pytest.raises(ConfigError, match="rate"):
        poisson(10, rate, 0)


@settings(max_examples=60, deadline=None)
@given(
    reqs=st.lists(st.tuples(st.integers(1, 10**6), st.integers(1, 10**6),
                            st.floats(0, 1e7, allow_nan=False, allow_infinity=False)), min_size=1, max_size=40),
    limit=st.one_of(st.none(), st.integers(1, 64)),
)
def test_a_pickled_workload_comes_back_equal_in_the_same_order(reqs, limit):
    # Workload.__reduce__ sends columns to a worker process (the band's corners): the same requests, same
    # types (ints, float arrivals to the bit), same order, same limit
    import pickle

    w = Workload("w", tuple(Request(i, p, o, a) for i, (p, o, a) in enumerate(reqs)), limit)
    back = pickle.loads(pickle.dumps(w))
    assert back == w and back.requests == w.requests and back.max_concurrency == limit
    assert [tuple(map(type, (r.id, r.prompt_len, r.output_len, r.arrival))) for r in back.requests] == \
        [(int, int, int, float)] * len(reqs)
    assert [r.arrival.hex() for r in back.requests] == [r.arrival.hex() for r in w.requests]


@pytest.mark.parametrize("make", [lambda: longbench_multi_news(n=500, seed=3), lambda: fixed(7, 3, 2),
                                  lambda: from_dataset_stats("sharegpt_8k", 400, seed=1)])
def test_generated_requests_are_those_the_checked_constructor_makes(make):
    # the generators' integer draws skip Request's per-field checks (workload._build): the same requests
    w = make()
    assert w.requests == tuple(Request(r.id, r.prompt_len, r.output_len, r.arrival) for r in w.requests)
    assert all(type(r.prompt_len) is int and type(r.output_len) is int and type(r.arrival) is float
               for r in w.requests)


# ---- files -----------------------------------------------------------------------------------------
@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 30),
    seed=st.integers(0, 1000),
    rate=st.one_of(st.none(), st.floats(0.01, 1000)),
    suffix=st.sampled_from([".csv", ".jsonl"]),
)
def test_save_from_file_round_trip(n, seed, rate, suffix):
    w = make_workload("splitwise_conv", n=n, seed=seed, rate=rate)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / f"trace{suffix}"
        w.save(path)
        back = from_file(path)
    assert back.name == "trace"
    assert back.requests == w.requests


def test_save_is_atomic_and_reads_with_pandas(tmp_path):
    w = make_workload("multi_news", n=10, rate=1.0)
    path = w.save(tmp_path / "sub" / "w.csv")
    assert [p.name for p in path.parent.iterdir()] == ["w.csv"]  # no temp file left behind
    df = pd.read_csv(path)
    pd.testing.assert_frame_equal(df, w.to_frame())


def test_from_file_optional_columns_and_extra_columns(tmp_path):
    p = tmp_path / "t.csv"
    p.write_text("prompt_len,output_len,note\n10,2,a\n\n20,3,b\n")
    w = from_file(p)
    assert lengths(w) == [(0, 10, 2, 0.0), (1, 20, 3, 0.0)]
    j = tmp_path / "t.jsonl"
    j.write_text('{"prompt_len": 5, "output_len": 1, "arrival": 2.5}\n\n{"prompt_len": 6, "output_len": 2, "arrival": 0}\n')
    assert lengths(from_file(j)) == [(1, 6, 2, 0.0), (0, 5, 1, 2.5)]


@pytest.mark.parametrize("column, field", [("arrival_s", "arrival"), ("arrival_time", "arrival"), ("Arrival", "arrival"),
                                           ("arival", "arrival"), ("ID", "id"), ("ids", "id")])
@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_from_file_a_column_close_to_an_absent_optional_one_is_an_error(tmp_path, column, field, suffix):
    # Ignored, 'arrival_s' would silently put every request at t = 0.
    p = tmp_path / f"w{suffix}"
    if suffix == ".csv":
        p.write_text(f"prompt_len,output_len,{column}\n10,2,1\n")
    else:
        p.write_text(json.dumps({"prompt_len": 10, "output_len": 2, column: 1}) + "\n")
    with pytest.raises(ConfigError) as e:
        from_file(p)
    msg = str(e.value)
    assert repr(column) in msg and repr(field) in msg and ("column" if suffix == ".csv" else "key") in msg
    assert "rename" in msg


@pytest.mark.parametrize("header", ["prompt_len,output_len,request_id,timestamp,note",
                                    "prompt_len,output_len,arrival,arrival_s,id,ids"])
def test_from_file_columns_far_from_or_beside_the_optional_ones_are_ignored(tmp_path, header):
    p = tmp_path / "w.csv"
    n = header.count(",") + 1
    p.write_text(header + "\n" + ",".join(["7"] * n) + "\n")
    (r,) = from_file(p).requests
    assert (r.prompt_len, r.output_len) == (7, 7)
    assert r.arrival == (7.0 if "arrival," in header else 0.0)


CSV_HEAD = "prompt_len,output_len,arrival\n"


@pytest.mark.parametrize(
    "name, text, field, row",
    [
        ("missing.csv", "prompt_len,arrival\n10,0\n", "output_len", 1),
        ("nonint.csv", CSV_HEAD + "10,5,0\n12.5,5,0\n", "prompt_len", 2),
        ("text.csv", CSV_HEAD + "10,5,0\n10,5,0\nabc,5,0\n", "prompt_len", 3),
        ("zero.csv", CSV_HEAD + "10,0,0\n", "output_len", 1),
        ("empty_cell.csv", CSV_HEAD + "10,,0\n", "output_len", 1),
        ("negarr.csv", CSV_HEAD + "10,5,0\n10,5,-1\n", "arrival", 2),
        ("badarr.csv", CSV_HEAD + "10,5,soon\n", "arrival", 1),
        ("ragged.csv", CSV_HEAD + "10,5,0,9\n", "row", 1),
        ("dupid.csv", "id,prompt_len,output_len\n0,1,1\n0,1,1\n", "id", 2),
        ("empty.csv", "", "rows", None),
        ("header_only.csv", CSV_HEAD, "rows", None),
        ("empty.jsonl", "\n\n", "rows", None),
        ("missing.jsonl", '{"prompt_len": 3, "output_len": 1}\n{"prompt_len": 3}\n', "output_len", 2),
        ("float.jsonl", '{"prompt_len": 3.0, "output_len": 1}\n', "prompt_len", 1),
        ("bool.jsonl", '{"prompt_len": 3, "output_len": true}\n', "output_len", 1),
        ("negarr.jsonl", '{"prompt_len": 3, "output_len": 1, "arrival": -2}\n', "arrival", 1),
        ("partial_arrival.jsonl",
         '{"prompt_len": 3, "output_len": 1, "arrival": 1}\n{"prompt_len": 3, "output_len": 1}\n', "arrival", 2),
        ("notjson.jsonl", '{"prompt_len": 3, "output_len": 1}\nnot json\n', "row", 2),
        ("list.jsonl", "[1, 2]\n", "row", 1),
        # JSONL: the file's line, blank lines counted (offloadlab/fileio.py read_json_lines)
        ("blank_notjson.jsonl", '{"prompt_len": 3, "output_len": 1}\n\n \nnot json\n', "row", 4),
        ("blank_missing.jsonl", '\n{"prompt_len": 3, "output_len": 1}\n\n{"prompt_len": 3}\n', "output_len", 4),
    ],
)
def test_malformed_files_raise_config_error_naming_file_field_row(tmp_path, name, text, field, row):
    """The place named: a CSV's data row (the header and blank lines not counted), a JSONL file's line."""
    p = tmp_path / name
    p.write_text(text)
    with pytest.raises(ConfigError) as e:
        from_file(p)
    msg = str(e.value)
    assert str(p) in msg
    assert e.value.field == field and field in msg
    if row is not None:
        assert f"{'line' if name.endswith('.jsonl') else 'row'} {row}: " in msg


@pytest.mark.parametrize("text, needle", [
    ("{not json", "file='line 1': expected valid JSON (Expecting property name"),
    ("[1, 2]", "file='list': expected a JSON object (vllm bench serve --save-result)"),
    ("[" * 100000, "file='nested too deeply': expected JSON nested less deeply"),
])
def test_a_vllm_result_that_is_no_json_object_is_one_error_naming_the_file(tmp_path, text, needle):
    """fileio.read_json_object reads it, as a serving run's meta.json (a deep nesting was a RecursionError)."""
    p = tmp_path / "r.json"
    p.write_text(text)
    with pytest.raises(ConfigError) as e:
        from_vllm_result(p)
    assert str(e.value).startswith(f"{p}: {needle}")


def test_from_file_missing_path(tmp_path):
    with pytest.raises(ConfigError, match="path"):
        from_file(tmp_path / "nope.csv")


# ---- make_workload ---------------------------------------------------------------------------------
def test_make_workload_kinds():
    w = make_workload("multi_news")
    assert w.n == int(MULTI_NEWS["requests"]) and all(r.arrival == 0.0 for r in w.requests)
    assert lengths(w) == lengths(longbench_multi_news())
    assert lengths(make_workload("fixed", n=3, prompt_len=7, output_len=2)) == lengths(fixed(3, 7, 2))
    for d in FITTED:
        assert lengths(make_workload(d, n=20, seed=4)) == lengths(from_dataset_stats(d, 20, seed=4))
    w = make_workload("multi_news", n=10, sigma=0.0, prompt_mean=100, output_len=8)
    assert {(r.prompt_len, r.output_len) for r in w.requests} == {(100, 8)}


@pytest.mark.parametrize("kind, kw", [("multi_news", {}), ("fixed", {"prompt_len": 5, "output_len": 3}),
                                      ("sharegpt_8k", {}), ("sharegpt", {"source": "table"})])
def test_make_workload_without_a_rate_is_the_generators_own_at_t0(kind, kw):
    """Without --rate a synthetic workload is its generator's, every request at t = 0 in id order (the
    generators make them so: no second pass re-times them)."""
    w = make_workload(kind, n=30, seed=3, **kw)
    assert [r.id for r in w.requests] == list(range(30)) and {r.arrival for r in w.requests} == {0.0}
    assert w.requests == w.with_arrivals(all_at_once(30)).requests


def test_make_workload_rate_sets_poisson_arrivals_keeping_lengths():
    base = make_workload("sharegpt_8k", n=2000, seed=5)
    timed = make_workload("sharegpt_8k", n=2000, seed=5, rate=10.0)
    by_id = lambda w: sorted((r.id, r.prompt_len, r.output_len) for r in w.requests)  # noqa: E731
    assert by_id(base) == by_id(timed)
    arr = np.array([r.arrival for r in timed.requests])
    assert np.all(np.diff(arr) >= 0) and arr[0] > 0
    assert timed.n / arr[-1] == pytest.approx(10.0, rel=0.1)


def test_make_workload_file_keeps_arrivals_and_takes_first_n(tmp_path):
    src = make_workload("splitwise_code", n=20, seed=1, rate=2.0)
    path = src.save(tmp_path / "trace.csv")
    assert make_workload(str(path)).requests == src.requests
    assert make_workload(path, n=5).requests == src.requests[:5]
    with pytest.raises(ConfigError, match="n"):
        make_workload(str(path), n=21)
    rerated = make_workload(str(path), rate=50.0)
    assert {r.id for r in rerated.requests} == {r.id for r in src.requests}
    assert rerated.requests != src.requests


@pytest.mark.parametrize(
    "args, kwargs, field",
    [
        (("nonsense",), {}, "workload"),
        (("multi_news",), {"n": 0}, "n"),
        (("multi_news",), {"n": 2.5}, "n"),
        (("multi_news",), {"seed": 1.5}, "seed"),
        (("multi_news",), {"seed": True}, "seed"),
        (("multi_news",), {"rate": 0}, "rate"),
        (("fixed",), {"prompt_len": 4}, "output_len"),
        (("sharegpt_8k",), {"sigma": 1.0}, "sigma"),
        (("multi_news",), {"prompt_len": 3}, "prompt_len"),
    ],
)
def test_make_workload_validates(args, kwargs, field):
    with pytest.raises(ConfigError) as e:
        make_workload(*args, **kwargs)
    assert e.value.field == field


def test_unknown_kind_lists_known():
    with pytest.raises(ConfigError) as e:
        make_workload("nonsense")
    for name in ("multi_news", "fixed", *FITTED):
        assert name in str(e.value)


def test_describe_is_json_serializable():
    d = make_workload("splitwise_conv", n=100, rate=1.0).describe()
    json.dumps(d)


def test_clipped_fits_every_request_into_the_context():
    from offloadlab.sim.workload import from_dataset_stats

    wl = from_dataset_stats("sharegpt_8k", 2000, seed=1)
    fit, changed = wl.clipped(8192)
    long = [r for r in wl.requests if r.prompt_len + r.output_len > 8192]
    assert changed == len(long) > 0
    assert all(r.prompt_len + r.output_len <= 8192 and r.prompt_len >= 1 and r.output_len >= 1 for r in fit.requests)
    short = {r.id: r for r in wl.requests if r.prompt_len + r.output_len <= 8192}
    assert all(short[r.id] == r for r in fit.requests if r.id in short)  # the others are untouched
