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
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import ConfigError
from .fileio import atomic_write_json, load_mapping

SCHEMA = "offloadlab.profile/1"
MiB = 1024**2


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
        if not self.h2d:
            raise ConfigError("h2d", self.h2d, "at least one [bytes, bytes_per_s] row", source=src)
        for i, row in enumerate(self.h2d):
            if len(row) != 2 or not all(isinstance(x, (int, float)) and x > 0 for x in row):
                raise ConfigError(f"h2d[{i}]", row, "[bytes > 0, bytes_per_s > 0]", source=src)
        for i, row in enumerate(self.layer_times):
            if len(row) != 4 or not all(isinstance(x, (int, float)) for x in row) \
                    or row[0] < 1 or row[1] < 1 or row[2] < 0 or row[3] <= 0:
                raise ConfigError(f"layer_times[{i}]", row, "[B >= 1, T >= 1, C >= 0, seconds > 0]", source=src)
        if self.launch_per_layer is not None and not self.launch_per_layer >= 0:
            raise ConfigError("launch_per_layer", self.launch_per_layer, "seconds >= 0 or null", source=src)
        if not self.copy_slowdown >= 1.0:
            raise ConfigError("copy_slowdown", self.copy_slowdown, "a multiplier >= 1", source=src)
        for i, row in enumerate(self.uva_gemm):
            if len(row) != 3 or not all(isinstance(x, (int, float)) and x > 0 for x in row):
                raise ConfigError(f"uva_gemm[{i}]", row, "[M >= 1, bytes > 0, seconds > 0]", source=src)

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
        meta = dict(d.get("meta") or {}, source=src)
        try:
            return cls(h2d=tuple(tuple(r) for r in d["h2d"]),
                       layer_times=tuple(tuple(r) for r in d["layer_times"]),
                       model=d.get("model", ""), gpu=d.get("gpu", ""), layers=int(d.get("layers", 0)),
                       launch_per_layer=d.get("launch_per_layer"),
                       copy_slowdown=float(d.get("copy_slowdown", 1.0)), meta=meta,
                       uva_gemm=tuple(tuple(r) for r in d.get("uva_gemm") or ()))
        except TypeError as e:
            raise ConfigError("file", src, f"rows of numbers ({e})") from None

    @classmethod
    def from_probe(cls, path: str | Path) -> "Profile":
        """Calibrate from a probe file's component measurements and ``resident`` rows only."""
        src = str(path)
        d = load_mapping(path)
        for key in ("h2d_bandwidth", "layers", "layer", "forward"):
            if key not in d:
                raise ConfigError(key, None, "present in a probe file", source=src)
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
