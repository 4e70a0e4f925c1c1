"""Offload policies: which weights live in host memory, and how they come back to the GPU.

- ``NoOffload``: every layer resident.
- ``VllmCopy``: vLLM's ``--cpu-offload-gb`` copy path (0.7): walk layers 0, 1, 2, ... and their
  parameters in order, offloading whole parameters while the offloaded total is below the budget;
  right before an offloaded layer runs, each of its parameters is copied with
  ``.to(device, non_blocking=True)`` on the compute stream.
- ``Prefetch``: of every ``group`` layers the last ``per_group`` are offloaded; a copy stream
  prefetches them into ``slots`` static GPU staging buffers (slot = offloaded index % slots); a copy
  into a slot waits for the last reader of that slot. The paper's interval k with n buffers is
  ``Prefetch(group=k, per_group=1, slots=n)`` (``interval(k, n)``).

``policy.place(model)`` gives the ``Placement``: per layer, the parameter bytes that live in host
memory. Embedding and LM head are never offloaded.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Union

from .errors import ConfigError
from .specs import GiB, ModelSpec


@dataclass(frozen=True)
class Placement:
    """Where each layer's weights live: ``offloaded[i]`` lists the offloaded parameter sizes of layer i."""

    offloaded: tuple[tuple[int, ...], ...]
    layer_bytes: int
    mechanism: str  # "none" | "copy" | "prefetch"
    slots: int = 0

    @property
    def layers(self) -> int:
        return len(self.offloaded)

    def layer_offloaded_bytes(self, i: int) -> int:
        return sum(self.offloaded[i])

    @property
    def offloaded_layers(self) -> tuple[int, ...]:
        return tuple(i for i, p in enumerate(self.offloaded) if p)

    @property
    def offloaded_bytes(self) -> int:
        return sum(sum(p) for p in self.offloaded)

    @property
    def staging_bytes(self) -> int:
        """GPU bytes the mechanism needs to bring offloaded weights back.

        Prefetch: ``slots`` static buffers of one layer each (no more than there are offloaded layers). Copy path: the fresh device copies of
        one layer's offloaded parameters, alive while that layer runs (vLLM's profiling run sees them).
        """
        if self.mechanism == "prefetch" and self.offloaded_layers:
            return min(self.slots, len(self.offloaded_layers)) * self.layer_bytes  # no use for idle slots
        if self.mechanism == "copy" and self.offloaded_layers:
            return max(self.layer_offloaded_bytes(i) for i in self.offloaded_layers)
        return 0


@dataclass(frozen=True)
class NoOffload:
    kind = "none"

    @property
    def label(self) -> str:
        return "none"

    def place(self, model: ModelSpec) -> Placement:
        return Placement(tuple(() for _ in range(model.layers)), model.layer_bytes, "none")


@dataclass(frozen=True)
class VllmCopy:
    """vLLM's ``--cpu-offload-gb`` (GiB, as vLLM counts it) with the synchronous copy path."""

    cpu_offload_gb: float
    kind = "vllm"

    def __post_init__(self):
        v = self.cpu_offload_gb
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0:
            raise ConfigError("cpu_offload_gb", v, "a number of GiB >= 0")

    @property
    def label(self) -> str:
        return f"vllm {self.cpu_offload_gb:g}GiB"

    def place(self, model: ModelSpec) -> Placement:
        budget = self.cpu_offload_gb * GiB
        if budget > model.layers * model.layer_bytes:
            raise ConfigError("cpu_offload_gb", self.cpu_offload_gb,
                              f"at most the decoder layers' {model.layers * model.layer_bytes / GiB:.2f} GiB "
                              f"of {model.name} (embedding and LM head are never offloaded)")
        done, layers = 0, []
        for _ in range(model.layers):
            off = []
            for nbytes in model.layer_param_bytes:  # vLLM: `if offloaded >= max: break`, then offload
                if done >= budget:
                    break
                off.append(nbytes)
                done += nbytes
            layers.append(tuple(off))
        return Placement(tuple(layers), model.layer_bytes, "copy")


@dataclass(frozen=True)
class Prefetch:
    """Last ``per_group`` of every ``group`` layers offloaded, prefetched into ``slots`` buffers."""

    group: int
    per_group: int = 1
    slots: int = 2
    kind = "prefetch"

    def __post_init__(self):
        for name in ("group", "per_group", "slots"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                field = {"group": "k (group size)", "slots": "staging buffers"}.get(name, name)
                raise ConfigError(field, v, "an integer >= 1")
        if self.per_group > self.group:
            raise ConfigError("per_group", self.per_group, f"at most group={self.group}")

    @property
    def label(self) -> str:
        if self.per_group == 1:
            return f"interval k={self.group} buf={self.slots}"
        return f"prefetch g={self.group} n={self.per_group} s={self.slots}"

    def is_offloaded(self, layer: int) -> bool:
        return layer % self.group >= self.group - self.per_group

    def place(self, model: ModelSpec) -> Placement:
        full = model.layer_param_bytes
        layers = tuple(full if self.is_offloaded(i) else () for i in range(model.layers))
        return Placement(layers, model.layer_bytes, "prefetch", slots=self.slots)


def copy_prefix(model: ModelSpec, layers: int) -> Placement:
    """The copy path with exactly layers 0..layers-1 offloaded, whole (the probe's ``sync_prefix``)."""
    if isinstance(layers, bool) or not isinstance(layers, int) or not 0 <= layers <= model.layers:
        raise ConfigError("layers", layers, f"an integer in [0, {model.layers}]")
    full = model.layer_param_bytes
    return Placement(tuple(full if i < layers else () for i in range(model.layers)), model.layer_bytes, "copy")


def interval(k: int, buffers: int = 2) -> Prefetch:
    """The paper's policy: layer i offloaded when i % k == k-1, ``buffers`` staging buffers."""
    return Prefetch(group=k, per_group=1, slots=buffers)


Policy = Union[NoOffload, VllmCopy, Prefetch]

_SYNTAX = "none | vllm:GIB | interval:K[,BUFFERS] | prefetch:G,N,S"


def parse_policy(text: str) -> Policy:
    """Parse the CLI form: ``none``, ``vllm:6.5``, ``interval:2`` or ``interval:2,4``, ``prefetch:4,1,2``."""
    name, _, args = text.strip().partition(":")
    parts = [a for a in args.split(",") if a.strip()] if args else []
    try:
        if name == "none" and not parts:
            return NoOffload()
        if name == "vllm" and len(parts) == 1:
            return VllmCopy(float(parts[0]))
        if name == "interval" and len(parts) in (1, 2):
            return interval(*(int(p) for p in parts))
        if name == "prefetch" and len(parts) == 3:
            return Prefetch(*(int(p) for p in parts))
    except ValueError as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError("policy", text, f"numbers in {_SYNTAX}") from None
    raise ConfigError("policy", text, _SYNTAX)
