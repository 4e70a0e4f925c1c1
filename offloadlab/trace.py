"""The shared trace: one span per kernel-level event, plus per-request records.

Both the simulator and the runtime write a :class:`Trace`. Times are seconds inside; the Chrome /
Perfetto export (open in ui.perfetto.dev or chrome://tracing) converts them to microseconds, the
unit that format requires.

The project's own file format is JSON::

    {"schema": "offloadlab.trace/1",
     "meta": {...},
     "spans": [[lane, kind, start, end, layer, step, name, gpu], ...],
     "requests": [{...}, ...]}

Spans are stored as rows (not objects) to keep a 100k-span trace small, one row per line.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

from .errors import ConfigError
from .fileio import atomic_write_text, read_json_object

if TYPE_CHECKING:  # pandas only where a frame is built: importing it takes 0.3 s
    import pandas as pd

SCHEMA = "offloadlab.trace/1"
KINDS = ("compute", "copy", "wait", "launch", "step", "send")
# The lanes of one GPU whose busy seconds a step or a run reports (host dispatch, compute stream, copy
# stream, host link); the trace adds the serving loop's "engine" lane.
BUSY_LANES = ("host", "compute", "copy", "link")
# Known lanes get fixed Chrome thread ids (1..5) in this order; other lanes follow, by first use.
LANE_ORDER = (*BUSY_LANES, "engine")


def idle_lanes() -> dict[str, float]:
    """Busy seconds per lane of ``BUSY_LANES``, all zero: what a step or a run adds to."""
    return dict.fromkeys(BUSY_LANES, 0.0)
SPAN_FIELDS = ("lane", "kind", "start", "end", "layer", "step", "name", "gpu")
FRAME_COLUMNS = ("lane", "kind", "layer", "step", "name", "gpu", "start", "end", "duration")
_US = 1e6  # microseconds per second


def _is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass(frozen=True, slots=True)
class Span:
    """One interval of work on one lane (a stream, the host thread, the link...), in seconds."""

    lane: str
    kind: str
    start: float
    end: float
    layer: int = -1
    step: int = -1
    name: str = ""
    gpu: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.lane, str) or not self.lane:
            raise ConfigError("Span.lane", self.lane, "a non-empty string")
        if self.kind not in KINDS:
            raise ConfigError("Span.kind", self.kind, f"one of {', '.join(KINDS)}")
        for n in ("start", "end"):
            v = getattr(self, n)
            if not _is_number(v) or not math.isfinite(v):
                raise ConfigError(f"Span.{n}", v, "a finite number of seconds")
            object.__setattr__(self, n, float(v))
        if self.end < self.start:
            raise ConfigError("Span.end", self.end, f">= start={self.start}")
        for n in ("layer", "step", "gpu"):
            if not _is_int(getattr(self, n)):
                raise ConfigError(f"Span.{n}", getattr(self, n), "an integer")
        if not isinstance(self.name, str):
            raise ConfigError("Span.name", self.name, "a string")

    @property
    def duration(self) -> float:
        """Length of the span in seconds."""
        return self.end - self.start

    def row(self) -> list:
        """The span as a row in :data:`SPAN_FIELDS` order (the file format's row)."""
        return [self.lane, self.kind, self.start, self.end, self.layer, self.step, self.name, self.gpu]


@dataclass
class Trace:
    """Spans, per-request records (free-form dicts of scalars) and provenance ``meta``
    (source "sim"/"runtime", model, gpu, policy, torch version, ...)."""

    spans: list[Span] = field(default_factory=list)
    requests: list[dict] = field(default_factory=list)
    meta: dict = field(default_factory=dict)

    # ---- building ----
    def add(self, span: Span) -> None:
        """Append one span."""
        self.spans.append(span)

    def extend(self, spans: Iterable[Span]) -> None:
        """Append many spans."""
        self.spans.extend(spans)

    def shifted(self, offset: float) -> Trace:
        """A new Trace with every span moved by ``offset`` seconds (requests and meta copied as is)."""
        return Trace([dataclasses.replace(s, start=s.start + offset, end=s.end + offset) for s in self.spans],
                     [dict(r) for r in self.requests], dict(self.meta))

    # ---- questions ----
    def lanes(self) -> list[str]:
        """Unique lanes: the known ones in :data:`LANE_ORDER` order, then others by first use."""
        seen = dict.fromkeys(s.lane for s in self.spans)
        return [l for l in LANE_ORDER if l in seen] + [l for l in seen if l not in LANE_ORDER]

    def busy_time(self, lane: str, kinds: Iterable[str] = ("compute", "copy", "launch")) -> float:
        """Seconds during which ``lane`` runs at least one span of ``kinds``.

        This is the length of the union of the intervals: overlapping spans count once.
        """
        kinds = tuple(kinds)
        for k in kinds:
            if k not in KINDS:
                raise ConfigError("kinds", k, f"one of {', '.join(KINDS)}")
        intervals = sorted((s.start, s.end) for s in self.spans if s.lane == lane and s.kind in kinds)
        total, cur_start, cur_end = 0.0, None, None
        for a, b in intervals:
            if cur_end is None or a > cur_end:
                if cur_end is not None:
                    total += cur_end - cur_start
                cur_start, cur_end = a, b
            elif b > cur_end:
                cur_end = b
        if cur_end is not None:
            total += cur_end - cur_start
        return total

    def makespan(self) -> float:
        """Last end minus first start, in seconds (0 for an empty trace)."""
        if not self.spans:
            return 0.0
        return max(s.end for s in self.spans) - min(s.start for s in self.spans)

    # ---- exports ----
    def to_frame(self) -> pd.DataFrame:
        """One row per span, columns :data:`FRAME_COLUMNS` (times in seconds)."""
        import pandas as pd

        cols = dict(zip(SPAN_FIELDS, zip(*(s.row() for s in self.spans)))) if self.spans else {}
        df = pd.DataFrame({
            "lane": pd.Series(cols.get("lane", ()), dtype=object),
            "kind": pd.Series(cols.get("kind", ()), dtype=object),
            "layer": pd.Series(cols.get("layer", ()), dtype="int64"),
            "step": pd.Series(cols.get("step", ()), dtype="int64"),
            "name": pd.Series(cols.get("name", ()), dtype=object),
            "gpu": pd.Series(cols.get("gpu", ()), dtype="int64"),
            "start": pd.Series(cols.get("start", ()), dtype="float64"),
            "end": pd.Series(cols.get("end", ()), dtype="float64"),
        })
        df["duration"] = df["end"] - df["start"]
        return df

    def requests_frame(self) -> pd.DataFrame:
        """One row per request record (columns are the union of the records' keys)."""
        import pandas as pd

        return pd.DataFrame(self.requests)

    def lane_tids(self) -> dict[str, int]:
        """The Chrome thread id of each lane: stable for known lanes (host=1 ... engine=5)."""
        tids = {l: i + 1 for i, l in enumerate(LANE_ORDER)}
        for l in self.lanes():
            tids.setdefault(l, len(tids) + 1)
        return {l: tids[l] for l in self.lanes()}

    def to_chrome(self) -> dict:
        """The trace as Chrome/Perfetto trace JSON: one complete ("X") event per span, ts/dur in
        microseconds, pid = gpu, tid = lane; "M" events name the threads and processes."""
        tids = self.lane_tids()
        events: list[dict] = []
        for gpu in sorted({s.gpu for s in self.spans}):
            events.append({"ph": "M", "name": "process_name", "pid": gpu, "tid": 0, "args": {"name": f"GPU {gpu}"}})
        for gpu, lane in sorted({(s.gpu, s.lane) for s in self.spans}, key=lambda p: (p[0], tids[p[1]])):
            events.append({"ph": "M", "name": "thread_name", "pid": gpu, "tid": tids[lane], "args": {"name": lane}})
        events.extend(
            {"ph": "X", "name": s.name or f"{s.kind} L{s.layer}", "cat": s.kind,
             "ts": s.start * _US, "dur": (s.end - s.start) * _US, "pid": s.gpu, "tid": tids[s.lane],
             "args": {"layer": s.layer, "step": s.step}}
            for s in self.spans)
        return {"traceEvents": events, "displayTimeUnit": "ms", "otherData": dict(self.meta)}

    def save_chrome(self, path: str | os.PathLike) -> Path:
        """Write :meth:`to_chrome` to ``path`` atomically (one event per line)."""
        doc = self.to_chrome()
        events = ",\n".join(json.dumps(e, separators=(",", ":")) for e in doc["traceEvents"])
        text = (f'{{"displayTimeUnit": "ms", "otherData": {json.dumps(doc["otherData"])},\n'
                f'"traceEvents": [\n{events}\n]}}\n')
        return atomic_write_text(path, text)

    # ---- the project's own file format ----
    def save(self, path: str | os.PathLike) -> Path:
        """Write the trace in the ``offloadlab.trace/1`` JSON format, atomically (one span per line)."""
        rows = ",\n".join(json.dumps(s.row()) for s in self.spans)
        text = (f'{{"schema": {json.dumps(SCHEMA)},\n"meta": {json.dumps(self.meta)},\n'
                f'"requests": {json.dumps(self.requests)},\n"spans": [\n{rows}\n]}}\n')
        return atomic_write_text(path, text)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Trace:
        """Read a file written by :meth:`save`; every problem is a ConfigError naming file and field."""
        src = str(path)
        p = Path(path)
        if not p.is_file():
            raise ConfigError("path", src, "an existing trace file", source=src)
        doc = read_json_object(p, "file", "trace file", "a JSON object at the top level")
        if "schema" not in doc:
            raise ConfigError("schema", None, f"{SCHEMA!r} (key missing)", source=src)
        if doc["schema"] != SCHEMA:
            raise ConfigError("schema", doc["schema"], f"{SCHEMA!r} (unknown schema version)", source=src)
        if "spans" not in doc:
            raise ConfigError("spans", None, "a list of span rows (key missing)", source=src)
        rows, meta, requests = doc["spans"], doc.get("meta", {}), doc.get("requests", [])
        if not isinstance(rows, list):
            raise ConfigError("spans", type(rows).__name__, "a list of span rows", source=src)
        if not isinstance(meta, dict):
            raise ConfigError("meta", type(meta).__name__, "a JSON object", source=src)
        if not isinstance(requests, list) or not all(isinstance(r, dict) for r in requests):
            raise ConfigError("requests", type(requests).__name__, "a list of JSON objects", source=src)
        return cls([_span_from_row(i, row, src) for i, row in enumerate(rows)], requests, meta)


def _span_from_row(i: int, row: Any, src: str) -> Span:
    """Build a Span from a file row; errors name the row index and the field."""
    if not isinstance(row, list) or len(row) != len(SPAN_FIELDS):
        raise ConfigError(f"spans[{i}]", row, f"a list of {len(SPAN_FIELDS)} fields [{', '.join(SPAN_FIELDS)}]",
                          source=src)
    for n in ("start", "end"):
        v = row[SPAN_FIELDS.index(n)]
        if not _is_number(v):
            raise ConfigError(f"spans[{i}].{n}", v, "a number of seconds", source=src)
    try:
        return Span(*row)
    except ConfigError as e:
        raise ConfigError(f"spans[{i}].{e.field.removeprefix('Span.')}", e.value, e.expected, source=src) from None
