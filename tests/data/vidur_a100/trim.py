"""Re-derive this folder's trimmed Vidur CSVs from shared/data/profiles/ (see README.md).

    python tests/data/vidur_a100/trim.py ../shared/data/profiles
"""
import math
import sys
from pathlib import Path

import pandas as pd

src, out = Path(sys.argv[1]), Path(__file__).parent
d = pd.read_csv(src / "vidur_a100_llama-3-8b_mlp.csv")
toks = sorted(set(d.num_tokens))
keep = {min(toks, key=lambda t: abs(math.log(t / round(2 ** (i / 3))))) for i in range(46)}
cols = [c for c in d.columns if c.endswith(".median")] + ["n_head", "n_kv_head", "n_embd", "n_expanded_embd", "vocab_size",
                                                         "use_gated_mlp", "num_tokens", "num_tensor_parallel_workers"]
t = d[d.num_tokens.isin(keep)][cols].drop_duplicates(["num_tokens", "num_tensor_parallel_workers"])
t.sort_values(["num_tensor_parallel_workers", "num_tokens"]).to_csv(out / "vidur_a100_llama-3-8b_mlp.csv", index=False)
a = pd.read_csv(src / "vidur_a100_dgx_all_reduce.csv")
a = a[a.num_workers == a.devices_per_node]
sizes = sorted(set(a["size"]))
ks = {min(sizes, key=lambda s: abs(math.log(s / (2048 * 2 ** (i / 2))))) for i in range(60)}
a[a["size"].isin(ks)][["size", "num_workers", "devices_per_node", "time_stats.all_reduce.median"]].to_csv(
    out / "vidur_a100_dgx_all_reduce.csv", index=False)
