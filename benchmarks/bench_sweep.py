"""Sweep throughput: configurations per second with 1 and with 2 worker processes, side by side.

The paper scenario (Llama-3.1-8B, A100-SXM4-40GB, 200 LongBench multi_news-like requests) over
k x staging buffers x host-link bandwidth x gpu_memory_utilization x mode: 5 x 4 x 5 x 5 x 2 = 1,000
configurations. Each worker count runs the same configurations in a fresh process pool, without a
cache; the two frames must be identical. Times include pool start-up and result transfer.

Run:  python benchmarks/bench_sweep.py                 # 1,000 configurations (a few minutes on 2 cores)
      python benchmarks/bench_sweep.py --configs 100   # a fixed random subset, for a quick run
      python benchmarks/bench_sweep.py --workers 1,2,4 --serial --json results/bench_sweep.json
      python benchmarks/bench_sweep.py --dask 1,2,4     # also on a Dask LocalCluster of 1, 2, 4 workers

The same ``sweep`` runs on a real Dask cluster: ``sweep(configs, workload,
executor=distributed.Client("tcp://scheduler:8786").get_executor())``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import time
from pathlib import Path

import pandas as pd

from offloadlab.fileio import atomic_write_json
from offloadlab.apps.paper import PAPER_GPU, PAPER_MODEL
from offloadlab.sim import longbench_multi_news
from offloadlab.apps.sweep import grid, sweep

AXES = dict(model=PAPER_MODEL, gpu=PAPER_GPU, k=[2, 3, 4, 6, 8], slots=[1, 2, 3, 4],
            host_link_GBps=[8, 16, 32, 64, 128], gpu_memory_utilization=[0.7, 0.75, 0.8, 0.85, 0.9],
            mode=["prefill-only", "prefill+decode"])


def configs(n: int | None):
    cs = grid(**AXES)
    if n is None or n >= len(cs):
        return cs
    pick = sorted(random.Random(0).sample(range(len(cs)), n))  # spread over every axis, the same each run
    return [cs[i] for i in pick]


def _cpu() -> float:
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", type=int, default=None, help="use this many configurations (default: all 1,000)")
    ap.add_argument("--workers", default="1,2", help="comma-separated worker counts (default 1,2)")
    ap.add_argument("--serial", action="store_true", help="also run inline, without a pool")
    ap.add_argument("--dask", default="", help="comma-separated Dask LocalCluster worker counts (e.g. 1,2,4)")
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--json", help="write the figures to this file")
    a = ap.parse_args()

    wl = longbench_multi_news(a.requests, seed=0)
    cs = configs(a.configs)
    runs = [("serial", "serial")] if a.serial else []
    runs += [(f"{w} worker{'s' if w > 1 else ''}", w) for w in (int(x) for x in a.workers.split(","))]
    print(f"{len(cs)} configurations: {PAPER_MODEL} on {PAPER_GPU}, {wl.n} multi_news-like requests; "
          f"{os.cpu_count()} CPUs, Python {platform.python_version()}")
    print(f"{'executor':>10s} {'seconds':>9s} {'configs/s':>10s} {'CPU s':>7s} {'CPU ms/config':>14s} {'errors':>7s}")
    runs += [(f"dask {w}", ("dask", w)) for w in (int(x) for x in a.dask.split(",") if x)]
    out, ref = [], None
    for name, ex in runs:
        cpu0 = _cpu()
        t = time.perf_counter()
        if isinstance(ex, tuple):  # a Dask LocalCluster, started and stopped inside the timing
            from distributed import Client, LocalCluster

            with LocalCluster(n_workers=ex[1], threads_per_worker=1, processes=True, dashboard_address=None) as lc, \
                    Client(lc) as client:
                df = sweep(cs, wl, executor=client.get_executor(), progress=False)
        else:
            df = sweep(cs, wl, executor=ex, progress=False)
        dt = time.perf_counter() - t
        cpu = _cpu() - cpu0  # this process and its (reaped) pool workers: contention-free cost
        errors = int(df["error"].notna().sum())
        print(f"{name:>10s} {dt:9.1f} {len(cs) / dt:10.2f} {cpu:7.1f} {cpu / len(cs) * 1e3:14.1f} {errors:7d}",
              flush=True)
        out.append({"executor": name, "configs": len(cs), "seconds": dt, "configs_per_s": len(cs) / dt,
                    "cpu_s": cpu, "errors": errors})
        if ref is None:
            ref = df
        else:
            pd.testing.assert_frame_equal(df, ref)  # every executor gives the same frame
    best = {}
    for r in out:
        best[r["executor"]] = max(best.get(r["executor"], 0.0), r["configs_per_s"])
    if "1 worker" in best and "2 workers" in best:
        print(f"2 workers over 1 worker: {best['2 workers'] / best['1 worker']:.2f}x (best of each)")
    per_mode = ref.groupby("mode")["steps"].mean().round().to_dict()
    print(f"mean engine steps per config: {per_mode}")
    print(f"load average now: {os.getloadavg()[0]:.2f} (other work on the machine slows the wall-clock figures; "
          "CPU ms/config is immune to it)")
    if a.json:
        atomic_write_json(Path(a.json), {"runs": out, "requests": wl.n, "cpus": os.cpu_count()})


if __name__ == "__main__":
    main()
