"""Profile: measured costs that replace the datasheet roofline.

A Profile is what a GPU measured, in the project's units (bytes, seconds). On disk (JSON or YAML)::

    schema: offloadlab.profile/1
    gpu: NVIDIA H100 80GB HBM3      # the GPU measured: a device name or catalog name (required
                                    # to transfer: efficiencies are learnt against its datasheet)
    model: llama-3.1-8b             # the model shape measured: a catalog name, or give model_shape
    model_shape: {hidden: 4096, heads: 32, kv_heads: 8, head_dim: 128, intermediate: 14336,
                  vocab: 128256, weight_bytes: 2}    # optional; needed when model is not in the catalog
    layers: 32                      # layers in the measured stack
    host_link: PCIe Gen5 x16        # the host link the copies were measured over (default: the GPU's)
    h2d: [[bytes, bytes_per_s], ...]          # pinned host->device copy rate by transfer size
    layer_times: [[B, T, C, seconds], ...]    # one decoder layer, in-stack, B seqs x T new tokens
                                              # after C cached tokens
    launch_per_layer: 0.00075       # host seconds to launch one layer's kernels (eager), or null
    copy_slowdown: 1.0              # compute time multiplier while a host->device copy runs
    kernels: [[op, tokens, tp, seconds], ...]  # per-operator times of one layer (one GPU's shard under
                                    # tensor parallelism tp): op is qkv_proj, o_proj, gate_up_proj,
                                    # down_proj (GEMMs) or elementwise (norms, RoPE, SiLU, adds)
    allreduce: [[bytes, gpus, seconds], ...]   # one all-reduce over gpus GPUs of one node
    uva_gemm: [[M, bytes, seconds], ...]      # optional: a GEMM of M token rows reading a weight of
                                              # `bytes` from pinned host memory through its UVA view
    attention: [[prefill_chunk, kv_prefill, n_decode, kv_decode, tp, seconds], ...]
                                    # one layer's attention op (one GPU's shard under tensor parallelism
                                    # tp) for a step of one prefill chunk of prefill_chunk tokens after
                                    # kv_prefill cached ones, plus n_decode decodes each after kv_decode
                                    # cached tokens (0 and 0: no chunk; 0 and 0: no decodes), as vLLM V1
                                    # runs it on the measured GPU (its attention backend there)
    meta: {...}                     # torch/driver versions, date, command

Every field but ``gpu`` and the model is optional: a Profile says what it measured and the
cost model takes the rest from the datasheet (see sim/costs.py: ``Calibrated``).

``Profile.from_probe`` converts the public probe format (shared/data/h100_llama8b_probe.json):
its ``h2d_bandwidth`` pinned rows, and its ``resident`` forward rows divided by ``layers`` (the
in-stack layer time; isolated ``layer`` rows are used only for shapes with no resident row, scaled
by the median in-stack/isolated ratio). ``Profile.from_vidur`` reads Vidur's profiling CSVs
(per-operator GEMM and elementwise times by token count and tensor-parallel degree, NCCL all-reduce
times). ``Profile.from_llmservingsim`` reads LLMServingSim's profile bundles (per-operator times and
an attention table by step shape, per tensor-parallel degree). ``source_model`` and ``source_gpu``
identify what was measured; a file that does not say is an error naming the field to add.
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .checks import is_int as _int, is_positive as _positive
from .errors import ConfigError, OffloadLabError, UnknownNameError
from .fileio import atomic_write_json, load_mapping, read_csv_table
from .policy import NoOffload, Placement, copy_prefix, interval
from .specs import HardwareSpec, ModelSpec

SCHEMA = "offloadlab.profile/1"
MiB = 1024**2
GEMM_OPS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")  # ModelSpec.layer_param_shapes' GEMMs
KERNEL_OPS = (*GEMM_OPS, "elementwise")
SHAPE_FIELDS = ("hidden", "heads", "kv_heads", "head_dim", "intermediate", "vocab", "weight_bytes")
ROW_FIELDS = ("h2d", "layer_times", "kernels", "allreduce", "uva_gemm", "attention")  # a Profile's tables of rows
ATTENTION_COLUMNS = ("prefill_chunk", "kv_prefill", "n_decode", "kv_decode")  # LLMServingSim's attention.csv


def _attention_row_problem(row) -> str:
    """What is wrong with an attention row (prefill_chunk, kv_prefill, n_decode, kv_decode, tp, seconds),
    as the expectation to print; '' when nothing."""
    if not isinstance(row, (tuple, list)) or len(row) != 6:
        return "[prefill_chunk, kv_prefill, n_decode, kv_decode, tp, seconds]"
    pc, kvp, nd, kvd, tp, sec = row
    if not (_int(pc, 0) and _int(kvp, 0) and _int(nd, 0) and _int(kvd, 0) and _int(tp, 1) and _positive(sec)):
        return "[prefill_chunk, kv_prefill, n_decode, kv_decode integers >= 0, tp >= 1, seconds > 0 finite]"
    if pc + nd == 0:
        return "a prefill chunk or decodes (prefill_chunk + n_decode >= 1)"
    if pc == 0 and kvp or nd == 0 and kvd:
        return "kv_prefill 0 without a prefill chunk and kv_decode 0 without decodes"
    return ""


# The probe format (shared/data/README.md): fields of a ``forward`` row and its placements.
PROBE_ROW_FIELDS = ("B", "T", "C", "policy", "param", "nbuf", "offloaded_layers", "ms")
PROBE_POLICIES = ("resident", "sync_prefix", "async_k")


def probe_placement(model: ModelSpec, policy: str, param: int, nbuf: int) -> Placement:
    """The Placement a probe row's (policy, param, nbuf) measured (shared/data/README.md): ``resident``
    none offloaded; ``sync_prefix`` layers 0..param-1 on the copy path; ``async_k`` the paper's
    interval k=param with nbuf staging slots. The probe's names end here."""
    if policy == "resident":
        return NoOffload().place(model)
    if policy == "sync_prefix":
        return copy_prefix(model, param)
    if policy == "async_k":
        return interval(param, slots=nbuf).place(model)
    raise ConfigError("policy", policy, f"one of {PROBE_POLICIES}")


def _rows(d: dict, key: str, src: str) -> list:
    rows = d[key]
    if not isinstance(rows, list):
        raise ConfigError(key, rows if not isinstance(rows, (dict, str)) else type(rows).__name__,
                          "a list of rows (objects)", source=src)
    for i, r in enumerate(rows):
        if not isinstance(r, dict):
            raise ConfigError(f"{key}[{i}]", r, "an object of named fields", source=src)
    return rows


def check_probe(d: dict, src: str) -> None:
    """Check a probe file's fields (shared/data/README.md) before anything is computed from them: every
    size, count and time a finite number in its range, ``layers`` at most the catalog model's."""
    for key in ("layers", "h2d_bandwidth", "layer", "forward"):
        if key not in d:
            raise ConfigError(key, None, "present in a probe file (see shared/data/README.md)", source=src)
    if "model" in d and (not isinstance(d["model"], str) or not d["model"].strip()):
        raise ConfigError("model", d["model"], "a model name (see `offloadlab list`), or absent", source=src)
    if not _int(d["layers"], 1):
        raise ConfigError("layers", d["layers"], "an integer >= 1 (decoder layers in the measured stack)", source=src)
    from .catalog import model_names, get_model  # the catalog sits beside this module in the vocabulary

    if isinstance(d.get("model"), str) and d["model"].strip().lower() in {n.lower() for n in model_names()}:
        m = get_model(d["model"])
        if d["layers"] > m.layers:
            raise ConfigError("layers", d["layers"], f"an integer in [1, {m.layers}] for {m.name}", source=src)
    if "layer_bytes" in d and not _int(d["layer_bytes"], 1):
        raise ConfigError("layer_bytes", d["layer_bytes"], "an integer number of bytes >= 1", source=src)
    bw = _rows(d, "h2d_bandwidth", src)
    if not bw:
        raise ConfigError("h2d_bandwidth", bw, "at least one row", source=src)
    for i, r in enumerate(bw):
        for f in ("mb", "h2d_pinned_GBps"):
            if not _positive(r.get(f)):
                raise ConfigError(f"h2d_bandwidth[{i}].{f}", r.get(f), "a finite number > 0", source=src)
    for key, fields in (("layer", ("B", "T", "C", "ms")), ("forward", PROBE_ROW_FIELDS)):
        for i, r in enumerate(_rows(d, key, src)):
            for f in fields:
                v = r.get(f)
                if f not in r:
                    ok, want = False, "present"
                elif f == "ms":
                    ok, want = _positive(v), "a finite number of milliseconds > 0"
                elif f == "policy":
                    ok, want = v in PROBE_POLICIES, f"one of {PROBE_POLICIES}"
                else:
                    low = 1 if f in ("B", "T") else 0
                    ok, want = _int(v, low), f"an integer >= {low}"
                if not ok:
                    raise ConfigError(f"{key}[{i}].{f}", v, want, source=src)


@dataclass(frozen=True)
class Profile:
    h2d: tuple[tuple[float, float], ...] = ()
    layer_times: tuple[tuple[int, int, int, float], ...] = ()
    model: str = ""
    gpu: str = ""
    layers: int = 0
    launch_per_layer: float | None = None
    copy_slowdown: float = 1.0
    model_shape: tuple[tuple[str, float], ...] = ()  # (field, value) pairs of SHAPE_FIELDS
    host_link: str = ""
    kernels: tuple[tuple[str, int, int, float], ...] = ()
    allreduce: tuple[tuple[float, int, float], ...] = ()
    uva_gemm: tuple[tuple[int, int, float], ...] = ()  # (M tokens, weight bytes, seconds), UVA reads
    # (prefill_chunk, kv_prefill, n_decode, kv_decode, tp, seconds): one layer's attention op by step shape
    attention: tuple[tuple[int, int, int, int, int, float], ...] = ()
    meta: dict = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self):
        src = self.meta.get("source") if isinstance(self.meta, dict) else None
        shape = self.model_shape.items() if isinstance(self.model_shape, dict) else self.model_shape
        try:
            object.__setattr__(self, "model_shape", tuple(sorted((str(k), v) for k, v in shape)))
        except (TypeError, ValueError):
            raise ConfigError("model_shape", self.model_shape, f"a mapping of {', '.join(SHAPE_FIELDS)}", source=src) from None
        if not (self.h2d or self.layer_times or self.kernels or self.allreduce or self.attention):
            raise ConfigError("h2d", self.h2d, "at least one [bytes, bytes_per_s] row (or layer_times, kernels, "
                              "allreduce or attention rows)", source=src)
        for key in ROW_FIELDS:
            if not isinstance(getattr(self, key), (tuple, list)):
                raise ConfigError(key, getattr(self, key), "a list of rows", source=src)
            for i, row in enumerate(getattr(self, key)):
                if not isinstance(row, (tuple, list)):
                    raise ConfigError(f"{key}[{i}]", row, "a row: a list of numbers", source=src)
        for i, row in enumerate(self.h2d):
            if len(row) != 2 or not all(_positive(x) for x in row):
                raise ConfigError(f"h2d[{i}]", row, "[bytes > 0, bytes_per_s > 0], finite numbers", source=src)
        for i, row in enumerate(self.layer_times):
            if len(row) != 4 or not (_int(row[0], 1) and _int(row[1], 1) and _int(row[2], 0) and _positive(row[3])):
                raise ConfigError(f"layer_times[{i}]", row, "[B >= 1, T >= 1, C >= 0 integers, seconds > 0 finite]",
                                  source=src)
        for i, row in enumerate(self.uva_gemm):
            if len(row) != 3 or not (_int(row[0], 1) and _positive(row[1]) and _positive(row[2])):
                raise ConfigError(f"uva_gemm[{i}]", row, "[M >= 1 integer, bytes > 0, seconds > 0, finite]", source=src)
        for f in ("model", "gpu", "host_link"):
            if not isinstance(getattr(self, f), str):
                raise ConfigError(f, getattr(self, f), "a string (provenance)", source=src)
        if not _int(self.layers, 0):
            raise ConfigError("layers", self.layers, "an integer >= 0 (0: not recorded)", source=src)
        for i, row in enumerate(self.kernels):
            if len(row) != 4 or row[0] not in KERNEL_OPS or not _positive(row[1]) or not _positive(row[2]) \
                    or not _positive(row[3]):
                raise ConfigError(f"kernels[{i}]", row, f"[op in {KERNEL_OPS}, tokens >= 1, tp >= 1, seconds > 0]",
                                  source=src)
        for i, row in enumerate(self.allreduce):
            if len(row) != 3 or not all(_positive(x) for x in row) or row[1] < 2:
                raise ConfigError(f"allreduce[{i}]", row, "[bytes > 0, gpus >= 2, seconds > 0]", source=src)
        seen = set()
        for i, row in enumerate(self.attention):
            why = _attention_row_problem(row)
            if why:
                raise ConfigError(f"attention[{i}]", row, why, source=src)
            if tuple(row[:5]) in seen:
                raise ConfigError(f"attention[{i}]", row, "one row per (prefill_chunk, kv_prefill, n_decode, "
                                  "kv_decode, tp): this shape is measured twice", source=src)
            seen.add(tuple(row[:5]))
        lpl = self.launch_per_layer
        if lpl is not None and not (_positive(lpl) or lpl == 0 and not isinstance(lpl, bool)):
            raise ConfigError("launch_per_layer", lpl, "a finite number of seconds >= 0, or null", source=src)
        cs = self.copy_slowdown
        if not (_positive(cs) and cs >= 1.0):
            raise ConfigError("copy_slowdown", cs, "a finite multiplier >= 1", source=src)

    # ---- what was measured ----
    def source_model(self) -> ModelSpec:
        """The model shape measured (its ``layers`` the measured stack's): the catalog entry named by
        ``model``, with ``model_shape`` overriding; an error naming the field to add otherwise."""
        from .catalog import get_model

        src = self.meta.get("source")
        shape = dict(self.model_shape)
        base = None
        if self.model:
            try:
                base = get_model(self.model)
            except OffloadLabError:
                if not shape:
                    raise ConfigError("model", self.model, "a catalog model name, or add the field model_shape "
                                      f"({', '.join(SHAPE_FIELDS)}) so the measured model can be identified",
                                      source=src) from None
        if base is None and not shape:
            raise ConfigError("model", self.model or None, "the measured model: add the field model (a catalog "
                              f"name) or model_shape ({', '.join(SHAPE_FIELDS)})", source=src)
        try:
            if base is None:
                missing = [f for f in SHAPE_FIELDS if f not in shape and f != "weight_bytes"]
                if missing:
                    raise ConfigError(f"model_shape.{missing[0]}", None, "present", source=src)
                ints = {k: int(v) if k != "weight_bytes" else float(v) for k, v in shape.items() if k in SHAPE_FIELDS}
                base = ModelSpec(self.model or "measured", layers=max(self.layers, 1), **ints)
            elif shape:
                base = base.replace(**{k: (float(v) if k == "weight_bytes" else int(v)) for k, v in shape.items()
                                       if k in SHAPE_FIELDS})
        except ConfigError as e:
            raise ConfigError(e.field, e.value, e.expected, source=src) from None
        return base.replace(layers=self.layers) if self.layers >= 1 else base

    def source_gpu(self) -> HardwareSpec:
        """The GPU measured: ``gpu`` as a catalog name or alias, else as a device name."""
        from .catalog import get_gpu, gpu_for_device

        if not self.gpu:
            raise ConfigError("gpu", None, "the measured GPU: add the field gpu (a device name such as "
                              "'NVIDIA H100 80GB HBM3' or a catalog name)", source=self.meta.get("source"))
        try:
            return get_gpu(self.gpu)
        except OffloadLabError:
            pass
        try:
            return gpu_for_device(self.gpu)
        except OffloadLabError:
            raise ConfigError("gpu", self.gpu, "a GPU the catalog knows (device or catalog name; add yours with "
                              "--catalog)", source=self.meta.get("source")) from None

    @property
    def link_kind(self) -> str:
        """The host link the copies were measured over (recorded, else the measured GPU's datasheet link)."""
        return self.host_link or self.source_gpu().host_link

    def describe(self) -> str:
        """'H100 8B' style: the GPU's catalog family and the model, for one-line messages."""
        try:
            parts = self.source_gpu().name.split("-")
            # "RTX-4090", "RTX-PRO-6000-Blackwell", "RTX-6000-Ada": an RTX name less its memory, not "RTX"
            gpu = "-".join(parts[:-1]) if parts[0] == "RTX" else parts[0]
        except OffloadLabError:
            gpu = self.gpu or "?"
        return f"{gpu} {self.model or 'unnamed-model'}"

    # ---- files ----
    def save(self, path: str | Path) -> Path:
        d = asdict(self)
        d["model_shape"] = dict(self.model_shape)
        d = {"schema": SCHEMA, **{k: (list(map(list, v)) if k in ROW_FIELDS else v)
                                  for k, v in d.items()}}
        return atomic_write_json(path, d)

    @classmethod
    def load(cls, path: str | Path) -> "Profile":
        """A Profile file, a probe file, LLMServingSim's profile bundle (a directory with meta.yaml), or
        Vidur's profiling CSVs (a directory or one .csv file)."""
        if Path(path).is_dir() and (Path(path) / "meta.yaml").is_file():
            return cls.from_llmservingsim(path)
        if Path(path).is_dir() or Path(path).suffix == ".csv":
            return cls.from_vidur(path)
        d = load_mapping(path)
        src = str(path)
        if "forward" in d and "h2d_bandwidth" in d:  # a probe file
            return cls.from_probe(path)
        if d.get("schema") != SCHEMA:
            raise ConfigError("schema", d.get("schema"), f"{SCHEMA!r}", source=src)
        for key in ("h2d", "layer_times"):
            if not isinstance(d.get(key), list):
                raise ConfigError(key, d.get(key), "a list of rows", source=src)
        for key in ROW_FIELDS[2:]:
            if not isinstance(d.get(key, []), list):
                raise ConfigError(key, d.get(key), "a list of rows", source=src)
        for key in ROW_FIELDS:
            for i, r in enumerate(d.get(key, [])):
                if not isinstance(r, list):
                    raise ConfigError(f"{key}[{i}]", r, "a row: a list of numbers", source=src)
        if not isinstance(d.get("meta") or {}, dict):
            raise ConfigError("meta", d.get("meta"), "a mapping (provenance), or absent", source=src)
        if not isinstance(d.get("model_shape") or {}, dict):
            raise ConfigError("model_shape", d.get("model_shape"), f"a mapping of {', '.join(SHAPE_FIELDS)}", source=src)
        meta = dict(d.get("meta") or {}, source=src)
        try:
            return cls(h2d=tuple(tuple(r) for r in d["h2d"]),
                       layer_times=tuple(tuple(r) for r in d["layer_times"]),
                       model=d.get("model", ""), gpu=d.get("gpu", ""), layers=d.get("layers", 0),
                       launch_per_layer=d.get("launch_per_layer"),
                       copy_slowdown=d.get("copy_slowdown", 1.0),
                       model_shape=tuple(sorted((d.get("model_shape") or {}).items())),
                       host_link=d.get("host_link", ""),
                       kernels=tuple(tuple(r) for r in d.get("kernels", [])),
                       allreduce=tuple(tuple(r) for r in d.get("allreduce", [])),
                       uva_gemm=tuple(tuple(r) for r in d.get("uva_gemm", [])),
                       attention=tuple(tuple(r) for r in d.get("attention", [])), meta=meta)
        except TypeError as e:
            raise ConfigError("file", src, f"rows of numbers ({e})") from None

    @classmethod
    def from_probe(cls, path: str | Path) -> "Profile":
        """Calibrate from a probe file's component measurements and ``resident`` rows only."""
        return cls.from_probe_data(load_mapping(path), str(path))

    @classmethod
    def from_probe_data(cls, d: dict, src: str = "probe") -> "Profile":
        """``from_probe`` on a probe file's contents (e.g. a subset of its rows, for held-out checks)."""
        check_probe(d, src)
        layers = d["layers"]
        try:
            h2d = tuple((r["mb"] * MiB, r["h2d_pinned_GBps"] * 1e9) for r in d["h2d_bandwidth"])
            in_stack = {(r["B"], r["T"], r["C"]): r["ms"] / 1e3 / layers
                        for r in d["forward"] if r["policy"] == "resident"}
            isolated = {(r["B"], r["T"], r["C"]): r["ms"] / 1e3 for r in d["layer"]}
        except (KeyError, TypeError) as e:
            raise ConfigError("row", str(e), "probe rows with the fields data/README.md defines", source=src) from None
        ratios = [in_stack[k] / isolated[k] for k in in_stack if k in isolated]
        import statistics  # here: its import (fractions) is 3 ms of every command

        scale = statistics.median(ratios) if ratios else 1.0
        times = dict(in_stack)
        for k, v in isolated.items():
            times.setdefault(k, v * scale)
        return cls(h2d=h2d, layer_times=tuple((*k, v) for k, v in sorted(times.items())),
                   model=d.get("model") or _model_from_layer_bytes(d.get("layer_bytes"), src), gpu=d.get("gpu", ""),
                   layers=layers, model_shape=tuple(sorted((k, d[k]) for k in SHAPE_FIELDS if k in d)),
                   host_link=d.get("host_link", ""),
                   meta={"source": src, "from": "probe", "torch": d.get("torch", "")})

    @classmethod
    def from_vidur(cls, path: str | Path, gpu: str | None = None) -> "Profile":
        """Vidur's profiling CSVs (microsoft/vidur data/profiling): a directory holding them, or one file.

        ``*mlp*.csv``: one layer's operators by ``num_tokens`` and ``num_tensor_parallel_workers``
        (medians, ms): the four GEMMs (attn_pre_proj = fused QKV, attn_post_proj = O, mlp_up_proj =
        fused gate+up, mlp_down_proj) and the elementwise work (input_layernorm + attn_rope +
        post_attention_layernorm + mlp_act + 2 x add: Vidur's Llama adds the residual twice per layer).
        The model is identified from the shape columns (n_embd, n_head, n_kv_head, n_expanded_embd,
        vocab_size). ``*all_reduce*.csv``: NCCL all-reduce medians by size (bytes) and workers, one node
        only (devices_per_node == num_workers). The GPU is ``gpu``, else the file name's GPU family
        (Vidur's "a100" profiles are of A100 80GB).
        """
        import pandas as pd

        p = Path(path)
        files = sorted(p.glob("*.csv")) if p.is_dir() else [p]
        if not p.exists() or not files:
            raise ConfigError("profile", str(p), "a Vidur profiling CSV, or a directory holding them")
        mlp = [f for f in files if "all_reduce" not in f.name and "attention" not in f.name]
        ar = [f for f in files if "all_reduce" in f.name]
        kernels, allreduce, shape, name = [], [], {}, ""
        for f in mlp:
            df = _read_csv(pd, f)
            need = ["num_tokens", "num_tensor_parallel_workers", "n_embd", "n_head", "n_kv_head", "n_expanded_embd",
                    "vocab_size"] + [f"time_stats.{c}.median" for c in (*_VIDUR_OPS.values(), *_VIDUR_ELEMENTWISE)]
            missing = [c for c in need if c not in df]
            if missing:
                raise ConfigError(missing[0], None, "a column of Vidur's mlp.csv", source=str(f))
            heads, kv, hid = int(df["n_head"].iloc[0]), int(df["n_kv_head"].iloc[0]), int(df["n_embd"].iloc[0])
            shape = {"hidden": hid, "heads": heads, "kv_heads": kv, "head_dim": hid // heads,
                     "intermediate": int(df["n_expanded_embd"].iloc[0]), "vocab": int(df["vocab_size"].iloc[0]),
                     "weight_bytes": 2}
            name = _model_from_shape(shape)
            med = {op: df[f"time_stats.{c}.median"] for op, c in _VIDUR_OPS.items()}
            elem = sum(df[f"time_stats.{c}.median"] * n for c, n in _VIDUR_ELEMENTWISE.items())
            for i in range(len(df)):
                t, tp = df["num_tokens"].iloc[i], df["num_tensor_parallel_workers"].iloc[i]
                for op, col in [*med.items(), ("elementwise", elem)]:
                    ms = col.iloc[i]
                    if not _positive(float(ms)):
                        raise ConfigError(f"row {i} {op} median ms", ms, "a time > 0 (not NaN)", source=str(f))
                    kernels.append((op, int(t), int(tp), float(ms) / 1e3))
        for f in ar:
            df = _read_csv(pd, f)
            need = ["size", "num_workers", "devices_per_node", "time_stats.all_reduce.median"]
            missing = [c for c in need if c not in df]
            if missing:
                raise ConfigError(missing[0], None, "a column of Vidur's all_reduce.csv", source=str(f))
            one = df[df["num_workers"] == df["devices_per_node"]]
            for i, (size, n, ms) in enumerate(zip(one["size"], one["num_workers"], one["time_stats.all_reduce.median"])):
                if not _positive(float(ms)):
                    raise ConfigError(f"row {i} all_reduce median ms", ms, "a time > 0 (not NaN)", source=str(f))
                allreduce.append((float(size), int(n), float(ms) / 1e3))
        if not kernels and not allreduce:
            raise ConfigError("profile", str(p), "Vidur CSVs with operator (mlp) or all_reduce rows")
        if gpu is None:
            m = re.search(r"(?:^|[_-])(a100|h100|a40|l40s|h200|b200)(?:[_-]|$)", files[0].name.lower())
            if m is None:
                raise ConfigError("gpu", None, f"the GPU Vidur measured (its file name {files[0].name!r} does not say; "
                                  "pass gpu=)", source=str(p))
            gpu = _VIDUR_GPUS.get(m.group(1), m.group(1))
        return cls(kernels=tuple(sorted(kernels)), allreduce=tuple(sorted(allreduce)), model=name, gpu=gpu,
                   model_shape=tuple(sorted(shape.items())) if shape and not name else (),
                   layers=0, meta={"source": str(p), "from": "vidur"})

    @classmethod
    def from_llmservingsim(cls, path: str | Path) -> "Profile":
        """LLMServingSim's profile bundle of one model on one GPU (casys-kaist/LLMServingSim,
        profiler/perf/<hardware>/<model>/<variant>/, written by its profiler under vLLM): ``meta.yaml``
        (the GPU's device name, the model's Hugging Face id, the tensor-parallel degrees profiled and
        shape overrides) and, per degree N, ``tpN/dense.csv`` (``layer,tokens,time_us``: one decoder
        layer's operators by token count, on one GPU's shard) and ``tpN/attention.csv`` (optional:
        ``prefill_chunk,kv_prefill,n_decode,kv_decode,time_us``, one layer's attention op by step shape).

        The model: ``engine_effective.hf_overrides`` describe the shard of one of the degrees profiled
        (the last one, as the profiler leaves them), so the catalog model is the one whose shard at a
        degree in ``tp_degrees`` has these heads, KV heads, MLP columns and vocabulary (ties: the one
        the Hugging Face id names, else the catalog's order). Kernels: the four GEMMs keep their names
        (qkv_proj, o_proj, gate_up_proj, down_proj); elementwise work is layernorm twice (before
        attention and before the MLP, each with its residual add fused, as vLLM's Llama runs it) +
        rotary_emb + act_fn (+ qk_norm where the model has it: Qwen3), each row with tp=N.
        per_sequence.csv and the skew files are not read. The first profiler's bundles (tp1/layers.csv,
        no attention table) are read too."""
        from .catalog import gpu_for_device

        d = Path(path)
        meta = load_mapping(d / "meta.yaml")
        src = str(d / "meta.yaml")
        eff = meta.get("engine_effective")
        device, hf, over = meta.get("gpu"), meta.get("model"), eff.get("hf_overrides") if isinstance(eff, dict) else None
        if not isinstance(device, str) or not device:
            raise ConfigError("gpu", device, "the device name the profiler recorded", source=src)
        if not isinstance(over, dict):
            raise ConfigError("engine_effective.hf_overrides", over, "the model's shape (a mapping)", source=src)
        degrees = meta.get("tp_degrees", [1])
        if not isinstance(degrees, list) or not degrees or not all(_int(n, 1) for n in degrees) \
                or len(set(degrees)) != len(degrees):
            raise ConfigError("tp_degrees", degrees, "a list of distinct tensor-parallel degrees (integers >= 1)",
                              source=src)
        shape = {"heads": over.get("num_attention_heads"), "kv_heads": over.get("num_key_value_heads"),
                 "intermediate": over.get("intermediate_size"), "vocab": over.get("vocab_size"),
                 "weight_bytes": 2 if meta.get("variant") in ("bf16", "fp16") else None}
        name = _model_from_shard(shape, degrees, hf) if all(_int(v, 1) for v in shape.values()) else ""
        if not name:
            raise ConfigError("model", hf, f"a catalog model of this shape ({shape}) or whose shard at a degree in "
                              f"tp_degrees {degrees} has it", source=src)
        kernels, attention = [], []
        for n in sorted(degrees):
            kernels += _bundle_kernels(d, n)
            attention += _bundle_attention(d / f"tp{n}" / "attention.csv", n)
        return cls(kernels=tuple(sorted(kernels)), attention=tuple(sorted(attention)), model=name,
                   gpu=gpu_for_device(device).name, layers=0,
                   meta={"source": str(d), "from": "llmservingsim", "vllm_version": str(meta.get("vllm_version", "")),
                         "device": device, "tp_degrees": sorted(degrees)})

    def to_json(self) -> str:
        return json.dumps(asdict(self))


def load_profiles(profile):
    """None, a Profile, a path, or a sequence of them (several sources: see sim.costs.Calibrated) ->
    None, a Profile or a tuple of Profiles."""
    if isinstance(profile, (list, tuple)):
        if not profile:
            return None
        loaded = tuple(load_profiles(p) for p in profile)
        return loaded[0] if len(loaded) == 1 else loaded
    return Profile.load(profile) if isinstance(profile, (str, os.PathLike)) else profile


# Vidur's operator columns -> this project's GEMM names (ModelSpec.layer_param_shapes order)
_VIDUR_OPS = {"qkv_proj": "attn_pre_proj", "o_proj": "attn_post_proj", "gate_up_proj": "mlp_up_proj",
              "down_proj": "mlp_down_proj"}
_VIDUR_ELEMENTWISE = {"input_layernorm": 1, "attn_rope": 1, "post_attention_layernorm": 1, "mlp_act": 1, "add": 2}
_VIDUR_GPUS = {"a100": "A100-SXM4-80GB", "h100": "H100-SXM5-80GB", "a40": "A40", "l40s": "L40S-48GB",
               "h200": "H200-SXM-141GB", "b200": "B200-180GB"}


def _read_csv(pd, f: Path):
    try:
        return pd.read_csv(f)
    except Exception as e:  # pandas' parser errors have no common base class worth naming
        raise ConfigError("file", str(f), f"a readable CSV ({type(e).__name__}: {str(e).splitlines()[0][:80]})") from None


def _catalog_model(matches) -> str:
    """The first catalog model (in the table's order: Llama before the same shapes under other
    names) for which ``matches(spec)`` holds; '' when none."""
    from .catalog import MODELS

    return next((name for name, m in MODELS.items() if matches(m)), "")


def _model_from_shape(shape: dict) -> str:
    """The catalog model with this layer shape ('' when none)."""
    return _catalog_model(lambda m: all(getattr(m, k) == v for k, v in shape.items()))


def _model_from_shard(shape: dict, degrees, hf_id) -> str:
    """The catalog model whose shard at one of ``degrees`` has this layer shape ('' when none); among
    several, the one the Hugging Face id ``hf_id`` names (catalog.model_for_hf_id: Llama-3.3-70B-Instruct
    is llama-3.3-70b), else the first in the catalog."""
    from .catalog import MODELS, model_for_hf_id

    found = []
    for name, m in MODELS.items():
        for n in degrees:
            try:
                part = m.shard(n)
            except ConfigError:
                continue
            if all(getattr(part, k) == v for k, v in shape.items()):
                found.append(name)
                break
    try:
        named = model_for_hf_id(hf_id).name if hf_id else ""
    except UnknownNameError:
        named = ""
    return named if named in found else (found[0] if found else "")


# LLMServingSim's operator tables: (file, name column, tokens column, time column, time units per second) and
# each kernel's operator terms (name, count); optional terms are added where the table has them
_DENSE = ("dense.csv", "layer", "tokens", "time_us", 1e6)
_DENSE_PARTS = {**{op: ((op, 1),) for op in GEMM_OPS},
                "elementwise": (("layernorm", 2), ("rotary_emb", 1), ("act_fn", 1))}
_DENSE_OPTIONAL = {"elementwise": (("qk_norm", 1),)}  # Qwen3's per-head q/k RMSNorm
_LAYERS = ("layers.csv", "layer_name", "input", "latency(ns)", 1e9)  # the first profiler: q/k/v, gate/up apart
_LAYERS_PARTS = {"qkv_proj": (("q_proj", 1), ("k_proj", 1), ("v_proj", 1)), "o_proj": (("o_proj", 1),),
                 "gate_up_proj": (("gate_proj", 1), ("up_proj", 1)), "down_proj": (("down_proj", 1),),
                 "elementwise": (("input_layernorm", 1), ("post_layernorm", 1), ("rope", 1), ("act_fn", 1))}


def _bundle_kernels(d: Path, tp: int) -> list:
    """(op, tokens, tp, seconds) rows of a bundle's tp``tp``/dense.csv, else its first profiler's layers.csv
    (one row per operator and token count at kv_cache 0, latency in ns)."""
    f, (fname, name_col, tokens_col, time_col, per_second), parts, optional = \
        d / f"tp{tp}" / "dense.csv", _DENSE, _DENSE_PARTS, _DENSE_OPTIONAL
    if not f.is_file() and (d / f"tp{tp}" / "layers.csv").is_file():
        f, (fname, name_col, tokens_col, time_col, per_second), parts, optional = \
            d / f"tp{tp}" / "layers.csv", _LAYERS, _LAYERS_PARTS, {}
    if not f.is_file():
        raise ConfigError(f"tp{tp}/dense.csv", None, f"present in the profile bundle (or tp{tp}/layers.csv; meta.yaml's "
                          f"tp_degrees lists {tp})", source=str(d))
    times: dict[int, dict[str, float]] = {}
    header, table = read_csv_table(f)
    for i, cells in table:
        row = dict(zip(header, cells))
        if row.get("kv_cache", "0") != "0":
            continue  # layers.csv: attention rows by KV length; the GEMMs do not depend on it
        try:
            op, tokens, t = row[name_col], int(row[tokens_col]), float(row[time_col])
        except (KeyError, TypeError, ValueError):
            raise ConfigError(f"line {i}", dict(row), f"{name_col}, {tokens_col} (an integer), {time_col} (a number)",
                              source=str(f)) from None
        if not (_int(tokens, 1) and _positive(t)):
            raise ConfigError(f"line {i}", dict(row), f"{tokens_col} >= 1 and {time_col} > 0", source=str(f))
        times.setdefault(tokens, {})[op] = t / per_second
    kernels = []
    for tokens, ops in sorted(times.items()):
        for op, terms in parts.items():
            if all(k in ops for k, _ in terms):
                terms = terms + tuple(t for t in optional.get(op, ()) if t[0] in ops)
                kernels.append((op, tokens, tp, sum(ops[k] * n for k, n in terms)))
    if not kernels:
        raise ConfigError(f"tp{tp}/{fname}", str(f), f"rows of {', '.join(GEMM_OPS)}", source=str(d))
    return kernels


def _bundle_attention(f: Path, tp: int) -> list:
    """(prefill_chunk, kv_prefill, n_decode, kv_decode, tp, seconds) rows of an attention.csv (none when the
    bundle has no such file); a bad row is an error naming the file, line, column and value."""
    if not f.is_file():
        return []
    header, table = read_csv_table(f, pad=False)
    missing = [c for c in (*ATTENTION_COLUMNS, "time_us") if c not in header]
    if missing:
        raise ConfigError(missing[0], None, f"a column of LLMServingSim's attention.csv ({', '.join(ATTENTION_COLUMNS)}, "
                          "time_us)", source=str(f))
    cols = [header.index(c) for c in (*ATTENTION_COLUMNS, "time_us")]
    rows, seen = [], {}
    for i, row in table:
        if len(row) < len(header):
            raise ConfigError(f"line {i}", ",".join(row), f"{len(header)} columns ({', '.join(header)})", source=str(f))
        vals = []
        for c, j in zip(ATTENTION_COLUMNS, cols):
            try:
                n = int(row[j])
            except ValueError:
                n = -1
            if n < 0:
                raise ConfigError(f"line {i} {c}", row[j], "an integer >= 0", source=str(f))
            vals.append(n)
        try:
            us = float(row[cols[4]])
        except ValueError:
            us = math.nan
        if not _positive(us):
            raise ConfigError(f"line {i} time_us", row[cols[4]], "a finite number of microseconds > 0", source=str(f))
        pc, kvp, nd, kvd = vals
        why = _attention_row_problem((*vals, tp, us / 1e6))  # the cells are numbers: what is left is their shape
        if why:
            raise ConfigError(f"line {i}", ",".join(row), why, source=str(f))
        key = (pc, kvp, nd, kvd)
        if key in seen:
            raise ConfigError(f"line {i}", ",".join(row), f"one row per shape (line {seen[key]} has it too)",
                              source=str(f))
        seen[key] = i
        rows.append((pc, kvp, nd, kvd, tp, us / 1e6))
    return rows


def _model_from_layer_bytes(layer_bytes, src: str) -> str:
    """An old probe file without ``model``: the catalog model whose layer has these bytes."""
    name = _catalog_model(lambda m: layer_bytes and m.layer_bytes == layer_bytes)
    if not name:
        raise ConfigError("model", None, "the measured model: add the field model (a catalog name; no catalog model "
                          f"has layer_bytes={layer_bytes})", source=src)
    return name
