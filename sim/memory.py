"""GPU and host memory arithmetic, as vLLM does it at start-up.

KV cache = gpu_memory_utilization x GPU memory - resident weights - staging buffers
           - activation peak (vLLM's profiling run at max_num_batched_tokens) - fixed overhead.
Every number is derived from the ModelSpec and the Placement; nothing is typed in twice.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from ..errors import ConfigError, DoesNotFitError
from ..policy import Placement
from ..specs import GiB, HardwareSpec, ModelSpec


@dataclass(frozen=True)
class MemoryPlan:
    gpu_memory: float
    capacity: float  # gpu_memory_utilization x GPU memory
    weights_resident: float
    staging: float
    activations: float
    overhead: float
    kv_cache: float
    kv_tokens: int  # KV-cache capacity in tokens (whole blocks)
    block_size: int
    host_offloaded: float  # bytes of offloaded weights (all the node's GPUs together)
    host_pinned: float  # host bytes holding them, as vLLM allocates them (Placement.host_pinned_bytes)
    host_capacity: float

    @property
    def kv_blocks(self) -> int:
        return self.kv_tokens // self.block_size

    @property
    def free(self) -> float:
        """Bytes of the GPU outside vLLM's budget (1 - gpu_memory_utilization)."""
        return self.gpu_memory - self.capacity

    def as_dict(self) -> dict:
        d = asdict(self)
        d["kv_blocks"] = self.kv_blocks
        return d


# Bytes per logit at the peak of vLLM V1's start-up profiling of the sampler: ``_dummy_sampler_run``
# (vllm/v1/worker/gpu_model_runner.py) samples max_num_seqs rows of logits with top-p 0.9 and top-k
# vocab-1, so apply_top_k_top_p (vllm/v1/sample/ops/topk_topp_sampler.py) sorts them: at the sort the
# bf16 logits (2), their fp32 copy (4), the sorted values (4) and the int64 sort indices (8) are alive.
V1_SAMPLER_BYTES_PER_LOGIT = 18
V0_LOGIT_BYTES = 4  # V0: the fp32 logits


def activation_peak(model: ModelSpec, max_batched_tokens: int, max_seqs: int, scheduler: str = "v0") -> float:
    """The activation bytes vLLM's start-up profiling holds at its peak (what it keeps out of the KV cache).

    V0: one layer's live tensors at ``max_batched_tokens`` plus the fp32 logits of ``max_seqs`` sequences
    (the shard's vocabulary), added. V1: the larger of its two phases, which run one after the other
    (vllm/v1/worker/gpu_model_runner.py ``profile_run``: ``_dummy_run(max_num_tokens)``, then
    ``_dummy_sampler_run`` on the last hidden states): the forward's live tensors, or the kept hidden states
    plus the sampler's ``V1_SAMPLER_BYTES_PER_LOGIT`` per logit of ``max_seqs`` rows over the WHOLE vocabulary
    on every GPU of a tensor-parallel group (vllm/model_executor/layers/logits_processor.py
    ``_gather_logits`` gathers the vocabulary shards before sampling). Public start-up logs of vLLM 0.19
    (validation/traces/memory/) show that shape: Llama-3.1-8B logs the same peak at TP 1, 2 and 4.
    A pipeline stage without the LM head holds the forward's tensors only."""
    if scheduler not in ("v0", "v1"):
        raise ConfigError("scheduler", scheduler, "'v0' or 'v1' (vLLM's engine generation)")
    forward = max_batched_tokens * model.activation_bytes_per_token()
    if not model.has_head:
        return forward
    if scheduler == "v1":
        vocab = model.vocab * model.tensor_parallel  # the shard's vocabulary x TP: the whole (padded) one
        return max(forward, model.hidden_state_bytes(max_batched_tokens)
                   + max_seqs * vocab * V1_SAMPLER_BYTES_PER_LOGIT)
    return forward + max_seqs * model.vocab * V0_LOGIT_BYTES


def plan_memory(model: ModelSpec, hw: HardwareSpec, placement: Placement, *, gpu_memory_utilization: float,
                max_batched_tokens: int, max_seqs: int, max_model_len: int, block_size: int = 16,
                overhead: float = 0.5 * GiB, gpus: int = 1, scheduler: str = "v0",
                kv_cache_bytes: float | None = None, num_blocks: int | None = None) -> MemoryPlan:
    """Lay out one GPU's memory; raise DoesNotFitError naming what does not fit. ``gpus`` GPUs of
    a node (tensor parallelism) pin their offloaded shards in the same host memory. ``kv_cache_bytes``
    (vLLM's kv_cache_memory_bytes): the KV cache is that, not what the profiled budget leaves, and
    gpu_memory_utilization is ignored (vllm/v1/worker/gpu_worker.py ``determine_available_memory``
    returns it as given); the rest must still fit in the GPU's memory. ``num_blocks`` (vLLM's
    num_gpu_blocks_override): the KV cache is that many blocks, in place of either (vllm/v1/core/
    kv_cache_utils.py replaces the block count the budget gives with it)."""
    given = ("num_gpu_blocks_override" if num_blocks is not None
             else "kv_cache_memory_bytes" if kv_cache_bytes is not None else None)  # what set the KV cache
    if num_blocks is not None:
        kv_cache_bytes = num_blocks * block_size * model.kv_bytes_per_token
    resident = model.weight_total_bytes - placement.offloaded_bytes
    staging = placement.staging_bytes
    act = activation_peak(model, max_batched_tokens, max_seqs, scheduler)
    if kv_cache_bytes is None:
        capacity = gpu_memory_utilization * hw.memory_bytes
        kv = capacity - resident - staging - act - overhead
    else:
        capacity, kv = resident + staging + act + overhead + kv_cache_bytes, float(kv_cache_bytes)
        if capacity > hw.memory_bytes:
            raise DoesNotFitError(
                f"{given}: a {kv_cache_bytes / GiB:.2f} GiB KV cache does not fit on {hw.name}: weights "
                f"{resident / GiB:.2f} + staging {staging / GiB:.2f} + activations {act / GiB:.2f} + overhead "
                f"{overhead / GiB:.2f} + KV cache exceed its {hw.memory_bytes / GiB:.2f} GiB")
    per_token = model.kv_bytes_per_token
    kv_tokens = max(int(kv // (per_token * block_size)), 0) * block_size
    plan = MemoryPlan(gpu_memory=hw.memory_bytes, capacity=capacity, weights_resident=resident, staging=staging,
                      activations=act, overhead=overhead, kv_cache=kv, kv_tokens=kv_tokens, block_size=block_size,
                      host_offloaded=gpus * placement.offloaded_bytes, host_pinned=gpus * placement.host_pinned_bytes,
                      host_capacity=hw.host_memory_bytes)
    if plan.host_pinned > hw.host_memory_bytes:
        raise DoesNotFitError(
            f"offloaded weights take {plan.host_pinned / GiB:.1f} GiB of pinned host memory "
            f"({plan.host_offloaded / GiB:.1f} GiB, each pinned allocation rounded up to a power of two), more "
            f"than the {hw.host_memory_bytes / GiB:.1f} GiB of {hw.name}"
            + ("; VLLM_WEIGHT_OFFLOADING_DISABLE_PIN_MEMORY=1 allocates exact sizes" if placement.host_alloc != "exact"
               else ""))
    need = max_model_len  # vLLM refuses to start unless one max-length sequence fits in the KV cache
    if kv_tokens < need:
        raise DoesNotFitError(
            f"{model.name} on {hw.name} with this policy does not fit: {capacity / GiB:.2f} GiB usable "
            f"({f'{given} given' if given else f'gpu_memory_utilization={gpu_memory_utilization}'}) - weights {resident / GiB:.2f} - staging "
            f"{staging / GiB:.2f} - activations {act / GiB:.2f} - overhead {overhead / GiB:.2f} leaves "
            f"{max(kv, 0) / GiB:.2f} GiB = {kv_tokens} KV tokens, fewer than max_model_len={max_model_len}; "
            f"offload more, lower max_model_len, or raise "
            + (given or "gpu_memory_utilization"))
    return plan
