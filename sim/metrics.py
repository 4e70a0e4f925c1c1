"""Metrics of a served workload: per-request latencies and the run's summary."""
from __future__ import annotations

import numpy as np
import pandas as pd

PERCENTILES = (50, 90, 99)


def request_frame(seqs) -> pd.DataFrame:
    """One row per request: lengths, arrival, first token, finish, TTFT, TPOT, end-to-end latency (s)."""
    f = pd.DataFrame({
        "id": [s.req.id for s in seqs],
        "prompt_len": [s.req.prompt_len for s in seqs],
        "output_len": [s.generated for s in seqs],
        "arrival": [s.req.arrival for s in seqs],
        "first_token": [s.first for s in seqs],
        "finish": [s.finish for s in seqs],
        "preemptions": [s.preempted for s in seqs],
    })
    f["ttft"] = f["first_token"] - f["arrival"]
    decode_tokens = (f["output_len"] - 1).where(f["output_len"] > 1)
    f["tpot"] = (f["finish"] - f["first_token"]) / decode_tokens
    f["e2e"] = f["finish"] - f["arrival"]
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
