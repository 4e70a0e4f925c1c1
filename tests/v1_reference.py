"""The V1 engine as it was before issue 19's speed work, kept verbatim as the reference the fast
scheduler (sim/serving_v1.py) must reproduce exactly (tests/test_serving_v1_fast.py)."""
from __future__ import annotations

import itertools
from collections import OrderedDict

from offloadlab.sim.costs import StepShape
from offloadlab.sim.serving import EngineConfig, ServingLoop, _Seq

# Host seconds per engine step outside the forward pass: scheduling, building the input tensors,
# sampling, detokenizing and handing outputs to the API server (Python). ASSUMPTIONS, not
# measurements (none of the shared data times them): a fixed ~1 ms (a few tensor copies, a
# sampler launch and one device->host sync at tens of microseconds each, plus the engine
# loop's Python) and ~20 us per scheduled request (its share of the Python loops over requests).
STEP_HOST_S = 1e-3
STEP_HOST_PER_SEQ_S = 20e-6


class BlockPool:
    """vLLM V1's KV block pool: one LRU queue of free blocks, cached ones keyed by (request, block,
    admission) so a request finds only its own blocks of its last admission."""

    def __init__(self, blocks: int, caching: bool, block_size: int):
        assert blocks >= 2, f"a block pool needs the null block and one more, not {blocks}"
        self.caching, self.block_size = caching, block_size
        self._anon = itertools.count()
        # block 0 is the null block (never free): blocks - 1 usable
        self.queue: OrderedDict = OrderedDict((("free", next(self._anon)), None) for _ in range(blocks - 1))

    @property
    def free(self) -> int:
        return len(self.queue)

    def take(self, n: int) -> None:
        """Pop ``n`` blocks from the head (evicting their cached hashes)."""
        assert n <= len(self.queue), f"taking {n} blocks of {len(self.queue)} free"
        for _ in range(n):
            self.queue.popitem(last=False)

    def give_back(self, s: _Seq) -> None:
        """Free every block of ``s`` to the tail, last block first (evicted before the prefix)."""
        for i in reversed(range(s.blocks)):
            cached = self.caching and i < s.hashed
            self.queue[(s.req.id, i, s.gen) if cached else ("free", next(self._anon))] = None
        s.blocks = s.hashed = 0

    def hits(self, s: _Seq) -> int:
        """Full blocks of ``s``'s previous admission still cached, from its first (at most
        ``num_tokens - 1`` tokens: the last token is always computed to sample from)."""
        if not self.caching or not s.gen:
            return 0
        limit, n = (s.known - 1) // self.block_size, 0
        while n < limit and (s.req.id, n, s.gen) in self.queue:
            n += 1
        return n

    def touch(self, s: _Seq, n: int) -> None:
        for i in range(n):
            del self.queue[(s.req.id, i, s.gen)]


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
        while i < len(self.running) and budget > 0:
            s = self.running[i]
            n = min(s.uncomputed, budget)
            if n <= 0:  # pipeline parallelism: its last tokens are still in flight (scheduler.py: continue)
                i += 1
                continue
            scheduled = True
            while not self._allocate(s, s.computed + n):
                victim = self.running.pop()  # FCFS: the last running request
                self._preempt(victim)
                preempted = True
                if victim is s:  # nothing left to preempt but itself
                    scheduled = False
                    break
            if not scheduled:
                break
            self._hash(s, n)
            batch.append((s, n))
            budget -= n
            i += 1
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
        self.fast_forward = self.bulk and not preempted  # read by ServingLoop._engine
        if self.trace_steps:
            self.occupancy.append((self.env.now, len(self.running), len(self.waiting)))
        return batch

    def _preempt(self, victim: _Seq) -> None:
        self._release(victim)
        victim.computed = 0
        victim.preempted += 1
        self.preemptions += 1
        self.waiting.appendleft(victim)

    # ---- one step: the forward pass and the host's work around it ----
    def _wall(self, res, seqs: int) -> float:
        host = STEP_HOST_S + STEP_HOST_PER_SEQ_S * seqs
        return max(res.time, host) if self.cfg.async_scheduling else res.time + host

    def _step(self, shape: StepShape):
        res = self.sm.run(shape)
        yield self.env.timeout(self._wall(res, shape.seqs))
        return res

    def _decode_run(self):
        """Decode steps of the whole running batch until a request finishes, a request arrives or the
        free blocks would run out (then the scheduler decides again). Blocks for the first step were
        allocated by _schedule."""
        env, bs, run = self.env, self.cfg.block_size, self.running
        B = len(run)
        n = min(s.output_len - s.generated for s in run)

        def blocks_needed(m):  # extra blocks for m steps (step j writes the KV of token known + j - 1)
            return sum(max(0, -(-(s.known + m - 1) // bs) - s.blocks) for s in run)

        lo, hi = 1, n
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if blocks_needed(mid) <= self.pool.free:
                lo = mid
            else:
                hi = mid - 1
        kv0 = sum(s.known for s in run)
        arrival = self.feed.next_arrival()
        t, steps = env.now, 0
        while steps < lo:
            kv = kv0 + B * steps
            res = self.sm.run(StepShape.decode(B, kv))
            dt = self._wall(res, B)
            self._record(res, t, t + dt, "decode", B)
            t += dt
            steps += 1
            if t >= arrival:
                break
        yield env.timeout(t - env.now)
        for s in list(run):
            assert self._allocate(s, s.known + steps - 1), "the run checked the free blocks"
            s.computed += steps
            s.generated += steps - 1
            if self.cfg.prefix_caching:
                s.hashed = s.computed // bs
            self._sample(s, env.now)


