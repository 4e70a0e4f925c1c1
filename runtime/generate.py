"""Prefill and decode with a KV cache, and a small serving loop over a workload.

``generate`` is greedy decoding for one batch of prompts. ``run_workload`` serves any iterable of
requests (objects with ``prompt_len``, ``output_len`` and ``arrival``, e.g. the simulator's
workloads) with simple static batching: requests in arrival order, ``batch_size`` at a time,
left-padded to the batch's longest prompt, decoded until the batch's longest output; a request's
first token is the batch's prefill, its finish the step that produced its last token. It reports
what the simulator reports: per-request TTFT, TPOT and end-to-end latency, throughput.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import pandas as pd
import torch

from offloadlab.checks import check_int
from offloadlab.errors import ConfigError, DoesNotFitError
from offloadlab.metrics import summarize, with_latencies
from offloadlab.specs import GiB
from offloadlab.trace import Trace

from .model import KVCache, Transformer
from .tracer import NULL_TRACER


def _left_pad(prompts, device) -> tuple[torch.Tensor, torch.Tensor]:
    """List of token-id sequences -> (B, T) ids left-padded with 0 and the (B,) pad counts."""
    lens = [len(p) for p in prompts]
    assert lens and min(lens) >= 1, "every prompt needs at least one token"
    T = max(lens)
    ids = torch.zeros(len(prompts), T, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, T - len(p):] = torch.as_tensor(p, dtype=torch.long)
    return ids.to(device), torch.tensor([T - n for n in lens], dtype=torch.long)


def prefill(model: Transformer, prompts, slots: int, tracer=None) -> tuple[torch.Tensor, KVCache]:
    """Run the prompts ((B, T) tensor or a list of id lists, left-padded) into a new cache of
    ``slots`` slots; return the last position's logits (B, V) and the cache."""
    if isinstance(prompts, torch.Tensor):
        assert prompts.dim() == 2, f"prompts must be (B, T), got {tuple(prompts.shape)}"
        ids, pad = prompts.to(model.device), torch.zeros(prompts.size(0), dtype=torch.long)
    else:
        ids, pad = _left_pad(prompts, model.device)
    cache = KVCache(model.spec, ids.size(0), slots, model.device, model.dtype, pad=pad)
    return model(ids, cache, tracer), cache


def decode(model: Transformer, token: torch.Tensor, cache: KVCache, tracer=None) -> torch.Tensor:
    """One decode step: (B,) token ids -> logits (B, V)."""
    return model(token[:, None], cache, tracer)


@torch.inference_mode()
def generate(model: Transformer, prompts, max_new_tokens: int, tracer=None) -> torch.Tensor:
    """Greedy decoding: (B, max_new_tokens) new token ids."""
    assert max_new_tokens >= 1, f"max_new_tokens must be >= 1, got {max_new_tokens}"
    T = prompts.size(1) if isinstance(prompts, torch.Tensor) else max(len(p) for p in prompts)
    logits, cache = prefill(model, prompts, T + max_new_tokens, tracer)
    out = [logits.argmax(-1)]
    for _ in range(max_new_tokens - 1):
        out.append(decode(model, out[-1], cache, tracer).argmax(-1))
    return torch.stack(out, dim=1)


# ----------------------------------------------------------------------------------------------
# Serving a workload


@dataclass
class WorkloadResult:
    requests: pd.DataFrame  # one row per request (the simulator's columns)
    summary: dict  # throughput and latency statistics
    trace: Trace | None = field(default=None, repr=False)


def _requests(workload) -> list[tuple[int, int, int, float]]:
    reqs = getattr(workload, "requests", workload)
    out = []
    for n, r in enumerate(reqs):
        for a in ("prompt_len", "output_len", "arrival"):
            if not hasattr(r, a):
                raise ConfigError(f"request[{n}]", r, "an object with prompt_len, output_len and arrival")
        out.append((int(getattr(r, "id", n)), int(r.prompt_len), int(r.output_len), float(r.arrival)))
    if not out:
        raise ConfigError("workload", workload, "at least one request")
    return sorted(out, key=lambda r: (r[3], r[0]))


@torch.inference_mode()
def run_workload(model: Transformer, workload, batch_size: int = 8, *, seed: int = 0, tracer=None,
                 realtime: bool = True) -> WorkloadResult:
    """Serve ``workload`` with static batching; prompts are random token ids (seeded).

    ``realtime``: a batch starts no earlier than its last request's arrival (wall clock since the
    start); False ignores arrivals (all requests waiting at time 0)."""
    check_int("batch_size", batch_size, 1)
    reqs = _requests(workload)
    spec, dev = model.spec, getattr(model, "dev", None)
    batches = [reqs[i:i + batch_size] for i in range(0, len(reqs), batch_size)]
    for rid, p, o, _ in reqs:
        if o < 1 or p < 1 or p + o > spec.max_context:
            raise ConfigError(f"request {rid}", (p, o), f"prompt_len >= 1, output_len >= 1, sum <= {spec.max_context}")
    worst = max(KVCache.nbytes(spec, len(b), max(r[1] for r in b) + max(r[2] for r in b)) for b in batches)
    if dev is not None and dev.is_cuda and worst > dev.memory_free():
        raise DoesNotFitError(f"the KV cache of the largest batch ({worst / GiB:.2f} GiB) does not fit the "
                              f"{dev.memory_free() / GiB:.2f} GiB free on {dev.name()}: use a smaller batch_size")
    sync = dev.synchronize if dev is not None else (lambda: None)
    g = torch.Generator().manual_seed(seed)
    tracer = tracer or NULL_TRACER
    rows = []
    sync()
    t0 = time.perf_counter()
    now = lambda: time.perf_counter() - t0  # noqa: E731
    for k, batch in enumerate(batches):
        if realtime and (wait := max(r[3] for r in batch) - now()) > 0:
            time.sleep(wait)
        prompts = [torch.randint(0, spec.vocab, (r[1],), generator=g).tolist() for r in batch]
        longest = max(r[2] for r in batch)
        logits, cache = prefill(model, prompts, max(r[1] for r in batch) + longest, tracer)
        token = logits.argmax(-1)
        sync()
        first = now()
        finish = {r[0]: first for r in batch if r[2] == 1}
        for n in range(2, longest + 1):
            token = decode(model, token, cache, tracer).argmax(-1)
            token.cpu()  # the host needs the tokens (stop checks, streaming): one sync per step, as in vLLM
            t = now()
            finish.update({r[0]: t for r in batch if r[2] == n})
        for rid, p, o, a in batch:
            a = a if realtime else 0.0
            rows.append({"id": rid, "prompt_len": p, "output_len": o, "arrival": a, "first_token": first,
                         "finish": finish[rid], "batch": k, "preemptions": 0})
    f = with_latencies(pd.DataFrame(rows))
    trace = tracer.trace({"batch_size": batch_size}) if hasattr(tracer, "trace") else None
    if trace is not None:
        trace.requests = f.to_dict("records")
    return WorkloadResult(f, summarize(f), trace)
