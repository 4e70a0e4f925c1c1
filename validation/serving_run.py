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
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..catalog import get_gpu, gpu_for_device, model_for_hf_id  # model_for_hf_id: this module's name for it too
from ..errors import ConfigError, UnknownNameError
from ..fileio import read_json_object
from ..metrics import percentiles
from ..serving_files import check_run_dir, read_requests, read_timeseries
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
                 "kv_cache_memory_bytes": "kv_cache_memory_bytes"}
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
STATS = ("mean", "p50", "p90", "p99")


def is_serving_run(path: str | Path) -> bool:
    """A serving run is a directory; a probe is a file."""
    return Path(path).is_dir()


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


def load_serving_run(path: str | Path) -> ServingRun:
    """Read and check a run directory (offloadlab/serving_files.py: every field of every request, and
    timeseries.csv); every problem is one ConfigError naming the file, line and field."""
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
    return workload_from_columns(run.path.name, c["prompt_len"], c["output_len"], c["arrival"])


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
                          source=str(run.path / "meta.json"))
    return model_for_hf_id(hf_id)


def resolve_gpu(run: ServingRun, gpu: str | HardwareSpec | None = None) -> HardwareSpec:
    """--gpu, else meta.json's hardware.device_name; the device's memory as measured when recorded
    (vLLM sizes the KV cache from torch's total, which the datasheet's "24 GB" is not exactly)."""
    if gpu is not None:
        return get_gpu(gpu)
    name = run.device_name
    if not name:
        raise ConfigError("hardware.device_name", None, "the GPU's name in meta.json, or give one with --gpu NAME "
                          "(see `offloadlab list`; add yours with --catalog FILE)", source=str(run.path / "meta.json"))
    try:
        hw = gpu_for_device(name)
    except UnknownNameError as e:
        raise ConfigError("hardware.device_name", name, "a GPU in the catalog: give one with --gpu NAME (see "
                          "`offloadlab list`) or add it with --catalog FILE", source=str(run.path / "meta.json")) from None
    mem = run.device_memory_bytes
    if isinstance(mem, (int, float)) and mem > 0:
        hw = hw.replace(memory_bytes=float(mem))
    return hw


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
    src = str(run.path / "meta.json")
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
        return {"requests": _records(self.columns, cols), "summary": self.summary}


def _stats(v: np.ndarray) -> dict:
    p50, p90, p99 = percentiles(v, (50, 90, 99))  # np.percentile's, without its import of numpy.ma
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
                model: str | ModelSpec | None = None, profile=None, vllm_version: str | None = None) -> ReplayPlan:
    """Resolve the model, GPU, vLLM version and engine of ``run``; every bad input raises here."""
    from ..sim.vllm_engine import parse_version, vllm_engine

    if not isinstance(run, ServingRun):
        run = load_serving_run(run)
    m, hw = resolve_model(run, model), resolve_gpu(run, gpu)
    version = vllm_version or run.vllm_version
    try:
        parse_version(version or "")
    except ConfigError:  # absent, or what a recorder writes when it could not tell ("unknown")
        if vllm_version:
            raise ConfigError("--vllm-version", vllm_version, "a vLLM version such as 0.19.0") from None
        raise ConfigError("vllm_version", version, "the run's vLLM version in meta.json (such as 0.19.0), or "
                          "--vllm-version X.Y.Z", source=str(run.path / "meta.json")) from None
    eng, cost_kw = vllm_engine(version, hw, m, **engine_settings(run))
    if profile is not None:  # a Profile, a path, or several (each loaded now: bad files fail before simulating)
        from ..profile import load_profiles

        profile = load_profiles(profile)
    return ReplayPlan(run, m, hw, eng, cost_kw, version, profile)


def _predicted(res) -> dict[str, np.ndarray]:
    """Per-request TTFT, TPOT and e2e of a simulated run (METRICS), in request-id order, as the run
    defines them; ``preemptions`` beside them."""
    pred = res.columns  # in id order (sim/metrics.py request_columns)
    return {"ttft": pred["ttft"], "tpot": _tpot(pred["first_token"], pred["finish"], pred["output_len"]),
            "e2e": pred["e2e"], "preemptions": pred["preemptions"]}


def _corner_ends(n: int, res) -> dict:
    """What the band needs of one corner's replay of ``n`` requests: each metric's mean, makespan, throughput."""
    p = _predicted(res)
    span = float(res.summary["makespan_s"])
    return {**{f"{mtr}_mean_s": float(np.mean(p[mtr])) for mtr in METRICS}, "makespan_s": span,
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
    corners = start_corners(functools.partial(_corner_ends, n), m, hw, None, wl, eng, profile=plan.profile,
                            cost_kw=plan.cost_kw, executor=executor) if band else None
    res = simulate(m, hw, None, wl, eng, profile=plan.profile, cost_kw=plan.cost_kw, trace_steps=trace_steps)
    pred = _predicted(res)
    meas = run.columns
    rows = {"request_id": meas["request_id"], "prompt_len": meas["prompt_len"], "output_len": meas["output_len"],
            "arrival_s": meas["arrival"], **{f"measured_{mtr}_s": meas[mtr] for mtr in METRICS},
            **{f"predicted_{mtr}_s": pred[mtr] for mtr in METRICS}, "predicted_preemptions": pred["preemptions"]}
    summary: dict = {"run": str(run.path), "model": m.name, "gpu": hw.name, "vllm_version": version,
                     "scheduler": eng.scheduler, "requests": n}
    for mtr in METRICS:
        for who in ("measured", "predicted"):
            for k, v in _stats(rows[f"{who}_{mtr}_s"]).items():
                summary[f"{who}_{mtr}_{k}_s"] = v
    makespan_m = float(meas["last_token_ts"].max() - meas["queued_ts"].min())
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
             f"{s['requests']} requests replayed", "",
             f"{'metric':16s} {'measured':>11s} {'predicted':>11s} {'error':>8s}  band (every cost at the low / "
             "high end of its evidence)"]

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
    lines.append(f"{'KV blocks':16s} {mb if mb is not None else 'n/a':>11} {s['predicted_kv_blocks']:11d} {kv_err}")
    lines.append(f"{'preemptions':16s} {'n/a':>11s} {s['predicted_preemptions']:11d}")
    return "\n".join(lines)
