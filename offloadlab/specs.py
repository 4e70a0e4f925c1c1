"""The shared vocabulary's hardware and model descriptions.

Units inside are seconds, bytes, FLOP and FLOP/s; GB/ms appear only at the edges (printing, files).
Every derived quantity (bytes per layer, per KV token, FLOPs per step) is computed here, once,
and used by both the simulator and the runtime.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from .checks import check_int, check_positive, check_range
from .errors import ConfigError

GiB = 1024**3
GB = 1e9
ACT_BYTES = 2  # bytes per element of activations and hidden states (bf16/fp16): the one home of this width
# vLLM's --kv-cache-dtype values modelled (vllm/config/cache.py CacheDType); bytes per KV element, None:
# the model's own dtype
KV_CACHE_DTYPES = {"auto": None, "fp8": 1, "fp8_e4m3": 1, "fp8_e5m2": 1}


def _check_positive(obj, *names: str, integer: bool = False) -> None:
    for n in names:
        if integer:
            check_int(f"{type(obj).__name__}.{n}", getattr(obj, n), 1, expected="a positive integer")
        else:
            check_positive(f"{type(obj).__name__}.{n}", getattr(obj, n))


@dataclass(frozen=True)
class ModelSpec:
    """A Llama-style decoder: ``layers`` identical blocks of GQA attention and a SwiGLU MLP."""

    name: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied_embeddings: bool = False
    weight_bytes: float = 2.0  # bytes per parameter (bf16 = 2, fp8 = 1)
    kv_bytes: float = 2.0  # bytes per KV-cache element
    max_context: int = 131072
    tensor_parallel: int = 1  # > 1: this spec is one GPU's shard (see ``shard``)
    pipeline_parallel: int = 1  # > 1: this spec is one pipeline stage (see ``stages``)
    stage: int = 0  # which stage, 0-based
    qkv_bias: bool = False  # q/k/v projections carry a bias (Qwen2)
    qk_norm: bool = False  # an RMSNorm over each head's q and k (Qwen3)

    def __post_init__(self):
        _check_positive(self, "layers", "hidden", "heads", "kv_heads", "head_dim", "intermediate", "vocab",
                        "max_context", integer=True)
        _check_positive(self, "weight_bytes", "kv_bytes")
        if self.heads % self.kv_heads:
            raise ConfigError("ModelSpec.kv_heads", self.kv_heads, f"a divisor of heads={self.heads}")
        _check_positive(self, "tensor_parallel", "pipeline_parallel", integer=True)
        if not 0 <= self.stage < self.pipeline_parallel:
            raise ConfigError("ModelSpec.stage", self.stage, f"a stage in 0..{self.pipeline_parallel - 1}")

    # ---- parameters, in vLLM's order inside a decoder layer (fused qkv and gate_up) ----
    @property
    def layer_param_shapes(self) -> tuple[tuple[str, tuple[int, ...]], ...]:
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        bias = (("self_attn.qkv_proj.bias", (q + 2 * kv,)),) if self.qkv_bias else ()
        norms = ((("self_attn.q_norm.weight", (self.head_dim,)), ("self_attn.k_norm.weight", (self.head_dim,)))
                 if self.qk_norm else ())
        return (
            ("self_attn.qkv_proj.weight", (q + 2 * kv, self.hidden)),
            *bias,
            ("self_attn.o_proj.weight", (self.hidden, q)),
            *norms,
            ("mlp.gate_up_proj.weight", (2 * self.intermediate, self.hidden)),
            ("mlp.down_proj.weight", (self.hidden, self.intermediate)),
            ("input_layernorm.weight", (self.hidden,)),
            ("post_attention_layernorm.weight", (self.hidden,)),
        )

    @property
    def layer_param_bytes(self) -> tuple[int, ...]:
        """Bytes of each parameter of one layer, in ``layer_param_shapes`` order."""
        return tuple(int(math.prod(shape) * self.weight_bytes) for _, shape in self.layer_param_shapes)

    @property
    def layer_params(self) -> int:
        return sum(math.prod(s) for _, s in self.layer_param_shapes)

    @property
    def layer_matmul_params(self) -> int:
        """Parameters that take part in GEMMs (everything but the norms)."""
        return sum(math.prod(s) for _, s in self.layer_param_shapes if len(s) == 2)

    @property
    def layer_bytes(self) -> int:
        return sum(self.layer_param_bytes)

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def has_embedding(self) -> bool:
        return self.stage == 0

    @property
    def has_head(self) -> bool:
        """The final norm and LM head live on the last pipeline stage."""
        return self.stage == self.pipeline_parallel - 1

    @property
    def non_layer_params(self) -> int:
        """Embedding (first stage), LM head and final norm (last stage; a tied head is the embedding,
        held again by a last stage that is not also the first): never offloaded."""
        embed = self.embedding_params if self.has_embedding else 0
        head = 0
        if self.has_head:
            head = self.hidden + (0 if self.tied_embeddings and self.has_embedding else self.vocab * self.hidden)
        return embed + head

    @property
    def non_layer_bytes(self) -> int:
        return int(self.non_layer_params * self.weight_bytes)

    @property
    def params(self) -> int:
        return self.layers * self.layer_params + self.non_layer_params

    @property
    def weight_total_bytes(self) -> int:
        return self.layers * self.layer_bytes + self.non_layer_bytes

    # ---- KV cache ----
    @property
    def kv_bytes_per_token_layer(self) -> int:
        return int(2 * self.kv_heads * self.head_dim * self.kv_bytes)  # K and V

    @property
    def kv_bytes_per_token(self) -> int:
        return self.layers * self.kv_bytes_per_token_layer

    # ---- work of one layer ----
    def layer_linear_flops(self, tokens: int) -> float:
        """FLOPs of the four GEMMs of one layer for ``tokens`` new tokens."""
        return 2.0 * self.layer_matmul_params * tokens

    def layer_attention_flops(self, new: int, context: int) -> float:
        """Causal attention FLOPs (QK^T and PV) of one sequence with ``new`` tokens after ``context``."""
        # token j of the new ones attends to context + j + 1 keys
        keys = new * context + new * (new + 1) / 2
        return 4.0 * self.heads * self.head_dim * keys

    def activation_bytes_per_token(self) -> int:
        """Live activation bytes per batched token at the peak of one layer (residual, qkv, MLP)."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        elems = 2 * self.hidden + q + 2 * kv + 3 * self.intermediate
        return int(elems * ACT_BYTES)

    def hidden_state_bytes(self, tokens: int) -> int:
        """Bytes of ``tokens`` rows of hidden states (what an all-reduce or a pipeline send moves)."""
        return tokens * self.hidden * ACT_BYTES

    def replace(self, **changes) -> "ModelSpec":
        return dataclasses.replace(self, **changes)

    def with_kv_cache_dtype(self, dtype: str) -> "ModelSpec":
        """This model with vLLM's ``--kv-cache-dtype`` applied (``KV_CACHE_DTYPES``): "auto" keeps the
        model's own KV element size, fp8 stores one byte and names the model ``<name>+kv-fp8``."""
        if dtype not in KV_CACHE_DTYPES:
            raise ConfigError("kv_cache_dtype", dtype, "one of " + ", ".join(KV_CACHE_DTYPES))
        nbytes = KV_CACHE_DTYPES[dtype]
        if nbytes is None or (self.kv_bytes == nbytes and self.name.endswith("+kv-fp8")):
            return self
        return dataclasses.replace(self, name=f"{self.name}+kv-fp8", kv_bytes=nbytes)

    def shard(self, tp: int) -> "ModelSpec":
        """One GPU's part under tensor parallelism over ``tp`` GPUs, as vLLM splits a Llama:
        attention heads, MLP columns and the vocabulary (embedding, LM head) divided by ``tp``; KV
        heads divided too, or replicated (one per GPU) when there are fewer than ``tp``; norms whole."""
        check_int("tensor_parallel", tp, 1)
        if tp == 1:
            return self
        if self.tensor_parallel != 1 or self.pipeline_parallel != 1:
            raise ConfigError("tensor_parallel", tp, f"a split of a whole model, not of {self.name}, already a part")
        if self.heads % tp or self.intermediate % tp or (self.kv_heads >= tp and self.kv_heads % tp):
            raise ConfigError("tensor_parallel", tp, f"a divisor of {self.name}'s {self.heads} heads, "
                              f"{self.intermediate} MLP columns and {self.kv_heads} KV heads")
        return dataclasses.replace(self, name=f"{self.name}/tp{tp}", heads=self.heads // tp,
                                   kv_heads=max(self.kv_heads // tp, 1), intermediate=self.intermediate // tp,
                                   vocab=-(-self.vocab // tp), tensor_parallel=tp)

    def stages(self, pp: int) -> tuple["ModelSpec", ...]:
        """The ``pp`` pipeline stages, as vLLM splits the layers (``get_pp_indices``): evenly, the
        remainder one layer each to the stages before the last, from the second-to-last backwards
        (the last stage also runs the LM head). Apply to a whole model or to a tensor-parallel shard."""
        check_int("pipeline_parallel", pp, 1, self.layers, f"an integer in 1..{self.layers} (the layers of {self.name})")
        if pp == 1:
            return (self,)
        if self.pipeline_parallel != 1:
            raise ConfigError("pipeline_parallel", pp, f"a split of a whole model, not of {self.name}, already a stage")
        sizes = [self.layers // pp] * pp
        for i in range(2, self.layers % pp + 2):
            sizes[-i] += 1
        return tuple(dataclasses.replace(self, name=f"{self.name}/pp{pp}.{s}", layers=n, pipeline_parallel=pp, stage=s)
                     for s, n in enumerate(sizes))


@dataclass(frozen=True)
class HardwareSpec:
    """One GPU and its link to the host, from datasheets (or a user's file)."""

    name: str
    memory_bytes: float
    hbm_bw: float  # bytes/s
    peak_flops: float  # dense bf16 FLOP/s
    host_link_bw: float  # bytes/s per direction, spec figure
    host_link: str = "PCIe"
    h2d_efficiency: float = 0.82  # measured pinned H2D / spec (80-85% typical, see hardware.csv notes)
    host_link_latency: float = 10e-6  # seconds per transfer
    host_memory_bytes: float = 512 * GiB
    gpu_link: str = ""
    gpu_link_bw: float = 0.0
    gpus_per_node: int = 1
    gpus_per_host_link: int = 1  # GPUs behind one PCIe switch / socket link, sharing its bandwidth
    network_bw: float = 50 * GB  # bytes/s per GPU per direction between nodes (400 Gb/s InfiniBand NDR each)
    network_latency: float = 5e-6  # seconds per message between nodes
    # CUDA compute capability (8.0 A100, 8.9 Ada, 9.0 Hopper, 10.0 B200, 12.0 RTX Blackwell): which
    # attention kernels vLLM runs on it (sim/vllm_engine.attention_kernel); 0: not known (or not CUDA)
    compute_capability: float = 0.0
    note: str = field(default="", compare=False)

    def __post_init__(self):
        _check_positive(self, "memory_bytes", "hbm_bw", "peak_flops", "host_link_bw", "host_memory_bytes",
                        "network_bw")
        check_range("HardwareSpec.compute_capability", self.compute_capability, 0, 100,
                    "a CUDA compute capability such as 8.9 (0: not known)", high_open=True)
        check_range("HardwareSpec.h2d_efficiency", self.h2d_efficiency, 0, 1, "a number in (0, 1]", low_open=True)
        for f in ("host_link_latency", "network_latency"):
            check_range(f"HardwareSpec.{f}", getattr(self, f), 0, math.inf, "a number >= 0 seconds", high_open=True)
        _check_positive(self, "gpus_per_node", "gpus_per_host_link", integer=True)
        if self.gpus_per_host_link > self.gpus_per_node:
            raise ConfigError("HardwareSpec.gpus_per_host_link", self.gpus_per_host_link,
                              f"at most gpus_per_node={self.gpus_per_node} (a host link is inside one node)")
        for f in ("host_link", "gpu_link"):
            if not isinstance(getattr(self, f), str):
                raise ConfigError(f"HardwareSpec.{f}", getattr(self, f), "a name, e.g. 'PCIe Gen5 x16'")

    @property
    def h2d_bw(self) -> float:
        """Sustained pinned host->device bandwidth, bytes/s."""
        return self.host_link_bw * self.h2d_efficiency

    def replace(self, **changes) -> "HardwareSpec":
        return dataclasses.replace(self, **changes)
