"""The sweep and latency plots return Figures with the expected axes, labels and lines."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from offloadlab import NoOffload, VllmCopy, interval  # noqa: E402
from offloadlab.apps import plots  # noqa: E402
from offloadlab.sim import longbench_multi_news, simulate  # noqa: E402


@pytest.fixture(autouse=True)
def _close():
    yield
    plt.close("all")


def sweep_like() -> pd.DataFrame:
    """A frame shaped like sweep()'s: k x slots x bandwidth for interval, plus a vLLM baseline."""
    rows = []
    for bw in (16.0, 32.0, 64.0):
        for k in (2, 4, 8):
            for b in (1, 2):
                rows.append({"policy": f"interval k={k} buf={b}", "policy_kind": "prefetch", "k": k, "slots": b,
                             "host_link_GBps": bw, "throughput_rps": bw / k + b / 10, "tpot_mean_s": k / bw / 10,
                             "mem_kv_cache": 2.0**30 * (20 + 8 / k - b), "error": None})
        rows.append({"policy": "vllm 6.5GiB", "policy_kind": "vllm", "k": None, "slots": None, "host_link_GBps": bw,
                     "throughput_rps": bw / 4, "tpot_mean_s": 1 / bw, "mem_kv_cache": 2.0**30 * 24, "error": None})
    df = pd.DataFrame(rows)
    df["k"], df["slots"] = df["k"].astype("Int64"), df["slots"].astype("Int64")
    return df


def test_heatmap_cells_labels_and_units():
    df = sweep_like()
    one = df[(df.host_link_GBps == 32) & (df.policy_kind == "prefetch")]
    fig = plots.heatmap(one, "k", "slots", "throughput_rps")
    assert isinstance(fig, Figure)
    ax, cbar = fig.axes  # the map and its colour bar
    assert ax.get_xlabel() == "k" and ax.get_ylabel() == "slots"
    assert [t.get_text() for t in ax.get_xticklabels()] == ["2", "4", "8"]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["1", "2"]
    assert cbar.get_ylabel() == "throughput (requests/s)"
    img = ax.get_images()[0].get_array()
    assert img.shape == (2, 3) and img[0, 0] == pytest.approx(32 / 2 + 0.1)  # row = slots 1, column = k 2
    assert len(ax.texts) == 6
    # TPOT shown in ms; several rows per cell are averaged; a missing cell stays blank
    part = df[(df.policy_kind == "prefetch") & ~((df.k == 8) & (df.slots == 2))]
    fig = plots.heatmap(part, "k", "slots", "tpot_mean_s", annotate=False)
    ax = fig.axes[0]
    arr = np.ma.filled(ax.get_images()[0].get_array(), np.nan)
    assert arr[0, 0] == pytest.approx(np.mean([2 / bw / 10 * 1e3 for bw in (16, 32, 64)]))
    assert np.isnan(arr[1, 2]) and fig.axes[1].get_ylabel() == "mean TPOT (ms)" and not ax.texts
    with pytest.raises(KeyError, match="nope"):
        plots.heatmap(df, "k", "nope")


def test_metric_vs_bandwidth_one_line_per_policy():
    df = sweep_like()
    fig = plots.metric_vs_bandwidth(df, "throughput_rps")
    assert isinstance(fig, Figure)
    ax = fig.axes[0]
    lines = ax.get_lines()
    assert len(lines) == df["policy"].nunique() == 7
    assert [line.get_label() for line in lines] == list(dict.fromkeys(df["policy"]))
    assert list(lines[0].get_xdata()) == [16.0, 32.0, 64.0]
    assert ax.get_xscale() == "log" and "host link bandwidth" in ax.get_xlabel()
    assert ax.get_ylabel() == "throughput (requests/s)"
    assert lines[-1].get_color() == "#d62728"  # vLLM in the paper figure's red
    fig = plots.metric_vs_bandwidth(df, "mem_kv_cache", by="k", logx=False)
    ax = fig.axes[0]
    assert ax.get_ylabel() == "kv cache (GiB)" and ax.get_xscale() == "linear"
    assert [line.get_label() for line in ax.get_lines()] == ["2", "4", "8"]  # the vLLM rows have no k


def test_latency_cdfs_per_policy():
    wl = longbench_multi_news(10, output_len=16)
    runs = [simulate("llama-3.1-8b", "a100", p, wl, trace_steps=False) for p in (NoOffload(), VllmCopy(6.5), interval(2))]
    fig = plots.latency_cdfs(runs)
    assert isinstance(fig, Figure) and len(fig.axes) == 2
    ttft, tpot = fig.axes
    assert ttft.get_xlabel() == "TTFT (s)" and tpot.get_xlabel() == "TPOT (ms)"
    assert [line.get_label() for line in ttft.get_lines()] == ["none", "vllm 6.5GiB", "interval k=2 buf=2"]
    line = tpot.get_lines()[2]
    assert line.get_ydata()[-1] == 1.0 and line.get_xdata()[-1] == pytest.approx(runs[2].requests["tpot"].max() * 1e3)
    # a mapping of labels to request frames, any metrics
    fig = plots.latency_cdfs({"a": runs[0].requests, "b": runs[1]}, metrics=("e2e",), title="t")
    assert len(fig.axes) == 1 and [line.get_label() for line in fig.axes[0].get_lines()] == ["a", "b"]
    assert fig.axes[0].get_xlabel() == "end-to-end latency (s)"


def test_by_gpu_count_panels_lines_and_styles():
    rows = []
    for model in ("70B", "405B"):
        for gpu in ("H100", "H200"):
            for n in (1, 2, 4, 8):
                for off in (False, True):
                    if model == "405B" and n < 4 and not off:
                        continue  # does not fit without offload
                    rows.append(dict(model=model, gpu=gpu, gpus=n, offload=off, tok_s_per_gpu=100.0 * n / (1 + off)))
    fig = plots.by_gpu_count(pd.DataFrame(rows), "tok_s_per_gpu")
    axes = fig.axes
    assert [ax.get_title() for ax in axes] == ["70B", "405B"]
    assert axes[0].get_ylabel() == "output tokens/s per GPU"
    lines = {ln.get_label(): ln for ln in axes[1].get_lines()}
    assert set(lines) == {"H100", "H100 + offload", "H200", "H200 + offload"}
    assert list(lines["H100"].get_xdata()) == [4, 8]  # only the counts that fit
    assert lines["H100 + offload"].get_linestyle() == "--" and lines["H100"].get_linestyle() == "-"
    assert lines["H100"].get_color() == lines["H100 + offload"].get_color() != lines["H200"].get_color()


def test_length_distributions_one_cdf_per_workload():
    from offloadlab.sim import make_workload

    wls = {"real": make_workload("sharegpt", n=50, source="table"), "fit": make_workload("sharegpt_8k", n=30)}
    fig = plots.length_distributions(wls, title="t")
    prompt, output = fig.axes
    assert prompt.get_xlabel() == "prompt tokens" and output.get_xlabel() == "output tokens"
    assert [line.get_label().split(" (")[0] for line in prompt.get_lines()] == ["real", "fit"]
    real = prompt.get_lines()[0]
    assert real.get_ydata()[-1] == 1.0 and real.get_xdata()[-1] == wls["real"].describe()["prompt_max"]
    assert len(output.get_lines()[1].get_xdata()) == 30


def test_the_paper_figure_without_pyplot_writes_the_bytes_savefig_writes(tmp_path):
    """The CLI's path (plain columns, a bare Figure, one draw) draws the same PNG as pyplot + savefig."""
    import io

    from offloadlab.apps.paper import memory_table, run_paper

    res, mem = run_paper(requests=8), memory_table()
    before = set(plt.get_fignums())
    fig = plots.paper_figure(res, mem, "t")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plots.write_png(str(tmp_path / "p.png"), "paper_figure", res.to_dict("list"), mem.to_dict("list"), "t")
    assert set(plt.get_fignums()) == before | {fig.number}  # the bare Figure is not pyplot's
    assert (tmp_path / "p.png").read_bytes() == buf.getvalue()
    bare = plots.serving_replay(pd.DataFrame({f"{w}_{m}_s": [1.0, 2.0] for w in ("measured", "predicted")
                                              for m in ("ttft", "tpot", "e2e")}), None, [(0.0, 1, 0), (1.0, 0, 0)],
                                pyplot=False)
    assert isinstance(bare, Figure) and set(plt.get_fignums()) == before | {fig.number}


def test_the_painters_warm_up_draws_the_same_png(tmp_path):
    """warm_up in a fresh process (the CLI's painter) skips matplotlib's Artist.set docstrings: the figure it
    then writes is the same bytes as one written with matplotlib imported as usual (this process)."""
    import json
    import subprocess
    import sys

    from offloadlab.apps.paper import memory_rows, paper_rows
    from offloadlab.apps.tables import as_lists

    res, mem = as_lists(paper_rows(requests=8)), as_lists(memory_rows())
    (tmp_path / "data.json").write_text(json.dumps([res, mem]))
    plots.write_png(str(tmp_path / "here.png"), "paper_figure", res, mem, "t")
    code = ("import json, sys; from offloadlab.apps import plots; plots.warm_up(); "
            "from matplotlib.artist import Artist; from matplotlib.text import Text; "
            "assert 'Supported properties' not in (Text.set.__doc__ or ''), 'the docstrings were built'; "
            "res, mem = json.load(open(sys.argv[1])); plots.write_png(sys.argv[2], 'paper_figure', res, mem, 't')")
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "data.json"), str(tmp_path / "painter.png")],
                   check=True, timeout=120)
    assert (tmp_path / "painter.png").read_bytes() == (tmp_path / "here.png").read_bytes()
