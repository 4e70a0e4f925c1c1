"""The device seam: CUDA streams, events and pinned memory on a GPU; no-ops and plain copies on CPU.

Everything else in runtime/ talks to a :class:`Device`, never to ``torch.cuda`` directly, so the
same offload code runs on a laptop (for the tests) and on a GPU (for the measurements):

- ``dev.stream()`` is a CUDA stream on a GPU, a do-nothing stand-in on CPU;
- ``dev.event()`` is a timing CUDA event on a GPU, a do-nothing stand-in on CPU;
- ``dev.pin(t)`` pins host memory only when the device is CUDA (pinning needs a CUDA context);
- ``dev.memory_free()`` is what a placement may still use (GPU: cudaMemGetInfo; CPU: MemAvailable).
"""
from __future__ import annotations

import contextlib
import os
import platform
import subprocess
from dataclasses import dataclass

import torch

from offloadlab.errors import ConfigError
from offloadlab.fileio import host_memory_available

DTYPES = {1: None, 2: torch.bfloat16, 4: torch.float32}  # ModelSpec.weight_bytes -> default dtype


def dtype_for(weight_bytes: float, dtype: torch.dtype | None = None) -> torch.dtype:
    """The torch dtype of a ModelSpec's weights; an explicit ``dtype`` must have the same width."""
    if dtype is None:
        dtype = DTYPES.get(int(weight_bytes)) if float(weight_bytes).is_integer() else None
        if dtype is None:
            raise ConfigError("ModelSpec.weight_bytes", weight_bytes,
                              "2 (bf16) or 4 (fp32): the runtime has no fp8 kernels")
    if torch.empty((), dtype=dtype).element_size() != weight_bytes:
        raise ConfigError("dtype", str(dtype), f"a dtype of {weight_bytes:g} bytes (ModelSpec.weight_bytes)")
    return dtype


class _NullStream:
    """CPU stand-in for a CUDA stream: work "on" it runs at once, in program order."""

    def wait_event(self, event) -> None:
        pass

    def wait_stream(self, stream) -> None:
        pass

    def synchronize(self) -> None:
        pass


class _NullEvent:
    """CPU stand-in for a CUDA event: recording and waiting are no-ops (work is already done)."""

    def record(self, stream=None) -> None:
        pass

    def wait(self, stream=None) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True


@dataclass(frozen=True)
class Device:
    """A torch device plus the stream/event/pinning vocabulary the offload code needs."""

    torch_device: torch.device

    @property
    def is_cuda(self) -> bool:
        return self.torch_device.type == "cuda"

    # ---- streams and events ----
    def stream(self):
        """A new stream (CUDA: high priority is not used; the copy stream is an ordinary stream)."""
        return torch.cuda.Stream(self.torch_device) if self.is_cuda else _NullStream()

    def current_stream(self):
        return torch.cuda.current_stream(self.torch_device) if self.is_cuda else _NullStream()

    def use_stream(self, stream):
        """Context manager: kernels issued inside run on ``stream`` (CPU: nothing changes)."""
        return torch.cuda.stream(stream) if self.is_cuda else contextlib.nullcontext()

    def event(self, timing: bool = False):
        return torch.cuda.Event(enable_timing=timing) if self.is_cuda else _NullEvent()

    def synchronize(self) -> None:
        if self.is_cuda:
            torch.cuda.synchronize(self.torch_device)

    # ---- memory ----
    def pin(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` in page-locked host memory when the device is CUDA; ``t`` unchanged otherwise."""
        assert t.device.type == "cpu", f"pin() takes a host tensor, got one on {t.device}"
        return t.pin_memory() if self.is_cuda else t

    def host_empty(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """An uninitialised host buffer, pinned when the device is CUDA."""
        return torch.empty(numel, dtype=dtype, pin_memory=self.is_cuda)

    def to_device(self, t: torch.Tensor) -> torch.Tensor:
        """A fresh device copy of host tensor ``t``: vLLM's ``.to(device, non_blocking=True)``.

        On CPU ``.to("cpu")`` would return ``t`` itself, so the copy is made explicitly (a plain copy
        into a newly allocated tensor, as on the GPU)."""
        if self.is_cuda:
            return t.to(self.torch_device, non_blocking=True)
        return torch.empty_like(t).copy_(t)

    def memory_free(self) -> int:
        """Bytes a new allocation may use: free GPU memory, or the host's available memory on CPU."""
        if self.is_cuda:
            return int(torch.cuda.mem_get_info(self.torch_device)[0])
        return host_memory_available()

    def name(self) -> str:
        if self.is_cuda:
            return torch.cuda.get_device_name(self.torch_device)
        return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def resolve_device(device: str | torch.device | Device | None = None) -> Device:
    """``"cuda"``, ``"cuda:1"``, ``"cpu"`` or None (CUDA when available); a clear error when CUDA is
    requested on a machine without it."""
    if isinstance(device, Device):
        return device
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        d = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ConfigError("device", device, f"'cpu', 'cuda' or 'cuda:N' ({e})") from None
    if d.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("device", str(device),
                              f"a machine with CUDA, but torch {torch.__version__} sees no CUDA device "
                              "(use device='cpu')")
        index = d.index if d.index is not None else torch.cuda.current_device()
        if index >= torch.cuda.device_count():
            raise ConfigError("device", str(device), f"one of cuda:0..cuda:{torch.cuda.device_count() - 1}")
        d = torch.device("cuda", index)
    elif d.type != "cpu":
        raise ConfigError("device", str(device), "'cpu' or 'cuda[:N]' (other backends are not supported)")
    return Device(d)


def versions(dev: Device) -> dict:
    """GPU, driver, CUDA and torch versions for a Profile's or probe file's ``meta``."""
    out = {"torch": torch.__version__, "cuda": torch.version.cuda or "", "device": dev.name(),
           "python": platform.python_version(), "host": platform.node()}
    if dev.is_cuda:
        p = torch.cuda.get_device_properties(dev.torch_device)
        out.update(sm_count=p.multi_processor_count, gpu_memory_bytes=int(p.total_memory),
                   capability=f"{p.major}.{p.minor}")
        try:
            out["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader", f"-i={dev.torch_device.index}"],
                capture_output=True, text=True, timeout=20).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            out["driver"] = "unknown (nvidia-smi not found)"
    return out
