"""Offload policies: which weights live in host memory, and how they come back to the GPU.

- ``NoOffload``: every layer resident.
- ``VllmCopy``: vLLM's ``--cpu-offload-gb`` copy path (0.7): walk layers 0, 1, 2, ... and their
  parameters in order, offloading whole parameters while the offloaded total is below the budget;
  right before an offloaded layer runs, each of its parameters is copied with
  ``.to(device, non_blocking=True)`` on the compute stream.
- ``VllmUva``: today's ``--cpu-offload-gb`` (UVA backend): the same choice of parameters, but
  nothing is copied: kernels read the offloaded weights from pinned host memory over the host
  link (zero-copy) in every forward pass.
- ``Prefetch``: of every ``group`` layers the last ``per_group`` are offloaded; a copy stream
  prefetches them into ``slots`` static GPU staging buffers; a copy into a slot waits for the last
  reader of that slot (``Placement.schedule``: offloadlab/schedule.py). The paper's interval k with n buffers is
  ``Prefetch(group=k, per_group=1, slots=n)`` (``interval(k, n)``).

``policy.place(model)`` gives the ``Placement``: per layer, the parameter bytes that live in host
memory. Embedding and LM head are never offloaded. ``params`` restricts any policy to parameters
whose dotted name contains the given segments (vLLM's ``--cpu-offload-params``/``--offload-params``:
"gate_up_proj" matches "mlp.gate_up_proj.weight", "gate" does not).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Union

from .checks import check_bool, check_int, check_range
from .errors import ConfigError
from .schedule import SlotSchedule
from .specs import GiB, ModelSpec


@dataclass(frozen=True)
class Placement:
    """Where each layer's weights live: ``offloaded[i]`` lists the offloaded parameter sizes of layer i."""

    offloaded: tuple[tuple[int, ...], ...]
    layer_bytes: int
    mechanism: str  # "none" | "copy" | "uva" | "prefetch"
    slots: int = 0
    names: tuple[tuple[str, ...], ...] | None = None  # offloaded parameter names; None: a prefix in
    #                                                   ModelSpec.layer_param_shapes order
    wrap: bool = False  # prefetch continues across steps (see Prefetch.wrap)
    host_alloc: str = "param"  # how host memory holds the offloaded weights (see host_pinned_bytes)

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
    def host_pinned_bytes(self) -> int:
        """Host bytes the offloaded weights occupy, as vLLM allocates them (``host_alloc``):

        - ``param``: each offloaded parameter pinned on its own through PyTorch's caching host
          allocator, which rounds every allocation up to a power of two: UVA
          (vllm/model_executor/offloader/uva.py, ``cpu_data.pin_memory()``), the copy path (same
          file, UVA disabled) and the prefetch backend as released
          (vllm/model_executor/offloader/prefetch.py, ``_CpuParamOffloader``:
          ``torch.empty_strided(..., pin_memory=True)`` per parameter). vllm#56410, #58178.
        - ``slab``: newer prefetch code packs each offloaded layer into one slab whose pinned CPU
          source is split into chunks of at most 2 GiB, the last at least 128 MiB
          (vllm/model_executor/offloader/slab.py, ``build_slab_chunk_ranges``); each chunk rounded.
        - ``exact``: ``VLLM_WEIGHT_OFFLOADING_DISABLE_PIN_MEMORY=1`` (base.py ``should_pin_memory``):
          UVA then maps an exact-size ``cudaHostAlloc`` (the workaround users give in #56410,
          #58178); the copy path and prefetch keep pageable, exact-size host tensors.
        """
        if self.host_alloc == "exact":
            return self.offloaded_bytes
        if self.host_alloc == "slab":
            sizes = [c for i in self.offloaded_layers for c in slab_chunks(self.layer_offloaded_bytes(i))]
        else:
            sizes = [b for p in self.offloaded for b in p]
        return pinned_bytes(sizes)

    @property
    def schedule(self) -> SlotSchedule:
        """The staging-slot schedule of a prefetch placement (slot per offloaded layer, what each copy waits for)."""
        assert self.mechanism == "prefetch", f"only prefetch placements stage layers, not {self.mechanism!r}"
        return SlotSchedule(len(self.offloaded_layers), self.slots, self.wrap)

    @property
    def staging_bytes(self) -> int:
        """GPU bytes the mechanism needs to bring offloaded weights back.

        Prefetch: exactly ``slots`` static buffers, each the size of the largest offloaded layer part,
        even when fewer layers are offloaded: vLLM's StaticBufferPool allocates ``slot_capacity =
        offload_prefetch_step`` copies of every offloaded parameter
        (vllm/model_executor/offloader/prefetch.py, ``PrefetchOffloader.post_init``). Copy path: the
        fresh device copies of one layer's offloaded parameters, alive while that layer runs (vLLM's
        profiling run sees them). UVA: none.
        """
        if self.mechanism == "prefetch" and self.offloaded_layers:
            biggest = max(self.layer_offloaded_bytes(i) for i in self.offloaded_layers)
            return self.slots * biggest
        if self.mechanism == "copy" and self.offloaded_layers:
            return max(self.layer_offloaded_bytes(i) for i in self.offloaded_layers)
        return 0


def pinned_bytes(sizes) -> int:
    """Host bytes PyTorch's caching pinned-memory allocator takes for allocations of ``sizes``: each
    rounded up to a power of two."""
    return sum(1 << (b - 1).bit_length() for b in sizes if b > 0)


SLAB_CHUNK = 2 * GiB  # vllm/model_executor/offloader/slab.py PINNED_CPU_SLAB_CHUNK_BYTES
SLAB_MIN_TAIL = 128 * 1024**2  # PINNED_CPU_SLAB_MIN_TAIL_BYTES


def slab_chunks(total: int, chunk: int = SLAB_CHUNK, min_tail: int = SLAB_MIN_TAIL) -> list[int]:
    """Sizes of the pinned chunks of one slab: vLLM's ``build_slab_chunk_ranges`` (slab.py): full
    chunks, and a tail under ``min_tail`` is made ``min_tail`` by shortening the chunk before it."""
    if total <= 0:
        return []
    full, tail = divmod(total, chunk)
    if tail == 0 or tail >= min_tail or full == 0:
        return [chunk] * full + ([tail] if tail else [])
    return [chunk] * (full - 1) + [chunk + tail - min_tail, min_tail]


HOST_ALLOCS = ("param", "slab", "exact")


@dataclass(frozen=True)
class NoOffload:
    kind = "none"

    @property
    def label(self) -> str:
        return "none"

    def place(self, model: ModelSpec) -> Placement:
        return Placement(tuple(() for _ in range(model.layers)), model.layer_bytes, "none")


def _matches(name: str, pattern: str) -> bool:
    """vLLM's segment match: the dotted ``pattern`` is a contiguous run of ``name``'s segments."""
    segs, pat = name.split("."), pattern.split(".")
    return any(segs[i:i + len(pat)] == pat for i in range(len(segs) - len(pat) + 1))


def _selected(model: ModelSpec, params: tuple[str, ...]) -> list[tuple[str, int]]:
    """(name, bytes) of one layer's parameters that ``params`` selects (all when empty)."""
    sel = [(n, b) for (n, _), b in zip(model.layer_param_shapes, model.layer_param_bytes)
           if not params or any(_matches(n, p) for p in params)]
    if not sel:
        raise ConfigError("params", ",".join(params), f"segments of {[n for n, _ in model.layer_param_shapes]}")
    return sel


def _check_params(params) -> None:
    if isinstance(params, str) or not all(isinstance(p, str) and p for p in params):
        raise ConfigError("params", params, "a tuple of parameter name segments, e.g. ('gate_up_proj',)")


def _budget_walk(model: ModelSpec, gib: float, params: tuple[str, ...], mechanism: str) -> Placement:
    """vLLM's rule: layers 0, 1, 2, ..., parameters in order; offload while offloaded < budget."""
    budget = gib * GiB
    sel = _selected(model, params)
    most = model.layers * sum(b for _, b in sel)
    if budget > most:
        raise ConfigError("cpu_offload_gb", gib, f"at most the {most / GiB:.2f} GiB of decoder-layer parameters "
                          f"it may offload from {model.name} (embedding and LM head are never offloaded)")
    done, sizes, names = 0, [], []
    for _ in range(model.layers):
        off = []
        for name, nbytes in sel:  # vLLM: `if offloaded >= max: break`, then offload
            if done >= budget:
                break
            off.append((name, nbytes))
            done += nbytes
        sizes.append(tuple(b for _, b in off))
        names.append(tuple(n for n, _ in off))
    return Placement(tuple(sizes), model.layer_bytes, mechanism, names=tuple(names))


@dataclass(frozen=True)
class _Budget:
    """vLLM's ``--cpu-offload-gb`` (GiB per GPU, as vLLM counts it) and ``--cpu-offload-params``."""

    cpu_offload_gb: float
    params: tuple[str, ...] = ()
    pin_memory: bool = True  # False: VLLM_WEIGHT_OFFLOADING_DISABLE_PIN_MEMORY=1 (exact-size host memory)
    kind = ""  # "vllm" (copy path) or "uva"
    mechanism = ""

    def __post_init__(self):
        check_range("cpu_offload_gb", self.cpu_offload_gb, 0, math.inf, "a number of GiB >= 0")
        _check_params(self.params)
        check_bool("pin_memory", self.pin_memory)

    @property
    def label(self) -> str:
        return (f"{self.kind} {self.cpu_offload_gb:g}GiB" + (f" [{','.join(self.params)}]" if self.params else "")
                + ("" if self.pin_memory else " unpinned"))

    def place(self, model: ModelSpec) -> Placement:
        pl = _budget_walk(model, self.cpu_offload_gb, self.params, self.mechanism)
        return pl if self.pin_memory else dataclasses.replace(pl, host_alloc="exact")


def floor_budget(gib: float) -> float:
    """``gib`` rounded down to the 0.01 GiB steps offload budgets are written in."""
    return math.floor(gib * 100) / 100


def budget_for(offloaded_bytes: int) -> float:
    """The ``--cpu-offload-gb`` that makes vLLM's walk offload the same layers as ``offloaded_bytes``
    of whole layers: rounded down to 0.01 GiB (less than a down_proj), since a budget a hair above
    the bytes would take one more parameter, and one below still ends inside the same last layer."""
    return floor_budget(offloaded_bytes / GiB)


@dataclass(frozen=True)
class VllmCopy(_Budget):
    """The 0.7 copy path: per-parameter synchronous copies on the compute stream before each layer."""

    kind = "vllm"
    mechanism = "copy"


@dataclass(frozen=True)
class VllmUva(_Budget):
    """The UVA backend (today's default): zero-copy reads over the host link in every forward pass."""

    kind = "uva"
    mechanism = "uva"


@dataclass(frozen=True)
class Prefetch:
    """Last ``per_group`` of every ``group`` layers offloaded, prefetched into ``slots`` buffers."""

    group: int
    per_group: int = 1
    slots: int = 2
    params: tuple[str, ...] = ()
    wrap: bool = False  # vLLM's prefetch backend: the next step's first copies start as soon as their
    #                     slots are free (preload), instead of at the step's start (the paper's design)
    pin_memory: bool = True  # False: VLLM_WEIGHT_OFFLOADING_DISABLE_PIN_MEMORY=1 (vLLM >= #37699)
    slab: bool = False  # newer vLLM: one pinned slab per layer in <= 2 GiB chunks (slab.py)
    kind = "prefetch"

    def __post_init__(self):
        for name in ("group", "per_group", "slots"):
            check_int({"group": "k (group size)", "slots": "staging buffers"}.get(name, name), getattr(self, name), 1)
        if self.per_group > self.group:
            raise ConfigError("per_group", self.per_group, f"at most group={self.group}")
        _check_params(self.params)
        for name in ("wrap", "pin_memory", "slab"):
            check_bool(name, getattr(self, name))

    @property
    def label(self) -> str:
        sel = (f" [{','.join(self.params)}]" if self.params else "") + ("" if self.pin_memory else " unpinned") \
            + (" slab" if self.slab else "")
        if self.wrap:
            return f"vllm-prefetch g={self.group} n={self.per_group} s={self.slots}{sel}"
        if self.per_group == 1:
            return f"interval k={self.group} buf={self.slots}{sel}"
        return f"prefetch g={self.group} n={self.per_group} s={self.slots}{sel}"

    def is_offloaded(self, layer: int) -> bool:
        """The one home of the rule: the last ``per_group`` of every ``group`` layers."""
        return layer % self.group >= self.group - self.per_group

    def offloaded_count(self, layers: int) -> int:
        """How many of ``layers`` layers this policy offloads."""
        return sum(1 for i in range(layers) if self.is_offloaded(i))

    def place(self, model: ModelSpec) -> Placement:
        sel = _selected(model, self.params)
        sizes = tuple(b for _, b in sel)
        names = tuple(n for n, _ in sel)
        off = [self.is_offloaded(i) for i in range(model.layers)]
        return Placement(tuple(sizes if o else () for o in off), model.layer_bytes, "prefetch", slots=self.slots,
                         names=tuple(names if o else () for o in off), wrap=self.wrap,
                         host_alloc="exact" if not self.pin_memory else "slab" if self.slab else "param")


def copy_prefix(model: ModelSpec, layers: int) -> Placement:
    """The copy path with exactly layers 0..layers-1 offloaded, whole (the probe's ``sync_prefix``)."""
    check_int("layers", layers, 0, model.layers)
    full = model.layer_param_bytes
    return Placement(tuple(full if i < layers else () for i in range(model.layers)), model.layer_bytes, "copy")


def interval(k: int, slots: int = 2) -> Prefetch:
    """The paper's policy: layer i offloaded when i % k == k-1, ``slots`` staging buffers (the paper's
    "buffers")."""
    return Prefetch(group=k, per_group=1, slots=slots)


Policy = Union[NoOffload, VllmCopy, VllmUva, Prefetch]

_SYNTAX = "none | vllm:GIB | uva:GIB | interval:K[,BUFFERS] | prefetch:G,N,S"  # BUFFERS, S: staging slots


def parse_policy(text: str) -> Policy:
    """Parse the CLI form: ``none``, ``vllm:6.5``, ``uva:6.5``, ``interval:2`` or ``interval:2,4``, ``prefetch:4,1,2``."""
    name, _, args = text.strip().partition(":")
    parts = [a for a in args.split(",") if a.strip()] if args else []
    try:
        if name == "none" and not parts:
            return NoOffload()
        if name == "vllm" and len(parts) == 1:
            return VllmCopy(float(parts[0]))
        if name == "uva" and len(parts) == 1:
            return VllmUva(float(parts[0]))
        if name == "interval" and len(parts) in (1, 2):
            return interval(*(int(p) for p in parts))
        if name == "prefetch" and len(parts) == 3:
            return Prefetch(*(int(p) for p in parts))
    except ValueError as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError("policy", text, f"numbers in {_SYNTAX}") from None
    raise ConfigError("policy", text, _SYNTAX)
