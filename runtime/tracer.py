"""Spans of a real run, in the simulator's format (offloadlab.trace.Trace), with its lane names.

Lanes, as in sim/step.py:
- ``host``: Python issuing one layer (kind ``launch``), timed with perf_counter;
- ``compute``: the compute stream: embedding (layer -1), each layer (``compute``), the LM head
  (layer = number of layers); vLLM's per-parameter copies (``copy``); waits for a prefetched
  copy (``wait``, only when the stream actually stalled);
- ``copy``: the prefetch copy stream (``copy``).

On a GPU, stream times come from CUDA timing events (one recorded before and after each span on
the span's stream) and are read after a synchronize in :meth:`Tracer.trace`; host and stream
clocks share a zero taken right after a synchronize. On CPU every stamp is perf_counter and there
are no waits. Tracing adds an event record per span; leave it off for timing runs.
"""
from __future__ import annotations

import time

import torch

from offloadlab.trace import Span, Trace

from .device import Device


class NullTracer:
    """Records nothing; the default of every forward pass."""

    step = -1

    def stamp(self, stream=None):
        return None

    def host_now(self) -> float:
        return 0.0

    def span(self, lane, kind, layer, start, end, name: str = "", step: int | None = None) -> None:
        pass

    def host_span(self, layer, start) -> None:
        pass

    def begin_step(self) -> None:
        pass

    def end_step(self) -> None:
        pass


NULL_TRACER = NullTracer()


class Tracer(NullTracer):
    """Collects spans of every forward pass run with it; ``trace()`` turns them into a Trace."""

    def __init__(self, dev: Device, meta: dict | None = None):
        self.dev, self.meta = dev, dict(meta or {})
        self._pending: list[tuple] = []  # (lane, kind, layer, step, start stamp, end stamp, name)
        self.step = -1
        dev.synchronize()
        if dev.is_cuda:
            self._zero = torch.cuda.Event(enable_timing=True)
            self._zero.record(dev.current_stream())
            self._zero.synchronize()
        self._host_zero = time.perf_counter()

    def stamp(self, stream=None):
        """A point in time on ``stream`` (default: the current one): a recorded event on a GPU."""
        if not self.dev.is_cuda:
            return time.perf_counter()
        ev = torch.cuda.Event(enable_timing=True)
        ev.record(stream if stream is not None else self.dev.current_stream())
        return ev

    def host_now(self) -> float:
        return time.perf_counter()

    def span(self, lane, kind, layer, start, end, name: str = "", step: int | None = None) -> None:
        """A span from stamp ``start`` to stamp ``end``; ``step`` defaults to the current one."""
        if kind == "wait" and not self.dev.is_cuda:
            return  # nothing waits on CPU: copies are done when issued
        self._pending.append((lane, kind, layer, self.step if step is None else step, start, end, name))

    def host_span(self, layer, start) -> None:
        self._pending.append(("host", "launch", layer, self.step, start, time.perf_counter(), ""))

    def begin_step(self) -> None:
        self.step += 1

    def _seconds(self, lane: str, stamp) -> float:
        if lane == "host" or not self.dev.is_cuda:
            return stamp - self._host_zero
        return self._zero.elapsed_time(stamp) / 1e3

    def trace(self, meta: dict | None = None) -> Trace:
        """Synchronize and return every span so far, in seconds from the tracer's creation."""
        self.dev.synchronize()
        spans = []
        for lane, kind, layer, step, a, b, name in self._pending:
            t0, t1 = self._seconds(lane, a), self._seconds(lane, b)
            if kind == "wait" and t1 - t0 <= 0:
                continue  # the copy had finished: no stall
            spans.append(Span(lane, kind, t0, max(t0, t1), layer=layer, step=step, name=name))
        spans.sort(key=lambda s: (s.start, s.lane))
        return Trace(spans=spans, meta={"source": "runtime", "device": self.dev.name(),
                                        "torch": torch.__version__, **self.meta, **(meta or {})})
