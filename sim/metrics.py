"""The simulated requests as a request frame (see offloadlab.metrics for the columns)."""
from __future__ import annotations

import numpy as np

from ..metrics import latency_columns, summarize

__all__ = ["request_columns", "summarize"]


def request_columns(seqs) -> dict[str, np.ndarray]:
    """One entry per request, as numpy columns in id order: lengths, arrival, first token, finish, TTFT,
    TPOT, end-to-end latency (s); ``RunResult.requests`` is the same as a DataFrame."""
    return latency_columns({
        "id": np.array([s.req.id for s in seqs], dtype=np.int64),
        "prompt_len": np.array([s.req.prompt_len for s in seqs], dtype=np.int64),
        "output_len": np.array([s.generated for s in seqs], dtype=np.int64),
        "arrival": np.array([s.req.arrival for s in seqs], dtype=np.float64),
        "sent": np.array([s.sent for s in seqs], dtype=np.float64),  # later than arrival only under a client limit
        "first_token": np.array([s.first for s in seqs], dtype=np.float64),
        "finish": np.array([s.finish for s in seqs], dtype=np.float64),
        "preemptions": np.array([s.preempted for s in seqs], dtype=np.int64),
    })

