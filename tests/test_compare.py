"""Trace-against-trace comparison metrics."""
import dataclasses
import math

import pytest

from offloadlab import Span, Trace, interval, get_model
from offloadlab.apps.plots import compare_timelines
from offloadlab.sim import simulate_step
from offloadlab.validation import compare_traces, trace_metrics


def test_metrics_by_hand():
    # compute 0-2 and 3-5 with a wait 2-3; copy 1-4 overlaps compute for 1 + 1 = 2 of its 3 seconds
    t = Trace([Span("compute", "compute", 0, 2, layer=0), Span("compute", "wait", 2, 3, layer=1),
               Span("compute", "compute", 3, 5, layer=1), Span("copy", "copy", 1, 4, layer=1),
               Span("host", "launch", 0, 0.5, layer=0), Span("host", "launch", 0.5, 1, layer=1)])
    m = trace_metrics(t)
    assert m == {"makespan_s": 5, "host_busy_s": 1, "compute_busy_s": 4, "copy_busy_s": 3,
                 "compute_stall_s": 1, "copy_overlap": pytest.approx(2 / 3)}


def test_no_copies_gives_nan_overlap():
    t = Trace([Span("compute", "compute", 0, 1)])
    assert math.isnan(trace_metrics(t)["copy_overlap"])


def test_compare_reports_each_metric_of_a_known_distortion():
    # "measured": the simulated step on a clock running half as fast and starting 3 s later. Every
    # duration doubles, so each busy/stall/makespan error is 1/2 - 1; ratios (copy overlap) do not move.
    sim = simulate_step("llama-3.1-8b", "h100", interval(2), batch=1, new_tokens=1).trace
    measured = Trace([dataclasses.replace(sp, start=3 + 2 * sp.start, end=3 + 2 * sp.end) for sp in sim.spans])
    df = compare_traces(sim, measured).set_index("metric")
    for metric in ("makespan_s", "host_busy_s", "compute_busy_s", "copy_busy_s", "compute_stall_s"):
        assert df.loc[metric, "measured"] == pytest.approx(2 * df.loc[metric, "simulated"]), metric
        assert df.loc[metric, "error"] == pytest.approx(-0.5), metric
    assert df.loc["copy_overlap", "error"] == pytest.approx(0.0, abs=1e-12)
    assert df.loc["compute_stall_s", "simulated"] > 0, "a decode step stalls on its copies: the metric is exercised"
    # a long prefill hides the copies behind compute; a decode step cannot
    fast = simulate_step("llama-3.1-8b", "h100", interval(2), batch=1, new_tokens=8192).trace
    assert trace_metrics(fast)["copy_overlap"] > 0.9 > 0.2 > trace_metrics(sim)["copy_overlap"]


def test_compare_timelines_draws_both():
    tr = simulate_step("llama-3.1-8b", "h100", interval(4), new_tokens=512).trace
    fig = compare_timelines(tr, tr.shifted(1.0), "x")
    assert [ax.get_title() for ax in fig.axes] == ["simulated", "measured"]
