"""Where weights come from: seeded random tensors, or a local Hugging Face Llama checkpoint.

A source hands out one layer at a time, fused as ``ModelSpec.layer_param_shapes`` says
(qkv_proj = [q; k; v], gate_up_proj = [gate; up]), so a model larger than GPU memory is never
whole on the device: offload.build puts each layer where its placement says as it arrives.

A checkpoint is checked against the ModelSpec (names, shapes, config.json) when it is opened,
before any tensor is read: a mismatch is a ConfigError naming the tensor, its shape and the
expected one.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch

from offloadlab.errors import ConfigError
from offloadlab.fileio import read_json_object
from offloadlab.specs import ModelSpec

from .model import Arch

INIT_STD = 0.02  # of every matrix; norm weights are 1 + 0.1 * N(0, 1)


class RandomWeights:
    """Seeded random weights: layer i depends only on (seed, i), so any placement gets the same numbers."""

    arch = None  # no opinion: the caller's Arch (default Llama 3.1) stands

    def __init__(self, spec: ModelSpec, dtype: torch.dtype, seed: int = 0):
        self.spec, self.dtype, self.seed = spec, dtype, seed

    def _gen(self, device: torch.device, stream: int) -> torch.Generator:
        return torch.Generator(device=device).manual_seed(self.seed * 1_000_003 + stream)

    def _tensor(self, shape, g, device) -> torch.Tensor:
        t = torch.empty(shape, device=device, dtype=self.dtype)
        return t.normal_(0.0, INIT_STD, generator=g) if len(shape) == 2 else t.normal_(1.0, 0.1, generator=g)

    def layer(self, i: int, device: torch.device) -> tuple[torch.Tensor, ...]:
        g = self._gen(device, i + 1)
        return tuple(self._tensor(shape, g, device) for _, shape in self.spec.layer_param_shapes)

    def embed(self, device) -> torch.Tensor:
        return self._tensor((self.spec.vocab, self.spec.hidden), self._gen(device, 0), device)

    def norm(self, device) -> torch.Tensor:
        return self._tensor((self.spec.hidden,), self._gen(device, -1), device)

    def lm_head(self, device) -> torch.Tensor | None:
        if self.spec.tied_embeddings:
            return None
        return self._tensor((self.spec.vocab, self.spec.hidden), self._gen(device, -2), device)


# HF Llama names of one layer, and how they fuse into ModelSpec's parameters
_HF_LAYER = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
             "mlp.up_proj", "mlp.down_proj", "input_layernorm", "post_attention_layernorm")
_CONFIG_FIELDS = {"hidden_size": "hidden", "num_hidden_layers": "layers", "num_attention_heads": "heads",
                  "num_key_value_heads": "kv_heads", "intermediate_size": "intermediate", "vocab_size": "vocab",
                  "head_dim": "head_dim", "tie_word_embeddings": "tied_embeddings"}


def hf_shapes(spec: ModelSpec, layers: int | None = None) -> dict[str, tuple[int, ...]]:
    """Every tensor name a Hugging Face Llama checkpoint of ``spec`` holds, with its shape."""
    E, F, V = spec.hidden, spec.intermediate, spec.vocab
    q, kv = spec.heads * spec.head_dim, spec.kv_heads * spec.head_dim
    per_layer = dict(zip(_HF_LAYER, ((q, E), (kv, E), (kv, E), (E, q), (F, E), (F, E), (E, F), (E,), (E,))))
    out = {"model.embed_tokens.weight": (V, E), "model.norm.weight": (E,)}
    if not spec.tied_embeddings:
        out["lm_head.weight"] = (V, E)
    for i in range(spec.layers if layers is None else layers):
        out.update({f"model.layers.{i}.{n}.weight": s for n, s in per_layer.items()})
    return out


class CheckpointWeights:
    """A local HF-layout Llama checkpoint: a directory of ``*.safetensors`` (+ ``config.json``) or one file.

    ``truncate=True`` accepts a checkpoint with more layers than ``spec.layers`` and reads the first ones.
    """

    def __init__(self, path: str | Path, spec: ModelSpec, dtype: torch.dtype, truncate: bool = False):
        try:
            from safetensors import safe_open
        except ImportError:
            raise ConfigError("checkpoint", str(path),
                              "the 'safetensors' package to read it (pip install safetensors)") from None
        self._open, self.spec, self.dtype, self.path = safe_open, spec, dtype, Path(path)
        p = self.path
        files = sorted(p.glob("*.safetensors")) if p.is_dir() else [p]
        if not files or not all(f.is_file() for f in files):
            raise ConfigError("checkpoint", str(p), "a .safetensors file or a directory holding some")
        self.arch = self._check_config(p / "config.json" if p.is_dir() else p.with_name("config.json"), truncate)
        self.where: dict[str, Path] = {}
        shapes: dict[str, tuple[int, ...]] = {}
        for f in files:
            with safe_open(str(f), framework="pt") as st:
                for name in st.keys():
                    self.where[name] = f
                    shapes[name] = tuple(st.get_slice(name).get_shape())
        self._check_shapes(shapes, truncate)

    def _check_config(self, cfg_path: Path, truncate: bool) -> Arch | None:
        if not cfg_path.is_file():
            return None
        cfg = read_json_object(cfg_path, "config.json", "Hugging Face config.json")
        for key, field in _CONFIG_FIELDS.items():
            if key not in cfg or (key == "head_dim" and cfg[key] is None):
                continue
            want = getattr(self.spec, field)
            ok = cfg[key] >= want if (field == "layers" and truncate) else cfg[key] == want
            if not ok:
                raise ConfigError(f"config.json {key}", cfg[key], f"{want} (ModelSpec {self.spec.name}.{field})",
                                  source=str(cfg_path))
        return Arch.from_hf_config(cfg)

    def _check_shapes(self, shapes: dict[str, tuple[int, ...]], truncate: bool) -> None:
        src = str(self.path)
        want = hf_shapes(self.spec)
        for name, shape in want.items():
            if name not in shapes:
                raise ConfigError(name, None, f"a tensor of shape {shape} (missing from the checkpoint)", source=src)
            if shapes[name] != shape:
                raise ConfigError(name, shapes[name], f"shape {shape} for ModelSpec {self.spec.name}", source=src)
        layers = {int(m.group(1)) for n in shapes if (m := re.match(r"model\.layers\.(\d+)\.", n))}
        extra = max(layers, default=-1) + 1
        if extra > self.spec.layers and not truncate:
            raise ConfigError("checkpoint layers", extra,
                              f"{self.spec.layers} (ModelSpec {self.spec.name}); truncate=True reads the first "
                              f"{self.spec.layers}", source=src)

    def _read(self, names: list[str], device) -> list[torch.Tensor]:
        out = []
        for n in names:
            with self._open(str(self.where[n]), framework="pt") as st:
                out.append(st.get_tensor(n).to(device=device, dtype=self.dtype))
        return out

    def layer(self, i: int, device) -> tuple[torch.Tensor, ...]:
        q, k, v, o, gate, up, down, ln1, ln2 = self._read([f"model.layers.{i}.{n}.weight" for n in _HF_LAYER], device)
        return torch.cat([q, k, v]), o, torch.cat([gate, up]), down, ln1, ln2

    def embed(self, device) -> torch.Tensor:
        return self._read(["model.embed_tokens.weight"], device)[0]

    def norm(self, device) -> torch.Tensor:
        return self._read(["model.norm.weight"], device)[0]

    def lm_head(self, device) -> torch.Tensor | None:
        return None if self.spec.tied_embeddings else self._read(["lm_head.weight"], device)[0]


def save_hf_checkpoint(model, path: str | Path) -> Path:
    """Write ``model`` (a built Transformer, any placement) as an HF-layout safetensors file (for tests
    and for sharing random weights)."""
    from safetensors.torch import save_file

    s = model.spec
    q, kv, F_ = s.heads * s.head_dim, s.kv_heads * s.head_dim, s.intermediate
    out = {"model.embed_tokens.weight": model.embed_tokens.weight, "model.norm.weight": model.norm.weight}
    if model.lm_head is not None:
        out["lm_head.weight"] = model.lm_head.weight
    for i, layer in enumerate(model.layers):
        qkv, o, gate_up, down, ln1, ln2 = layer.weights()
        parts = (*qkv.split([q, kv, kv]), o, *gate_up.split([F_, F_]), down, ln1, ln2)
        out.update({f"model.layers.{i}.{n}.weight": t for n, t in zip(_HF_LAYER, parts)})
    path = Path(path)
    save_file({k: v.detach().to("cpu").contiguous() for k, v in out.items()}, str(path))
    return path
