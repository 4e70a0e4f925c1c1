"""Whole-command times, in yardsticks measured in the same run.

The yardstick is a plain SimPy loop of 100,000 timeouts (about 0.1 s on the 2-core development
machine), so the ratios carry across machines. Each command runs in a fresh process (start-up and
imports counted), best of ``--repeat``; targets are from issue 19.

    python benchmarks/bench_commands.py              # the three commands, best of 3
    python benchmarks/bench_commands.py --imports    # also: import time of each command's modules
    python benchmarks/bench_commands.py --no-bytecode  # as a fresh checkout under PYTHONDONTWRITEBYTECODE=1

The project's modules are compiled once before timing (as pip installs a package; this machine sets
PYTHONDONTWRITEBYTECODE, under which a checkout would compile them again in every process).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SERVING_RUN = ROOT / "validation" / "traces" / "serving" / "rtx4090_llama-3.1-8b"


def yardstick(repeat: int = 3) -> float:
    """Seconds for a plain SimPy loop of 100,000 timeouts (best of ``repeat``)."""
    import simpy

    best = float("inf")
    for _ in range(repeat):
        env = simpy.Environment()

        def loop(env=env):
            for _ in range(100_000):
                yield env.timeout(1)

        env.process(loop())
        t = time.perf_counter()
        env.run()
        best = min(best, time.perf_counter() - t)
    return best


def child_env(bytecode: bool) -> dict[str, str]:
    """The commands' environment: with ``bytecode``, Python may read and write the project's compiled
    modules (__pycache__, ignored by git), as an installed package has them; some machines set
    PYTHONDONTWRITEBYTECODE, and then every process compiles every project module it imports."""
    env = dict(os.environ)
    if bytecode:
        env.pop("PYTHONDONTWRITEBYTECODE", None)
    else:
        env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


PROJECT_DIRS = ("offloadlab", "sim", "validation", "runtime")


def compile_project() -> None:
    """Write the project's __pycache__ once, before any command is timed."""
    import compileall

    for d in PROJECT_DIRS:
        compileall.compile_dir(str(ROOT / d), quiet=1)


def drop_project_bytecode() -> None:
    """Remove the project's __pycache__ directories (caches git ignores; Python rewrites them)."""
    import shutil

    for d in PROJECT_DIRS:
        for cache in (ROOT / d).rglob("__pycache__"):
            shutil.rmtree(cache, ignore_errors=True)


def command_time(args: list[str], repeat: int, env: dict[str, str] | None = None) -> float:
    """Best wall-clock seconds of ``offloadlab ARGS`` in a fresh process."""
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", "offloadlab.apps.cli", *args], check=True, cwd=ROOT,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        best = min(best, time.perf_counter() - t)
    return best


def import_time(module: str, repeat: int, env: dict[str, str] | None = None) -> float:
    """Best seconds to import ``module`` in a fresh interpreter (what ``python -X importtime`` sums)."""
    best = float("inf")
    for _ in range(repeat):
        out = subprocess.run([sys.executable, "-X", "importtime", "-c", f"import {module}"], cwd=ROOT,
                             capture_output=True, text=True, check=True, env=env).stderr
        last = [ln for ln in out.splitlines() if ln.rstrip().endswith(f"| {module}")][-1]
        best = min(best, int(last.split("|")[1]) / 1e6)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--imports", action="store_true", help="also time the imports of each command's modules")
    ap.add_argument("--no-bytecode", action="store_true",
                    help="time the commands as a fresh checkout runs under PYTHONDONTWRITEBYTECODE=1: the project's "
                         "__pycache__ removed and never written, so every run compiles every project module it "
                         "imports (default: compiled once beforehand, as an installed package has them)")
    a = ap.parse_args()
    if a.no_bytecode:
        drop_project_bytecode()
    else:
        compile_project()
    env = child_env(not a.no_bytecode)
    out = tempfile.mkdtemp(prefix="bench_commands_")
    commands = [
        ("offloadlab paper", ["paper", "--out", out], 10),
        ("offloadlab run --requests 2000", ["run", "--requests", "2000"], 6),
        ("offloadlab validate <serving run>", ["validate", os.path.relpath(SERVING_RUN, ROOT)], 10),
    ]
    # the yardstick is taken again beside every command (best of all): a shared machine's load changes
    times, ys = {}, [yardstick()]
    for name, args, _ in commands:
        times[name] = command_time(args, a.repeat, env)
        ys.append(yardstick())
    y = min(ys)
    print(f"yardstick (SimPy loop of 100,000 timeouts): {y:.3f} s (best; {max(ys):.3f} s worst of {len(ys)}); "
          f"python {sys.version.split()[0]}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}; "
          + ("every project module compiled on every run (--no-bytecode)" if a.no_bytecode
             else "project modules compiled once beforehand (__pycache__), as installed"))
    print(f"{'command':36s} {'wall s':>7s} {'yardsticks':>10s} {'target':>7s}")
    for name, _, target in commands:
        t = times[name]
        print(f"{name:36s} {t:7.2f} {t / y:10.1f} {'<= ' + str(target):>7s} {'met' if t / y <= target else 'MISSED'}")
    if a.imports:
        print("\nimport time (python -X importtime, best of the repeats):")
        for mod in ("simpy", "numpy", "pandas", "matplotlib.figure", "offloadlab.apps.cli", "offloadlab.sim"):
            t = import_time(mod, a.repeat, env)
            print(f"  {mod:20s} {t:6.3f} s {t / y:6.1f} yardsticks")


if __name__ == "__main__":
    main()
