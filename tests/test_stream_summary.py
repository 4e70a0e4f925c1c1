"""Constant-memory runs: the percentile sketch, the streaming summary and simulate(requests="summary")."""
from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from offloadlab.errors import ConfigError
from offloadlab.metrics import PERCENTILES, LogHistogram, StreamSummary, percentiles, summarize, with_latencies
from offloadlab.policy import NoOffload
from offloadlab.sim import EngineConfig, simulate
from offloadlab.sim.workload import Request, RequestStream, Workload

ACC = 1e-3


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(1e-6, 1e6), min_size=1, max_size=300), st.floats(0, 1))
def test_sketch_quantile_within_its_relative_error_of_the_order_statistics(xs, q):
    h = LogHistogram(ACC)
    for x in xs:
        h.add(x)
    srt = sorted(xs)
    pos = q * (len(xs) - 1)  # numpy's linear interpolation sits between these two order statistics
    lo, hi = srt[math.floor(pos)], srt[math.ceil(pos)]
    got = h.quantile(q)
    assert lo * (1 - ACC) * (1 - 1e-12) <= got <= hi * (1 + ACC) * (1 + 1e-12)
    assert abs(got - np.percentile(xs, q * 100)) <= ACC * hi * (1 + 1e-9) + (hi - lo)  # numpy's figure, near


def test_sketch_zeros_and_empty():
    h = LogHistogram()
    assert math.isnan(h.quantile(0.5))
    for x in (0.0, 0.0, 5.0):
        h.add(x)
    assert h.quantile(0.0) == 0.0 and h.quantile(1.0) == pytest.approx(5.0, rel=ACC)
    with pytest.raises(ConfigError):
        LogHistogram(0.0)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 500), st.integers(1, 50), st.floats(0, 10), st.floats(1e-3, 5),
                          st.floats(1e-3, 50), st.integers(0, 3)), min_size=1, max_size=60))
def test_stream_summary_matches_the_frame_summary(rows):
    import pandas as pd

    acc = StreamSummary(ACC)
    frame = []
    for i, (p, o, a, ttft, dur, pre) in enumerate(rows):
        first, finish = a + ttft, a + ttft + (dur if o > 1 else 0.0)
        acc.add(p, o, a, a, first, finish, pre)
        frame.append(dict(id=i, prompt_len=p, output_len=o, arrival=a, sent=a, first_token=first, finish=finish,
                          preemptions=pre))
    want, got = summarize(with_latencies(pd.DataFrame(frame))), acc.summary()
    assert set(got) == set(want)
    for k in ("requests", "preemptions"):
        assert got[k] == want[k]
    for k in ("makespan_s", "throughput_rps", "output_tok_s", "total_tok_s", "ttft_mean_s", "e2e_mean_s"):
        assert got[k] == pytest.approx(want[k], rel=1e-9)
    for c in ("ttft", "tpot", "e2e"):
        if math.isnan(want[f"{c}_mean_s"]):
            assert math.isnan(got[f"{c}_mean_s"])
            continue
        for p in PERCENTILES:  # sketch vs numpy's interpolation: within the sketch's error of the data's spread
            vals = sorted(with_latencies(pd.DataFrame(frame))[c].dropna())
            # the bound is reached exactly at a bucket's edge (a value of exactly 1.0 reports 1 - ACC), so
            # allow float rounding on top of it
            assert min(vals) * (1 - ACC) * (1 - 1e-12) <= got[f"{c}_p{p}_s"] <= max(vals) * (1 + ACC) * (1 + 1e-12)


def small_stream(n=300, **kw):
    return RequestStream("sharegpt_8k", n, 2.0, seed=3, max_model_len=4096, **kw)


def test_request_stream_is_ordered_deterministic_and_clipped():
    a, b = list(small_stream()), list(small_stream(chunk=7))
    assert [r.id for r in a] == list(range(300))
    assert all(x.arrival <= y.arrival for x, y in zip(a, a[1:]))
    assert all(r.prompt_len + r.output_len <= 4096 for r in a)
    assert a == list(small_stream())  # deterministic
    assert len(b) == 300 and [r.id for r in b] == list(range(300))  # chunks of 7: the same stream's shape
    assert all(x.arrival <= y.arrival for x, y in zip(b, b[1:]))
    # made without Request's checks (Request._made): what the checked constructor makes of the same values
    assert a == [Request(r.id, r.prompt_len, r.output_len, r.arrival) for r in a]
    assert {(type(r.id), type(r.prompt_len), type(r.output_len), type(r.arrival)) for r in a} == {(int, int, int, float)}
    with pytest.raises(ConfigError, match="dataset"):
        RequestStream("nope", 10, 1.0)


def test_summary_run_equals_the_frame_run_on_the_same_requests():
    eng = EngineConfig(scheduler="v1", chunked_prefill=True, max_num_batched_tokens=2048, max_model_len=4096,
                       prefix_caching=True)
    wl = Workload("s", tuple(small_stream()))
    full = simulate("llama-3.1-8b", "a100-80gb", NoOffload(), wl, eng, trace_steps=False)
    summ = simulate("llama-3.1-8b", "a100-80gb", NoOffload(), wl, eng, trace_steps=False, requests="summary")
    streamed = simulate("llama-3.1-8b", "a100-80gb", NoOffload(), small_stream(), eng, trace_steps=False,
                        requests="summary")
    assert summ.requests is None and streamed.requests is None
    for k in ("requests", "preemptions", "steps", "makespan_s", "ttft_mean_s", "tpot_mean_s", "e2e_mean_s"):
        assert summ.summary[k] == pytest.approx(full.summary[k], rel=1e-12)
        assert streamed.summary[k] == pytest.approx(full.summary[k], rel=1e-12)
    for c in ("ttft", "tpot", "e2e"):
        exact = full.requests[c].dropna().sort_values().to_numpy()
        for p in PERCENTILES:
            pos = p / 100 * (len(exact) - 1)
            lo, hi = exact[math.floor(pos)], exact[math.ceil(pos)]
            assert lo * (1 - ACC) <= summ.summary[f"{c}_p{p}_s"] <= hi * (1 + ACC)
    with pytest.raises(ConfigError, match="requests"):
        simulate("llama-3.1-8b", "a100-80gb", NoOffload(), small_stream(), eng, requests="frame")


def test_a_too_long_request_deep_in_a_stream_is_the_same_one_line_error():
    """A stream's requests are checked as the feed reaches them, inside a SimPy process: SimPy re-raises a
    failed process's error as ``type(e)(*e.args)`` (simpy/core.py), which must give the same ConfigError."""
    engine = EngineConfig(max_model_len=3000, max_num_batched_tokens=8192)
    with pytest.raises(ConfigError) as e:
        simulate("llama-3.1-8b", "A100-SXM4-80GB", NoOffload(), RequestStream("sharegpt_8k", n=200, rate=5.0),
                 engine, requests="summary", trace_steps=False)
    assert e.value.field.endswith("prompt_len+output_len") and "at most max_model_len=3000" in str(e.value)
    assert not str(e.value).startswith("request 0 ")  # not the first request: raised inside the process


@settings(max_examples=300, deadline=None)
@given(values=st.lists(st.one_of(st.floats(allow_nan=False, width=64), st.integers(-5, 5).map(float), st.just(math.nan)),
                       min_size=1, max_size=60),
       ps=st.lists(st.one_of(st.sampled_from(PERCENTILES), st.floats(0, 100)), min_size=1, max_size=5))
def test_percentiles_are_numpys_bit_for_bit(values, ps):
    # summarize's percentiles (metrics.percentiles: numpy's linear method without np.percentile, whose first
    # call imports numpy.ma) are numpy's own to the bit: ties, infinities, subnormals, NaN, any p in [0, 100]
    v = np.array(values)
    with np.errstate(invalid="ignore", over="ignore"):
        want = [float(np.percentile(v, p)) for p in ps]
    got = percentiles(v, ps)
    assert [x.hex() for x in got] == [x.hex() for x in want]


def test_a_run_summary_imports_no_numpy_ma():
    import subprocess
    import sys

    code = ("import sys; from offloadlab.sim import simulate, make_workload; "
            "simulate('llama-3.1-8b', 'A100-SXM4-40GB', None, make_workload('multi_news', n=20)); "
            "print('numpy.ma' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
