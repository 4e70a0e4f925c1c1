"""Peak memory per served request: the figure behind sim.workload.BYTES_PER_REQUEST.

Runs ``offloadlab run`` in fresh processes at two request counts and prints the peak RSS of each and
the slope (bytes per request), beside the constant the CLI uses to refuse runs that would not fit.

    python benchmarks/bench_memory.py            # sharegpt_8k, 2,000 and 20,000 requests
    python benchmarks/bench_memory.py --workload multi_news --sizes 500 5000
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys

from offloadlab.sim.workload import BYTES_PER_REQUEST


def peak_rss(args: list[str]) -> float:
    """Peak resident bytes of one ``offloadlab`` process (Linux: ru_maxrss is in KiB)."""
    proc = subprocess.Popen([sys.executable, "-m", "offloadlab.apps.cli", *args], stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, f"offloadlab {' '.join(args)} failed"
    return usage.ru_maxrss * 1024.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workload", default="sharegpt_8k")
    ap.add_argument("--sizes", type=int, nargs=2, default=(2000, 20000))
    a = ap.parse_args()
    (n0, n1) = a.sizes
    r0, r1 = (peak_rss(["run", "--workload", a.workload, "--requests", str(n)]) for n in (n0, n1))
    slope = (r1 - r0) / (n1 - n0)
    print(f"{a.workload}: {n0} requests {r0 / 1e6:.1f} MB, {n1} requests {r1 / 1e6:.1f} MB peak RSS; "
          f"{slope:,.0f} bytes per request (the CLI's refusal estimate: {BYTES_PER_REQUEST:,} bytes per request)")


if __name__ == "__main__":
    main()
