"""The simulated requests as a request frame (see offloadlab.metrics for the columns)."""
from __future__ import annotations

import pandas as pd

from ..metrics import summarize, with_latencies

__all__ = ["request_frame", "summarize"]


def request_frame(seqs) -> pd.DataFrame:
    """One row per request: lengths, arrival, first token, finish, TTFT, TPOT, end-to-end latency (s)."""
    return with_latencies(pd.DataFrame({
        "id": [s.req.id for s in seqs],
        "prompt_len": [s.req.prompt_len for s in seqs],
        "output_len": [s.generated for s in seqs],
        "arrival": [s.req.arrival for s in seqs],
        "sent": [s.sent for s in seqs],  # later than arrival only under a client concurrency limit
        "first_token": [s.first for s in seqs],
        "finish": [s.finish for s in seqs],
        "preemptions": [s.preempted for s in seqs],
    }))
