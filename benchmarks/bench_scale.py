"""A million requests in constant memory: time and peak memory of ``simulate(..., requests="summary")``
over a ``RequestStream`` (Poisson arrivals, ShareGPT-like lengths: workloads.csv's sharegpt_8k fit),
vLLM's V1 engine (0.11.0 defaults) serving Llama-3.1-8B on one A100-80GB, no offload, one core.

Prints, per request count: wall seconds, ms per request, the wall seconds in yardsticks (a plain SimPy
loop of 100,000 timeouts, timed just before the count's run: how loaded the machine is), peak RSS (this
process, so each count runs in a fresh one), engine steps and the summary's throughput and latencies
(means exact; percentiles from LogHistogram sketches within 0.1%). The rate (2.5 requests/s) is below the deployment's capacity
(about 2.9 requests/s for these lengths), so queues stay bounded.

    python benchmarks/bench_scale.py                       # 20,000 and 1,000,000 requests
    python benchmarks/bench_scale.py --sizes 2000 20000
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def one(n: int, rate: float, version: str) -> dict:
    from offloadlab.catalog import get_gpu, get_model
    from offloadlab.policy import NoOffload
    from offloadlab.sim import simulate
    from offloadlab.sim.vllm_engine import vllm_engine
    from offloadlab.sim.workload import RequestStream

    gpu, model = get_gpu("a100-80gb"), get_model("llama-3.1-8b")
    eng, kw = vllm_engine(version, gpu, model)
    t = time.perf_counter()
    r = simulate(model, gpu, NoOffload(), RequestStream("sharegpt_8k", n, rate, max_model_len=eng.max_model_len),
                 eng, cost_kw=kw, trace_steps=False, requests="summary")
    wall = time.perf_counter() - t
    s = r.summary
    return dict(n=n, wall_s=wall, peak_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, steps=s["steps"],
                rps=s["throughput_rps"], ttft_mean=s["ttft_mean_s"], ttft_p99=s["ttft_p99_s"],
                tpot_mean=s["tpot_mean_s"], tpot_p99=s["tpot_p99_s"], preemptions=s["preemptions"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[20_000, 1_000_000])
    ap.add_argument("--rate", type=float, default=2.5)
    ap.add_argument("--vllm-version", default="0.11.0")
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)  # internal: run one size, print JSON
    a = ap.parse_args()
    if a.one:
        print(json.dumps(one(a.one, a.rate, a.vllm_version)))
        return
    print(f"V1 ({a.vllm_version}), llama-3.1-8b on A100-80GB, sharegpt_8k-like lengths, Poisson {a.rate} req/s, "
          "one process per size")
    print(f"{'requests':>9s} {'wall s':>8s} {'ms/req':>7s} {'yardst.':>8s} {'peak MB':>8s} {'steps':>9s} {'req/s':>6s} "
          f"{'TTFT mean/p99 s':>16s} {'TPOT mean/p99 ms':>17s} {'preempt':>7s}")
    from bench_commands import yardstick

    for n in a.sizes:
        y = yardstick()
        out = subprocess.run([sys.executable, __file__, "--one", str(n), "--rate", str(a.rate), "--vllm-version",
                              a.vllm_version], capture_output=True, text=True, check=True).stdout
        r = json.loads(out.splitlines()[-1])
        print(f"{n:9d} {r['wall_s']:8.1f} {r['wall_s'] / n * 1e3:7.3f} {r['wall_s'] / y:8.0f} {r['peak_mb']:8.0f} {r['steps']:9d} "
              f"{r['rps']:6.3f} {r['ttft_mean']:7.3f}/{r['ttft_p99']:<8.3f} {r['tpot_mean'] * 1e3:7.1f}/"
              f"{r['tpot_p99'] * 1e3:<9.1f} {r['preemptions']:7d}", flush=True)


if __name__ == "__main__":
    main()
