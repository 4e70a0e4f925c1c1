"""Matplotlib figures; each function returns the Figure (the caller saves or shows it)."""
from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
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
    """Scatter of predicted against measured step time (log-log), y = x and a +-10% band; each
    prediction's own band as a vertical bar when the rows carry ``predicted_lo_ms``/``predicted_hi_ms``."""
    fig, ax = plt.subplots(figsize=(5.5, 5), constrained_layout=True)
    markers = {"resident": "o", "sync_prefix": "s", "async_k": "^"}
    for pol, g in df.groupby("policy"):
        if {"predicted_lo_ms", "predicted_hi_ms"} <= set(g):
            ax.errorbar(g["measured_ms"], g["predicted_ms"], fmt="none", ecolor="0.6", elinewidth=0.8,
                        yerr=[g["predicted_ms"] - g["predicted_lo_ms"], g["predicted_hi_ms"] - g["predicted_ms"]])
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


# ---- sweeps (offloadlab.apps.sweep DataFrames) and per-request latency --------------------------------
_UNITS = {"throughput_rps": ("throughput (requests/s)", 1.0), "output_tok_s": ("output tokens/s", 1.0),
          "total_tok_s": ("tokens/s", 1.0), "ttft": ("TTFT (s)", 1.0), "tpot": ("TPOT (ms)", 1e3),
          "e2e": ("end-to-end latency (s)", 1.0)}


def _metric_label(metric: str) -> tuple[str, float]:
    """Axis label and scale of a sweep column: seconds stay s except TPOT (ms), bytes become GiB."""
    if metric in _UNITS:
        return _UNITS[metric]
    for base in ("ttft", "tpot", "e2e"):
        if metric.startswith(base + "_") and metric.endswith("_s"):
            stat = metric[len(base) + 1:-2]
            label, scale = _UNITS[base]
            return f"{stat} {label}", scale
    if metric.startswith("mem_") and metric not in ("mem_kv_tokens", "mem_kv_blocks", "mem_block_size"):
        return f"{metric[4:].replace('_', ' ')} (GiB)", 1 / 1024**3
    return metric, 1.0


def _tick(v) -> str:
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return f"{v:g}" if isinstance(v, float) else str(v)


def _scaled(df: pd.DataFrame, keys: tuple[str, ...], metric: str) -> tuple[str, pd.DataFrame]:
    """(axis label, the ``keys`` and ``metric`` columns with the metric numeric and in display units)."""
    for col in (*keys, metric):
        if col not in df.columns:
            raise KeyError(f"column {col!r} not in the sweep frame; columns: {', '.join(df.columns)}")
    label, scale = _metric_label(metric)
    d = df[[*keys, metric]].copy()
    d[metric] = pd.to_numeric(d[metric], errors="coerce").astype(float) * scale
    return label, d


def heatmap(df: pd.DataFrame, x: str, y: str, metric: str = "throughput_rps", *, agg: str = "mean", ax=None,
            cmap: str = "viridis", annotate: bool = True, title: str = ""):
    """A metric over two sweep axes (e.g. ``x="k", y="buffers"``): one cell per (x, y), ``agg`` of the rows in it.

    Error rows (NaN metric) leave their cell blank. Units as in the other plots (TPOT in ms, bytes in GiB).
    """
    label, d = _scaled(df, (x, y), metric)
    table = d.pivot_table(index=y, columns=x, values=metric, aggfunc=agg, dropna=False)
    if ax is None:
        fig, ax = plt.subplots(figsize=(1.1 * len(table.columns) + 2.5, 0.6 * len(table.index) + 1.8),
                               constrained_layout=True)
    else:
        fig = ax.figure
    values = table.to_numpy(dtype=float)
    im = ax.imshow(values, origin="lower", aspect="auto", cmap=cmap)
    ax.set_xticks(range(len(table.columns)), [_tick(v) for v in table.columns])
    ax.set_yticks(range(len(table.index)), [_tick(v) for v in table.index])
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    fig.colorbar(im, ax=ax, label=label)
    if annotate:
        finite = values[np.isfinite(values)]
        mid = (finite.min() + finite.max()) / 2 if finite.size else 0.0
        for i in range(values.shape[0]):
            for j in range(values.shape[1]):
                v = values[i, j]
                if np.isfinite(v):
                    ax.text(j, i, f"{v:.3g}", ha="center", va="center", fontsize=8,
                            color="k" if v > mid else "w")
    ax.set_title(title or label)
    return fig


def metric_vs_bandwidth(df: pd.DataFrame, metric: str = "throughput_rps", *, x: str = "host_link_GBps",
                        by: str = "policy", agg: str = "mean", logx: bool = True, ax=None, title: str = ""):
    """One line per ``by`` value (a policy by default): ``metric`` against host-link bandwidth (GB/s).

    Rows sharing (``by``, ``x``) are combined with ``agg``; error rows are left out.
    """
    label, d = _scaled(df, (by, x), metric)
    d = d.dropna(subset=[metric])
    if ax is None:
        fig, ax = plt.subplots(figsize=(6.5, 4.2), constrained_layout=True)
    else:
        fig = ax.figure
    kinds = dict(zip(df[by], df["policy_kind"])) if by == "policy" and "policy_kind" in df else {}
    for name, g in d.groupby(by, sort=False):
        s = g.groupby(x)[metric].agg(agg).sort_index()
        color = _COLORS.get(kinds.get(name)) if kinds.get(name) in ("none", "vllm") else None
        ax.plot(s.index.to_numpy(dtype=float), s.to_numpy(), marker="o", label=_tick(name), color=color)
    if logx:
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
        ticks = sorted(d[x].astype(float).unique())
        ax.set_xticks(ticks, [_tick(t) for t in ticks])
    ax.set_xlabel("host link bandwidth (GB/s per direction)" if x == "host_link_GBps" else x)
    ax.set_ylabel(label)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, title=by)
    if title:
        ax.set_title(title)
    return fig


def latency_cdfs(runs, metrics=("ttft", "tpot"), title: str = ""):
    """Empirical CDFs of per-request latencies, one line per policy, one panel per metric.

    ``runs``: a mapping label -> RunResult (or its ``requests`` frame), or a list of RunResults
    (labelled by their policy). Metrics are columns of ``RunResult.requests``: ttft, tpot, e2e
    (TPOT in ms, the others in s); requests without a value (TPOT of a one-token output) are left out.
    """
    if not isinstance(runs, dict):
        runs = {r.config.get("policy", str(i)): r for i, r in enumerate(runs)}
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.2 * len(metrics), 4), constrained_layout=True, squeeze=False)
    axes = axes[0]
    for ax, metric in zip(axes, metrics):
        label, scale = _metric_label(metric)
        for name, run in runs.items():
            reqs = run if isinstance(run, pd.DataFrame) else run.requests
            v = np.sort(reqs[metric].dropna().to_numpy(dtype=float)) * scale
            if v.size:
                kind = getattr(run, "config", {}).get("policy_kind") if not isinstance(run, pd.DataFrame) else None
                ax.step(np.concatenate([[v[0]], v]), np.arange(v.size + 1) / v.size, where="post", label=name,
                        color=_COLORS.get(kind) if kind in ("none", "vllm") else None)
        ax.set_xlabel(label)
        ax.set_ylabel("fraction of requests")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    return fig


def by_gpu_count(table: pd.DataFrame, metric: str = "tok_s_per_gpu", *, panel: str = "model", line: str = "gpu",
                 logy: bool = True, title: str = ""):
    """The "before buying" view (``offloadlab.apps.study.serve``'s table): one panel per ``panel`` value,
    ``metric`` against the number of GPUs, one colour per ``line`` value; solid without offload,
    dashed with the best offload policy (hollow markers)."""
    label, d = _scaled(table, (panel, line, "gpus", "offload"), metric)
    label = {"tok_s_per_gpu": "output tokens/s per GPU", "gpu_h_per_Mtok": "GPU-hours per million output tokens"
             }.get(metric, label)
    panels = list(dict.fromkeys(d[panel]))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8), constrained_layout=True,
                             sharey=True, squeeze=False)
    colors = {name: f"C{i}" for i, name in enumerate(dict.fromkeys(d[line]))}
    for ax, name in zip(axes[0], panels):
        for (who, off), g in d[d[panel] == name].groupby([line, "offload"], sort=False):
            g = g.dropna(subset=[metric]).sort_values("gpus")
            ax.plot(g["gpus"], g[metric], ls="--" if off else "-", marker="o", color=colors[who],
                    mfc="none" if off else colors[who], label=f"{who}{' + offload' if off else ''}")
        ax.set_xscale("log", base=2)
        ticks = sorted(d["gpus"].unique())
        ax.set_xticks(ticks, [_tick(float(t)) for t in ticks])
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set(title=str(name), xlabel="GPUs")
        if logy:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(label)
    handles, labels = axes[0][-1].get_legend_handles_labels()
    seen = dict(zip(labels, handles))
    for ax in axes[0][:-1]:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            seen.setdefault(lab, h)
    fig.legend(seen.values(), seen.keys(), fontsize=7, loc="outside right upper")
    if title:
        fig.suptitle(title)
    return fig


def length_distributions(workloads: dict, title: str = ""):
    """CDFs of prompt and output lengths (tokens), one line per workload (``{label: Workload}``)."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), constrained_layout=True)
    for label, wl in workloads.items():
        df = wl.to_frame()
        for ax, col in zip(axes, ("prompt_len", "output_len")):
            x = np.sort(df[col].to_numpy())
            ax.step(x, np.arange(1, len(x) + 1) / len(x), where="post",
                    label=f"{label} (mean {x.mean():,.0f}, p99 {np.percentile(x, 99):,.0f})")
    for ax, what in zip(axes, ("prompt", "output")):
        ax.set(xscale="log", xlabel=f"{what} tokens", ylabel="fraction of requests", ylim=(0, 1))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    if title:
        fig.suptitle(title)
    return fig


def serving_replay(rows: pd.DataFrame, timeseries: pd.DataFrame | None = None, occupancy=(), title: str = ""):
    """A replayed serving run: measured vs predicted CDFs of TTFT, TPOT and e2e (``rows``: the
    ``measured_*_s`` / ``predicted_*_s`` columns), and running / waiting requests over time, measured
    (``timeseries``: t, running, waiting per second) against predicted (``occupancy``: (time,
    running, waiting) per simulated step)."""
    fig, axes = plt.subplots(1, 4, figsize=(18, 4), constrained_layout=True)
    for ax, (m, label, scale) in zip(axes, [("ttft", "TTFT (s)", 1), ("tpot", "TPOT (ms)", 1e3),
                                            ("e2e", "end-to-end (s)", 1)]):
        for who, style in (("measured", "-"), ("predicted", "--")):
            v = np.sort(rows[f"{who}_{m}_s"].to_numpy() * scale)
            ax.plot(v, np.arange(1, len(v) + 1) / len(v), style, label=who)
        ax.set_xlabel(label)
        ax.set_ylabel("fraction of requests")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    ax = axes[3]
    if timeseries is not None:
        ax.plot(timeseries["t"], timeseries["running"], "-", color="#1f77b4", label="running, measured")
        ax.plot(timeseries["t"], timeseries["waiting"], "-", color="#d62728", label="waiting, measured")
    if len(occupancy):
        occ = np.asarray(occupancy, dtype=float)
        ax.plot(occ[:, 0], occ[:, 1], "--", color="#1f77b4", label="running, predicted")
        ax.plot(occ[:, 0], occ[:, 2], "--", color="#d62728", label="waiting, predicted")
    ax.set_xlabel("time since the first request (s)")
    ax.set_ylabel("requests")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    return fig
