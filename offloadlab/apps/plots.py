"""Matplotlib figures; each function returns the Figure (the caller saves or shows it).

Figures come from pyplot (a notebook shows them, ``plt.show()`` too); the ones the CLI writes take
``pyplot=False`` for a bare Figure instead (pyplot's import takes 0.3 s, and nothing needs to show it).
``save_png`` writes a Figure with one draw; ``write_png`` builds a plot and writes it, in whichever
process runs it (the CLI's painter process: ``warm_up`` there first, while the data is simulated).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from matplotlib.ticker import NullFormatter, ScalarFormatter

if TYPE_CHECKING:  # the frames come from the callers; the paper's figure needs none (see paper_figure)
    import pandas as pd

_COLORS = {"none": "#7f7f7f", "vllm": "#d62728", "prefetch": "#1f77b4"}


def _subplots(*args, pyplot: bool = True, **kw):
    """``plt.subplots(*args, **kw)``; ``pyplot=False``: the same axes on a bare Figure (Agg canvas, not shown)."""
    if pyplot:
        import matplotlib.pyplot as plt

        return plt.subplots(*args, **kw)
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(**{k: kw.pop(k) for k in ("figsize", "constrained_layout", "layout", "dpi") if k in kw})
    FigureCanvasAgg(fig)
    return fig, fig.subplots(*args, **kw)


def save_png(fig, file, dpi: float = 110) -> None:
    """``fig.savefig(file, format="png", dpi=dpi)``, the same bytes, with one draw instead of savefig's two
    (savefig lays the figure out in a draw of its own first; Figure.draw runs its layout engine itself)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fig.set_dpi(dpi)
    FigureCanvasAgg(fig).print_png(file)


def write_png(path: str, plot: str, *args, dpi: float = 110, **kw) -> None:
    """Write ``plot(*args, pyplot=False, **kw)`` (the name of a function here) as a PNG file at ``path``,
    flushed to disk (a staged output file: offloadlab.apps.outputs)."""
    import os

    fig = globals()[plot](*args, pyplot=False, **kw)
    with open(path, "wb") as f:
        save_png(fig, f, dpi)
        f.flush()
        os.fsync(f.fileno())


def warm_up() -> None:
    """In a process that only draws (the CLI's painter): import what a figure needs (Figure, the Agg
    canvas: most of matplotlib) and load the default font, so that the figure that matters draws sooner.

    Matplotlib builds a signature and docstring for every Artist subclass's ``set`` as it defines the class
    (matplotlib/artist.py, ``Artist.__init_subclass__`` -> ``_update_set_signature_and_docstring``): about
    0.25 s of its 0.6 s import here, for help text a drawing process never reads. When matplotlib.figure
    is not imported yet (this module's own matplotlib.ticker import defines almost none of the Artist
    classes), that step is skipped for the classes defined from now on; ``set`` itself still works
    (each class inherits the generic one), and the PNG is the same bytes (tests/test_plots.py holds it).
    No trial draw: a draw costs as much the second time (about 0.05 s here), so one made before the data
    is time the figure then waits for."""
    import sys

    if "matplotlib.figure" not in sys.modules:
        from matplotlib.artist import Artist

        if hasattr(Artist, "_update_set_signature_and_docstring"):  # a later matplotlib may not have it
            Artist._update_set_signature_and_docstring = classmethod(lambda cls: None)
    from matplotlib import font_manager
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: F401
    from matplotlib.figure import Figure  # noqa: F401

    font_manager.get_font(font_manager.findfont(font_manager.FontProperties()))


def paper_figure(results, memory, title: str = "", *, pyplot: bool = True):
    """Throughput, TTFT and TPOT per policy and mode, and the GPU memory breakdown (Fig. 5-like).
    ``results`` and ``memory``: ``run_paper``'s and ``memory_table``'s DataFrames, or their columns as lists
    (``DataFrame.to_dict("list")``: what the CLI's painter process gets, which then needs no pandas)."""
    fig, axes = _subplots(1, 4, figsize=(17, 4.2), pyplot=pyplot)
    # fixed margins, room for the memory panel's slanted names and its legend on the right: a draw takes
    # about 2/3 of what constrained layout's (which measures every label first) does, and this figure is
    # the last thing `offloadlab paper` waits for
    fig.subplots_adjust(left=0.04, right=0.93, bottom=0.3, top=0.86, wspace=0.3)
    res = {c: list(results[c]) for c in ("mode", "policy", "policy_kind", "throughput_rps", "ttft_mean_s",
                                         "tpot_mean_s")}
    modes = list(dict.fromkeys(res["mode"]))
    pols = list(dict.fromkeys(res["policy"]))
    kinds = dict(zip(res["policy"], res["policy_kind"]))
    first: dict = {}  # (mode, policy) -> its first row
    for i, key in enumerate(zip(res["mode"], res["policy"])):
        first.setdefault(key, i)
    width = 0.8 / len(pols)
    for ax, (col, label, scale) in zip(axes[:3], [("throughput_rps", "throughput (requests/s)", 1),
                                                 ("ttft_mean_s", "mean TTFT (s)", 1),
                                                 ("tpot_mean_s", "mean TPOT (ms)", 1e3)]):
        for j, pol in enumerate(pols):
            vals = [res[col][first[m, pol]] * scale for m in modes]
            xs = [i + (j - (len(pols) - 1) / 2) * width for i in range(len(modes))]
            ax.bar(xs, vals, width, label=pol, color=_COLORS.get(kinds[pol]), alpha=0.6 + 0.4 * (j % 2))
        ax.set_xticks(range(len(modes)), modes)
        ax.set_ylabel(label)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=8)
    ax = axes[3]
    names = list(memory["policy"])
    bottom = [0.0] * len(names)
    for col, color in [("weights_GiB", "#8c564b"), ("staging_GiB", "#ff7f0e"), ("activations_GiB", "#bcbd22"),
                       ("overhead_GiB", "#c7c7c7"), ("kv_cache_GiB", "#2ca02c")]:
        heights = list(memory[col])
        ax.bar(names, heights, bottom=bottom, label=col.replace("_GiB", ""), color=color)
        bottom = [b + h for b, h in zip(bottom, heights)]
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
        fig, ax = _subplots(figsize=(12, 0.6 * len(lanes) + 1), constrained_layout=True)
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


def predicted_vs_measured(df: pd.DataFrame, title: str = "", *, pyplot: bool = True):
    """Scatter of predicted against measured step time (log-log), y = x and a +-10% band; each
    prediction's own band as a vertical bar when the rows carry ``predicted_lo_ms``/``predicted_hi_ms``."""
    fig, ax = _subplots(figsize=(5.5, 5), constrained_layout=True, pyplot=pyplot)
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
    fig, (top, bottom) = _subplots(2, 1, sharex=True, figsize=(12, 1.2 * lanes + 1.5), constrained_layout=True)
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
    import pandas as pd

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
        fig, ax = _subplots(figsize=(1.1 * len(table.columns) + 2.5, 0.6 * len(table.index) + 1.8),
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
        fig, ax = _subplots(figsize=(6.5, 4.2), constrained_layout=True)
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
    import pandas as pd

    if not isinstance(runs, dict):
        runs = {r.config.get("policy", str(i)): r for i, r in enumerate(runs)}
    fig, axes = _subplots(1, len(metrics), figsize=(5.2 * len(metrics), 4), constrained_layout=True, squeeze=False)
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
    fig, axes = _subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8), constrained_layout=True,
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
    fig, axes = _subplots(1, 2, figsize=(11, 3.8), constrained_layout=True)
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


def serving_replay(rows: pd.DataFrame, timeseries: pd.DataFrame | None = None, occupancy=(), title: str = "", *,
                   pyplot: bool = True):
    """A replayed serving run: measured vs predicted CDFs of TTFT, TPOT and e2e (``rows``: the
    ``measured_*_s`` / ``predicted_*_s`` columns), and running / waiting requests over time, measured
    (``timeseries``: t, running, waiting per second) against predicted (``occupancy``: (time,
    running, waiting) per simulated step)."""
    fig, axes = _subplots(1, 4, figsize=(18, 4), constrained_layout=True, pyplot=pyplot)
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
