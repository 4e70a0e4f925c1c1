"""Bad input, table-driven: every command and file format ends with exit 2, one line on stderr naming the
field, the value and what was expected, no traceback, and no new file (issue 16's reliability targets).

Each case runs ``offloadlab.apps.cli.main`` in-process in an empty directory holding only the files the case
writes; the directory must hold exactly those afterwards. Serving-run directories: here, the requests.jsonl
rows both readers share (``run --workload DIR`` and ``validate DIR`` give the same line); the rest of issue 12's
cases in test_serving_run.py.
"""
from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest

from offloadlab.apps.cli import main

ROOT = Path(__file__).resolve().parents[1]
PROBE = json.loads((ROOT / "validation" / "traces" / "h100_llama8b_probe.json").read_text())
LATIN1 = "models:\n  caf\xe9-7b: {base: llama-3.1-8b}\n".encode("latin-1")
BINARY = bytes(range(256)) * 4
GOOD_WL = "prompt_len,output_len\n100,10\n"
SERVING_ROW = ('{"request_id": "a", "input_toks": 5, "output_toks": 2, "queued_ts": 1.0, "first_token_ts": 2.0, '
               '"last_token_ts": 3.0}')


def probe(edit=None, text=None) -> str:
    """The stored H100 probe as JSON text, after ``edit(d)`` changed it; NaN/Infinity written as JSON does."""
    d = copy.deepcopy(PROBE)
    if edit:
        edit(d)
    return json.dumps(d)


def _set(path: str, value):
    """edit: set d[a][i][b] = value for path 'a.i.b' (or delete it when value is DEL)."""
    def edit(d):
        *head, last = [int(k) if k.isdigit() else k for k in path.split(".")]
        for k in head:
            d = d[k]
        if value is DEL:
            del d[last]
        else:
            d[last] = value
    return edit


DEL = object()


def profile_text(**changes) -> str:
    d = {"schema": "offloadlab.profile/1", "model": "llama-3.1-8b", "gpu": "H100-SXM5-80GB", "layers": 32,
         "h2d": [[1048576, 3.0e10], [268435456, 5.2e10]], "layer_times": [[1, 2048, 0, 0.0017], [1, 1, 2048, 0.0004]],
         "launch_per_layer": None, "copy_slowdown": 1.0}
    d.update(changes)
    for k in [k for k, v in d.items() if v is DEL]:
        del d[k]
    return json.dumps(d)


MODEL_YAML = "{layers: 2, hidden: 64, heads: 4, kv_heads: 2, head_dim: 16, intermediate: 128, vocab: 1000}"
GPU_YAML = "{memory_bytes: 8.6e10, hbm_bw: 3.35e12, peak_flops: 9.89e14, host_link_bw: 6.4e10}"


def cat_model(fields: str) -> str:
    return f"models:\n  tiny: {fields}\n"


def cat_gpu(fields: str) -> str:
    return f"gpus:\n  g: {fields}\n"


def _gpu(**kw) -> str:
    base = dict(memory_bytes=8.6e10, hbm_bw=3.35e12, peak_flops=9.89e14, host_link_bw=6.4e10)
    base.update(kw)
    return cat_gpu("{" + ", ".join(f"{k}: {v}" for k, v in base.items()) + "}")


def _model(**kw) -> str:
    base = dict(layers=2, hidden=64, heads=4, kv_heads=2, head_dim=16, intermediate=128, vocab=1000)
    base.update(kw)
    return cat_model("{" + ", ".join(f"{k}: {v}" for k, v in base.items()) + "}")


R = ["run", "--requests", "4"]  # a run that would be quick if it started

# (id, argv, files {name: text or bytes}, what the one line must contain)
CASES = [
    # ---- 1. output paths: checked before any simulation --------------------------------------
    ("run-json-dir", R + ["--json", "d"], {"d/keep": ""}, "--json='d': expected a file path, not a directory"),
    ("run-json-empty", R + ["--json", ""], {}, "--json='': expected a file path"),
    ("run-json-blank", R + ["--json", "  "], {}, "--json='  ': expected a file path"),
    ("run-json-under-file", R + ["--json", "f/r.json"], {"f": "x"}, "--json='f/r.json': expected a path under a directory"),
    ("run-csv-dir", R + ["--requests-csv", "d"], {"d/keep": ""}, "--requests-csv='d'"),
    ("run-trace-dir", R + ["--trace", "d"], {"d/keep": ""}, "--trace='d'"),
    ("run-trace-empty", R + ["--trace", ""], {}, "--trace=''"),
    ("run-same-path-twice", R + ["--json", "a.json", "--trace", "a.json"], {}, "no other output uses"),
    ("run-json-deep-under-file", R + ["--json", "f/x/y/r.json"], {"f": "x"}, "f is a file"),
    ("paper-out-file", ["paper", "--out", "f", "--requests", "4", "--quiet"], {"f": "x"}, "--out='f': expected a directory"),
    ("paper-out-empty", ["paper", "--out", "", "--requests", "4", "--quiet"], {}, "--out='': expected a directory path"),
    ("paper-png-dir", ["paper", "--out", "o", "--requests", "4", "--quiet"], {"o/paper.png/keep": ""},
     "--out='o/paper.png': expected a file path, not a directory"),
    ("paper-csv-dir", ["paper", "--out", "o", "--requests", "4", "--quiet"], {"o/paper_results.csv/keep": ""},
     "paper_results.csv"),
    ("paper-out-under-file", ["paper", "--out", "f/o", "--requests", "4", "--quiet"], {"f": "x"}, "f is a file"),
    ("compare-csv-dir", ["compare", "--requests", "4", "--csv", "d"], {"d/keep": ""}, "--csv='d'"),
    ("compare-csv-empty", ["compare", "--requests", "4", "--csv", ""], {}, "--csv=''"),
    ("optimize-csv-dir", ["optimize", "--requests", "4", "--csv", "d", "--quiet"], {"d/keep": ""}, "--csv='d'"),
    ("optimize-cache-file", ["optimize", "--requests", "4", "--cache-dir", "f", "--quiet"], {"f": "x"},
     "--cache-dir='f': expected a directory"),
    ("optimize-cache-empty", ["optimize", "--requests", "4", "--cache-dir", "", "--quiet"], {}, "--cache-dir=''"),
    ("study-csv-dir", ["study", "--csv", "d"], {"d/keep": ""}, "--csv='d'"),
    ("study-cache-file", ["study", "--simulate", "--cache-dir", "f", "--quiet"], {"f": "x"}, "--cache-dir='f'"),
    ("step-trace-dir", ["step", "--trace", "d"], {"d/keep": ""}, "--trace='d'"),
    ("step-trace-empty", ["step", "--trace", ""], {}, "--trace=''"),
    ("validate-json-dir", ["validate", "--json", "d"], {"d/keep": ""}, "--json='d'"),
    ("validate-plot-dir", ["validate", "--plot", "d"], {"d/keep": ""}, "--plot='d'"),
    ("validate-plot-empty", ["validate", "--plot", ""], {}, "--plot=''"),
    ("validate-json-plot-same", ["validate", "--json", "x", "--plot", "x"], {}, "no other output uses"),
    # ---- 4. numbers on the command line ---------------------------------------------------------
    ("requests-1e30", ["run", "--requests", "1e30"], {}, "--requests='1e30': expected an integer"),
    ("requests-1e8-float", ["run", "--requests", "1e8"], {}, "--requests='1e8': expected an integer"),
    ("requests-huge", ["run", "--requests", "100000000000000000000"], {}, "GB estimated"),
    ("requests-1e8", ["run", "--requests", "100000000"], {}, "fits in memory"),
    ("requests-1.5", ["run", "--requests", "1.5"], {}, "--requests='1.5'"),
    ("requests-abc", ["run", "--requests", "abc"], {}, "--requests='abc'"),
    ("requests-0", ["run", "--requests", "0"], {}, "n=0: expected an integer >= 1"),
    ("requests-neg", ["run", "--requests", "-3"], {}, "n=-3"),
    ("requests-missing-value", ["run", "--requests"], {}, "--requests=None: expected a value"),
    ("compare-requests-huge", ["compare", "--requests", "100000000000"], {}, "fits in memory"),
    ("optimize-requests-huge", ["optimize", "--requests", "100000000000", "--quiet"], {}, "fits in memory"),
    ("paper-requests-huge", ["paper", "--requests", "100000000000", "--quiet"], {}, "fits in memory"),
    ("paper-requests-0", ["paper", "--requests", "0", "--quiet"], {}, "n=0"),
    ("study-requests-huge", ["study", "--simulate", "--requests", "100000000000", "--quiet"], {}, "fits in memory"),
    ("paper-requests-abc", ["paper", "--requests", "x"], {}, "--requests='x'"),
    ("seed-neg", R + ["--seed", "-1"], {}, "seed=-1"),
    ("seed-float", R + ["--seed", "0.5"], {}, "--seed='0.5'"),
    ("rate-neg", R + ["--rate", "-1"], {}, "rate=-1.0"),
    ("rate-zero", R + ["--rate", "0"], {}, "rate=0.0"),
    ("rate-nan", R + ["--rate", "nan"], {}, "rate=nan"),
    # --rate inf is valid: all requests at once, as vLLM's benchmark reads it (issue 17)
    ("gmu-nan", R + ["--gpu-memory-utilization", "nan"], {}, "gpu_memory_utilization=nan"),
    ("gmu-big", R + ["--gpu-memory-utilization", "1.5"], {}, "gpu_memory_utilization=1.5"),
    ("gmu-zero", R + ["--gpu-memory-utilization", "0"], {}, "gpu_memory_utilization=0.0"),
    ("gmu-abc", R + ["--gpu-memory-utilization", "abc"], {}, "--gpu-memory-utilization='abc': expected a number"),
    ("max-num-seqs-0", R + ["--max-num-seqs", "0"], {}, "max_num_seqs=0"),
    ("max-batched-0", R + ["--max-num-batched-tokens", "0"], {}, "max_num_batched_tokens=0"),
    ("max-model-len-0", R + ["--max-model-len", "0"], {}, "max_model_len=0"),
    ("tp-0", R + ["-tp", "0"], {}, "tensor_parallel=0"),
    ("tp-3", R + ["-tp", "3"], {}, "tensor_parallel=3"),
    ("pp-0", R + ["-pp", "0"], {}, "pipeline_parallel=0"),
    ("pp-too-many", R + ["--model", "llama-3.2-1b", "-pp", "17"], {}, "pipeline_parallel=17"),
    ("mode-bad", R + ["--mode", "decode"], {}, "--mode='decode': expected one of"),
    ("kv-dtype-bad", R + ["--kv-cache-dtype", "int4"], {}, "--kv-cache-dtype='int4': expected one of"),
    ("unknown-option", R + ["--bogus", "1"], {}, "option='--bogus 1'"),
    ("no-command", [], {}, "cmd=None"),
    ("unknown-command", ["fly"], {}, "cmd='fly': expected one of"),
    ("unknown-model", R + ["--model", "llama-9"], {}, "unknown model 'llama-9'; known:"),
    ("unknown-gpu", R + ["--gpu", "H900"], {}, "unknown GPU 'H900'; known:"),
    ("policy-k0", R + ["--policy", "interval:0"], {}, "k (group size)=0"),
    ("policy-buf0", R + ["--policy", "interval:2,0"], {}, "staging buffers=0"),
    ("policy-unknown", R + ["--policy", "warp:3"], {}, "policy='warp:3'"),
    ("policy-empty", R + ["--policy", ""], {}, "policy=''"),
    ("policy-k-abc", R + ["--policy", "interval:x"], {}, "policy='interval:x'"),
    ("policy-vllm-neg", R + ["--policy", "vllm:-1"], {}, "cpu_offload_gb=-1.0"),
    ("policy-vllm-nan", R + ["--policy", "vllm:nan"], {}, "nan"),
    ("policy-uva-inf", R + ["--policy", "uva:inf"], {}, "inf"),
    ("policy-vllm-too-much", R + ["--policy", "vllm:100"], {}, "cpu_offload_gb=100.0"),
    ("policy-prefetch-n-gt-g", R + ["--policy", "prefetch:2,3,1"], {}, "=3"),
    ("does-not-fit", R + ["--model", "llama-3.1-70b", "--policy", "none"], {}, "does not fit"),
    ("memory-does-not-fit", ["memory", "--model", "llama-3.1-405b", "--gpu", "a100", "--policy", "interval:2"], {},
     "does not fit"),
    ("memory-gmu-nan", ["memory", "--gpu-memory-utilization", "nan"], {}, "gpu_memory_utilization=nan"),
    ("step-batch-0", ["step", "--batch", "0"], {}, "=0"),
    ("step-new-tokens-0", ["step", "--new-tokens", "0"], {}, "=0"),
    ("step-context-neg", ["step", "--context", "-1"], {}, "=-1"),
    ("step-beyond-window", ["step", "--new-tokens", "100000000"], {}, "context+new_tokens=100000000: expected at most 131072"),
    ("step-context-beyond-window", ["step", "--context", "131072", "--new-tokens", "1"], {}, "context+new_tokens=131073"),
    ("step-tp-16", ["step", "--gpu", "h100", "-tp", "16"], {}, "tensor_parallel=16"),
    ("optimize-objective", ["optimize", "--requests", "4", "--objective", "speed", "--quiet"], {}, "speed"),
    ("optimize-mechanism", ["optimize", "--requests", "4", "--mechanisms", "warp", "--quiet"], {}, "warp"),
    ("optimize-ttft-nan", ["optimize", "--requests", "4", "--max-ttft-p99", "nan", "--quiet"], {}, "nan"),
    ("optimize-tpot-neg", ["optimize", "--requests", "4", "--max-tpot-p99", "-1", "--quiet"], {}, "-1"),
    ("optimize-min-kv-neg", ["optimize", "--requests", "4", "--min-kv-tokens", "-5", "--quiet"], {}, "-5"),
    ("optimize-jobs-0", ["optimize", "--requests", "4", "--jobs", "0", "--quiet"], {}, "executor=0"),
    ("study-gpus-0", ["study", "--gpus", "0"], {}, "--gpus='0': expected comma-separated integers >= 1"),
    ("study-gpus-neg", ["study", "--gpus", "1,-2"], {}, "--gpus='1,-2'"),
    ("study-gpus-abc", ["study", "--gpus", "a,b"], {}, "--gpus='a,b'"),
    ("study-gpus-empty", ["study", "--gpus", ""], {}, "--gpus=''"),
    ("study-ks-0", ["study", "--ks", "0,2"], {}, "--ks='0,2'"),
    ("study-model-unknown", ["study", "--model", "nope"], {}, "unknown model 'nope'"),
    ("study-gpu-unknown", ["study", "--gpu", "nope"], {}, "unknown GPU 'nope'"),
    ("study-jobs-0", ["study", "--simulate", "--jobs", "0", "--quiet", "--model", "llama-3.1-8b", "--gpu", "h100",
                      "--gpus", "1"], {}, "executor=0"),
    ("list-catalog-missing", ["list", "--catalog", "none.yaml"], {}, "path='none.yaml'"),
    # ---- 5. vLLM command lines --------------------------------------------------------------------
    ("vllm-unclosed-quote", R + ["--vllm", "--cpu-offload-gb '4"], {}, "a shell-quoted command line (No closing quotation)"),
    ("vllm-misspelled-gb", R + ["--vllm", "--cpu-offlod-gb 8"], {}, "did you mean --cpu-offload-gb"),
    ("vllm-misspelled-backend", R + ["--vllm", "--offload-backnd prefetch"], {}, "did you mean --offload-backend"),
    ("vllm-misspelled-group", R + ["--vllm", "--offload-group-sise 4"], {}, "did you mean --offload-group-size"),
    ("vllm-misspelled-seqs", R + ["--vllm", "--max-num-seq 8"], {}, "did you mean --max-num-seqs"),
    ("vllm-abbreviated", R + ["--vllm", "--max-model 4096"], {}, "did you mean --max-model-len"),
    ("vllm-misspelled-gmu", R + ["--vllm", "--gpu-memory-utilisation 0.8"], {}, "did you mean --gpu-memory-utilization"),
    ("vllm-unknown-offload", R + ["--vllm", "--offload-ratio 0.5"], {}, "--vllm='--offload-ratio': expected a vLLM flag"),
    ("vllm-misspelled-equals", R + ["--vllm=--cpu-offload-gib=8"], {}, "did you mean --cpu-offload-gb"),
    ("vllm-with-policy", R + ["--vllm", "--cpu-offload-gb 4", "--policy", "interval:4"], {},
     "--policy='interval:4': expected no --policy together with --vllm"),
    ("vllm-empty-with-policy", R + ["--vllm", "", "--policy", "none"], {}, "--policy='none'"),
    ("step-vllm-with-policy", ["step", "--vllm", "--cpu-offload-gb 4", "--policy", "none"], {}, "--policy='none'"),
    ("memory-vllm-with-policy", ["memory", "--vllm", "--cpu-offload-gb 4", "--policy", "none"], {}, "--policy='none'"),
    ("vllm-gmu-nan", R + ["--vllm", "--gpu-memory-utilization nan"], {},
     "--vllm --gpu-memory-utilization='nan': expected a finite number"),
    ("vllm-gmu-inf", R + ["--vllm", "--gpu-memory-utilization inf"], {}, "--gpu-memory-utilization='inf'"),
    ("vllm-gmu-big", R + ["--vllm", "--gpu-memory-utilization 2"], {}, "gpu_memory_utilization=2.0"),
    ("vllm-gb-neg", R + ["--vllm", "--cpu-offload-gb -1"], {}, "--cpu-offload-gb=-1.0: expected >= 0"),
    ("vllm-gb-nan", R + ["--vllm", "--cpu-offload-gb nan"], {}, "--cpu-offload-gb='nan'"),
    ("vllm-gb-abc", R + ["--vllm", "--cpu-offload-gb lots"], {}, "--cpu-offload-gb='lots'"),
    ("vllm-gb-missing", R + ["--vllm", "--offload-backend uva --cpu-offload-gb"], {}, "--vllm --cpu-offload-gb=None"),
    ("vllm-backend-magic", R + ["--vllm", "--offload-backend magic"], {}, "--vllm --offload-backend='magic'"),
    ("vllm-prefetch-no-group", R + ["--vllm", "--offload-backend prefetch"], {}, "--offload-group-size=0"),
    ("vllm-n-gt-g", R + ["--vllm", "--offload-group-size 2 --offload-num-in-group 3"], {}, "--offload-num-in-group=3"),
    ("vllm-step-0", R + ["--vllm", "--offload-group-size 4 --offload-prefetch-step 0"], {}, "--offload-prefetch-step=0"),
    ("vllm-tp-four", R + ["--vllm", "-tp four"], {}, "--vllm --tensor-parallel-size='four': expected an integer"),
    ("vllm-kv-dtype", R + ["--vllm", "--kv-cache-dtype int4"], {}, "--vllm --kv-cache-dtype='int4'"),
    ("vllm-tp-conflict", R + ["--model", "llama-3.1-70b", "--gpu", "h100", "-tp", "4", "--vllm", "-tp 2"], {},
     "--tensor-parallel-size=4: expected what the --vllm command line says (2)"),
    ("compare-vllm-conflict", ["compare", "--requests", "4", "--vllm", "-tp 2", "--vllm", "-tp 4"], {},
     "the same in every --vllm line"),
    ("compare-vllm-misspelled", ["compare", "--requests", "4", "--vllm", "--cpu-offlod-gb 8"], {}, "did you mean"),
    ("compare-vllm-quote", ["compare", "--requests", "4", "--vllm", '"--cpu-offload-gb 8'], {}, "No closing quotation"),
    # ---- 3./D. workload files ---------------------------------------------------------------------
    ("wl-binary-csv", R + ["--workload", "w.csv"], {"w.csv": BINARY}, "w.csv'"),
    ("wl-latin1-csv", R + ["--workload", "w.csv"], {"w.csv": "prompt_len,output_len,note\n5,5,caf\xe9\n".encode("latin-1")},
     "expected UTF-8 text (byte 0xe9"),
    ("wl-binary-jsonl", R + ["--workload", "w.jsonl"], {"w.jsonl": b"\xff\xfe\x00\x01"}, "UTF-8"),
    ("wl-nul-csv", R + ["--workload", "w.csv"], {"w.csv": "prompt_len,output_len\n5\x00,5\n"}, "w.csv"),
    ("wl-missing", R + ["--workload", "nope.csv"], {}, "path='nope.csv'"),
    ("wl-dir", R + ["--workload", "d.csv"], {"d.csv/keep": ""}, "d.csv"),
    ("wl-empty", R + ["--workload", "w.csv"], {"w.csv": ""}, "at least one request"),
    ("wl-header-only", R + ["--workload", "w.csv"], {"w.csv": "prompt_len,output_len\n"}, "at least one request"),
    ("wl-no-prompt", R + ["--workload", "w.csv"], {"w.csv": "output_len\n5\n"}, "prompt_len=None"),
    ("wl-no-output", R + ["--workload", "w.csv"], {"w.csv": "prompt_len\n5\n"}, "output_len=None"),
    ("wl-prompt-abc", R + ["--workload", "w.csv"], {"w.csv": "prompt_len,output_len\nabc,5\n"}, "prompt_len='abc'"),
    ("wl-prompt-float", R + ["--workload", "w.csv"], {"w.csv": "prompt_len,output_len\n5.5,5\n"}, "prompt_len='5.5'"),
    ("wl-output-0", R + ["--workload", "w.csv"], {"w.csv": "prompt_len,output_len\n5,0\n"}, "output_len='0'"),
    ("wl-prompt-neg", R + ["--workload", "w.csv"], {"w.csv": "prompt_len,output_len\n-5,5\n"}, "prompt_len='-5'"),
    ("wl-prompt-empty", R + ["--workload", "w.csv"], {"w.csv": "prompt_len,output_len\n,5\n"}, "prompt_len=''"),
    ("wl-arrival-neg", R + ["--workload", "w.csv"], {"w.csv": "prompt_len,output_len,arrival\n5,5,-1\n"}, "arrival='-1'"),
    ("wl-arrival-nan", R + ["--workload", "w.csv"], {"w.csv": "prompt_len,output_len,arrival\n5,5,nan\n"}, "arrival='nan'"),
    ("wl-arrival-inf", R + ["--workload", "w.csv"], {"w.csv": "prompt_len,output_len,arrival\n5,5,inf\n"}, "arrival='inf'"),
    ("wl-ragged", R + ["--workload", "w.csv"], {"w.csv": "prompt_len,output_len\n5,5,5\n"}, "2 comma-separated fields"),
    ("wl-dup-id", R + ["--workload", "w.csv"], {"w.csv": "id,prompt_len,output_len\n1,5,5\n1,6,6\n"}, "id=1"),
    ("wl-id-neg", R + ["--workload", "w.csv"], {"w.csv": "id,prompt_len,output_len\n-1,5,5\n"}, "id='-1'"),
    ("wl-more-than-file", ["run", "--requests", "5", "--workload", "w.csv"], {"w.csv": GOOD_WL}, "n=5: expected at most"),
    ("wl-jsonl-not-object", R + ["--workload", "w.jsonl"], {"w.jsonl": "[1, 2]\n"}, "a JSON object per line"),
    ("wl-jsonl-bad-json", R + ["--workload", "w.jsonl"], {"w.jsonl": '{"prompt_len": 5,\n'}, "a JSON object per line"),
    ("wl-jsonl-nan", R + ["--workload", "w.jsonl"], {"w.jsonl": '{"prompt_len": NaN, "output_len": 5}\n'},
     "prompt_len=nan"),
    ("wl-jsonl-float", R + ["--workload", "w.jsonl"], {"w.jsonl": '{"prompt_len": 1.5, "output_len": 5}\n'},
     "prompt_len=1.5"),
    ("wl-jsonl-bool", R + ["--workload", "w.jsonl"], {"w.jsonl": '{"prompt_len": true, "output_len": 5}\n'},
     "prompt_len=True"),
    ("wl-jsonl-string", R + ["--workload", "w.jsonl"], {"w.jsonl": '{"prompt_len": "many", "output_len": 5}\n'},
     "prompt_len='many'"),
    ("wl-jsonl-arrival-inf", R + ["--workload", "w.jsonl"],
     {"w.jsonl": '{"prompt_len": 5, "output_len": 5, "arrival": Infinity}\n'}, "arrival=inf"),
    ("wl-jsonl-optional-some", R + ["--workload", "w.jsonl"],
     {"w.jsonl": '{"prompt_len": 5, "output_len": 5, "arrival": 1}\n{"prompt_len": 5, "output_len": 5}\n'},
     "present in every row or in none"),
    ("wl-jsonl-deep", R + ["--workload", "w.jsonl"], {"w.jsonl": "[" * 100000 + "\n"}, "a JSON object per line"),
    ("wl-unknown-kind", R + ["--workload", "lmsys"], {}, "workload='lmsys'"),
    # ---- E. catalog files (YAML/JSON) -------------------------------------------------------------
    ("cat-latin1", ["list", "--catalog", "c.yaml"], {"c.yaml": LATIN1}, "c.yaml'"),
    ("cat-binary", ["list", "--catalog", "c.yaml"], {"c.yaml": BINARY}, "UTF-8"),
    ("cat-binary-json", ["list", "--catalog", "c.json"], {"c.json": b"\x89PNG\r\n\x1a\n"}, "UTF-8"),
    ("cat-bad-yaml", ["list", "--catalog", "c.yaml"], {"c.yaml": "models: [unclosed\n"}, "valid YAML"),
    ("cat-bad-json", ["list", "--catalog", "c.json"], {"c.json": "{models: }"}, "valid JSON"),
    ("cat-list-top", ["list", "--catalog", "c.yaml"], {"c.yaml": "- 1\n- 2\n"}, "a mapping at the top level"),
    ("cat-empty", ["list", "--catalog", "c.yaml"], {"c.yaml": ""}, "a mapping at the top level"),
    ("cat-extra-key", ["list", "--catalog", "c.yaml"], {"c.yaml": "modles: {}\n"}, "modles={}: expected top-level keys"),
    ("cat-models-list", ["list", "--catalog", "c.yaml"], {"c.yaml": "models: [a, b]\n"}, "models=['a', 'b']"),
    ("cat-gpus-string", ["list", "--catalog", "c.yaml"], {"c.yaml": "gpus: h100\n"}, "gpus='h100'"),
    ("cat-entry-not-map", ["list", "--catalog", "c.yaml"], {"c.yaml": "models:\n  tiny: 3\n"}, "tiny=3"),
    ("cat-unknown-field", ["list", "--catalog", "c.yaml"], {"c.yaml": cat_model("{layers: 2, hiden: 64}")}, "tiny.hiden=64"),
    ("cat-missing-fields", ["list", "--catalog", "c.yaml"], {"c.yaml": cat_model("{layers: 2}")}, "all required fields"),
    ("cat-layers-0", ["list", "--catalog", "c.yaml"], {"c.yaml": _model(layers=0)}, "ModelSpec.layers=0"),
    ("cat-layers-neg", ["list", "--catalog", "c.yaml"], {"c.yaml": _model(layers=-2)}, "ModelSpec.layers=-2"),
    ("cat-layers-float", ["list", "--catalog", "c.yaml"], {"c.yaml": _model(layers=1.5)}, "ModelSpec.layers=1.5"),
    ("cat-layers-string", ["list", "--catalog", "c.yaml"], {"c.yaml": _model(layers="many")}, "ModelSpec.layers='many'"),
    ("cat-heads-div", ["list", "--catalog", "c.yaml"], {"c.yaml": _model(kv_heads=3)}, "ModelSpec.kv_heads=3"),
    ("cat-weight-bytes-0", ["list", "--catalog", "c.yaml"], {"c.yaml": _model(weight_bytes=0)}, "weight_bytes=0"),
    ("cat-weight-bytes-nan", ["list", "--catalog", "c.yaml"], {"c.yaml": _model(weight_bytes=".nan")}, "weight_bytes=nan"),
    ("cat-kv-bytes-inf", ["list", "--catalog", "c.yaml"], {"c.yaml": _model(kv_bytes=".inf")}, "kv_bytes=inf"),
    ("cat-replaces-model", ["list", "--catalog", "c.yaml"], {"c.yaml": "models:\n  llama-3.1-8b: {base: llama-3.1-8b, layers: 2}\n"},
     "models.llama-3.1-8b='(an entry)': expected a name not built in"),
    ("cat-replaces-model-case", ["list", "--catalog", "c.yaml"], {"c.yaml": "models:\n  Llama-3.1-70B: {base: llama-3.1-8b}\n"},
     "a name not built in"),
    ("cat-replaces-gpu", ["list", "--catalog", "c.yaml"], {"c.yaml": "gpus:\n  H100-SXM5-80GB: {base: h100}\n"},
     "gpus.H100-SXM5-80GB"),
    ("cat-replaces-alias", ["list", "--catalog", "c.yaml"], {"c.yaml": "gpus:\n  h100: {base: h200}\n"}, "gpus.h100"),
    ("cat-base-unknown", ["list", "--catalog", "c.yaml"], {"c.yaml": "models:\n  m: {base: llama-9}\n"}, "unknown model 'llama-9'"),
    ("cat-base-not-string", ["list", "--catalog", "c.yaml"], {"c.yaml": "models:\n  m: {base: [1]}\n"}, "m.base=[1]"),
    ("cat-gpu-memory-neg", ["list", "--catalog", "c.yaml"], {"c.yaml": _gpu(memory_bytes=-1)}, "memory_bytes=-1"),
    ("cat-gpu-memory-inf", ["list", "--catalog", "c.yaml"], {"c.yaml": _gpu(memory_bytes=".inf")}, "memory_bytes=inf"),
    ("cat-gpu-bw-abc", ["list", "--catalog", "c.yaml"], {"c.yaml": _gpu(hbm_bw="fast")}, "hbm_bw='fast'"),
    ("cat-gpu-eff-big", ["list", "--catalog", "c.yaml"], {"c.yaml": _gpu(h2d_efficiency=1.5)}, "h2d_efficiency=1.5"),
    ("cat-gpu-eff-string", ["list", "--catalog", "c.yaml"], {"c.yaml": _gpu(h2d_efficiency="high")}, "h2d_efficiency='high'"),
    ("cat-gpu-latency-neg", ["list", "--catalog", "c.yaml"], {"c.yaml": _gpu(host_link_latency=-1e-6)}, "host_link_latency"),
    ("cat-gpu-link-share", ["list", "--catalog", "c.yaml"], {"c.yaml": _gpu(gpus_per_node=4, gpus_per_host_link=8)},
     "gpus_per_host_link=8: expected at most gpus_per_node=4"),
    ("cat-gpu-per-node-0", ["list", "--catalog", "c.yaml"], {"c.yaml": _gpu(gpus_per_node=0)}, "gpus_per_node=0"),
    ("cat-gpu-host-link-number", ["list", "--catalog", "c.yaml"], {"c.yaml": _gpu(host_link=5)}, "host_link=5"),
    ("cat-json-layers-0", ["list", "--catalog", "c.json"],
     {"c.json": json.dumps({"models": {"m": {"base": "llama-3.1-8b", "layers": 0}}})}, "layers=0"),
    ("cat-json-nan", ["list", "--catalog", "c.json"],
     {"c.json": '{"gpus": {"g": {"base": "h100", "hbm_bw": NaN}}}'}, "hbm_bw=nan"),
    ("cat-json-replaces", ["list", "--catalog", "c.json"],
     {"c.json": json.dumps({"models": {"llama-3.2-1b": {"base": "llama-3.2-3b"}}})}, "a name not built in"),
    ("run-cat-bad", R + ["--catalog", "c.yaml"], {"c.yaml": _model(layers=0)}, "ModelSpec.layers=0"),
    ("validate-cat-bad", ["validate", "--catalog", "c.yaml"], {"c.yaml": LATIN1}, "UTF-8"),
    ("study-cat-bad", ["study", "--catalog", "c.yaml"], {"c.yaml": "models: 3\n"}, "models=3"),
    # ---- F. probe files: validate, and run --profile ----------------------------------------------
    ("probe-binary", ["validate", "p.json"], {"p.json": BINARY}, "UTF-8"),
    ("probe-latin1", ["validate", "p.json"], {"p.json": probe().replace("HBM3", "HBM\xe9").encode("latin-1")}, "UTF-8"),
    ("probe-missing", ["validate", "none.json"], {}, "path='none.json'"),
    ("probe-bad-json", ["validate", "p.json"], {"p.json": probe()[:-10]}, "valid JSON"),
    ("probe-forward-nan", ["validate", "p.json"], {"p.json": probe(_set("forward.3.ms", float("nan")))},
     "forward[3].ms=nan: expected a finite number"),
    ("probe-layer-nan", ["validate", "p.json"], {"p.json": probe(_set("layer.0.ms", float("nan")))}, "layer[0].ms=nan"),
    ("probe-forward-inf", ["validate", "p.json"], {"p.json": probe(_set("forward.1.ms", float("inf")))}, "forward[1].ms=inf"),
    ("probe-forward-zero", ["validate", "p.json"], {"p.json": probe(_set("forward.1.ms", 0))}, "forward[1].ms=0"),
    ("probe-forward-string", ["validate", "p.json"], {"p.json": probe(_set("forward.1.ms", "slow"))}, "forward[1].ms='slow'"),
    ("probe-bw-nan", ["validate", "p.json"], {"p.json": probe(_set("h2d_bandwidth.0.h2d_pinned_GBps", float("nan")))},
     "h2d_bandwidth[0].h2d_pinned_GBps=nan"),
    ("probe-bw-neg-mb", ["validate", "p.json"], {"p.json": probe(_set("h2d_bandwidth.0.mb", -1))}, "h2d_bandwidth[0].mb=-1"),
    ("probe-bw-empty", ["validate", "p.json"], {"p.json": probe(_set("h2d_bandwidth", []))}, "h2d_bandwidth=[]"),
    ("probe-layers-0", ["validate", "p.json"], {"p.json": probe(_set("layers", 0))}, "layers=0: expected an integer >= 1"),
    ("probe-layers-64", ["validate", "p.json"], {"p.json": probe(_set("layers", 64))}, "layers=64: expected an integer in [1, 32]"),
    ("probe-layers-string", ["validate", "p.json"], {"p.json": probe(_set("layers", "32"))}, "layers='32'"),
    ("probe-layers-float", ["validate", "p.json"], {"p.json": probe(_set("layers", 32.0))}, "layers=32.0"),
    ("probe-no-forward", ["validate", "p.json"], {"p.json": probe(_set("forward", DEL))}, "forward=None: expected present"),
    ("probe-forward-dict", ["validate", "p.json"], {"p.json": probe(_set("forward", {"a": 1}))}, "forward='dict'"),
    ("probe-forward-row-list", ["validate", "p.json"], {"p.json": probe(_set("forward.0", [1, 2]))}, "forward[0]=[1, 2]"),
    ("probe-forward-no-ms", ["validate", "p.json"], {"p.json": probe(_set("forward.2.ms", DEL))}, "forward[2].ms=None"),
    ("probe-policy-unknown", ["validate", "p.json"], {"p.json": probe(_set("forward.2.policy", "lazy"))},
     "forward[2].policy='lazy'"),
    ("probe-B-0", ["validate", "p.json"], {"p.json": probe(_set("forward.0.B", 0))}, "forward[0].B=0"),
    ("probe-C-neg", ["validate", "p.json"], {"p.json": probe(_set("layer.0.C", -1))}, "layer[0].C=-1"),
    ("probe-T-bool", ["validate", "p.json"], {"p.json": probe(_set("layer.0.T", True))}, "layer[0].T=True"),
    ("probe-param-neg", ["validate", "p.json"], {"p.json": probe(_set("forward.1.param", -1))}, "forward[1].param=-1"),
    ("probe-only-resident", ["validate", "p.json"],
     {"p.json": probe(lambda d: d.update(forward=[r for r in d["forward"] if r["policy"] == "resident"]))},
     "at least one sync_prefix or async_k row"),
    ("probe-layer-bytes", ["validate", "p.json"], {"p.json": probe(_set("layer_bytes", 12))}, "layer_bytes=12"),
    ("probe-model-unknown", ["validate", "p.json"], {"p.json": probe(_set("model", "llama-9"))}, "model='llama-9': expected a catalog model name"),
    ("probe-model-number", ["validate", "p.json"], {"p.json": probe(_set("model", 8))}, "model=8"),
    ("probe-gpu-number", ["validate", "p.json"], {"p.json": probe(_set("gpu", 100))}, "gpu=100"),
    ("probe-offloaded-mismatch", ["validate", "p.json"], {"p.json": probe(_set("forward.1.offloaded_layers", 3))},
     "forward[1].offloaded_layers=3"),
    ("validate-model-override-small", ["validate", "p.json", "--model", "llama-3.2-1b"], {"p.json": probe()},
     "layers=32: expected an integer in [1, 16]"),
    ("profile-probe-nan", R + ["--profile", "p.json"], {"p.json": probe(_set("forward.0.ms", float("nan")))},
     "forward[0].ms=nan"),
    ("profile-probe-layers-0", R + ["--profile", "p.json"], {"p.json": probe(_set("layers", 0))}, "layers=0"),
    ("profile-probe-layers-64", R + ["--profile", "p.json"], {"p.json": probe(_set("layers", 64))},
     "layers=64: expected an integer in [1, 32]"),
    ("profile-probe-binary", R + ["--profile", "p.json"], {"p.json": BINARY}, "UTF-8"),
    ("step-profile-probe-layer-nan", ["step", "--profile", "p.json"], {"p.json": probe(_set("layer.1.ms", float("nan")))},
     "layer[1].ms=nan"),
    ("paper-profile-probe-inf", ["paper", "--requests", "4", "--quiet", "--out", "o", "--profile", "p.json"],
     {"p.json": probe(_set("h2d_bandwidth.1.mb", float("inf")))}, "h2d_bandwidth[1].mb=inf"),
    # ---- G. Profile files -------------------------------------------------------------------------
    ("profile-missing", R + ["--profile", "none.json"], {}, "none.json"),
    ("profile-dir", R + ["--profile", "d.json"], {"d.json/keep": ""}, "d.json"),
    ("profile-schema", R + ["--profile", "p.json"], {"p.json": profile_text(schema="v2")}, "schema='v2'"),
    ("profile-h2d-not-list", R + ["--profile", "p.json"], {"p.json": profile_text(h2d=5)}, "h2d=5"),
    ("profile-h2d-row-short", R + ["--profile", "p.json"], {"p.json": profile_text(h2d=[[1]])}, "h2d[0]=(1,)"),
    ("profile-h2d-row-number", R + ["--profile", "p.json"], {"p.json": profile_text(h2d=[7])}, "h2d[0]=7"),
    ("profile-h2d-neg", R + ["--profile", "p.json"], {"p.json": profile_text(h2d=[[1, -5]])}, "h2d[0]=(1, -5)"),
    ("profile-h2d-empty", R + ["--profile", "p.json"], {"p.json": profile_text(h2d=[], layer_times=[])}, "h2d=()"),
    ("profile-h2d-inf", R + ["--profile", "p.json"], {"p.json": profile_text(h2d=[[1, float("inf")]])}, "h2d[0]=(1, inf)"),
    ("profile-layer-nan", R + ["--profile", "p.json"], {"p.json": profile_text(layer_times=[[1, 1, 0, float("nan")]])},
     "layer_times[0]=(1, 1, 0, nan)"),
    ("profile-layer-B0", R + ["--profile", "p.json"], {"p.json": profile_text(layer_times=[[0, 1, 0, 0.1]])}, "layer_times[0]"),
    ("profile-layer-string", R + ["--profile", "p.json"], {"p.json": profile_text(layer_times=[[1, 1, 0, "x"]])},
     "layer_times[0]"),
    ("profile-layers-string", R + ["--profile", "p.json"], {"p.json": profile_text(layers="x")}, "layers='x'"),
    ("profile-layers-neg", R + ["--profile", "p.json"], {"p.json": profile_text(layers=-1)}, "layers=-1"),
    ("profile-launch-neg", R + ["--profile", "p.json"], {"p.json": profile_text(launch_per_layer=-1)}, "launch_per_layer=-1"),
    ("profile-launch-string", R + ["--profile", "p.json"], {"p.json": profile_text(launch_per_layer="fast")},
     "launch_per_layer='fast'"),
    ("profile-slowdown-small", R + ["--profile", "p.json"], {"p.json": profile_text(copy_slowdown=0.5)}, "copy_slowdown=0.5"),
    ("profile-slowdown-string", R + ["--profile", "p.json"], {"p.json": profile_text(copy_slowdown="x")}, "copy_slowdown='x'"),
    ("profile-slowdown-nan", R + ["--profile", "p.json"], {"p.json": profile_text(copy_slowdown=float("nan"))},
     "copy_slowdown=nan"),
    ("profile-meta-list", R + ["--profile", "p.json"], {"p.json": profile_text(meta=[1])}, "meta=[1]"),
    ("profile-model-number", R + ["--profile", "p.json"], {"p.json": profile_text(model=5)}, "model=5"),
    ("profile-yaml-latin1", R + ["--profile", "p.yaml"], {"p.yaml": "schema: caf\xe9\n".encode("latin-1")}, "UTF-8"),
    ("profile-yaml-nan", R + ["--profile", "p.yaml"],
     {"p.yaml": "schema: offloadlab.profile/1\nh2d: [[1, .nan]]\nlayer_times: []\n"}, "h2d[0]=(1, nan)"),
    ("optimize-profile-bad", ["optimize", "--requests", "4", "--quiet", "--profile", "p.json"],
     {"p.json": profile_text(copy_slowdown=0)}, "copy_slowdown=0"),
    ("compare-profile-bad", ["compare", "--requests", "4", "--profile", "p.json"], {"p.json": BINARY}, "UTF-8"),
    # ---- serving-run directories: one reader (offloadlab/serving_files.py), one message, for both commands ----
    *[(f"{cmd}-serving-{name}", argv + ["run"],
       {"run/meta.json": "{}", **({"run/requests.jsonl": rows} if rows else {})}, needle)
      for cmd, argv in (("run", R + ["--workload"]), ("validate", ["validate"]))
      for name, rows, needle in (
          ("no-requests", None, "run: requests.jsonl=None: expected present in the serving-run directory"),
          ("empty", "\n", "run/requests.jsonl: rows=0: expected at least one request"),
          ("not-json", SERVING_ROW + "\n{oops\n", "run/requests.jsonl, line 2: row='{oops': expected a JSON object"),
          ("zero-output", SERVING_ROW + "\n" + SERVING_ROW.replace('"output_toks": 2', '"output_toks": 0') + "\n",
           "run/requests.jsonl, line 2: output_toks=0: expected an integer >= 1"),
          ("queued-nan", SERVING_ROW.replace('"queued_ts": 1.0', '"queued_ts": NaN') + "\n",
           "run/requests.jsonl, line 1: queued_ts=nan: expected a finite time in seconds"),
          ("binary", BINARY, "run/requests.jsonl'"))],
]


def _tree(root: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


def test_the_table_is_large_and_its_ids_unique():
    ids = [c[0] for c in CASES]
    assert len(ids) == len(set(ids))
    assert len(CASES) >= 150, len(CASES)
    commands = {c[1][0] for c in CASES if c[1]}
    assert commands >= {"paper", "run", "compare", "study", "optimize", "step", "memory", "validate", "list"}


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_exit_2_one_line_no_new_files(case, tmp_path, monkeypatch, capsys, clean_user_catalog):
    _, argv, files, needle = case
    for name, content in files.items():
        p = tmp_path / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(content if isinstance(content, bytes) else content.encode())
    monkeypatch.chdir(tmp_path)
    before = _tree(tmp_path)
    rc = main(list(argv))
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if not line.startswith("note: ")]
    assert rc == 2, err
    assert len(lines) == 1 and lines[0].startswith("offloadlab: error: "), err
    assert "Traceback" not in err
    assert needle in lines[0], lines[0]
    # it names the field and the value, and says what was expected (or what the catalog knows)
    assert re.search(r"=.*: expected |unknown \w+ '.*'; known: |does not fit", lines[0]), lines[0]
    assert _tree(tmp_path) == before  # no new (or changed) file, no temp file left behind
