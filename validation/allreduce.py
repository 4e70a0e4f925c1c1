"""Public measurements of all-reduces over PCIe (no NVLink): the evidence behind sim/costs.py
PCIE_ALLREDUCE_RATE, PCIE_ALLREDUCE_HOP and BAND_ALLREDUCE_PCIE; and over NVLink (``derive_nvlink``,
``traces/allreduce/nvlink_allreduce.csv``: stored and fitted, not yet behind a constant; see its README).

``traces/allreduce/pcie_allreduce.csv`` holds one row per (source URL, GPU, GPUs, PCIe generation, path,
bytes, microseconds), transcribed from each source (its README says what each one is). A *table* is the
rows of one source, GPU count and path. The model they are fitted to is the ring the Roofline charges
(Roofline.allreduce_seconds): ``2 (n-1)`` steps of ``hop`` seconds each, plus the ring's traffic per GPU,
``2 (n-1)/n x bytes``, at ``rate`` x the host link's datasheet figure per direction.

How each constant comes out (``derive``), from the NCCL rows (and the host-memory path NCCL takes without
peer access) of 64 KiB to 16 MiB; the custom kernels' rows are kept as reported, not fitted (they move
other traffic than the ring's):
- each table with two sizes or more: a least-squares line ``t = 2 (n-1) hop + traffic / (rate x link)``;
  it *resolves the bandwidth* when its rate comes out in (0, 1] (no path beats the datasheet: a table of
  small sizes only, where the time is latency, gives a slope it cannot resolve);
- PCIE_ALLREDUCE_RATE: the median rate over the tables that resolve it;
- hop of a table that does not resolve its bandwidth: its rows' mean time less their traffic at that
  median rate, per ring step; PCIE_ALLREDUCE_HOP: the median hop over every table;
- BAND_ALLREDUCE_PCIE: the lowest and highest, over the tables, of the median of measured / model.

NVLink (``nvlink_allreduce.csv``: a ``nvlink_gbs`` column, the GPU link's datasheet GB/s per direction as
offloadlab/catalog/hardware.csv gives it, in place of ``pcie_gen``) holds vLLM's own kernels beside NCCL's, each
with the traffic it moves (csrc/custom_all_reduce.cuh): ``vllm custom 1stage`` (cross_device_reduce_1stage) reads
every peer's whole buffer, ``(n-1) x bytes``, after one synchronisation; ``vllm custom 2stage``
(cross_device_reduce_2stage) a reduce-scatter and an all-gather, ``2 (n-1)/n x bytes`` (the ring's traffic),
after one; NCCL the ring as above (its ``2 (n-1)`` steps stand for whichever algorithm it picks).
``derive_nvlink`` fits each path (its rows with FIT_BYTES) as ``derive`` does: the median rate over the tables
that resolve it, the median latency per step (a custom kernel's call is one step), and the spread of each
table's median measured / model. A path's text that starts with "outlier:" is stored, not fitted.

``python -m offloadlab.validation.allreduce [CSV]`` prints each table's fit and the three constants (and,
without CSV, the NVLink fit).
"""
from __future__ import annotations

import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import ConfigError
from ..fileio import read_csv_table

TABLE = Path(__file__).parent / "traces" / "allreduce" / "pcie_allreduce.csv"
NVLINK_TABLE = Path(__file__).parent / "traces" / "allreduce" / "nvlink_allreduce.csv"
COLUMNS = ("url", "gpu", "gpus", "pcie_gen", "path", "bytes", "us")
LINK_COLUMNS = ("pcie_gen", "nvlink_gbs")  # a table has one of them: the link its all-reduces cross
# x16 link per direction, bytes/s, rounded as offloadlab/catalog/hardware*.csv rounds Gen4 (32) and Gen5 (64)
PCIE_X16 = {3: 16e9, 4: 32e9, 5: 64e9}
FIT_BYTES = (64 * 1024, 16 * 1024 * 1024)  # the sizes a decode or prefill step's all-reduce has
FITTED_PATHS = ("nccl",)  # the paths the ring model stands for (a path's text starts with one of these)
# vLLM's kernels over NVLink (csrc/custom_all_reduce.cuh), fitted by derive_nvlink with their own traffic
CUSTOM_PATHS = ("vllm custom 1stage", "vllm custom 2stage")


@dataclass(frozen=True)
class Row:
    url: str
    gpu: str
    gpus: int
    pcie_gen: int | None  # None over NVLink
    path: str
    bytes: int
    seconds: float
    nvlink: float | None = None  # the GPU link's datasheet bytes/s per direction (NVLink tables)

    @property
    def link(self) -> float:
        return self.nvlink if self.nvlink is not None else PCIE_X16[self.pcie_gen]

    @property
    def traffic(self) -> float:
        """Bytes each GPU moves over its link in this all-reduce: the ring's 2 (n-1)/n x bytes, or what
        vLLM's one-stage kernel reads, every peer's whole buffer ((n-1) x bytes)."""
        if self.path.startswith("vllm custom 1stage"):
            return (self.gpus - 1) * self.bytes
        return 2 * (self.gpus - 1) / self.gpus * self.bytes

    @property
    def steps(self) -> int:
        """Latency-bound steps: the ring's 2 (n-1); one call of a vLLM custom kernel."""
        return 1 if self.path.startswith(CUSTOM_PATHS) else 2 * (self.gpus - 1)


def load(path: str | Path = TABLE) -> list[Row]:
    """The table's rows; a missing column, a GPU count below 2, an unknown PCIe generation or a
    non-positive size or time is a ConfigError naming the file and line."""
    header, lines = read_csv_table(path)
    link_col = next((c for c in LINK_COLUMNS if c in header), "pcie_gen")
    want = tuple(link_col if c == "pcie_gen" else c for c in COLUMNS)
    missing = [c for c in want if c not in header]
    if missing:
        raise ConfigError("columns", header, "the columns " + ", ".join(COLUMNS) + " (or nvlink_gbs for pcie_gen)",
                          source=str(path))
    col = {c: header.index(c) for c in want}
    rows = []
    for line, cells in lines:
        v = {c: cells[i].strip() for c, i in col.items()}
        where = f"{path}, line {line}"
        try:
            gpus, nbytes, us = int(v["gpus"]), int(v["bytes"]), float(v["us"])
            link = int(v[link_col]) if link_col == "pcie_gen" else float(v[link_col])
        except ValueError:
            raise ConfigError("row", ",".join(cells)[:60], f"integers gpus, {link_col}, bytes and a number us",
                              source=where) from None
        link_ok = link in PCIE_X16 if link_col == "pcie_gen" else 0 < link < 10_000
        link_want = "one of " + ", ".join(map(str, PCIE_X16)) if link_col == "pcie_gen" else "GB/s in (0, 10000)"
        for name, val, ok, want in (("gpus", gpus, gpus >= 2, "2 or more"), (link_col, link, link_ok, link_want),
                                    ("bytes", nbytes, nbytes > 0, "> 0"), ("us", us, us > 0, "> 0"),
                                    ("url", v["url"], v["url"].startswith("https://"), "the source's https URL")):
            if not ok:
                raise ConfigError(name, val, want, source=where)
        if link_col == "pcie_gen":
            rows.append(Row(v["url"], v["gpu"], gpus, link, v["path"], nbytes, us * 1e-6))
        else:
            rows.append(Row(v["url"], v["gpu"], gpus, None, v["path"], nbytes, us * 1e-6, link * 1e9))
    return rows


def tables(rows: list[Row], paths: tuple[str, ...] = FITTED_PATHS) -> dict[tuple[str, str, int, str], list[Row]]:
    """The fitted rows (``paths``, FIT_BYTES) by (url, GPU, GPUs, path), in file order."""
    out: dict = {}
    for r in rows:
        if r.path.startswith(paths) and FIT_BYTES[0] <= r.bytes <= FIT_BYTES[1]:
            out.setdefault((r.url, r.gpu, r.gpus, r.path), []).append(r)
    return out


def line_fit(rows: list[Row]) -> tuple[float, float] | None:
    """(hop seconds, rate) of one table's least-squares line, or None when it does not resolve the
    bandwidth (fewer than two sizes, a rate outside (0, 1] or a negative hop)."""
    if len({r.bytes for r in rows}) < 2:
        return None
    a = np.array([[r.steps, r.traffic / r.link] for r in rows])
    (hop, inv_rate), *_ = np.linalg.lstsq(a, np.array([r.seconds for r in rows]), rcond=None)
    if inv_rate < 1 or hop < 0:
        return None
    return float(hop), float(1 / inv_rate)


def model_seconds(r: Row, hop: float, rate: float) -> float:
    return r.steps * hop + r.traffic / (rate * r.link)


@dataclass(frozen=True)
class Evidence:
    rate: float  # PCIE_ALLREDUCE_RATE
    hop: float  # PCIE_ALLREDUCE_HOP, seconds
    band: tuple[float, float]  # BAND_ALLREDUCE_PCIE
    fits: dict  # table key -> (hop, rate or None, median measured / model)


def derive(rows: list[Row] | None = None, paths: tuple[str, ...] = FITTED_PATHS) -> Evidence:
    """The three constants from the stored table (or ``rows``), as the module docstring says; ``paths``:
    the rows fitted (the NCCL ones unless told)."""
    groups = tables(load() if rows is None else rows, paths)
    lines = {k: line_fit(v) for k, v in groups.items()}
    resolved = [f[1] for f in lines.values() if f is not None]
    if not resolved:
        raise ConfigError("rows", len(groups), "at least one table that resolves its bandwidth")
    rate = statistics.median(resolved)
    hops = {}
    for k, v in groups.items():
        if lines[k] is not None:
            hops[k] = lines[k][0]
        else:
            hops[k] = statistics.fmean((r.seconds - r.traffic / (rate * r.link)) / r.steps for r in v)
    hop = statistics.median(hops.values())
    ratios = {k: statistics.median(r.seconds / model_seconds(r, hop, rate) for r in v) for k, v in groups.items()}
    fits = {k: (hops[k], lines[k][1] if lines[k] else None, ratios[k]) for k in groups}
    return Evidence(rate, hop, (min(ratios.values()), max(ratios.values())), fits)


NVLINK_PATHS = {"nccl": ("nccl",), "vllm custom 1stage": (CUSTOM_PATHS[0],),
                "vllm custom 2stage": (CUSTOM_PATHS[1],)}


def derive_nvlink(rows: list[Row] | None = None) -> dict[str, Evidence]:
    """Per path over NVLink (NVLINK_PATHS: NCCL, vLLM's one- and two-stage kernels), what ``derive`` gives:
    the median rate of the link's datasheet figure, the median latency per step (hop; a custom kernel's call
    is one step) and the spread of each table's median measured / model."""
    rows = load(NVLINK_TABLE) if rows is None else rows
    return {name: derive(rows, paths) for name, paths in NVLINK_PATHS.items()}


def _print_fits(ev: Evidence) -> None:
    print(f"{'GPU':40s} {'n':>2s} {'path':42s} {'hop us':>7s} {'rate':>6s} {'meas/model':>10s}")
    for (url, gpu, n, path), (hop, rate, ratio) in ev.fits.items():
        r = f"{rate:6.3f}" if rate is not None else "     -"
        print(f"{gpu:40s} {n:2d} {path:42s} {hop * 1e6:7.2f} {r} {ratio:10.2f}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ev = derive(load(argv[0]) if argv else None)
    _print_fits(ev)
    print(f"PCIE_ALLREDUCE_RATE {ev.rate:.3f}  PCIE_ALLREDUCE_HOP {ev.hop * 1e6:.2f} us  "
          f"BAND_ALLREDUCE_PCIE ({ev.band[0]:.2f}, {ev.band[1]:.2f})")
    if not argv:
        print("\nNVLink (nvlink_allreduce.csv; stored and fitted, no constant in sim/costs.py yet):")
        for name, nv in derive_nvlink().items():
            _print_fits(nv)
            print(f"  {name}: rate {nv.rate:.3f} of the NVLink datasheet, {nv.hop * 1e6:.2f} us a step, "
                  f"measured / model {nv.band[0]:.2f}-{nv.band[1]:.2f}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
