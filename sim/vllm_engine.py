"""The engine a vLLM version runs with: V0 or V1, and the defaults it gives what a user left unset.

``vllm_engine(version, gpu, **settings)`` returns the EngineConfig (scheduler, token budget, batch
size, KV-cache and scheduling features) and the cost-model keywords (CUDA-graph mode and capture
size) of ``vllm serve`` (or ``LLM(...)``, ``entry_point="llm"``) of that version on that GPU. Each
default names the vLLM file it comes from.
"""
from __future__ import annotations

from ..errors import ConfigError
from ..specs import GiB, HardwareSpec, ModelSpec
from ..vllm_flags import parse_version  # the one reading of a vLLM version
from .costs import GRAPH_MODES, attention_kernel
from .serving import EngineConfig

# vLLM 0.8.0 made the V1 engine the default (VLLM_USE_V1, vllm/envs.py); the paper's 0.7 ran V0.
V1_SINCE = (0, 8, 0)
# Versions where a V1 default is known here to hold, from the resolved config of a real 0.19.0 run
# (shared/data/serving/rtx4090_llama-3.1-8b/meta.json); earlier versions are ASSUMED not to have them.
RESERVE_FULL_ISL_SINCE = (0, 19, 0)  # SchedulerConfig.scheduler_reserve_full_isl = True
ASYNC_SCHEDULING_SINCE = (0, 19, 0)  # VllmConfig resolves async_scheduling=None to True (one GPU)
ENTRY_POINTS = ("serve", "llm")


def _version(version: str) -> tuple[int, int, int]:
    """``version`` read (offloadlab/vllm_flags.py parse_version); an engine needs one, None is an error."""
    v = parse_version(version)
    if v is None:
        raise ConfigError("vllm_version", None, "a vLLM version such as 0.19.0")
    return v


def engine_generation(version: str) -> str:
    return "v1" if _version(version) >= V1_SINCE else "v0"


def batch_defaults(gpu: HardwareSpec, entry_point: str = "serve", gpu_memory_bytes: float | None = None
                   ) -> tuple[int, int]:
    """(max_num_batched_tokens, max_num_seqs) V1 picks when neither is given, from
    vllm/engine/arg_utils.py ``EngineArgs.get_batch_defaults``: GPUs with at least 70 GiB that are
    not A100s get 8192 / 1024 under ``vllm serve`` (16384 / 1024 for ``LLM``), others 2048 / 256
    (8192 / 256)."""
    if entry_point not in ENTRY_POINTS:
        raise ConfigError("entry_point", entry_point, f"one of {ENTRY_POINTS}")
    memory = gpu_memory_bytes if gpu_memory_bytes is not None else gpu.memory_bytes
    big = memory >= 70 * GiB and "a100" not in gpu.name.lower()
    if big:
        return (8192, 1024) if entry_point == "serve" else (16384, 1024)
    return (2048, 256) if entry_point == "serve" else (8192, 256)


def vllm_engine(version: str, gpu: HardwareSpec, model: ModelSpec | None = None, *, entry_point: str = "serve",
                gpu_memory_bytes: float | None = None, **settings) -> tuple[EngineConfig, dict]:
    """(EngineConfig, cost-model keywords) for vLLM ``version`` on ``gpu``. ``settings`` are the
    engine arguments the user gave (EngineConfig field names, plus ``enforce_eager``,
    ``max_cudagraph_capture_size`` and ``cudagraph_mode``: a Roofline graph_mode, sim/costs.py GRAPH_MODES,
    or "none"); ``None`` or absent takes the version's default."""
    given = {k: v for k, v in settings.items() if v is not None}
    eager = bool(given.pop("enforce_eager", False))
    capture = given.pop("max_cudagraph_capture_size", None)
    # vllm/config/compilation.py: V1's default cudagraph_mode is FULL_AND_PIECEWISE; enforce_eager sets NONE
    graph_mode = given.pop("cudagraph_mode", "piecewise")
    if graph_mode not in GRAPH_MODES + ("none",):
        raise ConfigError("cudagraph_mode", graph_mode, "one of " + ", ".join(GRAPH_MODES + ("none",)))
    eager = eager or graph_mode == "none"
    unknown = sorted(set(given) - set(EngineConfig.__dataclass_fields__))
    if unknown:
        raise ConfigError(unknown[0], given[unknown[0]], f"an engine setting ({', '.join(EngineConfig.__dataclass_fields__)})")
    v = _version(version)
    if engine_generation(version) == "v0":
        # V0 (the paper's 0.7) is modelled without prefix caching; settings only V1 has are left out
        v0 = {k: v for k, v in given.items() if k not in ("prefix_caching", "reserve_full_isl", "async_scheduling")}
        eng = EngineConfig(**{**v0, "scheduler": "v0"})
        return eng, {"cuda_graphs": not eager}
    tokens, seqs = batch_defaults(gpu, entry_point, gpu_memory_bytes)
    max_model_len = given.get("max_model_len") or (model.max_context if model is not None else 8192)
    # vllm/engine/arg_utils.py _set_default_max_num_seqs_and_batched_tokens_args: a defaulted budget is
    # at least max_model_len without chunked prefill, at most max_num_seqs x max_model_len; a defaulted
    # max_num_seqs is at most the budget
    chunked = given.get("chunked_prefill", True)  # V1 chunks prefills by default (arg_utils.py)
    if "max_num_batched_tokens" not in given:
        n_seqs = given.get("max_num_seqs", seqs)
        tokens = min(n_seqs * max_model_len, tokens if chunked else max(max_model_len, tokens))
    if "max_num_seqs" not in given:
        seqs = min(seqs, given.get("max_num_batched_tokens", tokens))
    defaults = dict(scheduler="v1", chunked_prefill=True, max_num_batched_tokens=tokens, max_num_seqs=seqs,
                    max_model_len=max_model_len, gpu_memory_utilization=0.9, block_size=16,
                    prefix_caching=True,  # generative models support it: on (arg_utils.py)
                    reserve_full_isl=v >= RESERVE_FULL_ISL_SINCE, async_scheduling=v >= ASYNC_SCHEDULING_SINCE)
    if given.get("pipeline_parallel", 1) > 1:
        defaults["async_scheduling"] = False  # not supported with pipeline parallelism (vllm/config/scheduler.py)
    eng = EngineConfig(**{**defaults, **given})
    if capture is None:
        # vllm/config/vllm.py (_set_cudagraph_sizes): min(2 x max_num_seqs, 512), then at most the budget
        capture = min(2 * eng.max_num_seqs, 512, eng.max_num_batched_tokens)
    return eng, {"cuda_graphs": not eager, "graph_mode": "piecewise" if eager else graph_mode,
                 "max_graph_batch": int(capture), "attention_kernel": attention_kernel(gpu)}
