"""The paper's scenario (Ye et al., "Accelerate LLM inference with Asynchronous model offload").

Llama-3.1-8B on one A100-SXM4-40GB, vLLM with gpu_memory_utilization 0.8, 200 LongBench
multi_news-like requests (mean prompt 2,113 tokens, 512 output tokens), all arriving at once, run
prefill-only and prefill+decode. Compared: no offload, vLLM's copy-path offload of the same bytes
as interval k=2, and interval k=2 with two staging buffers. Assumptions beyond the paper's text
are the defaults of EngineConfig and of the workload generator (lognormal prompts, sigma 0.5).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from ..catalog import get_gpu, get_model
from ..policy import NoOffload, VllmCopy, budget_for, interval
from ..sim import EngineConfig, longbench_multi_news, serving_memory, simulate
from ..sim.workload import check_fits_in_memory
from ..specs import GiB

if TYPE_CHECKING:
    import pandas as pd

PAPER_MODEL = "llama-3.1-8b"
PAPER_GPU = "A100-SXM4-40GB"
PAPER_ENGINE = EngineConfig(gpu_memory_utilization=0.8)
MODES = ("prefill-only", "prefill+decode")


def paper_policies(model=PAPER_MODEL, k: int = 2, slots: int = 2):
    """No offload; vLLM copy path offloading the same bytes as interval k; interval k."""
    m = get_model(model)
    ours = interval(k, slots)
    return [NoOffload(), VllmCopy(budget_for(ours.place(m).offloaded_bytes)), ours]


def paper_rows(model=PAPER_MODEL, gpu=PAPER_GPU, requests: int = 200, seed: int = 0, profile=None,
               engine: EngineConfig = PAPER_ENGINE, progress: bool = False) -> list[dict]:
    """One row per (mode, policy): inputs, throughput, latency percentiles, memory (``run_paper``'s rows)."""
    from tqdm import tqdm

    if isinstance(requests, int) and not isinstance(requests, bool):  # other values: longbench_multi_news says
        check_fits_in_memory(requests)
    wl = longbench_multi_news(requests, seed=seed)
    jobs = [(mode, p) for mode in MODES for p in paper_policies(model)]
    rows = []
    for mode, pol in tqdm(jobs, disable=not progress, desc="paper scenario"):
        eng = EngineConfig(**{**engine.__dict__, "mode": mode})
        rows.append(simulate(model, gpu, pol, wl, eng, profile=profile, trace_steps=False).row())
    return rows


def run_paper(model=PAPER_MODEL, gpu=PAPER_GPU, requests: int = 200, seed: int = 0, profile=None,
              engine: EngineConfig = PAPER_ENGINE, progress: bool = False) -> pd.DataFrame:
    """One row per (mode, policy): inputs, throughput, latency percentiles, memory."""
    import pandas as pd

    return pd.DataFrame(paper_rows(model, gpu, requests, seed, profile, engine, progress))


def speedup_rows(results) -> list[dict]:
    """Per mode: interval vs vLLM copy path (throughput ratio, TTFT and TPOT ratios); ``results``:
    ``paper_rows``' rows, or ``run_paper``'s DataFrame."""
    if hasattr(results, "to_dict"):
        results = results.to_dict("records")
    out = []
    for mode in dict.fromkeys(r["mode"] for r in results):
        ours = next(r for r in results if r["mode"] == mode and r["policy_kind"] == "prefetch")
        base = next(r for r in results if r["mode"] == mode and r["policy_kind"] == "vllm")
        out.append({"mode": mode, "vs": base["policy"], "policy": ours["policy"],
                    "throughput_x": ours["throughput_rps"] / base["throughput_rps"],
                    "ttft_mean_ratio": ours["ttft_mean_s"] / base["ttft_mean_s"],
                    "tpot_mean_ratio": ours["tpot_mean_s"] / base["tpot_mean_s"]})
    return out


def speedups(results) -> pd.DataFrame:
    """``speedup_rows`` as a DataFrame."""
    import pandas as pd

    return pd.DataFrame(speedup_rows(results))


def memory_table(model=PAPER_MODEL, gpu=PAPER_GPU, engine: EngineConfig = PAPER_ENGINE,
                 vllm_gib=(2, 4, 6.5, 8), ks=(2, 3, 4), slots: int = 2) -> pd.DataFrame:
    """Like the paper's Fig. 5: GPU memory for weights, staging and the KV cache per policy."""
    import pandas as pd

    return pd.DataFrame(memory_rows(model, gpu, engine, vllm_gib, ks, slots))


def memory_rows(model=PAPER_MODEL, gpu=PAPER_GPU, engine: EngineConfig = PAPER_ENGINE,
                vllm_gib=(2, 4, 6.5, 8), ks=(2, 3, 4), slots: int = 2) -> list[dict]:
    """``memory_table``'s rows."""
    m, hw = get_model(model), get_gpu(gpu)
    pols = [NoOffload(), *(VllmCopy(g) for g in vllm_gib), *(interval(k, slots) for k in ks)]
    rows = []
    for p in pols:
        pl = p.place(m)
        mem = serving_memory(m, hw, pl, engine)
        rows.append({"policy": p.label, "offloaded_layers": len(pl.offloaded_layers),
                     "offloaded_GiB": pl.offloaded_bytes / GiB, "weights_GiB": mem.weights_resident / GiB,
                     "staging_GiB": mem.staging / GiB, "activations_GiB": mem.activations / GiB,
                     "overhead_GiB": mem.overhead / GiB, "kv_cache_GiB": mem.kv_cache / GiB,
                     "kv_tokens": mem.kv_tokens})
    return rows
