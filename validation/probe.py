"""Predict a probe file's forward rows from its own component measurements, or from another source.

Calibration uses only the bandwidth curve, the isolated layer times and the ``resident`` rows
(Profile.from_probe); every ``sync_prefix`` and ``async_k`` row is then predicted by the step
model (sim/step.py) with eager launches (the probe runs eager PyTorch, no CUDA graphs) and no LM
head (the probe's stack has none). With ``source`` (Profiles measured elsewhere: another GPU, model
or shape set) every row, resident ones included, is predicted from the source by efficiency
transfer (sim/costs.py), none of the target's own measurements used. ``leave_one_shape_out``
is the held-out check on one file: each (B, T, C) predicted from a calibration without it.

Beyond shared/data/README.md's fields a probe file may say what it measured, so that it transfers:
``hidden``, ``heads``, ``kv_heads``, ``head_dim``, ``intermediate``, ``vocab``, ``weight_bytes`` (a
model outside the catalog; the runtime's probe writes them) and ``host_link`` (e.g. "PCIe Gen5 x16";
default: the GPU's datasheet link). ``model`` and ``gpu`` identify the rest; an old file without
``model`` is identified by its shape fields or ``layer_bytes``.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..catalog import get_gpu, get_model, gpu_for_device
from ..errors import ConfigError, OffloadLabError
from ..fileio import load_mapping
from ..profile import PROBE_POLICIES as POLICIES, PROBE_ROW_FIELDS as ROW_FIELDS, Profile, check_probe, probe_placement
from ..sim import StepShape, cost_model, simulate_layers
from ..sim.costs import Corner
from ..specs import HardwareSpec, ModelSpec

if TYPE_CHECKING:  # the predictions are DataFrames; pandas is imported when one is made, not with the module
    import pandas as pd


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
        if model:
            m = get_model(model)
        else:  # the file's model: its name, else its shape fields (hidden, heads, ...), else its layer_bytes
            named = Profile.from_probe_data(d, src)
            try:
                m = get_model(named.model)
            except OffloadLabError:
                m = named.source_model()
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
        """The calibration (Profile.from_probe) from the contents already read, not the file again."""
        return Profile.from_probe_data(self.data, str(self.path))


def predict_probe(probe: ProbeFile | str | Path, source: Profile | tuple[Profile, ...] | None = None,
                  rows_of=None, **cost_kw) -> pd.DataFrame:
    """Every forward row with ``measured_ms``, ``predicted_ms`` and ``error`` (predicted/measured - 1).

    ``source``: calibrate from these Profiles instead of the file's own components (every row is then
    a prediction); ``()``: from the datasheet roofline alone. ``rows_of``: predict only rows whose (B, T, C) is in this set.
    """
    import pandas as pd

    if not isinstance(probe, ProbeFile):
        probe = ProbeFile.load(probe)
    profile = probe.profile() if source is None else (source or None)  # (): no source, the datasheet alone
    cost = cost_model(probe.model, probe.gpu, profile, **{"cuda_graphs": False, **cost_kw})
    rows = []
    for i, r in enumerate(probe.data["forward"]):
        if rows_of is not None and (r["B"], r["T"], r["C"]) not in rows_of:
            continue
        pl = probe_placement(probe.model, r["policy"], r["param"], r["nbuf"])
        if len(pl.offloaded_layers) != r["offloaded_layers"]:
            raise ConfigError(f"forward[{i}].offloaded_layers", r["offloaded_layers"],
                              f"{len(pl.offloaded_layers)} for {r['policy']} param={r['param']}", source=str(probe.path))
        shape = StepShape.uniform(r["B"], r["T"], r["C"])
        res = simulate_layers(pl, cost.layer(shape), 0.0, cost.transfer, cost.copy_slowdown)
        lo, hi = (simulate_layers(pl, c.layer(shape), 0.0, c.transfer, c.copy_slowdown).time
                  for c in (Corner(cost, 0), Corner(cost, 1)))
        rows.append({**{f: r[f] for f in ROW_FIELDS if f != "ms"}, "measured_ms": r["ms"],
                     "predicted_ms": res.time * 1e3, "predicted_lo_ms": lo * 1e3, "predicted_hi_ms": hi * 1e3,
                     "stall_ms": res.stall * 1e3, "copy_busy_ms": res.busy["copy"] * 1e3})
    df = pd.DataFrame(rows)
    df["error"] = df["predicted_ms"] / df["measured_ms"] - 1
    df["in_band"] = (df["predicted_lo_ms"] <= df["measured_ms"]) & (df["measured_ms"] <= df["predicted_hi_ms"])
    df["calibration"] = (df["policy"] == "resident") if source is None else False
    # eager resident decode: its time is the host's Python launch speed, not the GPU's
    df["eager_decode"] = (df["policy"] == "resident") & (df["T"] == 1)
    df.attrs["cost"] = cost
    return df


def leave_one_shape_out(probe: ProbeFile | str | Path, **cost_kw) -> pd.DataFrame:
    """Held out by shape: every row of each (B, T, C) predicted from a calibration that does not
    contain that shape (its ``resident`` and isolated ``layer`` rows removed), copies and launch kept."""
    if not isinstance(probe, ProbeFile):
        probe = ProbeFile.load(probe)
    d = probe.data
    shapes = sorted({(r["B"], r["T"], r["C"]) for r in d["forward"]})
    frames = []
    for sh in shapes:
        kept = {**d, "forward": [r for r in d["forward"] if (r["B"], r["T"], r["C"]) != sh or r["policy"] != "resident"],
                "layer": [r for r in d["layer"] if (r["B"], r["T"], r["C"]) != sh]}
        src = Profile.from_probe_data(kept, f"{probe.path} without B={sh[0]} T={sh[1]} C={sh[2]}")
        frames.append(predict_probe(probe, source=src, rows_of={sh}, **cost_kw))
    import pandas as pd

    return pd.concat(frames, ignore_index=True)


def error_summary(df: pd.DataFrame, exclude_eager_decode: bool = False) -> dict:
    """MAPE and worst row over the predicted (non-calibration) rows, overall and per policy;
    ``exclude_eager_decode`` leaves out resident T=1 rows (launch-bound: the host's speed)."""
    pred = df[~df["calibration"]]
    if exclude_eager_decode:
        pred = pred[~pred["eager_decode"]]
    err = pred["error"].abs()
    worst = pred.loc[err.idxmax()]
    return {
        "rows": int(len(pred)),
        "coverage": float(pred["in_band"].mean()) if "in_band" in pred else float("nan"),
        "band_halfwidth": float(((pred["predicted_hi_ms"] - pred["predicted_lo_ms"]) / 2 / pred["predicted_ms"]).mean())
        if "predicted_hi_ms" in pred else float("nan"),
        "mape": float(err.mean()),
        "max_abs_error": float(err.max()),
        "worst": {k: (v.item() if hasattr(v, "item") else v) for k, v in worst.items()},
        "by_policy": {p: float(g["error"].abs().mean()) for p, g in pred.groupby("policy")},
    }
