"""vLLM's offload flags in and out: a deployment's command line <-> a Policy (and its engine flags).

Flags (vLLM >= 0.17; vllm/config/offload.py): ``--cpu-offload-gb G`` with
``--cpu-offload-params a b`` (UVA by default, the 0.7 copy path when
``VLLM_WEIGHT_OFFLOADING_DISABLE_UVA=1``), ``--offload-backend {auto,uva,prefetch}``, and for
prefetch ``--offload-group-size g --offload-num-in-group n --offload-prefetch-step s
--offload-params a b``. ``auto`` means prefetch when a group size is set, else UVA when
``--cpu-offload-gb`` > 0 (vllm/model_executor/offloader/base.py, ``create_offloader``).
Combinations vLLM rejects are rejected here too, with the same reasons.

Parameter names are space-separated: both fields are ``set[str]`` in vllm/config/offload.py and
vllm/engine/arg_utils.py turns a set-typed field into ``nargs="+"`` (``collection_to_kwargs``).
``--offload-params a,b`` is ONE name to vLLM, which matches no parameter segment, so nothing is
offloaded: it is rejected here with that explanation.

Model runner (vllm/config/vllm.py, ``use_v2_model_runner`` / ``_is_default_v2_model_runner_model``):
from vLLM 0.25 the V2 model runner is the default for every dense (non-MoE) model, from 0.29 for
all models, and it never installs the weight offloader (vllm/v1/worker/gpu/model_runner.py has no
``set_offloader`` call; vllm issues #51396, #56283, fix PR #48468 open), so ``--cpu-offload-gb`` and
the prefetch flags silently do nothing there. Deploy lines therefore start with
``VLLM_USE_V2_MODEL_RUNNER=0`` (the V1 runner, vllm/v1/worker/gpu_model_runner.py, calls
``set_offloader(create_offloader(...))``); for a version before 0.25 (``vllm_version``) they leave it
out, as the V1 runner is the default there. A line with ``VLLM_USE_V2_MODEL_RUNNER=1`` and offload
flags is rejected, and so is one without ``=0`` when a ``vllm_version`` >= 0.25 is given.

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
import math
import re
import shlex
from functools import lru_cache

from .errors import ConfigError, from_argparse
from .policy import NoOffload, Policy, Prefetch, VllmCopy, VllmUva
from .specs import KV_CACHE_DTYPES as _KV_DTYPES

DISABLE_UVA = "VLLM_WEIGHT_OFFLOADING_DISABLE_UVA"
DISABLE_PIN = "VLLM_WEIGHT_OFFLOADING_DISABLE_PIN_MEMORY"  # vllm/model_executor/offloader/base.py should_pin_memory
V2_RUNNER = "VLLM_USE_V2_MODEL_RUNNER"
#: First vLLM version whose V2 model runner (which installs no offloader) is the default for dense
#: models (vllm/config/vllm.py ``_is_default_v2_model_runner_model``: ``... or not model_config.is_moe``).
V2_RUNNER_DEFAULT_SINCE = (0, 25)
#: First vLLM version with the prefetch backend (vllm/model_executor/offloader/prefetch.py, PR #29941).
PREFETCH_SINCE = (0, 17)
KV_CACHE_DTYPES = tuple(_KV_DTYPES)  # vLLM's --kv-cache-dtype values modelled (specs.KV_CACHE_DTYPES)


def _finite(text: str) -> float:
    v = float(text)
    if not math.isfinite(v):
        raise ValueError(text)
    return v


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse would exit; a bad flag is a ConfigError like any other input
        raise from_argparse(message, prefix="--vllm ")


@lru_cache(maxsize=1)  # parse_known_args leaves a parser as it was: build each once
def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="vllm", add_help=False, allow_abbrev=False)
    p.add_argument("--cpu-offload-gb", type=_finite, default=0.0)
    p.add_argument("--cpu-offload-params", nargs="+", default=[])  # set[str]: nargs="+" (arg_utils.py)
    p.add_argument("--offload-backend", choices=["auto", "uva", "prefetch"], default="auto")
    p.add_argument("--offload-group-size", type=int, default=0)
    p.add_argument("--offload-num-in-group", type=int, default=None)
    p.add_argument("--offload-prefetch-step", type=int, default=1)
    p.add_argument("--offload-params", nargs="+", default=[])
    return p


@lru_cache(maxsize=1)
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


@lru_cache(maxsize=1)
def _modelled() -> tuple[str, ...]:
    return tuple(sorted({o for p in (_parser(), _engine_parser()) for a in p._actions for o in a.option_strings}))


def unmodelled_flags(args: str | list[str]) -> list[str]:
    """The flags of a vLLM command line this tool does not model (in order, once each); a flag that looks
    like a misspelling of a modelled one, or an unknown offload flag, is a ConfigError instead."""
    modelled, out = _modelled(), []  # (a tuple: shared by every call)
    for tok in _argv(args)[0]:
        if not tok.startswith("-") or re.fullmatch(r"-[\d.]+(e-?\d+)?", tok):  # a value or a negative number
            continue
        name = tok.split("=", 1)[0]
        if name in modelled or name in out:
            continue
        # a prefix of a modelled flag: vLLM's argparse may take it as an abbreviation, or refuse it as
        # ambiguous; either way this tool asks for the whole name rather than guess
        near = [m for m in modelled if m.startswith(name) and len(name) > 3]
        if not near:
            import difflib  # only to name the flag meant

            near = difflib.get_close_matches(name, modelled, n=1, cutoff=0.85)
        if near or "offload" in name:
            hint = f"did you mean {near[0]}?" if near else "one of " + ", ".join(m for m in modelled if "offload" in m)
            raise ConfigError("--vllm", name, f"a vLLM flag ({hint})")
        out.append(name)
    return out


def engine_from_vllm(args: str | list[str]) -> dict:
    """The engine settings a vLLM command line sets (EngineConfig field names);
    flags it does not set are left out, so the caller's defaults stand."""
    unmodelled_flags(args)  # misspellings are errors
    a, _ = _engine_parser().parse_known_args(_argv(args)[0])
    return {k: v for k, v in vars(a).items() if v is not None}


def _names(flag: str, names: list[str]) -> tuple[str, ...]:
    """vLLM's parameter-name set from its space-separated values (argparse ``nargs="+"``)."""
    for n in names:
        if "," in n:
            raise ConfigError(flag, n, "space-separated parameter names (vLLM reads a comma list as one name, "
                              "which matches no parameter: nothing would be offloaded)")
    return tuple(dict.fromkeys(names))  # a set in vLLM: duplicates collapse, order kept for labels


def parse_version(v) -> tuple[int, int, int] | None:
    """``"0.19.0"``, ``"v0.7.3"``, ``"0.10.1.dev3+g..."`` -> (major, minor, patch), the one reading of a vLLM
    version (compared with (0, 25) and the like as tuples); None stays None (version unknown)."""
    if v is None:
        return None
    m = re.match(r"^v?(\d+)\.(\d+)(?:\.(\d+))?", str(v).strip())
    if not m:
        raise ConfigError("vllm_version", v, "a vLLM version such as 0.19.0")
    return int(m.group(1)), int(m.group(2)), int(m.group(3) or 0)


def _flag(env: dict[str, str], name: str) -> bool:
    return env.get(name, "0").strip().lower() not in ("", "0", "false")


def _check_prefetch_version(field: str, value, version, what: str = "the prefetch backend") -> None:
    """vLLM's prefetch offload backend exists from PREFETCH_SINCE on; an unknown version passes."""
    v = parse_version(version)
    if v is not None and v < PREFETCH_SINCE:
        raise ConfigError(field, value, f"vLLM >= {'.'.join(map(str, PREFETCH_SINCE))} for {what} "
                          f"(this is for vLLM {version})")


def _check_runner(policy: Policy, env: dict[str, str], version) -> Policy:
    """vLLM's V2 model runner installs no offloader: offload flags then do nothing (see module doc)."""
    if isinstance(policy, NoOffload):
        return policy
    v = parse_version(version)
    if isinstance(policy, Prefetch):
        _check_prefetch_version("--offload-backend", "prefetch", version)
    if V2_RUNNER in env and _flag(env, V2_RUNNER):
        raise ConfigError(V2_RUNNER, env[V2_RUNNER], "0 with offload flags: vLLM's V2 model runner installs no "
                          "weight offloader, so nothing would be offloaded (vllm#51396)")
    if V2_RUNNER not in env and v is not None and v >= V2_RUNNER_DEFAULT_SINCE:
        raise ConfigError(V2_RUNNER, None, f"0 with offload flags on vLLM {version}: its default V2 model runner "
                          "installs no weight offloader for dense models, so nothing would be offloaded (vllm#51396)")
    return policy


def policy_from_vllm(args: str | list[str], env: dict[str, str] | None = None, vllm_version=None) -> Policy:
    """The Policy a vLLM command line deploys (``args`` may start with NAME=VALUE environment
    assignments, like a shell line). Flags other than the offload ones are ignored (see unmodelled_flags);
    a misspelled offload flag is an error. With ``vllm_version``, a line whose offload that version
    would silently ignore is rejected."""
    argv, line_env = _argv(args)  # leading NAME=VALUE: environment
    unmodelled_flags(argv)  # misspellings are errors
    env = {**(env or {}), **line_env}
    a, _ = _parser().parse_known_args(argv)
    if a.cpu_offload_gb < 0:
        raise ConfigError("--cpu-offload-gb", a.cpu_offload_gb, ">= 0")
    backend = a.offload_backend
    if backend == "auto":  # vllm/model_executor/offloader/base.py create_offloader
        backend = "prefetch" if a.offload_group_size > 0 else "uva"
    if backend == "prefetch":
        # vllm/config/offload.py validate_offload_config: n <= g and s >= 1 once prefetch is on
        g, n, s = a.offload_group_size, 1 if a.offload_num_in_group is None else a.offload_num_in_group, \
            a.offload_prefetch_step
        if g < 1:
            raise ConfigError("--offload-group-size", g, ">= 1 with --offload-backend prefetch")
        if n < 1 or n > g:
            raise ConfigError("--offload-num-in-group", n, f"in [1, --offload-group-size={g}]")
        if s < 1:
            raise ConfigError("--offload-prefetch-step", s, ">= 1 when prefetch offloading is enabled")
        pol = Prefetch(g, n, s, params=_names("--offload-params", a.offload_params), wrap=True,
                       pin_memory=not _flag(env, DISABLE_PIN))
        return _check_runner(pol, env, vllm_version)
    # --offload-num-in-group without a group size: vLLM validates it only when prefetch is on
    # (vllm/config/offload.py), so it is accepted and ignored, like the other prefetch fields
    if a.offload_num_in_group is not None and a.offload_num_in_group < 1:
        raise ConfigError("--offload-num-in-group", a.offload_num_in_group, ">= 1")  # Field(ge=1)
    if a.cpu_offload_gb == 0:
        return NoOffload()
    params, pin = _names("--cpu-offload-params", a.cpu_offload_params), not _flag(env, DISABLE_PIN)
    if _flag(env, DISABLE_UVA):
        return _check_runner(VllmCopy(a.cpu_offload_gb, params=params, pin_memory=pin), env, vllm_version)
    return _check_runner(VllmUva(a.cpu_offload_gb, params=params, pin_memory=pin), env, vllm_version)


def vllm_args(policy: Policy, vllm_version=None) -> tuple[list[str], dict[str, str]]:
    """The vLLM flags (and environment) that deploy ``policy`` (a Prefetch deploys as vLLM's prefetch
    backend, which also prefetches across steps: ``policy_from_vllm`` gives it back with wrap=True).

    Offload policies get ``VLLM_USE_V2_MODEL_RUNNER=0`` unless ``vllm_version`` is older than 0.25
    (see the module doc: the V2 runner ignores offload flags)."""
    if isinstance(policy, NoOffload):
        return [], {}
    v = parse_version(vllm_version)
    env = {} if v is not None and v < V2_RUNNER_DEFAULT_SINCE else {V2_RUNNER: "0"}
    if not policy.pin_memory:
        env[DISABLE_PIN] = "1"
    if isinstance(policy, Prefetch):
        _check_prefetch_version("vllm_version", vllm_version, vllm_version, policy.label)
        out = ["--offload-backend", "prefetch", "--offload-group-size", str(policy.group),
               "--offload-num-in-group", str(policy.per_group), "--offload-prefetch-step", str(policy.slots)]
        return out + (["--offload-params", *policy.params] if policy.params else []), env
    out = ["--cpu-offload-gb", str(policy.cpu_offload_gb)]
    out += ["--cpu-offload-params", *policy.params] if policy.params else []
    if isinstance(policy, VllmCopy):
        return out, {**env, DISABLE_UVA: "1"}
    return out + ["--offload-backend", "uva"], env


def slot_race(policy: Policy, layers: int) -> str | None:
    """Why vLLM's prefetch backend would compute with the wrong weights for ``policy`` on a stage of
    ``layers`` layers, or None. It binds offloaded layer m to slot m % s and, after layer i, starts
    the next step's copy of layer (i + s) % n (vllm/model_executor/offloader/prefetch.py), which lands
    in a slot a later layer of the same step still reads when s < n and s does not divide n. This
    project's schedule waits for the slot's last reader instead (offloadlab/schedule.py)."""
    if not isinstance(policy, Prefetch):
        return None
    n, s = policy.offloaded_count(layers), policy.slots
    if s < n and n % s:
        return (f"--offload-prefetch-step {s} does not divide the {n} offloaded layers: vLLM's prefetch backend "
                f"would overwrite a staging slot before its layer has read it (use a step dividing {n})")
    return None


def format_vllm(policy: Policy, engine=None, vllm_version=None) -> str:
    """The command-line fragment, environment first:
    ``VLLM_USE_V2_MODEL_RUNNER=0 vllm serve MODEL --cpu-offload-gb 8.0 --offload-backend uva``;
    with an EngineConfig, its tensor and pipeline parallel sizes too (when above 1)."""
    args, env = vllm_args(policy, vllm_version)
    par = []
    for flag, n in (("--tensor-parallel-size", getattr(engine, "tensor_parallel", 1)),
                    ("--pipeline-parallel-size", getattr(engine, "pipeline_parallel", 1))):
        par += [flag, str(n)] if n > 1 else []
    return " ".join([*(f"{k}={v}" for k, v in env.items()), "vllm serve MODEL", *par, *map(shlex.quote, args)])
