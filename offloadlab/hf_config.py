"""Models given as a Hugging Face ``config.json`` (or a directory holding one).

Dense decoder shapes of the Llama family as vLLM builds them: Llama, Mistral, Qwen2 and Qwen3 (GQA,
an explicit ``head_dim``, Qwen2's q/k/v biases, Qwen3's per-head q/k RMSNorms, tied embeddings).
What the simulator does not model is refused with one line naming the field: mixture-of-experts
layers, sliding-window attention, quantized weights.
"""
from __future__ import annotations

from pathlib import Path

from .catalog import get_model
from .errors import ConfigError
from .fileio import read_json_object
from .specs import ModelSpec

# architecture -> (q/k/v projections carry a bias, q/k RMSNorm per head), as vLLM's model files build them
# (vllm/model_executor/models/llama.py, mistral via llama.py, qwen2.py, qwen3.py)
ARCHITECTURES = {
    "LlamaForCausalLM": (False, False),
    "MistralForCausalLM": (False, False),
    "Qwen2ForCausalLM": (True, False),
    "Qwen3ForCausalLM": (False, True),
}
MOE_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_intermediate_size", "num_experts_per_tok")
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "half": 2, "float32": 4, "float": 4}


def _read(path: Path) -> tuple[dict, Path]:
    f = path / "config.json" if path.is_dir() else path
    if not f.is_file():
        raise ConfigError("--model", str(path), "a catalog name, a config.json, or a directory holding one")
    return read_json_object(f, "config.json", "config.json"), f


def model_from_hf_config(path: str | Path, name: str | None = None) -> ModelSpec:
    """The ModelSpec of a Hugging Face config.json (or a directory holding one)."""
    cfg, f = _read(Path(path))
    src = str(f)
    cfg = {**cfg.get("text_config", {}), **cfg} if isinstance(cfg.get("text_config"), dict) else cfg
    archs = cfg.get("architectures") or []
    moe = [k for k in MOE_KEYS if cfg.get(k)]
    if moe or any("moe" in a.lower() or "mixtral" in a.lower() for a in archs):
        field, value = (moe[0], cfg[moe[0]]) if moe else ("architectures", archs)
        raise ConfigError(field, value, "a dense model: mixture-of-experts layers (expert weights, router, "
                          "expert parallelism) are not modelled", source=src)
    arch = next((a for a in archs if a in ARCHITECTURES), None)
    if arch is None:
        raise ConfigError("architectures", archs, f"one of {sorted(ARCHITECTURES)}", source=src)
    bias, qk_norm = ARCHITECTURES[arch]
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size"):
        if not isinstance(cfg.get(key), int) or isinstance(cfg.get(key), bool):
            raise ConfigError(key, cfg.get(key), "an integer (a dense decoder's config.json has it)", source=src)
    if cfg.get("quantization_config"):
        method = cfg["quantization_config"].get("quant_method") if isinstance(cfg["quantization_config"], dict) else None
        raise ConfigError("quantization_config", method or cfg["quantization_config"],
                          "none: quantized weights are not modelled (use a catalog entry with weight_bytes)", source=src)
    window = cfg.get("sliding_window")
    if window and cfg.get("use_sliding_window", True):
        raise ConfigError("sliding_window", window, "null: sliding-window attention is not modelled", source=src)
    heads = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    dtype = str(cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16").replace("torch.", "")
    if dtype not in DTYPE_BYTES:
        raise ConfigError("torch_dtype", dtype, f"one of {sorted(DTYPE_BYTES)}", source=src)
    if name is None:
        stem = cfg.get("_name_or_path") or (f.parent.name if f.name == "config.json" else f.stem)
        name = str(stem).rstrip("/").split("/")[-1].lower()
    return ModelSpec(
        name, layers=cfg["num_hidden_layers"], hidden=cfg["hidden_size"], heads=heads,
        kv_heads=cfg.get("num_key_value_heads") or heads, head_dim=head_dim, intermediate=cfg["intermediate_size"],
        vocab=cfg["vocab_size"], tied_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        weight_bytes=DTYPE_BYTES[dtype], kv_bytes=DTYPE_BYTES[dtype],
        max_context=int(cfg.get("max_position_embeddings") or 131072), qkv_bias=bias, qk_norm=qk_norm)


def model_from_arg(arg: str | ModelSpec) -> ModelSpec:
    """``--model``: a catalog name, or a path to a config.json or a directory holding one."""
    if isinstance(arg, ModelSpec):
        return arg
    p = Path(arg)
    if p.exists() or str(arg).endswith(".json"):
        return model_from_hf_config(p)
    return get_model(arg)
