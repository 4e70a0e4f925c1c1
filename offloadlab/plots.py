"""Matplotlib figures; each function returns the Figure (the caller saves or shows it)."""
from __future__ import annotations

import matplotlib.pyplot as plt
import pandas as pd
from matplotlib.ticker import NullFormatter, ScalarFormatter

_COLORS = {"none": "#7f7f7f", "vllm": "#d62728", "prefetch": "#1f77b4"}


def paper_figure(results: pd.DataFrame, memory: pd.DataFrame, title: str = ""):
    """Throughput, TTFT and TPOT per policy and mode, and the GPU memory breakdown (Fig. 5-like)."""
    fig, axes = plt.subplots(1, 4, figsize=(17, 4.2), constrained_layout=True)
    modes = list(dict.fromkeys(results["mode"]))
    pols = list(dict.fromkeys(results["policy"]))
    kinds = dict(zip(results["policy"], results["policy_kind"]))
    width = 0.8 / len(pols)
    for ax, (col, label, scale) in zip(axes[:3], [("throughput_rps", "throughput (requests/s)", 1),
                                                 ("ttft_mean_s", "mean TTFT (s)", 1),
                                                 ("tpot_mean_s", "mean TPOT (ms)", 1e3)]):
        for j, pol in enumerate(pols):
            vals = [results[(results["mode"] == m) & (results["policy"] == pol)][col].iloc[0] * scale for m in modes]
            xs = [i + (j - (len(pols) - 1) / 2) * width for i in range(len(modes))]
            ax.bar(xs, vals, width, label=pol, color=_COLORS.get(kinds[pol]), alpha=0.6 + 0.4 * (j % 2))
        ax.set_xticks(range(len(modes)), modes)
        ax.set_ylabel(label)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=8)
    ax = axes[3]
    bottom = pd.Series(0.0, index=memory.index)
    for col, color in [("weights_GiB", "#8c564b"), ("staging_GiB", "#ff7f0e"), ("activations_GiB", "#bcbd22"),
                       ("overhead_GiB", "#c7c7c7"), ("kv_cache_GiB", "#2ca02c")]:
        ax.bar(memory["policy"], memory[col], bottom=bottom, label=col.replace("_GiB", ""), color=color)
        bottom = bottom + memory[col]
    ax.set_ylabel("GPU memory (GiB)")
    ax.tick_params(axis="x", rotation=60, labelsize=8)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.set_title("memory breakdown", fontsize=10)
    if title:
        fig.suptitle(title)
    return fig


def timeline(trace, ax=None, title: str = ""):
    """A Gantt chart of a Trace: one row per lane, waits hatched."""
    colors = {"compute": "#1f77b4", "copy": "#ff7f0e", "launch": "#9467bd", "wait": "#ffffff", "step": "#2ca02c"}
    lanes = trace.lanes()
    if ax is None:
        fig, ax = plt.subplots(figsize=(12, 0.6 * len(lanes) + 1), constrained_layout=True)
    else:
        fig = ax.figure
    for row, lane in enumerate(lanes):
        spans = [s for s in trace.spans if s.lane == lane]
        for kind in colors:
            sel = [(s.start * 1e3, s.duration * 1e3) for s in spans if s.kind == kind]
            if sel:
                ax.broken_barh(sel, (row - 0.4, 0.8), facecolors=colors[kind], edgecolor="k" if kind == "wait" else None,
                               hatch="//" if kind == "wait" else None, linewidth=0.3, label=kind)
    ax.set_yticks(range(len(lanes)), lanes)
    ax.invert_yaxis()
    ax.set_xlabel("time (ms)")
    handles, labels = ax.get_legend_handles_labels()
    uniq = dict(zip(labels, handles))
    ax.legend(uniq.values(), uniq.keys(), fontsize=8, loc="upper right")
    if title:
        ax.set_title(title)
    return fig


def predicted_vs_measured(df: pd.DataFrame, title: str = ""):
    """Scatter of predicted against measured step time (log-log), y = x and a +-10% band."""
    fig, ax = plt.subplots(figsize=(5.5, 5), constrained_layout=True)
    markers = {"resident": "o", "sync_prefix": "s", "async_k": "^"}
    for pol, g in df.groupby("policy"):
        hollow = dict(facecolors="none", edgecolors="k") if pol == "resident" else {}
        ax.scatter(g["measured_ms"], g["predicted_ms"], marker=markers.get(pol, "o"), alpha=0.8,
                   label=f"{pol} (calibration)" if pol == "resident" else pol, **hollow)
    lo, hi = df[["measured_ms", "predicted_ms"]].min().min() * 0.8, df[["measured_ms", "predicted_ms"]].max().max() * 1.2
    xs = [lo, hi]
    ax.plot(xs, xs, "k-", lw=0.8)
    ax.fill_between(xs, [x * 0.9 for x in xs], [x * 1.1 for x in xs], color="k", alpha=0.07, label="±10%")
    ax.set(xscale="log", yscale="log", xlim=(lo, hi), ylim=(lo, hi), xlabel="measured (ms)",
           ylabel="predicted (ms)", title=title)
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_formatter(ScalarFormatter())
        axis.set_minor_formatter(NullFormatter())
    ax.legend(fontsize=8)
    return fig


def compare_timelines(simulated, measured, title: str = ""):
    """Two Gantt charts on one time axis: the simulated trace above, the measured one below."""
    lanes = max(len(simulated.lanes()), len(measured.lanes()))
    fig, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=(12, 1.2 * lanes + 1.5), constrained_layout=True)
    for ax, trace, name in ((top, simulated, "simulated"), (bottom, measured, "measured")):
        t0 = min((s.start for s in trace.spans), default=0.0)  # both start at 0
        timeline(trace.shifted(-t0), ax=ax, title=name)
    if title:
        fig.suptitle(title)
    return fig
