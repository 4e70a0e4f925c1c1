"""vLLM's V1 engine (vLLM >= 0.8): its scheduler and KV block pool on top of the step model.

What it models, and the vLLM file each rule comes from:
- one token budget per step (``max_num_batched_tokens``): RUNNING requests first, in order (a decode
  is one token, a partial prefill its next chunk), then WAITING ones up to ``max_num_seqs``; no
  prefill/decode phases (vllm/v1/core/sched/scheduler.py, ``Scheduler.schedule``);
- a running request that cannot get its blocks preempts the last running request (FCFS), itself
  included, by recompute: its blocks are freed, ``num_computed_tokens`` set to 0 and it goes back
  to the front of the waiting queue (scheduler.py, ``_preempt_request``); a step that preempted
  admits no waiting request (scheduler.py: ``if not preempted_reqs``);
- admission of a waiting request needs blocks for its chunk, and, with
  ``scheduler_reserve_full_isl`` (vllm/config/scheduler.py, default True in vLLM 0.19), for its
  whole sequence (vllm/v1/core/kv_cache_manager.py, ``allocate_slots(full_sequence_must_fit=...)``);
  no watermark (V0's 1% is gone);
- block 0 is the null block: ``num_gpu_blocks - 1`` are usable (vllm/v1/core/block_pool.py);
- prefix caching: full blocks are hashed when scheduled; freed blocks go to the tail of one LRU free
  queue, a request's in reverse order, keeping their hash until a new allocation pops them from
  the head (block_pool.py, ``FreeKVCacheBlockQueue``, ``get_new_blocks``); a (re-)admitted request
  reuses the longest run of its own full blocks still cached, at most ``num_tokens - 1`` tokens
  (kv_cache_manager.py, ``get_computed_blocks``). Requests are assumed to share no prefix with each
  other (token counts carry no token ids), so caching pays off when a preempted request returns;
- the host's work per step (scheduling, input preparation, sampling, output processing) runs
  beside the GPU's step with async scheduling (vllm/v1/core/sched/async_scheduler.py), before it
  otherwise.
"""
from __future__ import annotations

from collections import deque

from .costs import StepShape
from .serving import EngineConfig, Pipeline, ServingLoop, _Seq
from .step import CountingEnvironment

# Host seconds per engine step outside the forward pass: scheduling, building the input tensors,
# sampling, detokenizing and handing outputs to the API server (Python). ASSUMPTIONS, not
# measurements (none of the shared data times them): a fixed ~1 ms (a few tensor copies, a
# sampler launch and one device->host sync at tens of microseconds each, plus the engine
# loop's Python) and ~20 us per scheduled request (its share of the Python loops over requests).
STEP_HOST_S = 1e-3
STEP_HOST_PER_SEQ_S = 20e-6


def step_host(seqs: int) -> float:
    """Host seconds of one engine step of ``seqs`` requests (STEP_HOST_S, STEP_HOST_PER_SEQ_S)."""
    return STEP_HOST_S + STEP_HOST_PER_SEQ_S * seqs


class BlockPool:
    """vLLM V1's KV block pool: one LRU queue of free blocks, cached ones keyed by (request, block,
    admission) so a request finds only its own blocks of its last admission.

    The queue is kept as runs of blocks, not one entry per block: a run is either anonymous free
    blocks or one request's cached blocks 0..n-1 of one admission, queued last block first (so
    popping from the head evicts its highest blocks first and the rest stay 0..n'-1). Taking,
    freeing, finding and touching cost one step per run, not per block; the order of the blocks
    is exactly that of one ``OrderedDict`` entry per block (tests/test_serving_v1_fast.py holds
    the two to each other)."""

    __slots__ = ("caching", "block_size", "runs", "cached", "free")

    def __init__(self, blocks: int, caching: bool, block_size: int):
        assert blocks >= 2, f"a block pool needs the null block and one more, not {blocks}"
        self.caching, self.block_size = caching, block_size
        # block 0 is the null block (never free): blocks - 1 usable
        self.runs: deque[list] = deque([[blocks - 1, None]])  # [blocks, (request, admission) or None]
        self.cached: dict = {}  # (request id, admission) -> its run of cached blocks in the queue
        self.free = blocks - 1

    def take(self, n: int) -> None:
        """Pop ``n`` blocks from the head (evicting their cached hashes)."""
        assert n <= self.free, f"taking {n} blocks of {self.free} free"
        self.free -= n
        runs = self.runs
        while n:
            run = runs[0]
            if run[0] > n:
                run[0] -= n
                return
            n -= run[0]
            runs.popleft()
            if run[1] is not None:
                del self.cached[run[1]]

    def give_back(self, s: _Seq) -> None:
        """Free every block of ``s`` to the tail, last block first (evicted before the prefix)."""
        cached = s.hashed if self.caching else 0
        runs = self.runs
        if s.blocks > cached:
            if runs and runs[-1][1] is None:
                runs[-1][0] += s.blocks - cached
            else:
                runs.append([s.blocks - cached, None])
        if cached:
            run = [cached, (s.req.id, s.gen)]
            runs.append(run)
            self.cached[run[1]] = run
        self.free += s.blocks
        s.blocks = s.hashed = 0

    def hits(self, s: _Seq) -> int:
        """Full blocks of ``s``'s previous admission still cached, from its first (at most
        ``num_tokens - 1`` tokens: the last token is always computed to sample from)."""
        if not self.caching or not s.gen:
            return 0
        run = self.cached.get((s.req.id, s.gen))
        return min(run[0], (s.known - 1) // self.block_size) if run else 0

    def touch(self, s: _Seq, n: int) -> None:
        """Take ``s``'s first ``n`` cached blocks out of the queue (they are its again); its other
        cached blocks stay queued but can never be found again (its admission count moves on)."""
        if not n:
            return
        run = self.cached.pop((s.req.id, s.gen))
        run[0] -= n
        run[1] = None
        self.free -= n
        if not run[0]:
            self.runs.remove(run)


class V1ServingLoop(ServingLoop):
    """The V1 scheduler over a ServingLoop's arrivals, steps and records. Decode steps of an unchanging
    batch are taken together (``_decode_run``) when nothing could join it: no preemption this step
    (a preempted request may fit again at once), and the waiting queue stopped on the KV cache or
    max_num_seqs, which decode steps only make fuller; ``bulk=False`` schedules every step."""

    def __init__(self, step_model, engine: EngineConfig, kv_tokens: int, trace_steps: bool = True,
                 bulk: bool = True, **loop_kw):
        assert engine.scheduler == "v1", f"V1ServingLoop needs scheduler='v1', not {engine.scheduler!r}"
        super().__init__(step_model, engine, kv_tokens, trace_steps, fast_forward=bulk, **loop_kw)
        self.bulk = bulk and self.pipeline is None
        self.pool = BlockPool(self.total_blocks, engine.prefix_caching, engine.block_size)
        self.occupancy: list[tuple[float, int, int]] = []  # (time, running, waiting) at each step
        self.cached_tokens = 0  # prompt/recompute tokens served from the prefix cache

    # ---- blocks ----
    def _release(self, s: _Seq) -> None:
        self.pool.give_back(s)

    def _allocate(self, s: _Seq, tokens: int) -> bool:
        need = self._blocks_for(tokens) - s.blocks
        if need > self.pool.free:
            return False
        if need > 0:
            self.pool.take(need)
            s.blocks += need
        return True

    def _hash(self, s: _Seq, n: int) -> None:
        if self.cfg.prefix_caching:
            s.hashed = min(s.computed + n, s.known) // self.cfg.block_size

    # ---- scheduling (vllm/v1/core/sched/scheduler.py, Scheduler.schedule) ----
    def _schedule(self) -> list[tuple[_Seq, int]]:
        cfg, pool = self.cfg, self.pool
        budget = cfg.max_num_batched_tokens
        batch: list[tuple[_Seq, int]] = []
        preempted = False
        i = 0
        running, bs, caching = self.running, cfg.block_size, cfg.prefix_caching
        decodes_only = True  # every scheduled request a decode past its first token (so far)
        while i < len(running) and budget > 0:
            s = running[i]
            known = s.req.prompt_len + s.generated  # s.known, s.uncomputed, _allocate and _hash inlined
            c = s.computed
            n = known - c
            if n > budget:
                n = budget
            if n <= 0:  # pipeline parallelism: its last tokens are still in flight (scheduler.py: continue)
                i += 1
                continue
            need = -(-(c + n) // bs) - s.blocks
            if need > 0:
                if need <= pool.free:
                    pool.take(need)
                    s.blocks += need
                else:
                    scheduled = True
                    while not self._allocate(s, c + n):
                        victim = running.pop()  # FCFS: the last running request
                        self._preempt(victim)
                        preempted = True
                        if victim is s:  # nothing left to preempt but itself
                            scheduled = False
                            break
                    if not scheduled:
                        break
            if caching:
                s.hashed = (c + n if c + n < known else known) // bs
            batch.append((s, n))
            budget -= n
            i += 1
            if n != 1 or not s.generated:
                decodes_only = False
        if not preempted:
            while self.waiting and budget > 0 and len(self.running) < cfg.max_num_seqs:
                s = self.waiting[0]
                hit = pool.hits(s)
                n = s.known - hit * cfg.block_size
                if not cfg.chunked_prefill and n > budget:
                    break
                n = min(n, budget)
                # blocks for the whole sequence must be free (cached hits among them: they leave the free queue)
                if cfg.reserve_full_isl and self._blocks_for(min(s.known, cfg.max_model_len)) > pool.free:
                    break
                if self._blocks_for(hit * cfg.block_size + n) > pool.free:
                    break
                pool.touch(s, hit)
                s.gen += 1
                s.blocks = s.hashed = hit
                s.computed = hit * cfg.block_size
                self.cached_tokens += s.computed
                assert self._allocate(s, s.computed + n), "admission checked the free blocks"
                self._hash(s, n)
                self.waiting.popleft()
                self.running.append(s)
                batch.append((s, n))
                budget -= n
                if n != 1 or not s.generated:  # (a returning request may need one token: a decode)
                    decodes_only = False
        self.fast_forward = self.bulk and not preempted  # read by ServingLoop._engine
        self._decodes_only = decodes_only and len(batch) == len(self.running)
        if self.trace_steps:
            self.occupancy.append((self.env.now, len(self.running), len(self.waiting)))
        return batch

    def _pure_decodes(self, batch) -> bool:
        return self._decodes_only  # found by _schedule's pass over the running requests

    def _preempt(self, victim: _Seq) -> None:
        self._release(victim)
        victim.computed = 0
        victim.preempted += 1
        self.preemptions += 1
        self.waiting.appendleft(victim)

    # ---- one step: the forward pass and the host's work around it ----
    def _wall(self, res, seqs: int) -> float:
        host = step_host(seqs)
        return max(res.time, host) if self.cfg.async_scheduling else res.time + host

    def _step(self, shape: StepShape):
        res = self.sm.run(shape)
        yield self.env.timeout(self._wall(res, shape.seqs))
        return res

    def _decode_run(self):
        """Decode steps of the whole running batch until a request finishes, a request arrives or the
        free blocks would run out (then the scheduler decides again). Blocks for the first step were
        allocated by _schedule."""
        bs, run = self.cfg.block_size, self.running
        steps = yield from self._decode_steps(self.pool.free)
        pool, caching, now = self.pool, self.cfg.prefix_caching, self.env.now
        for s in list(run):  # _allocate, _hash and _sample's common case inlined
            need = -(-(s.req.prompt_len + s.generated + steps - 1) // bs) - s.blocks
            if need > 0:
                assert need <= pool.free, "the run checked the free blocks"
                pool.take(need)
                s.blocks += need
            s.computed += steps
            s.generated += steps - 1
            if caching:
                s.hashed = s.computed // bs
            self._sample(s, now)


class V1PipelinedServing(V1ServingLoop):
    """Pipeline parallelism under V1: one scheduler, one KV block pool (every stage holds its layers'
    KV of every token, so the tightest stage sets the blocks) and a batch queue of up to ``pp``
    batches in flight (vllm/v1/engine/core.py, ``step_with_batch_queue``). A request's computed tokens
    advance when it is scheduled (scheduler.py, ``_update_after_schedule``), so a decode whose token is
    still in flight is skipped and a long prompt's chunks follow each other down the pipeline; its
    token is sampled when its batch leaves the last stage, and a request preempted meanwhile drops it.
    Async scheduling is not supported with pipeline parallelism (vllm/config/scheduler.py): the
    scheduler's host work precedes each batch."""

    def __init__(self, step_models, send, engine: EngineConfig, kv_tokens: int, trace_steps: bool = True):
        env = CountingEnvironment()  # like every other serving loop: its events are reported (simpy_events)
        super().__init__(None, engine, kv_tokens, trace_steps, bulk=False, env=env,
                         pipeline=Pipeline(env, step_models, send))
        self.depth = len(step_models)
        self.in_flight = 0
        self.wake = env.event()

    def _engine(self):
        env = self.env
        while True:
            while self.arrived.items:
                self.waiting.append((yield self.arrived.get()))
            batch = self._schedule() if self.in_flight < self.depth else []
            if batch:
                shape = StepShape.of([(k, s.computed) for s, k in batch])
                tagged = [(s, k, s.preempted) for s, k in batch]
                for s, k in batch:
                    s.computed += k
                host = step_host(len(batch))
                yield env.timeout(host)  # the scheduler and input preparation, before the batch leaves
                self.in_flight += 1
                env.process(self._batch(shape, tagged))
                continue
            if not self.in_flight and self.running:
                raise RuntimeError("scheduler stalled: running requests but nothing scheduled")  # a bug
            if not self.in_flight and self.waiting and not self.feed.more_coming():
                raise RuntimeError("scheduler stalled: requests that can never be scheduled")  # a bug
            get = self.arrived.get()
            got = yield env.any_of([get, self.wake])
            if get in got:
                self.waiting.append(get.value)
            else:
                get.cancel()

    def _batch(self, shape: StepShape, tagged):
        t0 = self.env.now
        res = yield from self.pipeline.step(shape)
        kind = "decode" if shape.decode_only else ("prefill" if all(k > 1 for _, k, _ in tagged) else "mixed")
        self._record(res, t0, self.env.now, kind, len(tagged))
        for s, k, preempted in tagged:
            if s.preempted == preempted and s.computed == s.known and s in self.running:
                self._sample(s, self.env.now)
        self.in_flight -= 1
        if not self.wake.triggered:
            self.wake.succeed()
        self.wake = self.env.event()
