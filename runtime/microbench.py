"""Microbenchmarks that calibrate the simulator: they write an offloadlab.profile.Profile.

What is measured (medians after warm-up; CUDA events on a GPU, perf_counter on CPU):
- host<->device copy rate by size: pinned H2D (the Profile's ``h2d``), pageable H2D and pinned D2H
  (in ``meta``);
- per-layer time *in a stack* (a resident stack of ``layers`` layers, divided by ``layers``) over
  a grid of (B, T, C): B sequences, T new tokens, C tokens already cached;
- the host's launch time per layer: the Python time to issue one layer while the GPU is kept busy
  (so the host never waits on it);
- the slowdown of compute while a copy runs on the copy stream (ratio of stack times);
- UVA reads by tokens per step (the Profile's ``uva_gemm``): a GEMM of M token rows whose weight
  (the layer's largest, down_proj's shape) lives in pinned host memory and is read through its
  device view, as vLLM's UVA backend does (vllm/model_executor/offloader/uva.py), timed by M. The
  simulator takes the time per weight byte from it instead of its tile assumption (sim/costs.py).

On CPU the same code runs (copies are memcpy, there is no launch overlap or copy overlap:
``launch_per_layer`` is null and ``copy_slowdown`` 1), quickly with ``--tiny``.

    python -m offloadlab.runtime.microbench --model llama-3.1-8b --layers 8 --out profile.json
"""
from __future__ import annotations

import argparse
import datetime
import math
import statistics
import sys
import time

import torch

from offloadlab.catalog import get_model
from offloadlab.errors import ConfigError, OffloadLabError
from offloadlab.fileio import check_output_file
from offloadlab.policy import NoOffload
from offloadlab.profile import SHAPE_FIELDS, Profile
from offloadlab.specs import ModelSpec

from .device import Device, resolve_device, versions
from .model import KVCache
from .offload import build, uva_view

MiB = 1024**2
#: A 4-layer model with Llama's structure (GQA 2:1) for CPU tests; not in the catalog on purpose.
TINY = ModelSpec("tiny-llama", layers=4, hidden=64, heads=4, kv_heads=2, head_dim=16, intermediate=128,
                 vocab=256, max_context=4096)
#: (B, T, C): the probe's grid (shared/data/h100_llama8b_probe.json) plus a short prefill.
GPU_GRID = ((1, 512, 0), (1, 2048, 0), (1, 8192, 0), (1, 1, 2048), (32, 1, 2048), (128, 1, 2048), (256, 1, 2048))
CPU_GRID = ((1, 16, 0), (2, 1, 16))
GPU_SIZES_MIB = (1, 4, 16, 64, 256, 1024)
CPU_SIZES_MIB = (1, 4)
#: Token rows of the UVA GEMM: decode batches, one and several 64-row M-tiles, prefill chunks.
GPU_UVA_TOKENS = (1, 16, 64, 128, 256, 512, 2048)
CPU_UVA_TOKENS = (1, 8)


def time_fn(fn, dev: Device, reps: int = 5, warmup: int = 2) -> float:
    """Median seconds of ``fn()`` on the device's current stream."""
    assert reps >= 1, f"reps must be >= 1, got {reps}"
    for _ in range(warmup):
        fn()
    dev.synchronize()
    times = []
    for _ in range(reps):
        if dev.is_cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
        else:
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def copy_rates(dev: Device, sizes_mib=GPU_SIZES_MIB, reps: int = 5) -> list[dict]:
    """Rows of the probe format: mb, h2d_pinned_GBps, h2d_pageable_GBps, d2h_pinned_GBps (1e9 B/s)."""
    rows = []
    for mb in sizes_mib:
        n = int(mb * MiB)
        dst = torch.empty(n, dtype=torch.uint8, device=dev.torch_device)
        pinned = dev.host_empty(n, torch.uint8).fill_(1)
        pageable = torch.ones(n, dtype=torch.uint8)
        rate = lambda f: n / time_fn(f, dev, reps) / 1e9  # noqa: E731
        rows.append({"mb": mb,
                     "h2d_pinned_GBps": round(rate(lambda: dst.copy_(pinned, non_blocking=True)), 3),
                     "h2d_pageable_GBps": round(rate(lambda: dst.copy_(pageable)), 3),
                     "d2h_pinned_GBps": round(rate(lambda: pinned.copy_(dst, non_blocking=True)), 3)})
        del dst, pinned, pageable
    return rows


def stack_time(model, B: int, T: int, C: int, reps: int = 5, warmup: int = 2) -> float:
    """Median seconds of one pass of the hidden states (B, T) through the model's layers after C
    cached tokens (one KV buffer shared by all layers: same work, a fraction of the memory)."""
    spec = model.spec
    cache = KVCache(spec, B, C + T, model.device, model.dtype, shared=True)
    x = torch.randn(B, T, spec.hidden, device=model.device, dtype=model.dtype, generator=None) * 0.5

    def run():
        cache.length = C
        model.forward_layers(x, cache)

    with torch.inference_mode():
        return time_fn(run, model.dev, reps, warmup)


def launch_per_layer(model, reps: int = 5) -> float | None:
    """Host seconds to issue one layer (decode shape) while the GPU is busy; None on CPU."""
    dev = model.dev
    if not dev.is_cuda:
        return None
    spec = model.spec
    cache = KVCache(spec, 1, 65, model.device, model.dtype, shared=True)
    x = torch.randn(1, 1, spec.hidden, device=model.device, dtype=model.dtype)
    times = []
    with torch.inference_mode():
        for r in range(reps + 2):
            torch.cuda._sleep(200_000_000)  # ~0.1 s of GPU time queued ahead: the host never waits
            cache.length = 64
            t = time.perf_counter()
            model.forward_layers(x, cache)
            dt = time.perf_counter() - t
            dev.synchronize()
            if r >= 2:
                times.append(dt / spec.layers)
    return statistics.median(times)


def copy_slowdown(model, shapes, reps: int = 5) -> list[float]:
    """Stack time while a copy stream streams host->device copies, over the stack time alone."""
    dev = model.dev
    if not dev.is_cuda:
        return [1.0 for _ in shapes]
    n = 256 * MiB
    src, dst = dev.host_empty(n, torch.uint8), torch.empty(n, dtype=torch.uint8, device=dev.torch_device)
    per_copy = time_fn(lambda: dst.copy_(src, non_blocking=True), dev, 3, 1)
    stream = dev.stream()
    out = []
    for B, T, C in shapes:
        alone = stack_time(model, B, T, C, reps)
        copies = math.ceil(alone * 1.5 / per_copy) + 1
        cache = KVCache(model.spec, B, C + T, model.device, model.dtype, shared=True)
        x = torch.randn(B, T, model.spec.hidden, device=model.device, dtype=model.dtype)
        times = []
        with torch.inference_mode():
            for r in range(reps + 1):
                dev.synchronize()
                with torch.cuda.stream(stream):
                    for _ in range(copies):
                        dst.copy_(src, non_blocking=True)
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                cache.length = C
                model.forward_layers(x, cache)
                b.record()
                dev.synchronize()
                if r:
                    times.append(a.elapsed_time(b) / 1e3)
        out.append(statistics.median(times) / alone)
    return out


def uva_gemm_times(dev: Device, out_features: int, in_features: int, tokens=GPU_UVA_TOKENS, reps: int = 5,
                   dtype: torch.dtype = torch.bfloat16) -> list[tuple[int, int, float]]:
    """(M, weight bytes, seconds) of ``x @ W.T`` for x of M rows, W (out, in) in pinned host memory
    read through its device view (zero-copy; on CPU the host tensor itself, nothing to map)."""
    host = dev.host_empty(out_features * in_features, dtype).view(out_features, in_features)
    host.normal_(0, 0.02)
    w = uva_view(host, dev.torch_device) if dev.is_cuda else host
    nbytes = host.numel() * host.element_size()
    rows = []
    with torch.inference_mode():
        for m in tokens:
            x = torch.randn(m, in_features, device=dev.torch_device, dtype=dtype)
            rows.append((int(m), int(nbytes), time_fn(lambda: torch.nn.functional.linear(x, w), dev, reps, 1)))
    del w, host
    return rows


def run(spec: ModelSpec, device=None, layers: int | None = None, grid=None, sizes_mib=None, reps: int = 5,
        progress=print) -> Profile:
    """Measure a Profile for ``spec`` on ``device`` with a resident stack of ``layers`` layers."""
    dev = resolve_device(device)
    grid = tuple(grid or (GPU_GRID if dev.is_cuda else CPU_GRID))
    sizes_mib = tuple(sizes_mib or (GPU_SIZES_MIB if dev.is_cuda else CPU_SIZES_MIB))
    n = min(layers or (8 if dev.is_cuda else spec.layers), spec.layers)
    stack_spec = spec.replace(layers=n)
    reserve = max(KVCache.nbytes(stack_spec, B, C + T, shared=True) for B, T, C in grid)
    t0 = time.perf_counter()
    progress(f"microbench: {dev.name()}, {spec.name} x {n} layers, {len(grid)} shapes, {len(sizes_mib)} sizes")
    rates = copy_rates(dev, sizes_mib, reps)
    model = build(stack_spec, NoOffload(), dev, reserve_bytes=reserve)
    times = []
    for B, T, C in grid:
        times.append((B, T, C, stack_time(model, B, T, C, reps) / n))
        progress(f"  B={B} T={T} C={C}: {times[-1][3] * 1e3:.3f} ms/layer")
    launch = launch_per_layer(model, reps)
    down = dict(spec.layer_param_shapes)["mlp.down_proj.weight"]  # (hidden, intermediate): the largest GEMM
    uva = uva_gemm_times(dev, *down, tokens=GPU_UVA_TOKENS if dev.is_cuda else CPU_UVA_TOKENS, reps=reps,
                         dtype=model.dtype)
    for m, b, sec in uva:
        progress(f"  UVA GEMM M={m}: {sec * 1e3:.3f} ms for {b / MiB:.0f} MiB ({b / sec / 1e9:.2f} GB/s)")
    slow_shapes = [s for s in grid if s[1] > 1][:1] + [s for s in grid if s[1] == 1][:1]
    slow = copy_slowdown(model, slow_shapes, reps)
    meta = {**versions(dev), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join(sys.argv), "dtype": str(model.dtype).removeprefix("torch."),
            "in_stack_layers": n, "copy_rates": rates,
            "copy_slowdown_by_shape": [[*s, r] for s, r in zip(slow_shapes, slow)],
            "layer_times": "in-stack seconds per layer (stack time / layers), KV buffer shared by the stack's layers",
            "seconds": round(time.perf_counter() - t0, 2)}
    if not dev.is_cuda:
        meta["note"] = "CPU: copies are memcpy; no launch overlap or copy overlap to measure"
        meta["uva_gemm_cpu"] = [list(r) for r in uva]  # host memory read by the CPU: not a link rate
    del model
    return Profile(h2d=tuple((r["mb"] * MiB, r["h2d_pinned_GBps"] * 1e9) for r in rates), layer_times=tuple(times),
                   model=spec.name, gpu=dev.name(), layers=n, launch_per_layer=launch,
                   # the measured shape, so a model outside the catalog can still be transferred from
                   model_shape={f: getattr(spec, f) for f in SHAPE_FIELDS},
                   copy_slowdown=max(1.0, statistics.median(slow)) if slow else 1.0, meta=meta,
                   uva_gemm=tuple(uva) if dev.is_cuda else ())


def parse_grid(text: str) -> tuple[tuple[int, int, int], ...]:
    """"1,2048,0 32,1,2048" -> ((1, 2048, 0), (32, 1, 2048))."""
    out = []
    for item in text.replace(";", " ").split():
        parts = item.split(",")
        if len(parts) != 3 or not all(p.isdigit() for p in parts):
            raise argparse.ArgumentTypeError(f"grid item {item!r}: expected B,T,C (three integers)")
        B, T, C = map(int, parts)
        if B < 1 or T < 1:
            raise argparse.ArgumentTypeError(f"grid item {item!r}: expected B >= 1 and T >= 1")
        out.append((B, T, C))
    return tuple(out)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="offloadlab bench", description="Measure a calibration Profile on this device.")
    p.add_argument("--model", default="llama-3.1-8b", help="catalog model whose layer shape is measured")
    p.add_argument("--tiny", action="store_true", help="a tiny 4-layer model (CPU smoke test)")
    p.add_argument("--layers", type=int, help="layers in the measured stack (default 8 on GPU)")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--grid", type=parse_grid, help='(B,T,C) shapes, e.g. "1,2048,0 32,1,2048"')
    p.add_argument("--sizes", type=lambda s: tuple(float(x) for x in s.split(",")),
                   help="copy sizes in MiB, e.g. 1,64,1024")
    p.add_argument("--reps", type=int, default=5, help="timed repetitions per measurement (median)")
    p.add_argument("--out", default="profile.json", help="Profile file to write (JSON)")
    p.add_argument("--quiet", action="store_true")
    return p


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        check_output_file("--out", args.out)  # before minutes of measuring, not after
        if args.device is None and not args.tiny and not torch.cuda.is_available():
            # the default asks for a GPU: a whole model's layers on this CPU take minutes and its RAM
            raise ConfigError("device", None, f"a CUDA device, but torch {torch.__version__} sees none: --device "
                                              "cpu measures this CPU anyway (every layer), --tiny is a smoke test")
        spec = TINY if args.tiny else get_model(args.model)
        prof = run(spec, args.device, args.layers, args.grid, args.sizes, args.reps,
                   progress=(lambda *a: None) if args.quiet else print)
        prof.save(args.out)
    except OffloadLabError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not args.quiet:
        print(f"wrote {args.out} ({prof.meta['seconds']} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
