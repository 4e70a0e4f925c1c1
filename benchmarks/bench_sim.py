"""Simulator speed: the paper scenario per policy and mode, scaling with the request count, and
multi-GPU deployments (tensor and pipeline parallel: pipelined runs cannot take decode steps in bulk).

Prints wall-clock seconds of the simulation itself (one core; the process start-up and imports are
not counted), SimPy events, step simulations (distinct steps run in SimPy) and engine steps.
Also: vLLM's V1 engine (chunked prefill, prefix caching; 0.11.0's defaults) on real ShareGPT lengths at a
steady rate, 2,000 requests, in ms per request beside Vidur's event loop on the same machine class (issue
19's measurement: about 2.6 ms per request; Vidur is not run here) and in yardsticks (a plain SimPy loop of
100,000 timeouts, measured in the same run).
Also: vLLM's V0 engine as ``offloadlab run --requests 2000`` runs it (the paper's engine, Llama-3.1-8B on
A100-SXM4-40GB, interval:2, 2,000 multi_news-like requests at t=0), per run in yardsticks: warm, first call of
the process, and the two band corners (issue 19: the command runs all three; target about 1 yardstick warm).
Run:  python benchmarks/bench_sim.py [--scale 200,2000,20000] [--v1-only] [--v0-only]
"""
from __future__ import annotations

import argparse
import dataclasses
import time

from offloadlab.apps.paper import PAPER_ENGINE, PAPER_GPU, PAPER_MODEL, paper_policies
from offloadlab.policy import NoOffload, interval
from offloadlab.sim import EngineConfig, longbench_multi_news, simulate


def one(policy, wl, mode, repeat=3, model=PAPER_MODEL, gpu=PAPER_GPU, **engine):
    eng = dataclasses.replace(PAPER_ENGINE, mode=mode, **engine)
    best = None
    for _ in range(repeat):
        t = time.perf_counter()
        r = simulate(model, gpu, policy, wl, eng, trace_steps=False)
        dt = time.perf_counter() - t
        best = dt if best is None else min(best, dt)
    return best, r.summary


VIDUR_MS_PER_REQUEST = 2.6  # Vidur's event loop, 2,000 requests, this 2-core machine (issue 19's measurement)


def v1_sharegpt(n: int = 2000, rate: float = 20.0):
    """V1 engine, chunked prefill, real ShareGPT lengths (sim/sharegpt.py) at ``rate`` requests/s."""
    from bench_commands import yardstick

    from offloadlab.catalog import get_gpu, get_model
    from offloadlab.sim import make_workload
    from offloadlab.sim.vllm_engine import vllm_engine

    gpu, model = get_gpu("a100-80gb"), get_model("llama-3.1-8b")
    eng, kw = vllm_engine("0.11.0", gpu, model)
    wl = make_workload("sharegpt", n, rate=rate)
    y = yardstick()
    best, s = None, None
    for _ in range(3):
        t = time.perf_counter()
        s = simulate(model, gpu, NoOffload(), wl, eng, cost_kw=kw, trace_steps=False).summary
        dt = time.perf_counter() - t
        best = dt if best is None else min(best, dt)
    ms = best / n * 1e3
    print(f"V1 (vLLM 0.11.0 defaults: chunked prefill, prefix caching), llama-3.1-8b on A100-80GB, {n} ShareGPT "
          f"requests at {rate:g}/s: {best:.3f} s (best of 3) = {ms:.3f} ms/request = {best / y:.1f} yardsticks "
          f"({y:.3f} s); {s['steps']} steps ({s['mixed_steps']} mixed), {s['step_sims']} step sims; "
          f"{VIDUR_MS_PER_REQUEST / ms:.1f}x Vidur's {VIDUR_MS_PER_REQUEST} ms/request (target >= 20x)\n")


def v0_run(n: int = 2000, repeat: int = 5):
    """V0 engine as ``offloadlab run --requests n`` simulates it (its run and its two band corners)."""
    from bench_commands import yardstick

    import offloadlab.apps.cli as cli

    a = cli.build_parser().parse_args(["run", "--requests", str(n)])
    cli._settle_engine(a)
    wl, pol, model, eng = cli._workload(a), cli._policy(a), cli._model(a), cli._engine(a)
    y = yardstick()  # best of the yardsticks before and after the runs, as the runs' best (a shared machine)
    times, s = {}, None
    for corner in (None, "low", "high"):
        for _ in range(repeat if corner is None else 1):
            t = time.perf_counter()
            r = simulate(model, a.gpu, pol, wl, eng, trace_steps=False, corner=corner)
            dt = time.perf_counter() - t
            times.setdefault(corner, []).append(dt)
            s = r.summary if corner is None else s
    y = min(y, yardstick())
    first, warm = times[None][0], min(times[None][1:] or times[None])
    print(f"V0 (the paper's engine: `offloadlab run --requests {n}`), {model.name} on {a.gpu}, {pol.label}, {n} "
          f"multi_news-like requests at t=0: warm {warm:.3f} s (best of {repeat - 1}) = {warm / y:.2f} yardsticks "
          f"({y:.3f} s), first call {first:.3f} s = {first / y:.2f}; corners low {times['low'][0]:.3f} s, high "
          f"{times['high'][0]:.3f} s; {s['steps']} steps, {s['step_sims']} step sims, {s['preemptions']} preemptions "
          f"(target: about 1 yardstick warm)\n")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--scale", default="200,2000,20000")
    ap.add_argument("--v1-only", action="store_true", help="only the V1 / ShareGPT figures")
    ap.add_argument("--v0-only", action="store_true", help="only the V0 `offloadlab run` figures")
    a = ap.parse_args()
    if not a.v1_only:
        v0_run()
        if a.v0_only:
            return
    v1_sharegpt()
    if a.v1_only:
        return
    wl = longbench_multi_news(200, seed=0)
    print(f"paper scenario: {PAPER_MODEL} on {PAPER_GPU}, 200 multi_news-like requests, 512 output tokens")
    print(f"{'mode':15s} {'policy':20s} {'wall s':>8s} {'SimPy events':>13s} {'step sims':>10s} {'steps':>7s}")
    for mode in ("prefill-only", "prefill+decode"):
        for pol in paper_policies():
            dt, s = one(pol, wl, mode)
            print(f"{mode:15s} {pol.label:20s} {dt:8.3f} {s['simpy_events']:13d} {s['step_sims']:10d} {s['steps']:7d}")
    print("\nstep engine, side by side (all six paper runs; identical results required):")
    import offloadlab.sim.step as step_mod

    applies, times = step_mod.recurrence_applies, {}
    for name, rule in (("SimPy lanes", lambda *a: False), ("lane recurrence", applies)) * 2:
        step_mod.recurrence_applies = rule
        t, outs = time.perf_counter(), []
        for mode in ("prefill-only", "prefill+decode"):
            for pol in paper_policies():
                outs.append(one(pol, wl, mode, repeat=1)[1]["throughput_rps"])
        times[name] = min(times.get(name, (1e9,))[0], time.perf_counter() - t), outs
    step_mod.recurrence_applies = applies
    assert times["SimPy lanes"][1] == times["lane recurrence"][1], "the recurrence must give the SimPy results"
    for name, (dt, _) in times.items():
        print(f"  {name:16s} {dt:.3f} s (best of 2)")
    print(f"  recurrence speed-up: {times['SimPy lanes'][0] / times['lane recurrence'][0]:.2f}x")
    print("\nscaling (prefill+decode, interval k=2):")
    print(f"{'requests':>9s} {'wall s':>8s} {'s/request':>10s} {'SimPy events':>13s} {'step sims':>10s} {'steps':>8s}")
    pol = paper_policies()[2]
    for n in (int(x) for x in a.scale.split(",")):
        dt, s = one(pol, longbench_multi_news(n, seed=0), "prefill+decode", repeat=1 if n > 2000 else 3)
        print(f"{n:9d} {dt:8.3f} {dt / n:10.5f} {s['simpy_events']:13d} {s['step_sims']:10d} {s['steps']:8d}")
    print("\nscaling with output length (200 requests, interval k=2):")
    for out in (128, 512, 2048):
        dt, s = one(pol, longbench_multi_news(200, seed=0, output_len=out), "prefill+decode")
        print(f"  output {out:5d}: {dt:.3f} s, {s['steps']} steps, {s['step_sims']} step sims")
    print("\nmulti-GPU (200 requests, prefill+decode, gpu_memory_utilization 0.9):")
    wl = longbench_multi_news(200, seed=0)
    for model, gpu, pol, tp, pp in (("llama-3.1-70b", "h100", NoOffload(), 4, 1),
                                    ("llama-3.1-405b", "h100", interval(2), 8, 1),
                                    ("llama-3.1-70b", "h100", NoOffload(), 4, 2),
                                    ("llama-3.1-70b", "gh200", NoOffload(), 1, 8),
                                    ("llama-3.1-405b", "a100-40gb", interval(1), 4, 4)):
        dt, s = one(pol, wl, "prefill+decode", model=model, gpu=gpu, tensor_parallel=tp, pipeline_parallel=pp,
                    gpu_memory_utilization=0.9)
        print(f"  {model} on {tp * pp}x {gpu} (tp {tp}, pp {pp}) {pol.label}: {dt:.3f} s, {s['steps']} steps, "
              f"{s['step_sims']} step sims, {s['simpy_events']} SimPy events")


if __name__ == "__main__":
    main()
