"""Design-space sweeps: many simulated configurations in parallel, one tidy row each, cached on disk.

    from offloadlab.apps.sweep import grid, sweep
    from offloadlab.sim import longbench_multi_news

    configs = grid(model="llama-3.1-8b", gpu=["a100-40gb", "h100"], k=[2, 4, 8], slots=[1, 2],
                   host_link_GBps=[16, 32, 64], gpu_memory_utilization=0.8)
    df = sweep(configs, longbench_multi_news(200), cache_dir="results/cache/my_sweep")

- ``SimConfig``: one simulation's inputs (model, GPU, policy, engine limits, an optional host-link
  bandwidth override and an optional calibration profile). ``.key(workload)`` is a stable sha256
  of every input (the resolved model and GPU specs, not just their names) and of the workload.
- ``grid(**axes)``: the cartesian product of axis values, last axis varying fastest.
- ``sweep(configs, workload, executor=None, cache_dir=None)``: a DataFrame with one row per config,
  in input order: the input columns (``INPUT_COLUMNS``), every output column of
  ``RunResult.row()`` except its wall-clock time, ``error`` (None, or the message of the
  exception the config raised, e.g. a DoesNotFitError: the sweep itself never fails on one) and
  ``error_kind`` (None, or one of ``ERROR_KINDS``, set where the exception is caught).

Parallel through any ``concurrent.futures.Executor``: a process pool by default, ``"serial"`` to
run inline, an int for a pool of that many processes, or e.g. ``distributed.Client(...).get_executor()``
for a Dask cluster. Configurations go to workers in chunks (a task is a list of configs), so a
thousand short simulations are not dominated by inter-process traffic. Model, GPU and profile are
resolved in the calling process, so user catalog entries and profile files need not exist on the
workers.

With ``cache_dir``, each finished configuration is written at once to ``cache_dir/<key>.json``
(atomically), so an interrupted sweep resumes where it stopped. A cache entry also records a
fingerprint of every project module a row imports (``CODE_FINGERPRINT``): after any of them changes, old
entries are recomputed rather than reused. Errors are cached only when they come from the project's
own checks (``OffloadLabError``: does not fit, bad value); anything else is retried next time.

Deterministic: the same configs and workload give the same DataFrame, byte for byte, whether the
rows were simulated serially, in a pool, on Dask, or read from the cache.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import itertools
import json
import math
import os
import typing
import warnings
from concurrent.futures import Executor, as_completed
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Iterable, Mapping

import pandas as pd

from ..catalog import get_gpu, get_model
from ..checks import check_bool, check_int, check_positive
from ..errors import ConfigError, DoesNotFitError, OffloadLabError
from ..fileio import atomic_write_json
from ..policy import NoOffload, Policy, Prefetch, interval, parse_policy
from ..profile import Profile
from .pool import owned, usable_cores
from ..sim import EngineConfig, Workload, simulate, simulate_band
from ..specs import HardwareSpec, ModelSpec

__all__ = ["BAD_CONFIG", "CODE_FINGERPRINT", "DOES_NOT_FIT", "ERROR_KINDS", "EXECUTOR", "FAILED", "INPUT_COLUMNS",
           "SimConfig", "grid", "pareto_front", "sweep",
           "workload_fingerprint"]

ENGINE_FIELDS = tuple(f.name for f in dataclasses.fields(EngineConfig))
INPUT_COLUMNS = ("model", "gpu", "policy", "policy_kind", "k", "per_group", "slots", "cpu_offload_gb",
                 "host_link_GBps", *ENGINE_FIELDS, "profile", "workload", "key")
# Outputs of RunResult.row() that are not deterministic (wall-clock time): left out of sweep rows.
_DROPPED_OUTPUTS = ("wall_s",)
_INT_COLUMNS = ("k", "per_group", "slots")


# ------------------------------------------------------------------------------------------------
# Canonical JSON, fingerprints
# ------------------------------------------------------------------------------------------------
def _canon(v: Any) -> Any:
    """JSON-ready and canonical: 1 and 1.0 are the same number, tuples are lists, keys sorted later."""
    if isinstance(v, bool) or v is None or isinstance(v, str):
        return v
    if isinstance(v, int):
        return int(v)
    if isinstance(v, float) or hasattr(v, "__float__") and not isinstance(v, (list, tuple, dict)):
        f = float(v)
        if math.isfinite(f) and f.is_integer():
            return int(f)
        return f if math.isfinite(f) else repr(f)
    if isinstance(v, Mapping):
        return {str(k): _canon(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_canon(x) for x in v]
    if dataclasses.is_dataclass(v):
        return _spec_dict(v)
    raise TypeError(f"cannot fingerprint {type(v).__name__} {v!r}")


def _spec_dict(obj) -> dict:
    """A dataclass's compared fields (free-text notes and provenance left out), canonical."""
    return {f.name: _canon(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.compare}


def _sha256(obj: Any) -> str:
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()


def workload_fingerprint(workload: Workload) -> str:
    """sha256 of a workload's name, every request's (id, prompt, output, exact arrival) and its client limit."""
    h = hashlib.sha256(workload.name.encode())
    for r in workload.requests:
        h.update(f"|{r.id},{r.prompt_len},{r.output_len},{float(r.arrival).hex()}".encode())
    if workload.max_concurrency is not None:  # the client's limit changes every result (absent: keys as before)
        h.update(f"|max_concurrency={workload.max_concurrency}".encode())
    return h.hexdigest()


def _imported_modules(root: str) -> list[str]:
    """The project's modules ``root`` imports, directly or through others (any import statement in the
    source, function-level ones included), found by reading the sources, so the set does not depend
    on which entry point imported what first."""
    import ast
    import importlib.util

    seen, todo = set(), [root]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        try:
            spec = importlib.util.find_spec(name)
        except ModuleNotFoundError:  # ``from .module import Name``: a name, not a submodule
            spec = None
        if spec is None or not spec.origin or not spec.origin.endswith(".py"):
            continue
        seen.add(name)
        package = name if spec.submodule_search_locations else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(Path(spec.origin).read_bytes())):
            if isinstance(node, ast.ImportFrom):
                base = importlib.util.resolve_name("." * node.level + (node.module or ""), package) \
                    if node.level else (node.module or "")
                todo += [base] + [f"{base}.{a.name}" for a in node.names]  # a name may be a submodule
            elif isinstance(node, ast.Import):
                todo += [a.name for a in node.names]
        todo = [t for t in todo if t == "offloadlab" or t.startswith("offloadlab.")]
        todo += [name.rpartition(".")[0]] if "." in name else []  # a module runs its package's __init__
    return sorted(seen)


def _code_fingerprint() -> str:
    """sha256 of the code a simulated row depends on: every project module this one imports (read from
    the sources: offloadlab.metrics, the vocabulary, the catalog, sim/, ...) and the catalog's data files."""
    import importlib.util

    files = [Path(importlib.util.find_spec(m).origin) for m in _imported_modules(__name__)]
    files += sorted(Path(p) for p in resources.files("offloadlab.catalog").iterdir()
                    if p.is_file() and p.name.endswith((".csv", ".yaml")))
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:16]


CODE_FINGERPRINT = _code_fingerprint()


# ------------------------------------------------------------------------------------------------
# One configuration
# ------------------------------------------------------------------------------------------------
_PROFILES: dict[tuple, Profile] = {}


def _load_profile(path: str) -> Profile:
    """Profile.load, memoized per (path, size, mtime) so a sweep loads each file once."""
    p = Path(path)
    if not p.is_file() and not p.is_dir():
        raise ConfigError("profile", str(path), "an existing Profile or probe file, or a directory of Vidur CSVs")
    st = p.stat()
    k = (str(p.resolve()), st.st_size, st.st_mtime_ns)
    if k not in _PROFILES:
        _PROFILES[k] = Profile.load(p)
    return _PROFILES[k]


@dataclass(frozen=True)
class SimConfig:
    """The inputs of one simulated serving run.

    ``model``/``gpu``: catalog names (or specs); ``policy``: a Policy or its CLI form
    (``"interval:2,4"``); ``engine``: an EngineConfig or a dict of its fields; ``host_link_bw``:
    overrides the GPU's host-link spec bandwidth (bytes/s per direction; the sustained H2D rate is
    this times the GPU's ``h2d_efficiency``); ``profile``: a Profile or a path to a Profile/probe
    file (calibrated costs instead of the datasheet roofline), or several (a tuple); ``band``: also run
    the cost model's low- and high-cost corners, adding ``{metric}_lo`` / ``{metric}_hi`` columns for
    throughput, TTFT, TPOT and makespan (three simulations per row). ``SimConfig.build`` and ``replace``
    also take EngineConfig fields, ``host_link_GBps`` and ``k``/``slots`` (interval policy) directly.
    """

    model: str | ModelSpec = "llama-3.1-8b"
    gpu: str | HardwareSpec = "A100-SXM4-40GB"
    policy: Any = NoOffload()
    engine: EngineConfig = EngineConfig()
    host_link_bw: float | None = None
    profile: str | Profile | None = None
    band: bool = False  # also run the cost model's low/high corners: {metric}_lo / _hi columns

    def __post_init__(self):
        pol = self.policy
        if pol is None:
            pol = NoOffload()
        elif isinstance(pol, str):
            pol = parse_policy(pol)
        kinds = typing.get_args(Policy)
        if not isinstance(pol, kinds):
            raise ConfigError("policy", pol, f"a Policy ({', '.join(k.__name__ for k in kinds)}) or its CLI form")
        object.__setattr__(self, "policy", pol)
        eng = self.engine
        if isinstance(eng, Mapping):
            unknown = sorted(set(eng) - set(ENGINE_FIELDS))
            if unknown:
                raise ConfigError("engine", unknown[0], f"an EngineConfig field: {', '.join(ENGINE_FIELDS)}")
            eng = EngineConfig(**eng)
        if not isinstance(eng, EngineConfig):
            raise ConfigError("engine", eng, "an EngineConfig or a dict of its fields")
        object.__setattr__(self, "engine", eng)
        bw = self.host_link_bw
        if bw is not None:
            check_positive("host_link_bw", bw, "a positive number of bytes/s, or None for the GPU's spec")
            object.__setattr__(self, "host_link_bw", float(bw))
        prof = self.profile
        if isinstance(prof, os.PathLike):
            object.__setattr__(self, "profile", os.fspath(prof))
        elif isinstance(prof, (list, tuple)):  # several sources (costs.Calibrated picks per component)
            prof = tuple(os.fspath(x) if isinstance(x, os.PathLike) else x for x in prof)
            if not prof or not all(isinstance(x, (str, Profile)) for x in prof):
                raise ConfigError("profile", self.profile, "Profiles or paths to Profile/probe files")
            object.__setattr__(self, "profile", prof if len(prof) > 1 else prof[0])
        elif prof is not None and not isinstance(prof, (str, Profile)):
            raise ConfigError("profile", prof, "a Profile, a path to a Profile/probe file, or None")
        check_bool("band", self.band)
        # unknown names and unreadable profiles fail here, at construction, naming what is wrong
        self.model_spec, self.hardware, self.profile_obj()  # noqa: B018

    # ---- construction --------------------------------------------------------------------------
    @classmethod
    def build(cls, **fields) -> "SimConfig":
        """Like the constructor, also taking EngineConfig fields, ``host_link_GBps`` and ``k``/``slots``."""
        return cls()._with(fields)

    def replace(self, **changes) -> "SimConfig":
        """A copy with ``changes`` (same keywords as ``build``)."""
        return self._with(changes)

    def _with(self, changes: Mapping[str, Any]) -> "SimConfig":
        own = {f.name for f in dataclasses.fields(self)}
        extra = {"host_link_GBps", "k", "slots"}
        for name in changes:
            if name not in own and name not in ENGINE_FIELDS and name not in extra:
                raise ConfigError("config field", name, "one of " + ", ".join([*own, *sorted(extra), *ENGINE_FIELDS]))
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        fields.update({n: v for n, v in changes.items() if n in own})
        if "host_link_GBps" in changes:
            if "host_link_bw" in changes:
                raise ConfigError("host_link_GBps", changes["host_link_GBps"], "not given together with host_link_bw")
            gbps = changes["host_link_GBps"]
            if gbps is not None and (isinstance(gbps, bool) or not isinstance(gbps, (int, float))):
                raise ConfigError("host_link_GBps", gbps, "a positive number of GB/s, or None for the GPU's spec")
            fields["host_link_bw"] = None if gbps is None else gbps * 1e9
        if "k" in changes or "slots" in changes:
            if "policy" in changes:
                raise ConfigError("k", changes.get("k"), "not given together with policy (k/slots make interval(k, slots))")
            if "k" not in changes:
                raise ConfigError("slots", changes["slots"], "given together with k (interval k with that many staging slots)")
            fields["policy"] = interval(changes["k"], changes.get("slots", 2))
        eng = {n: v for n, v in changes.items() if n in ENGINE_FIELDS}
        if eng:
            base = fields["engine"]
            base = base if isinstance(base, EngineConfig) else EngineConfig(**base)
            fields["engine"] = dataclasses.replace(base, **eng)
        return SimConfig(**fields)

    # ---- resolved inputs (each looked up once: the fields never change) ------------------------
    @functools.cached_property
    def model_spec(self) -> ModelSpec:
        """The model, with the engine's KV-cache dtype applied (as the simulator lays it out)."""
        return get_model(self.model).with_kv_cache_dtype(self.engine.kv_cache_dtype)

    @functools.cached_property
    def hardware(self) -> HardwareSpec:
        """The GPU spec, with the host-link override applied."""
        hw = get_gpu(self.gpu)
        return hw if self.host_link_bw is None else hw.replace(host_link_bw=self.host_link_bw)

    def profile_obj(self) -> Profile | tuple[Profile, ...] | None:
        if isinstance(self.profile, tuple):
            return tuple(x if isinstance(x, Profile) else _load_profile(x) for x in self.profile)
        if self.profile is None or isinstance(self.profile, Profile):
            return self.profile
        return _load_profile(self.profile)

    @property
    def label(self) -> str:
        """A short human-readable name: model | GPU | policy | host link | memory use | mode."""
        hw, e = self.hardware, self.engine
        parts = [self.model_spec.name, hw.name, self.policy.label, f"link {hw.host_link_bw / 1e9:g} GB/s",
                 f"util {e.gpu_memory_utilization:g}", e.mode]
        if e.chunked_prefill:
            parts.append("chunked")
        if self.profile is not None:
            profs = self.profile if isinstance(self.profile, tuple) else (self.profile,)
            parts.append("profile " + " + ".join(Path(x).name if isinstance(x, str) else "(object)" for x in profs))
        return " | ".join(parts)

    def canonical(self) -> dict:
        """Every input, resolved: full model and GPU specs, policy fields, engine fields, profile contents."""
        prof = self.profile_obj()
        return {
            "model": _spec_dict(self.model_spec),
            "gpu": _spec_dict(self.hardware),
            "policy": {"kind": self.policy.kind, **_spec_dict(self.policy)},
            "engine": _spec_dict(self.engine),
            "profile": None if prof is None else _canon(prof),
            **({"band": True} if self.band else {}),  # absent when off: the keys of earlier caches hold
        }

    def key(self, workload: Workload | str | None = None) -> str:
        """sha256 (hex) of the canonical inputs and of the workload's fingerprint (or a given fingerprint)."""
        wfp = workload_fingerprint(workload) if isinstance(workload, Workload) else workload
        return _sha256({"config": self.canonical(), "workload": wfp})

    def inputs(self) -> dict:
        """The input columns of this config's sweep row (without ``workload`` and ``key``)."""
        p, hw = self.policy, self.hardware
        prefetch = isinstance(p, Prefetch)
        row = {"model": self.model_spec.name, "gpu": hw.name, "policy": p.label, "policy_kind": p.kind,
               "k": p.group if prefetch else None, "per_group": p.per_group if prefetch else None,
               "slots": p.slots if prefetch else None,
               "cpu_offload_gb": float(p.cpu_offload_gb) if hasattr(p, "cpu_offload_gb") else None,
               "host_link_GBps": hw.host_link_bw / 1e9}
        row.update({f: getattr(self.engine, f) for f in ENGINE_FIELDS})
        profs = () if self.profile is None else self.profile if isinstance(self.profile, tuple) else (self.profile,)
        row["profile"] = None if not profs else " + ".join(x if isinstance(x, str) else "(Profile object)" for x in profs)
        return row

    def job(self) -> tuple:
        """What a worker needs: resolved specs (user catalog entries need not exist on the worker)."""
        return (self.model_spec, self.hardware, self.policy, self.engine, self.profile_obj(), self.band)


def grid(**axes) -> list[SimConfig]:
    """Every combination of the axis values, as SimConfigs (the last axis varies fastest).

    Axes are SimConfig fields (``model``, ``gpu``, ``policy``, ``engine``, ``host_link_bw``,
    ``profile``), EngineConfig fields (``gpu_memory_utilization``, ``mode``, ``max_num_seqs``, ...),
    ``host_link_GBps`` (GB/s; None = the GPU's spec) and ``k``/``slots`` (interval(k, slots)
    policies; not together with ``policy``). A value that is a string or not a list/tuple/range is one
    fixed value. ``len(grid(a=[1, 2], b=[3, 4, 5])) == 6``.
    """
    names = list(axes)
    values = []
    for n in names:
        v = axes[n]
        if isinstance(v, (list, tuple, range)) or (hasattr(v, "__iter__") and not isinstance(v, (str, bytes, Mapping))
                                                   and not dataclasses.is_dataclass(v)):
            v = list(v)
        else:
            v = [v]
        values.append(v)
    base = SimConfig()
    return [base._with(dict(zip(names, combo))) for combo in itertools.product(*values)]


# ------------------------------------------------------------------------------------------------
# Running
# ------------------------------------------------------------------------------------------------
# A row's failure, typed where the exception is caught (the ``error_kind`` column; ``error`` keeps the message)
DOES_NOT_FIT = "does_not_fit"  # a DoesNotFitError: the configuration does not fit in GPU or host memory
BAD_CONFIG = "bad_config"  # another of the project's own checks (OffloadLabError: a bad value, ...)
FAILED = "failed"  # any other exception in the simulator (not cached: the next run retries it)
EXECUTOR = "executor"  # the task failed in the executor, not in the simulator (a dead worker, pickling)
ERROR_KINDS = (DOES_NOT_FIT, BAD_CONFIG, FAILED, EXECUTOR)


@dataclass(frozen=True)
class _Outcome:
    """One configuration's result: outputs, or the error's message and kind."""

    outputs: dict | None = None
    error: str | None = None
    kind: str | None = None

    @property
    def cacheable(self) -> bool:
        """Results and the project's own errors are; anything else is retried next time."""
        return self.kind in (None, DOES_NOT_FIT, BAD_CONFIG)


def _error_kind(e: BaseException) -> str:
    return DOES_NOT_FIT if isinstance(e, DoesNotFitError) else BAD_CONFIG if isinstance(e, OffloadLabError) else FAILED


def _run_one(job: tuple, workload: Workload) -> _Outcome:
    """One job's outcome; never raises for a config's own failure."""
    model, hw, policy, engine, profile, band = job
    try:
        row = simulate(model, hw, policy, workload, engine, profile=profile, trace_steps=False).row()
        if band:  # the two corners of the cost model's band (see sim.simulate_band)
            for k, (lo, hi) in simulate_band(model, hw, policy, workload, engine, profile=profile).items():
                row[f"{k}_lo"], row[f"{k}_hi"] = lo, hi
    except Exception as e:  # noqa: BLE001 - reported in the config's row
        return _Outcome(error=f"{type(e).__name__}: {e}", kind=_error_kind(e))
    return _Outcome(outputs={k: _plain(v) for k, v in row.items() if k not in _DROPPED_OUTPUTS})


def _run_chunk(jobs: list[tuple], workload: Workload) -> list[_Outcome]:
    """A worker task: several configurations, one round trip."""
    return [_run_one(j, workload) for j in jobs]


def _plain(v: Any) -> Any:
    return v.item() if hasattr(v, "item") and not isinstance(v, (str, bytes)) else v


# ---- the cache: one JSON file per configuration ------------------------------------------------
class _Cache:
    """``dir/<key>.json`` per finished configuration, valid while the code fingerprint is the same."""

    def __init__(self, directory: str | os.PathLike | None):
        self.dir = Path(directory) if directory is not None else None

    def read(self, key: str) -> _Outcome | None:
        if self.dir is None:
            return None
        try:
            entry = json.loads((self.dir / f"{key}.json").read_text())
        except (OSError, ValueError, RecursionError):  # unreadable, half a file, or not ours: a miss
            return None
        if not isinstance(entry, dict) or entry.get("key") != key or entry.get("code") != CODE_FINGERPRINT:
            return None
        return _Outcome(entry.get("outputs"), entry.get("error"), entry.get("error_kind"))

    def write(self, key: str, label: str, out: _Outcome) -> None:
        if self.dir is not None and out.cacheable:
            atomic_write_json(self.dir / f"{key}.json", {"key": key, "code": CODE_FINGERPRINT, "config": label,
                                                         "outputs": out.outputs, "error": out.error,
                                                         "error_kind": out.kind})


# ---- executors ---------------------------------------------------------------------------------
def _chunks(items: list, size: int) -> list[list]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def _run_serial(todo: list[str], jobs: dict, workload: Workload, chunksize: int | None, finish) -> None:
    for chunk in _chunks(todo, chunksize or 1):
        finish(chunk, _run_chunk([jobs[k] for k in chunk], workload))


def _run_parallel(executor: Executor, workers: int, todo: list[str], jobs: dict, workload: Workload,
                  chunksize: int | None, finish) -> None:
    """Submit the jobs in chunks (about four tasks per worker, at most 16 configs each) and ``finish``
    each chunk as it completes; a task the executor loses fills its rows with an EXECUTOR error."""
    size = chunksize or max(1, min(16, math.ceil(len(todo) / (4 * workers))))
    futures, failed = {}, []
    for chunk in _chunks(todo, size):
        futures[executor.submit(_run_chunk, [jobs[k] for k in chunk], workload)] = chunk
    try:
        for fut in as_completed(futures):
            chunk = futures[fut]
            try:
                outs = fut.result()
            except Exception as e:  # noqa: BLE001 - a dead worker or an unpicklable task
                outs = [_Outcome(error=f"{type(e).__name__}: {e}", kind=EXECUTOR)] * len(chunk)
                failed.append(f"{type(e).__name__}: {e}")
            finish(chunk, outs)
    finally:
        for fut in futures:
            fut.cancel()
    if failed:
        warnings.warn(f"{len(failed)} of {len(futures)} tasks failed in the executor, not in the simulator "
                      f"(first: {failed[0]}); their rows hold the error, and they are not cached, so the "
                      "next run retries them", RuntimeWarning, stacklevel=3)


def _execute(executor, todo: list[str], jobs: dict, workload: Workload, chunksize: int | None, finish) -> None:
    """Run ``jobs[k]`` for every k of ``todo`` on ``executor`` (see ``sweep``), calling ``finish``."""
    if executor == "serial" or len(todo) <= 1:
        return _run_serial(todo, jobs, workload, chunksize, finish)
    if executor is not None and not isinstance(executor, int):  # the caller's, left running
        # concurrent.futures has no public worker count: chunk for this machine's cores (``chunksize`` overrides)
        return _run_parallel(executor, usable_cores(), todo, jobs, workload, chunksize, finish)
    workers = executor or usable_cores()
    with owned(workers, preload=("offloadlab.apps.sweep",)) as pool:  # killed on Ctrl-C, SIGTERM or an error
        _run_parallel(pool, workers, todo, jobs, workload, chunksize, finish)


def _progress_bar(**kw):
    """tqdm's bar without its monitor thread (tqdm: "set monitor_interval to 0 to disable the thread"):
    a sweep's bar must not make the process multi-threaded before its pool forks (``pool.process_pool``)."""
    from tqdm import tqdm

    class NoMonitor(tqdm):
        monitor_interval = 0

    return NoMonitor(**kw)


# ---- the sweep ---------------------------------------------------------------------------------
def _check_sweep_args(configs, workload, executor, chunksize) -> list[SimConfig]:
    if isinstance(configs, SimConfig):
        configs = [configs]
    configs = list(configs)
    for i, c in enumerate(configs):
        if not isinstance(c, SimConfig):
            raise ConfigError(f"configs[{i}]", c, "a SimConfig (see grid())")
    if not isinstance(workload, Workload):
        raise ConfigError("workload", workload, "a Workload (e.g. offloadlab.sim.longbench_multi_news(200))")
    if chunksize is not None:
        check_int("chunksize", chunksize, 1, expected="an integer >= 1 or None")
    if isinstance(executor, str) and executor != "serial":
        raise ConfigError("executor", executor, "None, 'serial', a number of processes or a concurrent.futures.Executor")
    if isinstance(executor, bool) or (isinstance(executor, int) and executor < 1):
        raise ConfigError("executor", executor, "a number of processes >= 1")
    return configs


def sweep(configs: Iterable[SimConfig] | SimConfig, workload: Workload, executor: Executor | str | int | None = None,
          cache_dir: str | os.PathLike | None = None, progress: bool = True, chunksize: int | None = None
          ) -> pd.DataFrame:
    """Simulate every config on ``workload``; one row per config, in input order.

    ``executor``: None (a process pool with one worker per usable core, created and shut down here),
    ``"serial"`` (inline), an int (a process pool of that many workers) or any
    concurrent.futures.Executor (left running; e.g. ``distributed.Client(...).get_executor()``).
    ``cache_dir``: one JSON file per finished config, read back on the next call.
    ``chunksize``: configs per task (default: about four tasks per worker, at most 16 configs each;
    for an executor given here, this machine's cores stand for its workers).
    Duplicate configs are simulated once. A failed row holds ``error`` (the message) and
    ``error_kind`` (``ERROR_KINDS``: does_not_fit, bad_config, failed, executor).
    """
    configs = _check_sweep_args(configs, workload, executor, chunksize)
    wfp = workload_fingerprint(workload)
    keys = [c.key(wfp) for c in configs]
    first: dict[str, int] = {}
    for i, k in enumerate(keys):
        first.setdefault(k, i)
    cache = _Cache(cache_dir)
    results: dict[str, _Outcome] = {k: hit for k in first if (hit := cache.read(k)) is not None}
    todo = [k for k in first if k not in results]

    bar = _progress_bar(total=len(first), initial=len(first) - len(todo), disable=not progress, desc="sweep", unit="config")
    if len(first) - len(todo):
        bar.set_postfix(cached=len(first) - len(todo))

    def finish(chunk_keys: list[str], outs: list[_Outcome]) -> None:
        for k, out in zip(chunk_keys, outs):
            results[k] = out
            cache.write(k, configs[first[k]].label, out)
        bar.update(len(chunk_keys))

    try:
        _execute(executor, todo, {k: configs[first[k]].job() for k in todo}, workload, chunksize, finish)
    finally:
        bar.close()
    return _frame([_row(c, k, workload.name, results[k]) for c, k in zip(configs, keys)])


def _row(config: SimConfig, key: str, workload: str, out: _Outcome) -> dict:
    row = {**config.inputs(), "workload": workload, "key": key}
    if out.outputs:
        row.update({n: v for n, v in out.outputs.items() if n not in row})
    row["error"], row["error_kind"] = out.error, out.kind
    return row


def _frame(rows: list[dict]) -> pd.DataFrame:
    """Columns in a fixed order: inputs, outputs (as the first successful row has them), error."""
    cols = list(INPUT_COLUMNS)
    tail = ("error", "error_kind")
    for r in rows:
        if r["error"] is None:
            cols += [c for c in r if c not in cols and c not in tail]
            break
    for r in rows:  # outputs only some rows have (none today; kept in a stable order)
        cols += [c for c in r if c not in cols and c not in tail]
    cols += tail
    df = pd.DataFrame(rows, columns=cols)
    for c in _INT_COLUMNS:
        df[c] = df[c].astype("Int64")
    df["cpu_offload_gb"] = df["cpu_offload_gb"].astype(float)
    for c in ("profile", *tail):  # None where absent, not NaN
        df[c] = pd.Series([r[c] for r in rows], index=df.index, dtype=object)
    return df


# ------------------------------------------------------------------------------------------------
# Analysis helpers
# ------------------------------------------------------------------------------------------------
def pareto_front(df: pd.DataFrame, x: str, y: str, maximize: tuple[bool, bool] = (True, True)) -> pd.DataFrame:
    """The rows no other row beats on both ``x`` and ``y`` (ties kept), sorted by ``x``.

    ``maximize`` says per column whether more is better (default: both).
    """
    d = df.dropna(subset=[x, y])
    sx = d[x] if maximize[0] else -d[x]
    sy = d[y] if maximize[1] else -d[y]
    order = sorted(range(len(d)), key=lambda i: (-sx.iloc[i], -sy.iloc[i]))
    keep, best_y = [], -math.inf
    for i in order:  # by x descending: a row is on the front when its y beats every row with more x
        if sy.iloc[i] > best_y or (keep and sx.iloc[i] == sx.iloc[keep[-1]] and sy.iloc[i] == sy.iloc[keep[-1]]):
            keep.append(i)
            best_y = max(best_y, sy.iloc[i])
    return d.iloc[sorted(keep)].sort_values(x, kind="stable")
