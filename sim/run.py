"""The simulator's public entry points: one forward step, or a whole served workload."""
from __future__ import annotations

import dataclasses
import functools
import os
import time
from concurrent.futures import wait
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from ..catalog import get_gpu, get_model
from ..errors import ConfigError, DoesNotFitError
from ..policy import NoOffload, Placement, Policy
from ..profile import Profile, load_profiles
from ..specs import GiB, HardwareSpec, ModelSpec
from ..trace import Span, Trace, idle_lanes
from .costs import Corner, StepShape, cost_model
from .memory import MemoryPlan, plan_memory
from ..metrics import StreamSummary
from .metrics import request_columns, summarize
from .parallel import Layout
from .serving import WATERMARK, EngineConfig, PipelinedServing, ServingLoop
from .serving_v1 import V1PipelinedServing, V1ServingLoop
from .step import StepModel, StepResult, events_processed
from .workload import RequestStream, Workload

if TYPE_CHECKING:
    from concurrent.futures import Executor

    import pandas as pd


def layout(model: str | ModelSpec, gpu: str | HardwareSpec, tensor_parallel: int = 1,
           pipeline_parallel: int = 1, kv_cache_dtype: str = "auto") -> Layout:
    """The deployment: ``model`` (with vLLM's ``kv_cache_dtype`` applied) over tensor x pipeline GPUs."""
    return Layout(get_model(model).with_kv_cache_dtype(kv_cache_dtype), get_gpu(gpu), tensor_parallel,
                  pipeline_parallel)


def per_gpu(model: str | ModelSpec, gpu: str | HardwareSpec, tensor_parallel: int = 1,
            pipeline_parallel: int = 1) -> ModelSpec:
    """What one GPU holds: its tensor-parallel shard of a stage (the stage with the most layers)."""
    return max(layout(model, gpu, tensor_parallel, pipeline_parallel).stages, key=lambda m: m.layers)


def describe_profile(model: str | ModelSpec, gpu: str | HardwareSpec, profile, tensor_parallel: int = 1,
                     pipeline_parallel: int = 1, cost_kw: dict | None = None) -> str:
    """One line: what ``profile`` transfers to one GPU of this deployment, from what ("H100 llama-3.1-8b
    profile applied to llama-3.1-70b on H200-SXM-141GB by efficiency transfer (...)"); the datasheet
    roofline when there is no profile."""
    lay = layout(model, gpu, tensor_parallel, pipeline_parallel)
    profile = load_profiles(profile)
    m = max(lay.stages, key=lambda s: s.layers)
    return cost_model(m, lay.hw, profile, **(cost_kw or {})).describe()


@dataclass(frozen=True)
class _Stage:
    model: ModelSpec  # one GPU's part of the stage
    placement: Placement  # vLLM's offload budgets are per GPU: the policy placed on this part
    cost: object


CORNERS = {"low": 0, "high": 1}  # low costs (optimistic) and high costs (pessimistic) ends of the band


def _resolve(lay: Layout, policy: Policy, profile, cost_kw, corner: str | None = None,
             tokens: tuple[int, int] | None = None) -> list[_Stage]:
    """Each stage's placement and cost model; every GPU copies over its share of a host link, whatever
    the cost model's copy rate is, datasheet or measured. ``corner``: the cost model at one end of its
    uncertainty band. ``tokens``: the step sizes the caller will ask for (a profile must have a
    measured row near them)."""
    if corner is not None and corner not in CORNERS:
        raise ConfigError("corner", corner, "None, 'low' or 'high'")
    profile = load_profiles(profile)
    kw = {"link_share": lay.link_share, **(cost_kw or {})}
    out = []
    for m in lay.stages:
        cost = cost_model(m, lay.hw, profile, **kw)
        if tokens is not None and hasattr(cost, "check_near"):
            cost.check_near(*tokens)
        out.append(_Stage(m, policy.place(m), Corner(cost, CORNERS[corner]) if corner else cost))
    return out


def simulate_step(model: str | ModelSpec, gpu: str | HardwareSpec, policy: Policy | None = None, *,
                  batch: int = 1, new_tokens: int = 1, context: int = 0, profile: Profile | str | os.PathLike | None = None,
                  cost_kw: dict | None = None, tensor_parallel: int = 1, pipeline_parallel: int = 1,
                  corner: str | None = None) -> StepResult:
    """One forward pass of ``batch`` sequences adding ``new_tokens`` after ``context`` cached ones.

    Returns the step time, per-lane busy seconds (per GPU, averaged over pipeline stages), the
    compute-stream stall and the per-layer Trace (under pipeline parallelism, stage s's spans carry
    ``gpu`` = its first GPU, s x tensor_parallel; the stages run one after the other, with a
    "send" span between them). ``corner``: "low" or "high", the step on the low- or high-cost end of
    the cost model's uncertainty band (``costs.Band``).
    """
    lay = layout(model, gpu, tensor_parallel, pipeline_parallel)
    policy = policy if policy is not None else NoOffload()
    shape = StepShape.uniform(batch, new_tokens, context)
    window = lay.model.max_context
    if isinstance(new_tokens, int) and isinstance(context, int) and new_tokens + context > window:
        raise ConfigError("context+new_tokens", context + new_tokens, f"at most {window}, {lay.model.name}'s context "
                          "window (max_context)")
    stages = _resolve(lay, policy, profile, cost_kw, corner, (shape.tokens, shape.tokens))
    pp = len(stages)
    t, stall, events, spans = 0.0, 0.0, 0, []
    busy = idle_lanes()
    for i, st in enumerate(stages):
        res = StepModel(st.placement, st.cost, quantum=0.0).run(shape, trace=True)
        gpu = i * lay.tensor_parallel
        spans += [dataclasses.replace(sp, gpu=gpu, start=sp.start + t, end=sp.end + t) for sp in res.trace.spans]
        for lane, b in res.busy.items():
            busy[lane] += b / pp
        stall += res.stall / pp
        events += res.events
        t += res.time
        if i < pp - 1:
            send = lay.send_time(i, shape.tokens)
            spans.append(Span("send", "send", t, t + send, layer=st.model.layers, gpu=gpu))
            t += send
    trace = Trace(spans=spans, meta={"source": "sim", "model": lay.model.name, "gpu": lay.hw.name,
                                     "policy": policy.label, "batch": batch, "new_tokens": new_tokens,
                                     "context": context, "tensor_parallel": tensor_parallel,
                                     "pipeline_parallel": pipeline_parallel})
    return StepResult(t, busy, stall, events, trace)


def bottleneck(summary: dict) -> str:
    """What limits a run, from its lanes' utilization: the host link (copy-bound), the host
    launching kernels (launch-bound) or the GPU (compute-bound)."""
    if summary["util_link"] >= 0.8:
        return "copy-bound"
    if summary["util_host"] >= summary["util_compute"]:
        return "launch-bound"
    return "compute-bound"


def _memory(lay: Layout, placements: list[Placement], engine: EngineConfig) -> MemoryPlan:
    """One GPU's memory plan for ``lay`` with one placement per stage (see ``serving_memory``)."""
    plans = [plan_memory(m, lay.hw, p, gpu_memory_utilization=engine.gpu_memory_utilization,
                         max_batched_tokens=engine.max_num_batched_tokens, max_seqs=engine.max_num_seqs,
                         max_model_len=engine.max_model_len, block_size=engine.block_size,
                         overhead=engine.overhead_bytes, gpus=engine.tensor_parallel,
                         scheduler=engine.scheduler,
                         kv_cache_bytes=engine.kv_cache_memory_bytes, num_blocks=engine.num_gpu_blocks_override)
             for m, p in zip(lay.stages, placements)]
    if len(plans) == 1:
        return plans[0]
    offloaded = lay.host_pinned([p.offloaded_bytes for p in placements])
    pinned = lay.host_pinned([p.host_pinned_bytes for p in placements])
    node = max(range(lay.nodes), key=lambda n: pinned[n])
    if pinned[node] > lay.hw.host_memory_bytes:
        raise DoesNotFitError(
            f"offloaded weights take {pinned[node] / GiB:.1f} GiB of pinned host memory on node {node} of "
            f"{lay.describe()}, more than its {lay.hw.host_memory_bytes / GiB:.1f} GiB")
    tightest = min(plans, key=lambda p: p.kv_tokens)
    return dataclasses.replace(tightest, host_offloaded=offloaded[node], host_pinned=pinned[node])


def serving_memory(model: str | ModelSpec, gpu: str | HardwareSpec, placement, engine: EngineConfig = EngineConfig()
                   ) -> MemoryPlan:
    """One GPU's memory layout in a deployment: with tensor parallelism every GPU's is the same;
    with pipeline parallelism, the stage with the fewest KV tokens (every stage keeps the KV of
    every token for its layers), with the pinned host memory of the fullest node. ``placement`` is
    a Policy, or under tensor parallelism alone the Placement of the per-GPU shard."""
    lay = layout(model, gpu, engine.tensor_parallel, engine.pipeline_parallel, engine.kv_cache_dtype)
    if isinstance(placement, Placement):
        if lay.pipeline_parallel > 1:
            raise ConfigError("placement", placement, "a Policy (each pipeline stage places it on its own layers)")
        return _memory(lay, [placement], engine)
    return _memory(lay, [placement.place(m) for m in lay.stages], engine)


@dataclass
class RunResult:
    """A simulated serving run: per-request rows, the summary, memory and the step trace."""

    summary: dict
    # the request frame's columns (sim/metrics.py request_columns); None: simulate(requests="summary") kept no
    # per-request rows. ``requests`` is the same as a DataFrame, made when first asked for (pandas' import
    # is most of a short command's start-up, and printing a summary needs no frame)
    columns: dict | None
    memory: MemoryPlan
    config: dict = field(default_factory=dict)
    # (start, end, kind, batch size) per step; a fifth field, the virtual engine, under pipeline parallelism
    steps: list = field(default_factory=list, repr=False)
    # (time, running, waiting) requests when each step was scheduled (the V1 engine records it)
    occupancy: list = field(default_factory=list, repr=False)

    @functools.cached_property
    def requests(self) -> pd.DataFrame | None:
        """One row per request (``columns`` as a DataFrame); None when the run kept no per-request rows."""
        if self.columns is None:
            return None
        import pandas as pd

        return pd.DataFrame(self.columns)

    @property
    def trace(self) -> Trace:
        """One span per engine step on the "engine" lane (one lane per virtual engine under pipeline
        parallelism: their steps overlap), plus the per-request records."""
        spans = [Span("engine" if len(st) == 4 else f"engine {st[4]}", "step", st[0], st[1], step=i,
                      name=f"{st[2]} x{st[3]}") for i, st in enumerate(self.steps)]
        meta = {"source": "sim", **{k: v for k, v in self.config.items() if not isinstance(v, bool)}}
        reqs = ([] if self.requests is None
                else self.requests.astype(object).where(self.requests.notna(), None).to_dict("records"))
        return Trace(spans=spans, requests=reqs, meta=meta)

    def row(self) -> dict:
        """The run as one tidy row: its inputs, then its outputs (seconds, bytes)."""
        mem = {f"mem_{k}": v for k, v in self.memory.as_dict().items()}
        return {**self.config, **self.summary, **mem}


def simulate(model: str | ModelSpec, gpu: str | HardwareSpec, policy: Policy | None, workload: Workload,
             engine: EngineConfig = EngineConfig(), *, profile: Profile | str | os.PathLike | None = None,
             cost_kw: dict | None = None, trace_steps: bool = True, corner: str | None = None,
             requests: str = "frame") -> RunResult:
    """Serve ``workload`` on ``gpu`` with ``policy``; deterministic for a given workload. ``corner``:
    "low" or "high" runs on that end of the cost model's uncertainty band (see ``simulate_band``).

    ``requests``: "frame" keeps one row per request (``RunResult.requests``); "summary" keeps none, only
    the summary, from ``StreamSummary`` (means exact, percentiles within 0.1%: offloadlab/metrics.py), in
    memory that does not grow with the run; a ``RequestStream`` workload (a million requests) needs it.
    Pass ``trace_steps=False`` too for constant memory (the step list grows with the run)."""
    wall = time.perf_counter()
    if requests not in ("frame", "summary"):
        raise ConfigError("requests", requests, "'frame' (one row per request) or 'summary' (constant memory)")
    stream = isinstance(workload, RequestStream)
    if stream and requests != "summary":
        raise ConfigError("requests", requests, "'summary' for a RequestStream (a frame would hold every request)")
    lay = layout(model, gpu, engine.tensor_parallel, engine.pipeline_parallel, engine.kv_cache_dtype)
    hw = lay.hw
    policy = policy if policy is not None else NoOffload()
    stages = _resolve(lay, policy, profile, cost_kw, corner, (1, engine.max_num_batched_tokens))
    def check_limits(r):
        if r.prompt_len + r.output_len > engine.max_model_len:
            raise ConfigError(f"request {r.id} prompt_len+output_len", r.prompt_len + r.output_len,
                              f"at most max_model_len={engine.max_model_len}")
        if not engine.chunked_prefill and r.prompt_len + r.output_len > engine.max_num_batched_tokens:
            raise ConfigError(f"request {r.id} prompt_len+output_len", r.prompt_len + r.output_len,
                              f"at most max_num_batched_tokens={engine.max_num_batched_tokens} "
                              "without chunked prefill (a preempted request is recomputed in one step)")

    if not stream:
        for r in workload.requests:  # the request's own limits first, then (below) the memory plan's
            check_limits(r)
    mem = _memory(lay, [st.placement for st in stages], engine)  # the placements just made, not made again
    pp = lay.pipeline_parallel
    v1 = engine.scheduler == "v1"
    if v1:  # V1: no watermark, block 0 is the null block (vllm/v1/core/block_pool.py)
        fits, less = (mem.kv_blocks - 1) * engine.block_size, "less V1's null block"
    else:
        fits = int(mem.kv_blocks // pp * (1 - WATERMARK)) * engine.block_size  # a virtual engine's share
        less = "less vLLM's 1% watermark"
    def check_fits(r):
        if r.prompt_len + r.output_len > fits:
            raise DoesNotFitError(
                f"request {r.id}: prompt_len+output_len={r.prompt_len + r.output_len} tokens exceed the KV cache's "
                f"{mem.kv_tokens // pp} tokens (of {pp} virtual engines' {mem.kv_tokens}) {less} "
                f"({fits}); vLLM would ignore it")

    def checked(reqs):  # a stream's requests, checked as the feed reaches them
        for r in reqs:
            check_limits(r)
            check_fits(r)
            yield r

    if not stream:
        for r in workload.requests:
            check_fits(r)
    shared: dict = {}  # stages equal but for their name and place in the pipeline share one StepModel
    sms = [shared.setdefault((st.placement, st.model.replace(name="", stage=0), st.model.has_embedding,
                              st.model.has_head), StepModel(st.placement, st.cost)) for st in stages]
    if v1 and pp > 1:
        loop = V1PipelinedServing(sms, lay.send_time, engine, mem.kv_tokens, trace_steps=trace_steps)
    elif v1:
        loop = V1ServingLoop(sms[0], engine, mem.kv_tokens, trace_steps=trace_steps)
    elif pp == 1:
        loop = ServingLoop(sms[0], engine, mem.kv_tokens, trace_steps=trace_steps)
    else:
        loop = PipelinedServing(sms, lay.send_time, engine, mem.kv_tokens, trace_steps=trace_steps)
    if requests == "summary":
        acc = StreamSummary()

        def sink(q):
            acc.add(q.req.prompt_len, q.generated, q.req.arrival, q.sent, q.first, q.finish, q.preempted)

        loop.run(checked(workload) if stream else list(workload.requests), workload.max_concurrency, sink=sink)
        reqs, summary = None, acc.summary()
    else:
        loop.run(list(workload.requests), workload.max_concurrency)
        reqs = request_columns(loop.seqs)
        summary = summarize(reqs)
    makespan = summary["makespan_s"]
    summary.update({f"util_{lane}": b / makespan for lane, b in loop.busy.items()})
    summary["bound"] = bottleneck(summary)
    summary.update(
        compute_stall_s=loop.stall,
        steps=sum(loop.n_steps.values()), **{f"{k}_steps": v for k, v in loop.n_steps.items()},
        step_sims=sum(sm.simulated for sm in shared.values()),
        simpy_events=sum(sm.events for sm in shared.values()) + events_processed(loop.env),
        wall_s=time.perf_counter() - wall,
    )
    summary["output_tok_s_per_gpu"] = summary["output_tok_s"] / lay.gpus
    placement = stages[0].placement
    config = dict(model=lay.model.name, gpu=hw.name, tensor_parallel=lay.tensor_parallel, pipeline_parallel=pp,
                  gpus=lay.gpus, policy=policy.label,
                  policy_kind=policy.kind,  # layers in host memory, all stages together:
                  offloaded_layers=sum(len(st.placement.offloaded_layers) for st in stages),
                  offloaded_bytes=placement.offloaded_bytes,  # per GPU of the first stage
                  workload=workload.name, mode=engine.mode, chunked_prefill=engine.chunked_prefill,
                  gpu_memory_utilization=engine.gpu_memory_utilization, max_num_seqs=engine.max_num_seqs,
                  max_num_batched_tokens=engine.max_num_batched_tokens, scheduler=engine.scheduler,
                  h2d_GBps=hw.h2d_bw / lay.link_share / 1e9,  # each GPU's share of its host link
                  profile=bool(profile), corner=corner or "")
    if v1:
        summary["prefix_cached_tokens"] = loop.cached_tokens
    return RunResult(summary, reqs, mem, config, loop.steps, getattr(loop, "occupancy", []))


BAND_METRICS = ("throughput_rps", "output_tok_s", "ttft_mean_s", "ttft_p99_s", "tpot_mean_s", "tpot_p99_s",
                "makespan_s")


def _summary(r: RunResult) -> dict:
    return r.summary


def _corner_task(reduce: Callable[[RunResult], Any], args: tuple, kw: dict) -> Any:
    """One corner run where an executor runs it: ``reduce(result)``. A project error it raises comes back
    through the future as itself (offloadlab/errors.py: its args rebuild it)."""
    return reduce(simulate(*args, **kw))


def start_corners(reduce: Callable[[RunResult], Any], model, gpu, policy, workload: Workload,
                  engine: EngineConfig = EngineConfig(), *, profile=None, cost_kw: dict | None = None,
                  executor: Executor | None = None) -> Callable[[], tuple[Any, Any]]:
    """Start the runs on the low- and high-cost corners of the cost model's band (``simulate(...,
    corner=c, trace_steps=False)``); the returned function waits for them and gives ``(reduce(low),
    reduce(high))``. ``executor`` (a ``concurrent.futures`` Executor): each corner is one task, run beside
    the other and beside whatever this process does until it calls the function; ``reduce`` runs where
    the corner ran (with a process pool: a module-level function, and only its value comes back); a
    corner's error is raised once both have ended (none is left running). None: both run here, one after
    the other, when the function is called. Model and GPU are resolved here, so names from a user catalog
    need not exist in the workers."""
    args = (get_model(model), get_gpu(gpu), policy, workload, engine)
    kws = [dict(profile=profile, cost_kw=cost_kw, trace_steps=False, corner=c) for c in CORNERS]
    if executor is None:
        return lambda: tuple(reduce(simulate(*args, **kw)) for kw in kws)
    futures = [executor.submit(_corner_task, reduce, args, kw) for kw in kws]

    def results() -> tuple[Any, Any]:
        wait(futures)
        return tuple(f.result() for f in futures)
    return results


def band_of(low: dict, high: dict) -> dict:
    """``{metric: (low, high)}`` for BAND_METRICS from the two corner runs' summaries, ordered low <= high."""
    return {k: tuple(sorted((low[k], high[k]))) for k in BAND_METRICS if k in low and k in high}


def start_band(model, gpu, policy, workload: Workload, engine: EngineConfig = EngineConfig(), *, profile=None,
               cost_kw: dict | None = None, executor: Executor | None = None) -> Callable[[], dict]:
    """``simulate_band`` started now (on ``executor``: see ``start_corners``), its dict when the returned
    function is called: ``pending = start_band(..., executor=pool); r = simulate(...); band = pending()``."""
    corners = start_corners(_summary, model, gpu, policy, workload, engine, profile=profile, cost_kw=cost_kw,
                            executor=executor)
    return lambda: band_of(*corners())


def simulate_band(model, gpu, policy, workload: Workload, engine: EngineConfig = EngineConfig(), *,
                  profile=None, cost_kw: dict | None = None, executor: Executor | None = None) -> dict:
    """The run on the low- and high-cost corners of its cost model's band: ``{metric: (low, high)}``
    for BAND_METRICS (ordered low <= high), i.e. the interval each metric falls in when every cost
    sits anywhere in its evidence-derived band. ``executor``: run the two corners on it, side by side."""
    return start_band(model, gpu, policy, workload, engine, profile=profile, cost_kw=cost_kw, executor=executor)()
