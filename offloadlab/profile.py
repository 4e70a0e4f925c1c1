"""Profile: measured costs that replace the datasheet roofline.

A Profile is what a GPU measured, in the project's units (bytes, seconds). On disk (JSON or YAML)::

    schema: offloadlab.profile/1
    gpu: NVIDIA H100 80GB HBM3      # free text, provenance
    model: llama-3.1-8b             # the model shape the layer times were measured on
    layers: 32                      # layers in the measured stack
    h2d: [[bytes, bytes_per_s], ...]          # pinned host->device copy rate by transfer size
    layer_times: [[B, T, C, seconds], ...]    # one decoder layer, in-stack, B seqs x T new tokens
                                              # after C cached tokens
    launch_per_layer: 0.00075       # host seconds to launch one layer's kernels (eager), or null
    copy_slowdown: 1.0              # compute time multiplier while a host->device copy runs
    uva_gemm: [[M, bytes, seconds], ...]      # optional: a GEMM of M token rows reading a weight of
                                              # `bytes` from pinned host memory through its UVA view
    meta: {...}                     # torch/driver versions, date, command

``Profile.from_probe`` converts the public probe format (shared/data/h100_llama8b_probe.json):
its ``h2d_bandwidth`` pinned rows, and its ``resident`` forward rows divided by ``layers`` (the
in-stack layer time; isolated ``layer`` rows are used only for shapes with no resident row, scaled
by the median in-stack/isolated ratio).
"""
from __future__ import annotations

import json
import math
import numbers
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import ConfigError
from .fileio import atomic_write_json, load_mapping

SCHEMA = "offloadlab.profile/1"
MiB = 1024**2
# The probe format (shared/data/README.md): fields of a ``forward`` row and its placements.
PROBE_ROW_FIELDS = ("B", "T", "C", "policy", "param", "nbuf", "offloaded_layers", "ms")
PROBE_POLICIES = ("resident", "sync_prefix", "async_k")


def _int(v, minimum: int) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= minimum


def _positive(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v) and v > 0


def _rows(d: dict, key: str, src: str) -> list:
    rows = d[key]
    if not isinstance(rows, list):
        raise ConfigError(key, rows if not isinstance(rows, (dict, str)) else type(rows).__name__,
                          "a list of rows (objects)", source=src)
    for i, r in enumerate(rows):
        if not isinstance(r, dict):
            raise ConfigError(f"{key}[{i}]", r, "an object of named fields", source=src)
    return rows


def check_probe(d: dict, src: str) -> None:
    """Check a probe file's fields (shared/data/README.md) before anything is computed from them: every
    size, count and time a finite number in its range, ``layers`` at most the catalog model's."""
    for key in ("model", "layers", "h2d_bandwidth", "layer", "forward"):
        if key not in d:
            raise ConfigError(key, None, "present in a probe file (see shared/data/README.md)", source=src)
    if not isinstance(d["model"], str) or not d["model"].strip():
        raise ConfigError("model", d["model"], "a model name (see `offloadlab list`)", source=src)
    if not _int(d["layers"], 1):
        raise ConfigError("layers", d["layers"], "an integer >= 1 (decoder layers in the measured stack)", source=src)
    from .catalog import model_names, get_model  # the catalog sits beside this module in the vocabulary

    if d["model"].strip().lower() in {n.lower() for n in model_names()}:
        m = get_model(d["model"])
        if d["layers"] > m.layers:
            raise ConfigError("layers", d["layers"], f"an integer in [1, {m.layers}] for {m.name}", source=src)
    if "layer_bytes" in d and not _int(d["layer_bytes"], 1):
        raise ConfigError("layer_bytes", d["layer_bytes"], "an integer number of bytes >= 1", source=src)
    bw = _rows(d, "h2d_bandwidth", src)
    if not bw:
        raise ConfigError("h2d_bandwidth", bw, "at least one row", source=src)
    for i, r in enumerate(bw):
        for f in ("mb", "h2d_pinned_GBps"):
            if not _positive(r.get(f)):
                raise ConfigError(f"h2d_bandwidth[{i}].{f}", r.get(f), "a finite number > 0", source=src)
    for key, fields in (("layer", ("B", "T", "C", "ms")), ("forward", PROBE_ROW_FIELDS)):
        for i, r in enumerate(_rows(d, key, src)):
            for f in fields:
                v = r.get(f)
                if f not in r:
                    ok, want = False, "present"
                elif f == "ms":
                    ok, want = _positive(v), "a finite number of milliseconds > 0"
                elif f == "policy":
                    ok, want = v in PROBE_POLICIES, f"one of {PROBE_POLICIES}"
                else:
                    low = 1 if f in ("B", "T") else 0
                    ok, want = _int(v, low), f"an integer >= {low}"
                if not ok:
                    raise ConfigError(f"{key}[{i}].{f}", v, want, source=src)


@dataclass(frozen=True)
class Profile:
    h2d: tuple[tuple[float, float], ...]
    layer_times: tuple[tuple[int, int, int, float], ...]
    model: str = ""
    gpu: str = ""
    layers: int = 0
    launch_per_layer: float | None = None
    copy_slowdown: float = 1.0
    meta: dict = field(default_factory=dict, compare=False, hash=False)
    uva_gemm: tuple[tuple[int, int, float], ...] = ()  # (M tokens, weight bytes, seconds), UVA reads

    def __post_init__(self):
        src = self.meta.get("source") if isinstance(self.meta, dict) else None
        if not isinstance(self.h2d, (tuple, list)) or not self.h2d:
            raise ConfigError("h2d", self.h2d, "at least one [bytes, bytes_per_s] row", source=src)
        for i, row in enumerate(self.h2d):
            if not isinstance(row, (tuple, list)) or len(row) != 2 or not all(_positive(x) for x in row):
                raise ConfigError(f"h2d[{i}]", row, "[bytes > 0, bytes_per_s > 0], finite numbers", source=src)
        if not isinstance(self.layer_times, (tuple, list)):
            raise ConfigError("layer_times", self.layer_times, "a list of [B, T, C, seconds] rows", source=src)
        for i, row in enumerate(self.layer_times):
            if not isinstance(row, (tuple, list)) or len(row) != 4 or not (
                    _int(row[0], 1) and _int(row[1], 1) and _int(row[2], 0) and _positive(row[3])):
                raise ConfigError(f"layer_times[{i}]", row, "[B >= 1, T >= 1, C >= 0 integers, seconds > 0 finite]",
                                  source=src)
        for f in ("model", "gpu"):
            if not isinstance(getattr(self, f), str):
                raise ConfigError(f, getattr(self, f), "a string (provenance)", source=src)
        if not _int(self.layers, 0):
            raise ConfigError("layers", self.layers, "an integer >= 0 (0: not recorded)", source=src)
        lpl = self.launch_per_layer
        if lpl is not None and not (_positive(lpl) or lpl == 0 and not isinstance(lpl, bool)):
            raise ConfigError("launch_per_layer", lpl, "a finite number of seconds >= 0, or null", source=src)
        cs = self.copy_slowdown
        if not (_positive(cs) and cs >= 1.0):
            raise ConfigError("copy_slowdown", cs, "a finite multiplier >= 1", source=src)
        if not isinstance(self.uva_gemm, (tuple, list)):
            raise ConfigError("uva_gemm", self.uva_gemm, "a list of [M, bytes, seconds] rows", source=src)
        for i, row in enumerate(self.uva_gemm):
            if not isinstance(row, (tuple, list)) or len(row) != 3 or not (
                    _int(row[0], 1) and _positive(row[1]) and _positive(row[2])):
                raise ConfigError(f"uva_gemm[{i}]", row, "[M >= 1 integer, bytes > 0, seconds > 0, finite]", source=src)

    # ---- files ----
    def save(self, path: str | Path) -> Path:
        d = asdict(self)
        d = {"schema": SCHEMA, **{k: (list(map(list, v)) if k in ("h2d", "layer_times", "uva_gemm") else v)
                                  for k, v in d.items()}}
        return atomic_write_json(path, d)

    @classmethod
    def load(cls, path: str | Path) -> "Profile":
        d = load_mapping(path)
        src = str(path)
        if "forward" in d and "h2d_bandwidth" in d:  # a probe file
            return cls.from_probe(path)
        if d.get("schema") != SCHEMA:
            raise ConfigError("schema", d.get("schema"), f"{SCHEMA!r}", source=src)
        for key in ("h2d", "layer_times"):
            if not isinstance(d.get(key), list):
                raise ConfigError(key, d.get(key), "a list of rows", source=src)
        for key in ("h2d", "layer_times"):
            for i, r in enumerate(d[key]):
                if not isinstance(r, list):
                    raise ConfigError(f"{key}[{i}]", r, "a row: a list of numbers", source=src)
        if not isinstance(d.get("meta") or {}, dict):
            raise ConfigError("meta", d.get("meta"), "a mapping (provenance), or absent", source=src)
        meta = dict(d.get("meta") or {}, source=src)
        return cls(h2d=tuple(tuple(r) for r in d["h2d"]),
                   layer_times=tuple(tuple(r) for r in d["layer_times"]),
                   model=d.get("model", ""), gpu=d.get("gpu", ""), layers=d.get("layers", 0),
                   launch_per_layer=d.get("launch_per_layer"),
                   copy_slowdown=d.get("copy_slowdown", 1.0), meta=meta,
                   uva_gemm=tuple(tuple(r) if isinstance(r, list) else r for r in d.get("uva_gemm") or ()))

    @classmethod
    def from_probe(cls, path: str | Path) -> "Profile":
        """Calibrate from a probe file's component measurements and ``resident`` rows only."""
        src = str(path)
        d = load_mapping(path)
        check_probe(d, src)
        layers = d["layers"]
        try:
            h2d = tuple((r["mb"] * MiB, r["h2d_pinned_GBps"] * 1e9) for r in d["h2d_bandwidth"])
            in_stack = {(r["B"], r["T"], r["C"]): r["ms"] / 1e3 / layers
                        for r in d["forward"] if r["policy"] == "resident"}
            isolated = {(r["B"], r["T"], r["C"]): r["ms"] / 1e3 for r in d["layer"]}
        except (KeyError, TypeError) as e:
            raise ConfigError("row", str(e), "probe rows with the fields data/README.md defines", source=src) from None
        ratios = [in_stack[k] / isolated[k] for k in in_stack if k in isolated]
        scale = statistics.median(ratios) if ratios else 1.0
        times = dict(in_stack)
        for k, v in isolated.items():
            times.setdefault(k, v * scale)
        return cls(h2d=h2d, layer_times=tuple((*k, v) for k, v in sorted(times.items())),
                   model=d.get("model", ""), gpu=d.get("gpu", ""), layers=layers,
                   meta={"source": src, "from": "probe", "torch": d.get("torch", "")})

    def to_json(self) -> str:
        return json.dumps(asdict(self))
