"""Measure a probe file: the public measurement format of shared/data/h100_llama8b_probe.json.

A probe times a bare decoder stack (no embedding, no LM head) of ``spec.layers`` layers (a catalog
model may be truncated: the file's ``layers`` says how many) under the probe's placements:

- ``resident``: every layer on the device;
- ``sync_prefix`` m: layers 0..m-1 in pinned host memory, copied per parameter on the compute
  stream (vLLM's copy path, offload.CopyPath);
- ``async_k`` k, nbuf: layer i in host memory when i % k == k-1, prefetched on a copy stream into
  nbuf staging buffers (the paper's interval policy, offload.PrefetchRing);

plus its components: copy rates by size, one layer's flat copy time, isolated one-layer times.
``offloadlab validate FILE`` calibrates the simulator from the components and ``resident`` rows and
predicts every other row.

    python -m offloadlab.runtime.probe --model llama-3.1-8b --layers 32 --out probe.json
"""
from __future__ import annotations

import argparse
import datetime
import sys
import time
from pathlib import Path

import torch

from offloadlab.catalog import get_model
from offloadlab.profile import SHAPE_FIELDS, probe_placement
from offloadlab.errors import OffloadLabError
from offloadlab.fileio import atomic_write_json
from offloadlab.policy import NoOffload
from offloadlab.specs import GiB, ModelSpec
from offloadlab.trace import Trace

from .device import resolve_device, versions
from .microbench import CPU_SIZES_MIB, GPU_SIZES_MIB, copy_rates, parse_grid, stack_time, time_fn
from .model import KVCache
from .offload import build
from .tracer import Tracer

#: The (B, T, C) grid of shared/data/h100_llama8b_probe.json.
PROBE_GRID = ((1, 2048, 0), (1, 8192, 0), (1, 1, 2048), (32, 1, 2048), (128, 1, 2048), (256, 1, 2048))


def default_policies(layers: int) -> list[tuple[str, int, int]]:
    """(policy, param, nbuf) rows of the H100 probe, scaled to a stack of ``layers`` layers."""
    return ([("resident", 0, 0)] + [("sync_prefix", m, 0) for m in sorted({max(1, layers // 2), max(1, layers // 4)},
                                                                          reverse=True)]
            + [("async_k", 2, 2), ("async_k", 4, 2), ("async_k", 2, 1), ("async_k", 2, 4)])


def layer_copy_seconds(spec: ModelSpec, dev, reps: int = 5) -> float:
    """One layer, pinned host -> a preallocated device buffer, as one flat tensor."""
    src = dev.host_empty(spec.layer_bytes, torch.uint8).fill_(1)
    dst = torch.empty(spec.layer_bytes, dtype=torch.uint8, device=dev.torch_device)
    return time_fn(lambda: dst.copy_(src, non_blocking=True), dev, reps)


def measure(spec: ModelSpec, device=None, grid=PROBE_GRID, sizes_mib=None, reps: int = 5, policies=None,
            progress=lambda *a: None) -> dict:
    """Every component and forward row of a probe file for a stack of ``spec.layers`` layers."""
    dev = resolve_device(device)
    policies = policies or default_policies(spec.layers)
    sizes_mib = sizes_mib or (GPU_SIZES_MIB if dev.is_cuda else CPU_SIZES_MIB)
    reserve = max(KVCache.nbytes(spec, B, C + T, shared=True) for B, T, C in grid)
    t0 = time.perf_counter()
    v = versions(dev)
    out = {"about": f"Measured by offloadlab.runtime.probe on {v['device']}, torch {v['torch']}, eager PyTorch, "
                    f"random weights, a {spec.name}-shaped stack of {spec.layers} layers without embedding or LM head. "
                    "Times are medians in milliseconds (CUDA events on a GPU).",
           "gpu": v["device"], "sm": v.get("sm_count", 0), "mem_GiB": round(v.get("gpu_memory_bytes", 0) / GiB, 2),
           "torch": v["torch"], "meta": {**v, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
               timespec="seconds"), "command": " ".join(sys.argv), "reps": reps}}
    progress(f"probe: {v['device']}, {spec.name} x {spec.layers} layers")
    out["h2d_bandwidth"] = copy_rates(dev, sizes_mib, reps)
    out.update(model=spec.name, layers=spec.layers, layer_bytes=spec.layer_bytes,
               **{f: getattr(spec, f) for f in SHAPE_FIELDS},  # the shape, for models outside the catalog
               layer_copy_ms=round(layer_copy_seconds(spec, dev, reps) * 1e3, 4))
    one = build(spec.replace(layers=1), NoOffload(), dev, reserve_bytes=reserve)
    out["layer"] = [{"B": B, "T": T, "C": C, "ms": round(stack_time(one, B, T, C, reps) * 1e3, 4)} for B, T, C in grid]
    del one
    rows = []
    for policy, param, nbuf in policies:
        pl = probe_placement(spec, policy, param, nbuf)
        model = build(spec, pl, dev, reserve_bytes=reserve, seed=0)
        for B, T, C in grid:
            ms = stack_time(model, B, T, C, reps) * 1e3
            rows.append({"B": B, "T": T, "C": C, "policy": policy, "param": param, "nbuf": nbuf,
                         "offloaded_layers": len(pl.offloaded_layers), "ms": round(ms, 4)})
            progress(f"  {policy} {param} {nbuf} B={B} T={T} C={C}: {ms:.2f} ms")
        del model
        if dev.is_cuda:
            torch.cuda.empty_cache()
    out["forward"] = rows
    out["meta"]["seconds"] = round(time.perf_counter() - t0, 1)
    return out


def save(data: dict, path) -> Path:
    """Write a probe file (JSON, atomically)."""
    return atomic_write_json(path, data)


def traced_steps(model, B: int, T: int, C: int, steps: int = 3, meta: dict | None = None) -> Trace:
    """A Trace of ``steps`` passes of the model's layers (the last ones are warm), probe-style."""
    spec = model.spec
    cache = KVCache(spec, B, C + T, model.device, model.dtype, shared=True)
    x = torch.randn(B, T, spec.hidden, device=model.device, dtype=model.dtype) * 0.5
    with torch.inference_mode():
        cache.length = C
        model.forward_layers(x, cache)  # warm-up, untraced
        tracer = Tracer(model.dev, {"model": spec.name, "layers": spec.layers, "B": B, "T": T, "C": C, **(meta or {})})
        for _ in range(steps):
            tracer.begin_step()
            cache.length = C
            model.forward_layers(x, cache, tracer)
    return tracer.trace()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m offloadlab.runtime.probe", description="Measure a probe file.")
    p.add_argument("--model", default="llama-3.1-8b")
    p.add_argument("--layers", type=int, help="truncate the stack to this many layers")
    p.add_argument("--device")
    p.add_argument("--grid", type=parse_grid, default=PROBE_GRID)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--out", default="probe.json")
    args = p.parse_args(argv)
    try:
        spec = get_model(args.model)
        if args.layers:
            spec = spec.replace(layers=min(args.layers, spec.layers))
        save(measure(spec, args.device, args.grid, reps=args.reps, progress=print), args.out)
    except OffloadLabError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
