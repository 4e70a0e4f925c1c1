"""Placements made real: which weights live in host memory and how they come back for each layer.

``build(spec, policy, device)`` turns a Policy (or a Placement) into a Transformer whose weight
provider is one of:

- ``Resident`` (policy ``none``): every layer on the device.
- ``CopyPath`` (``VllmCopy``, ``copy_prefix``; vLLM 0.7's ``cpu_offload_gb``): each offloaded
  parameter lives in pinned host memory on its own; right before its layer runs, it is copied with
  ``.to(device, non_blocking=True)`` on the compute stream into a freshly allocated device tensor.
- ``Uva`` (``VllmUva``; today's ``--cpu-offload-gb``): offloaded parameters stay in pinned host
  memory and the kernels read them there over the host link (a CUDA view of pinned memory via
  ``__cuda_array_interface__``); nothing is copied.
- ``PrefetchRing`` (``Prefetch``, ``interval``): each offloaded layer (its offloaded parameters,
  with ``params``) is ONE flat pinned tensor; a dedicated copy stream fills static device staging
  slots as ``placement.schedule`` says (offloadlab/schedule.py: the slot of each offloaded layer,
  the read each copy waits for). The compute stream waits on the copy's event before the layer; the
  copy into a slot waits on the event recorded after the last layer that read it. Nothing is
  allocated inside the layer loop. ``wrap=True`` (vLLM's prefetch backend) issues the next step's
  first copies during this step, once their slots' last readers have been issued. ``join_at_step_end=True``
  (``build``) makes the compute stream wait for the copy stream when the layers are done, as vLLM
  does in CUDA-graph steps (``join_after_forward`` inside each captured graph, ``sync_prev_onload``
  before each replay: vllm/model_executor/offloader/prefetch.py, vllm/compilation/cuda_graph.py), so
  a GPU run can compare joined against overlapped cross-step prefetch (sim: ``join="full"``).

A placement's ``names`` (``params`` on a policy) choose which parameters of a layer are offloaded;
without them, a prefix in ``ModelSpec.layer_param_shapes`` order.

On CPU the streams and events are no-ops and copies are plain copies (device.py), so the same code
is tested there: offloaded outputs equal resident outputs exactly.

Before any tensor is allocated, ``build`` checks the placement against free GPU and host memory
and raises DoesNotFitError with the numbers.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from offloadlab.checks import check_bool
from offloadlab.errors import ConfigError, DoesNotFitError
from offloadlab.policy import NoOffload, Placement, pinned_bytes
from offloadlab.specs import GiB, ModelSpec

from .device import Device, dtype_for, host_memory_available, resolve_device
from .model import Arch, Resident, Transformer
from .weights import CheckpointWeights, RandomWeights

ALIGN_BYTES = 256  # every parameter view in a flat buffer starts on this boundary


# ----------------------------------------------------------------------------------------------
# A layer (or the offloaded part of one) as one flat tensor


@dataclass(frozen=True)
class FlatLayout:
    """Offsets of some parameters inside one flat buffer (in the given order, each start aligned)."""

    shapes: tuple[tuple[int, ...], ...]
    offsets: tuple[int, ...]
    numel: int

    @classmethod
    def of(cls, shapes, itemsize: int) -> "FlatLayout":
        align = max(1, ALIGN_BYTES // itemsize)
        offsets, n = [], 0
        for s in shapes:
            offsets.append(n)
            n = -(-(n + math.prod(s)) // align) * align
        return cls(tuple(map(tuple, shapes)), tuple(offsets), n)

    def views(self, flat: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Views of ``flat`` (at least ``numel`` elements) shaped as the parameters."""
        assert flat.dim() == 1 and flat.numel() >= self.numel, f"flat buffer of {flat.numel()} < {self.numel}"
        return tuple(flat[o:o + math.prod(s)].view(s) for o, s in zip(self.offsets, self.shapes))


def offloaded_params(spec: ModelSpec, pl: Placement, i: int) -> tuple[int, ...]:
    """Indices (in ``layer_param_shapes`` order) of layer i's parameters that live in host memory."""
    if pl.names is None:
        return tuple(range(len(pl.offloaded[i])))
    order = [n for n, _ in spec.layer_param_shapes]
    return tuple(order.index(n) for n in pl.names[i])


# ----------------------------------------------------------------------------------------------
# Weight providers (the loop in Transformer.forward_layers calls begin_step, acquire, release)


def _assign(layer: nn.Module, tensors) -> None:
    """Make ``tensors`` (layer_param_shapes order) the layer's parameters."""
    for (name, _), t in zip(list(layer.named_parameters()), tensors):
        mod_name, _, attr = name.rpartition(".")
        setattr(layer.get_submodule(mod_name), attr, nn.Parameter(t, requires_grad=False))


class CopyPath:
    """vLLM 0.7's copy path: per-parameter ``.to(device, non_blocking=True)`` on the compute stream."""

    mechanism = "copy"

    def __init__(self, layers: nn.ModuleList, offloaded: list[tuple[int, ...]], dev: Device):
        self.layers, self.dev, self.offloaded = layers, dev, offloaded

    def begin_step(self, tracer) -> None:
        pass

    def acquire(self, i: int, tracer) -> tuple[torch.Tensor, ...]:
        w, off = self.layers[i].weights(), self.offloaded[i]
        if not off:
            return w
        t0 = tracer.stamp()
        # fresh device tensors (the caching allocator's), freed after the layer
        w = tuple(self.dev.to_device(p) if k in off else p for k, p in enumerate(w))
        tracer.span("compute", "copy", i, t0, tracer.stamp())
        return w

    def release(self, i: int, tracer) -> None:
        pass


class _HostArray:
    """Pinned host memory described as CUDA memory (``__cuda_array_interface__``): with unified
    addressing a pinned host pointer is a valid device pointer, so kernels read it over the link."""

    def __init__(self, t: torch.Tensor):
        assert t.is_pinned() and t.is_contiguous(), "a UVA view needs a contiguous pinned tensor"
        self.keep = t
        self.__cuda_array_interface__ = {"shape": (t.numel() * t.element_size(),), "typestr": "|u1",
                                         "data": (t.data_ptr(), False), "version": 2, "strides": None}


def uva_view(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CUDA tensor aliasing pinned host tensor ``t`` (zero-copy), as vLLM's UVA backend makes."""
    try:
        raw = torch.as_tensor(_HostArray(t), device=device)
    except (RuntimeError, TypeError) as e:
        raise ConfigError("policy", "uva", f"a CUDA build that maps pinned host memory into the device ({e})") \
            from None
    return raw.view(t.dtype).view(t.shape)


class Uva(Resident):
    """vLLM's UVA backend: offloaded parameters stay in pinned host memory and the layer's kernels
    read them there, over the host link, in every forward pass (nothing is copied)."""

    mechanism = "uva"

    def __init__(self, layers: nn.ModuleList, offloaded: list[tuple[int, ...]], dev: Device):
        super().__init__(layers)
        # the tuples the kernels use, made once: device-side aliases of host memory on a GPU, the
        # host tensors themselves on CPU
        self.weights = [tuple(uva_view(p, dev.torch_device) if dev.is_cuda and k in off else p
                              for k, p in enumerate(layer.weights())) for layer, off in zip(layers, offloaded)]

    def acquire(self, i: int, tracer) -> tuple[torch.Tensor, ...]:
        return self.weights[i]


class PrefetchRing:
    """Flat pinned layers, a copy stream, static staging slots, one event per copy and per release.

    Which slot each offloaded layer computes from, and which read each copy into a slot waits for,
    is ``placement.schedule`` (offloadlab/schedule.py), the schedule the simulator follows too.
    ``wrap`` (vLLM's prefetch backend): the next step's first copies are issued during this step,
    each once the last reader of its slot has been issued."""

    mechanism = "prefetch"

    def __init__(self, layers: nn.ModuleList, placement: Placement, dev: Device, host: dict[int, torch.Tensor],
                 layouts: dict[int, FlatLayout], offloaded: list[tuple[int, ...]], dtype: torch.dtype):
        self.layers, self.dev = layers, dev
        self.order = placement.offloaded_layers  # offloaded layer ids, in the schedule's numbering
        self.schedule = placement.schedule
        self.index = {layer: m for m, layer in enumerate(self.order)}
        self.host = [host[j] for j in self.order]  # flat pinned tensors
        numel = max(layouts[j].numel for j in self.order)
        self.buffers = [torch.empty(numel, device=dev.torch_device, dtype=dtype) for _ in range(self.schedule.ring)]
        self.weights = []  # per offloaded layer: the tuple it computes with (resident params + slot views)
        for m, j in enumerate(self.order):
            staged = dict(zip(offloaded[j], layouts[j].views(self.buffers[self.schedule.slot(m)])))
            self.weights.append(tuple(staged.get(k, p) for k, p in enumerate(layers[j].weights())))
        self.sizes = [layouts[j].numel for j in self.order]
        self.copy_stream = dev.stream()
        self.copied = [dev.event() for _ in self.order]  # recorded on the copy stream after copy m
        self.freed = [dev.event() for _ in self.order]  # recorded on the compute stream after layer m ran
        self.primed = False  # wrap: the first copies of the next step are already issued
        self.issued = 0  # copies issued since the step began (tests and asserts)
        self.join = False  # join the copy stream when the layers are done (vLLM's graph steps)
        self.joins = 0  # steps joined (tests)

    def _issue(self, m: int, tracer, step_offset: int = 0) -> None:
        after = self.schedule.waits_for(m)
        with self.dev.use_stream(self.copy_stream):
            if after is not None and (after[0] == 0 or step_offset):  # the slot's last reader
                self.copy_stream.wait_event(self.freed[after[1]])
            t0 = tracer.stamp(self.copy_stream)
            self.buffers[self.schedule.slot(m)][:self.sizes[m]].copy_(self.host[m], non_blocking=True)
            t1 = tracer.stamp(self.copy_stream)
            self.copied[m].record(self.copy_stream)
        tracer.span("copy", "copy", self.order[m], t0, t1, step=tracer.step + step_offset)
        self.issued += 1

    def begin_step(self, tracer) -> None:
        self.issued = 0
        if not self.order or self.primed:
            return
        # the previous step's layers may still read the slots: the first copies wait for them
        self.copy_stream.wait_stream(self.dev.current_stream())
        for m in self.schedule.first_copies():
            self._issue(m, tracer)
        self.primed = self.schedule.wrap

    def end_step(self, tracer) -> None:
        """After the last layer: in join mode the compute stream waits for every copy issued so far,
        the next step's included (vLLM's ``join_after_forward``), before the LM head runs."""
        if not (self.join and self.order):
            return
        t0 = tracer.stamp()
        self.dev.current_stream().wait_stream(self.copy_stream)
        tracer.span("compute", "wait", self.order[-1], t0, tracer.stamp())
        self.joins += 1

    def acquire(self, i: int, tracer) -> tuple[torch.Tensor, ...]:
        m = self.index.get(i)
        if m is None:
            return self.layers[i].weights()
        t0 = tracer.stamp()
        self.dev.current_stream().wait_event(self.copied[m])
        tracer.span("compute", "wait", i, t0, tracer.stamp())
        return self.weights[m]

    def release(self, i: int, tracer) -> None:
        m = self.index.get(i)
        if m is None:
            return
        self.freed[m].record(self.dev.current_stream())
        nxt = self.schedule.after_read(m)
        if nxt is not None:
            self._issue(nxt, tracer)
        for w in self.schedule.wrapped_after(m):  # the next step's copies into slots now read for good
            self._issue(w, tracer, step_offset=1)


# ----------------------------------------------------------------------------------------------
# Memory check and build


def _check_placement(spec: ModelSpec, pl: Placement) -> list[tuple[int, ...]]:
    """Check a placement against the model; return each layer's offloaded parameter indices."""
    if pl.layers != spec.layers or pl.layer_bytes != spec.layer_bytes:
        raise ConfigError("placement", f"{pl.layers} layers of {pl.layer_bytes} bytes",
                          f"{spec.layers} layers of {spec.layer_bytes} bytes ({spec.name})")
    if pl.mechanism not in ("none", "copy", "uva", "prefetch"):
        raise ConfigError("placement.mechanism", pl.mechanism, "'none', 'copy', 'uva' or 'prefetch'")
    if pl.mechanism == "prefetch" and pl.offloaded_layers and pl.slots < 1:
        raise ConfigError("placement.slots", pl.slots, "an integer >= 1 (staging buffers)")
    names = [n for n, _ in spec.layer_param_shapes]
    out = []
    for i, sizes in enumerate(pl.offloaded):
        try:
            idx = offloaded_params(spec, pl, i)
        except ValueError:
            raise ConfigError(f"placement.names[{i}]", pl.names[i], f"names among {names}") from None
        if tuple(spec.layer_param_bytes[k] for k in idx) != tuple(sizes) or len(set(idx)) != len(idx):
            raise ConfigError(f"placement.offloaded[{i}]", sizes,
                              f"the bytes of parameters {[names[k] for k in idx]} of {spec.name}")
        out.append(idx)
    return out


def memory_needs(spec: ModelSpec, pl: Placement, reserve_bytes: int = 0) -> dict[str, int]:
    """Bytes a placement needs on the device (resident weights, staging, reserve) and in host memory
    (pinned: PyTorch's pinned allocator rounds each allocation up to a power of two)."""
    resident = spec.layers * spec.layer_bytes - pl.offloaded_bytes + spec.non_layer_bytes
    # this runtime pins each parameter on its own (copy path, UVA) but one flat tensor per prefetched
    # layer (vLLM's slab layout without its 2 GiB chunking), whatever the policy's pin_memory (which
    # vLLM honours: Placement.host_pinned_bytes), so count what it allocates
    pinned = pinned_bytes(b for p in pl.offloaded for b in p) if pl.mechanism != "prefetch" else \
        pinned_bytes(pl.layer_offloaded_bytes(i) for i in pl.offloaded_layers)
    return {"device_weights": resident, "staging": pl.staging_bytes, "reserve": int(reserve_bytes),
            "device": resident + pl.staging_bytes + int(reserve_bytes), "host": pl.offloaded_bytes,
            "host_pinned": pinned}


def check_fits(spec: ModelSpec, pl: Placement, dev: Device, reserve_bytes: int = 0, label: str = "") -> dict:
    """Raise DoesNotFitError unless the placement fits free device memory and available host memory.

    ``reserve_bytes``: what the caller will add on the device (KV cache, activations). On a CPU
    device, device and host are the same memory (and nothing is pinned)."""
    need = memory_needs(spec, pl, reserve_bytes)
    host_free = host_memory_available()
    what = f"{spec.name} with {label or pl.mechanism}"
    g = lambda b: f"{b / GiB:.2f} GiB"  # noqa: E731
    if dev.is_cuda:
        free = dev.memory_free()
        if need["device"] > free:
            raise DoesNotFitError(
                f"{what} does not fit GPU memory of {dev.name()}: needs {g(need['device'])} (weights "
                f"{g(need['device_weights'])} + staging {g(need['staging'])} + reserve {g(need['reserve'])}), "
                f"{g(free)} free; offload more layers or use a smaller batch/context")
        if need["host_pinned"] > host_free:
            raise DoesNotFitError(f"{what} does not fit host memory: offloads {g(need['host'])} "
                                  f"({g(need['host_pinned'])} pinned), {g(host_free)} available")
    elif need["device"] + need["host"] > host_free:
        raise DoesNotFitError(f"{what} does not fit host memory on CPU: needs {g(need['device'] + need['host'])} "
                              f"(weights, staging and reserve), {g(host_free)} available")
    return need


def build(spec: ModelSpec, policy=NoOffload(), device=None, *, seed: int = 0, checkpoint=None,
          truncate: bool = False, arch: Arch | None = None, dtype: torch.dtype | None = None,
          reserve_bytes: int = 0, join_at_step_end: bool = False) -> Transformer:
    """A Transformer with weights placed by ``policy`` (a Policy or a Placement) on ``device``.

    Weights are seeded random (``seed``) or read from ``checkpoint`` (a local HF-layout safetensors
    file or directory; ``truncate`` reads the first ``spec.layers`` layers of a deeper one). Every
    check (device, dtype, placement, checkpoint shapes, memory) runs before the first weight is
    allocated. The model gets ``.placement`` and ``.dev`` attributes. ``join_at_step_end``: a
    prefetch ring joins its copy stream after the last layer, as vLLM's CUDA-graph steps do.
    """
    check_bool("join_at_step_end", join_at_step_end)
    dev = resolve_device(device)
    dtype = dtype_for(spec.weight_bytes, dtype)
    placement = policy if isinstance(policy, Placement) else policy.place(spec)
    offloaded = _check_placement(spec, placement)
    source = (CheckpointWeights(checkpoint, spec, dtype, truncate) if checkpoint is not None
              else RandomWeights(spec, dtype, seed))
    check_fits(spec, placement, dev, reserve_bytes, getattr(policy, "label", placement.mechanism))

    model = Transformer(spec, arch or source.arch or Arch(), dtype)
    d = dev.torch_device
    model.embed_tokens.weight = nn.Parameter(source.embed(d), requires_grad=False)
    model.norm.weight = nn.Parameter(source.norm(d), requires_grad=False)
    if model.lm_head is not None:
        model.lm_head.weight = nn.Parameter(source.lm_head(d), requires_grad=False)

    itemsize = torch.empty((), dtype=dtype).element_size()
    shapes = [s for _, s in spec.layer_param_shapes]
    host_flat: dict[int, torch.Tensor] = {}
    layouts: dict[int, FlatLayout] = {}
    for i, layer in enumerate(model.layers):
        w = list(source.layer(i, d))  # on the device (random) or the host (checkpoint), then placed
        off = offloaded[i]
        if placement.mechanism == "prefetch" and off:  # one flat pinned tensor per layer
            layouts[i] = layout = FlatLayout.of([shapes[k] for k in off], itemsize)
            host_flat[i] = flat = dev.host_empty(layout.numel, dtype)
            flat.zero_()
            for k, view in zip(off, layout.views(flat)):
                view.copy_(w[k])
                w[k] = view
        for k, p in enumerate(w):
            if k not in off:
                w[k] = p.to(d)
            elif placement.mechanism != "prefetch":  # copy path, UVA: each parameter pinned on its own
                w[k] = dev.pin(p.to("cpu", copy=True))
        _assign(layer, w)
        del w
    if not placement.offloaded_layers or placement.mechanism == "none":
        model.provider = Resident(model.layers)
    elif placement.mechanism == "prefetch":
        model.provider = PrefetchRing(model.layers, placement, dev, host_flat, layouts, offloaded, dtype)
        model.provider.join = join_at_step_end
    elif placement.mechanism == "copy":
        model.provider = CopyPath(model.layers, offloaded, dev)
    else:
        model.provider = Uva(model.layers, offloaded, dev)
    model.placement, model.dev, model._device = placement, dev, d
    return model
