"""Request metrics shared by the simulator and the runtime: latency columns and the run summary.

A request frame has one row per request with ``prompt_len``, ``output_len``, ``arrival``,
``first_token``, ``finish`` (seconds), ``preemptions`` and optionally ``sent``; ``with_latencies`` adds TTFT, TPOT and
end-to-end latency, ``summarize`` turns it into throughput and percentile figures.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

PERCENTILES = (50, 90, 99)


def with_latencies(f: pd.DataFrame) -> pd.DataFrame:
    """Add ``ttft``, ``tpot`` (NaN for one-token outputs) and ``e2e`` columns; rows sorted by id."""
    f = f.copy()
    # measured from when the request was sent (an optional ``sent`` column: a client holding requests back
    # under --max-concurrency), as vllm/benchmarks/serve.py measures ttft and latency; else from arrival
    start = f["sent"] if "sent" in f else f["arrival"]
    f["ttft"] = f["first_token"] - start
    f["tpot"] = (f["finish"] - f["first_token"]) / (f["output_len"] - 1).where(f["output_len"] > 1)
    f["e2e"] = f["finish"] - start
    return f.sort_values("id", ignore_index=True)


def summarize(requests: pd.DataFrame) -> dict[str, float]:
    """Throughput and latency statistics (seconds; tokens/s; requests/s)."""
    makespan = float(requests["finish"].max() - requests["arrival"].min())
    out = {
        "requests": len(requests),
        "makespan_s": makespan,
        "throughput_rps": len(requests) / makespan,
        "output_tok_s": float(requests["output_len"].sum()) / makespan,
        "total_tok_s": float((requests["prompt_len"] + requests["output_len"]).sum()) / makespan,
        "preemptions": int(requests["preemptions"].sum()),
    }
    for col in ("ttft", "tpot", "e2e"):
        v = requests[col].dropna().to_numpy()
        out[f"{col}_mean_s"] = float(v.mean()) if v.size else float("nan")
        for p in PERCENTILES:
            out[f"{col}_p{p}_s"] = float(np.percentile(v, p)) if v.size else float("nan")
    return out
