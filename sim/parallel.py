"""Where a deployment's GPUs are and what they send each other: tensor and pipeline parallelism.

vLLM's layout: ``tensor_parallel`` GPUs of one node share every layer of a stage (two all-reduces per
layer); ``pipeline_parallel`` stages hold consecutive layers (``ModelSpec.stages``) and pass the
hidden states on; stage s uses GPUs s*tp .. s*tp+tp-1, filling nodes in order. One home for the
arithmetic: each GPU's model part, which node a stage is on, the bytes and seconds of what crosses
a link, how many GPUs share a host link, and the pinned host memory per node.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..checks import check_int
from ..errors import ConfigError
from ..specs import HardwareSpec, ModelSpec

P2P_LATENCY = 10e-6  # seconds per send between GPUs of one node


@dataclass(frozen=True)
class Layout:
    """A model deployed over ``tensor_parallel x pipeline_parallel`` GPUs of type ``hw``."""

    model: ModelSpec  # the whole model
    hw: HardwareSpec
    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    stages: tuple[ModelSpec, ...] = field(init=False, repr=False)  # one GPU's part of each stage

    def __post_init__(self):
        tp, pp, hw = self.tensor_parallel, self.pipeline_parallel, self.hw
        check_int("tensor_parallel", tp)
        check_int("pipeline_parallel", pp)
        if tp > hw.gpus_per_node:
            raise ConfigError("tensor_parallel", tp, f"at most the {hw.gpus_per_node} GPUs of a {hw.name} node "
                              "(tensor parallelism stays inside a node)")
        if tp * pp > hw.gpus_per_node and hw.gpus_per_node % tp:
            raise ConfigError("tensor_parallel", tp, f"a divisor of the {hw.gpus_per_node} GPUs of a {hw.name} node "
                              f"when the {tp * pp} GPUs span nodes (a stage must not straddle two)")
        object.__setattr__(self, "stages", self.model.shard(tp).stages(pp))

    @property
    def gpus(self) -> int:
        return self.tensor_parallel * self.pipeline_parallel

    @property
    def nodes(self) -> int:
        return math.ceil(self.gpus / self.hw.gpus_per_node)

    def node_of(self, stage: int) -> int:
        return stage * self.tensor_parallel // self.hw.gpus_per_node

    def gpus_on_node(self, node: int) -> int:
        return min(self.hw.gpus_per_node, self.gpus - node * self.hw.gpus_per_node)

    @property
    def link_share(self) -> int:
        """GPUs that copy over one host link at once. Tensor-parallel GPUs copy their shards in lock
        step; pipeline stages of a busy pipeline run (and copy) concurrently too, so every GPU of
        the deployment behind one link is counted: an upper bound when stages sit idle."""
        return min(self.gpus_on_node(0), self.hw.gpus_per_host_link)

    def send_bytes(self, tokens: int) -> int:
        """Bytes each GPU of a stage sends to the next: the hidden states of the step's tokens."""
        return self.model.hidden_state_bytes(tokens)

    def send_time(self, stage: int, tokens: int) -> float:
        """Seconds to hand ``tokens`` tokens' hidden states from ``stage`` to the next one: over
        NVLink (or PCIe peer-to-peer without it) inside a node, over the network between nodes."""
        assert 0 <= stage < self.pipeline_parallel - 1, f"stage {stage} has no next stage"
        hw, n = self.hw, self.send_bytes(tokens)
        if self.node_of(stage) != self.node_of(stage + 1):
            return hw.network_latency + n / hw.network_bw
        return P2P_LATENCY + n / (hw.gpu_link_bw or hw.host_link_bw)

    def host_pinned(self, pinned_per_stage: list[float]) -> list[float]:
        """Pinned host bytes per node, from each stage's per-GPU pinned bytes."""
        per_node = [0.0] * self.nodes
        for s, b in enumerate(pinned_per_stage):
            per_node[self.node_of(s)] += b * self.tensor_parallel
        return per_node

    def describe(self) -> str:
        sizes = ",".join(str(s.layers) for s in self.stages)
        return (f"{self.gpus}x {self.hw.name} on {self.nodes} node(s): tensor_parallel={self.tensor_parallel}, "
                f"pipeline_parallel={self.pipeline_parallel} (layers per stage {sizes})")
