"""Catalogs: model name -> ModelSpec, GPU name -> HardwareSpec; users add their own from YAML/JSON.

The GPU table is ``hardware.csv`` beside this file, a verbatim copy of the project's datasheet
facts (shared/data/hardware.csv; a test keeps the two identical), and ``hardware_more.csv`` (same
columns): GPUs people serve on beyond those, each row's source in its note column.
"""
from __future__ import annotations

import csv
import re
import dataclasses
from functools import lru_cache
from importlib import resources
from pathlib import Path

from ..errors import ConfigError, UnknownNameError
from ..fileio import load_mapping
from ..specs import GB, GiB, HardwareSpec, ModelSpec

_LLAMA3 = dict(vocab=128256, head_dim=128, kv_heads=8, max_context=131072)
_QWEN3 = dict(vocab=151936, head_dim=128, kv_heads=8, max_context=40960, qk_norm=True)
_QWEN25 = dict(vocab=152064, head_dim=128, max_context=32768, qkv_bias=True)

# name -> config, as in gpt-fast's model table (shapes from each model's config.json)
MODELS: dict[str, ModelSpec] = {
    m.name: m
    for m in [
        ModelSpec("llama-3.1-8b", layers=32, hidden=4096, heads=32, intermediate=14336, **_LLAMA3),
        ModelSpec("llama-3.1-70b", layers=80, hidden=8192, heads=64, intermediate=28672, **_LLAMA3),
        ModelSpec("llama-3.3-70b", layers=80, hidden=8192, heads=64, intermediate=28672, **_LLAMA3),
        ModelSpec("llama-3.1-405b", layers=126, hidden=16384, heads=128, intermediate=53248, **_LLAMA3),
        # Meta's FP8 releases (one byte per weight, KV cache in bf16); compute is still costed at the bf16 rate
        ModelSpec("llama-3.1-70b-fp8", layers=80, hidden=8192, heads=64, intermediate=28672, weight_bytes=1, **_LLAMA3),
        ModelSpec("llama-3.1-405b-fp8", layers=126, hidden=16384, heads=128, intermediate=53248, weight_bytes=1,
                  **_LLAMA3),
        ModelSpec("llama-3.2-1b", layers=16, hidden=2048, heads=32, intermediate=8192, tied_embeddings=True,
                  vocab=128256, head_dim=64, kv_heads=8),
        ModelSpec("llama-3.2-3b", layers=28, hidden=3072, heads=24, intermediate=8192, tied_embeddings=True,
                  vocab=128256, head_dim=128, kv_heads=8),
        # Qwen3 dense (Qwen/Qwen3-*: per-head q/k RMSNorm, no biases, 40,960 positions)
        ModelSpec("qwen3-0.6b", layers=28, hidden=1024, heads=16, intermediate=3072, tied_embeddings=True, **_QWEN3),
        ModelSpec("qwen3-8b", layers=36, hidden=4096, heads=32, intermediate=12288, **_QWEN3),
        ModelSpec("qwen3-14b", layers=40, hidden=5120, heads=40, intermediate=17408, **_QWEN3),
        ModelSpec("qwen3-32b", layers=64, hidden=5120, heads=64, intermediate=25600, **_QWEN3),
        # Qwen2.5 (Qwen/Qwen2.5-*: q/k/v biases; max_position_embeddings 32,768 in the Instruct configs)
        ModelSpec("qwen2.5-7b", layers=28, hidden=3584, heads=28, kv_heads=4, intermediate=18944, **_QWEN25),
        ModelSpec("qwen2.5-14b", layers=48, hidden=5120, heads=40, kv_heads=8, intermediate=13824, **_QWEN25),
        ModelSpec("qwen2.5-32b", layers=64, hidden=5120, heads=40, kv_heads=8, intermediate=27648, **_QWEN25),
        ModelSpec("qwen2.5-72b", layers=80, hidden=8192, heads=64, kv_heads=8, intermediate=29568, **_QWEN25),
        # mistralai/Mistral-7B-v0.3 (and its Instruct): no sliding window from v0.2 on
        ModelSpec("mistral-7b-v0.3", layers=32, hidden=4096, heads=32, kv_heads=8, head_dim=128, intermediate=14336,
                  vocab=32768, max_context=32768),
    ]
}

# Host memory per GPU node where a catalog note says it; otherwise HardwareSpec's default.
_HOST_MEMORY = {"GH200-96GB": 480 * GB, "GH200-144GB": 480 * GB}
# The node each GPU usually comes in (ASSUMPTIONS, not datasheet facts; override in a catalog file):
# (GPUs per node, GPUs sharing one host link, network GB/s per GPU between nodes). 8-GPU HGX boards
# put two GPUs behind each PCIe switch and give each GPU a 400 Gb/s NIC; the paper's Polaris node
# has 4 A100-40GB on one host, each on its own x16 link, and two 200 Gb/s Slingshot NICs for the
# four; GH200 is one superchip per NVLink-C2C link with one 200 Gb/s NIC.
_NODES = {"A100-SXM4-40GB": (4, 1, 12.5), "GH200-96GB": (1, 1, 25), "GH200-144GB": (1, 1, 25),
          "L40S-48GB": (8, 2, 50),
          "H100-PCIe-80GB": (8, 2, 50),
          # workstation cards: up to 4 in one tower, each on its own x16 link, a 100 Gb/s NIC
          "RTX-4090-24GB": (4, 1, 12.5), "RTX-5090-32GB": (4, 1, 12.5), "RTX-6000-Ada-48GB": (4, 1, 12.5),
          "RTX-PRO-6000-Blackwell-96GB": (4, 1, 12.5), "RTX-A6000-48GB": (4, 1, 12.5)}
_DEFAULT_NODE = (8, 2, 50)
# CUDA compute capability of each catalog GPU (NVIDIA's CUDA GPUs list, developer.nvidia.com/cuda-gpus;
# datasheet facts). MI300X is not a CUDA device: left at 0 (not known).
_COMPUTE_CAPABILITY = {
    "A100-SXM4-40GB": 8.0, "A100-SXM4-80GB": 8.0, "A100-PCIe-40GB": 8.0, "A100-PCIe-80GB": 8.0,
    "A10-24GB": 8.6, "A10G-24GB": 8.6, "RTX-A6000-48GB": 8.6, "RTX-3090-24GB": 8.6,
    "L4-24GB": 8.9, "L40-48GB": 8.9, "L40S-48GB": 8.9, "RTX-4090-24GB": 8.9, "RTX-6000-Ada-48GB": 8.9,
    "H100-SXM5-80GB": 9.0, "H100-PCIe-80GB": 9.0, "H100-NVL-94GB": 9.0, "H200-SXM-141GB": 9.0,
    "H200-NVL-141GB": 9.0, "H20-96GB": 9.0, "GH200-96GB": 9.0, "GH200-144GB": 9.0,
    "B200-180GB": 10.0, "RTX-5090-32GB": 12.0, "RTX-PRO-6000-Blackwell-96GB": 12.0,
}
# Short names people type.
_ALIASES = {
    "a100": "A100-SXM4-40GB", "a100-40gb": "A100-SXM4-40GB", "a100-80gb": "A100-SXM4-80GB",
    "h100": "H100-SXM5-80GB", "h100-sxm": "H100-SXM5-80GB", "h100-pcie": "H100-PCIe-80GB",
    "h200": "H200-SXM-141GB", "gh200": "GH200-96GB", "b200": "B200-180GB",
    "mi300x": "MI300X-192GB", "l40s": "L40S-48GB",
    "rtx4090": "RTX-4090-24GB", "rtx-4090": "RTX-4090-24GB", "4090": "RTX-4090-24GB",
    "rtx5090": "RTX-5090-32GB", "rtx-5090": "RTX-5090-32GB", "5090": "RTX-5090-32GB",
    "rtx6000-ada": "RTX-6000-Ada-48GB", "rtx-6000-ada": "RTX-6000-Ada-48GB",
    "rtx-pro-6000": "RTX-PRO-6000-Blackwell-96GB", "rtx-pro-6000-blackwell": "RTX-PRO-6000-Blackwell-96GB",
    "l4": "L4-24GB", "l40": "L40-48GB", "a10g": "A10G-24GB", "h100-nvl": "H100-NVL-94GB", "h20": "H20-96GB",
    "a100-pcie": "A100-PCIe-80GB", "a100-pcie-80gb": "A100-PCIe-80GB", "a100-pcie-40gb": "A100-PCIe-40GB",
    "a10": "A10-24GB", "rtx-a6000": "RTX-A6000-48GB", "a6000": "RTX-A6000-48GB", "h200-nvl": "H200-NVL-141GB",
}
# Device names as torch.cuda.get_device_name() prints them (and vLLM records them), where the GPU
# family in the catalog name alone is ambiguous ("RTX" is four GPUs here).
_DEVICE_NAMES = {
    "NVIDIA GeForce RTX 4090": "RTX-4090-24GB", "NVIDIA GeForce RTX 5090": "RTX-5090-32GB",
    "NVIDIA RTX 6000 Ada Generation": "RTX-6000-Ada-48GB",
    "NVIDIA RTX PRO 6000 Blackwell Workstation Edition": "RTX-PRO-6000-Blackwell-96GB",
    "NVIDIA RTX PRO 6000 Blackwell Server Edition": "RTX-PRO-6000-Blackwell-96GB",
    "NVIDIA RTX PRO 6000 Blackwell Max-Q Workstation Edition": "RTX-PRO-6000-Blackwell-96GB",
    "NVIDIA L4": "L4-24GB", "NVIDIA L40": "L40-48GB", "NVIDIA L40S": "L40S-48GB", "NVIDIA A10G": "A10G-24GB",
    "NVIDIA H100 NVL": "H100-NVL-94GB", "NVIDIA H20": "H20-96GB", "NVIDIA GH200 144G HBM3e": "GH200-144GB",
}
_TABLES = ("hardware.csv", "hardware_more.csv")

_user_models: dict[str, ModelSpec] = {}
_user_gpus: dict[str, HardwareSpec] = {}


def _key(name: str) -> str:
    return name.strip().lower()


@lru_cache(maxsize=1)
def _datasheet_gpus() -> dict[str, HardwareSpec]:
    out = {}
    rows = [row for table in _TABLES
            for row in csv.DictReader(resources.files(__package__).joinpath(table).read_text().splitlines())]
    for row in rows:
        name = row["gpu"]
        out[name] = HardwareSpec(
            name=name,
            memory_bytes=float(row["memory_GB"]) * GiB,  # HBM "GB" on datasheets are binary
            hbm_bw=float(row["hbm_TBps"]) * 1e12,
            peak_flops=float(row["bf16_dense_TFLOPs"]) * 1e12,
            host_link=row["host_link"],
            host_link_bw=float(row["host_link_GBps_per_dir"]) * GB,
            gpu_link=row["gpu_link"],
            gpu_link_bw=float(row["gpu_link_GBps_per_dir"] or 0) * GB,
            host_memory_bytes=_HOST_MEMORY.get(name, 512 * GiB),
            # NVLink-C2C is cache-coherent and far closer to its spec than PCIe DMA
            h2d_efficiency=0.9 if "C2C" in row["host_link"] else 0.82,
            gpus_per_node=_NODES.get(name, _DEFAULT_NODE)[0],
            gpus_per_host_link=_NODES.get(name, _DEFAULT_NODE)[1],
            network_bw=_NODES.get(name, _DEFAULT_NODE)[2] * GB,
            compute_capability=_COMPUTE_CAPABILITY.get(name, 0.0),
            note=row["note"],
        )
    return out


def model_names() -> list[str]:
    return sorted({**MODELS, **_user_models})


def gpu_names() -> list[str]:
    return sorted({**_datasheet_gpus(), **_user_gpus})


def get_model(name: str | ModelSpec) -> ModelSpec:
    if isinstance(name, ModelSpec):
        return name
    table = {_key(k): v for k, v in {**MODELS, **_user_models}.items()}
    try:
        return table[_key(name)]
    except KeyError:
        raise UnknownNameError("model", name, model_names()) from None


def model_for_hf_id(hf_id: str) -> ModelSpec:
    """A Hugging Face id (``meta-llama/Llama-3.1-8B``, ``meta-llama/Meta-Llama-3.1-8B-Instruct``,
    ``mistralai/Mistral-7B-Instruct-v0.3``, ``Qwen/Qwen2.5-7B-Instruct``) -> the catalog model of the
    same shape (instruction-tuned and chat variants share their base's shape)."""
    name = str(hf_id).rstrip("/").split("/")[-1].lower()
    candidates = [name]
    if name.startswith("meta-"):
        candidates.append(name[len("meta-"):])
    for c in list(candidates):
        base = re.sub(r"-(instruct|chat|hf|it)(?=-|$)", "", c)
        if base != c:
            candidates.append(base)
    for c in candidates:
        if c in model_names():
            return get_model(c)
    raise UnknownNameError("model (Hugging Face id; give --model NAME or a config.json)", hf_id, model_names())


def get_gpu(name: str | HardwareSpec) -> HardwareSpec:
    if isinstance(name, HardwareSpec):
        return name
    table = {_key(k): v for k, v in {**_datasheet_gpus(), **_user_gpus}.items()}
    k = _key(name)
    k = _key(_ALIASES.get(k, k))
    try:
        return table[k]
    except KeyError:
        raise UnknownNameError("GPU", name, gpu_names() + sorted(_ALIASES)) from None


# Tokens of a catalog GPU name that say its form factor or memory, not which GPU it is: a device name
# may leave them out ("NVIDIA H100 80GB HBM3" is the SXM5 part), so they only break ties.
_FORM = re.compile(r"^(SXM\d*|PCIE|NVL|HBM\d*E?|\d+GB)$")
_FACTOR = re.compile(r"^(SXM\d*|PCIE|NVL)$")  # of those, the form factors: another one is another product


def _tokens(name: str) -> list[str]:
    return [t for t in re.split(r"[\s_/-]+", name.upper()) if t]


def gpu_for_device(device_name: str) -> HardwareSpec:
    """The catalog GPU a device name (as torch.cuda.get_device_name prints it) refers to.

    "NVIDIA H100 80GB HBM3" -> H100-SXM5-80GB; "NVIDIA H100 PCIe" -> H100-PCIe-80GB;
    "NVIDIA A100-SXM4-40GB" -> A100-SXM4-40GB. Every token of the catalog name that names the GPU
    (H100; RTX and 4090; RTX, PRO, 6000 and Blackwell) must be a whole token of the device name, so
    "NVIDIA RTX A6000" is not an RTX 4090; memory size and form factor break ties, and a row without
    the form factor the device names (PCIe, NVL, SXM) is another product.
    """
    table = {**_datasheet_gpus(), **_user_gpus}
    exact = _DEVICE_NAMES.get(device_name.strip())
    if exact in table:
        return table[exact]
    dev = set(_tokens(device_name))
    dev_forms = {t for t in dev if _FACTOR.match(t)}
    best, best_score = None, None
    for name, spec in table.items():
        toks = _tokens(name)
        ident = [t for t in toks if not _FORM.match(t)]
        if not ident or not set(ident) <= dev:
            continue
        forms = {t for t in toks if _FORM.match(t)}
        if any(not any(r.startswith(f) for r in forms) for f in dev_forms):
            continue  # the device is another form of this GPU ("H200 NVL" is not the SXM part)
        score = 2 * len(ident) + 2 * len(forms & dev) - len({"PCIE", "NVL"} & forms - dev)
        if best_score is None or score > best_score:
            best, best_score = spec, score
    if best is None:
        raise UnknownNameError("GPU device", device_name, gpu_names())
    return best


def _number(v: str):
    try:
        return float(v)
    except ValueError:
        return v


def _build(cls, name: str, fields: dict, source: str, base=None):
    if not isinstance(fields, dict):
        raise ConfigError(name, fields, "a mapping of field: value", source=source)
    types = {f.name: f.type for f in dataclasses.fields(cls)}
    # YAML 1.1 (PyYAML) reads 8.6e10 as a string; numbers are what a spec's numeric fields mean
    fields = {k: _number(v) if "float" in str(types.get(k)) and isinstance(v, str) else v for k, v in fields.items()}
    known = set(types)
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ConfigError(f"{name}.{unknown[0]}", fields[unknown[0]], f"one of {sorted(known - {'name'})}",
                          source=source)
    try:
        if base is not None:
            return dataclasses.replace(base, name=name, **fields)
        return cls(name=name, **fields)
    except ConfigError as e:
        raise ConfigError(e.field, e.value, e.expected, source=source) from None
    except TypeError as e:  # a required field is missing
        raise ConfigError(name, fields, f"all required fields of {cls.__name__} ({e})", source=source) from None


def load_catalog_file(path: str | Path) -> tuple[list[str], list[str]]:
    """Add models and GPUs from a YAML/JSON file; returns the names added.

    Format::

        models:
          my-model: {layers: 40, hidden: 5120, heads: 40, kv_heads: 8, head_dim: 128,
                     intermediate: 13824, vocab: 32000}
          my-70b-fp8: {base: llama-3.1-70b, weight_bytes: 1}
        gpus:
          my-gpu: {memory_bytes: 8.6e10, hbm_bw: 3.35e12, peak_flops: 9.89e14, host_link_bw: 6.4e10}
    """
    data = load_mapping(path)
    src = str(path)
    extra = sorted(set(data) - {"models", "gpus"})
    if extra:
        raise ConfigError(extra[0], data[extra[0]], "top-level keys 'models' and/or 'gpus'", source=src)
    models, gpus = {}, {}
    builtin = {"models": {_key(n) for n in MODELS},
               "gpus": {_key(n) for n in _datasheet_gpus()} | {_key(n) for n in _ALIASES}}
    for section, cls, table, lookup in (("models", ModelSpec, models, get_model), ("gpus", HardwareSpec, gpus, get_gpu)):
        entries = data.get(section) or {}
        if not isinstance(entries, dict):
            raise ConfigError(section, entries, "a mapping of name: {field: value}", source=src)
        for name, fields in entries.items():
            if not isinstance(name, str) or not name.strip():
                raise ConfigError(section, name, "names that are non-empty strings", source=src)
            if _key(name) in builtin[section]:
                raise ConfigError(f"{section}.{name}", "(an entry)", "a name not built in (a catalog file adds, it "
                                  f"does not replace: give it a new name, with base: {name} to start from it)",
                                  source=src)
            fields = dict(fields) if isinstance(fields, dict) else fields
            base = None
            if isinstance(fields, dict) and "base" in fields:
                if not isinstance(fields["base"], str):
                    raise ConfigError(f"{name}.base", fields["base"], "a catalog name", source=src)
                base = lookup(fields.pop("base"))
            table[name] = _build(cls, name, fields, src, base)
    _user_models.update(models)  # all or nothing: only a file whose every entry is valid is added
    _user_gpus.update(gpus)
    added_m, added_g = list(models), list(gpus)
    return added_m, added_g
