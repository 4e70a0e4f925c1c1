"""Trace against trace: the same step, simulated and measured, compared lane by lane."""
from __future__ import annotations

from typing import TYPE_CHECKING

from ..trace import Trace

if TYPE_CHECKING:
    import pandas as pd


def _merged(trace: Trace, lane: str, kinds: tuple[str, ...]) -> list[tuple[float, float]]:
    out: list[list[float]] = []
    for a, b in sorted((s.start, s.end) for s in trace.spans if s.lane == lane and s.kind in kinds):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return [(a, b) for a, b in out]


def _intersection(x: list[tuple[float, float]], y: list[tuple[float, float]]) -> float:
    i = j = 0
    total = 0.0
    while i < len(x) and j < len(y):
        lo, hi = max(x[i][0], y[j][0]), min(x[i][1], y[j][1])
        total += max(0.0, hi - lo)
        if x[i][1] < y[j][1]:
            i += 1
        else:
            j += 1
    return total


def trace_metrics(trace: Trace) -> dict[str, float]:
    """Makespan, busy seconds per lane, compute stall on copies, and the fraction of copy time
    hidden behind compute (copies on the copy lane that overlap compute spans)."""
    compute = _merged(trace, "compute", ("compute",))
    copies = _merged(trace, "copy", ("copy",))
    copy_busy = sum(b - a for a, b in copies)
    return {
        "makespan_s": trace.makespan(),
        "host_busy_s": trace.busy_time("host", ("launch",)),
        "compute_busy_s": trace.busy_time("compute", ("compute", "copy")),
        "copy_busy_s": copy_busy,
        "compute_stall_s": trace.busy_time("compute", ("wait",)),
        "copy_overlap": _intersection(copies, compute) / copy_busy if copy_busy else float("nan"),
    }


def compare_traces(simulated: Trace, measured: Trace) -> pd.DataFrame:
    """One row per metric: simulated, measured, and relative error (simulated / measured - 1)."""
    import pandas as pd

    s, m = trace_metrics(simulated), trace_metrics(measured)
    df = pd.DataFrame({"metric": list(s), "simulated": list(s.values()), "measured": [m[k] for k in s]})
    df["error"] = df["simulated"] / df["measured"].where(df["measured"] != 0) - 1
    return df
