"""Cost models: how long one decoder layer, the LM head and one host->device copy take.

Two implementations of one small interface (``layer``, ``head``, ``transfer``, ``copy_slowdown``):
- ``Roofline``: from the HardwareSpec alone. Each kernel of a layer takes
  max(FLOPs / (peak x efficiency), bytes / (HBM bandwidth x efficiency), a launch floor); the host
  spends ``eager_launch_per_layer`` launching a layer's kernels, or almost nothing when decode steps
  replay a CUDA graph (vLLM's default for decode batches up to 256 sequences).
- ``Calibrated``: a measured Profile. Copy time = latency + size / streaming rate, both read off
  the measured bandwidth curve; layer GPU
  time = roofline x the measured/roofline ratio at the nearest measured shape; host launch time
  from the launch-bound measurements.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field

from ..errors import ConfigError
from ..profile import Profile
from ..specs import HardwareSpec, ModelSpec


@dataclass(frozen=True)
class StepShape:
    """What one forward step computes, summed over its sequences.

    ``pairs`` counts causal query-key pairs (attention work); ``kv_tokens`` counts cached plus new
    tokens whose K/V are read; ``decode_only`` is true when every sequence adds one token.
    """

    seqs: int
    tokens: int
    pairs: float
    kv_tokens: int
    decode_only: bool

    @classmethod
    def uniform(cls, batch: int, new: int, context: int) -> "StepShape":
        """``batch`` sequences, each adding ``new`` tokens after ``context`` cached ones."""
        for name, v, lo in (("batch", batch, 1), ("new_tokens", new, 1), ("context", context, 0)):
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ConfigError(name, v, f"an integer >= {lo}")
        pairs = batch * (new * context + new * (new + 1) / 2)
        return cls(batch, batch * new, pairs, batch * (context + new), new == 1)

    @classmethod
    def of(cls, seqs: list[tuple[int, int]]) -> "StepShape":
        """From (new tokens, context) per sequence."""
        tokens = pairs = kv = 0
        for new, ctx in seqs:
            tokens += new
            pairs += new * ctx + new * (new + 1) / 2
            kv += ctx + new
        return cls(len(seqs), tokens, pairs, kv, tokens == len(seqs))


@dataclass(frozen=True)
class LayerCost:
    gpu: float  # seconds of GPU work for one layer
    host: float  # seconds the host spends launching it
    tail: float  # GPU seconds of its last kernel (what is left after the host's last launch)
    link_comm: float = 0.0  # seconds of ``gpu`` spent in all-reduces over the host link (no NVLink)


@dataclass(frozen=True)
class Roofline:
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
    # the graphs between attention ops (attention launched eagerly), longer steps run compiled code
    graph_mode: str = "decode"
    # host seconds per layer of a piecewise replay: one graph launch and the eager attention and
    # KV-cache-write custom ops (~3 launches of ~10 us through Python; an ASSUMPTION, not measured)
    piecewise_launch_per_layer: float = 30e-6
    copy_slowdown: float = 1.0
    allreduce_latency: float = 5e-6  # seconds per ring hop
    link_share: float = 1.0  # GPUs copying at once over this GPU's host link (tensor parallelism)

    def __post_init__(self):
        for f in ("matmul_eff", "attention_eff", "memory_eff"):
            v = getattr(self, f)
            if not 0 < v <= 1:
                raise ConfigError(f, v, "an efficiency in (0, 1]")
        if not self.copy_slowdown >= 1:
            raise ConfigError("copy_slowdown", self.copy_slowdown, "a multiplier >= 1")
        if not self.link_share >= 1:
            raise ConfigError("link_share", self.link_share, "a number of GPUs >= 1")
        if self.graph_mode not in ("decode", "piecewise"):
            raise ConfigError("graph_mode", self.graph_mode, "'decode' (V0) or 'piecewise' (V1)")

    def _kernel(self, flops: float, nbytes: float, eff: float) -> float:
        return max(flops / (self.hw.peak_flops * eff), nbytes / (self.hw.hbm_bw * self.memory_eff),
                   self.kernel_floor)

    def gpu_time(self, s: StepShape) -> float:
        m = self.model
        act = 2  # activation bytes per element
        q, kv = m.heads * m.head_dim, m.kv_heads * m.head_dim
        gemms = 0.0
        for name, shape in m.layer_param_shapes:
            if len(shape) != 2:
                continue
            out_f, in_f = shape
            gemms += self._kernel(2.0 * out_f * in_f * s.tokens,
                                  out_f * in_f * m.weight_bytes + s.tokens * (in_f + out_f) * act, self.matmul_eff)
        attn = self._kernel(4.0 * q * s.pairs,
                            s.kv_tokens * m.kv_bytes_per_token_layer + 2 * s.tokens * q * act, self.attention_eff)
        # norms, RoPE, SiLU*mul, residual adds, KV-cache write: read+write of the activations
        elementwise_bytes = s.tokens * act * (8 * m.hidden + 2 * (q + 2 * kv) + 3 * m.intermediate)
        n_elem = self.kernels_per_layer - 5
        elem = max(elementwise_bytes / (self.hw.hbm_bw * self.memory_eff), n_elem * self.kernel_floor)
        return gemms + attn + elem + 2 * self.allreduce_time(s.tokens)

    def allreduce_time(self, tokens: int) -> float:
        """One ring all-reduce of the hidden states across the tensor-parallel GPUs (two per layer:
        after attention and after the MLP), over NVLink, or over PCIe when the GPU has none."""
        tp = self.model.tensor_parallel
        if tp == 1:
            return 0.0
        nbytes = tokens * self.model.hidden * 2
        bw = self.hw.gpu_link_bw or self.hw.host_link_bw
        return 2 * (tp - 1) / tp * nbytes / bw + 2 * (tp - 1) * self.allreduce_latency

    def link_comm_time(self, s: StepShape) -> float:
        """Seconds of a layer's all-reduces that cross the GPU's host (PCIe) link, competing with
        its copies: all of them on a GPU without NVLink, none otherwise."""
        return 0.0 if self.hw.gpu_link_bw else 2 * self.allreduce_time(s.tokens)

    def replays_graph(self, s: StepShape) -> bool:
        """vLLM V0 captures decode steps of up to ``max_graph_batch`` sequences in CUDA graphs; V1
        (``graph_mode="piecewise"``) every step of up to ``max_graph_batch`` tokens, in pieces."""
        if self.graph_mode == "piecewise":
            return self.cuda_graphs and s.tokens <= self.max_graph_batch
        return self.cuda_graphs and s.decode_only and s.seqs <= self.max_graph_batch

    def launch_time(self, s: StepShape) -> float:
        if not self.replays_graph(s):
            return self.eager_launch_per_layer
        if self.graph_mode == "piecewise" and not s.decode_only:
            return self.piecewise_launch_per_layer
        return self.graph_launch_per_layer

    def layer(self, s: StepShape) -> LayerCost:
        return LayerCost(self.gpu_time(s), self.launch_time(s), self.kernel_floor, self.link_comm_time(s))

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


@dataclass(frozen=True)
class Calibrated:
    """Roofline corrected by a measured Profile (see module docstring)."""

    roofline: Roofline
    profile: Profile
    _points: tuple = field(init=False, repr=False, compare=False)
    _launch: float = field(init=False, repr=False, compare=False)
    _latency: float = field(init=False, repr=False, compare=False)
    _rate: float = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        rf, prof = self.roofline, self.profile
        pts = [(StepShape.uniform(b, t, c), sec) for b, t, c, sec in prof.layer_times]
        # launch-bound measurements: the roofline says the GPU would be done in under half the time,
        # so the in-stack time is the host's launch time and says nothing about the GPU's.
        roof = [rf.gpu_time(s) for s, _ in pts]
        launch_bound = [r < 0.5 * sec for r, (_, sec) in zip(roof, pts)]
        launch = prof.launch_per_layer
        if launch is None:
            bound = [sec for (s, sec), lb in zip(pts, launch_bound) if lb]
            launch = statistics.median(bound) if bound else rf.eager_launch_per_layer
        points = []
        for (s, sec), r, lb in zip(pts, roof, launch_bound):
            ratio = 1.0 if lb else sec / r
            host = sec if lb else launch
            points.append((math.log(s.tokens), math.log(max(s.kv_tokens, 1)), ratio, host))
        object.__setattr__(self, "_points", tuple(points))
        object.__setattr__(self, "_launch", launch)
        lat, rate = _link_model(prof.h2d)
        object.__setattr__(self, "_latency", lat)
        object.__setattr__(self, "_rate", rate)

    @property
    def model(self) -> ModelSpec:
        return self.roofline.model

    @property
    def copy_slowdown(self) -> float:
        return self.profile.copy_slowdown

    def _nearest(self, s: StepShape):
        lt, lk = math.log(s.tokens), math.log(max(s.kv_tokens, 1))
        return min(self._points, key=lambda p: (p[0] - lt) ** 2 + 0.25 * (p[1] - lk) ** 2) if self._points else None

    def layer(self, s: StepShape) -> LayerCost:
        """GPU time scaled by the nearest measurement; host time measured (eager), unless the step
        replays a CUDA graph (``roofline.cuda_graphs``), which the eager measurements do not cover."""
        rf = self.roofline
        r = rf.gpu_time(s)
        p = self._nearest(s)
        gpu, host = (r, self._launch) if p is None else (r * p[2], p[3])
        if rf.replays_graph(s):
            host = rf.launch_time(s)
        return LayerCost(gpu, host, rf.kernel_floor, min(rf.link_comm_time(s), gpu))

    def head(self, s: StepShape) -> float:
        return self.roofline.head(s)

    def transfer(self, nbytes: float) -> float:
        """Latency + size / streaming rate, both read off the measured bandwidth curve (the rate
        shared like the roofline's, ``roofline.link_share``)."""
        return self._latency + nbytes * self.roofline.link_share / self._rate

    @property
    def link_share(self) -> float:
        return self.roofline.link_share


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
