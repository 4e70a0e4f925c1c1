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
  the head (vllm/v1/core/kv_cache_utils.py ``FreeKVCacheBlockQueue``, used by block_pool.py
  ``get_new_blocks``); a (re-)admitted request reuses the longest run of its own full blocks still
  cached, at most ``num_tokens - 1`` tokens (kv_cache_manager.py, ``get_computed_blocks``). Requests
  are assumed to share no prefix with each other (token counts carry no token ids), so caching pays
  off when a preempted request returns, or from the start when an earlier run of the same requests
  left their prompts cached (``EngineConfig.prefix_cache_warm``, ``BlockPool.warm``);
- the host's work per step (scheduling, input preparation, sampling, output processing) runs
  beside the GPU's step with async scheduling (vllm/v1/core/sched/async_scheduler.py), before it
  otherwise.
"""
from __future__ import annotations

from collections import deque

from .costs import StepShape
from .serving import EngineConfig, Pipeline, ServingLoop, _admission, _kind, _Seq
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
        if not self.caching:
            return 0
        run = self.cached.get((s.req.id, s.gen))  # admission 0: only what warm() left
        return min(run[0], (s.known - 1) // self.block_size) if run else 0

    def warm(self, prompts: list[tuple[int, int]]) -> None:
        """Before the run: cache ``(request id, full prompt blocks)`` as an earlier run of the same requests
        left them, freed in this order (the oldest first). Never-used blocks stay at the head of the queue,
        popped first, then the oldest cached; what the pool cannot hold was evicted, the oldest first (of a
        request cut in two, its first blocks stay, as eviction from the head takes a run's last blocks).
        A request then finds its prompt's blocks at its first admission (key: admission 0), at most
        ``prompt - 1`` tokens (``hits``)."""
        assert self.caching and not self.cached and self.free == self.runs[0][0], "warm() is for a fresh pool"
        room, kept = self.free, []
        for rid, n in reversed(prompts):
            if n > 0 and room:
                kept.append([min(n, room), (rid, 0)])
                room -= kept[-1][0]
        self.runs = deque(([[room, None]] if room else []) + kept[::-1])
        self.cached = {run[1]: run for run in kept}

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
    max_num_seqs, which decode steps only make fuller; ``bulk=False`` schedules every step.

    The shared decode clock (``lazy``, the default without pipeline parallelism): running requests
    that decode (prompt done, a token out) are the ``cohort`` (sim/serving.py ``_Cohort``, V0's clock
    too), so a step costs Python in proportion to the requests that start, finish or are still
    prefilling, not to the whole batch. A step
    whose scheduled tokens' blocks are free (no preemption) and in which every running request's tokens
    fit the budget, or only prompts admitted after every member are cut or left out, is scheduled from
    the cohort's sums (``_schedule``); any other step first writes every member's counters back and runs
    the scheduler request by request.

    Where it differs from V0's use of the clock: V0 without chunked prefill has a decode step of every
    running request, so its whole batch is the cohort and a preemption is worked out from the members
    that need a block; V1 schedules the members (``_ndec``, one token each) beside the requests still
    prefilling (``others``) in one step, and preempts only request by request (``_schedule_each``).
    The loop is ServingLoop._engine with V1's hand-off of arrivals (``_handed_over``), step shape and
    samples (``_shape``, ``_advance``); a decode run is ServingLoop._decode_run, on the cohort (``_on_clock``)
    or, without it, request by request.

    Exact (no approximation): tests/test_serving_v1_fast.py holds both to the reference engine."""

    def __init__(self, step_model, engine: EngineConfig, kv_tokens: int, trace_steps: bool = True,
                 bulk: bool = True, lazy: bool = True, **loop_kw):
        assert engine.scheduler == "v1", f"V1ServingLoop needs scheduler='v1', not {engine.scheduler!r}"
        super().__init__(step_model, engine, kv_tokens, trace_steps, fast_forward=bulk, **loop_kw)
        self.bulk = bulk and self.pipeline is None
        self.pool = BlockPool(self.total_blocks, engine.prefix_caching, engine.block_size)
        self.occupancy: list[tuple[float, int, int]] = []  # (time, running, waiting) at each step
        self.cached_tokens = 0  # prompt/recompute tokens served from the prefix cache
        self.lazy = lazy and self.pipeline is None  # the shared decode clock (self.cohort)
        self.others: list[_Seq] = []  # running requests outside the cohort, in running order
        self._ndec = 0  # members scheduled in the step being built (all of them, or none)

    def run(self, requests, max_concurrency: int | None = None, sink=None) -> None:
        if self.cfg.prefix_cache_warm:  # the cache as an earlier run of these requests left it (EngineConfig)
            requests = list(requests)  # walked twice: every prompt is in the cache before the first arrives
            bs = self.cfg.block_size
            self.pool.warm([(r.id, r.prompt_len // bs) for r in requests])  # in (arrival, id) order, as run() takes them
        super().run(requests, max_concurrency, sink)

    # ---- the shared decode clock (serving._Cohort) ----
    def _pin_all(self) -> None:
        super()._pin_all()
        self.others = list(self.running)  # every running request outside the cohort

    def scheduled(self, batch: list[tuple[_Seq, int]]) -> list[tuple[_Seq, int, int, int]]:
        """(request, new tokens, computed tokens, blocks held) of every request in the step ``_schedule``
        just returned ``batch`` for, cohort members included (their counters from the clock, their
        blocks for this step taken), in running order: the step request by request (for checks)."""
        new, cohort = {id(s): n for s, n in batch}, self.cohort
        out = []
        for s in self.running:
            if s.off is not None:
                _, c, b = cohort.counters(s)
                out.append((s, 1, c, b))
            elif id(s) in new:
                out.append((s, new[id(s)], s.computed, s.blocks))
        return out

    # ---- scheduling (vllm/v1/core/sched/scheduler.py, Scheduler.schedule) ----
    def _schedule(self) -> list[tuple[_Seq, int]]:
        """The next step's (request, new tokens), members of the cohort left out (``_ndec`` of them, all
        scheduled for one token when > 0)."""
        if self.lazy:
            cfg, pool, cohort = self.cfg, self.pool, self.cohort
            members = cohort.size
            # vLLM walks the running requests in order, each taking its tokens (a prompt's chunk cut to
            # what is left of the budget) until the budget is spent. The walk is taken from the cohort's
            # sums when every request's tokens fit, or when the members (one token each) all come
            # before the others (the usual case: a long prompt's chunks, admitted last), and when the
            # blocks of everything scheduled are free: then nobody is preempted, and the allocations
            # are all taken from the free queue's head, in any order.
            bs = cfg.block_size
            left = cfg.max_num_batched_tokens - members
            need = len(cohort.needers())  # the members' blocks for this step (none when there are none)
            batch = []
            fits = left >= 0
            if fits and self.others:
                ordered = cohort.last < self.others[0].adm
                for s in self.others:
                    c = s.computed
                    n = s.req.prompt_len + s.generated - c
                    if n > left:
                        if not ordered:
                            fits = False
                            break
                        if not left:
                            break  # the budget is spent: the rest wait
                        n = left
                    more = -(-(c + n) // bs) - s.blocks
                    if more > 0:
                        need += more
                    batch.append((s, n))
                    left -= n
            if fits and need <= pool.free:
                if need:
                    pool.take(need)
                cohort.taken = bool(members)
                for s, n in batch:
                    c = s.computed + n
                    more = -(-c // bs) - s.blocks
                    if more > 0:
                        s.blocks += more
                    if cfg.prefix_caching:
                        s.hashed = c // bs
                self._ndec = members
                return self._admit(batch, left, False)
            self._pin_all()
        self._ndec = 0
        return self._schedule_each()

    def _schedule_each(self) -> list[tuple[_Seq, int]]:
        """The scheduler request by request (no cohort)."""
        cfg, pool = self.cfg, self.pool
        budget = cfg.max_num_batched_tokens
        batch: list[tuple[_Seq, int]] = []
        preempted = False
        i = 0
        running, bs, caching = self.running, cfg.block_size, cfg.prefix_caching
        while i < len(running) and budget > 0:
            s = running[i]
            known = s.req.prompt_len + s.generated  # s.known, s.uncomputed and _grow inlined; full blocks hashed
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
                    while not self._grow(s, c + n):
                        victim = self._preempt_last()  # FCFS: the last running request
                        preempted = True
                        if victim is s:  # nothing left to preempt but itself
                            scheduled = False
                            break
                    if not scheduled:
                        break
            if caching:
                s.hashed = (c + n) // bs  # the full blocks once scheduled (n <= known - c)
            batch.append((s, n))
            budget -= n
            i += 1
        return self._admit(batch, budget, preempted)

    def _admit(self, batch: list[tuple[_Seq, int]], budget: int, preempted: bool) -> list[tuple[_Seq, int]]:
        """Waiting requests into ``batch`` while the budget, max_num_seqs and the free blocks allow (none
        after a preemption: scheduler.py, ``if not preempted_reqs``)."""
        cfg, pool, bs = self.cfg, self.pool, self.cfg.block_size
        if not preempted:
            while self.waiting and budget > 0 and len(self.running) < cfg.max_num_seqs:
                s = self.waiting[0]
                hit = pool.hits(s)
                known = s.req.prompt_len + s.generated  # s.known; _blocks_for and _grow inlined below
                c = hit * bs
                n = known - c
                if not cfg.chunked_prefill and n > budget:
                    break
                n = min(n, budget)
                # blocks for the whole sequence must be free (cached hits among them: they leave the free queue)
                if cfg.reserve_full_isl and -(-min(known, cfg.max_model_len) // bs) > pool.free:
                    break
                need = -(-(c + n) // bs)  # the hits' blocks and the chunk's
                if need > pool.free:
                    break
                pool.touch(s, hit)
                s.gen += 1
                s.adm = self.admitted
                self.admitted += 1
                s.blocks = s.hashed = hit
                s.computed = c
                self.cached_tokens += c
                if need > hit:  # the chunk's new blocks (admission checked that they are free)
                    pool.take(need - hit)
                    s.blocks = need
                if cfg.prefix_caching:
                    s.hashed = (c + n) // bs  # the full blocks once scheduled (n <= known - c)
                self.waiting.popleft()
                self.running.append(s)
                if self.lazy:
                    self.others.append(s)
                batch.append((s, n))
                budget -= n
        self.fast_forward = self.bulk and not preempted  # read by _engine
        if self.trace_steps:
            self.occupancy.append((self.env.now, len(self.running), len(self.waiting)))
        return batch

    def _preempt(self, victim: _Seq) -> None:
        super()._preempt(victim)
        if self.lazy:
            self.others.remove(victim)

    # ---- the loop: ServingLoop._engine's, through these ----
    def _handed_over(self) -> bool:
        """What the feed handed over, taken without a get event when no other event is due now (a get would
        be the next event, alone: the same hand-off, one event fewer per request). Not the base's (all of it
        when this is the feed's only engine): under a client limit (``max_concurrency``) a request that
        finishes at the end of a step frees a slot, and the feed sends the next request in an event of
        that instant, which a get lets in before the step is scheduled and taking at once leaves out."""
        if not self.lazy:
            return super()._handed_over()
        if self.env.peek() > self.env.now:  # (and stays so: taking schedules no event)
            self.waiting.extend(self.arrived.items)
            self.arrived.items.clear()
            return True
        return False

    def _shape(self, batch: list[tuple[_Seq, int]]) -> StepShape:
        """StepShape.of the whole step: the members' one token each after their computed ones, then ``batch``."""
        ndec = self._ndec
        tokens = pairs = kv = 0
        if ndec:
            ctx = self.cohort.kv()  # the members' computed tokens
            tokens, pairs, kv = ndec, float(ctx + ndec), ctx + ndec
        dec, dkv = ndec, kv
        for s, new in batch:
            ctx = s.computed
            tokens += new
            pairs += new * ctx + new * (new + 1) / 2  # integer-valued: exact in any order
            kv += ctx + new
            if new == 1:
                dec += 1
                dkv += ctx + 1
        seqs = ndec + len(batch)
        return StepShape(seqs, tokens, pairs, kv, tokens == seqs, dec, dkv)

    def _advance(self, batch: list[tuple[_Seq, int]], now: float) -> None:
        """After a step: the members move on a token when scheduled (``_ndec``), ``batch``'s requests by their
        tokens; whoever completed its sequence samples, in running order (finished requests free their blocks
        in that order)."""
        done = []
        if self._ndec:
            done = self.cohort.advance(1)
            for s in done:
                s.generated -= 1  # its last token is sampled below
        for s, k in batch:
            s.computed += k
            if s.computed == s.req.prompt_len + s.generated:  # the whole known sequence is in the KV cache
                done.append(s)
        if len(done) > 1:
            done.sort(key=_admission)
        lazy = self.lazy
        for s in done:
            self._sample(s, now)
            if not lazy:
                continue
            if s.off is None and s.generated < s.output_len:  # out of its prompt (or back): decodes now
                self.others.remove(s)
                self.cohort.join(s)
            elif s.off is None and s in self.others:
                self.others.remove(s)

    # ---- one step: the forward pass and the host's work around it (ServingLoop._step takes _wall) ----
    def _wall(self, res, seqs: int) -> float:
        host = step_host(seqs)
        return max(res.time, host) if self.cfg.async_scheduling else res.time + host

    def _on_clock(self) -> bool:
        """With the cohort (``lazy``), the decode run (ServingLoop._decode_run) is the cohort's: the requests
        outside it, all decodes now (their first step's blocks taken), join it first."""
        if not self.lazy:
            return False
        cohort = self.cohort
        cohort.taken = True
        for s in self.others:
            cohort.join(s)
        self.others.clear()
        return True


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
        self._record(res, t0, self.env.now, _kind(shape), len(tagged))
        for s, k, preempted in tagged:
            if s.preempted == preempted and s.computed == s.known and s in self.running:
                self._sample(s, self.env.now)
        self.in_flight -= 1
        if not self.wake.triggered:
            self.wake.succeed()
        self.wake = self.env.event()
