"""Everything a GPU machine measures, in one command, written under one folder.

    OUT=/some/dir bash runtime/gpu_check.sh          # or: python -m offloadlab.runtime.gpu_check --out DIR

Steps (each guarded: a failing step is recorded in summary.json and the next one runs):
1. the CUDA tests (pytest -m gpu tests/test_runtime*.py)           -> pytest_gpu.txt
   and the race checker's recording on CUDA streams (runtime/races.py)-> races.json
2. the microbenchmark: a Profile for Llama-3.1-8B layers           -> profile_llama-3.1-8b.json
3. probe files (the public format) for Llama-3.1-8B (32 layers) and
   Llama-3.1-70B truncated to fit                                  -> probe_*.json
4. traced steps of the paper's policies (none, vLLM copy 6.5 GiB,
   interval k=2 with 2 buffers) and of today's vLLM mechanisms (UVA
   6.5 GiB, prefetch g=2 n=1 s=2, and that prefetch joined at the step
   end as vLLM's CUDA-graph steps join it), prefill and decode      -> traces/*.json (+ .chrome.json)
5. a small served workload per policy on the full 8B model         -> workload_*.csv
6. Hugging Face accelerate's cpu_offload on the same stack, when
   accelerate is installed                                          -> in summary.json
7. the issue's targets computed from the probe rows                 -> summary.json
8. `offloadlab validate` on the probe files                         -> validate_*.json

Budget: about 5-8 minutes on one H100 (``--quick`` halves the grids). Commit the outputs to
validation/traces/ with their provenance (summary.json's ``versions``).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

from offloadlab.catalog import get_model
from offloadlab.fileio import atomic_write_json
from offloadlab.policy import NoOffload, Prefetch, VllmCopy, VllmUva, interval
from offloadlab.specs import GiB

from . import microbench, probe
from .device import resolve_device, versions
from .generate import run_workload
from .offload import build

PAPER_POLICIES = (NoOffload(), VllmCopy(6.5), interval(2, 2))
# traced beside them: vLLM's default backend for --cpu-offload-gb, and its prefetch backend (issue 8)
TRACED_POLICIES = PAPER_POLICIES + (VllmUva(6.5), Prefetch(2, 1, 2, wrap=True))


def _step(summary: dict, name: str, fn):
    t0 = time.perf_counter()
    print(f"== {name}", flush=True)
    try:
        summary[name] = {"ok": True, **(fn() or {})}
    except Exception as e:  # noqa: BLE001 -- a GPU check keeps going and reports
        traceback.print_exc()
        summary[name] = {"ok": False, "error": f"{type(e).__name__}: {e}"}
    summary[name]["seconds"] = round(time.perf_counter() - t0, 1)
    print(f"   {name}: {'ok' if summary[name]['ok'] else 'FAILED'} in {summary[name]['seconds']} s", flush=True)


def targets(data: dict) -> dict:
    """The issue's targets from a probe's rows: async within 1.05x of max(compute, copies) on long
    prefills, sync near compute + copies, one layer's H2D at >= 90% of the pinned peak."""
    resident = {(r["B"], r["T"], r["C"]): r["ms"] for r in data["forward"] if r["policy"] == "resident"}
    copy = data["layer_copy_ms"]
    rows = []
    for r in data["forward"]:
        key = (r["B"], r["T"], r["C"])
        if r["policy"] == "resident" or key not in resident:
            continue
        copies = r["offloaded_layers"] * copy
        bound = max(resident[key], copies) if r["policy"] == "async_k" else resident[key] + copies
        rows.append({**{k: r[k] for k in ("B", "T", "C", "policy", "param", "nbuf")}, "ms": r["ms"],
                     "bound_ms": round(bound, 3), "ratio": round(r["ms"] / bound, 4)})
    async_long = [x["ratio"] for x in rows if x["policy"] == "async_k" and x["T"] >= 2048 and x["nbuf"] >= 2]
    sync = [x["ratio"] for x in rows if x["policy"] == "sync_prefix"]
    peak = max(r["h2d_pinned_GBps"] for r in data["h2d_bandwidth"])
    layer_rate = data["layer_bytes"] / (copy / 1e3) / 1e9
    return {"rows": rows,
            "async_long_prefill_max_ratio": max(async_long, default=None),
            "async_within_1.05": bool(async_long) and max(async_long) <= 1.05,
            "sync_ratio_median": statistics.median(sync) if sync else None,
            "layer_h2d_GBps": round(layer_rate, 3), "pinned_peak_GBps": peak,
            "layer_h2d_fraction_of_peak": round(layer_rate / peak, 4),
            "layer_h2d_at_least_90pct": layer_rate >= 0.9 * peak}


class _OwnWeights:
    """Weight provider for a model under accelerate's hooks: each layer uses its own parameters,
    which the hook has just moved to the execution device."""

    mechanism = "accelerate"

    def begin_step(self, tracer):
        pass

    def acquire(self, i, tracer):
        return None

    def release(self, i, tracer):
        pass


def accelerate_offload(model, dev):
    """Put a built (resident) model under Hugging Face accelerate's ``cpu_offload``: weights in host
    memory, each decoder layer's moved to the device by a hook right before it runs."""
    from accelerate import cpu_offload

    model.to("cpu")
    cpu_offload(model, execution_device=dev.torch_device, preload_module_classes=["DecoderLayer"])
    model.provider = _OwnWeights()
    return model


def accelerate_reference(spec, dev, B: int, T: int, C: int, reps: int = 3) -> dict:
    """Stack time under accelerate's cpu_offload: the third-party reference point."""
    try:
        import accelerate
    except ImportError:
        return {"skipped": "accelerate is not installed"}
    model = accelerate_offload(build(spec, NoOffload(), dev), dev)
    ms = microbench.stack_time(model, B, T, C, reps, warmup=1) * 1e3
    return {"accelerate": accelerate.__version__, "B": B, "T": T, "C": C, "ms": round(ms, 3), "layers": spec.layers}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.environ.get("OUT", "gpu_check_out"))
    p.add_argument("--quick", action="store_true", help="smaller grids (about half the time)")
    p.add_argument("--skip-tests", action="store_true")
    args = p.parse_args(argv)
    out = Path(args.out)
    (out / "traces").mkdir(parents=True, exist_ok=True)
    dev = resolve_device("cuda")
    summary: dict = {"versions": versions(dev), "quick": args.quick}
    repo = Path(__file__).resolve().parents[1]
    llama8 = get_model("llama-3.1-8b")
    free = torch.cuda.mem_get_info()[0]
    # 70B layers (1.71 GB): as many as fit resident beside the KV buffer and activations, at most 16
    llama70 = get_model("llama-3.1-70b")
    n70 = int(min(16, (free * 0.7 - llama70.non_layer_bytes) // llama70.layer_bytes))
    grid = probe.PROBE_GRID if not args.quick else ((1, 2048, 0), (1, 8192, 0), (1, 1, 2048), (32, 1, 2048))
    reps = 5 if not args.quick else 3

    if not args.skip_tests:
        def tests():
            r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider",
                                *sorted(str(f) for f in (repo / "tests").glob("test_runtime*.py"))],
                               capture_output=True, text=True, cwd=repo, timeout=300)
            (out / "pytest_gpu.txt").write_text(r.stdout + r.stderr)
            if r.returncode:
                raise RuntimeError(f"pytest exit {r.returncode}: {r.stdout.strip().splitlines()[-1:]}")
            return {"tail": r.stdout.strip().splitlines()[-1]}
        _step(summary, "cuda_tests", tests)

    def race_check():
        # the staging-slot schedule on real CUDA streams: the recorded ops must show no race, and wrap
        # policies whose offloaded count is not a multiple of the slots must give the resident logits
        from .races import record, recording_device

        spec = llama8.replace(layers=6)
        prompts = [[int(x) for x in torch.randint(0, spec.vocab, (64,), generator=torch.Generator().manual_seed(b))]
                   for b in range(2)]
        ref = record(build(spec, NoOffload(), recording_device(dev)), prompts, 3).logits
        res = {}
        for policy in (interval(2, 2), Prefetch(1, 1, 4, wrap=True), Prefetch(3, 2, 3, wrap=True),
                       Prefetch(2, 1, 2, wrap=True), VllmCopy(2.0), VllmUva(2.0)):
            got = record(build(spec, policy, recording_device(dev)), prompts, 3)
            diff = max(float((a - b).abs().max()) for a, b in zip(got.logits, ref))
            res[policy.label] = {"ops": len(got.ops), "races": [str(r) for r in got.races[:5]],
                                 "n_races": len(got.races), "max_abs_logit_diff": diff}
            del got
            torch.cuda.empty_cache()
        atomic_write_json(out / "races.json", res)
        bad = {k: v for k, v in res.items() if v["n_races"] or v["max_abs_logit_diff"] > 0}
        if bad:
            raise RuntimeError(f"races or logits off the resident model: {sorted(bad)}")
        return {"policies": sorted(res)}
    _step(summary, "race_check", race_check)

    def bench():
        prof = microbench.run(llama8, dev, layers=8, reps=reps)
        prof.save(out / "profile_llama-3.1-8b.json")
        return {"launch_per_layer_ms": (prof.launch_per_layer or 0) * 1e3, "copy_slowdown": prof.copy_slowdown}
    _step(summary, "microbench", bench)

    probes = {}
    for spec in (llama8, llama70.replace(layers=n70)):
        name = f"probe_{spec.name}_{spec.layers}L"

        def run_probe(spec=spec, name=name):
            data = probe.measure(spec, dev, grid, reps=reps, progress=print)
            probe.save(data, out / f"{name}.json")
            probes[name] = data
            return {"targets": targets(data)}
        _step(summary, name, run_probe)

    def traces():
        done = []
        for policy, join in [(p, False) for p in TRACED_POLICIES] + [(Prefetch(2, 1, 2, wrap=True), True)]:
            model = build(llama8, policy, dev, reserve_bytes=4 * GiB, join_at_step_end=join)
            label = policy.label + (" joined" if join else "")
            for B, T, C in ((1, 2048, 0), (32, 1, 2048)):
                tr = probe.traced_steps(model, B, T, C, steps=3, meta={"policy": label, "gpu": dev.name()})
                stem = f"llama-3.1-8b_{label.replace(' ', '_')}_B{B}_T{T}_C{C}"
                tr.save(out / "traces" / f"{stem}.json")
                tr.save_chrome(out / "traces" / f"{stem}.chrome.json")
                done.append(stem)
            del model
            torch.cuda.empty_cache()
        return {"traces": done}
    _step(summary, "traced_steps", traces)

    def workloads():
        from types import SimpleNamespace

        reqs = [SimpleNamespace(prompt_len=1024, output_len=32, arrival=0.0) for _ in range(16)]
        res = {}
        for policy in PAPER_POLICIES:
            model = build(llama8, policy, dev, reserve_bytes=4 * GiB)
            r = run_workload(model, reqs, batch_size=8, realtime=False)
            r.requests.to_csv(out / f"workload_{policy.label.replace(' ', '_')}.csv", index=False)
            res[policy.label] = {k: r.summary[k] for k in ("throughput_rps", "ttft_mean_s", "tpot_mean_s")}
            del model
            torch.cuda.empty_cache()
        return {"results": res}
    _step(summary, "workloads", workloads)

    _step(summary, "accelerate", lambda: accelerate_reference(llama8.replace(layers=8), dev, 1, 2048, 0))

    for name in probes:
        def validate(name=name):
            r = subprocess.run([sys.executable, "-m", "offloadlab.apps.cli", "validate", str(out / f"{name}.json"), "--json",
                                str(out / f"validate_{name}.json")], capture_output=True, text=True, timeout=120)
            (out / f"validate_{name}.txt").write_text(r.stdout + r.stderr)
            if r.returncode:
                raise RuntimeError(f"offloadlab validate exit {r.returncode}: {r.stderr.strip()[-500:]}")
            return {}
        _step(summary, f"validate_{name}", validate)

    atomic_write_json(out / "summary.json", summary)
    print(json.dumps({k: v.get("ok") for k, v in summary.items() if isinstance(v, dict) and "ok" in v}, indent=1))
    return 0 if all(v.get("ok", True) for v in summary.values() if isinstance(v, dict)) else 1


if __name__ == "__main__":
    raise SystemExit(main())
