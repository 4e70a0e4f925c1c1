"""Serving-run directories (the second public measurement format): read, replay, compare.

A run directory holds ``meta.json`` (vLLM version, engine kwargs, KV cache, hardware) and
``requests.jsonl`` (one row per request: request_id, input_toks, output_toks, queued_ts,
first_token_ts, last_token_ts; one monotonic clock, seconds), ``timeseries.csv`` optionally (one row
per second: running, waiting, ...). Layout and definitions: shared/data/README.md (LLMServingSim's
bench format). Measured as that project defines it:
TTFT = first_token_ts - queued_ts; TPOT = (last_token_ts - first_token_ts) / max(1, output_toks - 1);
e2e = last_token_ts - queued_ts.

``workload_of(run)`` is the workload (prompt_len, output_len and arrival: queued_ts relative to the first,
per request, in file order; sim/workload.py ``workload_from_columns``, as ``--workload DIR`` builds it);
``serving_requests`` lists the same rows with their request_id. ``replay_serving_run`` simulates the requests on
the engine the run used (sim/vllm_engine.py: that vLLM version's defaults for whatever
engine_kwargs leaves unset) and compares request by request.

A ``vllm bench serve --save-result --save-detailed`` JSON file is a run too (``load_vllm_result_run``): its
requests become the same columns, measured as vLLM's benchmark client measures them (TTFT = ttfts[i], from
sending the request to its first streamed token; e2e = TTFT + sum(itls[i]); TPOT as above), and what the file
does not say -- vLLM version, engine arguments, GPU -- comes from a sidecar ``RESULT.meta.json`` in meta.json's
form (model, vllm_version, engine_kwargs, hardware) and the same overrides (--gpu, --model, --vllm-version).
From there the replay is the run directory's.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..checks import is_int
from ..catalog import get_gpu, gpu_for_device, model_for_hf_id  # model_for_hf_id: this module's name for it too
from ..errors import ConfigError, UnknownNameError
from ..fileio import read_json_object
from ..metrics import percentiles
from ..serving_files import check_run_dir, is_vllm_result, read_requests, read_timeseries, read_vllm_result
from ..specs import HardwareSpec, ModelSpec

if TYPE_CHECKING:
    import pandas as pd

# engine_kwargs (vLLM's EngineArgs names) -> EngineConfig fields / vllm_engine settings
ENGINE_KWARGS = {"max_num_seqs": "max_num_seqs", "max_num_batched_tokens": "max_num_batched_tokens",
                 "max_model_len": "max_model_len", "gpu_memory_utilization": "gpu_memory_utilization",
                 "block_size": "block_size", "enable_chunked_prefill": "chunked_prefill",
                 "enable_prefix_caching": "prefix_caching", "tensor_parallel_size": "tensor_parallel",
                 "pipeline_parallel_size": "pipeline_parallel", "enforce_eager": "enforce_eager",
                 "async_scheduling": "async_scheduling", "kv_cache_dtype": "kv_cache_dtype",
                 "kv_cache_memory_bytes": "kv_cache_memory_bytes", "num_gpu_blocks_override": "num_gpu_blocks_override"}
# engine kwargs that do not change what is simulated (LLMServingSim's bench runner records all of these)
IGNORED_KWARGS = {"model", "seed", "dtype", "tokenizer", "served_model_name", "trust_remote_code", "revision",
                  "load_format",  # "dummy" (random weights) runs the same kernels on a dense model
                  "skip_tokenizer_init", "disable_log_stats",
                  "enable_expert_parallel",  # acts on mixture-of-experts layers only; replayed models are dense
                  # NCCL instead of vLLM's custom all-reduce: one all-reduce model here (sim/costs.py allreduce_seconds)
                  "disable_custom_all_reduce"}
# engine_kwargs.compilation_config keys: graph capture is modelled (cudagraph_mode, the capture size, as
# resolved), the fusion passes (pass_config) and the compile mode are not timed separately
COMPILATION_KEYS = {"pass_config", "cudagraph_mode", "max_cudagraph_capture_size", "cudagraph_capture_sizes", "mode",
                    "level"}
# vllm/config/compilation.py CUDAGraphMode values, as a resolved config records them (the enum's value, or
# its name) -> the Roofline's graph_mode (sim/costs.py GRAPH_MODES); "none": no graphs (cuda_graphs=False)
CUDAGRAPH_MODES = {0: "none", 1: "piecewise_only", 2: "full", (2, 0): "decode", (2, 1): "piecewise",
                   "NONE": "none", "PIECEWISE": "piecewise_only", "FULL": "full", "FULL_DECODE_ONLY": "decode",
                   "FULL_AND_PIECEWISE": "piecewise"}
METRICS = ("ttft", "tpot", "e2e")
# where each kind of run's times come from (printed with its replay)
MEASURED_BY = {"server": "server-side: the engine's timestamps (TTFT from queued_ts, the request entering the engine)",
               "client": "client-side: vLLM's benchmark client (TTFT from sending the HTTP request to its first "
                         "streamed token, e2e = TTFT + the inter-token gaps; makespan = the benchmark's duration); "
                         "predicted from the request reaching the engine"}
STATS = ("mean", "p50", "p90", "p99")


def is_serving_run(path: str | Path) -> bool:
    """A serving run is a directory, or a vLLM benchmark result file (a JSON object with ``input_lens``); a
    probe is any other file."""
    return Path(path).is_dir() or is_vllm_result(path)


@dataclass(frozen=True)
class ServingRun:
    """A serving run as read: ``columns`` (numpy arrays in file order: request_id, prompt_len, output_len,
    queued_ts, first_token_ts, last_token_ts, arrival, and the measured ttft, tpot, e2e) and, when the run
    has one, ``timeseries_columns`` (timeseries.csv's t, running and waiting); ``requests`` and
    ``timeseries`` are the same as DataFrames, made when first asked for (a replay's printed summary needs
    no pandas)."""

    path: Path
    meta: dict
    columns: dict = field(repr=False)
    timeseries_columns: dict | None = field(default=None, compare=False, repr=False)
    # a benchmark result file's: where its times were measured ("client": vLLM's benchmark client; "server": the
    # engine's timestamps, a run directory's), the client's measured duration (else the makespan is the
    # requests' span), its --max-concurrency, the failed requests left out, and how it was read (printed)
    measured_by: str = "server"
    duration_s: float | None = None
    max_concurrency: int | None = None
    failed: int = 0
    notes: tuple = ()

    @functools.cached_property
    def requests(self) -> pd.DataFrame:
        import pandas as pd

        return pd.DataFrame(self.columns)

    @functools.cached_property
    def timeseries(self) -> pd.DataFrame | None:
        if self.timeseries_columns is None:
            return None
        import pandas as pd

        return pd.DataFrame(self.timeseries_columns)

    @property
    def vllm_version(self) -> str | None:
        return self.meta.get("vllm_version")

    @property
    def engine_kwargs(self) -> dict:
        return dict(self.meta.get("engine_kwargs") or {})

    @property
    def measured_kv_blocks(self) -> int | None:
        return (self.meta.get("kv_cache") or {}).get("num_gpu_blocks")

    @property
    def device_name(self) -> str | None:
        return (self.meta.get("hardware") or {}).get("device_name")

    @property
    def device_memory_bytes(self) -> float | None:
        return (self.meta.get("hardware") or {}).get("device_total_memory_bytes")

    @property
    def resolved(self) -> dict:
        return self.meta.get("resolved_config") or {}


def load_serving_run(path: str | Path, vllm_version: str | None = None) -> ServingRun:
    """Read and check a run directory (offloadlab/serving_files.py: every field of every request, and
    timeseries.csv), or a vLLM benchmark result file (``load_vllm_result_run``; ``vllm_version`` overrides its
    sidecar's); every problem is one ConfigError naming the file, line and field."""
    if Path(path).is_file():
        return load_vllm_result_run(path, vllm_version)
    d = check_run_dir(path)
    meta = read_json_object(d / "meta.json", "meta.json")
    kw = meta.get("engine_kwargs")
    if kw is not None and not isinstance(kw, dict):
        raise ConfigError("engine_kwargs", kw, "an object of vLLM engine arguments", source=str(d / "meta.json"))
    raw = read_requests(d)
    q, first, last, n = raw["queued_ts"], raw["first_token_ts"], raw["last_token_ts"], raw["output_toks"]
    cols = {"request_id": raw["request_id"], "prompt_len": raw["input_toks"], "output_len": n, "queued_ts": q,
            "first_token_ts": first, "last_token_ts": last, "arrival": raw["arrival"],
            "ttft": first - q, "tpot": _tpot(first, last, n), "e2e": last - q}  # as shared/data/README.md has them
    return ServingRun(d, meta, cols, read_timeseries(d))


def sidecar_path(path: str | Path) -> Path:
    """RESULT.json's sidecar: RESULT.meta.json beside it."""
    p = Path(path)
    return p.with_name(p.stem + ".meta.json")


def load_vllm_result_run(path: str | Path, vllm_version: str | None = None) -> ServingRun:
    """A ``vllm bench serve --save-result --save-detailed`` file as a ServingRun.

    Requests in file order (request_id = the position), the failed ones (0 tokens or an error text) left out
    and counted. Measured as vLLM's benchmark client measures them: TTFT = ttfts[i], e2e = TTFT + sum(itls[i]),
    TPOT = (e2e - TTFT) / (output - 1) (vLLM's ``(latency - ttft) / (output_len - 1)``; NaN for a one-token output,
which vLLM's calculate_metrics leaves out of TPOT, as the replay's TPOT figures do then). Arrivals:
    ``start_times - queue_times`` when the file has them; else regenerated from request_rate, burstiness and
    the seed as that vLLM version's client drew them (sim/workload.py ``vllm_arrivals``; request_rate inf: all
    at t = 0), the seed being the sidecar's ``benchmark_seed`` or the benchmark's default 0 (vLLM's --seed;
    result files do not record it). The sidecar (``sidecar_path``; optional) is meta.json's form: model,
    vllm_version, engine_kwargs, kv_cache, hardware (device_name, device_count, device_total_memory_bytes);
    the model defaults to the file's model_id.
    """
    from ..sim.workload import vllm_arrivals

    p = Path(path)
    r = read_vllm_result(p)
    side = sidecar_path(p)
    meta = read_json_object(side, side.name) if side.is_file() else {}
    src = str(side)
    for key, kind in (("engine_kwargs", dict), ("kv_cache", dict), ("hardware", dict)):
        if meta.get(key) is not None and not isinstance(meta[key], kind):
            raise ConfigError(key, meta[key], "an object", source=src)
    if not meta.get("model") and r["model_id"]:
        meta = {**meta, "model": r["model_id"]}
    seed = r["seed"] if r["seed"] is not None else meta.get("benchmark_seed", 0)
    if not is_int(seed, 0):
        raise ConfigError("benchmark_seed", seed, "the benchmark's --seed: an integer >= 0", source=src)
    ok = r["ok"]
    n_all = len(ok)
    if r["ready"] is not None:
        arrival_all = r["ready"]
        how = "arrivals: start_times - queue_times"
    else:
        rate = r["request_rate"]
        if rate is None:
            raise ConfigError("request_rate", None, "a rate (or \"inf\") when the file has no start_times: the "
                              "arrivals are regenerated from it", source=str(p))
        version = vllm_version or meta.get("vllm_version")
        if not version and not math.isinf(rate):
            raise ConfigError("vllm_version", None, "the vLLM version whose client sent the requests (its "
                              f"arrival timing differs by version): in {side.name} or --vllm-version", source=src)
        arrival_all = vllm_arrivals(n_all, rate, r["burstiness"], seed, version)
        said = r["seed"] is not None or "benchmark_seed" in meta
        how = ("arrivals: all at t = 0 (request_rate inf)" if math.isinf(rate) else
               f"arrivals: regenerated as vLLM {version}'s client drew them (request_rate {rate:g}, burstiness "
               f"{r['burstiness']:g}, seed {seed}{'' if said else ' = the benchmark default'})")
    idx = np.flatnonzero(ok)
    arrival = arrival_all[idx] - arrival_all[idx].min()
    ttft, e2e, n = r["ttft"][idx], r["e2e"][idx], r["output_lens"][idx]
    first, last = arrival + ttft, arrival + e2e
    cols = {"request_id": np.array([str(i) for i in idx], dtype=object), "prompt_len": r["input_lens"][idx],
            "output_len": n, "queued_ts": arrival, "first_token_ts": first, "last_token_ts": last, "arrival": arrival,
            "ttft": ttft, "tpot": np.where(n > 1, _tpot(first, last, n), np.nan), "e2e": e2e}
    notes = (how, f"failed requests left out: {n_all - len(idx)} of {n_all}")
    return ServingRun(p, meta, cols, None, measured_by="client", duration_s=r["duration"], max_concurrency=r["max_concurrency"],
                      failed=n_all - len(idx), notes=notes)


def _tpot(first: np.ndarray, last: np.ndarray, output_len: np.ndarray) -> np.ndarray:
    """Seconds per output token after the first, as the run defines TPOT, measured or predicted (a one-token
    output's divides by 1, not NaN)."""
    return (last - first) / np.maximum(1, output_len - 1)


def serving_requests(path: str | Path | ServingRun) -> list[dict]:
    """The run's requests as a workload: request_id, prompt_len, output_len, arrival (s after the
    first request was queued), in file order."""
    run = path if isinstance(path, ServingRun) else load_serving_run(path)
    return _records(run.columns, ["request_id", "prompt_len", "output_len", "arrival"])


def _records(columns: dict, names: list[str]) -> list[dict]:
    """One dict per row of these equal-length numpy columns, ``names`` only, as Python values (json.dumps
    writes them; a numpy integer it could not)."""
    return [dict(zip(names, row)) for row in zip(*(columns[c].tolist() for c in names))]


def workload_of(run: ServingRun):
    """A sim Workload (request ids = row numbers in requests.jsonl)."""
    from ..sim.workload import workload_from_columns

    c = run.columns
    wl = workload_from_columns(run.path.name, c["prompt_len"], c["output_len"], c["arrival"])
    return wl.with_max_concurrency(run.max_concurrency)


# ---- what ran: model, GPU, engine ----
def resolve_model(run: ServingRun, model: str | ModelSpec | None = None) -> ModelSpec:
    if isinstance(model, ModelSpec):
        return model
    if model:
        from ..hf_config import model_from_arg

        return model_from_arg(model)
    hf_id = run.meta.get("model") or run.engine_kwargs.get("model")
    if not hf_id:
        raise ConfigError("model", None, "a model id in meta.json, or --model NAME|config.json",
                          source=str(_meta_path(run)))
    return model_for_hf_id(hf_id)


def resolve_gpu(run: ServingRun, gpu: str | HardwareSpec | None = None) -> HardwareSpec:
    """--gpu, else meta.json's hardware.device_name; the device's memory as measured when recorded
    (vLLM sizes the KV cache from torch's total, which the datasheet's "24 GB" is not exactly). The node:
    ``hardware.device_count`` when recorded (the GPUs the run's node showed), else the catalog's assumption
    for the GPU (offloadlab/catalog ``_NODES``: e.g. 4 A100-SXM4-40GB, as the paper's Polaris node)."""
    if gpu is not None:
        return _node(run, get_gpu(gpu))
    name = run.device_name
    if not name:
        raise ConfigError("hardware.device_name", None, "the GPU's name in meta.json, or give one with --gpu NAME "
                          "(see `offloadlab list`; add yours with --catalog FILE)", source=str(_meta_path(run)))
    try:
        hw = gpu_for_device(name)
    except UnknownNameError as e:
        raise ConfigError("hardware.device_name", name, "a GPU in the catalog: give one with --gpu NAME (see "
                          "`offloadlab list`) or add it with --catalog FILE", source=str(_meta_path(run))) from None
    mem = run.device_memory_bytes
    if isinstance(mem, (int, float)) and mem > 0:
        hw = hw.replace(memory_bytes=float(mem))
    return _node(run, hw)


def _node(run: ServingRun, hw: HardwareSpec) -> HardwareSpec:
    """``hw`` in a node of ``hardware.device_count`` GPUs when the run records it (an integer >= 1)."""
    count = (run.meta.get("hardware") or {}).get("device_count")
    if count is None:
        return hw
    if not is_int(count, 1, 1024):
        raise ConfigError("hardware.device_count", count, "the number of GPUs in the run's node: an integer >= 1",
                          source=str(_meta_path(run)))
    return hw.replace(gpus_per_node=int(count), gpus_per_host_link=min(hw.gpus_per_host_link, int(count)))


def _meta_path(run: ServingRun) -> Path:
    """Where a run's meta facts were read: meta.json in its directory, a result file's sidecar."""
    return sidecar_path(run.path) if run.measured_by == "client" else run.path / "meta.json"


def _cudagraph_mode(value, src: str) -> str:
    """A resolved cudagraph_mode ([2, 1], 0, "FULL_AND_PIECEWISE", "CUDAGraphMode.PIECEWISE") -> graph_mode."""
    key = tuple(value) if isinstance(value, list) else value
    if isinstance(key, str):
        key = key.split(".")[-1].upper()
    if key not in CUDAGRAPH_MODES:
        raise ConfigError("resolved_config.compilation_config.cudagraph_mode", value,
                          "one of vLLM's CUDAGraphMode values (NONE, PIECEWISE, FULL, FULL_DECODE_ONLY, "
                          "FULL_AND_PIECEWISE)", source=src)
    return CUDAGRAPH_MODES[key]


def engine_settings(run: ServingRun) -> dict:
    """engine_kwargs as vllm_engine settings (absent or null: the version's default); a kwarg that
    would change the simulation but is not modelled is an error, not ignored."""
    out = {}
    src = str(_meta_path(run))
    kwargs = run.engine_kwargs
    for k, v in kwargs.items():
        if k in ENGINE_KWARGS:
            out[ENGINE_KWARGS[k]] = v
        elif k == "compilation_config" and v is not None:
            if not isinstance(v, dict):
                raise ConfigError("engine_kwargs.compilation_config", v, "an object of CompilationConfig fields",
                                  source=src)
            for extra in sorted(set(v) - COMPILATION_KEYS)[:1]:
                raise ConfigError(f"engine_kwargs.compilation_config.{extra}", v[extra],
                                  f"absent: only {', '.join(sorted(COMPILATION_KEYS))} are modelled", source=src)
        elif k not in IGNORED_KWARGS and k != "data_parallel_size" and v is not None:
            raise ConfigError(f"engine_kwargs.{k}", v, f"one of the modelled settings ({', '.join(sorted(ENGINE_KWARGS))}) "
                              f"or one that does not change timing ({', '.join(sorted(IGNORED_KWARGS))})", source=src)
    dp = kwargs.get("data_parallel_size") or (run.resolved.get("parallel_config") or {}).get("data_parallel_size") or 1
    if dp != 1:
        raise ConfigError("engine_kwargs.data_parallel_size", dp, "1 (data-parallel engines are not replayed: "
                          "replay one engine's requests as its own run)", source=src)
    # what the engine resolved, where the run recorded it (meta.json resolved_config)
    sched = run.resolved.get("scheduler_config") or {}
    if out.get("async_scheduling") is None and isinstance(sched.get("async_scheduling"), bool):
        out["async_scheduling"] = sched["async_scheduling"]
    if "scheduler_reserve_full_isl" in sched and isinstance(sched["scheduler_reserve_full_isl"], bool):
        out["reserve_full_isl"] = sched["scheduler_reserve_full_isl"]
    comp = run.resolved.get("compilation_config") or {}
    if isinstance(comp.get("max_cudagraph_capture_size"), int):
        out["max_cudagraph_capture_size"] = comp["max_cudagraph_capture_size"]
    if comp.get("cudagraph_mode") is not None:
        out["cudagraph_mode"] = _cudagraph_mode(comp["cudagraph_mode"], src)
    cache = run.meta.get("kv_cache") or {}
    for key, field_ in (("block_size", "block_size"), ("gpu_memory_utilization", "gpu_memory_utilization"),
                        ("enable_prefix_caching", "prefix_caching"),
                        ("kv_cache_memory_bytes", "kv_cache_memory_bytes")):
        if out.get(field_) is None and cache.get(key) is not None:
            out[field_] = cache[key]
    return out


@dataclass
class ServingComparison:
    """Measured vs predicted, request by request (``columns``: numpy arrays in file order; ``requests``: the
    same as a DataFrame, made when first asked for) and summed up (``summary``)."""

    run: ServingRun
    model: ModelSpec
    gpu: HardwareSpec
    engine: object
    columns: dict = field(repr=False)
    summary: dict
    result: object  # the sim RunResult

    @functools.cached_property
    def requests(self) -> pd.DataFrame:
        import pandas as pd

        return pd.DataFrame(self.columns)

    def json_dict(self) -> dict:
        cols = ["request_id"] + [f"{w}_{m}_s" for m in METRICS for w in ("measured", "predicted")]
        rows = [{k: None if isinstance(v, float) and math.isnan(v) else v for k, v in r.items()}
                for r in _records(self.columns, cols)]  # a one-token output's TPOT: null, not NaN (invalid JSON)
        return {"requests": rows, "summary": self.summary}


def _stats(v: np.ndarray) -> dict:
    """Mean and percentiles of the requests that have the metric (NaN: left out, as vLLM's benchmark leaves
    one-token outputs out of TPOT; none: NaN)."""
    v = v[~np.isnan(v)]
    if v.size == 0:
        return {"mean": math.nan, "p50": math.nan, "p90": math.nan, "p99": math.nan}
    p50, p90, p99 = percentiles(v, (50, 90, 99))  # np.nanpercentile's, without its import of numpy.ma
    return {"mean": float(np.mean(v)), "p50": p50, "p90": p90, "p99": p99}


@dataclass(frozen=True)
class ReplayPlan:
    """Everything a replay needs, resolved and checked (no simulation yet)."""

    run: ServingRun
    model: ModelSpec
    gpu: HardwareSpec
    engine: object  # EngineConfig
    cost_kw: dict
    version: str
    profile: object = None


def plan_replay(run: ServingRun | str | Path, *, gpu: str | HardwareSpec | None = None,
                model: str | ModelSpec | None = None, profile=None, vllm_version: str | None = None,
                prefix_cache_warm: bool = False, recorded_kv_cache: bool = False) -> ReplayPlan:
    """Resolve the model, GPU, vLLM version and engine of ``run``; every bad input raises here.
    ``prefix_cache_warm``: the server had served these prompts before (EngineConfig.prefix_cache_warm).
    ``recorded_kv_cache``: the KV cache is the blocks the run recorded (meta.json kv_cache.num_gpu_blocks),
    as vLLM's num_gpu_blocks_override fixes it, not the memory model's: the timing model checked alone."""
    from ..sim.vllm_engine import parse_version, vllm_engine

    if not isinstance(run, ServingRun):
        run = load_serving_run(run, vllm_version)
    m, hw = resolve_model(run, model), resolve_gpu(run, gpu)
    version = vllm_version or run.vllm_version
    try:
        parse_version(version or "")
    except ConfigError:  # absent, or what a recorder writes when it could not tell ("unknown")
        if vllm_version:
            raise ConfigError("--vllm-version", vllm_version, "a vLLM version such as 0.19.0") from None
        raise ConfigError("vllm_version", version, "the run's vLLM version in meta.json (such as 0.19.0), or "
                          "--vllm-version X.Y.Z", source=str(_meta_path(run))) from None
    eng, cost_kw = vllm_engine(version, hw, m, **engine_settings(run))
    if prefix_cache_warm:
        if not eng.prefix_caching:
            raise ConfigError("--warm-prefix-cache", True, f"a run with prefix caching on (its vLLM {version} engine "
                              "has it off)", source=str(_meta_path(run)))
        eng = dataclasses.replace(eng, prefix_cache_warm=True)
    if recorded_kv_cache:
        if not is_int(run.measured_kv_blocks, 1):
            raise ConfigError("--recorded-kv-cache", True, "a run whose meta.json records kv_cache.num_gpu_blocks "
                              f"(this one: {run.measured_kv_blocks!r})", source=str(_meta_path(run)))
        eng = dataclasses.replace(eng, num_gpu_blocks_override=run.measured_kv_blocks)
    if profile is not None:  # a Profile, a path, or several (each loaded now: bad files fail before simulating)
        from ..profile import load_profiles

        profile = load_profiles(profile)
    return ReplayPlan(run, m, hw, eng, cost_kw, version, profile)


def _predicted(res, tpot_counted: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Per-request TTFT, TPOT and e2e of a simulated run (METRICS), in request-id order, as the run
    defines them (``tpot_counted``: the requests whose TPOT the run counts, the others NaN); ``preemptions``
    beside them."""
    pred = res.columns  # in id order (sim/metrics.py request_columns)
    tpot = _tpot(pred["first_token"], pred["finish"], pred["output_len"])
    if tpot_counted is not None:
        tpot = np.where(tpot_counted, tpot, np.nan)
    return {"ttft": pred["ttft"], "tpot": tpot, "e2e": pred["e2e"], "preemptions": pred["preemptions"]}


def _corner_ends(n: int, tpot_counted: np.ndarray, res) -> dict:
    """What the band needs of one corner's replay of ``n`` requests: each metric's mean, makespan, throughput."""
    p = _predicted(res, tpot_counted)
    span = float(res.summary["makespan_s"])
    return {**{f"{mtr}_mean_s": float(np.nanmean(p[mtr])) for mtr in METRICS}, "makespan_s": span,
            "throughput_rps": n / span}


def replay_serving_run(run: ServingRun | ReplayPlan | str | Path, *, trace_steps: bool = True, band: bool = True,
                       executor=None, **resolve) -> ServingComparison:
    """Replay every request of ``run`` on its engine, model and GPU (``gpu``, ``model``, ``profile``,
    ``vllm_version`` override what the run says); compare with what was measured. Everything is
    resolved, and bad input reported, before the simulation starts. ``band``: also replay on the low-
    and high-cost corners of the cost model's evidence band (sim/costs.py), giving each mean metric,
    the throughput and the makespan a band, and saying whether the measured value falls inside.
    ``executor`` (a ``concurrent.futures`` Executor): run the two corners on it, beside the replay itself
    (``offloadlab.sim.start_corners``); None: here, after it."""
    from ..sim import simulate, start_corners

    plan = run if isinstance(run, ReplayPlan) else plan_replay(run, **resolve)
    run, m, hw, eng, version = plan.run, plan.model, plan.gpu, plan.engine, plan.version
    wl = workload_of(run)
    n = len(run.columns["request_id"])
    counted = ~np.isnan(run.columns["tpot"])  # a result file's one-token outputs have no TPOT (vLLM's benchmark)
    corners = start_corners(functools.partial(_corner_ends, n, counted), m, hw, None, wl, eng, profile=plan.profile,
                            cost_kw=plan.cost_kw, executor=executor) if band else None
    res = simulate(m, hw, None, wl, eng, profile=plan.profile, cost_kw=plan.cost_kw, trace_steps=trace_steps)
    pred = _predicted(res, counted)
    meas = run.columns
    rows = {"request_id": meas["request_id"], "prompt_len": meas["prompt_len"], "output_len": meas["output_len"],
            "arrival_s": meas["arrival"], **{f"measured_{mtr}_s": meas[mtr] for mtr in METRICS},
            **{f"predicted_{mtr}_s": pred[mtr] for mtr in METRICS}, "predicted_preemptions": pred["preemptions"]}
    summary: dict = {"run": str(run.path), "model": m.name, "gpu": hw.name, "vllm_version": version,
                     "scheduler": eng.scheduler, "requests": n, "failed_requests": run.failed,
                     "measured_by": MEASURED_BY[run.measured_by]}
    for mtr in METRICS:
        for who in ("measured", "predicted"):
            for k, v in _stats(rows[f"{who}_{mtr}_s"]).items():
                summary[f"{who}_{mtr}_{k}_s"] = v
    # a benchmark client's duration when it recorded one (vLLM's benchmark: first send to last response)
    makespan_m = run.duration_s or float(meas["last_token_ts"].max() - meas["queued_ts"].min())
    makespan_p = float(res.summary["makespan_s"])
    out_tokens = int(meas["output_len"].sum())
    summary.update(measured_makespan_s=makespan_m, predicted_makespan_s=makespan_p,
                   measured_throughput_rps=n / makespan_m, predicted_throughput_rps=n / makespan_p,
                   measured_output_tok_s=out_tokens / makespan_m, predicted_output_tok_s=out_tokens / makespan_p,
                   measured_kv_blocks=run.measured_kv_blocks, predicted_kv_blocks=res.memory.kv_blocks,
                   predicted_preemptions=int(res.summary["preemptions"]),
                   predicted_prefix_cached_tokens=int(res.summary.get("prefix_cached_tokens", 0)))
    for key in [k for k in summary if k.startswith("measured_") and isinstance(summary[k], float)]:
        name = key[len("measured_"):]
        p = summary.get(f"predicted_{name}")
        if isinstance(p, float) and summary[key]:
            summary[f"error_{name}"] = p / summary[key] - 1
    if corners:
        ends = corners()
        for name in ("ttft_mean_s", "tpot_mean_s", "e2e_mean_s", "throughput_rps", "makespan_s"):
            lo, hi = sorted((ends[0][name], ends[1][name]))
            summary[f"band_lo_{name}"], summary[f"band_hi_{name}"] = lo, hi
            summary[f"inside_band_{name}"] = bool(lo <= summary[f"measured_{name}"] <= hi)
    return ServingComparison(run, m, hw, eng, rows, summary, res)


def format_comparison(c: ServingComparison) -> str:
    """The printed table: measured vs predicted, with the relative error."""
    s = c.summary
    e = c.engine
    lines = [f"{c.run.path}: {c.model.name} on {c.gpu.name} ({c.gpu.memory_bytes / 1e9:.2f} GB), vLLM {s['vllm_version']} "
             f"({e.scheduler.upper()} engine: max_num_seqs {e.max_num_seqs}, max_num_batched_tokens "
             f"{e.max_num_batched_tokens}, chunked prefill {'on' if e.chunked_prefill else 'off'}, prefix caching "
             f"{'on' if e.prefix_caching else 'off'}, async scheduling {'on' if e.async_scheduling else 'off'}); "
             f"{s['requests']} requests replayed"
             + (f"; tensor parallel {e.tensor_parallel}, pipeline parallel {e.pipeline_parallel} in a node of "
                f"{c.gpu.gpus_per_node}" if e.tensor_parallel * e.pipeline_parallel > 1 else ""),
             f"measured {s['measured_by']}", *c.run.notes, "",
             f"{'metric':16s} {'measured':>11s} {'predicted':>11s} {'error':>8s}"
             + ("  band (every cost at the low / high end of its evidence)" if "band_lo_ttft_mean_s" in s else "")]

    def band(name: str, scale: float = 1.0, fmt: str = ".3f") -> str:
        if f"band_lo_{name}" not in s:
            return ""
        inside = "measured inside" if s[f"inside_band_{name}"] else "measured OUTSIDE"
        return f"  {s[f'band_lo_{name}'] * scale:{fmt}}-{s[f'band_hi_{name}'] * scale:{fmt}} ({inside})"

    for mtr, unit, scale in (("ttft", "s", 1), ("tpot", "ms", 1e3), ("e2e", "s", 1)):
        for st in STATS:
            k = f"{mtr}_{st}_s"
            lines.append(f"{mtr.upper() + ' ' + st + ' ' + unit:16s} {s['measured_' + k] * scale:11.3f} "
                         f"{s['predicted_' + k] * scale:11.3f} {s['error_' + k]:+8.1%}" + band(k, scale))
    lines.append(f"{'throughput req/s':16s} {s['measured_throughput_rps']:11.3f} {s['predicted_throughput_rps']:11.3f} "
                 f"{s['error_throughput_rps']:+8.1%}" + band("throughput_rps"))
    lines.append(f"{'output tok/s':16s} {s['measured_output_tok_s']:11.1f} {s['predicted_output_tok_s']:11.1f} "
                 f"{s['error_output_tok_s']:+8.1%}")
    lines.append(f"{'makespan s':16s} {s['measured_makespan_s']:11.1f} {s['predicted_makespan_s']:11.1f} "
                 f"{s['error_makespan_s']:+8.1%}" + band("makespan_s", fmt=".1f"))
    mb = s["measured_kv_blocks"]
    kv_err = f"{s['predicted_kv_blocks'] / mb - 1:+8.1%}" if mb else ""
    given = e.num_gpu_blocks_override
    kv_err = f"{kv_err}  (given: num_gpu_blocks_override={given})" if given is not None else kv_err
    lines.append(f"{'KV blocks':16s} {mb if mb is not None else 'n/a':>11} {s['predicted_kv_blocks']:11d} {kv_err}")
    lines.append(f"{'preemptions':16s} {'n/a':>11s} {s['predicted_preemptions']:11d}")
    return "\n".join(lines)
