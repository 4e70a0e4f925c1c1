"""Public measurements of all-reduces over PCIe (no NVLink): the evidence behind sim/costs.py
PCIE_ALLREDUCE_RATE, PCIE_ALLREDUCE_HOP and BAND_ALLREDUCE_PCIE.

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

``python -m offloadlab.validation.allreduce [CSV]`` prints each table's fit and the three constants.
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
COLUMNS = ("url", "gpu", "gpus", "pcie_gen", "path", "bytes", "us")
# x16 link per direction, bytes/s, rounded as offloadlab/catalog/hardware*.csv rounds Gen4 (32) and Gen5 (64)
PCIE_X16 = {3: 16e9, 4: 32e9, 5: 64e9}
FIT_BYTES = (64 * 1024, 16 * 1024 * 1024)  # the sizes a decode or prefill step's all-reduce has
FITTED_PATHS = ("nccl",)  # the paths the ring model stands for (a path's text starts with one of these)


@dataclass(frozen=True)
class Row:
    url: str
    gpu: str
    gpus: int
    pcie_gen: int
    path: str
    bytes: int
    seconds: float

    @property
    def link(self) -> float:
        return PCIE_X16[self.pcie_gen]

    @property
    def traffic(self) -> float:
        """Bytes each GPU sends in a ring all-reduce of this size."""
        return 2 * (self.gpus - 1) / self.gpus * self.bytes

    @property
    def steps(self) -> int:
        return 2 * (self.gpus - 1)


def load(path: str | Path = TABLE) -> list[Row]:
    """The table's rows; a missing column, a GPU count below 2, an unknown PCIe generation or a
    non-positive size or time is a ConfigError naming the file and line."""
    header, lines = read_csv_table(path)
    missing = [c for c in COLUMNS if c not in header]
    if missing:
        raise ConfigError("columns", header, "the columns " + ", ".join(COLUMNS), source=str(path))
    col = {c: header.index(c) for c in COLUMNS}
    rows = []
    for line, cells in lines:
        v = {c: cells[i].strip() for c, i in col.items()}
        where = f"{path}, line {line}"
        try:
            gpus, gen, nbytes, us = int(v["gpus"]), int(v["pcie_gen"]), int(v["bytes"]), float(v["us"])
        except ValueError:
            raise ConfigError("row", ",".join(cells)[:60], "integers gpus, pcie_gen, bytes and a number us",
                              source=where) from None
        for name, val, ok, want in (("gpus", gpus, gpus >= 2, "2 or more"),
                                    ("pcie_gen", gen, gen in PCIE_X16, "one of " + ", ".join(map(str, PCIE_X16))),
                                    ("bytes", nbytes, nbytes > 0, "> 0"), ("us", us, us > 0, "> 0"),
                                    ("url", v["url"], v["url"].startswith("https://"), "the source's https URL")):
            if not ok:
                raise ConfigError(name, val, want, source=where)
        rows.append(Row(v["url"], v["gpu"], gpus, gen, v["path"], nbytes, us * 1e-6))
    return rows


def tables(rows: list[Row]) -> dict[tuple[str, str, int, str], list[Row]]:
    """The fitted rows (FITTED_PATHS, FIT_BYTES) by (url, GPU, GPUs, path), in file order."""
    out: dict = {}
    for r in rows:
        if r.path.startswith(FITTED_PATHS) and FIT_BYTES[0] <= r.bytes <= FIT_BYTES[1]:
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


def derive(rows: list[Row] | None = None) -> Evidence:
    """The three constants from the stored table (or ``rows``), as the module docstring says."""
    groups = tables(load() if rows is None else rows)
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


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ev = derive(load(argv[0]) if argv else None)
    print(f"{'GPU':40s} {'n':>2s} {'path':42s} {'hop us':>7s} {'rate':>6s} {'meas/model':>10s}")
    for (url, gpu, n, path), (hop, rate, ratio) in ev.fits.items():
        r = f"{rate:6.3f}" if rate is not None else "     -"
        print(f"{gpu:40s} {n:2d} {path:42s} {hop * 1e6:7.2f} {r} {ratio:10.2f}")
    print(f"PCIE_ALLREDUCE_RATE {ev.rate:.3f}  PCIE_ALLREDUCE_HOP {ev.hop * 1e6:.2f} us  "
          f"BAND_ALLREDUCE_PCIE ({ev.band[0]:.2f}, {ev.band[1]:.2f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
