"""Request metrics shared by the simulator and the runtime: latency columns and the run summary.

A request frame has one row per request with ``id``, ``prompt_len``, ``output_len``, ``arrival``,
``first_token``, ``finish`` (seconds), ``preemptions`` and optionally ``sent``; ``latency_columns`` adds TTFT,
TPOT and end-to-end latency to such columns (numpy arrays), ``with_latencies`` to a DataFrame, and
``summarize`` turns either into throughput and percentile figures. Only ``with_latencies`` needs pandas
(imported there: a command that prints a summary does not pay pandas' import).
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Mapping

import numpy as np

if TYPE_CHECKING:
    import pandas as pd

PERCENTILES = (50, 90, 99)


def latency_columns(cols: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``cols`` (a request frame's columns, equal-length arrays) plus ``ttft``, ``tpot`` (NaN for one-token
    outputs) and ``e2e``, every column in id order."""
    out = {k: np.asarray(v) for k, v in cols.items()}
    # measured from when the request was sent (an optional ``sent`` column: a client holding requests back
    # under --max-concurrency), as vllm/benchmarks/serve.py measures ttft and latency; else from arrival
    start = out["sent"] if "sent" in out else out["arrival"]
    first, finish, n = out["first_token"], out["finish"], out["output_len"]
    out["ttft"] = first - start
    with np.errstate(invalid="ignore", divide="ignore"):
        out["tpot"] = np.where(n > 1, (finish - first) / np.where(n > 1, n - 1, 1), np.nan)
    out["e2e"] = finish - start
    order = np.argsort(out["id"], kind="stable")
    return {k: v[order] for k, v in out.items()}


def with_latencies(f: pd.DataFrame) -> pd.DataFrame:
    """``latency_columns`` of a DataFrame: ``ttft``, ``tpot`` and ``e2e`` added, rows sorted by id."""
    import pandas as pd

    cols = latency_columns({c: f[c].to_numpy() for c in f.columns})
    return pd.DataFrame(cols)


def percentiles(values: np.ndarray, ps=PERCENTILES) -> list[float]:
    """``[float(np.percentile(values, p)) for p in ps]``, bit for bit (a property test holds them), for
    non-empty float values: numpy's "linear" method (Hyndman & Fan's 7th), in its own steps
    (numpy/lib/_function_base_impl.py ``_quantile``, ``_get_indexes``, ``_lerp``): the virtual index
    ``(n - 1) * (p / 100)``, its floor and the next index (both the last one at or past it), and the
    interpolation from below, or from above where the weight is >= 0.5. Not numpy's own: its first call
    imports numpy.ma (10-30 ms, in each of a run's three processes) for an ``is_masked`` check in
    ``np.unique``."""
    s = np.sort(np.asarray(values, dtype=np.float64)).tolist()
    last = len(s) - 1
    if math.isnan(s[last]):  # sorted last: numpy's answer for a slice with a NaN is NaN
        return [math.nan] * len(ps)
    out = []
    for p in ps:
        vi = last * (p / 100)
        if vi >= last:  # past the last index: both neighbours are the last value (numpy's index -1)
            i = j = last
            gamma = vi + 1.0
        else:
            i = math.floor(vi)
            j, gamma = i + 1, vi - i
        a, b = s[i], s[j]
        d = b - a
        out.append(b - d * (1 - gamma) if gamma >= 0.5 else a + d * gamma)
    return out


def summarize(requests) -> dict[str, float]:
    """Throughput and latency statistics (seconds; tokens/s; requests/s) of a request frame with latencies:
    a DataFrame or ``latency_columns``' dict."""
    col = lambda c: np.asarray(requests[c])  # noqa: E731
    n = len(col("id"))
    # NaN-skipping, as pandas' reductions are (an empty frame: NaN)
    makespan = float(np.nanmax(col("finish")) - np.nanmin(col("arrival"))) if n else math.nan
    out = {
        "requests": n,
        "makespan_s": makespan,
        "throughput_rps": n / makespan if n else math.nan,
        "output_tok_s": float(np.nansum(col("output_len"))) / makespan,
        "total_tok_s": float(np.nansum(col("prompt_len") + col("output_len"))) / makespan,
        "preemptions": int(np.nansum(col("preemptions"))),
    }
    for c in ("ttft", "tpot", "e2e"):
        v = col(c).astype(np.float64)
        v = v[~np.isnan(v)]
        out[f"{c}_mean_s"] = float(v.mean()) if v.size else float("nan")
        for p, x in zip(PERCENTILES, percentiles(v) if v.size else [float("nan")] * len(PERCENTILES)):
            out[f"{c}_p{p}_s"] = x
    return out


class LogHistogram:
    """A percentile sketch of positive values with bounded relative error (DDSketch's buckets,
    written out): value x > 0 falls in bucket ``ceil(log_gamma x)``, gamma = (1 + a) / (1 - a), and a
    bucket is reported as the point within relative ``a`` of every value in it. A quantile is the
    bucket holding the order statistic of rank ``round(q (n - 1))``: within relative ``accuracy`` of
    a value between the two order statistics numpy's linear interpolation uses. Values <= 0 are kept
    apart (reported as 0). Memory: one counter per occupied bucket (about 9,200 for 0.1 ms to 10^4 s at
    the default 0.1%: ln(10^8) / ln(1.001 / 0.999)), whatever the number of values."""

    __slots__ = ("accuracy", "_log_gamma", "_counts", "_zeros", "n")

    def __init__(self, accuracy: float = 1e-3):
        if not 0 < accuracy < 1:
            from .errors import ConfigError

            raise ConfigError("accuracy", accuracy, "a relative error in (0, 1)")
        self.accuracy = accuracy
        self._log_gamma = math.log((1 + accuracy) / (1 - accuracy))
        self._counts: dict[int, int] = {}
        self._zeros = 0
        self.n = 0

    def add(self, x: float) -> None:
        self.n += 1
        if x > 0:
            i = math.ceil(math.log(x) / self._log_gamma)
            self._counts[i] = self._counts.get(i, 0) + 1
        else:
            self._zeros += 1

    def quantile(self, q: float) -> float:
        """The ``q``-quantile (0 <= q <= 1); NaN when empty."""
        if not self.n:
            return float("nan")
        rank = round(q * (self.n - 1))
        if rank < self._zeros:
            return 0.0
        seen = self._zeros
        for i in sorted(self._counts):
            seen += self._counts[i]
            if seen > rank:
                g = math.exp(self._log_gamma)
                return 2 * g ** i / (g + 1)
        raise AssertionError("rank beyond the count")  # pragma: no cover


class StreamSummary:
    """``summarize``'s figures from requests seen one at a time, without keeping them: counts, sums
    and extremes exactly (means exact up to float rounding), percentiles from ``LogHistogram``
    sketches (relative error ``accuracy``, 0.1% by default). Constant memory, whatever the run's size."""

    def __init__(self, accuracy: float = 1e-3):
        self.accuracy = accuracy
        self.n = self.preemptions = self.prompt_tokens = self.output_tokens = 0
        self.first_arrival, self.last_finish = math.inf, -math.inf
        self.sums = {c: 0.0 for c in ("ttft", "tpot", "e2e")}
        self.counts = {c: 0 for c in ("ttft", "tpot", "e2e")}
        self.sketches = {c: LogHistogram(accuracy) for c in ("ttft", "tpot", "e2e")}

    def add(self, prompt_len: int, output_len: int, arrival: float, sent: float, first_token: float,
            finish: float, preemptions: int) -> None:
        """One finished request (the columns of a request frame; see ``with_latencies``)."""
        self.n += 1
        self.prompt_tokens += prompt_len
        self.output_tokens += output_len
        self.preemptions += preemptions
        self.first_arrival = min(self.first_arrival, arrival)
        self.last_finish = max(self.last_finish, finish)
        sums, counts, sketches = self.sums, self.counts, self.sketches
        for c, v in (("ttft", first_token - sent), ("e2e", finish - sent),
                     ("tpot", (finish - first_token) / (output_len - 1) if output_len > 1 else None)):
            if v is not None:
                sums[c] += v
                counts[c] += 1
                sketches[c].add(v)

    def summary(self) -> dict[str, float]:
        """The keys and units of ``summarize``; percentiles within ``accuracy`` (see LogHistogram)."""
        makespan = self.last_finish - self.first_arrival
        out = {
            "requests": self.n,
            "makespan_s": makespan,
            "throughput_rps": self.n / makespan,
            "output_tok_s": self.output_tokens / makespan,
            "total_tok_s": (self.prompt_tokens + self.output_tokens) / makespan,
            "preemptions": self.preemptions,
        }
        for c in ("ttft", "tpot", "e2e"):
            k = self.counts[c]
            out[f"{c}_mean_s"] = self.sums[c] / k if k else float("nan")
            for p in PERCENTILES:
                out[f"{c}_p{p}_s"] = self.sketches[c].quantile(p / 100)
        return out
