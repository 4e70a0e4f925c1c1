"""A serving-run directory's files read and checked: ``requests.jsonl`` rows and ``timeseries.csv`` columns.

A serving run (the layout of shared/data/serving/, LLMServingSim's bench format) is a directory holding
``meta.json``, ``requests.jsonl`` (one JSON object per request: request_id, input_toks, output_toks,
queued_ts, first_token_ts, last_token_ts; one monotonic clock, seconds) and optionally ``timeseries.csv``
(one row per tick: t, running, waiting, ...). The simulator's workload source (sim/workload.py
``from_serving_run``: lengths and queue times) and validation's replay (validation/serving_run.py: every
field; of timeseries.csv, the columns its plot draws) read them here, each asking for the fields it
needs; a field or column not asked for is not checked.

Every problem is one ConfigError in one style: the file and line as its source, then the field, its
value and what was expected (``.../requests.jsonl, line 3: output_toks=0: expected an integer >= 1``).
No pandas: a command that prints a replay's summary does not pay its import.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np

from .checks import is_int, is_number
from .errors import ConfigError
from .fileio import read_csv_table, read_json_lines

REQUEST_FIELDS = ("request_id", "input_toks", "output_toks", "queued_ts", "first_token_ts", "last_token_ts")
_INT64_MAX = 2**63 - 1
# what each field must be; the times must also come in this order within a request (each >= the one before)
_TOKENS = ("input_toks", "output_toks")
_TIMES = ("queued_ts", "first_token_ts", "last_token_ts")
TIMESERIES_COLUMNS = ("t", "running", "waiting")


def check_run_dir(path: str | Path) -> Path:
    """``path`` as a directory holding ``meta.json`` and ``requests.jsonl``, else a ConfigError naming what
    is missing."""
    d = Path(path)
    if not d.is_dir():
        raise ConfigError("path", str(d), "a serving-run directory (holding meta.json and requests.jsonl)")
    for name in ("meta.json", "requests.jsonl"):
        if not (d / name).is_file():
            raise ConfigError(name, None, "present in the serving-run directory", source=str(d))
    return d


def _finite(v) -> bool:
    try:
        return is_number(v) and math.isfinite(v)
    except OverflowError:  # an integer beyond any float
        return False


def read_requests(path: str | Path, fields: Sequence[str] = REQUEST_FIELDS) -> dict[str, np.ndarray]:
    """The rows of ``path``/requests.jsonl as columns in file order, one per field of ``fields`` (a subset of
    REQUEST_FIELDS; blank lines skipped): ``request_id`` as text (unique), token counts as integers >= 1,
    times as finite seconds (each of queued_ts, first_token_ts, last_token_ts read no earlier than the one
    before it); with ``queued_ts``, also ``arrival``: seconds after the first request was queued."""
    unknown = [f for f in fields if f not in REQUEST_FIELDS]
    if unknown:
        raise ConfigError("fields", unknown[0], f"one of {', '.join(REQUEST_FIELDS)}")
    fields = [f for f in REQUEST_FIELDS if f in fields]
    file = check_run_dir(path) / "requests.jsonl"
    times = [f for f in _TIMES if f in fields]
    cols: dict[str, list] = {f: [] for f in fields}
    seen: dict[str, int] = {}  # request_id -> the line that has it
    rows = 0
    for n, row in read_json_lines(file):
        where = f"{file}, line {n}"
        for f in fields:
            if f not in row:
                raise ConfigError(f, None, "present", source=where)
        for f in fields:
            v = row[f]
            if f in _TOKENS and not is_int(v, 1, _INT64_MAX):
                raise ConfigError(f, v, "an integer >= 1" if not is_int(v, 1) else f"an integer in [1, {_INT64_MAX}]",
                                  source=where)
            if f in _TIMES and not _finite(v):
                raise ConfigError(f, v, "a finite time in seconds", source=where)
        for before, after in zip(times, times[1:]):
            if row[after] < row[before]:
                raise ConfigError(after, row[after], f">= {before} ({row[before]})", source=where)
        if "request_id" in cols:
            rid = str(row["request_id"])
            if rid in seen:
                raise ConfigError("request_id", rid, f"unique (line {seen[rid]} has it too)", source=where)
            seen[rid] = n
            row = {**row, "request_id": rid}
        for f in fields:
            cols[f].append(row[f])
        rows += 1
    if not rows:
        raise ConfigError("rows", 0, "at least one request (one JSON object per line)", source=str(file))
    out = {f: np.array(v, dtype=object if f == "request_id" else np.int64 if f in _TOKENS else np.float64)
           for f, v in cols.items()}
    if "queued_ts" in out:
        out["arrival"] = out["queued_ts"] - out["queued_ts"].min()
    return out


def _number(cell: str) -> float | None:
    """A CSV cell as a number as pandas' read_csv reads one (no digit separators), else None."""
    if "_" in cell:
        return None
    try:
        return float(cell)
    except ValueError:
        return None


def read_timeseries(path: str | Path, need: Sequence[str] = TIMESERIES_COLUMNS) -> dict[str, np.ndarray] | None:
    """``path``/timeseries.csv (None when absent): its ``need`` columns, in the file's order (blank lines
    skipped), each as pandas' read_csv types it: integers when every cell is written as one, else floats.
    They must be present, every cell a finite number; the other columns are not read (the replay's plot
    draws t, running and waiting)."""
    file = Path(path) / "timeseries.csv"
    if not file.is_file():
        return None
    header, rows = read_csv_table(file)
    if not set(need) <= set(header):
        raise ConfigError("columns", sorted(header), f"at least {list(need)}", source=str(file))
    at = {name: header.index(name) for name in need}
    nums: dict[str, list[float]] = {name: [] for name in need}
    for line, cells in rows:  # the first bad cell in file order
        for name, j in at.items():
            v = _number(cells[j])
            if v is None or not math.isfinite(v):
                raise ConfigError(name, cells[j], "a finite number", source=f"{file}, line {line}")
            nums[name].append(v)
    out: dict[str, np.ndarray] = {}
    for name in sorted(need, key=at.get):
        j, col = at[name], nums[name]
        ints = all(abs(v) <= 2**53 and v.is_integer() and not set(cells[j].lower()) & set(".e")
                   for (_, cells), v in zip(rows, col))  # pandas' int64: every cell written as an integer
        out[name] = np.array(col, dtype=np.int64 if ints else np.float64)
    return out
