"""Cost models: how long one decoder layer, the LM head and one host->device copy take.

Two implementations of one small interface (``layer``, ``head``, ``transfer``, ``copy_slowdown``,
``band``):
- ``Roofline``: from the HardwareSpec alone. Each kernel of a layer takes
  max(FLOPs / (peak x efficiency), bytes / (HBM bandwidth x efficiency), a launch floor); the host
  spends ``eager_launch_per_layer`` launching a layer's kernels, or almost nothing when decode steps
  replay a CUDA graph (vLLM's default for decode batches up to 256 sequences). ``parts`` splits a
  layer's time by kernel class: the four GEMMs, attention, elementwise work, all-reduces.
- ``Calibrated``: measured Profiles, transferred by efficiency (the design card's third rung:
  "calibration transferred by efficiencies, never reused as raw times").

How a calibration transfers. A Profile records what it measured: the model (its ModelSpec), the
GPU (its HardwareSpec) and the host link. Each measured time is divided by the datasheet roofline
of *that* model on *that* GPU, giving an efficiency ratio (measured / roofline), and the target's
time is the target's roofline times the ratio at the corresponding size:
- compute, whole layer (probe files, the runtime's ``offloadlab bench``): one ratio per measured
  (B, T, C), applied at the nearest measured shape in (log tokens, log KV tokens): GEMMs,
  attention by context and elementwise work move together, in the measured layer's mix;
- compute, per kernel (Vidur's operator CSVs, LLMServingSim's bundles): each GEMM by tokens and
  weight shape (the nearest measured shape, interpolated in log tokens), elementwise work by tokens;
  attention by step shape where the profile has an attention table (LLMServingSim's: one prefill chunk
  and its cached tokens, the decodes and their mean context; ``_AttentionTable``), of the target's
  tensor-parallel degree, else of the nearest degree; otherwise (Vidur's CSVs lack it) the datasheet roofline;
- all-reduce: ratio to the ring model of the measured GPUs' link, by message size, per TP degree;
- host launch time per layer: a property of the host, driver and Python, not of the GPU: kept;
- copies: the measured curve (latency + size / streaming rate) when the target's host link is the
  same kind (e.g. PCIe Gen5 x16), otherwise the target's datasheet link at the measured efficiency
  (streaming rate / measured link's spec).
Several Profiles combine: each component comes from the source nearest the target that measured it
(same GPU before same model before neither). On the profile's own GPU and model the ratios give
back the measured times exactly, so today's same-GPU accuracy is kept.

How far to trust it (``band``): every cost model gives (low, high) factors for GPU, host and copy
costs, from evidence named beside the BAND_* and DATASHEET_* constants: the calibration's
leave-one-out residuals (growing with the distance to the nearest measured shape), the step
model's structure error, a term per transfer across GPUs and across models, and the widest
factors for whatever only the datasheet gives. ``Corner`` runs a cost model at either end, so a
step, a run's throughput, TTFT and TPOT get a band by simulating the two corners.

UVA link traffic (``uva_read``): vLLM's UVA backend (vllm/model_executor/offloader/uva.py) replaces
an offloaded parameter by a device view of pinned host memory, so the layer's kernels read it over
the host link every time they touch it; nothing stages it in HBM. A GEMM of M token rows tiles its
output; each M-tile streams the whole weight (K x N) through its CTAs. Assumption (Roofline): the
weight crosses the link once per M-tile, ``ceil(M / uva_tile_m)`` times, with ``uva_tile_m = 64``
(the smallest tensor-core M-tile cuBLAS/CUTLASS use for skinny bf16 GEMMs: one Hopper wgmma
warpgroup, four Ampere m16n8k16 fragments) and no reuse of host-read lines in L2 across M-tiles. It
is an upper bound where concurrent M-tiles share lines in L2, and a lower bound where a kernel
issues host reads with poor parallelism. Decode batches up to 64 tokens read each weight once; a
2,048-token prefill chunk 32 times. ``Calibrated`` replaces it with the runtime's measurement
(Profile.uva_gemm: a GEMM reading a host-resident weight through its UVA view, timed by M).
"""
from __future__ import annotations

import bisect
import dataclasses
import functools
import math
from dataclasses import dataclass, field

import numpy as np

from ..checks import check_int
from ..errors import ConfigError
from ..profile import Profile
from ..specs import ACT_BYTES, HardwareSpec, ModelSpec


@dataclass(frozen=True)
class StepShape:
    """What one forward step computes, summed over its sequences.

    ``pairs`` counts causal query-key pairs (attention work); ``kv_tokens`` counts cached plus new
    tokens whose K/V are read; ``decode_only`` is true when every sequence adds one token;
    ``decodes`` counts the sequences that add one token (one query row each: decodes, and a prompt's
    last one-token chunk) and ``decode_kv`` their cached plus new tokens (attention kernels treat
    one-row queries apart: see Roofline.attention_time).
    """

    seqs: int
    tokens: int
    pairs: float
    kv_tokens: int
    decode_only: bool
    decodes: int
    decode_kv: int

    @classmethod
    def uniform(cls, batch: int, new: int, context: int) -> "StepShape":
        """``batch`` sequences, each adding ``new`` tokens after ``context`` cached ones."""
        for name, v, lo in (("batch", batch, 1), ("new_tokens", new, 1), ("context", context, 0)):
            check_int(name, v, lo)
        pairs = batch * (new * context + new * (new + 1) / 2)
        kv = batch * (context + new)
        return cls(batch, batch * new, pairs, kv, new == 1, batch if new == 1 else 0, kv if new == 1 else 0)

    @classmethod
    def decode(cls, seqs: int, kv: int) -> "StepShape":
        """A decode step: ``seqs`` sequences adding one token each, reading ``kv`` KV tokens in all."""
        return cls(seqs, seqs, kv, kv, True, seqs, kv)

    @classmethod
    def of(cls, seqs: list[tuple[int, int]]) -> "StepShape":
        """From (new tokens, context) per sequence."""
        tokens = pairs = kv = dec = dkv = 0
        for new, ctx in seqs:
            tokens += new
            pairs += new * ctx + new * (new + 1) / 2
            kv += ctx + new
            if new == 1:
                dec += 1
                dkv += ctx + 1
        return cls(len(seqs), tokens, pairs, kv, tokens == len(seqs), dec, dkv)


@dataclass(frozen=True)
class LayerCost:
    gpu: float  # seconds of GPU work for one layer
    host: float  # seconds the host spends launching it
    tail: float  # GPU seconds of its last kernel (what is left after the host's last launch)
    link_comm: float = 0.0  # seconds of ``gpu`` spent in all-reduces over the host link (no NVLink)


# ---- uncertainty: evidence behind every band (relative half-widths, or (low, high) factors) ----
# Step-model structure error at measured shapes: the same-GPU validation of the H100 probe
# (`offloadlab validate`: 36 offload rows, MAPE 2.05%, worst 5.4%); a ~90% band, not the worst row.
BAND_STRUCTURE = 0.05
# Efficiencies moved to another GPU: one layer's GEMM time on each of six GPUs profiled by token count
# (RTX 4090, RTX 3090, RTX A6000, RTX PRO 6000, H100 [LLMServingSim's bundles, validation/traces/profiles]
# and Vidur's A100), each predicted from each other's efficiency at 1-2,048 tokens (validation/efficiency.py,
# `python -m offloadlab.validation.efficiency`): 180 errors, median 12.5%, p90 31.3%, max 49%. GEMM
# efficiencies are a property of the GPU (clocks under load, power limit), not of its class: A100 ->
# H100 happens to carry (Vidur's operators predict the H100 probe's resident rows 3.8-4.7% off), A100 or
# H100 -> RTX 4090 does not (-30%). The p90, rounded up; tests/test_transfer.py recomputes it.
BAND_TRANSFER_GPU = 0.33
# Efficiencies moved to another model shape: Vidur's tensor-parallel-1 GEMMs and elementwise work
# predicting the tp 2/4/8 shards' (other shapes), summed per layer: p90 7-11.5% by degree.
BAND_TRANSFER_MODEL = 0.12
# Datasheet only (no measurement): high end: measured / roofline on the H100 probe's resident rows
# 1.07-1.34 (compute-bound ones), Vidur's A100 GEMMs up to 1.41 at 128 tokens. Low end: no kernel beats
# its datasheet peak, and the roofline assumes GEMMs at matmul_eff (70%) of peak FLOP/s and
# memory-bound kernels at memory_eff (80%) of HBM bandwidth, so a GPU can be as fast as
# min(matmul_eff, memory_eff) x the roofline and no faster (``datasheet_gpu``). GPUs do get close: an
# RTX 4090 under vLLM ran 2,048-token prefills at 87% of its bf16 peak (issue 12's serving run); the
# datacenter GPUs measured here ran slower than the roofline, hence the asymmetric band.
DATASHEET_GPU_HIGH = 1.5


def datasheet_gpu(rf: "Roofline", attention: bool = False) -> tuple[float, float]:
    """(low, high) factors on a datasheet-only GPU time (see DATASHEET_GPU_HIGH); ``attention``: of the
    attention kernels alone, assumed at attention_eff of peak."""
    return (rf.attention_eff if attention else min(rf.matmul_eff, rf.memory_eff), DATASHEET_GPU_HIGH)
# Eager launch, unmeasured: the roofline's 0.25 ms/layer against 0.68-0.86 ms measured (H100 host).
DATASHEET_LAUNCH = (0.5, 4.0)
# Pinned H2D from the datasheet: 80-85% of the link spec is typical (hardware.csv), ~78% on A100 hosts.
DATASHEET_COPY = 0.06
# Launch time from one measurement: its spread unknown (the H100 probe's four span +-13%).
BAND_LAUNCH_ONE = 0.3
# Same kind of host link, another machine: PCIe DMA efficiency varies by a few % host to host.
BAND_TRANSFER_LINK = 0.05


@dataclass(frozen=True)
class Band:
    """(low, high) multiplicative factors on a step's cost components: GPU time, host launch time, copy time;
    ``comm``: on a layer's all-reduces over the host link (``LayerCost.link_comm``), where they have their
    own evidence, ``gpu`` then being the factor on the rest of its GPU time (None: ``gpu`` on all of it)."""

    gpu: tuple[float, float]
    host: tuple[float, float]
    copy: tuple[float, float]
    comm: tuple[float, float] | None = None


def _median(xs):
    """``statistics.median(xs)``, imported here: its import (fractions) is 3 ms of every command, and only
    calibrated costs take a median."""
    import statistics

    return statistics.median(xs)


def _sym(w: float) -> tuple[float, float]:
    return (max(1.0 - w, 0.05), 1.0 + w)


def _quad(*ws: float) -> float:
    return math.sqrt(sum(w * w for w in ws))


# How a cost model replays CUDA graphs (Roofline.graph_mode): V0's decode graphs, and vLLM V1's
# cudagraph_mode values (vllm/config/compilation.py CUDAGraphMode): FULL_AND_PIECEWISE (V1's default),
# PIECEWISE, FULL; FULL_DECODE_ONLY replays as "decode" does
GRAPH_MODES = ("decode", "piecewise", "piecewise_only", "full")
ATTENTION_KERNELS = ("packed", "fa2")


def attention_kernel(gpu: HardwareSpec) -> str:
    """How V1 runs a step's attention on ``gpu`` (a Roofline ``attention_kernel``, which
    sim/vllm_engine.py gives V1's cost model): "fa2" where it runs FlashAttention-2, one varlen call for
    the whole batch, else "packed". vllm/platforms/cuda.py
    (_get_backend_priorities): FLASHINFER first on compute capability 10.x (B200), FLASH_ATTN elsewhere;
    vllm/v1/attention/backends/fa_utils.py (get_flash_attn_version): FA3 on 9.x (Hopper), FA2 on the
    others (Ampere 8.0/8.6, Ada 8.9, RTX Blackwell 12.0). FA3 packs a GQA group's query heads for
    every varlen batch (hopper/heuristics.h should_pack_gqa) and FlashInfer runs decodes in their own
    kernel, so only FA2 leaves them unpacked (see Roofline.attention_time). A GPU of unknown compute
    capability keeps "packed" (the roofline as without this rule)."""
    cc = gpu.compute_capability
    return "fa2" if 8 <= cc < 9 or cc >= 11 else "packed"


# Of each repeated read of a KV head's cache by another query head of its GQA group, the share that
# reaches HBM under FlashAttention-2's unpacked one-row queries (Roofline.attention_time). Evidence:
# LLMServingSim's attention tables under vLLM 0.19 (validation/traces/profiles/), a mixed step's decode
# attention (its time less the prefill chunk's alone) over the same decodes' time in a decode-only step,
# median over the rows where the decodes dominate (>= 32 decodes of >= 512 tokens, chunk <= 512): RTX
# 4090 Llama-3.1-8B (4 query heads per KV head) 2.01 -> (2.01 - 1) / 3 = 0.34; RTX PRO 6000 Llama-3.1-8B
# TP 1 1.73 -> 0.24, TP 2 1.81 -> 0.27; RTX PRO 6000 Qwen3-32B TP 2 (8 per KV head) 3.03 -> 0.29.
# Their median. The spread (0.24-0.34) moves a mixed step's attention by a few % at most: inside the
# datasheet-only GPU band (datasheet_gpu) and the attention factor a Calibrated cost gives datasheet attention.
FA2_REREAD = 0.28

# All-reduce between GPUs without NVLink (Roofline.allreduce_seconds), from public measurements on four
# machines (validation/traces/allreduce/: NCCL on 2x RTX 2080 Ti over host memory, PCIe Gen3; 4x V100 on a
# PLX switch, Gen3; 4 and 8 RTX PRO 6000 Server Edition on Broadcom switches and 8 RTX PRO 6000 Max-Q on
# three switches, Gen5; 64 KiB-16 MiB; `python -m offloadlab.validation.allreduce`, tests/test_allreduce.py
# recomputes them): the ring's traffic per GPU moves at PCIE_ALLREDUCE_RATE of the host link's datasheet
# rate per direction (the median of the tables that resolve it: 0.25, 0.51, 0.78) and each of its 2 (n-1)
# steps costs PCIE_ALLREDUCE_HOP (median over five tables, 1.2-10 us). What runs: vLLM
# (vllm/distributed/device_communicators/custom_all_reduce.py) disables its custom all-reduce on more than
# two GPUs without NVLink (NCCL's ring then) and, on two GPUs with peer access, runs it below max_size (8 MiB)
# as one stage (csrc/custom_all_reduce.cuh: world_size 2 -> cross_device_reduce_1stage, each GPU reading its
# peer's whole buffer: the ring's traffic at n = 2); no public measurement of that kernel over PCIe was found,
# so one model stands for both. Each table's median measured / model lies in BAND_ALLREDUCE_PCIE (rounded out).
PCIE_ALLREDUCE_RATE = 0.51
PCIE_ALLREDUCE_HOP = 4.4e-6
BAND_ALLREDUCE_PCIE = (0.35, 2.05)


def allreduce_band(rf: "Roofline") -> tuple[float, float]:
    """(low, high) factors on an unmeasured all-reduce's time: BAND_ALLREDUCE_PCIE without NVLink, else
    the datasheet GPU band (see DATASHEET_GPU_HIGH)."""
    return datasheet_gpu(rf) if rf.hw.gpu_link_bw else BAND_ALLREDUCE_PCIE


@dataclass(frozen=True)
class Roofline:
    # every cost grows (or stays) with a step's context at fixed sequences and tokens: StepModel.decodes
    # may take a run of decode steps that fall in one cost bin from its two ends (not a field)
    context_monotone = True

    model: ModelSpec
    hw: HardwareSpec
    matmul_eff: float = 0.7  # of peak dense FLOP/s reached by large GEMMs
    attention_eff: float = 0.5  # of peak reached by attention kernels
    memory_eff: float = 0.8  # of HBM bandwidth reached by memory-bound kernels
    kernel_floor: float = 4e-6  # shortest kernel, seconds
    kernels_per_layer: int = 12
    eager_launch_per_layer: float = 0.25e-3  # host seconds per layer in eager mode
    graph_launch_per_layer: float = 5e-6  # host seconds per layer when a CUDA graph is replayed
    cuda_graphs: bool = True
    max_graph_batch: int = 256
    # "decode": V0's CUDA graphs, decode steps of up to max_graph_batch sequences; "piecewise": V1's
    # FULL_AND_PIECEWISE (vllm/config/compilation.py, cudagraph_mode): uniform decode steps of up to
    # max_graph_batch tokens replay one full graph, other steps of up to max_graph_batch tokens replay
    # the graphs between attention ops (attention launched eagerly), longer steps run compiled code;
    # "piecewise_only" (cudagraph_mode PIECEWISE): every step up to max_graph_batch tokens replays the
    # pieces, uniform decode too; "full" (cudagraph_mode FULL): every such step replays one full graph.
    # FULL_DECODE_ONLY is "decode" (full graphs for decode steps only, the rest eager); NONE: cuda_graphs=False
    graph_mode: str = "decode"
    # host seconds per layer of a piecewise replay: one graph launch and the eager attention and
    # KV-cache-write custom ops (~3 launches of ~10 us through Python; an ASSUMPTION, not measured)
    piecewise_launch_per_layer: float = 30e-6
    copy_slowdown: float = 1.0
    # seconds per ring hop over NVLink (PCIe: PCIE_ALLREDUCE_HOP): an assumption. Public H100 measurements
    # (validation/traces/allreduce/nvlink_allreduce.csv) give NCCL ~1.9 us a step at 0.56 of the link and
    # vLLM's one-stage kernel (what it runs below 256 KiB at TP 8) ~6 us a call; kept until an A100 or TP 8
    # measurement exists: applied to A100 they flip the held-out A100 TP 8 run from +20% to -21% TPOT (README there)
    allreduce_latency: float = 5e-6
    link_share: float = 1.0  # GPUs copying at once over this GPU's host link (tensor parallelism)
    uva_tile_m: int = 64  # token rows per host read of a UVA-offloaded weight (module doc: assumption)
    # how a step's attention kernels read the KV cache (ATTENTION_KERNELS; sim/vllm_engine.attention_kernel
    # picks it for V1 by GPU): "packed": each KV head's cache is read once for its whole GQA group of
    # query heads (V0's separate decode kernel, FA3, FlashInfer); "fa2": V1's FlashAttention-2 call,
    # packed in decode-only steps, unpacked for the one-row queries of a mixed step (attention_time)
    attention_kernel: str = "packed"

    def __post_init__(self):
        for f in ("matmul_eff", "attention_eff", "memory_eff"):
            v = getattr(self, f)
            if not 0 < v <= 1:
                raise ConfigError(f, v, "an efficiency in (0, 1]")
        if not self.copy_slowdown >= 1:
            raise ConfigError("copy_slowdown", self.copy_slowdown, "a multiplier >= 1")
        if not self.link_share >= 1:
            raise ConfigError("link_share", self.link_share, "a number of GPUs >= 1")
        check_int("uva_tile_m", self.uva_tile_m, 1, expected="an integer >= 1 (token rows per M-tile)")
        if self.attention_kernel not in ATTENTION_KERNELS:
            raise ConfigError("attention_kernel", self.attention_kernel, "one of " + ", ".join(ATTENTION_KERNELS))
        if self.graph_mode not in GRAPH_MODES:
            raise ConfigError("graph_mode", self.graph_mode, "one of " + ", ".join(GRAPH_MODES))
        # gpu_time's terms that follow a step's tokens only, by token count (not a field: not compared)
        object.__setattr__(self, "_by_tokens", {})

    def _kernel(self, flops: float, nbytes: float, eff: float) -> float:
        return max(flops / (self.hw.peak_flops * eff), nbytes / (self.hw.hbm_bw * self.memory_eff),
                   self.kernel_floor)

    def gemm_time(self, shape: tuple[int, int], tokens: int) -> float:
        """One GEMM of an (out, in) weight over ``tokens`` rows."""
        out_f, in_f = shape
        act = ACT_BYTES
        return self._kernel(2.0 * out_f * in_f * tokens,
                            out_f * in_f * self.model.weight_bytes + tokens * (in_f + out_f) * act, self.matmul_eff)

    def attention_time(self, s: StepShape) -> float:
        """Attention over the KV cache: causal pairs at attention_eff of peak, or the KV read at
        memory_eff of HBM bandwidth. With ``attention_kernel`` "fa2", a mixed step's one-row queries (its
        decodes) are not packed: FlashAttention-2 folds a GQA group's query heads into one row block only
        when every query of the call has one row (csrc/flash_attn/flash_api.cpp mha_varlen_fwd,
        seqlenq_ngroups_swapped needs max_seqlen_q == 1), so otherwise each query head of a group reads
        its KV head's cache again; FA2_REREAD of each repeated read reaches HBM (the rest hits L2)."""
        m, act = self.model, ACT_BYTES
        q = m.heads * m.head_dim
        kv = s.kv_tokens
        if self.attention_kernel == "fa2" and s.decodes and not s.decode_only and m.heads > m.kv_heads:
            kv += FA2_REREAD * (m.heads // m.kv_heads - 1) * s.decode_kv
        return self._kernel(4.0 * q * s.pairs, kv * m.kv_bytes_per_token_layer + 2 * s.tokens * q * act,
                            self.attention_eff)

    def elementwise_time(self, tokens: int) -> float:
        """Norms, RoPE, SiLU*mul, residual adds, KV-cache write: read+write of the activations."""
        m, act = self.model, ACT_BYTES
        q, kv = m.heads * m.head_dim, m.kv_heads * m.head_dim
        elementwise_bytes = tokens * act * (8 * m.hidden + 2 * (q + 2 * kv) + 3 * m.intermediate)
        n_elem = self.kernels_per_layer - 5
        return max(elementwise_bytes / (self.hw.hbm_bw * self.memory_eff), n_elem * self.kernel_floor)

    def parts(self, s: StepShape) -> dict[str, float]:
        """A layer's GPU seconds by kernel class: one entry per GEMM (by parameter name), attention,
        elementwise, all-reduce (what the efficiency transfer of ``Calibrated`` scales class by class)."""
        out = {name: self.gemm_time(shape, s.tokens) for name, shape in self.model.layer_param_shapes
               if len(shape) == 2}
        out["attention"] = self.attention_time(s)
        out["elementwise"] = self.elementwise_time(s.tokens)
        out["allreduce"] = 2 * self.allreduce_time(s.tokens)
        return out

    def gpu_time(self, s: StepShape) -> float:
        """The sum of ``parts`` (written out: this runs once per simulated step; the terms that follow
        the tokens only are worked out once per token count, the same numbers summed in the same order)."""
        terms = self._by_tokens.get(s.tokens)
        if terms is None:
            gemms = 0.0
            for _, shape in self.model.layer_param_shapes:
                if len(shape) == 2:
                    gemms += self.gemm_time(shape, s.tokens)
            terms = self._by_tokens[s.tokens] = (gemms, self.elementwise_time(s.tokens),
                                                 2 * self.allreduce_time(s.tokens))
        gemms, elementwise, allreduce = terms
        return gemms + self.attention_time(s) + elementwise + allreduce

    def allreduce_time(self, tokens: int) -> float:
        """One ring all-reduce of the hidden states across the tensor-parallel GPUs (two per layer:
        after attention and after the MLP), over NVLink, or over PCIe when the GPU has none."""
        tp = self.model.tensor_parallel
        if tp == 1:
            return 0.0
        return self.allreduce_seconds(self.model.hidden_state_bytes(tokens), tp)

    def allreduce_seconds(self, nbytes: float, gpus: int) -> float:
        """A ring all-reduce of ``nbytes`` over ``gpus`` GPUs of this kind: 2 (gpus-1) steps, each GPU
        sending 2 (gpus-1)/gpus x ``nbytes``; over NVLink at its datasheet rate and allreduce_latency a
        step, over PCIe at the measured PCIE_ALLREDUCE_RATE of the host link's and PCIE_ALLREDUCE_HOP."""
        steps = 2 * (gpus - 1)
        if self.hw.gpu_link_bw:
            return steps / gpus * nbytes / self.hw.gpu_link_bw + steps * self.allreduce_latency
        return steps / gpus * nbytes / (PCIE_ALLREDUCE_RATE * self.hw.host_link_bw) + steps * PCIE_ALLREDUCE_HOP

    def link_comm_time(self, s: StepShape) -> float:
        """Seconds of a layer's all-reduces that cross the GPU's host (PCIe) link, competing with
        its copies: all of them on a GPU without NVLink, none otherwise."""
        return 0.0 if self.hw.gpu_link_bw else 2 * self.allreduce_time(s.tokens)

    def graph_kind(self, s: StepShape) -> str | None:
        """What step ``s`` replays (see ``graph_mode``): "full" (one CUDA graph), "piecewise" (the graphs
        between attention ops, attention launched eagerly) or None (eager, or compiled code beyond the
        capture size). V0 ("decode") captures decode steps of up to ``max_graph_batch`` sequences; V1's
        modes every step of up to ``max_graph_batch`` tokens."""
        if not self.cuda_graphs:
            return None
        if self.graph_mode == "decode":
            return "full" if s.decode_only and s.seqs <= self.max_graph_batch else None
        if s.tokens > self.max_graph_batch:
            return None
        if self.graph_mode == "piecewise_only" or (self.graph_mode == "piecewise" and not s.decode_only):
            return "piecewise"
        return "full"

    def replays_graph(self, s: StepShape) -> bool:
        return self.graph_kind(s) is not None

    def launch_time(self, s: StepShape) -> float:
        kind = self.graph_kind(s)
        return (self.eager_launch_per_layer if kind is None
                else self.piecewise_launch_per_layer if kind == "piecewise" else self.graph_launch_per_layer)

    def layer(self, s: StepShape) -> LayerCost:
        return LayerCost(self.gpu_time(s), self.launch_time(s), self.kernel_floor, self.link_comm_time(s))

    def pre_attention(self, s: StepShape) -> float:
        """GPU seconds of a layer's work before its attention op, where vLLM's piecewise CUDA graphs
        end a piece (sim/step.py ``join_mode``): the QKV projection (the input norm and rotary
        embedding around it, a few us, are left out: the join is taken slightly early)."""
        return self.gemm_time(self.model.layer_param_shapes[0][1], s.tokens)

    def head(self, s: StepShape) -> float:
        """GPU seconds for the final norm and LM head on the last token of each sequence (none on a
        pipeline stage without the head)."""
        m = self.model
        if not m.has_head:
            return 0.0
        return self._kernel(2.0 * m.vocab * m.hidden * s.seqs,
                            m.vocab * m.hidden * m.weight_bytes + s.seqs * m.vocab * 4, self.matmul_eff)

    def transfer(self, nbytes: float) -> float:
        """Seconds for one pinned host->device copy of ``nbytes`` (its share of the host link)."""
        return self.hw.host_link_latency + nbytes * self.link_share / self.hw.h2d_bw

    def uva_reads(self, tokens: int) -> int:
        """Times a kernel over ``tokens`` rows reads a UVA-offloaded weight over the link (module doc)."""
        return max(1, math.ceil(tokens / self.uva_tile_m))

    def uva_read(self, nbytes: float, tokens: int) -> float:
        """Link seconds the kernels of a ``tokens``-row step spend reading ``nbytes`` of UVA weights."""
        return self.transfer(nbytes * self.uva_reads(tokens))

    def describe(self) -> str:
        return f"datasheet roofline of {self.model.name} on {self.hw.name} (no profile)"

    def band(self, s: StepShape) -> Band:
        """Datasheet only: the widest band (see DATASHEET_*): one of two, by whether ``s`` replays a graph;
        all-reduces over the host link (tensor parallelism without NVLink) at their own (allreduce_band)."""
        return self._bands[self.replays_graph(s)]

    @functools.cached_property
    def _bands(self) -> tuple[Band, Band]:
        """``band``'s two values (eager, graph replay), made once: a corner run asks for one per cost."""
        gpu, copy = datasheet_gpu(self), _sym(_quad(BAND_STRUCTURE, DATASHEET_COPY))
        comm = allreduce_band(self) if self.model.tensor_parallel > 1 and not self.hw.gpu_link_bw else None
        return Band(gpu, DATASHEET_LAUNCH, copy, comm), Band(gpu, (0.5, 2.0), copy, comm)


NEAR = 32.0  # a measured shape "near" a step: token counts within this factor (else: no row near, an error)


@dataclass(frozen=True)
class _Source:
    """One Profile and the datasheet roofline of what it measured (its own model and GPU)."""

    profile: Profile
    roofline: Roofline
    distance: int  # 0 same GPU and model, 1 another model, 2 another GPU, 3 both

    @property
    def label(self) -> str:
        return self.profile.describe()


def _same_model(a: ModelSpec, b: ModelSpec) -> bool:
    """Same layer shape (a tensor-parallel shard or pipeline stage of a model is that model)."""
    keys = ("hidden", "head_dim", "weight_bytes")
    return all(getattr(a, k) == getattr(b, k) for k in keys) and \
        a.heads * a.tensor_parallel == b.heads * b.tensor_parallel and \
        a.intermediate * a.tensor_parallel == b.intermediate * b.tensor_parallel


def _nearest_gemm(gemms, shape: tuple[int, int], op: str = ""):
    """The measured GEMM table (log weight size, op, log tokens, ratios) of the weight size nearest ``shape``'s;
    among equally near ones, one of the same operator ``op`` (a TP-2 shard's gate_up_proj is as large as the
    whole model's down_proj), else the first."""
    lp = math.log(shape[0] * shape[1])
    return min(gemms, key=lambda g: (round(abs(g[0] - lp), 9), g[1] != op))


@functools.lru_cache(maxsize=1024)
def _chunk_shape(pc: int, kvp: int) -> StepShape:
    return StepShape.of([(pc, kvp)])


@functools.lru_cache(maxsize=1024)
def _decodes_shape(nd: int, kvd: int) -> StepShape:
    return StepShape.decode(nd, nd * (kvd + 1))


def _table_shape(pc: int, kvp: int, nd: int, kvd: int) -> StepShape:
    """The step an attention table row measured: one prefill chunk of ``pc`` tokens after ``kvp`` cached
    ones (none when ``pc`` is 0) and ``nd`` decodes, each after ``kvd`` cached tokens (a table's rows
    share their chunks and decode batches: each is made once)."""
    if not (pc and nd):
        return _chunk_shape(pc, kvp) if pc else _decodes_shape(nd, kvd)
    a, b = _chunk_shape(pc, kvp), _decodes_shape(nd, kvd)
    return StepShape(a.seqs + b.seqs, a.tokens + b.tokens, a.pairs + b.pairs, a.kv_tokens + b.kv_tokens,
                     a.decode_only and b.decode_only, a.decodes + b.decodes, a.decode_kv + b.decode_kv)


def _table_coords(s: StepShape) -> tuple[int, tuple[float, ...]]:
    """A step in an attention table's coordinates: (kind, coordinates), kind 0 decode-only (n_decode,
    kv_decode), 1 prefill-only (prefill_chunk, kv_prefill), 2 both (prefill_chunk, kv_prefill, n_decode,
    kv_decode). The step's one-row sequences are the decodes, at their mean context; every other sequence's
    new tokens are one prefill chunk, after their mean cached tokens (a step of several prompt chunks is
    costed as one chunk of them all)."""
    dec = s.decodes
    pre = s.tokens - dec
    if pre == 0:
        return 0, (dec, s.decode_kv / dec - 1)
    if dec == 0:
        return 1, (pre, (s.kv_tokens - pre) / s.seqs)
    return 2, (pre, (s.kv_tokens - s.decode_kv - pre) / (s.seqs - dec), dec, s.decode_kv / dec - 1)


class _AttentionTable:
    """Measured / roofline attention time by step shape, from one tensor-parallel degree's attention table
    (Profile.attention rows), for ``Calibrated``.

    Each row's ratio is its measured time over the measured GPU's roofline (``roofline``, of the measured
    shard) of the step it measured (``_table_shape``). A step is looked up in the table of its kind
    (``_table_coords``: decode-only, prefill-only, both) by multilinear interpolation of the ratios in
    log coordinates on the grid of the measured values of each axis (a 0 on an axis, e.g. no cached
    tokens, sits one halving below its smallest positive value); outside the grid an axis is clamped to
    its end (the ratio is held, the roofline carries the growth). Where a grid cell lacks measured
    corners (a table that is not a full product grid), the measured corners' weights are renormalized;
    where it has none, the nearest measured point (in log coordinates) gives the ratio. At a measured
    shape the ratio is the measured one: on the measured GPU and model, the measured time comes back.
    Ratios are remembered per step coordinates (exact: no binning; at most MEMO of them, then anew).
    Built once per (rows, roofline) in a process (``build``): a replay and its band's corners share it."""

    MEMO = 1 << 16

    @staticmethod
    @functools.lru_cache(maxsize=8)
    def build(rows: tuple, roofline: Roofline, tp: int) -> "_AttentionTable":
        return _AttentionTable(rows, roofline, tp)

    def __init__(self, rows, roofline: Roofline, tp: int):
        self.tp = tp
        by_kind: dict[int, list] = {}
        for pc, kvp, nd, kvd, sec in rows:
            shape = _table_shape(pc, kvp, nd, kvd)
            kind, exact = _table_coords(shape)  # the row's own coordinates, as a step's are looked up
            by_kind.setdefault(kind, []).append((exact, sec / roofline.attention_time(shape)))
        self.kinds: dict[int, tuple] = {}
        self.loo: dict[int, float] = {}  # p90 of leave-one-out residuals (interior points, along each axis)
        for kind, pts in by_kind.items():
            k = len(pts[0][0])
            values = [sorted({p[0][j] for p in pts}) for j in range(k)]
            floors = [(v[1] / 2 if v[0] == 0 and len(v) > 1 else max(v[0], 1)) for v in values]
            axes = [[math.log(max(x, f)) for x in v] for v, f in zip(values, floors)]
            index = [{x: i for i, x in enumerate(v)} for v in values]
            grid = np.full([len(v) for v in values], np.nan)
            for exact, r in pts:
                grid[tuple(index[j][exact[j]] for j in range(k))] = r
            strides = [int(st // grid.itemsize) for st in grid.strides]
            # a cell's corners as offsets from its lowest one, the last axis varying fastest (see _interpolate)
            offsets = [sum(strides[j] for j in range(k) if len(values[j]) > 1 and (c >> (k - 1 - j)) & 1)
                       for c in range(2 ** k)]
            # cells whose corners were all measured (by lowest corner): the fast path
            measured, full = np.isfinite(grid), np.isfinite(grid)
            for c in range(1, 2 ** k):
                shift = [-((c >> (k - 1 - j)) & 1) if len(values[j]) > 1 else 0 for j in range(k)]
                full = full & np.roll(measured, shift, axis=tuple(range(k)))
            coords = np.array([[axes[j][index[j][e[j]]] for j in range(k)] for e, _ in pts])
            self.kinds[kind] = (list(zip(axes, floors, strides)), offsets, grid.ravel().tolist(),
                                full.ravel().tolist(), coords, np.array([r for _, r in pts]))
            self.loo[kind] = self._loo(grid, axes)
        self._memo: dict = {}
        self._last: tuple = (None, 0, 1.0)  # (step, kind, ratio) of the last look-up: layer, band and head ask alike

    @staticmethod
    def _loo(grid: np.ndarray, axes) -> float:
        """p90 of |predicted / measured - 1| of each interior grid point from its two neighbours along each
        axis (linear in that axis's log coordinate): the table's own interpolation error, for ``band``."""
        errs = []
        for j, a in enumerate(axes):
            a = np.asarray(a)
            for i in range(1, len(a) - 1):
                w = (a[i] - a[i - 1]) / (a[i + 1] - a[i - 1])
                lo, mid, hi = (np.take(grid, n, axis=j) for n in (i - 1, i, i + 1))
                pred = lo + w * (hi - lo)
                ok = np.isfinite(pred) & np.isfinite(mid)
                errs.extend(np.abs(pred[ok] / mid[ok] - 1).tolist())
        return float(np.quantile(errs, 0.9)) if errs else 0.0

    def lookup(self, s: StepShape) -> tuple[int, float]:
        """(kind, measured / roofline attention time) for step ``s``; the ratio 1.0 when no row measured its kind."""
        last = self._last
        if s is last[0]:
            return last[1], last[2]
        key = _table_coords(s)
        r = self._memo.get(key)
        if r is None:
            if len(self._memo) >= self.MEMO:
                self._memo.clear()
            r = self._memo[key] = self._interpolate(*key) if key[0] in self.kinds else 1.0
        self._last = (s, key[0], r)
        return key[0], r

    def ratio(self, s: StepShape) -> float:
        return self.lookup(s)[1]

    def _interpolate(self, kind: int, x: tuple[float, ...]) -> float:
        axes, offsets, flat, full, coords, ratios = self.kinds[kind]
        base, ws = 0, []
        for (a, f, st), v in zip(axes, x):
            u = math.log(v) if v > f else math.log(f)
            n = len(a)
            if n == 1 or u <= a[0]:
                i, w = 0, 0.0
            elif u >= a[-1]:
                i, w = n - 2, 1.0
            else:
                i = bisect.bisect_right(a, u) - 1
                w = (u - a[i]) / (a[i + 1] - a[i])
            base += i * st
            ws.append(w)
        if full[base]:  # every corner measured: lerp the corners pairwise, the last axis first
            vals = [flat[base + o] for o in offsets]
            for w in reversed(ws):
                vals = [p + w * (q - p) for p, q in zip(vals[::2], vals[1::2])]
            return vals[0]
        k = len(ws)
        total = weight = 0.0
        for c, o in enumerate(offsets):
            wt = 1.0
            for j, w in enumerate(ws):
                wt *= w if (c >> (k - 1 - j)) & 1 else 1.0 - w
            r = flat[base + o]
            if wt > 0.0 and r == r:  # a measured corner (not NaN)
                total += wt * r
                weight += wt
        if weight > 0.0:
            return total / weight
        u = np.array([math.log(max(v, f)) for v, (_, f, _) in zip(x, axes)])
        return float(ratios[int(np.argmin(((coords - u) ** 2).sum(axis=1)))])


@dataclass(frozen=True)
class Calibrated:
    """The target's roofline corrected by efficiencies measured elsewhere (see module docstring).

    ``profile``: one Profile or several; each component (compute, launch, copies, all-reduce) comes
    from the source nearest the target that measured it (same GPU before same model before neither;
    the first given on ties).
    """

    roofline: Roofline
    profile: Profile | tuple[Profile, ...]
    _compute: _Source | None = field(init=False, repr=False, compare=False)
    _copies: _Source | None = field(init=False, repr=False, compare=False)
    _launch_src: _Source | None = field(init=False, repr=False, compare=False)
    _allreduce: tuple = field(init=False, repr=False, compare=False)
    _points: tuple = field(init=False, repr=False, compare=False)
    _gemms: tuple = field(init=False, repr=False, compare=False)
    _elementwise: tuple = field(init=False, repr=False, compare=False)
    _gemm_tables: tuple = field(init=False, repr=False, compare=False)
    _elem_table: tuple | None = field(init=False, repr=False, compare=False)
    _attention: _AttentionTable | None = field(init=False, repr=False, compare=False)
    _launch: float = field(init=False, repr=False, compare=False)
    _latency: float = field(init=False, repr=False, compare=False)
    _rate: float = field(init=False, repr=False, compare=False)
    _link_note: str = field(init=False, repr=False, compare=False)
    _evidence: dict = field(init=False, repr=False, compare=False)
    _band_last: list = field(init=False, repr=False, compare=False)  # [step, its band]: band's last answer

    def __post_init__(self):
        rf = self.roofline
        profiles = tuple(self.profile) if isinstance(self.profile, (tuple, list)) else (self.profile,)
        if not profiles or not all(isinstance(p, Profile) for p in profiles):
            raise ConfigError("profile", self.profile, "a Profile or a sequence of Profiles")
        object.__setattr__(self, "profile", profiles[0] if len(profiles) == 1 else profiles)
        srcs = []
        for p in profiles:
            sm, sg = p.source_model(), p.source_gpu()
            srf = dataclasses.replace(rf, model=sm, hw=sg, link_share=1.0)
            srcs.append(_Source(p, srf, 2 * (sg.name != rf.hw.name) + (not _same_model(sm, rf.model))))

        def pick(has):
            cands = [x for x in srcs if has(x.profile)]
            return min(cands, key=lambda x: x.distance) if cands else None  # min keeps the first of equals

        compute = pick(lambda p: p.layer_times or p.kernels)
        launch_src = pick(lambda p: p.launch_per_layer is not None or p.layer_times)
        copies = pick(lambda p: p.h2d)
        tp = rf.model.tensor_parallel
        ar = pick(lambda p: any(n == tp for _, n, _ in p.allreduce)) if tp > 1 else None
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731
        set_("_compute", compute)
        set_("_copies", copies)
        set_("_launch_src", launch_src)

        # host launch time per layer: a property of the host and driver, kept across GPUs
        launch = rf.eager_launch_per_layer
        if launch_src is not None:
            lp = launch_src.profile
            if lp.launch_per_layer is not None:
                launch = lp.launch_per_layer
            else:
                bound = [sec for b, t, c, sec in lp.layer_times
                         if launch_src.roofline.gpu_time(StepShape.uniform(b, t, c)) < 0.5 * sec]
                launch = _median(bound) if bound else launch
        set_("_launch", launch)

        # whole-layer efficiencies (probe and microbenchmark Profiles): measured / the measured GPU's
        # roofline of the measured model, by (tokens, KV tokens)
        points = []
        if compute is not None and compute.profile.layer_times:
            own_host = compute is launch_src
            for b, t, c, sec in compute.profile.layer_times:
                sh = StepShape.uniform(b, t, c)
                r = compute.roofline.gpu_time(sh)
                lb = r < 0.5 * sec  # launch-bound: the in-stack time is the host's, not the GPU's
                points.append((math.log(sh.tokens), math.log(max(sh.kv_tokens, 1)), 1.0 if lb else sec / r,
                               sec if (lb and own_host) else launch, (b, t, c)))
        set_("_points", tuple(points))

        # per-kernel efficiencies (Vidur): each GEMM by tokens and weight shape, elementwise by tokens
        gemms, elem = [], []
        if compute is not None and not points and compute.profile.kernels:
            groups: dict = {}
            for op, t, ktp, sec in compute.profile.kernels:
                groups.setdefault((op, ktp), []).append((t, sec))
            src_model = compute.roofline.model
            for (op, ktp), rows in sorted(groups.items()):
                try:
                    shard = src_model.shard(ktp)
                except ConfigError:
                    continue
                srf = dataclasses.replace(compute.roofline, model=shard)
                rows.sort()
                if op == "elementwise":
                    elem.append((ktp, np.array([math.log(t) for t, _ in rows]),
                                 np.array([sec / srf.elementwise_time(t) for t, sec in rows])))
                else:
                    shape = dict((n.split(".")[-2], sh) for n, sh in shard.layer_param_shapes if len(sh) == 2)[op]
                    gemms.append((math.log(shape[0] * shape[1]), op, np.array([math.log(t) for t, _ in rows]),
                                  np.array([sec / srf.gemm_time(shape, t) for t, sec in rows])))
        set_("_gemms", tuple(gemms))
        set_("_elementwise", tuple(elem))
        # the target's GEMMs, each with the measured table of the nearest weight shape (fixed per model)
        set_("_gemm_tables", tuple((shape, _nearest_gemm(gemms, shape, n.split(".")[-2]))
                                   for n, shape in rf.model.layer_param_shapes if len(shape) == 2) if gemms else ())
        set_("_elem_table", min(elem, key=lambda g: abs(math.log(g[0] / rf.model.tensor_parallel))) if elem else None)
        # attention (LLMServingSim's tables): measured / the measured shard's roofline by step shape, from the
        # table of the target's tensor-parallel degree, else of the nearest degree (a model transfer)
        att = None
        if compute is not None and not points and compute.profile.attention:
            by_tp: dict = {}
            for pc, kvp, nd, kvd, ktp, sec in compute.profile.attention:
                by_tp.setdefault(ktp, []).append((pc, kvp, nd, kvd, sec))
            shards = {}
            for ktp in by_tp:
                try:
                    shards[ktp] = compute.roofline.model.shard(ktp)
                except ConfigError:
                    continue
            if shards:
                tp = rf.model.tensor_parallel
                ktp = min(shards, key=lambda n: (abs(math.log(n / tp)), n))
                # the rows are vLLM V1's attention op on the measured GPU: its roofline with the kernel V1 runs there
                srf = dataclasses.replace(compute.roofline, model=shards[ktp],
                                          attention_kernel=attention_kernel(compute.roofline.hw))
                att = _AttentionTable.build(tuple(by_tp[ktp]), srf, ktp)
        set_("_attention", att)

        # all-reduce: measured / the measured GPUs' ring model, by message size, for this TP degree
        if ar is not None:
            rows = sorted((nb, sec) for nb, n, sec in ar.profile.allreduce if n == tp)
            set_("_allreduce", (ar, tuple(math.log(nb) for nb, _ in rows),
                                tuple(sec / ar.roofline.allreduce_seconds(nb, tp) for nb, sec in rows)))
        else:
            set_("_allreduce", ())

        # copies: the measured curve when the host link is of the same kind, else the target's
        # datasheet link at the measured efficiency (measured streaming rate / measured link's spec)
        if copies is not None:
            lat, rate = _link_model(copies.profile.h2d)
            kind = copies.profile.link_kind
            if kind != rf.hw.host_link:
                eff = rate / copies.roofline.hw.host_link_bw
                note = (f"copies: {rf.hw.host_link} datasheet at the {eff:.0%} efficiency {copies.label} measured "
                        f"on {kind}")
                lat, rate = rf.hw.host_link_latency, rf.hw.host_link_bw * eff
            else:
                note = f"copies: {copies.label}'s measured {kind} curve"
        else:
            lat, rate = rf.hw.host_link_latency, rf.hw.h2d_bw
            note = "copies: datasheet"
        set_("_latency", lat)
        set_("_rate", rate)
        set_("_link_note", note)
        set_("_evidence", self._residuals(copies, kind if copies is not None else ""))
        set_("_band_last", [None, None])

    def _residuals(self, copies: _Source | None, kind: str) -> dict:
        """The calibration's own residuals, for ``band``: leave-one-out on its shapes and token counts,
        the link model against the measured curve, the spread of the launch measurements."""
        ev: dict = {}
        # whole-layer points: each predicted by its nearest other (non-launch-bound) point
        pts = [p for p in self._points if p[2] != 1.0]
        loo = []
        for i, p in enumerate(pts):
            others = pts[:i] + pts[i + 1:]
            if others:
                q = min(others, key=lambda o: (o[0] - p[0]) ** 2 + 0.25 * (o[1] - p[1]) ** 2)
                d = math.sqrt((q[0] - p[0]) ** 2 + 0.25 * (q[1] - p[1]) ** 2)
                loo.append((p[4], abs(q[2] / p[2] - 1), d))
        ev["points"] = loo
        # kernel tables: each token count predicted from its neighbours (interior points), p90
        errs = []
        for g in self._gemms:
            lts, rs = g[2], g[3]
            for i in range(1, len(lts) - 1):
                errs.append(abs(np.interp(lts[i], (lts[i - 1], lts[i + 1]), (rs[i - 1], rs[i + 1])) / rs[i] - 1))
        ev["kernels"] = float(np.quantile(errs, 0.9)) if errs else 0.0
        # attention table: its leave-one-out p90 by kind of step, with the transfer terms (band's attention factor)
        att = self._attention
        if att is not None:
            other = att.tp != self.roofline.model.tensor_parallel and not self._compute.distance % 2
            xfer = _quad(self._transfer_width(self._compute), BAND_TRANSFER_MODEL if other else 0.0)
            ev["attention"] = {kind: _sym(_quad(BAND_STRUCTURE, w, xfer)) for kind, w in att.loo.items()}
        ev["gemm_shapes"] = {round(g[0], 2) for g in self._gemms}
        # copies: the latency + size / rate model against the measured curve (16 MiB and up)
        if copies is not None:
            res = [abs((self._latency + n / self._rate) / (n / bw) - 1) for n, bw in copies.profile.h2d if n >= 16 * 2**20]
            w = max(res) if res and kind == self.roofline.hw.host_link else 0.0
            ev["copy"] = _quad(BAND_STRUCTURE, w, BAND_TRANSFER_LINK if copies.distance >= 2 and kind ==
                               self.roofline.hw.host_link else 0.0, DATASHEET_COPY if kind != self.roofline.hw.host_link
                               else 0.0)
        else:
            ev["copy"] = _quad(BAND_STRUCTURE, DATASHEET_COPY)
        # launch: spread of the launch-bound measurements around their median
        src = self._launch_src
        bound = [sec for _, _, r, sec, _ in self._points if r == 1.0] if src is self._compute else []
        if src is None:
            ev["launch"] = DATASHEET_LAUNCH
        else:
            # one measurement (or a launch time given without its rows) says nothing of the spread:
            # 30%, twice the 0.68-0.86 ms spread of the H100 probe's launch-bound rows
            spread = (max(bound) - min(bound)) / 2 / _median(bound) if len(bound) > 1 else BAND_LAUNCH_ONE
            ev["launch"] = _sym(_quad(BAND_STRUCTURE, spread))
        return ev

    def _transfer_width(self, src: _Source | None) -> float:
        if src is None:
            return 0.0
        return _quad(BAND_TRANSFER_GPU if src.distance >= 2 else 0.0, BAND_TRANSFER_MODEL if src.distance % 2 else 0.0)

    def band(self, s: StepShape) -> Band:
        """(low, high) cost factors for step ``s``, from evidence: the calibration's leave-one-out
        residuals (growing with the distance to the nearest measured shape), BAND_STRUCTURE, the
        transfer terms when the source is another GPU or model, datasheet factors for whatever no
        source measured (attention under per-kernel profiles without an attention table, launch, copies).
        A measured attention table's term is its leave-one-out p90 for the step's kind (``_AttentionTable``),
        with BAND_TRANSFER_MODEL when the table is another tensor-parallel degree's."""
        last = self._band_last
        if s is last[0]:  # a Corner asks for the layer's and then the head's band of one step
            return last[1]
        band = self._band(s)
        last[0], last[1] = s, band
        return band

    def _band(self, s: StepShape) -> Band:
        rf, ev = self.roofline, self._evidence
        host = (0.5, 2.0) if rf.replays_graph(s) else ev["launch"]
        copy = _sym(ev["copy"])
        xfer = self._transfer_width(self._compute)
        if self._points:
            p = self._nearest(s)
            if p[2] == 1.0:  # launch-bound measurement: the GPU time is the datasheet's
                return Band(datasheet_gpu(rf), host, copy)
            lt, lk = math.log(s.tokens), math.log(max(s.kv_tokens, 1))
            d = math.sqrt((p[0] - lt) ** 2 + 0.25 * (p[1] - lk) ** 2)
            own = [(e, dd) for shape, e, dd in ev["points"] if shape == p[4]]
            interp = min(1.0, d / own[0][1]) * own[0][0] if own and own[0][1] > 0 else 0.0
            return Band(_sym(_quad(BAND_STRUCTURE, interp, xfer)), host, copy)
        if self._gemms:
            parts = rf.parts(s)
            w_meas = _quad(BAND_STRUCTURE, ev["kernels"], xfer)
            lo = hi = total = 0.0
            for name, shape in rf.model.layer_param_shapes:
                if len(shape) != 2:
                    continue
                other = round(math.log(shape[0] * shape[1]), 2) not in ev["gemm_shapes"]
                w = _quad(w_meas, BAND_TRANSFER_MODEL if other and not self._compute.distance % 2 else 0.0)
                t = parts[name]
                lo, hi, total = lo + t * _sym(w)[0], hi + t * _sym(w)[1], total + t
            f_att = datasheet_gpu(rf, attention=True)
            if self._attention is not None:  # measured attention: weighed at its calibrated time, its table's error
                kind, ratio = self._attention.lookup(s)
                parts["attention"] *= ratio
                f_att = ev["attention"].get(kind, f_att)
            # all-reduce: measured (Profile.allreduce of this degree) or the ring model (allreduce_band); over
            # the host link (no NVLink: LayerCost.link_comm) a factor of its own, else weighed in with the rest
            f_ar = _sym(_quad(BAND_STRUCTURE, xfer)) if self._allreduce else allreduce_band(rf)
            own = rf.model.tensor_parallel > 1 and not rf.hw.gpu_link_bw
            classes = [("elementwise", _sym(w_meas)), ("attention", f_att)] + ([] if own else [("allreduce", f_ar)])
            for name, f in classes:
                t = parts[name]
                lo, hi, total = lo + t * f[0], hi + t * f[1], total + t
            return Band((lo / total, hi / total), host, copy, f_ar if own else None)
        return Band(datasheet_gpu(rf), host, copy)

    @property
    def model(self) -> ModelSpec:
        return self.roofline.model

    @property
    def profiles(self) -> tuple[Profile, ...]:
        return self.profile if isinstance(self.profile, tuple) else (self.profile,)

    @property
    def copy_slowdown(self) -> float:
        return self._compute.profile.copy_slowdown if self._compute is not None else self.roofline.copy_slowdown

    def _nearest(self, s: StepShape):
        lt, lk = math.log(s.tokens), math.log(max(s.kv_tokens, 1))
        return min(self._points, key=lambda p: (p[0] - lt) ** 2 + 0.25 * (p[1] - lk) ** 2) if self._points else None

    def _gemm_ratio(self, shape: tuple[int, int], tokens: int, op: str = "") -> float:
        _, _, lts, ratios = _nearest_gemm(self._gemms, shape, op)
        return float(np.interp(math.log(tokens), lts, ratios))

    def _elementwise_ratio(self, tokens: int) -> float:
        _, lts, ratios = self._elem_table
        return float(np.interp(math.log(tokens), lts, ratios))

    def _allreduce_time(self, tokens: int) -> float:
        rf = self.roofline
        if not self._allreduce or rf.model.tensor_parallel == 1:
            return 2 * rf.allreduce_time(tokens)
        _, lbs, ratios = self._allreduce
        nbytes = rf.model.hidden_state_bytes(tokens)
        return 2 * rf.allreduce_seconds(nbytes, rf.model.tensor_parallel) * float(np.interp(math.log(nbytes), lbs, ratios))

    def gemm_seconds(self, tokens: int) -> float:
        """One layer's GEMMs over ``tokens`` rows under a per-kernel profile: each weight's roofline time
        at the efficiency measured for the nearest weight shape (validation/efficiency.py moves them
        between GPUs with this)."""
        rf, lt = self.roofline, math.log(tokens)
        gpu = 0.0
        for shape, (_, _, lts, ratios) in self._gemm_tables:
            gpu += rf.gemm_time(shape, tokens) * float(np.interp(lt, lts, ratios))
        return gpu

    def gpu_host(self, s: StepShape) -> tuple[float, float]:
        """(GPU seconds, host seconds) of one layer for step ``s``, before CUDA graphs."""
        rf = self.roofline
        if rf.model.tensor_parallel == 1 and self._points:  # the common case, once per simulated step
            p = self._nearest(s)
            return rf.gpu_time(s) * p[2], p[3]
        ar = self._allreduce_time(s.tokens)
        if self._points:
            p = self._nearest(s)
            return (rf.gpu_time(s) - 2 * rf.allreduce_time(s.tokens)) * p[2] + ar, p[3]
        if self._gemms:
            gpu = rf.attention_time(s) * (self._attention.ratio(s) if self._attention else 1.0) + ar
            gpu += self.gemm_seconds(s.tokens)
            gpu += rf.elementwise_time(s.tokens) * (self._elementwise_ratio(s.tokens) if self._elem_table else 1.0)
            return gpu, self._launch
        return rf.gpu_time(s) - 2 * rf.allreduce_time(s.tokens) + ar, self._launch

    def layer(self, s: StepShape) -> LayerCost:
        """GPU time transferred by efficiency; host time measured (eager), unless the step replays a
        CUDA graph (``roofline.cuda_graphs``), which the eager measurements do not cover."""
        rf = self.roofline
        gpu, host = self.gpu_host(s)
        if rf.replays_graph(s):
            host = rf.launch_time(s)
        return LayerCost(gpu, host, rf.kernel_floor, min(rf.link_comm_time(s), gpu))

    def pre_attention(self, s: StepShape) -> float:
        """As Roofline.pre_attention, by the efficiency the QKV projection's time is moved with."""
        t = self.roofline.pre_attention(s)  # the QKV projection, the first of _gemm_tables
        if self._points:
            return t * self._nearest(s)[2]
        if self._gemms:
            _, (_, _, lts, ratios) = self._gemm_tables[0]
            return t * float(np.interp(math.log(s.tokens), lts, ratios))
        return t

    def head(self, s: StepShape) -> float:
        return self.roofline.head(s)

    def transfer(self, nbytes: float) -> float:
        """Latency + size / streaming rate, both read off the measured bandwidth curve (the rate
        shared like the roofline's, ``roofline.link_share``)."""
        return self._latency + nbytes * self.roofline.link_share / self._rate

    def uva_read(self, nbytes: float, tokens: int) -> float:
        """Measured UVA GEMM seconds per weight byte at ``tokens`` rows (Profile.uva_gemm), else the
        roofline's tile assumption over the measured copy rate. The rows come from the copy source's
        Profile (the same host link), else from any given Profile that measured them."""
        profiles = (self.profile,) if isinstance(self.profile, Profile) else tuple(self.profile)
        if self._copies is not None:
            profiles = (self._copies.profile,) + profiles
        rows = next((p.uva_gemm for p in profiles if p.uva_gemm), ())
        if not rows:
            return self._latency + nbytes * self.roofline.uva_reads(tokens) * self.roofline.link_share / self._rate
        return nbytes * uva_seconds_per_byte(rows, tokens) * self.roofline.link_share

    @property
    def link_share(self) -> float:
        return self.roofline.link_share

    # ---- what was transferred, and how near the measurements are ----
    def measured_tokens(self) -> tuple[int, ...]:
        """Token counts per step the compute calibration measured (empty: none, datasheet compute)."""
        if self._points:
            return tuple(sorted({b * t for _, _, _, _, (b, t, c) in self._points}))
        if self._compute is not None and self._compute.profile.kernels:
            return tuple(sorted({t for _, t, _, _ in self._compute.profile.kernels}))
        return ()

    def check_near(self, lo: int, hi: int, what: str = "steps") -> None:
        """Raise when the compute calibration has no measured shape within a factor NEAR of the
        step token counts ``lo``..``hi`` a simulation will ask for."""
        toks = self.measured_tokens()
        if not toks:
            return
        for n in {lo, hi}:
            near = min(toks, key=lambda t: abs(math.log(t / n)))
            if abs(math.log(near / n)) > math.log(NEAR):
                raise ConfigError("profile", self._compute.profile.meta.get("source", self._compute.label),
                                  f"a measured row near {what} of {n} tokens (nearest measured: {near} tokens; "
                                  f"measure shapes within {NEAR:.0f}x)")

    def describe(self) -> str:
        """One line: what was transferred from what, e.g. 'H100 llama-3.1-8b profile applied to
        llama-3.1-70b on H200-SXM-141GB by efficiency transfer (...)'."""
        rf = self.roofline
        target = f"{rf.model.name} on {rf.hw.name}"
        c = self._compute
        srcs = [x for x in (c, self._copies, self._launch_src) if x is not None]
        labels = list(dict.fromkeys(x.label for x in srcs))
        if c is not None and all(x.distance == 0 for x in srcs):
            how = "as measured (same GPU and model)"
        else:
            how = "by efficiency transfer"
        if c is None:
            comp = "compute: datasheet roofline"
        elif self._points:
            comp = f"compute: {c.label}'s whole-layer efficiencies by tokens and context"
        else:
            att = self._attention
            if att is None:
                how_att = "attention from the datasheet"
            else:
                how_att = f"attention by step shape from its tp{att.tp} table" + \
                    ("" if att.tp == rf.model.tensor_parallel else " (another degree's: a model transfer)")
            comp = f"compute: {c.label}'s GEMM efficiencies by tokens and shape, elementwise by tokens, {how_att}"
        launch = f"launch: {self._launch * 1e3:.3f} ms/layer from " + \
            (f"{self._launch_src.label} (host time kept)" if self._launch_src else "the roofline default")
        extra = ""
        if self._allreduce:
            extra = f"; all-reduce: {self._allreduce[0].label}'s efficiencies"
        if c is not None and c.distance >= 2:  # BAND_TRANSFER_GPU's evidence: validation/efficiency.py
            extra += f"; measured on another GPU: its kernels' band +-{BAND_TRANSFER_GPU:.0%}, as far as " \
                     "efficiencies moved between the GPUs profiled here erred (p90); a profile of the target is better"
        return f"{' + '.join(labels) or 'no'} profile applied to {target} {how} ({comp}; {self._link_note}; " \
               f"{launch}{extra})"


@dataclass(frozen=True)
class Corner:
    """A cost model at the low (``side`` 0) or high (1) end of its band: every GPU, host and copy
    cost scaled by the band's factor. Running a step or a workload on both corners propagates the
    band to step time, throughput, TTFT and TPOT (lower costs: the optimistic corner)."""

    base: object
    side: int

    def __post_init__(self):
        if self.side not in (0, 1):
            raise ConfigError("side", self.side, "0 (low costs) or 1 (high costs)")

    @property
    def context_monotone(self) -> bool:
        """As the base's, where the band does not change with the context (the roofline's does not)."""
        return isinstance(self.base, Roofline)

    def layer(self, s: StepShape) -> LayerCost:
        c, b = self.base.layer(s), self.base.band(s)
        g = b.gpu[self.side]
        if b.comm is None:
            return LayerCost(c.gpu * g, c.host * b.host[self.side], c.tail, c.link_comm * g)
        comm = c.link_comm * b.comm[self.side]  # the all-reduces over the host link at their own factor
        return LayerCost((c.gpu - c.link_comm) * g + comm, c.host * b.host[self.side], c.tail, comm)

    def head(self, s: StepShape) -> float:
        return self.base.head(s) * self.base.band(s).gpu[self.side]

    def pre_attention(self, s: StepShape) -> float:
        return self.base.pre_attention(s) * self.base.band(s).gpu[self.side]

    @functools.cached_property
    def _copy(self) -> float:
        # the copy factor does not depend on the step: any shape will do
        return self.base.band(StepShape.uniform(1, 1, 0)).copy[self.side]

    def transfer(self, nbytes: float) -> float:
        return self.base.transfer(nbytes) * self._copy

    def uva_read(self, nbytes: float, tokens: int) -> float:
        """UVA's reads are host-link transfers: scaled by the copy factor like ``transfer``."""
        return self.base.uva_read(nbytes, tokens) * self._copy

    def band(self, s: StepShape) -> Band:
        return self.base.band(s)

    def __getattr__(self, name):  # model, copy_slowdown, link_share, roofline, describe, ...
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.base, name)


def uva_seconds_per_byte(rows, tokens: int) -> float:
    """Seconds per weight byte of a GEMM reading its weight over UVA, at ``tokens`` rows, from
    measured (tokens, weight bytes, seconds) rows: interpolated in log(tokens) between measured
    token counts; below the smallest, its rate; above the largest, growing in proportion to the
    tokens (each further M-tile reads the weight again)."""
    pts = sorted((t, sec / b) for t, b, sec in rows)
    if tokens <= pts[0][0]:
        return pts[0][1]
    if tokens >= pts[-1][0]:
        return pts[-1][1] * tokens / pts[-1][0]
    for (t0, r0), (t1, r1) in zip(pts, pts[1:]):
        if t0 <= tokens <= t1:
            w = (math.log(tokens) - math.log(t0)) / (math.log(t1) - math.log(t0)) if t1 > t0 else 0.0
            return r0 + w * (r1 - r0)
    raise AssertionError(f"tokens {tokens} outside {pts}")


def _link_model(h2d: tuple[tuple[float, float], ...]) -> tuple[float, float]:
    """(latency s, streaming rate B/s) of a measured bandwidth-by-size table.

    Measured copy time t(n) = n / bw(n) is latency + n / rate: the rate is the slope between the
    two largest transfers (where the link is saturated; copies queued back to back on a stream run
    at it), the latency what the smallest transfer spends beyond n / rate.
    """
    pts = sorted((n, n / bw) for n, bw in h2d)
    best_bw = max(bw for _, bw in h2d)
    if len(pts) < 2:
        return 0.0, best_bw
    (n0, t0), (n1, t1) = pts[-2], pts[-1]
    rate = (n1 - n0) / (t1 - t0) if t1 > t0 else best_bw
    rate = max(rate, best_bw)  # never slower than a measured copy
    n_min, t_min = pts[0]
    return max(0.0, t_min - n_min / rate), rate


def cost_model(model: ModelSpec, hw: HardwareSpec, profile: Profile | None = None, **roofline_kw):
    """The default cost model: the roofline, calibrated by ``profile`` when one is given."""
    rf = Roofline(model, hw, **roofline_kw)
    return Calibrated(rf, profile) if profile is not None else rf
