"""Result tables without pandas (offloadlab/apps/tables.py, offloadlab.metrics.latency_columns): the same
text, CSV and latencies that pandas gives, and the short commands that print them import no pandas."""
from __future__ import annotations

import io
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from offloadlab.apps.tables import as_lists, columns_of, csv_text, format_table, records
from offloadlab.metrics import latency_columns, summarize, with_latencies

keys = st.sampled_from(["a", "b", "policy", "x y", "c,d"])
# result rows as the commands have them: the same keys in every row, one type per column (floats may be NaN)
typed = {"int": st.integers(-10**12, 10**12), "float": st.floats(allow_infinity=False),
         "str": st.text(st.characters(blacklist_categories=("Cs", "Cc")), min_size=1, max_size=8),
         "bool": st.booleans()}


@st.composite
def result_rows(draw):
    cols = draw(st.lists(keys, min_size=1, max_size=5, unique=True))
    kinds = [draw(st.sampled_from(sorted(typed))) for _ in cols]
    n = draw(st.integers(1, 6))
    return [{c: draw(typed[k]) for c, k in zip(cols, kinds)} for _ in range(n)]


@settings(max_examples=150, deadline=None)
@given(result_rows())
def test_csv_is_pandas_own_csv(rows):
    assert csv_text(rows) == pd.DataFrame(rows).to_csv(index=False)


def test_csv_writes_floats_in_full_and_missing_values_empty():
    text = csv_text([{"a": 0.1 + 0.2, "b": None, "c": float("nan")}, {"a": np.float64(2.5), "b": np.int64(3)}])
    assert text == "a,b,c\n0.30000000000000004,,\n2.5,3,\n"


@settings(max_examples=100, deadline=None)
@given(result_rows())
def test_table_right_aligns_every_cell_under_its_header(rows):
    cols = columns_of(rows)
    lines = format_table(rows, float_format=lambda v: f"{v:.2f}").splitlines()
    assert len(lines) == len(rows) + 1 and len({len(line) for line in lines}) == 1
    end = 0
    for c in cols:  # each column ends two spaces after the previous one's end, at its widest cell
        cells = [c] + [("NaN" if math.isnan(r[c]) else f"{r[c]:.2f}") if isinstance(r[c], float) else str(r[c])
                       for r in rows]
        end += (2 if end else 0) + max(map(len, cells))
        for line, cell in zip(lines, cells):
            assert line[:end].endswith(cell) and line[:end - len(cell)].strip(" ") == line[:end - len(cell)].strip(" ")


def test_table_headers_selected_columns_and_missing_values():
    rows = [{"mode": "p", "tpot": float("nan"), "n": 3, "skip": 1}, {"mode": "pd", "tpot": 0.12345, "n": 10}]
    got = format_table(rows, {"mode": "mode", "tpot": "TPOT", "n": "n", "absent": "never"},
                       float_format=lambda v: f"{v:.3g}")
    assert got.splitlines() == ["mode   TPOT   n", "   p    NaN   3", "  pd  0.123  10"]
    assert as_lists(rows, ["mode", "skip"]) == {"mode": ["p", "pd"], "skip": [1, None]}
    cols = {"a": np.arange(3), "b": ["x", "y", "z"]}
    assert records(cols) == pd.DataFrame(cols).to_dict("records")


def _pandas_latencies(f: pd.DataFrame) -> pd.DataFrame:
    """The pandas formulation the columns must agree with (the one offloadlab.metrics had before)."""
    f = f.copy()
    start = f["sent"] if "sent" in f else f["arrival"]
    f["ttft"] = f["first_token"] - start
    f["tpot"] = (f["finish"] - f["first_token"]) / (f["output_len"] - 1).where(f["output_len"] > 1)
    f["e2e"] = f["finish"] - start
    return f.sort_values("id", ignore_index=True)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 100), st.floats(0, 50), st.floats(1e-3, 5), st.floats(0, 5),
                          st.integers(0, 3)), min_size=1, max_size=40), st.booleans(), st.randoms())
def test_latency_columns_and_summary_agree_with_pandas(reqs, sent, rnd):
    ids = list(range(len(reqs)))
    rnd.shuffle(ids)  # rows in any order: both sort by id
    frame = pd.DataFrame({
        "id": ids, "prompt_len": [7] * len(reqs), "output_len": [r[0] for r in reqs],
        "arrival": [r[1] for r in reqs], "first_token": [r[1] + r[2] for r in reqs],
        "finish": [r[1] + r[2] + r[3] for r in reqs], "preemptions": [r[4] for r in reqs]})
    if sent:
        frame["sent"] = frame["arrival"] + 0.5
    want = _pandas_latencies(frame)
    got = with_latencies(frame)
    pd.testing.assert_frame_equal(got, want, check_dtype=False)
    cols = latency_columns({c: frame[c].to_numpy() for c in frame})
    a, b = summarize(cols), summarize(want)
    assert a.keys() == b.keys()
    for k in a:
        assert a[k] == b[k] or (math.isnan(a[k]) and math.isnan(b[k])), k


@pytest.mark.parametrize("argv", [["run", "--requests", "50"], ["paper", "--requests", "8", "--quiet", "--out", "{tmp}"]])
def test_the_short_commands_import_no_pandas(argv, tmp_path):
    """pandas' import is longer than these commands' simulation: they print and write without it."""
    argv = [a.replace("{tmp}", str(tmp_path / "out")) for a in argv]
    code = ("import sys; from offloadlab.apps.cli import main; rc = main(%r); "
            "sys.exit(10 if 'pandas' in sys.modules else rc)" % (argv,))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:] + ("\npandas was imported" if done.returncode == 10 else "")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="counts threads in /proc")
@pytest.mark.parametrize("given", [None, "3"])
def test_the_program_runs_on_one_blas_thread_unless_told_otherwise(given):
    """cli.console: numpy's OpenBLAS would start a spinning thread per core beside the run and its corners."""
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_NUM_THREADS"}
    if given:
        env["OPENBLAS_NUM_THREADS"] = given
    code = ("import os, sys; from offloadlab.apps import cli; sys.argv = ['offloadlab', 'run', '--requests', '20', "
            "'--no-band']; rc = cli.console(); threads = open('/proc/self/status').read().split('Threads:')[1].split()[0]; "
            "print(os.environ['OPENBLAS_NUM_THREADS'], threads, file=sys.stderr); sys.exit(rc)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    blas, threads = done.stderr.split()[-2:]
    assert blas == (given or "1")
    if not given:
        assert threads == "1"


def test_run_imports_only_what_it_uses():
    """`run` of a generated workload: no numpy.ma (np.percentile's), statistics (a calibrated cost's median),
    difflib (a misspelt --vllm flag) or ShareGPT's readers; each is milliseconds of a 0.4 s command."""
    lazy = ("numpy.ma", "statistics", "difflib", "offloadlab.sim.sharegpt")
    code = ("import sys; from offloadlab.apps.cli import main; rc = main(['run', '--requests', '50']); "
            "print(sorted(m for m in %r if m in sys.modules)); sys.exit(rc)" % (lazy,))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines()[-1] == "[]"
