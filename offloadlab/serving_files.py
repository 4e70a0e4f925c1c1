"""Serving-run files read and checked: a run directory's ``requests.jsonl`` rows and ``timeseries.csv`` columns,
and a ``vllm bench serve --save-result --save-detailed`` result file's per-request lists.

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
from .fileio import read_csv_table, read_json_lines, read_json_object

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


# ---- vllm bench serve --save-result files ----
# The keys a result file has when it was saved with --save-detailed (benchmarks/benchmark_serving.py of vLLM
# 0.8.x, ``benchmark()``'s ``result``; vllm/benchmarks/serve.py in later versions): the per-request lists.
VLLM_RESULT_KEYS = ("input_lens", "output_lens", "ttfts", "itls")


def is_vllm_result(path: str | Path) -> bool:
    """A file holding a JSON object with ``input_lens`` (a vLLM benchmark result) -- told apart from a probe
    file by its content. A file that cannot be read or parsed is not one (its own reader reports why)."""
    p = Path(path)
    if not p.is_file():
        return False
    try:
        return "input_lens" in read_json_object(p, "file")
    except (ConfigError, OSError):
        return False


def _int_list(data: dict, key: str, src: str, minimum: int) -> list[int]:
    v = data.get(key)
    if not isinstance(v, list) or not v:
        raise ConfigError(key, type(v).__name__ if v is not None else None, "a non-empty list of token counts",
                          source=src)
    for i, x in enumerate(v):
        if not is_int(x, minimum, _INT64_MAX):
            raise ConfigError(f"{key}[{i}]", x, f"an integer >= {minimum}" if not is_int(x, minimum)
                              else f"an integer in [{minimum}, {_INT64_MAX}]", source=src)
    return [int(x) for x in v]


def _real_list(data: dict, key: str, src: str, n: int) -> list[float] | None:
    v = data.get(key)
    if v is None:
        return None
    if not isinstance(v, list) or len(v) != n:
        raise ConfigError(key, f"{type(v).__name__} of {len(v) if isinstance(v, list) else '?'}",
                          f"a list of {n} numbers, one per request", source=src)
    for i, x in enumerate(v):
        if not _finite(x):
            raise ConfigError(f"{key}[{i}]", x, "a finite number of seconds", source=src)
    return [float(x) for x in v]


def _traffic(data: dict, src: str) -> dict:
    """request_rate (a number > 0, inf or the string "inf" that vLLM 0.8 writes; None when absent), burstiness
    (default 1), max_concurrency (None or an integer >= 1), duration (None or seconds > 0) and seed (None or an
    integer >= 0; vLLM's benchmark does not record it)."""
    rate = data.get("request_rate")
    if isinstance(rate, str) and rate.strip().lower() in ("inf", "infinity"):
        rate = math.inf
    if rate is not None and not (is_number(rate) and not math.isnan(rate) and rate > 0):
        raise ConfigError("request_rate", rate, 'a number of requests per second > 0, or "inf"', source=src)
    b = data.get("burstiness", 1.0)
    b = 1.0 if b is None else b
    if not (is_number(b) and not math.isnan(b) and b > 0):
        raise ConfigError("burstiness", b, "a number > 0 (1: Poisson)", source=src)
    mc = data.get("max_concurrency")
    if mc is not None and not is_int(mc, 1):
        raise ConfigError("max_concurrency", mc, "null or an integer >= 1", source=src)
    dur = data.get("duration")
    if dur is not None and not (_finite(dur) and dur > 0):
        raise ConfigError("duration", dur, "a finite number of seconds > 0", source=src)
    seed = data.get("seed")
    if seed is not None and not is_int(seed, 0):
        raise ConfigError("seed", seed, "an integer >= 0", source=src)
    return {"request_rate": None if rate is None else float(rate), "burstiness": float(b),
            "max_concurrency": None if mc is None else int(mc), "duration": None if dur is None else float(dur),
            "seed": None if seed is None else int(seed)}


def read_vllm_result(path: str | Path, timed: bool = True) -> dict:
    """A ``vllm bench serve --save-result`` JSON file's requests, in file order (the order vLLM sent them),
    checked; every problem is one ConfigError naming the file and the field.

    Returns ``input_lens``, ``output_lens`` (numpy integer arrays, every request), ``ok`` (False for a failed
    request: 0 tokens generated or an error text; vLLM's calculate_metrics counts 0 for those), ``ready``
    (``start_times - queue_times`` from the first, when the file has start_times: newer vLLM; else None), the
    traffic settings (``_traffic``) and ``model_id``. ``timed``: the file must also have the per-request
    latencies of ``--save-detailed`` -- ``ttfts`` (seconds >= 0) and ``itls`` (a list of gaps >= 0 per request)
    for every successful request -- returned as ``ttft`` and ``e2e`` (= ttft + sum(itls): the file keeps no
    per-request latency; in vLLM's request functions the latency is the last chunk's time, which is the first
    chunk's plus every gap after it, backend_request_func.py); NaN for failed requests.
    """
    p = Path(path)
    src = str(p)
    if not p.is_file():
        raise ConfigError("path", src, "an existing vLLM benchmark result JSON file")
    data = read_json_object(p, "file", "vLLM benchmark result JSON file",
                            "a JSON object (vllm bench serve --save-result)")
    inputs = _int_list(data, "input_lens", src, 1)
    outputs = _int_list(data, "output_lens", src, 0)
    n = len(inputs)
    if len(outputs) != n:
        raise ConfigError("output_lens", f"{len(outputs)} entries", f"{n}, as many as input_lens", source=src)
    for key in ("ttfts", "itls", "errors"):
        v = data.get(key)
        if v is None and timed and key != "errors":
            raise ConfigError(key, None, f"a list of {n} entries, one per request (saved with --save-detailed)",
                              source=src)
        if v is not None and (not isinstance(v, list) or len(v) != n):
            raise ConfigError(key, f"{type(v).__name__}", f"a list of {n} entries, one per request", source=src)
    errors = data.get("errors") or [None] * n
    ok = np.array([o > 0 and not e for o, e in zip(outputs, errors)], dtype=bool)
    if not ok.any():
        raise ConfigError("output_lens", 0, "at least one request that generated tokens", source=src)
    out = {"input_lens": np.array(inputs, dtype=np.int64), "output_lens": np.array(outputs, dtype=np.int64),
           "ok": ok, "model_id": data.get("model_id"), **_traffic(data, src)}
    starts = _real_list(data, "start_times", src, n)
    queues = _real_list(data, "queue_times", src, n)
    if starts is None:
        out["ready"] = None
    else:
        with np.errstate(over="ignore", invalid="ignore"):
            ready = np.array(starts) - (np.array(queues) if queues is not None else 0.0)
            ready = ready - ready.min()
        if not np.isfinite(ready).all():
            i = int(np.flatnonzero(~np.isfinite(ready))[0])
            raise ConfigError(f"start_times[{i}]", starts[i], "send times (less queue_times) within a float's range "
                              "of each other", source=src)
        out["ready"] = ready
    if timed:
        ttft = np.full(n, np.nan)
        e2e = np.full(n, np.nan)
        for i in np.flatnonzero(ok):
            t, gaps = data["ttfts"][i], data["itls"][i]
            if not (_finite(t) and t >= 0):
                raise ConfigError(f"ttfts[{i}]", t, "a finite number of seconds >= 0", source=src)
            if not isinstance(gaps, list):
                raise ConfigError(f"itls[{i}]", type(gaps).__name__, "a list of inter-token gaps (seconds)",
                                  source=src)
            for j, g in enumerate(gaps):
                if not (_finite(g) and g >= 0):
                    raise ConfigError(f"itls[{i}][{j}]", g, "a finite number of seconds >= 0", source=src)
            try:
                total = t + math.fsum(gaps)
            except OverflowError:
                total = math.inf
            if not math.isfinite(total):
                raise ConfigError(f"itls[{i}]", "sum beyond a float", "gaps summing to a finite number of seconds",
                                  source=src)
            ttft[i], e2e[i] = t, total
        out["ttft"], out["e2e"] = ttft, e2e
    return out
