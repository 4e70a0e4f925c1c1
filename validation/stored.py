"""The stored measurements of validation/traces/ and their recorded tolerances."""
from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import yaml

from ..errors import ConfigError


@dataclass(frozen=True)
class StoredMeasurement:
    path: Path
    kind: str
    gpu: str
    tolerance: dict
    provenance: dict
    replay: dict  # what the replay is told beside the run's own files (e.g. gpu: a run without hardware facts)

    @property
    def band_misses(self) -> tuple[str, ...]:
        """Summary figures the entry says its band does not hold (index.yaml ``band_misses``, with its reason)."""
        return tuple(self.provenance.get("band_misses") or ())


def stored_measurements() -> list[StoredMeasurement]:
    folder = Path(str(resources.files(__package__).joinpath("traces")))
    index = folder / "index.yaml"
    entries = yaml.safe_load(index.read_text()) or []
    out = []
    for i, e in enumerate(entries):
        for key in ("file", "kind", "gpu", "tolerance"):
            if key not in e:
                raise ConfigError(f"[{i}].{key}", None, "present", source=str(index))
        tol = e["tolerance"]
        if e["kind"] == "serving":  # a run directory: the largest error allowed per summary figure
            if not isinstance(tol, dict) or not tol or not all(isinstance(v, (int, float)) for v in tol.values()):
                raise ConfigError(f"[{i}].tolerance", tol, "{summary figure: largest |error|, ...}", source=str(index))
        elif not isinstance(tol, dict) or not {"mape", "max_abs_error"} <= set(tol):
            raise ConfigError(f"[{i}].tolerance", tol, "{mape: x, max_abs_error: y}", source=str(index))
        replay = e.get("replay") or {}
        if not isinstance(replay, dict) or not set(replay) <= {"gpu", "model", "profile", "prefix_cache_warm"}:
            raise ConfigError(f"[{i}].replay", replay, "{gpu: NAME, model: NAME, profile: PATH, prefix_cache_warm: "
                              "BOOL} (any of them)", source=str(index))
        prov = {k: v for k, v in e.items() if k not in ("file", "kind", "gpu", "tolerance", "replay")}
        out.append(StoredMeasurement(folder / e["file"], e["kind"], e["gpu"], tol, prov, replay))
    return out
