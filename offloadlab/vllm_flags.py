"""vLLM's offload flags in and out: a deployment's command line <-> a Policy (and its engine flags).

Flags (vLLM >= 0.17; vllm/config/offload.py): ``--cpu-offload-gb G`` with
``--cpu-offload-params a,b`` (UVA by default, the 0.7 copy path when
``VLLM_WEIGHT_OFFLOADING_DISABLE_UVA=1``), ``--offload-backend {auto,uva,prefetch}``, and for
prefetch ``--offload-group-size g --offload-num-in-group n --offload-prefetch-step s
--offload-params a,b``. ``auto`` means prefetch when a group size is set, else UVA when
``--cpu-offload-gb`` > 0. Combinations vLLM rejects are rejected here too, with the same reasons.

The engine flags of the same command line that the simulator models (``engine_from_vllm``):
``--tensor-parallel-size/-tp``, ``--pipeline-parallel-size/-pp``, ``--gpu-memory-utilization``,
``--max-model-len``, ``--max-num-seqs``, ``--max-num-batched-tokens``, ``--block-size``,
``--[no-]enable-chunked-prefill`` and ``--kv-cache-dtype``.

Other flags are not silently dropped: a flag close to one of the above (``--cpu-offlod-gb``) or naming
offload is an error (a misspelling would simulate no offload); any other flag is reported by
``unmodelled_flags`` (the CLI names them in a note on stderr): vLLM has many settings this tool does
not model (``--enforce-eager``, ``--enable-prefix-caching``, ``--port``, ...).
"""
from __future__ import annotations

import argparse
import difflib
import math
import re
import shlex

from .errors import ConfigError, from_argparse
from .policy import NoOffload, Policy, Prefetch, VllmCopy, VllmUva

DISABLE_UVA = "VLLM_WEIGHT_OFFLOADING_DISABLE_UVA"
KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3", "fp8_e5m2")  # vLLM's --kv-cache-dtype values modelled


def _finite(text: str) -> float:
    v = float(text)
    if not math.isfinite(v):
        raise ValueError(text)
    return v


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse would exit; a bad flag is a ConfigError like any other input
        raise from_argparse(message, prefix="--vllm ")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="vllm", add_help=False, allow_abbrev=False)
    p.add_argument("--cpu-offload-gb", type=_finite, default=0.0)
    p.add_argument("--cpu-offload-params", default="")
    p.add_argument("--offload-backend", choices=["auto", "uva", "prefetch"], default="auto")
    p.add_argument("--offload-group-size", type=int, default=0)
    p.add_argument("--offload-num-in-group", type=int, default=None)
    p.add_argument("--offload-prefetch-step", type=int, default=1)
    p.add_argument("--offload-params", default="")
    return p


def _engine_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="vllm", add_help=False, allow_abbrev=False)
    p.add_argument("--tensor-parallel-size", "-tp", type=int, dest="tensor_parallel")
    p.add_argument("--pipeline-parallel-size", "-pp", type=int, dest="pipeline_parallel")
    p.add_argument("--gpu-memory-utilization", type=_finite, dest="gpu_memory_utilization")
    p.add_argument("--max-model-len", type=int, dest="max_model_len")
    p.add_argument("--max-num-seqs", type=int, dest="max_num_seqs")
    p.add_argument("--max-num-batched-tokens", type=int, dest="max_num_batched_tokens")
    p.add_argument("--block-size", type=int, dest="block_size")
    p.add_argument("--enable-chunked-prefill", action=argparse.BooleanOptionalAction, dest="chunked_prefill")
    p.add_argument("--kv-cache-dtype", choices=KV_CACHE_DTYPES, dest="kv_cache_dtype")
    return p


def _argv(args: str | list[str]) -> tuple[list[str], dict[str, str]]:
    """(flags, environment) of a command line that may start with NAME=VALUE assignments."""
    if isinstance(args, str):
        try:
            argv = shlex.split(args)
        except ValueError as e:  # an unclosed quote
            raise ConfigError("--vllm", args, f"a shell-quoted command line ({e})") from None
    else:
        argv = list(args)
    env = {}
    while argv and "=" in argv[0] and not argv[0].startswith("-"):
        k, _, v = argv.pop(0).partition("=")
        env[k] = v
    # vLLM reads --cpu_offload_gb as --cpu-offload-gb: underscores in a flag's name (before any '=' or '.')
    # become dashes (FlexibleArgumentParser.parse_args, vllm/utils/argparse_utils.py)
    argv = [re.sub(r"(?<=^--)[^.=]*", lambda m: m.group(0).replace("_", "-"), t) if t.startswith("--") else t
            for t in argv]
    return argv, env


def _modelled() -> list[str]:
    return sorted({o for p in (_parser(), _engine_parser()) for a in p._actions for o in a.option_strings})


def unmodelled_flags(args: str | list[str]) -> list[str]:
    """The flags of a vLLM command line this tool does not model (in order, once each); a flag that looks
    like a misspelling of a modelled one, or an unknown offload flag, is a ConfigError instead."""
    modelled, out = _modelled(), []
    for tok in _argv(args)[0]:
        if not tok.startswith("-") or re.fullmatch(r"-[\d.]+(e-?\d+)?", tok):  # a value or a negative number
            continue
        name = tok.split("=", 1)[0]
        if name in modelled or name in out:
            continue
        # a prefix of a modelled flag: vLLM's argparse may take it as an abbreviation, or refuse it as
        # ambiguous; either way this tool asks for the whole name rather than guess
        near = [m for m in modelled if m.startswith(name) and len(name) > 3]
        near = near or difflib.get_close_matches(name, modelled, n=1, cutoff=0.85)
        if near or "offload" in name:
            hint = f"did you mean {near[0]}?" if near else "one of " + ", ".join(m for m in modelled if "offload" in m)
            raise ConfigError("--vllm", name, f"a vLLM flag ({hint})")
        out.append(name)
    return out


def engine_from_vllm(args: str | list[str]) -> dict:
    """The engine settings a vLLM command line sets (EngineConfig field names, plus ``kv_cache_dtype``);
    flags it does not set are left out, so the caller's defaults stand."""
    unmodelled_flags(args)  # misspellings are errors
    a, _ = _engine_parser().parse_known_args(_argv(args)[0])
    return {k: v for k, v in vars(a).items() if v is not None}


def _names(csv: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in csv.split(",") if x.strip())


def policy_from_vllm(args: str | list[str], env: dict[str, str] | None = None) -> Policy:
    """The Policy a vLLM command line deploys (``args`` may start with NAME=VALUE environment
    assignments, like a shell line). Flags other than the offload ones are ignored (see unmodelled_flags);
    a misspelled offload flag is an error."""
    argv, line_env = _argv(args)  # leading NAME=VALUE: environment
    unmodelled_flags(argv)  # misspellings are errors
    env = {**(env or {}), **line_env}
    a, _ = _parser().parse_known_args(argv)
    if a.cpu_offload_gb < 0:
        raise ConfigError("--cpu-offload-gb", a.cpu_offload_gb, ">= 0")
    backend = a.offload_backend
    if backend == "auto":
        backend = "prefetch" if a.offload_group_size > 0 else "uva"
    if backend == "prefetch":
        g, n, s = a.offload_group_size, 1 if a.offload_num_in_group is None else a.offload_num_in_group, \
            a.offload_prefetch_step
        if g < 1:
            raise ConfigError("--offload-group-size", g, ">= 1 with --offload-backend prefetch")
        if n < 1 or n > g:
            raise ConfigError("--offload-num-in-group", n, f"in [1, --offload-group-size={g}]")
        if s < 1:
            raise ConfigError("--offload-prefetch-step", s, ">= 1 when prefetch offloading is enabled")
        return Prefetch(g, n, s, params=_names(a.offload_params), wrap=True)
    if a.offload_num_in_group is not None and a.offload_group_size == 0:
        raise ConfigError("--offload-num-in-group", a.offload_num_in_group,
                          "no value without --offload-group-size (prefetch offloading is off)")
    if a.cpu_offload_gb == 0:
        return NoOffload()
    params = _names(a.cpu_offload_params)
    if env.get(DISABLE_UVA, "0") not in ("", "0"):
        return VllmCopy(a.cpu_offload_gb, params=params)
    return VllmUva(a.cpu_offload_gb, params=params)


def vllm_args(policy: Policy) -> tuple[list[str], dict[str, str]]:
    """The vLLM flags (and environment) that deploy ``policy`` (a Prefetch deploys as vLLM's prefetch
    backend, which also prefetches across steps: ``policy_from_vllm`` gives it back with wrap=True)."""
    if isinstance(policy, NoOffload):
        return [], {}
    if isinstance(policy, Prefetch):
        out = ["--offload-backend", "prefetch", "--offload-group-size", str(policy.group),
               "--offload-num-in-group", str(policy.per_group), "--offload-prefetch-step", str(policy.slots)]
        return out + (["--offload-params", ",".join(policy.params)] if policy.params else []), {}
    out = ["--cpu-offload-gb", str(policy.cpu_offload_gb)]
    out += ["--cpu-offload-params", ",".join(policy.params)] if policy.params else []
    if isinstance(policy, VllmCopy):
        return out, {DISABLE_UVA: "1"}
    return out + ["--offload-backend", "uva"], {}


def format_vllm(policy: Policy, engine=None) -> str:
    """The command-line fragment, environment first: ``VLLM_...=1 vllm serve MODEL --cpu-offload-gb 8``;
    with an EngineConfig, its tensor and pipeline parallel sizes too (when above 1)."""
    args, env = vllm_args(policy)
    par = []
    for flag, n in (("--tensor-parallel-size", getattr(engine, "tensor_parallel", 1)),
                    ("--pipeline-parallel-size", getattr(engine, "pipeline_parallel", 1))):
        par += [flag, str(n)] if n > 1 else []
    return " ".join([*(f"{k}={v}" for k, v in env.items()), "vllm serve MODEL", *par, *args])
