"""A compact Llama decoder in the style of gpt-fast's model.py, built from a ModelSpec.

Shapes: B batch, T new tokens, S cache slots, H query heads, KV key/value heads, D head dim,
E hidden, F intermediate (MLP), V vocab.

Parameters are named and fused as in ``ModelSpec.layer_param_shapes`` (vLLM's layout):
``self_attn.qkv_proj``, ``self_attn.o_proj``, ``mlp.gate_up_proj``, ``mlp.down_proj``,
``input_layernorm``, ``post_attention_layernorm``. A layer's forward takes its weights as an
explicit tuple in that order, so the offload code (offload.py) can hand it resident parameters,
fresh device copies, or views into a staging buffer; the math is the same in every case, which is
why an offloaded model's outputs equal the resident model's bit for bit.

Batches are left-padded: every sequence writes its new tokens at the same cache index, so one
forward step has one shape (B, T, C) -- the simulator's StepShape.uniform -- and padded keys are
masked out.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from offloadlab.errors import ConfigError
from offloadlab.specs import ModelSpec

_SDPA_GQA = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 5)


@dataclass(frozen=True)
class Arch:
    """What a Llama checkpoint's config.json adds to the ModelSpec's shapes (defaults: Llama 3.1)."""

    rope_theta: float = 500000.0
    norm_eps: float = 1e-5
    rope_scaling: dict | None = field(default=None, hash=False)  # HF "llama3" rope_scaling, or None

    @classmethod
    def from_hf_config(cls, cfg: dict) -> "Arch":
        scaling = cfg.get("rope_scaling")
        if scaling is not None and scaling.get("rope_type", scaling.get("type")) not in ("llama3", "default"):
            raise ConfigError("rope_scaling.rope_type", scaling.get("rope_type", scaling.get("type")),
                              "'llama3', 'default' or no rope_scaling")
        return cls(float(cfg.get("rope_theta", 10000.0)), float(cfg.get("rms_norm_eps", 1e-5)),
                   scaling if scaling and scaling.get("rope_type", scaling.get("type")) == "llama3" else None)


# ----------------------------------------------------------------------------------------------
# KV cache and per-step attention inputs


class KVCache:
    """Keys and values of every layer: ``k[i], v[i]`` of shape (B, KV, S, D).

    ``pad[b]`` left-padding tokens of sequence b; ``length`` slots written so far (the same for
    every sequence). ``shared=True`` gives all layers one buffer: the timings are the same and a
    benchmark of B=256 x 2k context fits; the values are then meaningless.
    """

    def __init__(self, spec: ModelSpec, batch: int, slots: int, device, dtype, pad=None, shared: bool = False):
        assert batch >= 1 and slots >= 1, f"need batch >= 1 and slots >= 1, got {batch}, {slots}"
        shape = (batch, spec.kv_heads, slots, spec.head_dim)
        n = 1 if shared else spec.layers
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n)]
        if shared:
            self.k, self.v = self.k * spec.layers, self.v * spec.layers
        self.pad = torch.zeros(batch, dtype=torch.long, device=device) if pad is None else pad.to(device)
        assert self.pad.shape == (batch,), f"pad must have shape ({batch},), got {tuple(self.pad.shape)}"
        self.padded = bool((self.pad > 0).any())
        self.batch, self.slots, self.length = batch, slots, 0

    @staticmethod
    def nbytes(spec: ModelSpec, batch: int, slots: int, shared: bool = False) -> int:
        return batch * slots * spec.kv_bytes_per_token_layer * (1 if shared else spec.layers)


@dataclass
class StepInputs:
    """What every layer of one forward step shares: where to write, RoPE angles, the mask."""

    start: int  # first cache slot written by this step
    cos: torch.Tensor  # (B, 1, T, D) float32
    sin: torch.Tensor
    mask: torch.Tensor | None  # (B, 1, T, start+T) bool, True = attend; None with is_causal
    is_causal: bool


def rope_frequencies(head_dim: int, arch: Arch) -> torch.Tensor:
    """Inverse frequencies (D/2,), with Llama 3's long-context scaling when ``arch`` has it."""
    inv = 1.0 / (arch.rope_theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    s = arch.rope_scaling
    if s:  # as in HF's _compute_llama3_parameters
        factor, lo, hi = s["factor"], s.get("low_freq_factor", 1.0), s.get("high_freq_factor", 4.0)
        old = s.get("original_max_position_embeddings", 8192)
        wavelen = 2 * math.pi / inv
        smooth = ((old / wavelen) - lo) / (hi - lo)
        scaled = torch.where(wavelen > old / lo, inv / factor, inv)
        mid = (1 - smooth) * scaled / factor + smooth * scaled
        inv = torch.where((wavelen >= old / hi) & (wavelen <= old / lo), mid, scaled)
    return inv.float()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """HF's rotate-half convention (so HF checkpoints load without permuting q/k)."""
    return (x.float() * cos + rotate_half(x.float()) * sin).type_as(x)


# ----------------------------------------------------------------------------------------------
# Modules


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim, device=device, dtype=dtype), requires_grad=False)

    def forward(self, x: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        return rms_norm(x, self.weight if weight is None else weight, self.eps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.type_as(x)


def _linear(i: int, o: int, device, dtype) -> nn.Linear:
    lin = nn.Linear(i, o, bias=False, device=device, dtype=dtype)
    lin.weight.requires_grad_(False)
    return lin


class Attention(nn.Module):
    def __init__(self, spec: ModelSpec, device, dtype):
        super().__init__()
        q, kv = spec.heads * spec.head_dim, spec.kv_heads * spec.head_dim
        self.qkv_proj = _linear(spec.hidden, q + 2 * kv, device, dtype)
        self.o_proj = _linear(q, spec.hidden, device, dtype)


class MLP(nn.Module):
    def __init__(self, spec: ModelSpec, device, dtype):
        super().__init__()
        self.gate_up_proj = _linear(spec.hidden, 2 * spec.intermediate, device, dtype)
        self.down_proj = _linear(spec.intermediate, spec.hidden, device, dtype)


class DecoderLayer(nn.Module):
    """One block: x + attn(norm(x)), then + mlp(norm(x)). Weights come as a tuple (see module doc)."""

    def __init__(self, spec: ModelSpec, arch: Arch, device=None, dtype=None):
        super().__init__()
        self.spec, self.eps = spec, arch.norm_eps
        self.self_attn = Attention(spec, device, dtype)
        self.mlp = MLP(spec, device, dtype)
        self.input_layernorm = RMSNorm(spec.hidden, arch.norm_eps, device, dtype)
        self.post_attention_layernorm = RMSNorm(spec.hidden, arch.norm_eps, device, dtype)
        got = [(n, tuple(p.shape)) for n, p in self.named_parameters()]
        assert got == list(spec.layer_param_shapes), f"layer parameters {got} != ModelSpec's {spec.layer_param_shapes}"

    def weights(self) -> tuple[torch.Tensor, ...]:
        """This module's own parameters, in ``ModelSpec.layer_param_shapes`` order."""
        return tuple(p for _, p in self.named_parameters())

    def forward(self, x: torch.Tensor, step: StepInputs, k_cache: torch.Tensor, v_cache: torch.Tensor,
                w: tuple[torch.Tensor, ...] | None = None) -> torch.Tensor:
        s = self.spec
        qkv_w, o_w, gate_up_w, down_w, ln1_w, ln2_w = self.weights() if w is None else w
        B, T, E = x.size()
        H, KV, D = s.heads, s.kv_heads, s.head_dim
        end = step.start + T
        assert end <= k_cache.size(2), f"KV cache full: {end} slots needed, {k_cache.size(2)} allocated"

        # attention
        h = rms_norm(x, ln1_w, self.eps)
        q, k, v = F.linear(h, qkv_w).split([H * D, KV * D, KV * D], dim=-1)  # (B, T, H*D), (B, T, KV*D) x 2
        q = apply_rope(q.view(B, T, H, D).transpose(1, 2), step.cos, step.sin)  # (B, H, T, D)
        k = apply_rope(k.view(B, T, KV, D).transpose(1, 2), step.cos, step.sin)  # (B, KV, T, D)
        k_cache[:, :, step.start:end] = k
        v_cache[:, :, step.start:end] = v.view(B, T, KV, D).transpose(1, 2)
        keys, values = k_cache[:, :, :end], v_cache[:, :, :end]  # (B, KV, start+T, D)
        if _SDPA_GQA:
            y = F.scaled_dot_product_attention(q, keys, values, attn_mask=step.mask, is_causal=step.is_causal,
                                               enable_gqa=H != KV)
        else:  # torch < 2.5: repeat the KV heads
            rep = H // KV
            y = F.scaled_dot_product_attention(q, keys.repeat_interleave(rep, 1), values.repeat_interleave(rep, 1),
                                               attn_mask=step.mask, is_causal=step.is_causal)
        x = x + F.linear(y.transpose(1, 2).reshape(B, T, H * D), o_w)  # (B, T, E)

        # SwiGLU MLP
        gate, up = F.linear(rms_norm(x, ln2_w, self.eps), gate_up_w).chunk(2, dim=-1)  # (B, T, F) x 2
        return x + F.linear(F.silu(gate) * up, down_w)


class Resident:
    """The weight provider of a model whose layers all live on the device (see offload.py for others)."""

    mechanism = "none"

    def __init__(self, layers: nn.ModuleList):
        self.layers = layers

    def begin_step(self, tracer) -> None:
        pass

    def acquire(self, i: int, tracer) -> tuple[torch.Tensor, ...]:
        return self.layers[i].weights()

    def release(self, i: int, tracer) -> None:
        pass


class Transformer(nn.Module):
    """Embedding, ``spec.layers`` decoder layers, final norm and LM head (tied or not).

    Built on the ``meta`` device (no memory); ``weights.materialize`` or offload.build puts each
    tensor where its placement says. ``forward`` runs the layers through a weight provider
    (``Resident`` by default) and a tracer (none by default).
    """

    def __init__(self, spec: ModelSpec, arch: Arch = Arch(), dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.spec, self.arch, self.dtype = spec, arch, dtype
        meta = torch.device("meta")
        self.embed_tokens = nn.Embedding(spec.vocab, spec.hidden, device=meta, dtype=dtype)
        self.embed_tokens.weight.requires_grad_(False)
        self.layers = nn.ModuleList(DecoderLayer(spec, arch, meta, dtype) for _ in range(spec.layers))
        self.norm = RMSNorm(spec.hidden, arch.norm_eps, meta, dtype)
        self.lm_head = None if spec.tied_embeddings else _linear(spec.hidden, spec.vocab, meta, dtype)
        self.provider = Resident(self.layers)
        self._rope = (torch.empty(0), torch.empty(0))

    @property
    def device(self) -> torch.device:
        """Where activations and the KV cache live (set by offload.build; else the embedding's)."""
        return getattr(self, "_device", None) or self.embed_tokens.weight.device

    # ---- per-step inputs ----
    def _rope_table(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin for positions 0..n-1, (n, D) float32, grown by doubling and kept."""
        cos, sin = self._rope
        if cos.size(0) < n or cos.device != self.device:
            m = max(n, 2 * cos.size(0), 256)
            inv = rope_frequencies(self.spec.head_dim, self.arch).to(self.device)
            ang = torch.outer(torch.arange(m, device=self.device, dtype=torch.float32), inv)  # (m, D/2)
            ang = torch.cat((ang, ang), dim=-1)  # (m, D)
            self._rope = cos, sin = ang.cos(), ang.sin()
        return cos, sin

    def step_inputs(self, cache: KVCache, T: int) -> StepInputs:
        start, end = cache.length, cache.length + T
        t = torch.arange(start, end, device=self.device)  # (T,) cache slots written
        pos = (t[None, :] - cache.pad[:, None]).clamp_(min=0)  # (B, T) token positions
        cos, sin = self._rope_table(end)
        cos, sin = cos[pos].unsqueeze(1), sin[pos].unsqueeze(1)  # (B, 1, T, D)
        if not cache.padded and (T == 1 or start == 0):
            return StepInputs(start, cos, sin, None, is_causal=T > 1)
        j = torch.arange(end, device=self.device)  # (start+T,) key slots
        causal = j[None, :] <= t[:, None]  # (T, start+T)
        real = j[None, :] >= cache.pad[:, None]  # (B, start+T): padding is never attended to...
        mask = (causal[None] & real[:, None]) | (j[None, :] == t[:, None])[None]  # ...except by itself
        return StepInputs(start, cos, sin, mask.unsqueeze(1), is_causal=False)  # (B, 1, T, start+T)

    # ---- forward ----
    def forward_layers(self, x: torch.Tensor, cache: KVCache, tracer=None) -> torch.Tensor:
        """Hidden states (B, T, E) through every decoder layer; appends T tokens to ``cache``."""
        from .tracer import NULL_TRACER

        tracer = tracer or NULL_TRACER
        B, T, E = x.size()
        assert E == self.spec.hidden and B == cache.batch, \
            f"x {tuple(x.shape)} vs hidden {self.spec.hidden}, batch {cache.batch}"
        step = self.step_inputs(cache, T)
        provider = self.provider
        provider.begin_step(tracer)
        for i, layer in enumerate(self.layers):
            h0 = tracer.host_now()
            w = provider.acquire(i, tracer)  # may copy, or wait for a prefetched copy
            c0 = tracer.stamp()
            x = layer(x, step, cache.k[i], cache.v[i], w)
            c1 = tracer.stamp()
            provider.release(i, tracer)  # may start the next prefetch into this layer's slot
            tracer.span("compute", "compute", i, c0, c1)
            tracer.host_span(i, h0)
        end_step = getattr(provider, "end_step", None)  # a prefetch ring may join its copy stream here
        if end_step is not None:
            end_step(tracer)
        cache.length += T
        return x

    def forward(self, tokens: torch.Tensor, cache: KVCache, tracer=None, all_logits: bool = False) -> torch.Tensor:
        """Token ids (B, T) -> logits (B, V) of the last position, float32 ((B, T, V) with all_logits)."""
        from .tracer import NULL_TRACER

        tracer = tracer or NULL_TRACER
        tracer.begin_step()
        c0 = tracer.stamp()
        x = self.embed_tokens(tokens)  # (B, T, E)
        tracer.span("compute", "compute", -1, c0, tracer.stamp(), name="embed")
        x = self.forward_layers(x, cache, tracer)
        c0 = tracer.stamp()
        if not all_logits:
            x = x[:, -1:]
        x = self.norm(x)
        logits = F.linear(x, self.embed_tokens.weight) if self.lm_head is None else self.lm_head(x)
        logits = logits.float()  # (B, T or 1, V)
        tracer.span("compute", "compute", self.spec.layers, c0, tracer.stamp(), name="lm_head")
        tracer.end_step()
        return logits if all_logits else logits[:, -1]
