"""Public vLLM start-up memory profiles: the evidence against which sim/memory.py ``plan_memory`` (the KV
cache a deployment gets) and ``activation_peak`` (what vLLM's profiling run holds) are checked.

``traces/memory/vllm_memory_profiles.csv`` holds one row per start-up log: where it comes from, the
vLLM version and engine (V0: ``vllm/worker/worker.py`` logs "model weights take ...; non_torch_memory
takes ...; PyTorch activation peak memory takes ...; the rest of the memory reserved for KV Cache is ...";
V1: ``vllm/v1/worker/gpu_worker.py``, "Available KV cache memory" and, at DEBUG or from 0.11 on, the
same breakdown), the GPU's memory (``total_gpu_memory_gib``) or the share vLLM may use
(``usable_gib`` = gpu_memory_utilization x total, as some logs print only that), the settings that size
the profiling run (tensor parallelism, max_num_batched_tokens, max_num_seqs), and the logged GiB. A
field the source does not give is empty; nothing in it is computed here. Its README says where each row
comes from.

``compare`` sets each row beside the project's model, as a simulation of that deployment would size it:
the activation peak ``activation_peak`` gives (the tensor-parallel shard's, by V1's or V0's rule), the fixed overhead (EngineConfig.overhead_bytes) against the logged non-torch memory, and the KV
cache ``plan_memory`` leaves (no offload, the row's memory as the GPU's) against the logged KV GiB (or,
where only those are logged, KV tokens or blocks). The KV is compared only for 16-bit weights (the
catalog's); a quantized row still checks the activation and the non-torch memory. ``implied bytes per
logit`` is a diagnostic, not a fit: what the logged activation peak leaves per logit of the sampler
(max_num_seqs x vocab) after the hidden states of max_num_batched_tokens tokens (bf16), the one
activation that outlives V1's forward pass into ``_dummy_sampler_run`` (vllm/v1/worker/gpu_model_runner.py
``profile_run``).

``python -m offloadlab.validation.memory_profiles [CSV]`` prints the table and, per engine, the median
and 90th percentile of |KV error|.
"""
from __future__ import annotations

import dataclasses
import re
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..catalog import get_gpu, get_model
from ..errors import ConfigError, DoesNotFitError, UnknownNameError
from ..fileio import read_csv_table
from ..policy import NoOffload
from ..specs import GiB

TABLE = Path(__file__).parent / "traces" / "memory" / "vllm_memory_profiles.csv"
COLUMNS = ("url", "date", "vllm_version", "engine", "gpu", "catalog_gpu", "total_gpu_memory_gib", "usable_gib",
           "gpu_memory_utilization", "model", "catalog_model", "weights_dtype", "tp", "max_num_batched_tokens",
           "max_num_seqs", "max_model_len", "chunked_prefill", "enforce_eager", "weights_gib", "non_torch_gib", "activation_peak_gib",
           "kv_gib", "kv_tokens_or_blocks", "notes")
ENGINES = ("V0", "V1")
WEIGHT_DTYPES = ("bf16", "fp16", "fp8", "int8", "int4")
SIXTEEN_BIT = ("bf16", "fp16")  # the catalog's weights: the KV cache is compared only for these
LOGGED_GIB = ("weights_gib", "non_torch_gib", "activation_peak_gib", "kv_gib")
_KV_COUNT = re.compile(r"(\d+) (tokens|blocks)")
BLOCK_SIZE = 16  # vLLM's default KV block (tokens), the one every row runs with


@dataclass(frozen=True)
class Row:
    url: str
    date: str
    vllm_version: str
    engine: str  # "V0" or "V1"
    gpu: str
    catalog_gpu: str
    total_gib: float | None
    usable_gib: float | None
    gpu_memory_utilization: float
    model: str
    catalog_model: str
    weights_dtype: str
    tp: int
    max_num_batched_tokens: int
    max_num_seqs: int
    max_model_len: int
    chunked_prefill: bool
    enforce_eager: bool | None  # None: not given
    weights_gib: float | None
    non_torch_gib: float | None
    activation_peak_gib: float | None
    kv_gib: float | None
    kv_tokens: int | None  # logged KV tokens (blocks x 16 where blocks are logged)
    notes: str
    line: int = 0

    @property
    def memory_gib(self) -> float:
        """The GPU's memory as vLLM sees it: the logged total, else the usable share / utilization."""
        return self.total_gib if self.total_gib is not None else self.usable_gib / self.gpu_memory_utilization


def _number(v: str, column: str, where: str, kind=float, low: float = 0.0, strict: bool = False):
    try:
        x = kind(v)
    except ValueError:
        x = None
    if x is None or not (x > low if strict else x >= low):
        want = ("an integer" if kind is int else "a number") + (f" > {low:g}" if strict else f" >= {low:g}")
        raise ConfigError(column, v, want, source=where)
    return x


def load(path: str | Path = TABLE) -> list[Row]:
    """The table's rows; a missing column or a bad cell is a one-line ConfigError naming the file, the
    line and the column."""
    header, lines = read_csv_table(path)
    missing = [c for c in COLUMNS if c not in header]
    if missing:
        raise ConfigError("columns", header, "the columns " + ", ".join(COLUMNS), source=str(path))
    col = {c: header.index(c) for c in COLUMNS}
    rows = []
    for line, cells in lines:
        v = {c: cells[i].strip() for c, i in col.items()}
        where = f"{path}, line {line}"
        if not (v["url"].startswith("https://") or v["url"].startswith("validation/")):
            raise ConfigError("url", v["url"], "the source's https URL (or this repository's validation/ path)",
                              source=where)
        if v["engine"] not in ENGINES:
            raise ConfigError("engine", v["engine"], "V0 or V1", source=where)
        if v["weights_dtype"] not in WEIGHT_DTYPES:
            raise ConfigError("weights_dtype", v["weights_dtype"], "one of " + ", ".join(WEIGHT_DTYPES), source=where)
        if v["chunked_prefill"] not in ("yes", "no"):
            raise ConfigError("chunked_prefill", v["chunked_prefill"], "yes or no", source=where)
        if v["enforce_eager"] not in ("yes", "no", ""):
            raise ConfigError("enforce_eager", v["enforce_eager"], "yes, no or empty (not given)", source=where)
        for name in ("model", "gpu", "vllm_version"):
            if not v[name]:
                raise ConfigError(name, v[name], "not empty", source=where)
        for name, getter in (("catalog_model", get_model), ("catalog_gpu", get_gpu)):
            try:
                getter(v[name])
            except UnknownNameError:
                raise ConfigError(name, v[name], f"a {name.split('_')[1]} of offloadlab's catalog", source=where) \
                    from None
        util = _number(v["gpu_memory_utilization"], "gpu_memory_utilization", where, strict=True)
        if util > 1:
            raise ConfigError("gpu_memory_utilization", v["gpu_memory_utilization"], "a fraction in (0, 1]",
                              source=where)
        total = _number(v["total_gpu_memory_gib"], "total_gpu_memory_gib", where, strict=True) \
            if v["total_gpu_memory_gib"] else None
        usable = _number(v["usable_gib"], "usable_gib", where, strict=True) if v["usable_gib"] else None
        if total is None and usable is None:
            raise ConfigError("total_gpu_memory_gib", "", "the GPU's memory, or usable_gib", source=where)
        ints = {c: _number(v[c], c, where, int, 1)
                for c in ("tp", "max_num_batched_tokens", "max_num_seqs", "max_model_len")}
        logged = {c: _number(v[c], c, where) if v[c] else None for c in LOGGED_GIB}
        kv_tokens = None
        if v["kv_tokens_or_blocks"]:
            m = _KV_COUNT.fullmatch(v["kv_tokens_or_blocks"])
            if not m:
                raise ConfigError("kv_tokens_or_blocks", v["kv_tokens_or_blocks"], "'<N> tokens' or '<N> blocks'",
                                  source=where)
            kv_tokens = int(m[1]) * (BLOCK_SIZE if m[2] == "blocks" else 1)
        rows.append(Row(v["url"], v["date"], v["vllm_version"], v["engine"], v["gpu"], v["catalog_gpu"], total,
                        usable, util, v["model"], v["catalog_model"], v["weights_dtype"], **ints,
                        chunked_prefill=v["chunked_prefill"] == "yes",
                        enforce_eager={"yes": True, "no": False}.get(v["enforce_eager"]), **logged, kv_tokens=kv_tokens,
                        notes=v["notes"], line=line))
    return rows


@dataclass(frozen=True)
class Comparison:
    row: Row
    activation_gib: float  # the model's activation peak (activation_peak)
    overhead_gib: float  # the model's fixed overhead (EngineConfig.overhead_bytes)
    kv_gib: float | None  # the KV cache plan_memory leaves (None: not compared)
    kv_tokens: int | None  # its whole blocks, in tokens
    implied_logit_bytes: float | None  # V1 diagnostic (module docstring)

    @property
    def activation_error_gib(self) -> float | None:
        a = self.row.activation_peak_gib
        return None if a is None else self.activation_gib - a

    @property
    def overhead_error_gib(self) -> float | None:
        n = self.row.non_torch_gib
        return None if n is None else self.overhead_gib - n

    @property
    def kv_error(self) -> float | None:
        """Predicted / logged - 1 of the KV cache: its GiB where logged, else its tokens."""
        if self.kv_gib is None:
            return None
        if self.row.kv_gib:
            return self.kv_gib / self.row.kv_gib - 1
        if self.row.kv_tokens:
            return self.kv_tokens / self.row.kv_tokens - 1
        return None


def compare(row: Row) -> Comparison:
    """The project's memory model for ``row``'s deployment (module docstring)."""
    from ..sim.memory import activation_peak, plan_memory
    from ..sim.serving import EngineConfig

    whole = get_model(row.catalog_model)
    shard = whole.shard(row.tp)
    scheduler = row.engine.lower()  # "v1" / "v0"
    overhead = EngineConfig().overhead_bytes
    act = activation_peak(shard, row.max_num_batched_tokens, row.max_num_seqs, scheduler)
    kv_gib = kv_tokens = None
    if row.weights_dtype in SIXTEEN_BIT:
        hw = dataclasses.replace(get_gpu(row.catalog_gpu), memory_bytes=row.memory_gib * GiB)
        try:
            # max_model_len 1: the budget is compared, not vLLM's check that one max-length request fits
            plan = plan_memory(shard, hw, NoOffload().place(shard), gpu_memory_utilization=row.gpu_memory_utilization,
                               max_batched_tokens=row.max_num_batched_tokens, max_seqs=row.max_num_seqs,
                               max_model_len=1, block_size=BLOCK_SIZE, overhead=overhead, gpus=row.tp,
                               scheduler=scheduler)
            kv_gib, kv_tokens = plan.kv_cache / GiB, plan.kv_tokens
        except DoesNotFitError:
            kv_gib, kv_tokens = 0.0, 0
    implied = None
    if row.engine == "V1" and row.activation_peak_gib is not None:
        hidden_states = whole.hidden_state_bytes(row.max_num_batched_tokens)  # [tokens, hidden], whole on each GPU
        implied = (row.activation_peak_gib * GiB - hidden_states) / (row.max_num_seqs * whole.vocab)
    return Comparison(row, act / GiB, overhead / GiB, kv_gib, kv_tokens, implied)


@dataclass(frozen=True)
class Summary:
    engine: str
    rows: int  # rows of that engine
    kv_rows: int  # of which the KV cache is compared
    kv_abs_median: float | None  # median |KV error|
    kv_abs_p90: float | None
    activation_error_median_gib: float | None  # median (model - logged) activation peak
    overhead_error_median_gib: float | None  # median (0.5 GiB - logged non-torch)
    implied_logit_bytes: tuple[float, float, float] | None  # (min, median, max), V1


def summarize(comparisons: list[Comparison]) -> dict[str, Summary]:
    out = {}
    for engine in ENGINES:
        cs = [c for c in comparisons if c.row.engine == engine]
        if not cs:
            continue
        kv = [abs(c.kv_error) for c in cs if c.kv_error is not None]
        act = [c.activation_error_gib for c in cs if c.activation_error_gib is not None]
        ovh = [c.overhead_error_gib for c in cs if c.overhead_error_gib is not None]
        imp = [c.implied_logit_bytes for c in cs if c.implied_logit_bytes is not None]
        out[engine] = Summary(
            engine, len(cs), len(kv), statistics.median(kv) if kv else None,
            float(np.percentile(kv, 90)) if kv else None, statistics.median(act) if act else None,
            statistics.median(ovh) if ovh else None, (min(imp), statistics.median(imp), max(imp)) if imp else None)
    return out


def _f(x: float | None, fmt: str) -> str:
    return format(x, fmt) if x is not None else "-"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    comparisons = [compare(r) for r in load(argv[0] if argv else TABLE)]
    print(f"{'model':34s} {'gpu':16s} {'tp':>2s} {'vLLM':>8s} {'N':>5s} {'S':>4s} | {'act log':>7s} {'model':>6s}"
          f" | {'nontorch':>8s} {'model':>5s} | {'KV log':>7s} {'model':>7s} {'err':>7s} | {'B/logit':>7s}")
    for c in comparisons:
        r = c.row
        kv_logged = _f(r.kv_gib, "7.2f") if r.kv_gib is not None else (f"{r.kv_tokens:>7d}" if r.kv_tokens else "-")
        kv_model = _f(c.kv_gib, "7.2f") if r.kv_gib is not None else (f"{c.kv_tokens:>7d}" if r.kv_tokens else "-")
        err = f"{c.kv_error:+7.1%}" if c.kv_error is not None else "-"
        version = r.vllm_version if len(r.vllm_version) <= 8 else r.engine
        print(f"{r.model.split('/')[-1][:34]:34s} {r.gpu[:16]:16s} {r.tp:2d} {version:>8s} "
              f"{r.max_num_batched_tokens:5d} {r.max_num_seqs:4d} | {_f(r.activation_peak_gib, '7.2f'):>7s} "
              f"{c.activation_gib:6.2f} | {_f(r.non_torch_gib, '8.2f'):>8s} {c.overhead_gib:5.2f} | {kv_logged:>7s} "
              f"{kv_model:>7s} {err:>7s} | {_f(c.implied_logit_bytes, '7.1f'):>7s}")
    print("(GiB; KV in tokens where only tokens or blocks are logged; N max_num_batched_tokens, S max_num_seqs;"
          " B/logit: implied sampler bytes per logit, V1)")
    for s in summarize(comparisons).values():
        imp = (f"; implied bytes per logit {s.implied_logit_bytes[0]:.1f}-{s.implied_logit_bytes[2]:.1f} "
               f"(median {s.implied_logit_bytes[1]:.1f})" if s.implied_logit_bytes else "")
        print(f"{s.engine}: {s.rows} rows, KV compared on {s.kv_rows}: |error| median {_f(s.kv_abs_median, '.1%')}, "
              f"p90 {_f(s.kv_abs_p90, '.1%')}; activation model - logged median {_f(s.activation_error_median_gib, '+.2f')}"
              f" GiB; 0.5 GiB overhead - logged non-torch median {_f(s.overhead_error_median_gib, '+.2f')} GiB{imp}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
