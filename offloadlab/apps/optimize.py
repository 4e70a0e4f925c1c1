"""A policy optimizer: the best offload policy for a model, a GPU and a workload, and why.

    from offloadlab.apps.optimize import optimize
    from offloadlab.sim import EngineConfig, longbench_multi_news

    res = optimize("llama-3.1-8b", "a100-40gb", longbench_multi_news(100),
                   EngineConfig(gpu_memory_utilization=0.8), min_kv_tokens=150_000)
    res.policy, res.vllm_flags, res.best["throughput_rps"]
    print(res.explanation)
    res.table  # every candidate: its sweep row, ``feasible`` and ``reason``

The candidates (``candidate_policies``): no offload; the prefetch layouts "last n of every g
layers" (g in 1..min(L, 16) plus L/4, L/3, L/2, L), one layout per distinct number of offloaded
layers (the smallest g, i.e. the most evenly spread), on a grid of L/32 steps plus the few smallest
counts that fit (and meet ``min_kv_tokens``), each with s in {1, 2, min(n, 4)} staging slots, at most
the offloaded layers and dividing their count (vLLM's prefetch backend, which every pick deploys as,
races otherwise: ``vllm_flags.slot_race``); vLLM's UVA and copy-path budgets at 1/8, 2/8, ..., 8/8 of the decoder-layer
bytes plus the smallest budget that fits (and meets ``min_kv_tokens``), and one layer more. About
60-130 candidates. Prefetch candidates are simulated as vLLM's prefetch backend deploys them
(``wrap=True``: the next step's first copies start as soon as slots are free, and are joined before
the LM head in steps that replay a CUDA graph, as vLLM does: sim/step.py ``join``); ``wrap=False``
searches the paper's design instead.

Each candidate is simulated with ``offloadlab.apps.sweep.sweep`` (so ``executor`` and ``cache_dir`` work as
there). A candidate is infeasible when it does not fit (its sweep row holds the error), when its KV
cache is below ``min_kv_tokens`` (known from the memory plan alone: not simulated), or when its TTFT
or TPOT p99 is above the limit. The best is the feasible candidate with the best ``objective`` (ties:
more KV cache, then fewer offloaded bytes, then candidate order; ``tolerance``, 0.5% by default, of
the best value counts as a tie).
"""
from __future__ import annotations

import typing
from dataclasses import dataclass, field
from typing import Sequence

import pandas as pd

from ..checks import check_bool, check_range, is_positive
from ..errors import ConfigError, DoesNotFitError, OffloadLabError
from ..policy import NoOffload, Policy, Prefetch, VllmCopy, VllmUva, budget_for, floor_budget, interval
from ..sim import EngineConfig, Workload, per_gpu, serving_memory, simulate_band
from ..sim import BAND_METRICS
from ..specs import GiB
from .sweep import DOES_NOT_FIT, SimConfig, sweep
from ..vllm_flags import format_vllm, slot_race

__all__ = ["MECHANISMS", "OBJECTIVES", "NoFeasiblePolicyError", "OptimizeResult", "bound_reason", "candidate_policies",
           "optimize"]

MECHANISMS = ("prefetch", "uva", "vllm")
# objective column -> True when more is better
OBJECTIVES = {"throughput_rps": True, "output_tok_s": True, "total_tok_s": True, "output_tok_s_per_gpu": True,
              "mem_kv_tokens": True, "ttft_mean_s": False, "ttft_p99_s": False, "tpot_mean_s": False,
              "tpot_p99_s": False, "e2e_mean_s": False, "e2e_p99_s": False}
_BUDGET_FRACTIONS = tuple(i / 8 for i in range(1, 9))
_PREFETCH_STEPS = 32  # prefetch offloaded-layer counts on a grid of L/32


class NoFeasiblePolicyError(OffloadLabError):
    """Some candidates fit, but none meets the constraints; ``table`` holds every candidate's row."""

    def __init__(self, message: str, table: pd.DataFrame):
        super().__init__(message, table)
        self.message, self.table = message, table

    def __str__(self) -> str:
        return self.message


# ------------------------------------------------------------------------------------------------
# Candidates
# ------------------------------------------------------------------------------------------------
def _memory_ok(model, gpu, policy, engine, min_kv_tokens) -> bool:
    try:
        mem = serving_memory(model, gpu, policy, engine)
    except DoesNotFitError:
        return False
    return min_kv_tokens is None or mem.kv_tokens >= min_kv_tokens


def _smallest_budget(model, gpu, engine, kind, total_gib: float, min_kv_tokens) -> float | None:
    """The smallest budget (0.01 GiB steps) with which ``kind`` fits and meets min_kv_tokens; None when
    no offload already does, or no budget does. Scans 1/32 steps first (pinned host memory can fail at
    large budgets), then bisects inside the first step that works."""
    if _memory_ok(model, gpu, NoOffload(), engine, min_kv_tokens):
        return None
    grid = [floor_budget(total_gib * i / 32) for i in range(33)]
    lo = None
    for a, b in zip(grid, grid[1:]):
        if b > 0 and _memory_ok(model, gpu, kind(b), engine, min_kv_tokens):
            lo, hi = a, b
            break
    if lo is None:
        return None
    while hi - lo > 0.011:
        mid = round((lo + hi) / 2, 2)
        if mid <= 0 or not _memory_ok(model, gpu, kind(mid), engine, min_kv_tokens):
            lo = mid
        else:
            hi = mid
    return hi


def candidate_policies(model, gpu, engine: EngineConfig = EngineConfig(), *, mechanisms: Sequence[str] = MECHANISMS,
                       min_kv_tokens: int | None = None, wrap: bool = True) -> list[Policy]:
    """The candidate set the optimizer searches (see the module docstring); NoOffload first."""
    mechanisms = _check_mechanisms(mechanisms)
    shard = per_gpu(model, gpu, engine.tensor_parallel, engine.pipeline_parallel)  # vLLM's budgets are per GPU
    L = shard.layers
    out: list[Policy] = [NoOffload()]
    if "prefetch" in mechanisms:
        groups = sorted(set(range(1, min(L, 16) + 1)) | {g for g in (L // 4, L // 3, L // 2, L) if 16 < g <= L})
        layout: dict[int, tuple[int, int]] = {}  # offloaded layers -> (g, n), the smallest g
        for g in groups:
            for n in range(1, g + 1):
                layout.setdefault(Prefetch(g, n).offloaded_count(L), (g, n))
        counts = sorted(layout)
        fits = [c for c in counts
                if _memory_ok(model, gpu, Prefetch(*layout[c], slots=1), engine, min_kv_tokens)]
        keep = {min(counts, key=lambda c: (abs(c - L * i / _PREFETCH_STEPS), c)) for i in range(1, _PREFETCH_STEPS + 1)}
        if fits:
            first = counts.index(fits[0])
            keep |= set(counts[first:first + 3])
        for c in sorted(keep):
            g, n = layout[c]
            for s in sorted({1, 2, min(n, 4)}):
                # every pick deploys as vLLM's prefetch backend, which races when s does not divide
                # the offloaded count (vllm_flags.slot_race): never propose such a deployment
                if s <= c and slot_race(Prefetch(g, n, s), L) is None:
                    out.append(Prefetch(g, n, s, wrap=wrap))
    total_gib = L * sum(shard.layer_param_bytes) / GiB
    layer_gib = sum(shard.layer_param_bytes) / GiB
    for mech, kind in (("uva", VllmUva), ("vllm", VllmCopy)):
        if mech not in mechanisms:
            continue
        budgets = {floor_budget(total_gib * f) for f in _BUDGET_FRACTIONS}
        least = _smallest_budget(model, gpu, engine, kind, total_gib, min_kv_tokens)
        if least is not None:
            budgets |= {least, min(floor_budget(total_gib), round(least + layer_gib, 2))}
        out += [kind(b) for b in sorted(budgets) if b > 0]
    return out


def _check_mechanisms(mechanisms) -> tuple[str, ...]:
    if isinstance(mechanisms, str):
        mechanisms = tuple(m for m in mechanisms.split(",") if m.strip())
    mechanisms = tuple(m.strip() for m in mechanisms)
    bad = [m for m in mechanisms if m not in MECHANISMS]
    if bad or not mechanisms:
        raise ConfigError("mechanisms", bad[0] if bad else mechanisms, f"one or more of {', '.join(MECHANISMS)}")
    return mechanisms


# ------------------------------------------------------------------------------------------------
# Result
# ------------------------------------------------------------------------------------------------
@dataclass
class OptimizeResult:
    """The search: every candidate's row, the best one, how to deploy it and why it wins."""

    table: pd.DataFrame  # one row per candidate, best first: sweep columns + feasible, reason, vllm_flags
    best: pd.Series
    policy: Policy
    vllm_flags: str
    explanation: str
    objective: str
    references: pd.DataFrame = field(default_factory=pd.DataFrame)  # paper k=2, vLLM copy of the same bytes
    candidates: list = field(default_factory=list, repr=False)  # Policy per table["candidate"]

    @property
    def feasible(self) -> pd.DataFrame:
        return self.table[self.table["feasible"]]

    def top(self, n: int = 10) -> pd.DataFrame:
        return self.feasible.head(n)


def _check_limit(name: str, v, integer: bool = False):
    if v is None:
        return None
    if not is_positive(v) or (integer and v != int(v)):
        raise ConfigError(name, v, "a positive integer" if integer else "a positive number of seconds")
    return int(v) if integer else float(v)


def _secs(v: float) -> str:
    return f"{v * 1e3:.3g} ms" if v < 1 else f"{v:.3g} s" if v < 100 else f"{v:,.0f} s"


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b > 0 else "n/a"


def bound_reason(row) -> str:
    """What limits a simulated run, in words, from its sweep row (``bound`` and the lane utilizations)."""
    link, comp, host = row["util_link"], row["util_compute"], row["util_host"]
    bound = row["bound"]
    if bound == "copy-bound":
        gpu = {"uva": "its kernels reading the weights over it",
               "vllm": f"the compute stream busy {comp:.0%} of the time, the copies on it included"
               }.get(row["policy_kind"], f"the GPU computing {comp:.0%}")
        if row["policy_kind"] == "uva":  # reads grow with the step's tokens (sim/costs.py uva_read)
            why = (f"It is copy-bound: the host link is busy {link:.0%} of the run ({gpu}), and the kernels read "
                   "each offloaded weight again for every M-tile of a step (64 tokens unless calibrated), so bigger "
                   "batches and prefill chunks cost more link time, not less: what wins is few bytes offloaded.")
        else:
            why = (f"It is copy-bound: the host link is busy {link:.0%} of the run ({gpu}), so the time goes to "
                   "moving weights and a step costs about the same whatever its batch: what wins is the fewest "
                   "bytes copied per generated token (few bytes offloaded, or a KV cache big enough for large "
                   "batches).")
    elif bound == "launch-bound":
        why = (f"It is launch-bound: the host launching kernels is busy {host:.0%} of the run against {comp:.0%} for "
               f"the GPU (link {link:.0%}); copies are not the limit.")
    elif row["offloaded_bytes"] == 0:
        why = f"It is compute-bound: the GPU computes {comp:.0%} of the run, and nothing is copied."
    elif row["policy_kind"] == "uva":
        why = (f"It is compute-bound ({comp:.0%}), but its kernels read the offloaded weights over the host link in "
               f"every pass, once per M-tile of a step (zero-copy, link busy {link:.0%}): that reading is part "
               "of the compute time.")
    else:
        why = (f"It is compute-bound: the GPU computes {comp:.0%} of the run and the link is busy only {link:.0%}, so "
               "the copies hide behind compute.")
    return why


def _explain(best: pd.Series, objective: str, refs: dict[str, pd.Series | str], none_row: pd.Series | None,
             n_feasible: int, n_total: int, reasons: dict[str, int]) -> str:
    tp = best["throughput_rps"]
    lines = [f"Best of {n_feasible} feasible candidates (of {n_total}) by {objective}: {best['policy']}, "
             f"{tp:.3g} req/s, {best['output_tok_s']:,.0f} output tok/s, TTFT p99 {_secs(best['ttft_p99_s'])}"
             + (f", TPOT p99 {_secs(best['tpot_p99_s'])}" if pd.notna(best.get("tpot_p99_s")) else "")
             + f"; {int(best['offloaded_layers'])} layers in host memory ({best['offloaded_bytes'] / GiB:.2f} GiB per GPU)."]
    lines.append(bound_reason(best))
    for name, ref in refs.items():
        if isinstance(ref, str):
            lines.append(f"{name}: {ref}.")
        elif ref["policy"] == best["policy"]:
            lines.append(f"{name} ({ref['policy']}) is the best itself.")
        else:
            lines.append(f"Against {name} ({ref['policy']}, {ref['throughput_rps']:.3g} req/s, {ref['bound']}): "
                         f"{_ratio(tp, ref['throughput_rps'])} the throughput, TTFT p99 "
                         f"{_ratio(best['ttft_p99_s'], ref['ttft_p99_s'])}"
                         + (f", TPOT p99 {_ratio(best['tpot_p99_s'], ref['tpot_p99_s'])}"
                            if pd.notna(best.get("tpot_p99_s")) and pd.notna(ref.get("tpot_p99_s")) else "")
                         + f"; KV cache {int(best['mem_kv_tokens']):,} vs {int(ref['mem_kv_tokens']):,} tokens.")
    kv = f"It leaves {best['mem_kv_cache'] / GiB:.2f} GiB for the KV cache ({int(best['mem_kv_tokens']):,} tokens)"
    if best["policy_kind"] == "none":
        kv += ", offloading nothing: no copies to wait for"
    elif none_row is None:
        kv += "; no offload was not searched"
    elif isinstance(none_row["error"], str):
        kv += "; the model does not fit without offload"
    elif pd.isna(none_row.get("throughput_rps")):
        kv += (f" against {none_row['mem_kv_cache'] / GiB:.2f} GiB ({int(none_row['mem_kv_tokens']):,} tokens) "
               "without offload, below the KV cache asked for")
    else:
        kv += (f" against {none_row['mem_kv_cache'] / GiB:.2f} GiB ({int(none_row['mem_kv_tokens']):,} tokens) "
               f"without offload ({none_row['throughput_rps']:.3g} req/s)")
    lines.append(kv + ".")
    if reasons:
        lines.append("Infeasible: " + "; ".join(f"{k}: {v}" for k, v in reasons.items()) + ".")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# Search
# ------------------------------------------------------------------------------------------------
BAND_RIVALS = 4  # next-best feasible candidates whose bands are compared with the choice's


def _band_note(df: pd.DataFrame, pols, objective: str, model, gpu, workload, engine, profile) -> str:
    """Which of the next best feasible candidates have ``objective`` bands overlapping the choice's."""
    ok = df[df["feasible"]].head(1 + BAND_RIVALS)
    bands = {int(r["candidate"]): simulate_band(model, gpu, pols[int(r["candidate"])], workload, engine,
                                                profile=profile)[objective] for _, r in ok.iterrows()}
    first = int(ok.iloc[0]["candidate"])
    lo, hi = bands[first]
    tied = [f"{pols[c].label} ({b[0]:.3g}-{b[1]:.3g})" for c, b in bands.items()
            if c != first and b[0] <= hi and lo <= b[1]]
    head = f"Band of {objective} (costs at the low / high end of their evidence): {lo:.3g}-{hi:.3g}. "
    if not tied:
        return head + f"None of the next {len(bands) - 1} best overlaps it: the choice holds within the costs' uncertainty."
    return head + ("Within each other's bands (the costs cannot tell them apart; the pick follows the tie rule): "
                   + ", ".join(tied) + ".")


# Why a candidate is infeasible (the ``infeasible`` column; ``reason`` says it in words)
_INFEASIBLE = {DOES_NOT_FIT: "does not fit", "min_kv_tokens": "KV cache below min_kv_tokens",
               "ttft": "TTFT p99 over the limit", "tpot": "TPOT p99 over the limit", "failed": "failed"}
_SHORT = {DOES_NOT_FIT: "does not", "min_kv_tokens": "KV cache", "ttft": "TTFT p99", "tpot": "TPOT p99",
          "failed": "failed"}  # in NoFeasiblePolicyError's counts


@dataclass(frozen=True)
class _Limits:
    min_kv_tokens: int | None = None
    max_ttft_p99_s: float | None = None
    max_tpot_p99_s: float | None = None


def optimize(model, gpu, workload: Workload, engine: EngineConfig = EngineConfig(), *,
             objective: str = "throughput_rps", min_kv_tokens: int | None = None,
             max_ttft_p99_s: float | None = None, max_tpot_p99_s: float | None = None,
             mechanisms: Sequence[str] = MECHANISMS, executor="serial", cache_dir=None, profile=None,
             candidates: Sequence[Policy] | None = None, wrap: bool = True, tolerance: float = 0.005,
             progress: bool = False, band: bool = False) -> OptimizeResult:
    """Search offload policies for the best ``objective`` under the constraints; see the module docstring.

    ``candidates``: an explicit list of policies instead of ``candidate_policies(...)``. ``tolerance``:
    candidates within this fraction of the best objective value count as tied (the simulator's step
    costs are binned to 0.2%), and the tie goes to more KV cache, then fewer offloaded bytes.
    ``band``: also simulate the choice and the next best few on the low- and high-cost corners of
    their cost models' bands and say which are within each other's bands (the costs cannot tell
    them apart; the pick among them stays the tie rule's within ``tolerance``).
    Raises DoesNotFitError when no candidate fits at all, NoFeasiblePolicyError when some fit but none
    meets the constraints.

    Four steps: the candidates, each evaluated (simulated, or screened out by its memory plan), ranked,
    and the best explained against references.
    """
    if objective not in OBJECTIVES:
        raise ConfigError("objective", objective, "one of " + ", ".join(OBJECTIVES))
    limits = _Limits(_check_limit("min_kv_tokens", min_kv_tokens, integer=True),
                     _check_limit("max_ttft_p99_s", max_ttft_p99_s), _check_limit("max_tpot_p99_s", max_tpot_p99_s))
    if not isinstance(engine, EngineConfig):
        raise ConfigError("engine", engine, "an EngineConfig")
    if not isinstance(workload, Workload):
        raise ConfigError("workload", workload, "a Workload (e.g. offloadlab.sim.longbench_multi_news(100))")
    check_range("tolerance", tolerance, 0, 1, "a fraction in [0, 1)", high_open=True)
    check_bool("wrap", wrap)
    base = SimConfig(model=model, gpu=gpu, engine=engine, profile=profile)  # bad names fail here
    model, gpu = base.model_spec, base.hardware

    pols = _candidates(model, gpu, engine, candidates, mechanisms, limits.min_kv_tokens, wrap)
    df = _evaluate(base, pols, workload, limits, executor, cache_dir, progress)
    _check_some_fit(df, pols, per_gpu(model, gpu, engine.tensor_parallel, engine.pipeline_parallel), base)
    df = _rank(df, objective, tolerance)
    best = df.iloc[0]
    policy = pols[int(best["candidate"])]
    refs, ref_rows = _references(best, policy, base, workload, cache_dir)
    none_rows = df[df["policy_kind"] == "none"]
    reasons: dict[str, int] = {}  # infeasible candidates by kind, in ranked order of first appearance
    for kind in df["infeasible"].dropna():
        reasons[_INFEASIBLE[kind]] = reasons.get(_INFEASIBLE[kind], 0) + 1
    text = _explain(best, objective, ref_rows, none_rows.iloc[0] if len(none_rows) else None,
                    int(df["feasible"].sum()), len(df), reasons)
    if band and objective in BAND_METRICS:
        text += "\n" + _band_note(df, pols, objective, model, gpu, workload, engine, base.profile_obj())
    return OptimizeResult(table=df, best=best, policy=policy, vllm_flags=format_vllm(policy, engine), explanation=text,
                          objective=objective, references=refs, candidates=pols)


def _candidates(model, gpu, engine, candidates, mechanisms, min_kv_tokens, wrap) -> list[Policy]:
    """``candidate_policies``, or the caller's list, checked."""
    if candidates is None:
        return candidate_policies(model, gpu, engine, mechanisms=mechanisms, min_kv_tokens=min_kv_tokens, wrap=wrap)
    pols = list(candidates)
    kinds = typing.get_args(Policy)
    for i, p in enumerate(pols):
        if not isinstance(p, kinds):
            raise ConfigError(f"candidates[{i}]", p, "a Policy")
    if not pols:
        raise ConfigError("candidates", pols, "at least one Policy")
    return pols


def _evaluate(base: SimConfig, pols: list[Policy], workload: Workload, limits: _Limits, executor, cache_dir,
              progress: bool) -> pd.DataFrame:
    """One row per candidate, in candidate order: its sweep row (or, when its memory plan alone leaves
    less KV cache than min_kv_tokens, just that plan: not simulated), ``infeasible`` (None or why,
    typed: the sweep's error_kind, or the limit it breaks), ``feasible``, ``reason`` and ``vllm_flags``."""
    model, gpu, engine = base.model_spec, base.hardware, base.engine
    configs = [base.replace(policy=p) for p in pols]
    screened: dict[int, tuple[int, float]] = {}  # candidate -> (KV tokens, KV bytes) below min_kv_tokens
    if limits.min_kv_tokens is not None:
        for i, p in enumerate(pols):
            try:
                mem = serving_memory(model, gpu, p, engine)
            except DoesNotFitError:
                continue  # the sweep reports it
            if mem.kv_tokens < limits.min_kv_tokens:
                screened[i] = (mem.kv_tokens, mem.kv_cache)
    run = [i for i in range(len(pols)) if i not in screened]
    df = sweep([configs[i] for i in run], workload, executor=executor, cache_dir=cache_dir, progress=progress)
    df.index = run
    if screened:
        extra = pd.DataFrame([{**configs[i].inputs(), "workload": workload.name, "mem_kv_tokens": kv,
                               "mem_kv_cache": kv_bytes, "error": None, "error_kind": None}
                              for i, (kv, kv_bytes) in screened.items()], index=list(screened))
        df = pd.concat([df, extra]) if len(df) else extra
    df = df.sort_index()
    df.insert(0, "candidate", df.index)
    why = [_why_infeasible(i, r, screened, limits) for i, r in df.iterrows()]
    df["infeasible"] = pd.Series([w[0] for w in why], index=df.index, dtype=object)
    df["feasible"] = df["infeasible"].isna()
    df["reason"] = pd.Series([w[1] for w in why], index=df.index, dtype=object)
    df["vllm_flags"] = [format_vllm(pols[i], engine) for i in df.index]
    return df


def _why_infeasible(i: int, r: pd.Series, screened: dict, limits: _Limits) -> tuple[str | None, str | None]:
    """(kind, words) of what makes candidate ``i`` infeasible, or (None, None)."""
    if isinstance(r["error"], str):
        if r["error_kind"] == DOES_NOT_FIT:
            return DOES_NOT_FIT, "does not fit: " + r["error"].split(": ", 1)[-1]
        return "failed", r["error"]
    if i in screened:
        return "min_kv_tokens", f"KV cache {int(screened[i][0]):,} tokens < min_kv_tokens {limits.min_kv_tokens:,}"
    if limits.max_ttft_p99_s is not None and not r["ttft_p99_s"] <= limits.max_ttft_p99_s:
        return "ttft", f"TTFT p99 {r['ttft_p99_s']:.3g} s > {limits.max_ttft_p99_s:g} s"
    if limits.max_tpot_p99_s is not None and not r["tpot_p99_s"] <= limits.max_tpot_p99_s:
        return "tpot", f"TPOT p99 {r['tpot_p99_s'] * 1e3:.3g} ms > {limits.max_tpot_p99_s * 1e3:g} ms"
    return None, None


def _check_some_fit(df: pd.DataFrame, pols: list[Policy], shard, base: SimConfig) -> None:
    """No candidate ran: DoesNotFitError (naming what the most offload lacks), or the first other error;
    some ran but none is feasible: NoFeasiblePolicyError with the reasons counted."""
    fits = df[~df["error"].map(lambda e: isinstance(e, str))]
    if not len(fits):
        other = df[df["error_kind"] != DOES_NOT_FIT]
        if len(other):
            raise OffloadLabError(f"no candidate policy ran: {other['error'].iloc[0]}")
        model, gpu, engine = base.model_spec, base.hardware, base.engine
        most = max(range(len(pols)), key=lambda i: pols[i].place(shard).offloaded_bytes)
        raise DoesNotFitError(
            f"{model.name} does not fit on {gpu.name} (tensor_parallel={engine.tensor_parallel}, "
            f"pipeline_parallel={engine.pipeline_parallel}, "
            f"gpu_memory_utilization={engine.gpu_memory_utilization}) with any of {len(pols)} candidate policies; "
            f"offloading the most ({pols[most].label}): {df.loc[most, 'reason'].removeprefix('does not fit: ')}")
    if not df["feasible"].any():
        counts = df["infeasible"].dropna().map(_SHORT).value_counts()
        raise NoFeasiblePolicyError(
            f"no candidate meets the constraints ({len(fits)} of {len(df)} fit; "
            + ", ".join(f"{c} by {k}" for k, c in counts.items()) + ")", df)


def _rank(df: pd.DataFrame, objective: str, tolerance: float) -> pd.DataFrame:
    """Best first: feasible ones, those within ``tolerance`` of the best ``objective`` value by more KV
    cache then fewer offloaded bytes, the rest by the objective; then candidate order."""
    more_better = OBJECTIVES[objective]
    score = pd.to_numeric(df[objective], errors="coerce")
    top = score[df["feasible"]].max() if more_better else score[df["feasible"]].min()
    near = df["feasible"] & ((score >= top - tolerance * abs(top)) if more_better
                             else (score <= top + tolerance * abs(top)))
    order = pd.DataFrame({"f": ~df["feasible"], "near": ~near, "kv": -pd.to_numeric(df["mem_kv_tokens"], errors="coerce"),
                          "b": pd.to_numeric(df["offloaded_bytes"], errors="coerce"),
                          "s": -score if more_better else score, "i": df.index})
    order.loc[~near, ["kv", "b"]] = 0  # outside the tolerance: by the objective alone
    return df.loc[order.sort_values(["f", "near", "kv", "b", "s", "i"], na_position="last").index].reset_index(drop=True)


def _references(best: pd.Series, policy: Policy, base: SimConfig, workload: Workload, cache_dir
                ) -> tuple[pd.DataFrame, dict[str, pd.Series | str]]:
    """The paper's interval k=2 (2 slots) and vLLM's copy path of the same bytes as the best (as k=2's
    when the best offloads nothing), simulated: their rows, and per name the row or why it does not run."""
    engine = base.engine
    shard = per_gpu(base.model_spec, base.hardware, engine.tensor_parallel, engine.pipeline_parallel)
    k2 = interval(2, 2)
    same = policy if int(best["offloaded_bytes"]) > 0 else k2
    ref_pols = {"the paper's interval k=2, 2 buffers": k2,
                "vLLM's copy path of the same bytes" + ("" if same is policy else " as k=2"):
                    VllmCopy(policy.cpu_offload_gb, policy.params) if isinstance(policy, (VllmCopy, VllmUva))
                    else VllmCopy(budget_for(same.place(shard).offloaded_bytes))}
    refs = sweep([base.replace(policy=p) for p in ref_pols.values()], workload, executor="serial",
                 cache_dir=cache_dir, progress=False)
    refs.insert(0, "reference", list(ref_pols))
    rows: dict[str, pd.Series | str] = {}
    for name, (_, r) in zip(ref_pols, refs.iterrows()):
        rows[name] = r if r["error"] is None else \
            f"{r['policy']} does not run ({r['error'].removeprefix('DoesNotFitError: ').split('; ')[0]})"
    return refs, rows
