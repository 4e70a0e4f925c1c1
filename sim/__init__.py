"""The SimPy simulator: one forward step (``simulate_step``) or a served workload (``simulate``).

Files, one concept each: ``costs`` (roofline and calibrated cost models), ``step`` (the SimPy
model of one forward pass), ``memory`` (GPU/host memory layout), ``serving`` (vLLM-like scheduler
loop), ``workload`` (request generators, vLLM's arrivals, replays), ``sharegpt`` (real ShareGPT traffic), ``parallel`` (tensor and pipeline parallel layout), ``metrics`` (latency and throughput summaries), ``run``
(the entry points). Imports only the shared vocabulary; never torch.
"""
from .costs import Calibrated, LayerCost, Roofline, StepShape, cost_model
from .memory import MemoryPlan, plan_memory
from .parallel import Layout
from .run import (BAND_METRICS, RunResult, band_of, describe_profile, layout, per_gpu, serving_memory, simulate,
                  simulate_band, simulate_step, start_band, start_corners)
from .serving import EngineConfig
from .step import StepModel, StepResult, simulate_layers
from .workload import Request, Workload, longbench_multi_news, make_workload

__all__ = [
    "BAND_METRICS", "Calibrated", "band_of", "EngineConfig", "describe_profile", "LayerCost", "Layout", "MemoryPlan", "Request", "Roofline", "RunResult", "StepModel",
    "StepResult", "StepShape", "Workload", "cost_model", "longbench_multi_news", "make_workload", "layout",
    "plan_memory", "per_gpu", "serving_memory", "simulate", "simulate_band", "simulate_layers", "simulate_step", "start_band", "start_corners",
]


def __getattr__(name: str):
    """``sharegpt`` (its dataset readers, hashlib) imported when first used: only its workloads need it."""
    if name == "sharegpt":  # import_module, not ``from . import``: that asks this module for the name again
        import importlib

        return importlib.import_module(f"{__name__}.sharegpt")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
