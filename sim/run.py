"""The simulator's public entry points: one forward step, or a whole served workload."""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import pandas as pd

from ..catalog import get_gpu, get_model
from ..errors import ConfigError, DoesNotFitError
from ..policy import NoOffload, Placement, Policy
from ..profile import Profile
from ..specs import HardwareSpec, ModelSpec
from ..trace import Span, Trace
from .costs import StepShape, cost_model
from .memory import MemoryPlan, plan_memory
from .metrics import request_frame, summarize
from .serving import WATERMARK, EngineConfig, ServingLoop
from .step import StepModel, StepResult, events_processed
from .workload import Workload


def per_gpu(model: str | ModelSpec, gpu: str | HardwareSpec, tensor_parallel: int = 1
            ) -> tuple[ModelSpec, HardwareSpec, HardwareSpec]:
    """(one GPU's model shard, the GPU, the GPU as its copies see it): under tensor parallelism
    every GPU copies its shard at once, so GPUs behind one host link share its bandwidth."""
    m, hw = get_model(model), get_gpu(gpu)
    if isinstance(tensor_parallel, int) and not isinstance(tensor_parallel, bool) and tensor_parallel > hw.gpus_per_node:
        raise ConfigError("tensor_parallel", tensor_parallel, f"at most the {hw.gpus_per_node} GPUs of a {hw.name} node")
    shard = m.shard(tensor_parallel)
    share = min(shard.tensor_parallel, hw.gpus_per_host_link)
    return shard, hw, hw.replace(host_link_bw=hw.host_link_bw / share) if share > 1 else hw


def _resolve(model, gpu, policy, profile, cost_kw, tensor_parallel=1):
    m, hw, link_hw = per_gpu(model, gpu, tensor_parallel)
    policy = policy if policy is not None else NoOffload()
    if isinstance(profile, (str, os.PathLike)):
        profile = Profile.load(profile)
    placement = policy.place(m)  # vLLM's offload budgets are per GPU
    # the share divides whatever the cost model's copy rate is, datasheet or measured
    share = hw.host_link_bw / link_hw.host_link_bw
    return m, hw, policy, placement, cost_model(m, hw, profile, **{"link_share": share, **(cost_kw or {})})


def simulate_step(model: str | ModelSpec, gpu: str | HardwareSpec, policy: Policy | None = None, *,
                  batch: int = 1, new_tokens: int = 1, context: int = 0, profile: Profile | str | os.PathLike | None = None,
                  cost_kw: dict | None = None, tensor_parallel: int = 1) -> StepResult:
    """One forward pass of ``batch`` sequences adding ``new_tokens`` after ``context`` cached ones.

    Returns the step time, per-lane busy seconds, compute-stream stall and the per-layer Trace.
    """
    m, hw, policy, placement, cost = _resolve(model, gpu, policy, profile, cost_kw, tensor_parallel)
    shape = StepShape.uniform(batch, new_tokens, context)
    res = StepModel(placement, cost, quantum=0.0).run(shape, trace=True)
    res.trace.meta.update(model=m.name, gpu=hw.name, policy=policy.label, batch=batch, new_tokens=new_tokens,
                          context=context)
    return res


def bottleneck(summary: dict) -> str:
    """What limits a run, from its lanes' utilization: the host link (copy-bound), the host
    launching kernels (launch-bound) or the GPU (compute-bound)."""
    if summary["util_link"] >= 0.8:
        return "copy-bound"
    if summary["util_host"] >= summary["util_compute"]:
        return "launch-bound"
    return "compute-bound"


def serving_memory(model: str | ModelSpec, gpu: str | HardwareSpec, placement, engine: EngineConfig = EngineConfig()
                   ) -> MemoryPlan:
    """One GPU's memory layout in a deployment (with tensor parallelism, every GPU's is the same);
    ``placement`` is a Policy or its Placement (of the per-GPU shard)."""
    m, hw, _ = per_gpu(model, gpu, engine.tensor_parallel)
    if not isinstance(placement, Placement):
        placement = placement.place(m)
    return plan_memory(m, hw, placement, gpu_memory_utilization=engine.gpu_memory_utilization,
                       max_batched_tokens=engine.max_num_batched_tokens, max_seqs=engine.max_num_seqs,
                       max_model_len=engine.max_model_len, block_size=engine.block_size,
                       overhead=engine.overhead_bytes, gpus=engine.tensor_parallel)


@dataclass
class RunResult:
    """A simulated serving run: per-request rows, the summary, memory and the step trace."""

    summary: dict
    requests: pd.DataFrame
    memory: MemoryPlan
    config: dict = field(default_factory=dict)
    steps: list = field(default_factory=list, repr=False)  # (start, end, kind, batch size) per step

    @property
    def trace(self) -> Trace:
        """One span per engine step on the "engine" lane, plus the per-request records."""
        spans = [Span("engine", "step", t0, t1, step=i, name=f"{kind} x{size}")
                 for i, (t0, t1, kind, size) in enumerate(self.steps)]
        meta = {"source": "sim", **{k: v for k, v in self.config.items() if not isinstance(v, bool)}}
        reqs = self.requests.astype(object).where(self.requests.notna(), None).to_dict("records")
        return Trace(spans=spans, requests=reqs, meta=meta)

    def row(self) -> dict:
        """The run as one tidy row: its inputs, then its outputs (seconds, bytes)."""
        mem = {f"mem_{k}": v for k, v in self.memory.as_dict().items()}
        return {**self.config, **self.summary, **mem}


def simulate(model: str | ModelSpec, gpu: str | HardwareSpec, policy: Policy | None, workload: Workload,
             engine: EngineConfig = EngineConfig(), *, profile: Profile | str | os.PathLike | None = None,
             cost_kw: dict | None = None, trace_steps: bool = True) -> RunResult:
    """Serve ``workload`` on ``gpu`` with ``policy``; deterministic for a given workload."""
    wall = time.perf_counter()
    _, hw, policy, placement, cost = _resolve(model, gpu, policy, profile, cost_kw, engine.tensor_parallel)
    for r in workload.requests:  # the request's own limits first, then (below) the memory plan's
        if r.prompt_len + r.output_len > engine.max_model_len:
            raise ConfigError(f"request {r.id} prompt_len+output_len", r.prompt_len + r.output_len,
                              f"at most max_model_len={engine.max_model_len}")
        if not engine.chunked_prefill and r.prompt_len + r.output_len > engine.max_num_batched_tokens:
            raise ConfigError(f"request {r.id} prompt_len+output_len", r.prompt_len + r.output_len,
                              f"at most max_num_batched_tokens={engine.max_num_batched_tokens} "
                              "without chunked prefill (a preempted request is recomputed in one step)")
    mem = serving_memory(model, gpu, placement, engine)
    fits = int(mem.kv_blocks * (1 - WATERMARK)) * engine.block_size
    for r in workload.requests:
        if r.prompt_len + r.output_len > fits:
            raise DoesNotFitError(
                f"request {r.id}: prompt_len+output_len={r.prompt_len + r.output_len} tokens exceed the KV cache's "
                f"{mem.kv_tokens} tokens less vLLM's 1% watermark ({fits}); vLLM would ignore it")
    sm = StepModel(placement, cost)
    loop = ServingLoop(sm, engine, mem.kv_tokens, trace_steps=trace_steps)
    loop.run(list(workload.requests))
    reqs = request_frame(loop.seqs)
    summary = summarize(reqs)
    makespan = summary["makespan_s"]
    summary.update({f"util_{lane}": b / makespan for lane, b in loop.busy.items()})
    summary["bound"] = bottleneck(summary)
    summary.update(
        compute_stall_s=loop.stall,
        steps=sum(loop.n_steps.values()), **{f"{k}_steps": v for k, v in loop.n_steps.items()},
        step_sims=sm.simulated, simpy_events=sm.events + events_processed(loop.env),
        wall_s=time.perf_counter() - wall,
    )
    tp = engine.tensor_parallel
    summary["output_tok_s_per_gpu"] = summary["output_tok_s"] / tp
    config = dict(model=get_model(model).name, gpu=hw.name, tensor_parallel=tp, policy=policy.label,
                  policy_kind=policy.kind, offloaded_layers=len(placement.offloaded_layers),
                  offloaded_bytes=placement.offloaded_bytes,  # per GPU
                  workload=workload.name, mode=engine.mode, chunked_prefill=engine.chunked_prefill,
                  gpu_memory_utilization=engine.gpu_memory_utilization, max_num_seqs=engine.max_num_seqs,
                  max_num_batched_tokens=engine.max_num_batched_tokens,
                  h2d_GBps=hw.h2d_bw / cost.link_share / 1e9,  # each GPU's share of its host link
                  profile=bool(profile))
    return RunResult(summary, reqs, mem, config, loop.steps)
