"""The ``offloadlab`` command line: paper, run, compare, optimize, step, memory, validate, bench, list.

Bad input ends with one line on stderr (``offloadlab: error: ...``) and exit status 2.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import ConfigError, OffloadLabError
from .outputs import OutputSet, PipeSafeStdout
from ..vllm_flags import KV_CACHE_DTYPES
from ..specs import GiB

if TYPE_CHECKING:  # pandas (0.3 s to import) only in the commands that build tables
    import pandas as pd


def _common(p: argparse.ArgumentParser, policy: bool = True) -> None:
    p.add_argument("--model", default="llama-3.1-8b",
                   help="catalog name (see `offloadlab list`), or a Hugging Face config.json (or its directory)")
    p.add_argument("--gpu", default="A100-SXM4-40GB", help="catalog name or alias (see `offloadlab list`)")
    if policy:
        p.add_argument("--policy",
                       help="none | vllm:GIB | uva:GIB | interval:K[,BUFFERS] | prefetch:G,N,S (default interval:2)")
        p.add_argument("--vllm", metavar="FLAGS",
                       help="a vLLM command line's offload flags instead of --policy, e.g. "
                            "'--cpu-offload-gb 8 --offload-backend prefetch --offload-group-size 4'")
    _profile_arg(p)
    _catalog_args(p)


def _profile_arg(p: argparse.ArgumentParser, what: str = "calibrated costs instead of the datasheet roofline") -> None:
    p.add_argument("--profile", action="append", metavar="PATH",
                   help=f"a Profile or probe JSON file, or Vidur's profiling CSVs (a directory): {what}; repeatable "
                        "(each cost from the source nearest the target: same GPU, then same model); measured "
                        "elsewhere, it is transferred by efficiency")


def _say_profile(a, model) -> None:
    """The one line every command with --profile prints: what it transferred from what."""
    if a.profile:
        from ..sim import describe_profile

        print("profile: " + describe_profile(model, a.gpu, a.profiles, getattr(a, "tensor_parallel", 1) or 1,
                                             getattr(a, "pipeline_parallel", 1) or 1))


def _catalog_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kv-cache-dtype", choices=KV_CACHE_DTYPES,
                   help="as vLLM's: auto keeps the model's (bf16), fp8 stores one byte per KV element")
    p.add_argument("--catalog", help="a YAML/JSON file adding models and GPUs")


def _sweep_args(p: argparse.ArgumentParser, csv_help: str) -> None:
    p.add_argument("--jobs", type=int, default=1, help="processes (default 1: serial)")
    p.add_argument("--cache-dir", help="cache each simulated candidate here (see offloadlab.apps.sweep)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--csv", help=csv_help)


def _warn_slot_race(policy, model, eng) -> None:
    """A note on stderr when vLLM's prefetch backend would race on this deployment (vllm_flags.slot_race)."""
    from ..catalog import get_model
    from ..vllm_flags import slot_race

    m = get_model(model) if isinstance(model, str) else model
    why = next((w for st in m.stages(eng.pipeline_parallel) if (w := slot_race(policy, st.layers))), None)
    if why:
        print(f"note: {policy.label}: {why}", file=sys.stderr)


def _executor(a):
    return "serial" if a.jobs == 1 else a.jobs


def _model(a, name: str | None = None):
    """The model (``--model``, or ``name``: a catalog name or a Hugging Face config.json), with an fp8 KV
    cache when --kv-cache-dtype asks for one."""
    from ..hf_config import model_from_arg

    m = model_from_arg(name or a.model)
    return m.with_kv_cache_dtype(a.kv_cache_dtype)


# Engine settings: default None here, so that EngineConfig holds the defaults and a --vllm command
# line can set them (``_settle_engine``); the flag each is set by, for messages.
ENGINE_FLAGS = {"gpu_memory_utilization": "--gpu-memory-utilization", "max_num_seqs": "--max-num-seqs",
                "max_num_batched_tokens": "--max-num-batched-tokens", "max_model_len": "--max-model-len",
                "chunked_prefill": "--chunked-prefill", "tensor_parallel": "--tensor-parallel-size",
                "pipeline_parallel": "--pipeline-parallel-size", "kv_cache_dtype": "--kv-cache-dtype"}


def _engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--gpu-memory-utilization", type=float, help="default 0.9")
    p.add_argument("--max-num-seqs", type=int, help="default 256")
    p.add_argument("--max-num-batched-tokens", type=int, help="default 8192")
    p.add_argument("--max-model-len", type=int, help="default 8192")
    p.add_argument("--chunked-prefill", action="store_true", default=None)
    _parallel_args(p)
    p.add_argument("--mode", choices=["prefill+decode", "prefill-only"], default="prefill+decode")


def _vllm_version_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--vllm-version", help="serve as that vLLM version does: V0 (< 0.8) or V1 (chunked prefill, prefix "
                                          "caching, its defaults for unset engine flags on this GPU)")
    p.add_argument("--entry-point", choices=["serve", "llm"],
                   help="with --vllm-version: whose batch defaults apply, `vllm serve`'s (the default) or the "
                        "offline LLM(...) class's (vllm/engine/arg_utils.py: larger token budgets)")


def _parallel_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tensor-parallel-size", "-tp", type=int, dest="tensor_parallel", help="default 1")
    p.add_argument("--pipeline-parallel-size", "-pp", type=int, dest="pipeline_parallel", help="default 1")


def _settle_engine(a) -> None:
    """Fill the engine settings: this command line's, else the --vllm command line's (a vLLM deployment
    brings its -tp, --max-model-len, ...), else EngineConfig's defaults; the two disagreeing is an error."""
    if not any(hasattr(a, k) for k in ENGINE_FLAGS) and getattr(a, "vllm", None) is None:
        return  # a command without engine settings (list, validate, bench): the simulator is not imported
    import dataclasses

    from ..sim import EngineConfig
    from ..vllm_flags import engine_from_vllm, unmodelled_flags

    lines = a.vllm if isinstance(getattr(a, "vllm", None), list) else [a.vllm] if getattr(a, "vllm", None) else []
    if getattr(a, "vllm", None) is not None and not isinstance(a.vllm, list) and getattr(a, "policy", None) is not None:
        raise ConfigError("--policy", a.policy, "no --policy together with --vllm (the --vllm line gives the policy)")
    theirs: dict = {}
    for line in lines:
        if unmodelled := unmodelled_flags(line):
            print(f"note: --vllm flags not modelled, no effect on the simulation: {', '.join(unmodelled)}",
                  file=sys.stderr)
        for k, v in engine_from_vllm(line).items():
            if theirs.setdefault(k, v) != v:
                raise ConfigError(f"--vllm {ENGINE_FLAGS.get(k, k)}", v, f"the same in every --vllm line ({theirs[k]})")
    defaults = {f.name: f.default for f in dataclasses.fields(EngineConfig)}
    a.engine_given = {}  # the settings given on a command line (a --vllm-version fills the rest its way)
    for k, flag in ENGINE_FLAGS.items():
        if not hasattr(a, k):
            continue
        mine, vllm = getattr(a, k), theirs.get(k)
        if mine is not None and vllm is not None and mine != vllm:
            raise ConfigError(flag, mine, f"what the --vllm command line says ({vllm}), or one of the two left out")
        given = mine if mine is not None else vllm
        if given is not None:
            a.engine_given[k] = given
        setattr(a, k, given if given is not None else defaults[k])
    a.block_size = theirs.get("block_size", defaults["block_size"])
    if "block_size" in theirs:
        a.engine_given["block_size"] = a.block_size


def _workload_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workload", default="multi_news",
                   help="sharegpt (real, sampled as vLLM's benchmark does), multi_news, a workloads.csv fit "
                        "(e.g. sharegpt_8k), a CSV/JSONL file, a vLLM --save-result JSON or a serving-run directory")
    p.add_argument("--requests", type=int, default=None)
    p.add_argument("--rate", type=float, default=None,
                   help="requests/s as vllm bench serve's --request-rate (inf: all at once); default all at t=0")
    p.add_argument("--burstiness", type=float, default=1.0,
                   help="gamma shape of --rate's gaps as vLLM's: 1 Poisson (default), <1 burstier, >1 more even")
    p.add_argument("--max-concurrency", type=int, default=None,
                   help="client-side limit: a request is sent only while fewer than N are outstanding")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tokenizer", default=None,
                   help="sharegpt: tokenizer family (llama3, qwen); default from the model's name")
    p.add_argument("--sharegpt-output-len", type=int, default=None, help="sharegpt: fixed output length, as vLLM's")
    p.add_argument("--sharegpt-source", default="auto", choices=["auto", "dataset", "table"],
                   help="sharegpt: the dataset packages (auto when installed) or the committed Llama-3 table")


def _policy(a):
    if a.vllm is not None:
        from ..vllm_flags import policy_from_vllm

        return policy_from_vllm(a.vllm)
    from ..policy import parse_policy

    return parse_policy("interval:2" if a.policy is None else a.policy)


def _workload(a):
    from ..sim import make_workload

    kw = {}
    if str(a.workload).strip().lower() == "sharegpt":
        from ..sim import sharegpt

        tok = a.tokenizer
        if tok is None:
            models = a.model if isinstance(a.model, list) else [a.model or "llama-3.1-8b"]
            families = {sharegpt.tokenizer_for_model(m) for m in models}
            if len(families) > 1:
                raise ConfigError("tokenizer", None, f"one family for all models (found {sorted(families)}): pass "
                                  "--tokenizer")
            tok = families.pop()
        kw = dict(tokenizer=tok, source=a.sharegpt_source)
        if a.sharegpt_output_len is not None:
            kw["output_len"] = a.sharegpt_output_len
    elif a.tokenizer is not None or a.sharegpt_output_len is not None or a.sharegpt_source != "auto":
        raise ConfigError("workload", a.workload, "sharegpt when --tokenizer or --sharegpt-* options are given")
    wl = make_workload(a.workload, n=a.requests, seed=a.seed, rate=a.rate, burstiness=a.burstiness,
                       max_concurrency=a.max_concurrency, **kw)
    if kw:
        print(f"sharegpt: lengths from {sharegpt.load_lengths(kw['tokenizer'], kw['source']).source}")
    wl, changed = wl.clipped(a.max_model_len)
    if changed:
        print(f"note: {changed} of {wl.n} requests shortened to fit --max-model-len {a.max_model_len}")
    return wl


def _engine(a):
    """The EngineConfig of the command line; with --vllm-version, that version's engine (V0 or V1) and
    defaults for what the command line leaves unset (the CUDA-graph settings go to ``a.cost_kw``)."""
    from ..sim import EngineConfig

    if getattr(a, "vllm_version", None):
        from ..catalog import get_gpu
        from ..sim.vllm_engine import vllm_engine

        eng, a.cost_kw = vllm_engine(a.vllm_version, get_gpu(a.gpu), _model(a), mode=a.mode,
                                     entry_point=getattr(a, "entry_point", None) or "serve", **a.engine_given)
        return eng
    if getattr(a, "entry_point", None):
        raise ConfigError("--entry-point", a.entry_point, "--vllm-version too (entry points differ in that "
                          "version's defaults)")
    return EngineConfig(gpu_memory_utilization=a.gpu_memory_utilization, max_num_seqs=a.max_num_seqs,
                        max_num_batched_tokens=a.max_num_batched_tokens, max_model_len=a.max_model_len,
                        chunked_prefill=a.chunked_prefill, mode=a.mode, tensor_parallel=a.tensor_parallel,
                        pipeline_parallel=a.pipeline_parallel, block_size=a.block_size,
                        kv_cache_dtype=a.kv_cache_dtype)


RESULT_COLUMNS = {"mode": "mode", "policy": "policy", "offloaded_layers": "offl.layers",
                  "throughput_rps": "req/s", "output_tok_s": "out tok/s", "ttft_mean_s": "TTFT mean s",
                  "ttft_p99_s": "TTFT p99 s", "tpot_mean_s": "TPOT mean ms", "tpot_p99_s": "TPOT p99 ms",
                  "mem_kv_tokens": "KV tokens", "preemptions": "preempt", "util_compute": "compute util",
                  "util_link": "link util", "bound": "bound"}
BANDS = (("throughput_rps", "req/s band", 1), ("tpot_mean_s", "TPOT ms band", 1e3))  # printed beside the value


def _fmt_results(rows) -> str:
    """Result rows (``simulate(...).row()``s, or a DataFrame of them) as the commands print them: TPOT in ms,
    a band column after its value's when the rows have ``{metric}_lo`` / ``_hi``."""
    from .tables import format_table

    if hasattr(rows, "to_dict"):
        rows = rows.to_dict("records")
    cols, out = {}, []  # a band's column after its value's (format_table leaves out what no row has)
    for c, label in RESULT_COLUMNS.items():
        cols[c] = label
        cols.update({band: band for metric, band, _ in BANDS if metric == c})
    for r in rows:
        t = {c: r[c] for c in RESULT_COLUMNS if c in r}
        for c in ("tpot_mean_s", "tpot_p99_s"):
            if c in t:
                t[c] = t[c] * 1e3
        for metric, band, scale in BANDS:
            if f"{metric}_lo" in r:
                t[band] = _band_text(r[f"{metric}_lo"] * scale, r[f"{metric}_hi"] * scale)
        out.append(t)
    return format_table(out, cols, float_format=lambda v: f"{v:,.3g}" if abs(v) < 100 else f"{v:,.0f}")


def _band_text(lo: float, hi: float) -> str:
    from .tables import missing

    if missing(lo) or missing(hi):
        return "-"
    f = (lambda v: f"{v:,.3g}") if max(abs(lo), abs(hi)) < 100 else (lambda v: f"{v:,.0f}")
    return f"{f(lo)}-{f(hi)}"


def _with_band(row: dict, band: dict) -> dict:
    """A result row plus ``{metric}_lo`` / ``{metric}_hi`` from ``simulate_band``."""
    return {**row, **{f"{k}_lo": v[0] for k, v in band.items()}, **{f"{k}_hi": v[1] for k, v in band.items()}}


@contextlib.contextmanager
def _painter(a):
    """For a command that draws a PNG (``set_defaults(painter=True)``): a worker process that draws it
    (``plots.write_png``), started before anything else with a first task (``plots.warm_up``: it imports
    matplotlib and loads the fonts while this process imports the simulator and simulates); None
    otherwise, or on one core (the plot is drawn here)."""
    from .pool import call, owned, usable_cores

    if not getattr(a, "painter", False) or usable_cores() < 2:
        yield None
        return

    with owned(1, preload=("offloadlab.apps.plots",)) as pool:
        pool.submit(call, "offloadlab.apps.plots", "warm_up")
        yield pool


def cmd_paper(a) -> None:
    from .paper import PAPER_ENGINE, memory_rows, paper_rows, speedup_rows
    from .tables import as_lists, csv_text, format_table

    out = a.outputs.directory("--out", a.out, ["paper_results.csv", "paper_memory.csv", "paper.png"])
    model = _model(a)
    _say_profile(a, model)
    res = paper_rows(model, a.gpu, a.requests, a.seed, a.profiles, progress=not a.quiet)
    mem = memory_rows(model, a.gpu)
    # the figure's data go to the painter first: it draws while this process prints and writes the tables
    plot = ("paper_figure", as_lists(res), as_lists(mem),  # plain columns: the painter needs no pandas
            f"{a.model} on {a.gpu}: no offload vs vLLM copy offload vs interval k=2")
    png = a.outputs.stage(out / "paper.png")  # a temp file beside it, renamed with the others at the end
    drawn = None if a.painter is None else a.painter.submit(_call_plot, png, plot)
    two = lambda v: f"{v:.2f}"  # noqa: E731
    print(f"The paper's scenario: {a.model} on {a.gpu}, gpu_memory_utilization "
          f"{PAPER_ENGINE.gpu_memory_utilization}, {a.requests} multi_news-like requests (mean prompt ~2113, "
          f"512 output tokens), all arriving at t=0; costs: {'profile ' + ' + '.join(a.profile) if a.profile else 'roofline'}\n")
    print(_fmt_results(res))
    print("\nInterval offload vs vLLM's copy-path offload of the same bytes:")
    print(format_table(speedup_rows(res), float_format=two))
    print("\nGPU memory (GiB) per policy (paper Fig. 5):")
    print(format_table(mem, float_format=two))
    a.outputs.write_text(out / "paper_results.csv", csv_text(res))
    a.outputs.write_text(out / "paper_memory.csv", csv_text(mem))
    if drawn is None:
        _call_plot(png, plot)
    else:
        drawn.result()
    print(f"\nwrote {out / 'paper_results.csv'}, {out / 'paper_memory.csv'}, {out / 'paper.png'}")


def _call_plot(png, plot: tuple) -> None:
    """``plots.write_png(png, *plot)``, imported where this runs (the painter process, or here)."""
    from .pool import call

    call("offloadlab.apps.plots", "write_png", png, *plot)


def _band_pool(a):
    """Two worker processes for the band's corner runs, each beside the run itself (``sim.start_band``), when
    the command gives a band and this process may use more than one core; else None: the corners run here."""
    from .pool import owned, usable_cores

    if getattr(a, "no_band", False) or usable_cores() < 2:
        return contextlib.nullcontext(None)

    return owned(2)


def cmd_run(a) -> None:
    from ..sim import simulate, start_band
    from ..vllm_flags import format_vllm

    wl = _workload(a)
    policy = _policy(a)
    model, eng = _model(a), _engine(a)
    _say_profile(a, model)
    with _band_pool(a) as pool:
        band = None if a.no_band else start_band(model, a.gpu, policy, wl, eng, profile=a.profiles,
                                                 cost_kw=getattr(a, "cost_kw", None), executor=pool)
        r = simulate(model, a.gpu, policy, wl, eng, profile=a.profiles, cost_kw=getattr(a, "cost_kw", None),
                     trace_steps=bool(a.trace))  # the step list only for --trace
        band = {} if band is None else band()
    if eng.tensor_parallel * eng.pipeline_parallel > 1:
        from ..sim import layout

        print("deployment: " + layout(model, a.gpu, eng.tensor_parallel, eng.pipeline_parallel).describe()
              + "; memory below is one GPU's (the stage with the fewest KV tokens), host memory the fullest node's")
    print(f"policy: {policy.label}; deploy with: {format_vllm(policy, eng)}")
    _warn_slot_race(policy, model, eng)
    print(_fmt_results([r.row()]))
    if band:
        b = band
        print(f"band (every cost at the low / high end of its evidence-derived band): req/s "
              f"{_band_text(*b['throughput_rps'])}, TTFT mean {_band_text(*b['ttft_mean_s'])} s, TPOT mean "
              + (f"{_band_text(*(x * 1e3 for x in b['tpot_mean_s']))} ms" if 'tpot_mean_s' in b else "-"))
    m = r.memory
    print(f"\nmemory: weights {m.weights_resident / GiB:.2f} GiB, staging {m.staging / GiB:.2f}, activations "
          f"{m.activations / GiB:.2f}, KV cache {m.kv_cache / GiB:.2f} GiB ({m.kv_tokens} tokens); "
          f"host: {m.host_offloaded / GiB:.2f} GiB offloaded, {m.host_pinned / GiB:.2f} GiB pinned; simulated in {r.summary['wall_s']:.3f} s")
    if a.json:
        a.outputs.write_text(a.json, json.dumps(_with_band(r.row(), band), indent=1, default=float))
    if a.requests_csv:
        from .tables import csv_text, records

        a.outputs.write_text(a.requests_csv, csv_text(records(r.columns)))
    if a.trace:
        r.trace.save_chrome(a.outputs.stage(a.trace))


def cmd_compare(a) -> None:
    import pandas as pd

    from ..policy import parse_policy
    from ..sim import simulate, start_band
    from ..vllm_flags import format_vllm, policy_from_vllm

    policies = [parse_policy(p) for p in a.policy or []] + [policy_from_vllm(v) for v in a.vllm or []]
    if not policies:
        policies = [parse_policy(p) for p in ("none", "vllm:8", "uva:8", "interval:2", "interval:4")]
    wl, model, eng = _workload(a), _model(a), _engine(a)
    _say_profile(a, model)
    rows = []
    with _band_pool(a) as pool:
        for p in policies:
            band = None
            try:
                band = None if a.no_band else start_band(model, a.gpu, p, wl, eng, profile=a.profiles,
                                                         cost_kw=getattr(a, "cost_kw", None), executor=pool)
                r = simulate(model, a.gpu, p, wl, eng, profile=a.profiles, trace_steps=False,
                             cost_kw=getattr(a, "cost_kw", None)).row()
                if band is not None:
                    r = _with_band(r, band())
            except OffloadLabError as e:  # one policy that does not fit is a row, not the end of the table
                if band is not None and pool is not None:  # its corners, started on the workers: collected
                    with contextlib.suppress(OffloadLabError):  # (they fail alike), not left running
                        band()
                r = {"policy": p.label, "error": str(e)}
            rows.append({**r, "vllm_flags": format_vllm(p, eng)})
            _warn_slot_race(p, model, eng)
    df = pd.DataFrame(rows)
    print(f"{a.model} on {a.gpu}, workload {a.workload} ({len(wl.requests)} requests), mode {a.mode}\n")
    ok = df[df["error"].isna()] if "error" in df else df
    print(_fmt_results(ok) if len(ok) else "no policy fits")
    if len(ok) > 1 and "throughput_rps_lo" in ok:
        best = ok.loc[ok["throughput_rps"].idxmax()]
        tied = ok[(ok["throughput_rps_hi"] >= best["throughput_rps_lo"]) & (ok.index != best.name)]
        if len(tied):
            print(f"\nwithin the band of the best ({best['policy']}, req/s {_band_text(best['throughput_rps_lo'], best['throughput_rps_hi'])}): "
                  + ", ".join(tied["policy"]) + " (their bands overlap: the costs cannot tell them apart)")
    if "error" in df:
        print("\ndoes not run:")
        for _, r in df[df["error"].notna()].iterrows():
            print(f"  {r['policy']}: {r['error']}")
    print("\nflags:")
    for _, r in df.iterrows():
        print(f"  {r['policy']:28s} {r['vllm_flags']}")
    if a.csv:
        a.outputs.write_text(a.csv, df.to_csv(index=False))


def cmd_optimize(a) -> None:
    from .optimize import optimize

    wl = _workload(a)
    model = _model(a)
    _say_profile(a, model)
    mech = tuple(m for m in a.mechanisms.split(",") if m.strip())
    r = optimize(model, a.gpu, wl, _engine(a), objective=a.objective, min_kv_tokens=a.min_kv_tokens,
                 max_ttft_p99_s=a.max_ttft_p99, max_tpot_p99_s=a.max_tpot_p99, mechanisms=mech,
                 executor=_executor(a), cache_dir=a.cache_dir,
                 profile=a.profile,  # the paths, which the table's rows name (SimConfig loads each once more)
                 progress=not a.quiet, band=not a.no_band)
    print(f"{a.model} on {a.gpu}, workload {a.workload} ({len(wl.requests)} requests), mode {a.mode}; "
          f"{len(r.table)} candidates, {int(r.table['feasible'].sum())} feasible\n")
    print("top 10 feasible:")
    print(_fmt_results(r.top(10)))
    print(f"\nchoice: {r.policy.label}\n\n{r.explanation}\n\ndeploy with: {r.vllm_flags}")
    if a.csv:
        a.outputs.write_text(a.csv, r.table.to_csv(index=False))
        print(f"wrote {a.csv}")


def _ints(text: str, name: str) -> list[int]:
    try:
        out = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        out = []
    if not out or min(out) < 1:
        raise ConfigError(name, text, "comma-separated integers >= 1, e.g. 1,2,4,8")
    return out


def cmd_study(a) -> None:
    from .study import can_serve, serve

    models = {m: _model(a, m) for m in a.model or ["llama-3.1-70b", "llama-3.1-405b"]}
    gpus = a.gpu or ["A100-SXM4-40GB", "H100-SXM5-80GB", "H200-SXM-141GB", "GH200-96GB", "B200-180GB"]
    fit = can_serve(models, gpus, _ints(a.gpus, "--gpus"), _engine(a), ks=_ints(a.ks, "--ks"))
    label = fit["fits"].map({"without offload": "yes", "only with offload": "offload", "no": "-"})
    label = label.where(fit["fits"] != "only with offload", "k<=" + fit["max_k"].astype("Int64").astype(str))
    print("fits (yes: without offload; k<=K: only with interval-K offload or more; -: not at all):\n")
    print(fit.assign(fits_=label).pivot_table(index=["model", "gpu"], columns="gpus", values="fits_", aggfunc="first",
                                              sort=False).fillna("").to_string())
    first_no = fit[fit["fits"] == "no"].drop_duplicates(["model", "gpu"], keep="last")
    if len(first_no):
        print("\nlargest that do not fit, and why:")
        for _, r in first_no.iterrows():
            print(f"  {r['model']} on {r['gpus']}x {r['gpu']}: {r['reason']}")
    out = fit.drop(columns=["policies", "spec", "hardware"])
    if a.simulate:
        wl = _workload(a)
        out = serve(fit, wl, _engine(a), executor=_executor(a), cache_dir=a.cache_dir, progress=not a.quiet)
        cols = {"model": "model", "gpu": "gpu", "gpus": "GPUs", "policy": "policy", "tok_s_per_gpu": "tok/s/GPU",
                "gpu_h_per_Mtok": "GPU-h/Mtok", "ttft_p50_s": "TTFT p50 s", "tpot_p50_s": "TPOT p50 s",
                "mem_kv_tokens": "KV tokens", "bound": "bound"}
        print(f"\nserving {wl.name} ({wl.n} requests), best without and with offload per deployment:\n")
        print(out[list(cols)].rename(columns=cols).to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    if a.csv:
        a.outputs.write_text(a.csv, out.to_csv(index=False))
        print(f"wrote {a.csv}")


def cmd_step(a) -> None:
    from ..sim import simulate_step

    model, policy = _model(a), _policy(a)
    _say_profile(a, model)
    kw = dict(batch=a.batch, new_tokens=a.new_tokens, context=a.context, profile=a.profiles,
              tensor_parallel=a.tensor_parallel, pipeline_parallel=a.pipeline_parallel)
    r = simulate_step(model, a.gpu, policy, **kw)
    lo, hi = (simulate_step(model, a.gpu, policy, corner=c, **kw).time for c in ("low", "high"))
    print(f"step time {r.time * 1e3:.3f} ms (band {lo * 1e3:.3f}-{hi * 1e3:.3f} ms: every cost at the low / high end "
          f"of its evidence); compute stalled on copies {r.stall * 1e3:.3f} ms; {r.events} SimPy events")
    for lane, b in r.busy.items():
        print(f"  {lane:8s} busy {b * 1e3:9.3f} ms ({b / r.time:6.1%})")
    if a.trace:
        r.trace.save_chrome(a.outputs.stage(a.trace))
        print(f"wrote {a.trace} (open in ui.perfetto.dev)")


def cmd_memory(a) -> None:
    from ..sim import serving_memory

    if a.profile:
        print("profile: not used (the memory layout does not depend on costs)")
    mem = serving_memory(_model(a), a.gpu, _policy(a), _engine(a))
    counts = ("kv_tokens", "block_size", "kv_blocks")
    for k, v in mem.as_dict().items():
        print(f"{k:18s} {v:10d}" if k in counts else f"{k:18s} {v / GiB:10.2f} GiB")


def _report_probe(a, f: str, probe, source):
    """Predict a probe file's rows (held out with --leave-one-shape-out; from --profile alone with ``source``)
    and print them with their error summary; the rows, as a frame."""
    from ..validation import error_summary, leave_one_shape_out, predict_probe

    df = leave_one_shape_out(probe) if a.leave_one_shape_out else predict_probe(probe, source=source)
    s = error_summary(df)
    if a.leave_one_shape_out:
        print(f"{f}: {probe.model.name} ({probe.model.layers} layers) on {probe.gpu.name}; held out: every row of "
              "each (B, T, C) predicted from a calibration without that shape's resident and layer rows")
    elif source is None:
        print(f"{f}: {probe.model.name} ({probe.model.layers} layers) on {probe.gpu.name}; calibrated from the "
              f"bandwidth curve, layer times and {int(df.calibration.sum())} resident rows")
    else:
        print(f"{f}: {probe.model.name} ({probe.model.layers} layers) on {probe.gpu.name}; every row predicted "
              f"from --profile alone\nprofile: {df.attrs['cost'].describe()}")
    cols = ["policy", "param", "nbuf", "B", "T", "C", "measured_ms", "predicted_ms", "predicted_lo_ms",
            "predicted_hi_ms", "error"]
    print(df[cols].to_string(index=False, formatters={"error": "{:+.1%}".format}, float_format="{:.2f}".format))
    w = s["worst"]
    print(f"predicted rows: {s['rows']}, MAPE {s['mape']:.2%}, worst {s['max_abs_error']:.2%} "
          f"({w['policy']} param={w['param']} nbuf={w['nbuf']} B={w['B']} T={w['T']} C={w['C']}); by policy: "
          + ", ".join(f"{k} {v:.2%}" for k, v in s["by_policy"].items()))
    print(f"band: measured inside the predicted band on {s['coverage']:.0%} of predicted rows (mean half-width "
          f"{s['band_halfwidth']:.1%}; bands aim to hold 90%)")
    if df["eager_decode"].any() and not df.loc[df["eager_decode"], "calibration"].all():
        x = error_summary(df, exclude_eager_decode=True)
        print(f"without eager resident decode rows (T=1, no offload: the host's launch speed): {x['rows']} rows, "
              f"MAPE {x['mape']:.2%}, worst {x['max_abs_error']:.2%}, in band {x['coverage']:.0%}")
    print()
    return df


def cmd_validate(a) -> None:
    from ..validation import ProbeFile, stored_measurements
    from ..validation.serving_run import format_comparison, is_serving_run, plan_replay, replay_serving_run

    files = a.files or [str(m.path) for m in stored_measurements() if m.kind == "probe"]
    runs = [f for f in files if is_serving_run(f)]
    if runs and len(runs) != len(files) and (a.json or a.plot):
        raise ConfigError("--json/--plot", a.json or a.plot, "one kind of input: probe files or serving-run directories")
    for flag, given, why in (("--vllm-version", a.vllm_version, "probe files have no engine"),
                             ("--no-band", a.no_band, "a probe row's band comes with its prediction, no extra run"),
                             ("--warm-prefix-cache", a.warm_prefix_cache, "probe files have no engine"),
                             ("--recorded-kv-cache", a.recorded_kv_cache, "probe files have no KV cache")):
        if given and len(runs) != len(files):
            raise ConfigError(flag, given, f"serving runs only ({why})")
    if a.leave_one_shape_out and (a.profile or runs):
        raise ConfigError("--leave-one-shape-out", True, "probe files without --profile (it holds out the file's "
                          "own shapes)")
    # everything read and resolved before anything is simulated
    source = a.profiles if len(runs) != len(files) else None
    probes = {f: ProbeFile.load(f, gpu=a.gpu, model=a.model) for f in files if f not in runs}
    plans = {f: plan_replay(f, gpu=a.gpu, model=a.model, profile=a.profiles, vllm_version=a.vllm_version,
                            prefix_cache_warm=a.warm_prefix_cache, recorded_kv_cache=a.recorded_kv_cache)
             for f in runs}
    frames, replays = [], []
    with _band_pool(a) if plans else contextlib.nullcontext() as pool:
        for f in files:
            if f in plans:
                c = replay_serving_run(plans[f], executor=pool, trace_steps=bool(a.plot),  # steps: --plot's
                                       band=not a.no_band)
                print(format_comparison(c) + "\n")
                replays.append(c)
                continue
            frames.append(_report_probe(a, f, probes[f], source).assign(file=f))
    if a.json:
        if replays:
            out = [c.json_dict() for c in replays]
            a.outputs.write_text(a.json, json.dumps(out[0] if len(out) == 1 else out, indent=1, default=float))
        else:
            import pandas as pd  # probe rows are DataFrames (a serving run's replay prints and writes without pandas)

            a.outputs.write_text(a.json, pd.concat(frames).to_json(orient="records", indent=1))
    if a.plot:
        from .plots import predicted_vs_measured, save_png, serving_replay  # matplotlib: only when plotting

        for i, c in enumerate(replays):
            path = Path(a.plot)
            if len(replays) > 1:
                path = path.with_name(f"{path.stem}-{i}{path.suffix}")
            fig = serving_replay(c.requests, c.run.timeseries, c.result.occupancy,
                                 f"{c.run.path.name}: measured vs predicted ({c.model.name} on {c.gpu.name})",
                                 pyplot=False)
            a.outputs.write(path, lambda fh, fig=fig: save_png(fig, fh, dpi=110), binary=True)
            print(f"wrote {path}")
        if frames:
            import pandas as pd

            fig = predicted_vs_measured(pd.concat(frames), "step time: simulator vs measured", pyplot=False)
            a.outputs.write(a.plot, lambda fh: save_png(fig, fh, dpi=110), binary=True)
            print(f"wrote {a.plot}")


def cmd_list(a) -> None:
    from ..catalog import get_gpu, get_model, gpu_names, model_names

    print("models:")
    for n in model_names():
        m = get_model(n)
        print(f"  {n:22s} {m.params / 1e9:7.2f} B params, {m.layers:3d} layers, {m.layer_bytes / 1e9:.3f} GB/layer")
    print("GPUs:")
    for n in gpu_names():
        g = get_gpu(n)
        print(f"  {n:22s} {g.memory_bytes / GiB:5.0f} GiB, {g.hbm_bw / 1e12:.2f} TB/s, "
              f"{g.peak_flops / 1e12:5.0f} TFLOP/s, {g.host_link} {g.h2d_bw / 1e9:.0f} GB/s H2D; node: "
              f"{g.gpus_per_node} GPU{'s' if g.gpus_per_node > 1 else ''} ({g.gpus_per_host_link} per host link), "
              f"{g.host_memory_bytes / GiB:.0f} GiB host, {g.network_bw / 1e9:.1f} GB/s network per GPU")


def cmd_bench(a) -> None:
    try:
        from ..runtime import microbench
    except ImportError as e:  # torch is the runtime extra
        raise ConfigError("runtime", str(e), "torch installed: pip install -e '.[runtime]'") from None
    rc = microbench.main(a.args)
    if rc:
        raise SystemExit(rc)


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are ConfigErrors: one line naming option, value and what was expected."""

    def error(self, message):
        from ..errors import from_argparse

        raise from_argparse(message)


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="offloadlab", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("paper", help="the paper's scenario: table and plot")
    _common(p, policy=False)
    p.set_defaults(gpu="A100-SXM4-40GB")
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="results/paper")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(fn=cmd_paper, painter=True)
    p = sub.add_parser("run", help="serve a workload")
    _common(p)
    _engine_args(p)
    _vllm_version_arg(p)
    _workload_args(p)
    p.add_argument("--json", help="write the result row as JSON")
    p.add_argument("--requests-csv", help="write per-request rows as CSV")
    p.add_argument("--trace", help="write the step trace as Chrome/Perfetto JSON")
    p.add_argument("--no-band", action="store_true", help="skip the two extra runs that give the uncertainty band")
    p.set_defaults(fn=cmd_run)
    p = sub.add_parser("compare", help="several policies on one scenario: a table with bottlenecks and vLLM flags")
    _common(p, policy=False)
    p.add_argument("--policy", action="append", help="repeatable; default: none, vllm:8, uva:8, interval:2, interval:4")
    p.add_argument("--vllm", action="append", metavar="FLAGS", help="repeatable: a vLLM command line's offload flags")
    _engine_args(p)
    _vllm_version_arg(p)
    _workload_args(p)
    p.add_argument("--csv", help="write the table as CSV")
    p.add_argument("--no-band", action="store_true", help="skip the two extra runs per policy that give its band")
    p.set_defaults(fn=cmd_compare)
    p = sub.add_parser("study", help="before buying: which node types and sizes serve a model, with or without "
                                     "offload; --simulate for throughput, latency and GPU-hours per token")
    p.add_argument("--model", action="append", help="repeatable (default: llama-3.1-70b and llama-3.1-405b)")
    p.add_argument("--gpu", action="append", help="repeatable (default: A100-40GB, H100, H200, GH200, B200)")
    p.add_argument("--gpus", default="1,2,4,8", help="GPU counts: TP inside a node, PP across nodes (default 1,2,4,8)")
    p.add_argument("--ks", default="1,2,4,8", help="interval k tried (default 1,2,4,8)")
    _catalog_args(p)
    _engine_args(p)
    _workload_args(p)
    p.add_argument("--simulate", action="store_true", help="simulate every candidate that fits")
    _sweep_args(p, "write the table as CSV")
    p.set_defaults(fn=cmd_study)
    p = sub.add_parser("optimize", help="search offload policies for the best throughput under constraints; explain")
    _common(p, policy=False)
    _engine_args(p)
    _workload_args(p)
    p.add_argument("--objective", default="throughput_rps",
                   help="a result column: throughput_rps (default), output_tok_s, ttft_p99_s, tpot_p99_s, ...")
    p.add_argument("--min-kv-tokens", type=int, default=None, help="keep only policies whose KV cache holds this many")
    p.add_argument("--max-ttft-p99", type=float, default=None, metavar="S", help="TTFT p99 limit, seconds")
    p.add_argument("--max-tpot-p99", type=float, default=None, metavar="S", help="TPOT p99 limit, seconds")
    p.add_argument("--mechanisms", default="prefetch,uva,vllm", help="comma-separated: prefetch, uva, vllm")
    _sweep_args(p, "write every candidate's row (feasible, reason, vllm_flags) as CSV")
    p.add_argument("--no-band", action="store_true",
                   help="skip the corner runs that say which of the best choices are within each other's bands")
    p.set_defaults(fn=cmd_optimize)
    p = sub.add_parser("step", help="one forward step: time, lanes, trace")
    _common(p)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--new-tokens", type=int, default=2048)
    p.add_argument("--context", type=int, default=0)
    _parallel_args(p)
    p.add_argument("--trace", help="write the per-layer trace as Chrome/Perfetto JSON")
    p.set_defaults(fn=cmd_step)
    p = sub.add_parser("memory", help="GPU memory layout for a policy")
    _common(p)
    _engine_args(p)
    p.set_defaults(fn=cmd_memory)
    p = sub.add_parser("validate", help="predict a probe file's rows from its components (or from --profile), or "
                                        "replay a real serving run (a directory: meta.json + requests.jsonl; or a "
                                        "vllm bench serve --save-result --save-detailed JSON file, with "
                                        "RESULT.meta.json beside it or the flags below for what it does not "
                                        "record); compare")
    p.add_argument("files", nargs="*", help="probe JSON files, serving-run directories or vLLM benchmark result "
                                            "files (default: the stored probes in validation/traces)")
    p.add_argument("--gpu", help="catalog GPU to use for the roofline (default: from the file's device name)")
    p.add_argument("--model", help="catalog model or a Hugging Face config.json (default: the file's; a run's Hugging "
                                   "Face id maps to the catalog)")
    _profile_arg(p, "probes: predict every row of the files from this source's measurements and the datasheets "
                    "alone (none of the files' own rows); serving runs: calibrated costs instead of the roofline")
    p.add_argument("--leave-one-shape-out", action="store_true",
                   help="held-out check: predict each (B, T, C) from a calibration without it")
    p.add_argument("--vllm-version", help="serving runs: the vLLM version whose engine replays it (and, for a result "
                                          "file without start_times, whose client timed its requests; default: "
                                          "meta.json's or the sidecar's)")
    p.add_argument("--json", help="probes: every row with measured_ms and predicted_ms; serving runs: "
                                  "{requests: [...], summary: {...}}")
    p.add_argument("--plot", help="write a predicted-vs-measured PNG (serving runs: CDFs and running/waiting over time)")
    p.add_argument("--no-band", action="store_true",
                   help="serving runs: skip the two extra replays that give each mean and the throughput a band")
    p.add_argument("--warm-prefix-cache", action="store_true",
                   help="serving runs: the server had served these prompts before (a rate sweep sending the same "
                        "prompts again): every request's full prompt blocks start in the prefix cache")
    p.add_argument("--recorded-kv-cache", action="store_true",
                   help="serving runs: replay on the KV blocks the run recorded (meta.json kv_cache.num_gpu_blocks, "
                        "as vLLM's num_gpu_blocks_override), not the memory model's: the timing model alone")
    p.add_argument("--catalog", help="a YAML/JSON file adding models and GPUs")
    p.set_defaults(fn=cmd_validate)
    p = sub.add_parser("bench", help="measure this GPU into a Profile (runtime microbenchmark; needs torch)",
                       add_help=False, prefix_chars="\0")
    p.add_argument("args", nargs=argparse.REMAINDER, help="microbenchmark options (bench --help lists them)")
    p.set_defaults(fn=cmd_bench)
    p = sub.add_parser("list", help="known models and GPUs")
    p.add_argument("--catalog", help="a YAML/JSON file adding models and GPUs")
    p.set_defaults(fn=cmd_list)
    return ap


# Options naming files a command writes: checked before any work, written together at its end
# (offloadlab.apps.outputs); and directories it fills as it goes (a sweep's cache).
OUTPUT_FILES = {"json": "--json", "requests_csv": "--requests-csv", "trace": "--trace", "csv": "--csv", "plot": "--plot"}
OUTPUT_DIRS = {"cache_dir": "--cache-dir"}


def _check_outputs(a, outputs) -> None:
    for attr, flag in OUTPUT_FILES.items():
        if getattr(a, attr, None) is not None:
            outputs.file(flag, getattr(a, attr))
    for attr, flag in OUTPUT_DIRS.items():
        if getattr(a, attr, None) is not None:
            OutputSet().directory(flag, getattr(a, attr))  # checked only: not part of the command's set


def main(argv: list[str] | None = None) -> int:
    """Run one command; 0 on success, 2 on bad input (one line on stderr), 130/143 on Ctrl-C/SIGTERM."""
    from . import signals

    stdout = sys.stdout = PipeSafeStdout(sys.stdout)
    try:
        args = build_parser().parse_args(argv)
        with signals.handled(), OutputSet() as outputs:
            args.outputs = outputs
            _check_outputs(args, outputs)
            with _painter(args) as args.painter:  # ended (its worker killed, if need be) before the outputs
                if getattr(args, "catalog", None):
                    from ..catalog import load_catalog_file

                    load_catalog_file(args.catalog)
                _settle_engine(args)
                args.profiles = None  # --profile's files, loaded once: a Profile, or a tuple of several
                if getattr(args, "profile", None):  # a bad file fails here, not in one row of a table
                    from ..profile import load_profiles

                    args.profiles = load_profiles(args.profile)
                args.fn(args)
        stdout.flush()
    except OffloadLabError as e:
        stdout.flush()
        print(f"offloadlab: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("offloadlab: interrupted (Ctrl-C); no output written", file=sys.stderr)
        return signals.EXIT_SIGINT
    except signals.Terminated:
        print("offloadlab: terminated (SIGTERM); no output written", file=sys.stderr)
        return signals.EXIT_SIGTERM
    except OSError as e:  # the file system failed under a checked path (disk full, ...)
        print(f"offloadlab: error: {e.filename or ''}{': ' if e.filename else ''}{e.strerror or e}", file=sys.stderr)
        return 1
    finally:
        sys.stdout = stdout._stream
    return 1 if stdout.broken else 0  # output piped into `head`: the files are written, stdout was cut


def console() -> int:
    """The ``offloadlab`` program (its console script, ``python -m offloadlab.apps.cli``): ``main()`` with
    one BLAS thread, and then the process's exit without a garbage collection of everything it made.

    - BLAS: numpy's OpenBLAS starts a thread per core when numpy is imported, and each spins (busy-waits)
      for about 0.1 s before it sleeps: on two cores, a core's worth of CPU taken from the run and its
      band's corners (a command's CPU 0.86 -> 0.69 s). No command does BLAS work worth a thread (the
      simulator's arrays are small; the largest is a least-squares fit of a few rows), and a BLAS routine
      gives the same numbers on one thread. ``OPENBLAS_NUM_THREADS`` is set only where the environment
      does not set it, and before numpy is first imported (it is read then); worker processes inherit it.
    - Exit: Python's exit collects every object left (numpy's, SimPy's, the project's modules; 30-45 ms
      of a 0.4 s command) only to free memory that the OS takes back at once; ``gc.freeze`` leaves them out
      of it. Nothing is lost: the outputs are written and renamed, the worker processes ended and stdout
      flushed inside ``main``, and stdio is flushed at exit as ever.

    Not in ``main``: a caller that goes on (a test, a notebook) keeps its threads and its collector."""
    import os

    if "numpy" not in sys.modules:
        os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    rc = main()
    import gc

    gc.freeze()
    return rc


if __name__ == "__main__":
    sys.exit(console())
