"""A vLLM-like serving loop on top of the step model.

Requests arrive (a SimPy process feeding a Store); the engine loop schedules one batch at a time
and advances the clock by the simulated step time. Scheduling follows vLLM:
- without chunked prefill (vLLM V0's default): a step is either a prefill of newly admitted
  requests (whole prompts, up to ``max_num_batched_tokens`` and ``max_num_seqs``, while KV blocks
  last) or a decode of every running request; prefills go first;
- with chunked prefill (vLLM V1): each step spends its token budget on running decodes first,
  then on prompt chunks;
- KV blocks (``block_size`` tokens) are allocated as tokens are computed; when a decode needs a
  block and none is free, the most recently admitted request is preempted and recomputed later.

Decode steps of an unchanging batch are taken together (``_decode_run``); without chunked prefill the
running requests that decode share one clock (``_Cohort``; V1's engine, sim/serving_v1.py, uses it too),
so a decode run costs Python per request that joins, finishes or is preempted, not per running request.
Both are exact.
"""
from __future__ import annotations

import heapq
import math
from collections import deque
from dataclasses import dataclass
from functools import reduce
from itertools import repeat
from operator import add

import simpy

from ..checks import check_int
from ..errors import ConfigError
from ..specs import KV_CACHE_DTYPES
from .costs import StepShape
from .step import CountingEnvironment, StepModel, StepResult
from .workload import Request


WATERMARK = 0.01  # vLLM V0's block watermark: admission leaves this fraction of KV blocks free


@dataclass(frozen=True)
class EngineConfig:
    gpu_memory_utilization: float = 0.9
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    max_model_len: int = 8192
    block_size: int = 16
    chunked_prefill: bool = False
    mode: str = "prefill+decode"  # or "prefill-only": every request stops after its first token
    overhead_bytes: float = 0.5 * 1024**3  # CUDA context, cuBLAS workspaces, CUDA graphs
    tensor_parallel: int = 1  # GPUs of one node sharing every layer (vLLM's --tensor-parallel-size)
    pipeline_parallel: int = 1  # stages of consecutive layers, one virtual engine each (--pipeline-parallel-size)
    # Which vLLM engine schedules: "v0" (this module; vLLM <= 0.7, the paper's) or "v1" (sim/serving_v1.py;
    # vLLM >= 0.8). The fields below apply to V1 only; sim/vllm_engine.py sets them per vLLM version.
    scheduler: str = "v0"
    prefix_caching: bool = False  # full-block hashes: a preempted request finds its own blocks again
    # the prefix cache starts holding every request's full prompt blocks, as an earlier run of the same requests
    # left it (a benchmark sweep sending the same prompts at each rate to one server): V1 with prefix_caching
    prefix_cache_warm: bool = False
    reserve_full_isl: bool = False  # admit a waiting request only if its whole sequence's blocks are free
    async_scheduling: bool = False  # the host prepares step n+1 while the GPU runs step n
    # vLLM's --kv-cache-dtype: "auto" keeps the model's, fp8* one byte per element (specs.KV_CACHE_DTYPES;
    # applied to the model by ModelSpec.with_kv_cache_dtype wherever the simulator lays out a deployment)
    kv_cache_dtype: str = "auto"
    # vLLM's kv_cache_memory_bytes: the KV cache per GPU in bytes, in place of what
    # gpu_memory_utilization leaves (sim/memory.py plan_memory); None: profiled as usual
    kv_cache_memory_bytes: float | None = None
    # vLLM's num_gpu_blocks_override: the KV cache per GPU is this many blocks, whatever the memory budget
    # gives (vllm/v1/core/kv_cache_utils.py, which replaces the profiled block count with it; it wins over
    # kv_cache_memory_bytes); None: the budget's blocks
    num_gpu_blocks_override: int | None = None

    def __post_init__(self):
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ConfigError("gpu_memory_utilization", self.gpu_memory_utilization, "a fraction in (0, 1]")
        for f in ("max_num_seqs", "max_num_batched_tokens", "max_model_len", "block_size", "tensor_parallel",
                  "pipeline_parallel"):
            check_int(f, getattr(self, f), 1)
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ConfigError("kv_cache_dtype", self.kv_cache_dtype, "one of " + ", ".join(KV_CACHE_DTYPES))
        if self.mode not in ("prefill+decode", "prefill-only"):
            raise ConfigError("mode", self.mode, "'prefill+decode' or 'prefill-only'")
        if self.kv_cache_memory_bytes is not None and not self.kv_cache_memory_bytes > 0:
            raise ConfigError("kv_cache_memory_bytes", self.kv_cache_memory_bytes, "bytes > 0, or None")
        if self.num_gpu_blocks_override is not None:
            check_int("num_gpu_blocks_override", self.num_gpu_blocks_override, 1)
        if not self.overhead_bytes >= 0:
            raise ConfigError("overhead_bytes", self.overhead_bytes, "bytes >= 0")
        if self.scheduler not in ("v0", "v1"):
            raise ConfigError("scheduler", self.scheduler, "'v0' or 'v1' (vLLM's engine generation)")
        if self.scheduler == "v0" and (self.prefix_caching or self.reserve_full_isl or self.async_scheduling):
            raise ConfigError("scheduler", self.scheduler, "'v1' for prefix_caching, reserve_full_isl or "
                              "async_scheduling (V1 engine features)")
        if self.prefix_cache_warm and not (self.prefix_caching and self.pipeline_parallel == 1):
            raise ConfigError("prefix_cache_warm", True, "prefix_caching on (V1) and one pipeline stage (a warm "
                              "cache is modelled for one engine's block pool)")


class _Seq:
    __slots__ = ("req", "output_len", "generated", "computed", "blocks", "first", "finish", "preempted", "sent",
                 "hashed", "gen", "adm", "off")

    def __init__(self, req: Request, output_len: int):
        self.req, self.output_len = req, output_len
        self.generated = self.computed = self.blocks = self.preempted = 0
        self.hashed = self.gen = 0  # V1 prefix caching: full blocks hashed; admissions so far
        # the shared decode clock (_Cohort): the engine's admission number of this request's last admission
        # (running requests are in that order), and, while it decodes as a member of the clock's cohort, the
        # clock's tick at which it had generated nothing (None: its fields are its own)
        self.adm, self.off = 0, None
        self.first = self.finish = math.nan
        self.sent = req.arrival  # when the client sent it: later than arrival only under max_concurrency

    @property
    def known(self) -> int:  # tokens whose KV must exist before the next sample
        return self.req.prompt_len + self.generated

    @property
    def uncomputed(self) -> int:
        return self.known - self.computed


class _Cohort:
    """The shared decode clock: running requests that decode (prompt done, a token out) advance one token
    per ``tick`` (a step in which each of them decodes), so the engine pays Python per request that joins,
    leaves or finishes, not per member per step. Both engines use it: V0 without chunked prefill
    (``ServingLoop``, where every running request decodes in a decode step) and V1 (``V1ServingLoop``, where
    the members are scheduled beside the requests still prefilling).

    A member's own counters are stale; its true ones follow from the tick (``counters``): generated =
    tick - off, computed = prompt_len - 1 + generated, blocks = ceil(computed / block_size), or of one token
    more once the step's blocks are ``taken``. The cohort is kept as the sums a step and a decode run need:
    the members by (computed - tick) mod block_size (``phase``: who takes a block at a tick), the sum of
    computed - tick (``base``: the step's KV) and a heap of the ticks at which they finish (``ends``; an
    entry counts only while its request is a member of that admission)."""

    __slots__ = ("bs", "caching", "tick", "size", "base", "phase", "ends", "last", "taken")

    def __init__(self, block_size: int, caching: bool = False):
        self.bs, self.caching = block_size, caching  # caching: V1's prefix caching (a member's full blocks hashed)
        self.tick = self.size = self.base = 0
        self.phase: list[set[_Seq]] = [set() for _ in range(block_size)]  # members by phase
        self.ends: list[tuple[int, int, _Seq]] = []  # heap: (tick at which it finishes, admission, member)
        self.last = -1  # no member was admitted after this admission number (-1: no member)
        self.taken = False  # the members' blocks for the step at this tick are allocated

    def join(self, s: _Seq) -> None:
        """``s`` (running; decoding: computed == known - 1; its blocks those of its computed tokens, and of the
        step's token once ``taken``: the engines' checks, tests/test_serving.py CheckedLoop and
        tests/test_serving_v1.py Checked, hold them) joins at this tick."""
        bs, tick = self.bs, self.tick
        s.off = tick - s.generated
        base = s.computed - tick
        self.phase[base % bs].add(s)
        self.base += base
        self.size += 1
        if s.adm > self.last:
            self.last = s.adm
        heapq.heappush(self.ends, (s.off + s.output_len, s.adm, s))

    def counters(self, s: _Seq) -> tuple[int, int, int]:
        """(generated, computed, blocks) of member ``s`` at this tick."""
        c = s.req.prompt_len - 1 - s.off + self.tick
        return self.tick - s.off, c, -(-(c + self.taken) // self.bs)

    def leave(self, s: _Seq) -> int:
        """Member ``s`` leaves, its counters written back (``counters``; with ``caching``, its hashed blocks:
        computed // block_size); returns its computed tokens. Its finish stays in ``ends``, stale."""
        base = s.req.prompt_len - 1 - s.off
        self.phase[base % self.bs].discard(s)
        self.base -= base
        self.size -= 1
        if not self.size:
            self.last = -1
        s.generated, c, s.blocks = self.counters(s)
        s.computed = c
        if self.caching:
            s.hashed = c // self.bs
        s.off = None
        return c

    def needers(self) -> set[_Seq]:
        """The members whose computed tokens fill their blocks: each takes one for the step at this tick."""
        return self.phase[-self.tick % self.bs]

    def kv(self) -> int:
        """The members' computed tokens."""
        return self.base + self.size * self.tick

    def plan(self, free: int) -> tuple[int, int, int]:
        """(batch size, steps, KV tokens read by the first step) of a decode run of the members alone from this
        tick (the first step's blocks taken; ServingLoop._decode_steps): steps until one finishes, while the
        blocks they take in the others fit in ``free``."""
        ends, bs, size = self.ends, self.bs, self.size
        while not _live(e := ends[0]):
            heapq.heappop(ends)
        n = e[0] - self.tick
        if size * -(-(n - 1) // bs) > free:  # else they cannot run out: a block per member per block_size ticks
            n = _steps_that_fit(n, self.slack(), bs, free)
        return size, n, self.kv() + size

    def slack(self, least: int = 0) -> dict[int, int]:
        """The members by computed tokens mod block_size, e (``_extra_blocks``' slack: their blocks hold just
        their tokens), for e >= ``least``."""
        bs, phase = self.bs, self.phase
        k = (least - self.tick) % bs  # the phase of e = least: e = (phase + tick) mod block_size
        return dict(zip(range(least, bs), map(len, phase[k:] + phase[:k])))

    def run_blocks(self, steps: int) -> int:
        """The blocks the members take in steps 2 .. ``steps`` of a decode run from this tick (``_extra_blocks``
        of ``slack``: a member takes none in t = steps - 1 tokens unless t + e >= block_size, so a short run
        needs only the members with e >= block_size - t)."""
        t = steps - 1
        return _extra_blocks(self.slack(max(0, self.bs - t)), t, self.bs) if t > 0 else 0

    def advance(self, ticks: int) -> list[_Seq]:
        """The clock moves on ``ticks`` steps; returns the members that finished (they leave: their counters
        written back, generated == output_len), by admission."""
        self.tick = tick = self.tick + ticks
        self.taken = False
        ends, done = self.ends, []
        while ends and ends[0][0] <= tick:
            e = heapq.heappop(ends)
            if _live(e):
                self.leave(e[2])
                done.append(e[2])
        if len(done) > 1:
            done.sort(key=_admission)
        return done


def _live(entry: tuple[int, int, _Seq]) -> bool:
    """Whether a ``_Cohort.ends`` entry (finish tick, admission, request) counts: its request is still a member,
    of that admission (else it left, and may have been admitted and joined again since)."""
    s = entry[2]
    return s.off is not None and s.adm == entry[1]


class ServingLoop:
    """Runs a workload through the scheduler; ``steps`` and ``seqs`` hold the outcome.

    With a ``pipeline`` (pipeline parallelism), this is one of vLLM's virtual engines: it shares
    the SimPy ``env`` and the pipeline's stages with the others, and its requests come from a
    ``Feed`` that ``PipelinedServing`` sets up.
    """

    def __init__(self, step_model: StepModel | None, engine: EngineConfig, kv_tokens: int, trace_steps: bool = True,
                 fast_forward: bool = True, *, env: simpy.Environment | None = None, pipeline: "Pipeline | None" = None,
                 clock: bool = True):
        self.sm, self.cfg, self.trace_steps = step_model, engine, trace_steps
        self.pipeline = pipeline
        self.fast_forward = fast_forward and pipeline is None  # a decode run assumes the GPU to itself
        self.total_blocks = kv_tokens // engine.block_size
        self.pool = _Blocks(self.total_blocks)  # V1's is a BlockPool (sim/serving_v1.py): the same interface
        self.env = env if env is not None else CountingEnvironment()
        self.arrived = simpy.Store(self.env)
        self.feed: Feed | None = None
        self.waiting: deque[_Seq] = deque()
        self.running: list[_Seq] = []
        self.seqs: list[_Seq] = []
        self.sink = None  # called with each finished request (run(..., sink=)); None: seqs keeps them
        self.steps: list[tuple[float, float, str, int]] = []  # (start, end, kind, batch size)
        self.busy = {"host": 0.0, "compute": 0.0, "copy": 0.0, "link": 0.0}
        self.stall = 0.0
        self.n_steps = {"prefill": 0, "decode": 0, "mixed": 0}
        self.preemptions = 0
        # V0's shared decode clock (``clock``; decode runs of V0 without chunked prefill): the running requests
        # that decode are a _Cohort, so a decode run costs Python in proportion to the requests that join,
        # finish or are preempted, not to the batch
        self.clock = clock and self.fast_forward and not engine.chunked_prefill and engine.scheduler == "v0"
        self.cohort = _Cohort(engine.block_size, engine.prefix_caching)
        self.admitted = 0  # admissions so far (numbers them, _Seq.adm: running requests are in that order)

    @property
    def unfinished(self) -> int:
        return len(self.waiting) + len(self.running) + len(self.arrived.items)

    # ---- blocks ----
    def _blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.cfg.block_size)

    def _grow(self, s: _Seq, tokens: int) -> bool:
        if tokens <= s.blocks * self.cfg.block_size:
            return True
        need = self._blocks_for(tokens) - s.blocks
        if need > self.pool.free:
            return False
        self.pool.take(need)
        s.blocks += need
        return True

    def _admissible(self, s: _Seq) -> bool:
        """vLLM V0 admits a prompt only if 1% of all blocks stay free afterwards (its watermark)."""
        need = self._blocks_for(s.known) - s.blocks
        return self.pool.free - need >= WATERMARK * self.total_blocks

    def _release(self, s: _Seq) -> None:
        self.pool.give_back(s)

    def _grow_or_preempt(self, s: _Seq, tokens: int, batch: list[tuple[_Seq, int]]) -> bool:
        """Allocate blocks for ``s``, preempting the most recently admitted requests (vLLM's recompute
        policy) until they fit; a victim already in ``batch`` leaves it. False when ``s`` had to go."""
        while not self._grow(s, tokens):
            victim = self._preempt_last()
            batch[:] = [(x, k) for x, k in batch if x is not victim]
            if victim is s:
                return False
        return True

    def _preempt_last(self) -> _Seq:
        """The last running request (the most recently admitted) is preempted: returned."""
        victim = self.running.pop()
        self._preempt(victim)
        return victim

    def _preempt(self, victim: _Seq) -> None:
        """``victim``, just taken off the running list, is preempted by recompute: its blocks freed, its
        computed tokens forgotten, back to the front of the waiting queue."""
        self._release(victim)
        victim.computed = 0
        victim.preempted += 1
        self.preemptions += 1
        self.waiting.appendleft(victim)

    # ---- scheduling ----
    def _schedule(self) -> list[tuple[_Seq, int]]:
        """Pick (sequence, new tokens) for the next step."""
        cfg = self.cfg
        if not cfg.chunked_prefill:
            batch, tokens = [], 0
            while self.waiting and len(self.running) + len(batch) < cfg.max_num_seqs:
                s = self.waiting[0]
                n = s.uncomputed
                if tokens + n > cfg.max_num_batched_tokens or not self._admissible(s) or not self._grow(s, s.known):
                    break
                self.waiting.popleft()
                batch.append((s, n))
                tokens += n
            if batch:
                if self.clock:
                    for s, _ in batch:
                        s.adm = self.admitted
                        self.admitted += 1
                self.running.extend(s for s, _ in batch)
                return batch
            if self.clock:
                if len(self.running) <= cfg.max_num_batched_tokens:  # the budget cannot stop the walk
                    return self._clock_decodes()
                self._pin_all()
            return self._decodes(cfg.max_num_batched_tokens)[0]
        batch, budget = self._decodes(cfg.max_num_batched_tokens)
        i = 0
        while i < len(self.running) and budget:  # continue partial prefills (preemption pops the end)
            s = self.running[i]
            i += 1
            if s.uncomputed > 1:
                n = min(s.uncomputed, budget)
                size = len(batch)
                if not self._grow_or_preempt(s, s.computed + n, batch):
                    break
                batch.append((s, n))
                if len(batch) != size + 1:  # preempted decodes gave their tokens back
                    budget = cfg.max_num_batched_tokens - sum(k for _, k in batch)
                else:
                    budget -= n
        while self.waiting and budget and len(self.running) < cfg.max_num_seqs:
            s = self.waiting[0]
            n = min(s.uncomputed, budget)
            if not self._grow(s, s.computed + n):
                break
            self.waiting.popleft()
            self.running.append(s)
            batch.append((s, n))
            budget -= n
        return batch

    def _decodes(self, budget: int) -> tuple[list[tuple[_Seq, int]], int]:
        """One token for every running request whose prompt is done, preempting when blocks run out (a
        preemption takes the last running request, never one already in the batch)."""
        batch = []
        bs = self.cfg.block_size
        running = self.running
        i = 0
        while i < len(running) and budget:
            s = running[i]
            known = s.req.prompt_len + s.generated
            if known - s.computed != 1:  # prompt not done (s.uncomputed, inlined)
                i += 1
                continue
            # its blocks already hold the token (_grow's first case, inlined), or _grow_or_preempt
            if known > s.blocks * bs and not self._grow_or_preempt(s, known, batch):
                break  # s itself was preempted: it was the last running request
            batch.append((s, 1))
            budget -= 1
            i += 1
        return batch, budget

    # ---- V0 on the shared decode clock (_Cohort) ----
    def counters(self, s: _Seq) -> tuple[int, int, int]:
        """(generated, computed, blocks) of running request ``s`` as they are now (a member's from the clock)."""
        return (s.generated, s.computed, s.blocks) if s.off is None else self.cohort.counters(s)

    def _pin_all(self) -> None:
        """Every member's counters written back; the cohort empty (the scheduler goes request by request)."""
        cohort = self.cohort
        for s in self.running:
            if s.off is not None:
                cohort.leave(s)
        cohort.ends.clear()

    def _clock_decodes(self) -> list[tuple[_Seq, int]]:
        """``_decodes`` of V0 on the clock, for a step of decodes alone: every running request (the newly
        admitted join the cohort) decodes one token; blocks for the step go to the members whose computed tokens
        fill their blocks, in running order, and when none is free the last running request is preempted, as
        _decodes' walk does (only those members take or lack a block, so only they are walked)."""
        running, cohort = self.running, self.cohort
        for s in reversed(running):  # the requests admitted since the last decode step: a suffix
            if s.off is not None:
                break
            cohort.join(s)
        needers, pool = cohort.needers(), self.pool
        if len(needers) <= pool.free:
            pool.take(len(needers))
        else:
            # _decodes' walk, worked out first: each of them (in running order, i.e. by admission) takes a
            # block, and where none is free the last running request is preempted (its blocks are those of
            # its computed tokens: the walk has not reached it) until one is; running[:end] is what is left
            free, end, grown = pool.free, len(running), 0
            for s in sorted(needers, key=_admission):
                if s.adm > running[end - 1].adm:
                    break  # preempted: the walk has reached the end
                while not free and running[end - 1] is not s:
                    end -= 1
                    free += cohort.counters(running[end])[2]
                if not free:  # s is the last one left: it goes itself
                    end -= 1
                    free += cohort.counters(s)[2]
                    break
                free -= 1
                grown += 1
            while len(running) > end:  # then done: the preemptions, last first, and the blocks taken
                cohort.leave(running[-1])
                self._preempt_last()
            pool.take(grown)
            assert pool.free == free
        if not running:
            return []
        cohort.taken = True
        return _EveryRunning(running)

    # ---- the loop ----
    def run(self, requests, max_concurrency: int | None = None, sink=None) -> None:
        """Serve ``requests`` (a list; or, with ``sink``, any iterable in (arrival, id) order). With
        ``sink``, each finished request is handed to ``sink(seq)`` and not kept: ``seqs`` stays empty and
        memory does not grow with the run (see ``simulate(requests="summary")``)."""
        self.sink = sink
        self.seqs, order = _seqs(requests, self.cfg, sink)
        self.feed = Feed(self.env, order, [self], max_concurrency)
        self.env.process(self._engine())
        self.env.run()
        if self.unfinished:
            raise RuntimeError("serving stopped with requests unserved")  # a bug

    def _step(self, shape: StepShape):
        """Run one step's forward pass (SimPy generator; the step takes ``_wall``); returns its StepResult."""
        if self.pipeline is not None:
            return (yield from self.pipeline.step(shape))
        res = self.sm.run(shape)
        yield self.env.timeout(self._wall(res, shape.seqs))
        return res

    def _record(self, res, t0: float, t1: float, kind: str, size: int) -> None:
        for lane, b in res.busy.items():
            self.busy[lane] += b
        self.stall += res.stall
        self.n_steps[kind] += 1
        if self.trace_steps:
            self.steps.append((t0, t1, kind, size))

    def _engine(self):
        """Schedule and run steps until every request is served; waits (forever, once the feed is
        dry: SimPy then stops) when there is nothing to do. V1ServingLoop runs this loop too, through
        ``_handed_over``, ``_schedule``, ``_shape``, ``_advance`` and (its decode runs) ``_on_clock``."""
        env, arrived = self.env, self.arrived
        # the only engine the feed serves, with no client limit: every request it has handed over is taken at
        # once, without a get event each (the feed hands a same-instant burst over whole: Feed._arrivals).
        # Under a limit (max_concurrency) a request finishing at a step's end frees a slot, and the feed sends
        # the next one in an event of that instant, which a get lets in before the step is scheduled and
        # taking at once leaves out (V1 has its own rule: V1ServingLoop._handed_over)
        self._alone = (self.feed.bursts and self.pipeline is None and len(self.feed.engines) == 1
                       and self.feed.slots is None)
        while True:
            while arrived.items:
                if not self._handed_over():
                    self.waiting.append((yield arrived.get()))
            batch = self._schedule()
            if not batch and not self._ndec:
                if self.running or (self.waiting and not self.feed.more_coming()):  # nothing fits, nothing will
                    raise RuntimeError("scheduler stalled: requests that can never be scheduled")  # arrive: a bug
                self.waiting.append((yield arrived.get()))
                continue
            if self.fast_forward and self._pure_decodes(batch):
                yield from self._decode_run()
                continue
            shape = self._shape(batch)
            t0 = env.now
            res = yield from self._step(shape)
            self._record(res, t0, env.now, _kind(shape), shape.seqs)
            self._advance(batch, env.now)

    # requests that V1's step runs beside ``batch`` (its shared decode clock's members); none in V0
    _ndec = 0

    def _handed_over(self) -> bool:
        """Take what the feed has handed over (``arrived.items``) without a get event, when that is the same
        hand-off: True when it took, False when a get must. Here: all of it when this is the feed's only
        engine (``_alone``)."""
        if not self._alone:
            return False
        self.waiting.extend(self.arrived.items)
        self.arrived.items.clear()
        return True

    def _shape(self, batch: list[tuple[_Seq, int]]) -> StepShape:
        """The StepShape of the step of ``batch``."""
        return StepShape.of([(k, s.computed) for s, k in batch])

    def _advance(self, batch: list[tuple[_Seq, int]], now: float) -> None:
        """After the step of ``batch``: its tokens computed; whoever has its whole known sequence in the KV
        cache (s.uncomputed == 0) samples a token."""
        for s, k in batch:
            s.computed += k
            if s.computed == s.req.prompt_len + s.generated:
                self._sample(s, now)

    def _pure_decodes(self, batch: list[tuple[_Seq, int]]) -> bool:
        """Every running request decodes one token, each past its first (a decode run may start): V1's members
        (``_ndec``) and ``batch``'s requests."""
        if type(batch) is _EveryRunning:  # V0 on the clock: every running request, each a member (past its first)
            return self.cohort.size == len(self.running)
        return len(batch) + self._ndec == len(self.running) and all(k == 1 and s.generated for s, k in batch)

    def _sample(self, s: _Seq, now: float) -> None:
        s.generated += 1
        if math.isnan(s.first):
            s.first = now
        if s.generated >= s.output_len:
            self._finish(s, now)

    def _finish(self, s: _Seq, now: float) -> None:
        """``s`` has its last token at ``now``: out of the running list, and ``_ended``."""
        self.running.remove(s)
        self._ended(s, now)

    def _ended(self, s: _Seq, now: float) -> None:
        """``s``, no longer running, has its last token at ``now``: its blocks freed, its client slot
        returned, handed on."""
        s.finish = now
        self._release(s)
        self.feed.finished()
        if self.sink is not None:
            self.sink(s)

    def _decode_run(self):
        """Decode steps of an unchanging batch, taken together (the step shapes are known in advance); both
        engines' (V1 brings its requests outside the cohort in: ``_on_clock``).

        The batch cannot change until a request finishes, a request arrives, or a block runs out;
        until then the scheduler would pick the same requests every step, so the loop needs no
        per-request work per step. Blocks for the first step were already allocated by _schedule.
        """
        pool, cohort = self.pool, self.cohort
        if self._on_clock():  # every running request is a member
            steps = yield from self._decode_steps(*cohort.plan(pool.free))
            pool.take(cohort.run_blocks(steps))
            assert pool.free >= 0, "the run's plan checked the free blocks"
            now = self.env.now
            for s in cohort.advance(steps):  # sampled, released and handed on in running order
                self._finish(s, now)
            return
        steps = yield from self._decode_steps(*self._decode_plan(pool.free))
        # then, per request: the blocks of the run's other steps (_grow; the plan made sure they are free; taken
        # before any finished request's are freed: the same blocks, since they were free before), its tokens (with
        # prefix caching, its full blocks hashed), and the last step's sample (_sample: each has its first token)
        bs, now, run, caching = self.cfg.block_size, self.env.now, self.running, self.cfg.prefix_caching
        taken, done = 0, []
        for s in run:
            need = -(-(s.req.prompt_len + s.generated + steps - 1) // bs) - s.blocks
            if need > 0:
                taken += need
                s.blocks += need
            s.computed += steps
            s.generated += steps
            if caching:
                s.hashed = s.computed // bs
            if s.generated >= s.output_len:
                done.append(s)
        assert taken <= pool.free, "the run's plan checked the free blocks"
        pool.take(taken)
        if done:
            run[:] = [s for s in run if s.generated < s.output_len]
            for s in done:  # in running order
                self._ended(s, now)

    def _on_clock(self) -> bool:
        """Whether the decode run about to start is the cohort's (every running request a member): V0 on its
        clock (_clock_decodes made them all members)."""
        return self.cohort.size > 0

    def _wall(self, res, seqs: int) -> float:
        """A step's wall time: its forward pass (V1 adds the host's work around it)."""
        return res.time

    def _decode_plan(self, free: int) -> tuple[int, int, int]:
        """(batch size, steps until a running request finishes but no more than the ``free`` blocks allow,
        KV tokens read by the first step) of a decode run of the whole running batch."""
        bs = self.cfg.block_size
        n, kv, slack = math.inf, 0, {}  # steps until the first request finishes; KV tokens; see below
        for s in self.running:
            g = s.generated
            if s.output_len - g < n:
                n = s.output_len - g
            k = s.req.prompt_len + g
            kv += k
            e = k + bs - 1 - s.blocks * bs
            slack[e] = slack.get(e, 0) + 1
        B = len(self.running)
        if slack and min(slack) >= 0 and max(slack) < bs:  # every request holds just its tokens' blocks
            return B, _steps_that_fit(n, slack, bs, free), kv
        return B, _most_steps(n, lambda m: _extra_blocks(slack, m - 1, bs), free), kv

    def _decode_steps(self, B: int, most: int, kv0: int):
        """Run decode steps of a batch of ``B`` (SimPy generator), the first reading ``kv0`` KV tokens
        (context + the new one); returns how many ran: ``most``, or fewer through the step during which
        the next request arrives. Records the steps; changes no request."""
        env = self.env
        arrival = self.feed.next_arrival()
        t, steps = env.now, 0
        runs = self.sm.decodes(B, kv0, most, whole=arrival == math.inf)  # runs of identical steps
        res, count = next(runs)
        rec = None  # [result, start, step, steps]: consecutive runs of one result, recorded as one
        while True:
            dt = self._wall(res, B)
            t0, k = t, 0
            while k < count:
                t += dt
                k += 1
                if t >= arrival:
                    break
            if rec is not None and rec[0] is res:
                rec[3] += k
            else:
                if rec is not None:
                    self._record_run(*rec, B)
                rec = [res, t0, dt, k]
            steps += k
            if t >= arrival:
                break
            # a hint: the steps until the arrival if no step were shorter than this one (steps grow
            # with the context); it spares probing the cost bins beyond them
            hint = None if arrival == math.inf or dt <= 0 else steps + 1 + int((arrival - t) / dt)
            try:
                res, count = runs.send(hint)
            except StopIteration:
                break
        self._record_run(*rec, B)
        yield env.timeout(t - env.now)
        return steps

    def _record_run(self, res, t: float, dt: float, k: int, size: int) -> None:
        """``_record`` of ``k`` identical decode steps from ``t``, each ``dt`` long: the same sums, added
        in the same order (so the totals are exactly those of recording them one by one)."""
        busy = self.busy
        for lane, b in res.busy.items():
            if b:
                busy[lane] = reduce(add, repeat(b, k), busy[lane])
        if res.stall:
            self.stall = reduce(add, repeat(res.stall, k), self.stall)
        self.n_steps["decode"] += k
        if self.trace_steps:
            steps = self.steps
            for _ in range(k):
                steps.append((t, t + dt, "decode", size))
                t += dt


class _Blocks:
    """V0's KV blocks: how many are free (V0 keeps nothing of a freed block; V1's BlockPool, sim/serving_v1.py,
    keeps their prefix-cache hashes, behind the same ``free``, ``take`` and ``give_back``)."""

    __slots__ = ("free",)

    def __init__(self, blocks: int):
        self.free = blocks

    def take(self, n: int) -> None:
        self.free -= n

    def give_back(self, s: _Seq) -> None:
        """Every block of ``s`` freed."""
        self.free += s.blocks
        s.blocks = 0


def _kind(shape: StepShape) -> str:
    """What the records call a step: "decode" (every request one token), "prefill" (none one token: V1's
    members, one token each, make a step mixed) or "mixed"."""
    return "decode" if shape.decode_only else ("mixed" if shape.decodes else "prefill")


def _admission(s: _Seq) -> int:
    return s.adm


class _EveryRunning:
    """The batch of a decode step on V0's clock: every running request, one token each (a view of the
    running list, walked only by whoever asks; nothing changes it before the step)."""

    __slots__ = ("running",)

    def __init__(self, running: list[_Seq]):
        self.running = running

    def __len__(self) -> int:
        return len(self.running)

    def __iter__(self):
        return ((s, 1) for s in self.running)


def _extra_blocks(slack: dict[int, int], t: int, bs: int) -> int:
    """Blocks a decode run's requests take for ``t`` more tokens each (step j >= 1 writes the KV of token
    known + j - 1: t = m - 1 for m steps). A request knowing k tokens in b blocks takes
    max(0, ceil((k + t) / bs) - b) = max(0, (t + e) // bs) with e = k + bs - 1 - b * bs; ``slack`` counts the
    requests by e, so the sum costs one term per distinct e (at most ``bs`` of them when every request
    holds exactly the blocks its tokens need), not one per request."""
    blocks = 0
    for e, c in slack.items():
        if t + e >= bs:
            blocks += c * ((t + e) // bs)
    return blocks


def _steps_that_fit(n: int, slack: dict[int, int], bs: int, free: int) -> int:
    """``_most_steps(n, lambda m: _extra_blocks(slack, m - 1, bs), free)`` where every slack e is in [0, bs)
    (every request holds just the blocks of its tokens), in closed form: with m - 1 = q * bs + r, the
    extra blocks are q * (all requests) + (requests with e >= bs - r), so q is the most whole rounds of
    block_size steps the free blocks pay for and r the most steps of the next round the rest pays for."""
    total = sum(slack.values())
    q, left = divmod(free, total)
    r, more = 0, 0
    while r + 1 < bs:
        more += slack.get(bs - r - 1, 0)  # the requests that take a block in step r + 1 of the round
        if more > left:
            break
        r += 1
    return min(n, q * bs + r + 1)


def _most_steps(n: int, blocks_needed, free: int) -> int:
    """The most steps m <= ``n`` (>= 1) of a decode run whose extra blocks ``blocks_needed(m)`` (non-decreasing
    in m) fit in ``free`` (at least one: the first step's blocks are already allocated)."""
    lo, hi = (n, n) if blocks_needed(n) <= free else (1, n - 1)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if blocks_needed(mid) <= free:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _output_len(r: Request, cfg: EngineConfig) -> int:
    return 1 if cfg.mode == "prefill-only" else r.output_len


def _seqs(requests, cfg: EngineConfig, sink) -> tuple[list[_Seq], object]:
    """(the run's kept sequences, what the feed walks): all of them, or with a ``sink`` none, made one at
    a time as the feed reaches them."""
    if sink is None:
        seqs = [_Seq(r, _output_len(r, cfg)) for r in requests]
        return seqs, seqs
    return [], (_Seq(r, _output_len(r, cfg)) for r in requests)


class Feed:
    """Requests arriving over time (a SimPy process), each handed on arrival to the engine with the
    fewest unfinished requests (vLLM V0's choice among its virtual engines; the first on a tie).

    ``max_concurrency`` is the client's limit (vllm bench serve --max-concurrency, an asyncio.Semaphore
    around each request in vllm/benchmarks/serve.py): a request that is due waits, in arrival order, until
    fewer than that many sent requests are unfinished; ``_Seq.sent`` records when it went out."""

    # hand requests that arrive at one instant to a lone engine as one burst (False: one event each, as
    # before; tests/test_serving.py holds the two to the same results)
    bursts = True

    def __init__(self, env: simpy.Environment, seqs, engines: list[ServingLoop],
                 max_concurrency: int | None = None):
        """``seqs``: a list (sorted here), or any iterable already in (arrival, id) order (a stream:
        taken one request ahead of the clock, never held whole)."""
        self.env, self.engines = env, engines
        self._order = iter(sorted(seqs, key=lambda s: (s.req.arrival, s.req.id)) if isinstance(seqs, list) else seqs)
        self._next = next(self._order, None)  # the next request to arrive (None: none left)
        self.slots = None if max_concurrency is None else simpy.Container(env, max_concurrency, max_concurrency)
        env.process(self._arrivals())

    def _arrivals(self):
        while self._next is not None:
            s = self._next
            if s.req.arrival > self.env.now:
                yield self.env.timeout(s.req.arrival - self.env.now)
            if self.slots is not None:
                yield self.slots.get(1)  # returned by finished()
                s.sent = self.env.now
            self._next = nxt = next(self._order, None)
            if nxt is not None and (nxt.req.arrival, nxt.req.id) < (s.req.arrival, s.req.id):
                raise ConfigError("requests", f"request {nxt.req.id} after request {s.req.id}",
                                  "a stream in (arrival, id) order")
            engines = self.engines
            target = engines[0] if len(engines) == 1 else min(engines, key=lambda e: e.unfinished)
            put = target.arrived.put(s)  # an unbounded Store: the request is in its items now
            if (self.bursts and self.slots is None and len(engines) == 1 and nxt is not None
                    and nxt.req.arrival <= self.env.now):
                # the next request arrives at this same instant: hand the burst over whole. Waiting for each
                # put let the engine take one request per event, but it took them all before scheduling
                # anyway (each put came before its next look), so the engine sees the same burst
                continue
            yield put

    def finished(self) -> None:
        """A request completed: its client slot is free."""
        if self.slots is not None:
            self.slots.put(1)

    def next_arrival(self) -> float:
        """When the next request reaches the engine at the earliest (inf while the client is at its limit:
        only a finishing request, which ends any decode run, lets one through)."""
        if self._next is None or (self.slots is not None and self.slots.level == 0):
            return math.inf
        return self._next.req.arrival

    def more_coming(self) -> bool:
        return self._next is not None


class Pipeline:
    """Pipeline-parallel stages, each a FIFO server: a step holds a stage while that stage's GPUs run
    its layers (the stage's own StepModel: its copies, its host link), then sends its hidden states
    on; with one virtual engine per stage (vLLM), up to pp steps are in flight. Steps cannot overtake
    each other (each stage serves in arrival order, so a step reaches every stage after the one
    ahead of it), so a step's whole path is known when it starts: it reserves every stage then, and
    waits once (equivalent to a SimPy Resource per stage, at a quarter of the events)."""

    def __init__(self, env: simpy.Environment, step_models: list[StepModel], send):
        self.env, self.sms, self.send = env, step_models, send  # send(stage, tokens) -> seconds
        self.free = [0.0] * len(step_models)  # when each stage finishes the steps reserved on it

    def step(self, shape: StepShape):
        """One forward pass through every stage (SimPy generator); returns a StepResult whose busy
        and stall seconds are per GPU, averaged over the stages."""
        env, pp = self.env, len(self.sms)
        t0 = t = env.now
        busy = {"host": 0.0, "compute": 0.0, "copy": 0.0, "link": 0.0}
        stall, events = 0.0, 0
        done: dict[int, StepResult] = {}  # stages sharing a StepModel (identical middle stages) share a result
        for i, sm in enumerate(self.sms):
            res = done.get(id(sm)) or done.setdefault(id(sm), sm.run(shape))
            t = max(t, self.free[i]) + res.time
            self.free[i] = t
            for lane, b in res.busy.items():
                busy[lane] += b / pp
            stall += res.stall / pp
            events += res.events
            if i < pp - 1:
                t += self.send(i, shape.tokens)
        yield env.timeout(t - t0)
        return StepResult(t - t0, busy, stall, events)


class PipelinedServing:
    """pp virtual engines over one Pipeline; the outcome summed like a ServingLoop's."""

    def __init__(self, step_models: list[StepModel], send, engine: EngineConfig, kv_tokens: int,
                 trace_steps: bool = True):
        self.env = CountingEnvironment()
        self.pipeline = Pipeline(self.env, step_models, send)
        pp = len(step_models)
        # vLLM V0 gives each virtual engine's scheduler 1/pp of the KV blocks
        per_engine = kv_tokens // engine.block_size // pp * engine.block_size
        self.engines = [ServingLoop(None, engine, per_engine, trace_steps, env=self.env, pipeline=self.pipeline)
                        for _ in range(pp)]
        self.cfg = engine

    def run(self, requests, max_concurrency: int | None = None, sink=None) -> None:
        """As ``ServingLoop.run``."""
        self.seqs, order = _seqs(requests, self.cfg, sink)
        for e in self.engines:
            e.sink = sink
        feed = Feed(self.env, order, self.engines, max_concurrency)
        for e in self.engines:
            e.feed = feed
            self.env.process(e._engine())
        self.env.run()
        if any(e.unfinished for e in self.engines):
            raise RuntimeError("pipeline stopped with requests unserved")  # a bug

    @property
    def steps(self) -> list:
        """(start, end, kind, batch size, virtual engine) of every step, by start."""
        return sorted((*s, i) for i, e in enumerate(self.engines) for s in e.steps)

    def _summed(self, name: str) -> dict:
        return {k: sum(getattr(e, name)[k] for e in self.engines) for k in getattr(self.engines[0], name)}

    @property
    def busy(self) -> dict:
        return self._summed("busy")

    @property
    def n_steps(self) -> dict:
        return self._summed("n_steps")

    @property
    def stall(self) -> float:
        return sum(e.stall for e in self.engines)

    @property
    def preemptions(self) -> int:
        return sum(e.preemptions for e in self.engines)
