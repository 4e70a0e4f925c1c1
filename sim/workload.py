"""Workloads: the requests a serving run receives (prompt length, output length, arrival time).

A workload is built in two independent steps:

1. *lengths* -- :func:`fixed`, :func:`longbench_multi_news`, :func:`from_dataset_stats` or
   :func:`from_file` give a :class:`Workload` whose requests all arrive at ``t = 0``;
2. *arrivals* -- :func:`all_at_once` or :func:`poisson` give an array of times that
   :meth:`Workload.with_arrivals` attaches to it.

:func:`make_workload` does both from the CLI's arguments. Every random draw comes from
``numpy.random.default_rng(seed)``, so the same arguments and seed give identical requests.

Dataset statistics come from ``workloads.csv`` in :mod:`offloadlab.catalog` (a verbatim copy of
the project's ``shared/data/workloads.csv``); none of its numbers is repeated in this module.
Times are in seconds, lengths in tokens.
"""
from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Sequence

import numpy as np

from ..checks import check_int, is_int as _is_int, is_number as _is_real
from ..errors import ConfigError
from ..fileio import (atomic_write_text, host_memory_available, read_json_lines, read_json_object, read_text,
                      shortened)
from ..serving_files import read_requests, read_vllm_result
from ..vllm_flags import parse_version

if TYPE_CHECKING:
    import pandas as pd

__all__ = [
    "Request",
    "Workload",
    "fixed",
    "longbench_multi_news",
    "from_dataset_stats",
    "from_file",
    "all_at_once",
    "poisson",
    "make_workload",
    "sharegpt",
    "vllm_arrivals",
    "from_vllm_result",
    "from_serving_run",
    "workload_from_columns",
    "dataset_names",
    "dataset_stats",
]

#: z such that P(Z <= z) = 0.9 for a standard normal Z (the 90th percentile).
Z90 = 1.2815515655446004
#: Shortest prompt the multi_news synthesis produces (a summarisation prompt is never tiny).
MULTI_NEWS_MIN_PROMPT = 16
#: Fitted dataset lengths are capped at this multiple of the dataset's published p99.
P99_CAP_FACTOR = 1.5
#: Columns of a workload file; ``id`` and ``arrival`` are optional.
FILE_COLUMNS = ("id", "prompt_len", "output_len", "arrival")

_MULTI_NEWS = "longbench_multi_news"
_MULTI_NEWS_ALIASES = ("multi_news", _MULTI_NEWS)


# ----------------------------------------------------------------------------------------------
# The packaged dataset table
# ----------------------------------------------------------------------------------------------
@lru_cache(maxsize=1)
def _catalog_rows() -> dict[str, dict[str, str]]:
    text = resources.files("offloadlab.catalog").joinpath("workloads.csv").read_text()
    return {row["dataset"]: row for row in csv.DictReader(io.StringIO(text))}


def dataset_names() -> list[str]:
    """Names of the datasets in the packaged ``workloads.csv``, in file order."""
    return list(_catalog_rows())


def dataset_stats(dataset: str) -> dict[str, float | None]:
    """One row of ``workloads.csv`` as numbers (``None`` where the table has no figure)."""
    rows = _catalog_rows()
    if dataset not in rows:
        raise ConfigError("dataset", dataset, f"one of {dataset_names()}")
    out: dict[str, float | None] = {}
    for key, text in rows[dataset].items():
        if key in ("dataset", "note"):
            continue
        out[key] = float(text) if text.strip() else None
    return out


def _multi_news_default(key: str) -> float:
    value = dataset_stats(_MULTI_NEWS)[key]
    assert value is not None, f"workloads.csv: {_MULTI_NEWS}.{key} is empty"
    return value


# The paper's published figures, read from the catalog (defaults of longbench_multi_news).
MULTI_NEWS_REQUESTS = int(_multi_news_default("requests"))
MULTI_NEWS_PROMPT_MEAN = _multi_news_default("prompt_mean")
MULTI_NEWS_MAX_OUTPUT = int(_multi_news_default("output_p99"))  # the published max output
#: Requests a synthetic workload has when the caller gives no ``n`` (the paper's count).
DEFAULT_N = MULTI_NEWS_REQUESTS


# ----------------------------------------------------------------------------------------------
# Validation helpers
# ----------------------------------------------------------------------------------------------
def _check_int(field: str, v: object, minimum: int, source: str | None = None) -> int:
    return int(check_int(field, v, minimum, source=source))  # a Python int (numpy's pass the check)


def _check_seed(seed: object) -> int:
    return _check_int("seed", seed, 0)


def _check_rate(rate: object) -> float:
    if not _is_real(rate) or not math.isfinite(rate) or not rate > 0:
        raise ConfigError("rate", rate, "a finite number of requests per second > 0")
    return float(rate)


# ----------------------------------------------------------------------------------------------
# Entities
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Request:
    """One request: ``prompt_len`` tokens to prefill, ``output_len`` tokens to decode.

    ``arrival`` is when it reaches the server, in seconds from the start of the run.
    """

    id: int
    prompt_len: int
    output_len: int
    arrival: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "id", _check_int("Request.id", self.id, 0))
        object.__setattr__(self, "prompt_len", _check_int("Request.prompt_len", self.prompt_len, 1))
        object.__setattr__(self, "output_len", _check_int("Request.output_len", self.output_len, 1))
        a = self.arrival
        if not _is_real(a) or not math.isfinite(a) or a < 0:
            raise ConfigError("Request.arrival", a, "a finite number of seconds >= 0")
        object.__setattr__(self, "arrival", float(a))

    @property
    def total_tokens(self) -> int:
        return self.prompt_len + self.output_len

    @classmethod
    def _made(cls, id: int, prompt_len: int, output_len: int, arrival: float) -> "Request":
        """A request from values already of the checked types and ranges (a generator's own draws: ints
        >= 0, >= 1, >= 1 and a finite float >= 0), without checking them again."""
        r = object.__new__(cls)
        setattr_ = object.__setattr__
        setattr_(r, "id", id)
        setattr_(r, "prompt_len", prompt_len)
        setattr_(r, "output_len", output_len)
        setattr_(r, "arrival", arrival)
        return r


@dataclass(frozen=True)
class Workload:
    """A named, non-empty set of requests, kept sorted by ``(arrival, id)``; ids are unique."""

    name: str
    requests: tuple[Request, ...]
    #: Client-side limit (vLLM bench serve's --max-concurrency): a request is sent only while fewer than this
    #: many are outstanding; None: no limit. Arrival times stay the times requests are *ready* to be sent.
    max_concurrency: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ConfigError("Workload.name", self.name, "a non-empty string")
        if self.max_concurrency is not None:
            _check_int("max_concurrency", self.max_concurrency, 1)
        reqs = tuple(self.requests)
        if not reqs:
            raise ConfigError("Workload.requests", reqs, "at least one request")
        for r in reqs:
            if not isinstance(r, Request):
                raise ConfigError("Workload.requests", r, "Request objects")
        ids = [r.id for r in reqs]
        if len(set(ids)) != len(ids):
            dup = next(i for i in ids if ids.count(i) > 1)
            raise ConfigError("Workload.requests.id", dup, "ids unique within a workload")
        object.__setattr__(self, "requests", tuple(sorted(reqs, key=lambda r: (r.arrival, r.id))))

    def __reduce__(self):
        """Pickled as four columns, not one object per request: what a process pool sends a worker (the
        band's corners, a sweep's configurations) is a few lists, read back without checking or sorting
        again (they were checked and sorted when this workload was made). 2,000 requests: about 1 ms each
        way instead of 12-16 ms."""
        rs = self.requests
        return _workload_unpickled, (self.name, [r.id for r in rs], [r.prompt_len for r in rs],
                                     [r.output_len for r in rs], [r.arrival for r in rs], self.max_concurrency)

    # ---- views --------------------------------------------------------------------------------
    @property
    def n(self) -> int:
        """Number of requests."""
        return len(self.requests)

    def __len__(self) -> int:
        return len(self.requests)

    def __iter__(self) -> Iterator[Request]:
        return iter(self.requests)

    def to_frame(self) -> pd.DataFrame:
        """One row per request, in arrival order: ``id, prompt_len, output_len, arrival``."""
        import pandas as pd

        return pd.DataFrame(
            {
                "id": np.array([r.id for r in self.requests], dtype=np.int64),
                "prompt_len": np.array([r.prompt_len for r in self.requests], dtype=np.int64),
                "output_len": np.array([r.output_len for r in self.requests], dtype=np.int64),
                "arrival": np.array([r.arrival for r in self.requests], dtype=np.float64),
            }
        )

    def describe(self) -> dict[str, Any]:
        """Summary statistics: counts, mean/p50/p90/p99/max of both lengths, token totals.

        Percentiles use numpy's default (linear interpolation). ``duration_s`` is the last
        arrival time (0 for an all-at-once workload).
        """
        prompts = np.array([r.prompt_len for r in self.requests], dtype=np.int64)
        outputs = np.array([r.output_len for r in self.requests], dtype=np.int64)
        out: dict[str, Any] = {"name": self.name, "requests": self.n}
        for label, x in (("prompt", prompts), ("output", outputs)):
            out[f"{label}_mean"] = float(x.mean())
            for q in (50, 90, 99):
                out[f"{label}_p{q}"] = float(np.percentile(x, q))
            out[f"{label}_max"] = int(x.max())
        out["prompt_tokens"] = int(prompts.sum())
        out["output_tokens"] = int(outputs.sum())
        out["total_tokens"] = out["prompt_tokens"] + out["output_tokens"]
        out["duration_s"] = float(self.requests[-1].arrival)
        return out

    # ---- derived workloads ---------------------------------------------------------------------
    def with_arrivals(self, arrivals: Sequence[float] | np.ndarray) -> Workload:
        """The same requests with new arrival times.

        ``arrivals[i]`` goes to the request with the i-th smallest id (for generated workloads,
        the request whose id is ``i``). The result is re-sorted by ``(arrival, id)``.
        """
        a = np.asarray(arrivals, dtype=np.float64)
        if a.ndim != 1 or len(a) != self.n:
            raise ConfigError("arrivals", f"array of shape {a.shape}", f"{self.n} arrival times, one per request")
        bad = np.flatnonzero(~np.isfinite(a) | (a < 0))
        if bad.size:
            raise ConfigError(f"arrivals[{bad[0]}]", float(a[bad[0]]), "a finite number of seconds >= 0")
        by_id = sorted(self.requests, key=lambda r: r.id)
        return Workload(self.name, tuple(
            Request(r.id, r.prompt_len, r.output_len, float(t)) for r, t in zip(by_id, a)
        ), self.max_concurrency)

    def with_max_concurrency(self, max_concurrency: int | None) -> Workload:
        """The same requests sent by a client that keeps at most ``max_concurrency`` outstanding."""
        if max_concurrency == self.max_concurrency and type(max_concurrency) is type(self.max_concurrency):
            return self  # frozen: the same workload, not checked and sorted again
        return Workload(self.name, self.requests, max_concurrency)

    def head(self, n: int) -> Workload:
        """The first ``n`` requests in arrival order (all of them if ``n >= self.n``)."""
        n = _check_int("n", n, 1)
        return Workload(self.name, self.requests[:n], self.max_concurrency)

    def clipped(self, max_model_len: int) -> tuple[Workload, int]:
        """Requests fitted into ``max_model_len`` tokens (output first capped at half of it, then the
        prompt cut to the rest), and how many were changed. Fitted length tables such as sharegpt_8k's
        have tails beyond a deployment's context; a server would reject those requests."""
        max_model_len = _check_int("max_model_len", max_model_len, 2)
        out, changed = [], 0
        for r in self.requests:
            if r.prompt_len + r.output_len <= max_model_len:
                out.append(r)
                continue
            out.append(Request(r.id, *_fit(r.prompt_len, r.output_len, max_model_len), r.arrival))
            changed += 1
        if not changed:
            return self, 0  # frozen: the same workload, not checked and sorted again
        return Workload(self.name, tuple(out), self.max_concurrency), changed

    # ---- files ---------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write the requests atomically; JSONL if ``path`` ends in ``.jsonl``, CSV otherwise.

        Columns/keys are ``id, prompt_len, output_len, arrival``; arrivals are written with full
        precision, so :func:`from_file` reads back an equal workload (named after the file).
        """
        p = Path(path)
        if p.suffix.lower() in (".jsonl", ".ndjson"):
            text = "".join(
                json.dumps({"id": r.id, "prompt_len": r.prompt_len, "output_len": r.output_len,
                            "arrival": r.arrival}) + "\n"
                for r in self.requests
            )
        else:
            lines = [",".join(FILE_COLUMNS)]
            lines += [f"{r.id},{r.prompt_len},{r.output_len},{r.arrival!r}" for r in self.requests]
            text = "\n".join(lines) + "\n"
        return atomic_write_text(p, text)


def _workload_unpickled(name: str, ids: list, prompts: list, outputs: list, arrivals: list,
                        max_concurrency: int | None) -> Workload:
    """The Workload ``Workload.__reduce__`` pickled: its requests as they were (same values, same order)."""
    made = Request._made
    wl = object.__new__(Workload)
    object.__setattr__(wl, "name", name)
    object.__setattr__(wl, "requests", tuple(map(made, ids, prompts, outputs, arrivals)))
    object.__setattr__(wl, "max_concurrency", max_concurrency)
    return wl


# ----------------------------------------------------------------------------------------------
# Length generators (every request arrives at t = 0)
# ----------------------------------------------------------------------------------------------
def _build(name: str, prompts: np.ndarray, outputs: np.ndarray) -> Workload:
    prompts, outputs = np.asarray(prompts), np.asarray(outputs)
    if (prompts.dtype.kind in "iu" and outputs.dtype.kind in "iu" and prompts.shape == outputs.shape
            and prompts.ndim == 1 and (prompts.size == 0 or (prompts.min() >= 1 and outputs.min() >= 1))):
        # integer draws >= 1: the requests Request(i, int(p), int(o), 0.0) would make, without checking each
        made = Request._made
        return Workload(name, tuple(made(i, p, o, 0.0) for i, (p, o) in enumerate(zip(prompts.tolist(),
                                                                                      outputs.tolist()))))
    return Workload(name, tuple(
        Request(i, int(p), int(o), 0.0) for i, (p, o) in enumerate(zip(prompts, outputs))
    ))


def fixed(n: int, prompt_len: int, output_len: int) -> Workload:
    """``n`` identical requests of ``prompt_len`` prompt and ``output_len`` output tokens."""
    n = _check_int("n", n, 1)
    p = _check_int("prompt_len", prompt_len, 1)
    o = _check_int("output_len", output_len, 1)
    return _build(f"fixed-{p}x{o}", np.full(n, p), np.full(n, o))


def longbench_multi_news(
    n: int = MULTI_NEWS_REQUESTS,
    seed: int = 0,
    prompt_mean: float = MULTI_NEWS_PROMPT_MEAN,
    output_len: int = MULTI_NEWS_MAX_OUTPUT,
    sigma: float = 0.5,
    max_prompt: int | None = 7680,
) -> Workload:
    """The paper's LongBench multi_news workload, synthesized from its published figures.

    Only three figures are published (defaults, read from ``workloads.csv``): 200 requests,
    an average prompt of 2,113 and a maximum output of 512 tokens. Everything else is an
    ASSUMPTION, stated here so that results can be read with it in mind:

    * prompt lengths are lognormal with shape ``sigma`` (default 0.5, i.e. a coefficient of
      variation of about 0.53: news-article bundles vary, but not by orders of magnitude) and
      ``mu = ln(prompt_mean) - sigma**2 / 2`` so that the *distribution* mean equals
      ``prompt_mean``; samples are rounded and clipped to ``[16, max_prompt]`` (no upper clip
      when ``max_prompt`` is None). The default cap, 7,680 = 8,192 - 512, keeps every request
      within a max_model_len of 8,192, as LongBench truncates long inputs to the model's window. The
      sample mean of 200 requests is within a few percent of ``prompt_mean`` (its standard error is
      about 4 %);
    * the published average (2,113) is in *words*; it is used as a token count as published;
    * every request decodes exactly ``output_len`` tokens (default 512, the published cap),
      i.e. generation is assumed to run to the limit -- the worst case for decode time.
    """
    n = _check_int("n", n, 1)
    seed = _check_seed(seed)
    if not _is_real(prompt_mean) or not math.isfinite(prompt_mean) or prompt_mean < MULTI_NEWS_MIN_PROMPT:
        raise ConfigError("prompt_mean", prompt_mean, f"a number of tokens >= {MULTI_NEWS_MIN_PROMPT}")
    output_len = _check_int("output_len", output_len, 1)
    if not _is_real(sigma) or not math.isfinite(sigma) or sigma < 0:
        raise ConfigError("sigma", sigma, "a finite number >= 0 (lognormal shape)")
    if max_prompt is not None:
        max_prompt = _check_int("max_prompt", max_prompt, MULTI_NEWS_MIN_PROMPT)
    mu = math.log(prompt_mean) - sigma**2 / 2
    rng = np.random.default_rng(seed)
    prompts = np.rint(rng.lognormal(mu, sigma, size=n))
    prompts = np.clip(prompts, MULTI_NEWS_MIN_PROMPT, max_prompt if max_prompt is not None else None)
    return _build(_MULTI_NEWS, prompts.astype(np.int64), np.full(n, output_len))


def _lognormal_fit(dataset: str, which: str) -> tuple[float, float, int]:
    """``(mu, sigma, cap)`` of the lognormal through a dataset's p50 and p90 of ``which``."""
    stats = dataset_stats(dataset)
    p50, p90, p99 = (stats[f"{which}_p{q}"] for q in (50, 90, 99))
    if p50 is None or p90 is None or p99 is None or not 0 < p50 <= p90:
        raise ConfigError(f"{dataset}.{which}_p50/p90/p99", (p50, p90, p99),
                          "published percentiles with 0 < p50 <= p90 in workloads.csv")
    mu = math.log(p50)
    sigma = (math.log(p90) - math.log(p50)) / Z90
    return mu, sigma, int(math.ceil(P99_CAP_FACTOR * p99))


def from_dataset_stats(dataset: str, n: int, seed: int = 0) -> Workload:
    """Synthesize ``n`` requests whose lengths follow one dataset of ``workloads.csv``.

    Prompt and output lengths are drawn independently, each from the lognormal through the
    dataset's published p50 and p90 (``mu = ln p50``, ``sigma = (ln p90 - ln p50) / z90``,
    ``z90 = 1.2816``), rounded, and clipped to ``[1, ceil(1.5 * p99)]``. The fit reproduces the
    median and p90; the tail is a lognormal's, so a dataset whose p99 is far beyond it (e.g.
    arxiv_summarization's outputs) is thinner-tailed here than in reality. The cap at 1.5 x p99
    only removes the lognormal's rare extreme draws; for sharegpt_8k (filtered to <= 8k tokens)
    the fitted tail still puts about 6 % of prompts above the published p99, up to the cap.
    Because only p50/p90 are matched, sample means differ from the table's means (by roughly
    -30 % to +17 % across the datasets). Prompt/output correlation is ignored.

    ``longbench_multi_news`` has no percentiles; it is delegated to :func:`longbench_multi_news`.
    """
    if not isinstance(dataset, str) or dataset not in _catalog_rows():
        if isinstance(dataset, str) and dataset in _MULTI_NEWS_ALIASES:
            dataset = _MULTI_NEWS
        else:
            raise ConfigError("dataset", dataset, f"one of {dataset_names()}")
    n = _check_int("n", n, 1)
    seed = _check_seed(seed)
    if dataset == _MULTI_NEWS:
        return longbench_multi_news(n=n, seed=seed)
    rng = np.random.default_rng(seed)
    lengths = []
    for which in ("prompt", "output"):
        mu, sigma, cap = _lognormal_fit(dataset, which)
        lengths.append(np.clip(np.rint(rng.lognormal(mu, sigma, size=n)), 1, cap).astype(np.int64))
    return _build(dataset, *lengths)


def _fit(prompt_len: int, output_len: int, max_model_len: int) -> tuple[int, int]:
    """(prompt_len, output_len) of a request too long for ``max_model_len``: the output capped at half of
    it, then the prompt cut to the rest (Workload.clipped, RequestStream)."""
    o = min(output_len, max_model_len // 2)
    return min(prompt_len, max_model_len - o), o


@dataclass(frozen=True)
class RequestStream:
    """``n`` requests made as they are needed, never held together: lengths from one dataset of
    ``workloads.csv`` (the lognormal fit of :func:`from_dataset_stats`, e.g. ``sharegpt_8k``), Poisson
    arrivals at ``rate`` requests/s (:func:`poisson`'s gaps), both drawn ``chunk`` requests at a time
    from generators seeded by ``seed``. ``max_model_len`` fits each request as ``Workload.clipped`` does.
    For runs too large for a :class:`Workload` (a million requests): ``simulate(..., requests="summary")``
    serves one in constant memory. The draws differ from ``from_dataset_stats(dataset, n, seed)``'s (two
    generators, drawn by chunks), their distribution does not."""

    dataset: str
    n: int
    rate: float
    seed: int = 0
    max_model_len: int | None = None
    chunk: int = 65536
    max_concurrency: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.dataset, str) or self.dataset not in _catalog_rows() or self.dataset == _MULTI_NEWS:
            raise ConfigError("dataset", self.dataset, f"one of {[d for d in dataset_names() if d != _MULTI_NEWS]}")
        _check_int("n", self.n, 1)
        _check_rate(self.rate)
        _check_seed(self.seed)
        _check_int("chunk", self.chunk, 1)
        if self.max_model_len is not None:
            _check_int("max_model_len", self.max_model_len, 2)
        if self.max_concurrency is not None:
            _check_int("max_concurrency", self.max_concurrency, 1)

    @property
    def name(self) -> str:
        return f"{self.dataset}-stream"

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[Request]:
        fits = [_lognormal_fit(self.dataset, which) for which in ("prompt", "output")]
        lengths_rng = np.random.default_rng(self.seed)
        arrivals_rng = np.random.default_rng(_arrival_seed(self.seed))
        cap = self.max_model_len
        t, i = 0.0, 0
        while i < self.n:
            m = min(self.chunk, self.n - i)
            p, o = (np.clip(np.rint(lengths_rng.lognormal(mu, sigma, size=m)), 1, top).astype(np.int64).tolist()
                    for mu, sigma, top in fits)
            arrivals = (t + np.cumsum(arrivals_rng.exponential(1.0 / self.rate, size=m))).tolist()
            t = arrivals[-1]
            for k in range(m):
                pk, ok = p[k], o[k]
                if cap is not None and pk + ok > cap:
                    pk, ok = _fit(pk, ok, cap)
                yield Request._made(i + k, pk, ok, arrivals[k])  # np ints >= 1 (clipped), float arrivals
            i += m


# ----------------------------------------------------------------------------------------------
# Reading workload files
# ----------------------------------------------------------------------------------------------
def _records(path: Path) -> Iterator[tuple[int, str, Mapping[str, Any]]]:
    """Yield ``(row, where, record)`` per data row: ``row`` 1-based (blank lines skipped), ``where`` the
    file and the row's place for errors (JSONL: its line, offloadlab/fileio.py ``read_json_lines``; CSV: its
    row, the header not counted). A malformed row is a ConfigError naming it."""
    src = str(path)
    if path.suffix.lower() in (".jsonl", ".ndjson"):
        for row, (line, rec) in enumerate(read_json_lines(path, "CSV or JSONL workload file"), start=1):
            yield row, f"{src}, line {line}", rec
        return
    reader = csv.DictReader(io.StringIO(read_text(path, "CSV or JSONL workload file", encoding="utf-8-sig")))
    for row, rec in _csv_rows(reader, src):
        where = f"{src}, row {row}"
        if None in rec:
            raw = [v for k, v in rec.items() if k is not None] + list(rec[None])
            raise ConfigError("row", shortened(",".join(raw)),
                              f"{len(reader.fieldnames or [])} comma-separated fields, as in the header", source=where)
        yield row, where, {k.strip(): (v.strip() if isinstance(v, str) else v) for k, v in rec.items()}


def _csv_rows(reader: csv.DictReader, src: str) -> Iterator[tuple[int, dict]]:
    """(row, record) of a CSV reader; the csv module's own errors (a NUL byte, a huge field) are ConfigErrors."""
    row = 0
    while True:
        try:
            rec = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            raise ConfigError("row", row + 1, f"a well-formed CSV row ({e})", source=src) from None
        row += 1
        yield row, rec


def _parse_int(raw: Any, minimum: int) -> int | None:
    if isinstance(raw, str):
        try:
            raw = int(raw, 10)
        except ValueError:
            return None
    return int(raw) if _is_int(raw) and raw >= minimum else None


def _parse_arrival(raw: Any) -> float | None:
    if isinstance(raw, str):
        try:
            raw = float(raw)
        except ValueError:
            return None
    if not _is_real(raw) or not math.isfinite(raw) or raw < 0:
        return None
    return float(raw)


def _check_near_misses(rec: Mapping[str, Any], has: Mapping[str, bool], where: str, word: str) -> None:
    """An optional column left out while another column's name is close to it (``arrival_s``, ``arrival_time``,
    ``Arrival``, ``ID``) is a ConfigError: ignored, it would silently give every request t = 0 (or ids by row)."""
    import difflib  # only here: a command that reads no workload file does not import it

    others = [k for k in rec if k not in FILE_COLUMNS]
    for field, present in has.items():
        if present:
            continue
        near = [k for k in others if k.lower().startswith(field)
                or difflib.get_close_matches(field, [k.lower()], n=1, cutoff=0.8)]
        if near:
            raise ConfigError(word, near[0], f"{field!r} (a {word} named {near[0]!r} would be ignored, and "
                              f"with it the requests' {field}: rename it)", source=where)


def from_file(path: str | Path) -> Workload:
    """Read requests from a CSV (header row) or JSONL (``.jsonl``/``.ndjson``, one object a line).

    Required columns/keys: ``prompt_len`` and ``output_len`` (integers >= 1). Optional:
    ``arrival`` (seconds >= 0; all 0 when absent) and ``id`` (unique integers >= 0; the row order
    0, 1, ... when absent). Optional fields are present in every row or in none. Other columns are
    ignored, unless an optional field is absent and another column's name is close to it
    (``arrival_s``). Any problem raises :class:`ConfigError` naming the file, the place (a CSV's row,
    1-based, counting data rows, not the header or blank lines; a JSONL file's line) and the field.
    Blank lines are skipped (ids by row order count data rows only). The workload is named after the file.
    """
    p = Path(path)
    src = str(p)
    if not p.is_file():
        raise ConfigError("path", src, "an existing CSV or JSONL workload file")
    word = "column" if p.suffix.lower() == ".csv" else "key"
    requests: list[Request] = []
    has: dict[str, bool] = {}
    seen_ids: set[int] = set()
    for row, where, rec in _records(p):
        if not has:
            has = {k: k in rec for k in ("id", "arrival")}
            _check_near_misses(rec, has, where, word)
        values: dict[str, Any] = {}
        for field in FILE_COLUMNS:
            optional = field in has
            if optional and has[field] != (field in rec):
                raise ConfigError(field, rec.get(field), "present in every row or in none (as in row 1)", source=where)
            if field not in rec:
                if optional:
                    continue
                found = ", ".join(map(str, rec)) or "none"
                raise ConfigError(field, None, f"a {word} "
                                  f"named {field!r} (found: {found})", source=where)
            raw = rec[field]
            if field == "arrival":
                value = _parse_arrival(raw)
                expected = "a finite number of seconds >= 0"
            else:
                minimum = 0 if field == "id" else 1
                value = _parse_int(raw, minimum)
                expected = f"an integer >= {minimum}"
            if value is None:
                raise ConfigError(field, raw, expected, source=where)
            values[field] = value
        rid = values.get("id", row - 1)
        if rid in seen_ids:
            raise ConfigError("id", rid, "ids unique within the file", source=where)
        seen_ids.add(rid)
        requests.append(Request(rid, values["prompt_len"], values["output_len"], values.get("arrival", 0.0)))
    if not requests:
        raise ConfigError("rows", 0, "at least one request (the file has no data rows)", source=src)
    return Workload(p.stem or "file", tuple(requests))


# ----------------------------------------------------------------------------------------------
# Replaying recorded runs
# ----------------------------------------------------------------------------------------------
def from_vllm_result(path: str | Path) -> Workload:
    """The requests of a ``vllm bench serve --save-result`` JSON file, in the order vLLM sent them.

    Field names from vllm/benchmarks/serve.py (benchmark(): ``result``): per-request lists ``input_lens``
    (prompt tokens), ``output_lens`` (tokens actually generated; 0 for a failed request), ``ttfts`` and ``itls``
    (checked to be per-request lists), and, in newer vLLM, ``start_times`` (when each request was sent,
    ``time.perf_counter``) and ``queue_times`` (how long it waited for ``--max-concurrency``). Arrivals are
    ``start_times - queue_times`` (when each was ready), from the first; a file without ``start_times`` has no
    arrival times and gives all requests ``t = 0`` (give ``rate`` to re-time it). Failed requests
    (output 0 or an error text) are left out. Request ids are the positions in the file.
    """
    r = read_vllm_result(path, timed=False)  # offloadlab/serving_files.py: read and checked there
    ready = r["ready"] if r["ready"] is not None else np.zeros(len(r["ok"]))
    reqs = tuple(Request(int(i), int(r["input_lens"][i]), int(r["output_lens"][i]), float(ready[i]))
                 for i in np.flatnonzero(r["ok"]))
    return Workload(Path(path).stem or "vllm-result", reqs)


def from_serving_run(path: str | Path) -> Workload:
    """The requests of a serving-run directory (the layout of shared/data/serving/: ``meta.json`` and
    ``requests.jsonl`` with ``input_toks``, ``output_toks`` and ``queued_ts`` per request), in file order.

    Arrival is ``queued_ts`` (the engine's clock; the run's TTFT and latency are measured from it) less the
    first request's. Request ids are the rows' positions. The workload is named after the directory. Only
    these three fields are read and checked (offloadlab/serving_files.py): a run recorded without token
    times still replays.
    """
    cols = read_requests(path, ("input_toks", "output_toks", "queued_ts"))
    return workload_from_columns(Path(path).name or "serving-run", cols["input_toks"], cols["output_toks"],
                                 cols["arrival"])


def workload_from_columns(name: str, prompt_lens, output_lens, arrivals) -> Workload:
    """A workload of one request per row of these equal-length columns (ids = row positions), as a
    serving run's requests are read (``from_serving_run``; validation's replay of the same files)."""
    rows = zip(np.asarray(prompt_lens).tolist(), np.asarray(output_lens).tolist(), np.asarray(arrivals).tolist())
    return Workload(name, tuple(Request(i, p, o, a) for i, (p, o, a) in enumerate(rows)))


# ----------------------------------------------------------------------------------------------
# Arrival processes
# ----------------------------------------------------------------------------------------------
def all_at_once(n: int) -> np.ndarray:
    """``n`` arrivals at ``t = 0`` (an offline batch)."""
    return np.zeros(_check_int("n", n, 1), dtype=np.float64)


def poisson(n: int, rate: float, seed: int = 0) -> np.ndarray:
    """``n`` arrival times of a Poisson process of ``rate`` requests/s started at ``t = 0``.

    Gaps are independent exponentials of mean ``1 / rate``; the times are their cumulative sum
    (so the first request arrives after one gap, and times never decrease).
    """
    n = _check_int("n", n, 1)
    rate = _check_rate(rate)
    rng = np.random.default_rng(_check_seed(seed))
    return np.cumsum(rng.exponential(1.0 / rate, size=n))


# vLLM's benchmark client changed how it times requests (get_request). Up to 0.8.x (read: benchmarks/
# benchmark_serving.py at vllm-project/vllm 0049e29c, April 2025, just after the v0.8.3 tag -- the same get_request,
# seeding and result keys as a 0.8.3 run's log and file show; the 0.6-era copy at 8668d7c has the same loop with
# np.random.exponential, the same draws as gamma of shape 1) it sends a request, then sleeps one gamma gap: the
# first request goes at t = 0 and the last gap is never slept. From
# vllm/benchmarks/serve.py (``vllm bench serve``) it precomputes one gap per request, the first request waits
# one, and the times are rescaled to end at n / rate. Where between 0.8.3 and that code the change came was not
# read: versions before GAPS_BEFORE_FIRST_SINCE are ASSUMED to time requests as 0.8.3 does.
GAPS_BEFORE_FIRST_SINCE = (0, 10, 0)


def vllm_arrivals(n: int, rate: float, burstiness: float = 1.0, seed: int = 0, version: str | None = None
                  ) -> np.ndarray:
    """``n`` send times as ``vllm bench serve --request-rate rate --burstiness b --seed seed`` makes them
    (``version``: the vLLM whose benchmark client sent them; None: the newest form).

    From vllm/benchmarks/serve.py (get_request, and main_async's ``np.random.seed(args.seed)``):

    * ``rate = inf``: every request at ``t = 0``;
    * otherwise gaps are gamma-distributed with shape ``burstiness`` and scale ``1 / (rate * burstiness)``
      (mean ``1 / rate``; ``burstiness = 1`` is a Poisson process, < 1 burstier, > 1 more even;
      ``burstiness = inf``: constant gaps ``1 / rate``), drawn one per request from numpy's legacy global
      generator seeded with ``seed``; times are their cumulative sum (the first request waits one gap);
    * then every time is scaled so that the last one is exactly ``n / rate`` (vLLM does so "to stabilize the
      throughput data from different random seeds"; absent in vLLM <= 0.10's benchmarks/benchmark_serving.py).

    Before ``GAPS_BEFORE_FIRST_SINCE`` (vLLM 0.8.3's benchmarks/benchmark_serving.py get_request: yield the
    request, then ``np.random.gamma`` and sleep): times are ``[0, cumsum(gaps[:n - 1])]`` from the same seeded
    draws, not rescaled.

    With the same seed the times equal vLLM's own (the ShareGPT sampler draws from Python's ``random``, not
    numpy, so numpy's stream is untouched before the arrivals are drawn; 0.8.3's ShareGPTDataset too,
    benchmarks/benchmark_dataset.py).
    """
    n = _check_int("n", n, 1)
    if not _is_real(rate) or math.isnan(rate) or not rate > 0:
        raise ConfigError("rate", rate, "a number of requests per second > 0 (inf: all at once)")
    if not _is_real(burstiness) or math.isnan(burstiness) or not burstiness > 0:
        raise ConfigError("burstiness", burstiness, "a number > 0 (1: Poisson; inf: evenly spaced)")
    seed = _check_seed(seed)
    sleep_after = version is not None and parse_version(version) < GAPS_BEFORE_FIRST_SINCE
    if math.isinf(rate):
        return np.zeros(n, dtype=np.float64)
    draws = n - 1 if sleep_after else n
    if math.isinf(burstiness):
        gaps = np.full(draws, 1.0 / rate)
    else:
        # RandomState(seed) is np.random.seed(seed)'s generator; its size=n draws equal n single draws
        gaps = np.random.RandomState(seed).gamma(shape=burstiness, scale=1.0 / (rate * burstiness), size=draws)
    if sleep_after:
        return np.concatenate(([0.0], np.cumsum(gaps)))
    t = np.cumsum(gaps)
    if t[-1] > 0:
        t *= (n / rate) / t[-1]
    return t


def _arrival_seed(seed: int) -> int:
    """A seed for arrivals derived from ``seed`` but independent of the lengths' stream."""
    return int(np.random.SeedSequence([seed, 1]).generate_state(1)[0])


# ----------------------------------------------------------------------------------------------
# The CLI's builder
# ----------------------------------------------------------------------------------------------
#: Peak memory a served request costs, generated, simulated and summarised (bytes; benchmarks/bench_memory.py
#: measures it: about 1.6 kB on CPython 3.11, rounded up for other Pythons and workloads).
BYTES_PER_REQUEST = 3000


def available_memory() -> float:
    """Bytes this machine can still give a process (MemAvailable; all of physical memory where unknown)."""
    try:
        return float(host_memory_available())
    except (ValueError, OSError, AttributeError):
        return math.inf


def check_fits_in_memory(n: int) -> None:
    """Refuse, before anything is generated, a run of ``n`` requests that would not fit in memory."""
    need, have = n * BYTES_PER_REQUEST, available_memory()
    if need > have:
        raise ConfigError("n", n, f"a number of requests that fits in memory: about {need / 1e9:,.3g} GB estimated "
                          f"({BYTES_PER_REQUEST} bytes per request), {have / 1e9:,.3g} GB available")


def _looks_like_path(kind: str) -> bool:
    p = Path(kind)
    return (p.suffix.lower() in (".csv", ".jsonl", ".ndjson", ".json") or p.exists() or "/" in kind
            or "\\" in kind)


def sharegpt(n: int = DEFAULT_N, seed: int = 0, tokenizer: str = "llama3", output_len: int | None = None,
             source: str = "auto") -> Workload:
    """``n`` real ShareGPT requests sampled as vLLM's serving benchmark samples them (see :mod:`.sharegpt`),
    all at ``t = 0``; ids are the sending order. ``output_len`` is ``--sharegpt-output-len``."""
    from . import sharegpt as sg

    n = _check_int("n", n, 1)
    seed = _check_seed(seed)
    lengths = sg.load_lengths(tokenizer, source)
    _, prompts, outputs = sg.sample(lengths, n, seed=seed, output_len=output_len)
    return _build(f"sharegpt-{lengths.tokenizer}", prompts, outputs)


def make_workload(
    kind: str | Path,
    n: int | None = None,
    seed: int = 0,
    rate: float | None = None,
    burstiness: float = 1.0,
    max_concurrency: int | None = None,
    **kw: Any,
) -> Workload:
    """Build a workload from a kind name, as the CLI does.

    ``kind`` is one of:

    * ``"sharegpt"`` -- :func:`sharegpt`, real conversations as vLLM's benchmark samples them; ``kw`` may set
      ``tokenizer`` (``llama3``, ``qwen``), ``output_len`` (a fixed output length) and ``source``;
    * ``"multi_news"`` / ``"longbench_multi_news"`` -- :func:`longbench_multi_news`; ``kw`` may set
      ``prompt_mean``, ``output_len``, ``sigma``, ``max_prompt``;
    * ``"fixed"`` -- :func:`fixed`; ``kw`` must set ``prompt_len`` and ``output_len``;
    * a dataset of ``workloads.csv`` (e.g. ``"sharegpt_8k"``) -- :func:`from_dataset_stats` (a lognormal fit);
    * a path to a CSV/JSONL file -- :func:`from_file`; to a ``.json`` vLLM benchmark result --
      :func:`from_vllm_result`; to a serving-run directory -- :func:`from_serving_run`. ``n`` keeps the
      first ``n`` requests.

    ``n`` defaults to the paper's 200 for synthetic kinds and to the whole file for files.
    ``rate=None`` means every request arrives at ``t = 0`` (a file keeps its own arrivals); otherwise
    arrivals are :func:`vllm_arrivals` at ``rate`` requests/s (``inf``: all at once) with ``burstiness`` and
    ``seed``, as ``vllm bench serve --request-rate --burstiness --seed`` makes them. ``max_concurrency`` is
    the client's limit on outstanding requests (``--max-concurrency``).
    """
    if n is not None:
        n = _check_int("n", n, 1)
        check_fits_in_memory(n)
    seed = _check_seed(seed)
    if rate is not None:
        vllm_arrivals(1, rate, burstiness)  # validates both
    elif burstiness != 1.0:
        raise ConfigError("burstiness", burstiness, "1 unless a rate is given (burstiness shapes --rate's gaps)")
    if max_concurrency is not None:
        max_concurrency = _check_int("max_concurrency", max_concurrency, 1)

    def allow(*names: str) -> None:
        extra = sorted(set(kw) - set(names))
        if extra:
            raise ConfigError(extra[0], kw[extra[0]], f"no such option for workload {str(kind)!r}"
                              + (f" (options: {', '.join(names)})" if names else ""))

    name = str(kind).strip() if isinstance(kind, (str, Path)) else kind
    known = ["sharegpt", "multi_news", "fixed", *[d for d in dataset_names() if d != _MULTI_NEWS]]
    expected = f"one of {known}, a CSV/JSONL file, a vLLM result .json or a serving-run directory"
    if not isinstance(name, str) or not name:
        raise ConfigError("workload", kind, expected)
    key = name.lower()
    if key == "sharegpt":
        allow("tokenizer", "output_len", "source")
        wl = sharegpt(n or DEFAULT_N, seed=seed, **kw)
    elif key in _MULTI_NEWS_ALIASES:
        allow("prompt_mean", "output_len", "sigma", "max_prompt")
        wl = longbench_multi_news(n=n or DEFAULT_N, seed=seed, **kw)
    elif key == "fixed":
        allow("prompt_len", "output_len")
        for req in ("prompt_len", "output_len"):
            if req not in kw:
                raise ConfigError(req, None, "an integer >= 1 (required by workload 'fixed')")
        wl = fixed(n or DEFAULT_N, kw["prompt_len"], kw["output_len"])
    elif key in _catalog_rows():
        allow()
        wl = from_dataset_stats(key, n or DEFAULT_N, seed=seed)
    elif isinstance(kind, Path) or _looks_like_path(name):
        allow()
        path = Path(name)
        if path.is_dir():
            wl = from_serving_run(path)
        elif path.suffix.lower() == ".json":
            wl = from_vllm_result(path)
        else:
            wl = from_file(name)
        if n is not None:
            if n > wl.n:
                raise ConfigError("n", n, f"at most the {wl.n} requests in the file", source=name)
            wl = wl.head(n)
    else:
        raise ConfigError("workload", kind, expected)

    if rate is not None:
        wl = wl.with_arrivals(vllm_arrivals(wl.n, rate, burstiness, seed))  # the i-th time to the i-th smallest id
    # else: a generator's requests all arrive at t = 0 already (_build), a file's keep their own times
    return wl.with_max_concurrency(max_concurrency)
