"""A race checker for the offload runtime that runs without a GPU.

On CPU the runtime's streams and events are no-ops (device.py), so a staging slot overwritten while a
layer still reads it would go unseen whenever the program order happens to be right. Here the runtime
runs on a :class:`RecordingDevice`: every stream, event record, event wait and stream wait is logged
in issue order, and a ``TorchDispatchMode`` logs every kernel and copy that touches a tracked buffer
(the staging slots), with the stream it was issued on and whether it reads or writes the buffer.

:func:`races` then builds the order CUDA guarantees (each stream in issue order, plus an edge from an
event's latest record to every later wait on it, and from a waited stream's work so far) with vector
clocks, and reports

- every read of a buffer not ordered after the copy that filled it (the latest write issued before
  the read), and
- every copy into a buffer not ordered after the reads of its previous contents.

The same recording works on a GPU (the wrappers forward to real CUDA streams and events), which is
how ``runtime/gpu_check.py`` records the paper's policies on CUDA. Run with the NullTracer: the
Tracer records its own CUDA events on the wrapped streams.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
from collections import defaultdict
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from .device import Device, resolve_device

COMPUTE = 0  # stream id of the device's current (compute) stream


@dataclass(frozen=True)
class Op:
    """One logged operation, in host issue order (``seq``)."""

    seq: int
    stream: int  # the stream it was issued on (-1: the host, for a synchronize)
    kind: str  # "kernel" | "record" | "wait_event" | "wait_stream" | "sync"
    name: str = ""  # aten op, or what was waited for
    reads: tuple[str, ...] = ()  # tracked buffers read
    writes: tuple[str, ...] = ()  # tracked buffers written
    event: int = -1  # record / wait_event: the event id
    other: int = -1  # wait_stream: the stream waited for


@dataclass(frozen=True)
class Race:
    buffer: str
    first: Op  # must happen before...
    second: Op  # ...this, and is not ordered before it
    what: str

    def __str__(self) -> str:
        return (f"{self.what} on {self.buffer}: op {self.second.seq} ({self.second.name}, stream "
                f"{self.second.stream}) is not ordered after op {self.first.seq} ({self.first.name}, "
                f"stream {self.first.stream})")


class Recorder:
    """The op log of one recorded run, and the buffers it tracks (by storage)."""

    def __init__(self):
        self.ops: list[Op] = []
        self.buffers: dict[int, str] = {}  # storage data_ptr -> name
        self._streams = 0
        self._events = 0
        self.current: list[RecStream] = []  # stream stack (use_stream); the bottom one is the compute stream

    def track(self, name: str, t: torch.Tensor) -> None:
        self.buffers[t.untyped_storage().data_ptr()] = name

    def log(self, stream: int, kind: str, **kw) -> None:
        self.ops.append(Op(len(self.ops), stream, kind, **kw))

    def new_stream_id(self) -> int:
        self._streams += 1
        return self._streams

    def new_event_id(self) -> int:
        self._events += 1
        return self._events

    def _names(self, tensors) -> tuple[str, ...]:
        out = []
        for t in tensors:
            name = self.buffers.get(t.untyped_storage().data_ptr()) if isinstance(t, torch.Tensor) else None
            if name is not None and name not in out:
                out.append(name)
        return tuple(out)

    @contextlib.contextmanager
    def watching(self):
        """Log every kernel touching a tracked buffer while the block runs."""
        with _KernelLog(self):
            yield self

    def to_json(self) -> str:
        return json.dumps({"buffers": sorted(self.buffers.values()), "ops": [dataclasses.asdict(o) for o in self.ops]})


class _KernelLog(TorchDispatchMode):
    def __init__(self, rec: Recorder):
        super().__init__()
        self.rec = rec

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        schema = func._schema
        written, read = [], []
        for i, a in enumerate(schema.arguments):
            v = args[i] if i < len(args) else kwargs.get(a.name)
            flat = tree_flatten(v)[0]
            (written if a.alias_info is not None and a.alias_info.is_write else read).extend(flat)
        # a view op (its result aliases an input, nothing written) moves no data
        view = not written and any(r.alias_info is not None for r in schema.returns)
        writes, reads = self.rec._names(written), self.rec._names(read)
        if (writes or reads) and not view:
            stream = self.rec.current[-1].id if self.rec.current else COMPUTE
            self.rec.log(stream, "kernel", name=str(func.overloadpacket.__name__), reads=reads, writes=writes)
        return func(*args, **kwargs)


class RecStream:
    """A stream that logs its waits and forwards them to the real one (a CUDA stream, or CPU's stand-in)."""

    def __init__(self, rec: Recorder, inner, sid: int):
        self.rec, self.inner, self.id = rec, inner, sid

    def wait_event(self, event: "RecEvent") -> None:
        self.rec.log(self.id, "wait_event", event=event.id)
        self.inner.wait_event(event.inner)

    def wait_stream(self, stream: "RecStream") -> None:
        self.rec.log(self.id, "wait_stream", other=stream.id)
        self.inner.wait_stream(stream.inner)

    def synchronize(self) -> None:
        self.rec.log(-1, "sync", name=f"stream {self.id}")
        self.inner.synchronize()


class RecEvent:
    def __init__(self, rec: Recorder, inner, eid: int):
        self.rec, self.inner, self.id = rec, inner, eid

    def record(self, stream: RecStream | None = None) -> None:
        stream = stream if stream is not None else self.rec.current[-1]
        self.rec.log(stream.id, "record", event=self.id)
        self.inner.record(stream.inner)

    def wait(self, stream: RecStream | None = None) -> None:
        (stream if stream is not None else self.rec.current[-1]).wait_event(self)

    def synchronize(self) -> None:
        self.rec.log(-1, "sync", name=f"event {self.id}")
        self.inner.synchronize()

    def query(self) -> bool:
        return self.inner.query()


@dataclass(frozen=True)
class RecordingDevice(Device):
    """A Device whose streams and events log what the offload code asks of them (see the module doc)."""

    recorder: Recorder = field(default_factory=Recorder, compare=False)

    def __post_init__(self):
        base = Device(self.torch_device)
        self.recorder.current.append(RecStream(self.recorder, base.current_stream(), COMPUTE))

    def stream(self):
        return RecStream(self.recorder, Device(self.torch_device).stream(), self.recorder.new_stream_id())

    def current_stream(self):
        return self.recorder.current[-1]

    @contextlib.contextmanager
    def use_stream(self, stream: RecStream):
        self.recorder.current.append(stream)
        try:
            with Device(self.torch_device).use_stream(stream.inner):
                yield
        finally:
            self.recorder.current.pop()

    def event(self, timing: bool = False):
        return RecEvent(self.recorder, Device(self.torch_device).event(timing), self.recorder.new_event_id())

    def synchronize(self) -> None:
        self.recorder.log(-1, "sync", name="device")
        Device(self.torch_device).synchronize()


def recording_device(device=None) -> RecordingDevice:
    return RecordingDevice(resolve_device(device).torch_device)


def _merge(into: dict, other: dict) -> None:
    for s, c in other.items():
        if c > into.get(s, 0):
            into[s] = c


def races(ops: list[Op]) -> list[Race]:
    """Reads of a buffer not ordered after its fill, and copies into it not ordered after the reads of
    its previous contents, under CUDA's ordering (stream order, event and stream waits)."""
    clock: dict[int, dict[int, int]] = defaultdict(dict)  # stream -> vector clock
    recorded: dict[int, dict[int, int]] = {}  # event -> clock at its latest record
    at: dict[int, dict[int, int]] = {}  # kernel seq -> its clock

    def before(a: Op, b: Op) -> bool:
        return at[a.seq][a.stream] <= at[b.seq].get(a.stream, 0)

    fill: dict[str, Op] = {}  # buffer -> the latest write
    readers: dict[str, list[Op]] = defaultdict(list)  # buffer -> reads since that write
    found: list[Race] = []
    for op in ops:
        if op.kind == "sync":  # the host waited for everything issued so far
            done: dict[int, int] = {}
            for c in clock.values():
                _merge(done, c)
            for s in list(clock):
                _merge(clock[s], done)
            clock[-1] = done  # streams created later start after it too
            continue
        c = clock[op.stream]
        if -1 in clock:
            _merge(c, clock[-1])
        if op.kind == "record":
            recorded[op.event] = dict(c)
        elif op.kind == "wait_event":
            _merge(c, recorded.get(op.event, {}))  # an event never recorded: CUDA does not wait
        elif op.kind == "wait_stream":
            _merge(c, clock[op.other])
        elif op.kind == "kernel":
            c[op.stream] = c.get(op.stream, 0) + 1
            at[op.seq] = dict(c)
            for b in op.reads:
                w = fill.get(b)
                if w is not None and w.seq != op.seq and not before(w, op):
                    found.append(Race(b, w, op, "read before the copy that filled it"))
                readers[b].append(op)
            for b in op.writes:
                for r in readers[b]:
                    if r.seq != op.seq and not before(r, op):
                        found.append(Race(b, r, op, "copy over contents still being read"))
                fill[b], readers[b] = op, []
        else:
            raise ValueError(f"unknown op kind {op.kind!r}")
    return found


@dataclass
class Recording:
    ops: list[Op]
    races: list[Race]
    logits: list[torch.Tensor]  # the prefill's and each decode step's


def record(model, prompts, decode_steps: int = 2) -> Recording:
    """Run prefill and ``decode_steps`` greedy decode steps of ``model`` (built on a RecordingDevice)
    with its staging buffers tracked; return the op log, the races found and the logits."""
    from .generate import decode, prefill

    dev = model.dev
    assert isinstance(dev, RecordingDevice), "build the model with device=recording_device(...)"
    rec = dev.recorder
    for k, buf in enumerate(getattr(model.provider, "buffers", ())):
        rec.track(f"slot{k}", buf)
    with torch.inference_mode(), rec.watching():
        logits, cache = prefill(model, prompts, max(map(len, prompts)) + decode_steps + 1)
        out = [logits]
        for _ in range(decode_steps):
            out.append(decode(model, out[-1].argmax(-1), cache))
    dev.synchronize()
    return Recording(list(rec.ops), races(rec.ops), out)
