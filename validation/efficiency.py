"""How far a GPU's measured GEMM efficiencies carry to another GPU: the evidence behind
sim/costs.py BAND_TRANSFER_GPU.

A kernel profile (Vidur's operator CSVs, LLMServingSim's bundles: ``Profile.kernels``) times one
decoder layer's four GEMMs by token count. ``Calibrated`` on the profile's own GPU and model gives those
times back (``gemm_seconds``); its efficiency at ``t`` tokens is their sum over the datasheet roofline's.
Moving a profile to another GPU is ``Calibrated`` of that GPU with it, so the transfer's error at ``t``
is its GEMM time on the target over the target's measured, less one, for every ordered pair of measured
GPUs. ``python -m offloadlab.validation.efficiency [PROFILE ...]`` prints the table for the profiles
stored in validation/traces/profiles and Vidur's A100 (or the ones given: any ``Profile.load`` path).
"""
from __future__ import annotations

import itertools
import sys
from pathlib import Path

from ..profile import Profile

TOKENS = (1, 8, 32, 128, 512, 2048)


def _measured(profile: Profile, tokens) -> dict[int, float]:
    """The measured seconds of one layer's four GEMMs (tensor parallel 1) at each token count measured for all."""
    from ..profile import GEMM_OPS

    m = {(op, t): sec for op, t, tp, sec in profile.kernels if tp == 1}
    return {t: sum(m[op, t] for op in GEMM_OPS) for t in tokens if all((op, t) in m for op in GEMM_OPS)}


def _calibrated(profile: Profile, on: Profile):
    """``profile`` applied (Calibrated) to the GPU and model ``on`` measured."""
    from ..sim.costs import Calibrated, Roofline

    return Calibrated(Roofline(on.source_model(), on.source_gpu()), profile)


def gemm_efficiency(profile: Profile, tokens=TOKENS) -> dict[int, float]:
    """Measured / roofline time of one layer's GEMMs at each token count the profile measured them all at."""
    from ..sim.costs import Roofline

    rf = Roofline(profile.source_model(), profile.source_gpu())
    shapes = [shape for _, shape in rf.model.layer_param_shapes if len(shape) == 2]
    return {t: sec / sum(rf.gemm_time(s, t) for s in shapes) for t, sec in _measured(profile, tokens).items()}


def transfer_errors(profiles: dict[str, Profile], tokens=TOKENS) -> list[tuple[str, str, int, float]]:
    """(source, target, tokens, error) for every ordered pair of GPUs: the target's GEMM time predicted from
    the source's profile (Calibrated on the target), over the target's measured, less one."""
    measured = {name: _measured(p, tokens) for name, p in profiles.items()}
    out = []
    for a, b in itertools.permutations(profiles, 2):
        cal = _calibrated(profiles[a], profiles[b])
        out += [(a, b, t, cal.gemm_seconds(t) / sec - 1) for t, sec in measured[b].items() if t in measured[a]]
    return out


def stored_profiles() -> dict[str, Profile]:
    """The kernel profiles this project stores (one per GPU): LLMServingSim bundles under
    validation/traces/profiles/, and Vidur's A100 operators from the shared data when beside the checkout."""
    folder = Path(__file__).parent / "traces" / "profiles"
    out = {}
    for d in sorted(p for p in folder.iterdir() if (p / "meta.yaml").is_file()):
        prof = Profile.load(d)
        out.setdefault(prof.gpu, prof)
    vidur = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "profiles"
    if (vidur / "vidur_a100_llama-3-8b_mlp.csv").is_file():
        prof = Profile.load(vidur)
        out.setdefault(prof.gpu, prof)
    return out


def main(argv: list[str] | None = None) -> int:
    import numpy as np

    args = sys.argv[1:] if argv is None else argv
    profiles = {p.gpu: p for p in map(Profile.load, args)} if args else stored_profiles()
    print("measured / datasheet roofline, one layer's GEMMs, by tokens:", " ".join(f"{t:>6}" for t in TOKENS))
    for name, p in profiles.items():
        e = gemm_efficiency(p)
        print(f"  {name:<28}" + " ".join(f"{e[t]:6.2f}" if t in e else "     -" for t in TOKENS))
    errs = [abs(e) for *_, e in transfer_errors(profiles)]
    print(f"moved to another GPU: {len(errs)} (pair, tokens) errors, median {np.quantile(errs, 0.5):.1%}, "
          f"p90 {np.quantile(errs, 0.9):.1%}, max {max(errs):.1%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
