"""Tests of the shared Trace: span validation, busy time, exports, the file format and its errors."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from offloadlab.errors import ConfigError
from offloadlab.trace import FRAME_COLUMNS, SCHEMA, Span, Trace


def union_length_sweep(intervals: list[tuple[float, float]]) -> float:
    """Reference, written independently of Trace.busy_time: sweep the sorted endpoints and add
    each elementary segment in which at least one interval is open."""
    points = sorted({x for iv in intervals for x in iv})
    total = 0.0
    for a, b in zip(points, points[1:]):
        mid = (a + b) / 2
        if any(s <= mid <= e for s, e in intervals):
            total += b - a
    return total


def example_trace() -> Trace:
    t = Trace(meta={"source": "sim", "model": "Llama-3.1-8B", "gpu": "H100"})
    t.extend([
        Span("host", "launch", 0.0, 0.0001, layer=0, step=0),
        Span("copy", "copy", 0.0, 0.002, layer=1, step=0, name="h2d L1"),
        Span("compute", "compute", 0.0001, 0.0015, layer=0, step=0),
        Span("compute", "wait", 0.0015, 0.002, layer=1, step=0),
        Span("compute", "compute", 0.002, 0.0035, layer=1, step=0),
        Span("copy", "copy", 0.0, 0.001, layer=3, gpu=1),
        Span("nvme", "copy", 0.0, 0.0005, layer=2),  # a lane outside the known ones
    ])
    t.requests.append({"id": 0, "ttft": 0.0035, "tokens": 12, "ok": True})
    return t


# ---------------------------------------------------------------- Span
def test_span_duration_and_defaults():
    s = Span("compute", "compute", 1.0, 1.25)
    assert s.duration == 0.25
    assert (s.layer, s.step, s.name, s.gpu) == (-1, -1, "", 0)
    assert isinstance(Span("copy", "copy", 0, 1).start, float)


def test_span_is_frozen():
    s = Span("compute", "compute", 1.0, 2.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.start = 0.0  # type: ignore[misc]


def test_span_zero_length_is_allowed():
    assert Span("host", "launch", 2.0, 2.0).duration == 0.0


@pytest.mark.parametrize("kwargs, field", [
    (dict(lane="compute", kind="compute", start=2.0, end=1.0), "Span.end"),
    (dict(lane="compute", kind="kernel", start=0.0, end=1.0), "Span.kind"),
    (dict(lane="", kind="compute", start=0.0, end=1.0), "Span.lane"),
    (dict(lane="compute", kind="compute", start=math.nan, end=1.0), "Span.start"),
    (dict(lane="compute", kind="compute", start=0.0, end=math.inf), "Span.end"),
    (dict(lane="compute", kind="compute", start="0", end=1.0), "Span.start"),
    (dict(lane="compute", kind="compute", start=0.0, end=1.0, layer=1.5), "Span.layer"),
    (dict(lane="compute", kind="compute", start=0.0, end=1.0, gpu=True), "Span.gpu"),
])
def test_span_validation(kwargs, field):
    with pytest.raises(ConfigError) as ei:
        Span(**kwargs)
    assert ei.value.field == field
    assert field in str(ei.value)


# ---------------------------------------------------------------- questions
def test_lanes_known_first_then_by_first_use():
    t = Trace([Span("zeta", "copy", 0, 1), Span("copy", "copy", 0, 1), Span("alpha", "copy", 0, 1),
               Span("host", "launch", 0, 1), Span("copy", "copy", 1, 2)])
    assert t.lanes() == ["host", "copy", "zeta", "alpha"]


def test_busy_time_overlaps_counted_once():
    t = Trace([Span("copy", "copy", 0.0, 2.0), Span("copy", "copy", 1.0, 3.0), Span("copy", "copy", 5.0, 6.0),
               Span("copy", "copy", 5.5, 5.75),  # nested
               Span("compute", "compute", 0.0, 100.0)])  # another lane
    assert t.busy_time("copy") == pytest.approx(4.0)
    assert t.busy_time("compute") == pytest.approx(100.0)
    assert t.busy_time("nowhere") == 0.0


def test_busy_time_filters_kinds():
    t = Trace([Span("compute", "compute", 0.0, 1.0), Span("compute", "wait", 1.0, 3.0),
               Span("compute", "launch", 3.0, 3.5)])
    assert t.busy_time("compute") == pytest.approx(1.5)  # wait is idle by default
    assert t.busy_time("compute", kinds=("wait",)) == pytest.approx(2.0)
    assert t.busy_time("compute", kinds=["compute", "wait", "launch"]) == pytest.approx(3.5)
    with pytest.raises(ConfigError, match="kinds"):
        t.busy_time("compute", kinds=("kernel",))


def test_busy_time_touching_spans():
    t = Trace([Span("copy", "copy", 0.0, 1.0), Span("copy", "copy", 1.0, 2.0)])
    assert t.busy_time("copy") == pytest.approx(2.0)


intervals_st = st.lists(
    st.tuples(st.floats(0, 1000, allow_nan=False), st.floats(0, 50, allow_nan=False)).map(
        lambda p: (p[0], p[0] + p[1])),
    min_size=1, max_size=30)


@given(intervals_st)
@settings(max_examples=300, deadline=None)
def test_busy_time_is_union_length(intervals):
    t = Trace([Span("copy", "copy", a, b) for a, b in intervals])
    busy = t.busy_time("copy")
    durations = [b - a for a, b in intervals]
    assert busy <= sum(durations) + 1e-9
    assert busy >= max(durations) - 1e-9
    assert busy <= t.makespan() + 1e-9
    assert busy == pytest.approx(union_length_sweep(intervals), abs=1e-9)


def test_makespan():
    assert Trace().makespan() == 0.0
    t = Trace([Span("copy", "copy", 2.0, 3.0), Span("compute", "compute", 2.5, 7.0)])
    assert t.makespan() == pytest.approx(5.0)


def test_add_extend_shifted():
    t = Trace(meta={"source": "sim"})
    t.add(Span("copy", "copy", 1.0, 2.0))
    t.extend([Span("compute", "compute", 2.0, 4.0)])
    assert len(t.spans) == 2
    u = t.shifted(-1.0)
    assert [(s.start, s.end) for s in u.spans] == [(0.0, 1.0), (1.0, 3.0)]
    assert [(s.start, s.end) for s in t.spans] == [(1.0, 2.0), (2.0, 4.0)]  # original untouched
    assert u.meta == t.meta and u.meta is not t.meta
    assert u.makespan() == t.makespan()


# ---------------------------------------------------------------- DataFrame
def test_to_frame():
    t = example_trace()
    df = t.to_frame()
    assert list(df.columns) == list(FRAME_COLUMNS)
    assert len(df) == len(t.spans)
    assert df["duration"].tolist() == pytest.approx([s.duration for s in t.spans])
    assert df["lane"].tolist() == [s.lane for s in t.spans]
    assert df["layer"].tolist() == [s.layer for s in t.spans]
    assert df["gpu"].dtype == "int64" and df["start"].dtype == "float64"
    assert df.loc[1, "name"] == "h2d L1"


def test_to_frame_empty_has_columns():
    df = Trace().to_frame()
    assert list(df.columns) == list(FRAME_COLUMNS)
    assert len(df) == 0


def test_to_frame_large():
    spans = [Span("compute" if i % 2 else "copy", "compute" if i % 2 else "copy", i * 1e-3, i * 1e-3 + 5e-4,
                  layer=i % 80, step=i // 80) for i in range(100_000)]
    df = Trace(spans).to_frame()
    assert len(df) == 100_000
    assert df["duration"].sum() == pytest.approx(100_000 * 5e-4)


def test_requests_frame():
    t = example_trace()
    t.requests.append({"id": 1, "ttft": 0.01})
    rf = t.requests_frame()
    assert len(rf) == 2 and set(rf.columns) == {"id", "ttft", "tokens", "ok"}
    assert rf["ttft"].tolist() == [0.0035, 0.01]
    assert len(Trace().requests_frame()) == 0


# ---------------------------------------------------------------- Chrome / Perfetto
def test_chrome_units_and_events():
    t = example_trace()
    doc = t.to_chrome()
    assert doc["displayTimeUnit"] == "ms"
    assert doc["otherData"] == t.meta
    json.dumps(doc)  # serializable
    xs = [e for e in doc["traceEvents"] if e["ph"] == "X"]
    assert len(xs) == len(t.spans)
    for s, e in zip(t.spans, xs):
        assert e["ts"] == pytest.approx(s.start * 1e6)
        assert e["dur"] == pytest.approx(s.duration * 1e6)
        assert e["pid"] == s.gpu
        assert e["cat"] == s.kind
        assert e["args"] == {"layer": s.layer, "step": s.step}
    copy_l1 = xs[1]
    assert copy_l1["name"] == "h2d L1" and copy_l1["ts"] == 0 and copy_l1["dur"] == pytest.approx(2000.0)
    assert xs[2]["name"] == "compute L0"  # default name


def test_chrome_tids_and_metadata():
    t = example_trace()
    doc = t.to_chrome()
    ms = [e for e in doc["traceEvents"] if e["ph"] == "M"]
    xs = [e for e in doc["traceEvents"] if e["ph"] == "X"]
    thread_names = {(e["pid"], e["tid"]): e["args"]["name"] for e in ms if e["name"] == "thread_name"}
    procs = {e["pid"]: e["args"]["name"] for e in ms if e["name"] == "process_name"}
    assert procs == {0: "GPU 0", 1: "GPU 1"}
    # Each lane has one tid, distinct lanes have distinct tids, and the thread names match.
    lane_of_tid: dict[int, str] = {}
    for s, e in zip(t.spans, xs):
        assert lane_of_tid.setdefault(e["tid"], s.lane) == s.lane
        assert thread_names[(e["pid"], e["tid"])] == s.lane
    assert len(lane_of_tid) == len(t.lanes())
    # Known lanes have fixed tids, whatever else is in the trace.
    assert t.lane_tids()["host"] == 1 and t.lane_tids()["compute"] == 2 and t.lane_tids()["copy"] == 3
    assert Trace([Span("copy", "copy", 0, 1)]).lane_tids() == {"copy": 3}
    assert t.lane_tids()["nvme"] > 5


span_st = st.builds(
    Span,
    lane=st.sampled_from(["host", "compute", "copy", "link", "engine", "x"]),
    kind=st.sampled_from(["compute", "copy", "wait", "launch", "step"]),
    start=st.floats(0, 10, allow_nan=False),
    end=st.just(10.0),
    layer=st.integers(-1, 200), step=st.integers(-1, 10), gpu=st.integers(0, 3),
    name=st.sampled_from(["", "a", "h2d"]),
)


@given(st.lists(span_st, max_size=40))
@settings(max_examples=100, deadline=None)
def test_chrome_every_span_once(spans):
    t = Trace(spans)
    doc = t.to_chrome()
    tids = t.lane_tids()
    xs = Counter((e["name"], e["cat"], e["pid"], e["tid"], e["ts"], e["dur"])
                 for e in doc["traceEvents"] if e["ph"] == "X")
    want = Counter((s.name or f"{s.kind} L{s.layer}", s.kind, s.gpu, tids[s.lane], s.start * 1e6,
                    (s.end - s.start) * 1e6) for s in spans)
    assert xs == want
    assert len(set(tids.values())) == len(tids)


def test_save_chrome_is_valid_json(tmp_path):
    t = example_trace()
    p = t.save_chrome(tmp_path / "trace.chrome.json")
    assert json.loads(p.read_text()) == json.loads(json.dumps(t.to_chrome()))
    assert os.listdir(tmp_path) == ["trace.chrome.json"]
    q = Trace().save_chrome(tmp_path / "empty.json")
    assert json.loads(q.read_text())["traceEvents"] == []


# ---------------------------------------------------------------- save / load
def test_round_trip(tmp_path):
    t = example_trace()
    t.add(Span("compute", "step", 0.1 + 0.2, 1 / 3, step=7, name='odd "name" é'))
    p = t.save(tmp_path / "t.json")
    u = Trace.load(p)
    assert u == t
    assert u.spans[-1].start == 0.1 + 0.2  # exact floats survive
    assert Trace.load(Trace().save(tmp_path / "e.json")) == Trace()
    assert json.loads(p.read_text())["schema"] == SCHEMA


@given(st.lists(span_st, max_size=20))
@settings(max_examples=50, deadline=None)
def test_round_trip_property(spans):
    t = Trace(spans, [{"id": i} for i in range(3)], {"source": "runtime"})
    with tempfile.TemporaryDirectory() as d:
        assert Trace.load(t.save(Path(d) / "t.json")) == t


def test_trace_equality_sees_differences():
    a, b = example_trace(), example_trace()
    assert a == b
    b.meta["policy"] = "prefetch"
    assert a != b


def test_atomic_save_leaves_no_temp_files(tmp_path):
    t = example_trace()
    p = tmp_path / "out" / "t.json"
    t.save(p)
    t.save(p)  # overwrite
    assert os.listdir(p.parent) == ["t.json"]
    # A failure during serialization keeps the old file and leaves no temp file.
    before = p.read_text()
    bad = example_trace()
    bad.meta["handle"] = object()
    with pytest.raises(TypeError):
        bad.save(p)
    assert p.read_text() == before
    assert os.listdir(p.parent) == ["t.json"]


def good_doc() -> dict:
    return {"schema": SCHEMA, "meta": {}, "requests": [],
            "spans": [["copy", "copy", 0.0, 1.0, 1, 0, "", 0]]}


def truncated(path: Path) -> None:
    example_trace().save(path)
    text = path.read_text()
    path.write_text(text[: len(text) // 2])


def with_doc(mutate):
    def write(path: Path) -> None:
        doc = good_doc()
        mutate(doc)
        path.write_text(json.dumps(doc))
    return write


@pytest.mark.parametrize("write, field", [
    (lambda p: p.write_text("this is not json"), "file"),
    (truncated, "file"),
    (lambda p: p.write_text("[1, 2]"), "file"),
    (lambda p: p.write_text("[" * 100000), "file"),  # a RecursionError traceback before
    (with_doc(lambda d: d.pop("schema")), "schema"),
    (with_doc(lambda d: d.update(schema="offloadlab.trace/99")), "schema"),
    (with_doc(lambda d: d.pop("spans")), "spans"),
    (with_doc(lambda d: d.update(spans={"a": 1})), "spans"),
    (with_doc(lambda d: d["spans"].append(["copy", "copy", 0.0, 1.0])), "spans[1]"),
    (with_doc(lambda d: d["spans"].append(["copy", "copy", 0.0, 1.0, 1, 0, "", 0, 9])), "spans[1]"),
    (with_doc(lambda d: d["spans"].append(["copy", "copy", "zero", 1.0, 1, 0, "", 0])), "spans[1].start"),
    (with_doc(lambda d: d["spans"].append(["copy", "copy", 0.0, None, 1, 0, "", 0])), "spans[1].end"),
    (with_doc(lambda d: d["spans"].append(["copy", "kernel", 0.0, 1.0, 1, 0, "", 0])), "spans[1].kind"),
    (with_doc(lambda d: d["spans"].append(["copy", "copy", 2.0, 1.0, 1, 0, "", 0])), "spans[1].end"),
    (with_doc(lambda d: d.update(meta=[1])), "meta"),
    (with_doc(lambda d: d.update(requests=[1])), "requests"),
])
def test_load_malformed(tmp_path, write, field):
    p = tmp_path / "broken_trace.json"
    write(p)
    with pytest.raises(ConfigError) as ei:
        Trace.load(p)
    msg = str(ei.value)
    assert "broken_trace.json" in msg
    assert ei.value.source == str(p)
    assert ei.value.field == field
    assert msg.startswith(f"{p}: {field}=")


def test_load_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="nope.json"):
        Trace.load(tmp_path / "nope.json")


def test_good_doc_loads(tmp_path):
    p = tmp_path / "ok.json"
    with_doc(lambda d: None)(p)
    t = Trace.load(p)
    assert t.spans == [Span("copy", "copy", 0.0, 1.0, 1, 0, "", 0)]
    assert isinstance(t.to_frame(), pd.DataFrame)
