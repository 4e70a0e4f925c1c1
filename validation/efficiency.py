"""How far a GPU's measured GEMM efficiencies carry to another GPU: the evidence behind
sim/costs.py BAND_TRANSFER_GPU.

A kernel profile (Vidur's operator CSVs, LLMServingSim's bundles: ``Profile.kernels``) times one
decoder layer's four GEMMs by token count. Its efficiency at ``t`` tokens is the measured time of the
four over the datasheet roofline's (``Roofline.gemm_time`` on the profile's own GPU and model). Moving
a profile to another GPU (``Calibrated``) predicts the target's time as the target's roofline times the
source's efficiency, so the transfer's error at ``t`` is eff(target) / eff(source) - 1, for every
ordered pair of measured GPUs. ``python -m offloadlab.validation.efficiency [PROFILE ...]`` prints the
table for the profiles stored in validation/traces/profiles and Vidur's A100 (or the ones given).
"""
from __future__ import annotations

import itertools
import math
import sys
from pathlib import Path

from ..profile import Profile

TOKENS = (1, 8, 32, 128, 512, 2048)


def gemm_efficiency(profile: Profile, tokens=TOKENS) -> dict[int, float]:
    """Measured / roofline time of one layer's GEMMs (tensor parallel 1) at each token count the
    profile measured every GEMM at."""
    from ..sim.costs import Roofline

    model = profile.source_model()
    rf = Roofline(model, profile.source_gpu())
    shapes = {name.split(".")[-2]: shape for name, shape in model.layer_param_shapes if len(shape) == 2}
    measured = {(op, t): sec for op, t, tp, sec in profile.kernels if tp == 1}
    out = {}
    for t in tokens:
        if all((op, t) in measured for op in shapes):
            out[t] = sum(measured[op, t] for op in shapes) / sum(rf.gemm_time(s, t) for s in shapes.values())
    return out


def transfer_errors(profiles: dict[str, Profile], tokens=TOKENS) -> list[tuple[str, str, int, float]]:
    """(source, target, tokens, error) for every ordered pair of GPUs: the target's GEMM time predicted
    from the source's efficiency, over the target's measured, less one."""
    eff = {name: gemm_efficiency(p, tokens) for name, p in profiles.items()}
    return [(a, b, t, eff[b][t] / eff[a][t] - 1) for a, b in itertools.permutations(profiles, 2)
            for t in tokens if t in eff[a] and t in eff[b]]


def quantile(values: list[float], q: float) -> float:
    """The q-quantile of ``values`` (linear between order statistics, as numpy's default)."""
    v = sorted(values)
    x = q * (len(v) - 1)
    lo = math.floor(x)
    return v[lo] + (v[min(lo + 1, len(v) - 1)] - v[lo]) * (x - lo)


def stored_profiles() -> dict[str, Profile]:
    """The kernel profiles this project stores (one per GPU): LLMServingSim bundles under
    validation/traces/profiles/, and Vidur's A100 operators from the shared data when beside the checkout."""
    folder = Path(__file__).parent / "traces" / "profiles"
    out = {}
    for d in sorted(p for p in folder.iterdir() if (p / "meta.yaml").is_file()):
        prof = Profile.from_llmservingsim(d)
        out.setdefault(prof.gpu, prof)
    vidur = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "profiles"
    if (vidur / "vidur_a100_llama-3-8b_mlp.csv").is_file():
        prof = Profile.from_vidur(vidur)
        out.setdefault(prof.gpu, prof)
    return out


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    profiles = {p.gpu: p for p in map(_load, args)} if args else stored_profiles()
    eff = {name: gemm_efficiency(p) for name, p in profiles.items()}
    print("measured / datasheet roofline, one layer's GEMMs, by tokens:", " ".join(f"{t:>6}" for t in TOKENS))
    for name, e in eff.items():
        print(f"  {name:<28}" + " ".join(f"{e[t]:6.2f}" if t in e else "     -" for t in TOKENS))
    errs = [abs(e) for *_, e in transfer_errors(profiles)]
    print(f"moved to another GPU: {len(errs)} (pair, tokens) errors, median {quantile(errs, 0.5):.1%}, "
          f"p90 {quantile(errs, 0.9):.1%}, max {max(errs):.1%}")
    return 0


def _load(path: str) -> Profile:
    p = Path(path)
    if (p / "meta.yaml").is_file():
        return Profile.from_llmservingsim(p)
    if p.is_dir():
        return Profile.from_vidur(p)
    return Profile.load(p)


if __name__ == "__main__":
    raise SystemExit(main())
