"""offloadlab.runtime: the real thing, in PyTorch. Needs torch (``pip install -e ".[runtime]"``).

A Llama decoder built from a ModelSpec whose layers can live in (pinned) host memory, placed by
the same Policy objects the simulator uses; traces in the simulator's Trace format; a
microbenchmark that writes the simulator's Profile. Imports the shared vocabulary and torch only,
never offloadlab.sim. Runs on CPU too (streams and events become no-ops), which is how it is tested.

    from offloadlab import get_model, interval
    from offloadlab.runtime import build, generate, Tracer

    model = build(get_model("llama-3.1-8b"), interval(2), device="cuda")
    tokens = generate(model, prompts, max_new_tokens=32)
"""
from .device import Device, resolve_device
from .generate import WorkloadResult, generate, prefill, run_workload
from .model import Arch, KVCache, Transformer
from .offload import CopyPath, FlatLayout, PrefetchRing, Uva, build, check_fits, memory_needs
from . import microbench, probe
from .tracer import NULL_TRACER, Tracer
from .weights import CheckpointWeights, RandomWeights, save_hf_checkpoint

__all__ = [
    "Arch", "CheckpointWeights", "CopyPath", "Device", "FlatLayout", "KVCache", "NULL_TRACER", "PrefetchRing",
    "RandomWeights", "Tracer", "Transformer", "Uva", "WorkloadResult", "build", "check_fits", "generate",
    "memory_needs", "microbench", "prefill", "probe", "resolve_device", "run_workload", "save_hf_checkpoint",
]
