"""The "before buying" study: which node types and sizes can serve a model, how fast, at what cost.

    from offloadlab.apps.study import can_serve, serve
    fit = can_serve(models, ["H100-SXM5-80GB", "H200-SXM-141GB"], counts=[1, 2, 4, 8])
    table = serve(fit, longbench_multi_news(200))

A deployment of n GPUs is vLLM's usual layout: tensor parallelism over the GPUs of one node, and
pipeline parallelism across nodes when n is larger (``deployment``). For each (model, GPU type, n)
``can_serve`` decides from the memory plan alone whether it fits without offload, with the paper's
interval-k offload (two staging buffers) for which k, or not at all (and why). ``serve`` simulates
every fitting candidate (no offload and each fitting k) with ``offloadlab.apps.sweep`` and keeps, per
deployment, the best without offload and the best with it: offloading more frees KV cache for
bigger batches, offloading less copies less, and the best k is where those balance.
"""
from __future__ import annotations

import dataclasses
from typing import Iterable, Mapping

import pandas as pd

from ..catalog import get_gpu, get_model
from ..checks import check_int
from ..errors import ConfigError, DoesNotFitError
from ..policy import NoOffload, Policy, interval
from ..sim import EngineConfig, Workload, layout, serving_memory
from ..specs import HardwareSpec, ModelSpec
from .sweep import SimConfig, sweep

KS = (1, 2, 3, 4, 6, 8)  # interval k tried for each deployment


def deployment(gpu: str | HardwareSpec, gpus: int) -> tuple[int, int]:
    """(tensor_parallel, pipeline_parallel) for ``gpus`` GPUs: TP inside one node, PP across whole nodes."""
    hw = get_gpu(gpu)
    check_int("gpus", gpus, 1)
    per = hw.gpus_per_node
    if gpus <= per:
        return gpus, 1
    if gpus % per:
        raise ConfigError("gpus", gpus, f"at most {per} or a multiple of the {per} GPUs of a {hw.name} node")
    return per, gpus // per


def _fits(model, gpu, policy: Policy, engine: EngineConfig) -> str | None:
    """None when ``policy`` fits, else why not."""
    try:
        serving_memory(model, gpu, policy, engine)
    except DoesNotFitError as e:
        return str(e)
    return None


def can_serve(models: Mapping[str, str | ModelSpec], gpus: Iterable[str | HardwareSpec], counts: Iterable[int],
              engine: EngineConfig = EngineConfig(), ks: Iterable[int] = KS) -> pd.DataFrame:
    """One row per (model label, GPU type, GPU count): the deployment (``tp``, ``pp``), ``fits``
    ("without offload", "only with offload" or "no"), ``policies`` (NoOffload when it fits, then each
    interval(k) of ``ks`` that fits, least offload first), ``max_k`` (the largest of those k: the least
    offload that fits), when nothing fits ``reason``, and the
    ``spec`` and ``hardware`` used (for ``serve``).
    ``engine``'s tensor/pipeline parallel sizes are replaced by each deployment's."""
    ks = sorted(set(ks), reverse=True)
    rows = []
    for label, model in models.items():
        m = get_model(model).with_kv_cache_dtype(engine.kv_cache_dtype)
        for gpu in gpus:
            hw = get_gpu(gpu)
            for n in counts:
                row = dict(model=label, gpu=hw.name, gpus=n, tp=None, pp=None, fits="no", max_k=None, policies=[],
                           reason=None, spec=m, hardware=hw)
                try:
                    tp, pp = deployment(hw, n)
                    layout(m, hw, tp, pp)  # shards and stages that cannot exist fail here
                except ConfigError as e:
                    rows.append(dict(row, reason=str(e)))
                    continue
                eng = dataclasses.replace(engine, tensor_parallel=tp, pipeline_parallel=pp)
                row.update(tp=tp, pp=pp)
                whole = _fits(m, hw, NoOffload(), eng)
                why = {k: _fits(m, hw, interval(k), eng) for k in ks}
                fitting = [k for k in ks if why[k] is None]
                row["max_k"] = fitting[0] if fitting else None
                pols = ([NoOffload()] if whole is None else []) + [interval(k) for k in fitting]
                if whole is None:
                    row.update(fits="without offload", policies=pols)
                elif pols:
                    row.update(fits="only with offload", policies=pols)
                else:
                    row.update(reason=f"not even with interval k={ks[-1]}: {why[ks[-1]]}")
                rows.append(row)
    return pd.DataFrame(rows)


def serve(fit: pd.DataFrame, workload: Workload, engine: EngineConfig = EngineConfig(), *, executor=None,
          cache_dir=None, progress: bool = False) -> pd.DataFrame:
    """Simulate every candidate policy of every deployment that fits (``can_serve``'s rows) and keep,
    per deployment, the best throughput without offload and the best with offload (``offload``
    column; one row each where there is one). Adds ``tok_s_per_gpu``, ``gpu_h_per_Mtok`` (GPU-hours
    per million output tokens) and ``candidates`` (how many policies were simulated)."""
    fit = fit.reset_index(drop=True)  # rows are matched to their candidates by position
    configs, owner = [], []
    for i, r in fit.iterrows():
        eng = dataclasses.replace(engine, tensor_parallel=int(r["tp"] or 1), pipeline_parallel=int(r["pp"] or 1))
        for p in r["policies"]:
            configs.append(SimConfig(model=r["spec"], gpu=r["hardware"], policy=p, engine=eng))
            owner.append(i)
    if not configs:
        return pd.DataFrame()
    df = sweep(configs, workload, executor=executor, cache_dir=cache_dir, progress=progress)
    df["row"] = owner
    df["offload"] = df["policy_kind"] != "none"
    df["candidates"] = df.groupby(["row", "offload"])["policy"].transform("size")
    ok = df[df["error"].isna()]
    best = ok.loc[ok.groupby(["row", "offload"])["throughput_rps"].idxmax()]
    best = best.drop(columns=["model", "gpu", "tensor_parallel", "pipeline_parallel", "gpus"], errors="ignore")
    out = fit.drop(columns=["policies", "reason", "spec", "hardware"]).join(best.set_index("row"), how="inner")
    out["tok_s_per_gpu"] = out["output_tok_s"] / out["gpus"]
    out["gpu_h_per_Mtok"] = 1e6 / out["tok_s_per_gpu"] / 3600
    return out.reset_index(drop=True)
