"""Predict a probe file's forward rows from its own component measurements.

Calibration uses only the bandwidth curve, the isolated layer times and the ``resident`` rows
(Profile.from_probe); every ``sync_prefix`` and ``async_k`` row is then predicted by the step
model (sim/step.py) with eager launches (the probe runs eager PyTorch, no CUDA graphs) and no LM
head (the probe's stack has none).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from ..catalog import get_gpu, get_model, gpu_for_device
from ..errors import ConfigError
from ..fileio import load_mapping
from ..policy import NoOffload, copy_prefix, interval
from ..profile import PROBE_POLICIES as POLICIES, PROBE_ROW_FIELDS as ROW_FIELDS, Profile, check_probe
from ..sim import StepShape, cost_model, simulate_layers
from ..specs import HardwareSpec, ModelSpec


@dataclass(frozen=True)
class ProbeFile:
    path: Path
    data: dict
    model: ModelSpec
    gpu: HardwareSpec

    @classmethod
    def load(cls, path: str | Path, gpu: str | None = None, model: str | None = None) -> "ProbeFile":
        """Read and check a probe file; ``gpu``/``model`` override the names it records."""
        src = str(path)
        d = load_mapping(path)
        check_probe(d, src)
        if "layer_bytes" not in d:
            raise ConfigError("layer_bytes", None, "present in a probe file (see shared/data/README.md)", source=src)
        if all(r["policy"] == "resident" for r in d["forward"]):
            raise ConfigError("forward", f"{len(d['forward'])} resident rows",
                              "at least one sync_prefix or async_k row to predict", source=src)
        m = get_model(model or d["model"])
        if not isinstance(d["layers"], int) or not 1 <= d["layers"] <= m.layers:
            raise ConfigError("layers", d["layers"], f"an integer in [1, {m.layers}] for {m.name}", source=src)
        m = m.replace(layers=d["layers"])  # a probe may measure a truncated stack
        if d["layer_bytes"] != m.layer_bytes:
            raise ConfigError("layer_bytes", d["layer_bytes"], f"{m.layer_bytes} for {m.name}", source=src)
        if not gpu and not isinstance(d.get("gpu", ""), str):
            raise ConfigError("gpu", d["gpu"], "the device name torch reports, e.g. 'NVIDIA H100 80GB HBM3'",
                              source=src)
        hw = get_gpu(gpu) if gpu else gpu_for_device(d.get("gpu", ""))
        return cls(Path(path), d, m, hw)

    def profile(self) -> Profile:
        return Profile.from_probe(self.path)


def placement_of(row: dict, model: ModelSpec):
    if row["policy"] == "resident":
        return NoOffload().place(model)
    if row["policy"] == "sync_prefix":
        return copy_prefix(model, row["param"])
    return interval(row["param"], row["nbuf"]).place(model)


def predict_probe(probe: ProbeFile | str | Path, **cost_kw) -> pd.DataFrame:
    """Every forward row with ``measured_ms``, ``predicted_ms`` and ``error`` (predicted/measured - 1)."""
    if not isinstance(probe, ProbeFile):
        probe = ProbeFile.load(probe)
    cost = cost_model(probe.model, probe.gpu, probe.profile(), **{"cuda_graphs": False, **cost_kw})
    rows = []
    for i, r in enumerate(probe.data["forward"]):
        pl = placement_of(r, probe.model)
        if len(pl.offloaded_layers) != r["offloaded_layers"]:
            raise ConfigError(f"forward[{i}].offloaded_layers", r["offloaded_layers"],
                              f"{len(pl.offloaded_layers)} for {r['policy']} param={r['param']}", source=str(probe.path))
        res = simulate_layers(pl, cost.layer(StepShape.uniform(r["B"], r["T"], r["C"])), 0.0, cost.transfer,
                              cost.copy_slowdown)
        rows.append({**{f: r[f] for f in ROW_FIELDS if f != "ms"}, "measured_ms": r["ms"],
                     "predicted_ms": res.time * 1e3, "stall_ms": res.stall * 1e3,
                     "copy_busy_ms": res.busy["copy"] * 1e3})
    df = pd.DataFrame(rows)
    df["error"] = df["predicted_ms"] / df["measured_ms"] - 1
    df["calibration"] = df["policy"] == "resident"
    return df


def error_summary(df: pd.DataFrame) -> dict:
    """MAPE and worst row over the predicted (non-calibration) rows, overall and per policy."""
    pred = df[~df["calibration"]]
    err = pred["error"].abs()
    worst = pred.loc[err.idxmax()]
    return {
        "rows": int(len(pred)),
        "mape": float(err.mean()),
        "max_abs_error": float(err.max()),
        "worst": {k: (v.item() if hasattr(v, "item") else v) for k, v in worst.items()},
        "by_policy": {p: float(g["error"].abs().mean()) for p, g in pred.groupby("policy")},
    }
