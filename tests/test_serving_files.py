"""One reader of a serving run's files (offloadlab/serving_files.py) for the simulator's workload source and
validation's replay: the same rows, the same one-style errors, each caller's own leniency; and
`offloadlab validate <serving run>` prints and writes without pandas."""
from __future__ import annotations

import io
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from offloadlab.errors import ConfigError
from offloadlab.serving_files import REQUEST_FIELDS, read_requests, read_timeseries
from offloadlab.sim.workload import from_file, from_serving_run
from offloadlab.validation.serving_run import load_serving_run, serving_requests

RUN = Path(__file__).resolve().parents[1] / "validation" / "traces" / "serving" / "rtx4090_llama-3.1-8b"
WORKLOAD_FIELDS = ("input_toks", "output_toks", "queued_ts")


def write_run(d: Path, rows: list, timeseries: str | None = None) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "meta.json").write_text((RUN / "meta.json").read_text())
    (d / "requests.jsonl").write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    if timeseries is not None:
        (d / "timeseries.csv").write_text(timeseries)
    return d


@st.composite
def valid_rows(draw):
    n = draw(st.integers(1, 8))
    times = st.floats(0, 1e6, allow_nan=False, allow_infinity=False)
    rows = []
    for i in range(n):
        q, a, b = draw(times), draw(st.floats(0, 100)), draw(st.floats(0, 100))
        rows.append({"request_id": draw(st.sampled_from([f"r{i}", i])), "input_toks": draw(st.integers(1, 10**6)),
                     "output_toks": draw(st.integers(1, 10**4)), "queued_ts": q, "first_token_ts": q + a,
                     "last_token_ts": q + a + b})
    return rows


_DIR = tempfile.TemporaryDirectory(prefix="offloadlab-serving-files-")


@settings(max_examples=60, deadline=None)
@given(valid_rows())
def test_both_callers_read_the_same_requests(rows):
    d = write_run(Path(_DIR.name) / "run", rows)
    cols = read_requests(d)
    assert cols["request_id"].tolist() == [str(r["request_id"]) for r in rows]
    for f in REQUEST_FIELDS[1:]:
        assert cols[f].tolist() == [r[f] for r in rows]
    q0 = min(r["queued_ts"] for r in rows)
    assert cols["arrival"].tolist() == [r["queued_ts"] - q0 for r in rows] and cols["arrival"].min() == 0.0
    wl = from_serving_run(d)
    assert [(r.id, r.prompt_len, r.output_len, r.arrival) for r in sorted(wl.requests, key=lambda r: r.id)] == [
        (i, r["prompt_len"], r["output_len"], r["arrival"]) for i, r in enumerate(serving_requests(d))]


def test_the_workload_source_keeps_its_leniency(tmp_path):
    """Lengths and queue times are all a workload needs: no request_id, no token times (a run recorded
    without them still replays), while validation names the first field it lacks."""
    d = write_run(tmp_path / "run", [{"input_toks": 5, "output_toks": 2, "queued_ts": 3.5},
                                     {"input_toks": 7, "output_toks": 1, "queued_ts": 3.0, "last_token_ts": 1.0}])
    wl = from_serving_run(d)
    assert [(r.prompt_len, r.output_len, r.arrival) for r in sorted(wl.requests, key=lambda r: r.id)] == [
        (5, 2, 0.5), (7, 1, 0.0)]
    with pytest.raises(ConfigError, match=r"requests.jsonl, line 1: request_id=None: expected present"):
        load_serving_run(d)


BAD_CELLS = [  # (field, value, expectation)
    ("input_toks", 0, "an integer >= 1"),
    ("input_toks", 2.0, "an integer >= 1"),
    ("output_toks", True, "an integer >= 1"),
    ("output_toks", "3", "an integer >= 1"),
    ("output_toks", 2**63, f"an integer in [1, {2**63 - 1}]"),
    ("queued_ts", None, "a finite time in seconds"),
    ("queued_ts", 10**400, "a finite time in seconds"),
    ("queued_ts", "1.0", "a finite time in seconds"),
]


@settings(max_examples=60, deadline=None)
@given(rows=valid_rows(), where=st.integers(0, 7), bad=st.sampled_from(BAD_CELLS), blank=st.booleans())
def test_a_bad_cell_is_named_by_file_line_field_and_value_alike_by_both(rows, where, bad, blank):
    field, value, expectation = bad
    where %= len(rows)
    rows[where][field] = value
    lines = [json.dumps(r) for r in rows]
    if blank:  # blank lines are skipped, and still counted
        lines.insert(0, "")
    d = write_run(Path(_DIR.name) / "bad", lines)
    expected = f"{d / 'requests.jsonl'}, line {where + 1 + blank}: {field}={value!r}: expected {expectation}"
    for read in (load_serving_run, from_serving_run):
        with pytest.raises(ConfigError) as e:
            read(d)
        assert str(e.value) == expected


@pytest.mark.parametrize("line,tail", [
    ("{not json",
     "row='{not json': expected a JSON object per line (Expecting property name enclosed in double quotes)"),
    ("[1, 2]", "row='[1, 2]': expected a JSON object per line"),
    ("[" * 5000, f"row='{'[' * 57}...': expected a JSON object per line (nested too deeply)"),
])
def test_a_line_that_is_not_an_object_is_one_error_alike_by_every_reader(tmp_path, line, tail):
    """One JSON-lines reader (offloadlab/fileio.py read_json_lines) for a serving run's requests and a JSONL
    workload file: the same error, naming the file's line (blank lines counted)."""
    d = write_run(tmp_path / "run", ["", {"request_id": 1, "input_toks": 5, "output_toks": 2, "queued_ts": 1.0,
                                          "first_token_ts": 2.0, "last_token_ts": 3.0}, line])
    wl = tmp_path / "w.jsonl"
    wl.write_text('\n{"prompt_len": 5, "output_len": 2}\n' + line + "\n")
    for read, path, file in ((load_serving_run, d, d / "requests.jsonl"), (from_serving_run, d, d / "requests.jsonl"),
                             (from_file, wl, wl)):
        with pytest.raises(ConfigError) as e:
            read(path)
        assert str(e.value) == f"{file}, line 3: {tail}"


def test_a_byte_order_mark_is_read_past_by_every_reader(tmp_path):
    """A JSON-lines file saved with a UTF-8 byte-order mark (some Windows editors write one) reads as without."""
    rows = [{"request_id": "a", "input_toks": 5, "output_toks": 2, "queued_ts": 1.0, "first_token_ts": 2.0,
             "last_token_ts": 3.0}, {"request_id": "b", "input_toks": 7, "output_toks": 1, "queued_ts": 1.5,
                                     "first_token_ts": 2.5, "last_token_ts": 2.5}]
    plain, bom = write_run(tmp_path / "plain", rows), write_run(tmp_path / "bom", rows)
    (bom / "requests.jsonl").write_bytes(b"\xef\xbb\xbf" + (plain / "requests.jsonl").read_bytes())
    for f in REQUEST_FIELDS + ("arrival",):
        assert read_requests(bom)[f].tolist() == read_requests(plain)[f].tolist()
    assert from_serving_run(bom).requests == from_serving_run(plain).requests
    wl = tmp_path / "w.jsonl"
    wl.write_bytes(b'\xef\xbb\xbf{"prompt_len": 5, "output_len": 2}\n')
    assert [(r.prompt_len, r.output_len) for r in from_file(wl).requests] == [(5, 2)]


def test_a_meta_json_nested_too_deeply_is_one_error(tmp_path):
    d = write_run(tmp_path / "run", [{"request_id": 1, "input_toks": 5, "output_toks": 2, "queued_ts": 1.0,
                                      "first_token_ts": 2.0, "last_token_ts": 3.0}])
    (d / "meta.json").write_text("[" * 100000)
    with pytest.raises(ConfigError) as e:
        load_serving_run(d)
    assert str(e.value).startswith(f"{d / 'meta.json'}: meta.json='nested too deeply': expected JSON nested less")


def test_a_directory_without_its_files_is_named_alike_by_both(tmp_path):
    for read in (load_serving_run, from_serving_run):
        with pytest.raises(ConfigError, match=r"meta.json=None: expected present in the serving-run directory"):
            read(tmp_path)
        (tmp_path / "meta.json").write_text("{}")
        with pytest.raises(ConfigError, match=r"requests.jsonl=None: expected present"):
            read(tmp_path)
        (tmp_path / "meta.json").unlink()
    with pytest.raises(ConfigError, match="a serving-run directory"):
        read_requests(tmp_path / "absent")


# ---- timeseries.csv: the columns the replay's plot draws, as pandas' read_csv gives them ----
cells = st.one_of(st.integers(-10**6, 10**6).map(str), st.floats(-1e6, 1e6).map(repr),
                  st.integers(0, 99).map(lambda i: f"{i}.0"))


@settings(max_examples=100, deadline=None)
@given(extra=st.lists(st.sampled_from(["kv_cache_pct", "gen_throughput", "note"]), unique=True, max_size=2),
       n=st.integers(0, 6), data=st.data())
def test_timeseries_columns_are_pandas_own(extra, n, data):
    header = data.draw(st.permutations(["t", "running", "waiting", *extra]))
    extra_cells = cells | st.sampled_from(["", "NA", "nan", "x_1"])  # other columns: anything, never read
    rows = [[data.draw(st.sampled_from(["a", "b c"]) if c == "note" else extra_cells if c in extra else cells)
             for c in header] for _ in range(n)]
    text = "\n".join(",".join(r) for r in [header, *rows]) + "\n"
    d = Path(_DIR.name) / "ts"
    d.mkdir(exist_ok=True)
    (d / "timeseries.csv").write_text(text)
    cols = read_timeseries(d)
    frame = pd.read_csv(io.StringIO(text), usecols=["t", "running", "waiting"])
    assert list(cols) == list(frame.columns)  # t, running, waiting in the file's order; nothing else
    for c in frame.columns:
        mine, theirs = cols[c], frame[c].to_numpy()
        if n:  # an empty column's dtype is pandas' guess
            assert mine.dtype.kind == theirs.dtype.kind, (c, mine.dtype, theirs.dtype)
        np.testing.assert_array_equal(mine, theirs)


def test_the_stored_runs_timeseries_is_read_as_pandas_reads_it():
    run = load_serving_run(RUN)
    frame = pd.read_csv(RUN / "timeseries.csv", usecols=["t", "running", "waiting"])
    assert run.timeseries.equals(frame)
    assert list(run.timeseries_columns) == list(frame.columns)
    assert read_timeseries(RUN.parent) is None  # no timeseries.csv: none


def test_the_stored_run_reads_as_the_dataframe_it_was():
    """``ServingRun.requests`` (made on first use) is the frame the pandas reader built."""
    run = load_serving_run(RUN)
    rows = [json.loads(line) for line in (RUN / "requests.jsonl").read_text().splitlines()]
    df = pd.DataFrame({"request_id": [r["request_id"] for r in rows], "prompt_len": [r["input_toks"] for r in rows],
                       "output_len": [r["output_toks"] for r in rows],
                       **{k: [r[k] for r in rows] for k in ("queued_ts", "first_token_ts", "last_token_ts")}})
    df["arrival"] = df["queued_ts"] - df["queued_ts"].min()
    df["ttft"] = df["first_token_ts"] - df["queued_ts"]
    df["tpot"] = (df["last_token_ts"] - df["first_token_ts"]) / np.maximum(1, df["output_len"] - 1)
    df["e2e"] = df["last_token_ts"] - df["queued_ts"]
    assert run.requests.equals(df)


# ---- the command ----
@pytest.mark.parametrize("extra", [[], ["--json", "{tmp}/r.json"]])
def test_validate_of_a_serving_run_imports_no_pandas(tmp_path, extra):
    """pandas' import is ~0.4 s of a ~1 s command: the replay prints its table and writes --json without it."""
    argv = ["validate", str(RUN), *[a.replace("{tmp}", str(tmp_path)) for a in extra]]
    code = ("import sys; from offloadlab.apps.cli import main; rc = main(%r); "
            "sys.exit(10 if 'pandas' in sys.modules else rc)" % (argv,))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:] + ("\npandas was imported" if done.returncode == 10 else "")
    assert "TTFT mean s" in done.stdout and "throughput req/s" in done.stdout
    if extra:
        doc = json.loads((tmp_path / "r.json").read_text())
        assert len(doc["requests"]) == 300 and doc["summary"]["requests"] == 300
