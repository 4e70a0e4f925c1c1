"""The race checker (runtime/races.py) and the staging-slot schedule (offloadlab/schedule.py).

The checker must find a race where one exists (hand-built logs, and the wrap race of the old
PrefetchRing reconstructed below) and none in the runtime as it is, for any policy; the same
recordings must give the resident model's logits exactly.
"""
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

torch = pytest.importorskip("torch")

from offloadlab import ModelSpec  # noqa: E402
from offloadlab.errors import ConfigError  # noqa: E402
from offloadlab.policy import NoOffload, Prefetch, VllmCopy, VllmUva  # noqa: E402
from offloadlab.runtime.offload import PrefetchRing, build  # noqa: E402
from offloadlab.runtime.races import Op, record, races, recording_device  # noqa: E402
from offloadlab.schedule import SlotSchedule  # noqa: E402
from offloadlab.specs import GiB  # noqa: E402

torch.set_num_threads(1)

PROMPTS = [[5, 17, 33, 2, 9], [44, 3]]


def spec(layers: int) -> ModelSpec:
    return ModelSpec(f"tiny{layers}", layers=layers, hidden=32, heads=2, kv_heads=1, head_dim=16, intermediate=64,
                     vocab=64, max_context=64)


_REFERENCE: dict = {}


def reference(layers: int, steps: int):
    key = (layers, steps)
    if key not in _REFERENCE:
        _REFERENCE[key] = record(build(spec(layers), NoOffload(), recording_device("cpu")), PROMPTS, steps).logits
    return _REFERENCE[key]


# ---------------------------------------------------------------- the checker on hand-built logs
def kernel(seq, stream, reads=(), writes=(), name="k"):
    return Op(seq, stream, "kernel", name=name, reads=tuple(reads), writes=tuple(writes))


def test_a_read_on_another_stream_without_an_event_is_a_race():
    copy, read = kernel(0, 1, writes=["slot0"], name="copy_"), kernel(1, 0, reads=["slot0"], name="mm")
    found = races([copy, read])
    assert [(r.buffer, r.first.seq, r.second.seq) for r in found] == [("slot0", 0, 1)]
    assert "read before the copy that filled it" in str(found[0])


def test_an_event_edge_orders_the_read():
    ops = [kernel(0, 1, writes=["slot0"]), Op(1, 1, "record", event=7), Op(2, 0, "wait_event", event=7),
           kernel(3, 0, reads=["slot0"])]
    assert races(ops) == []


def test_waiting_on_an_event_recorded_before_the_copy_does_not_order_it():
    ops = [Op(0, 1, "record", event=7), kernel(1, 1, writes=["slot0"]), Op(2, 0, "wait_event", event=7),
           kernel(3, 0, reads=["slot0"])]
    assert len(races(ops)) == 1


def test_an_event_rerecorded_later_is_waited_for_at_its_latest_record():
    # record, copy, record again (after the copy), then wait: ordered
    ops = [Op(0, 1, "record", event=7), kernel(1, 1, writes=["slot0"]), Op(2, 1, "record", event=7),
           Op(3, 0, "wait_event", event=7), kernel(4, 0, reads=["slot0"])]
    assert races(ops) == []


def test_a_copy_over_contents_still_being_read_is_a_race():
    ops = [kernel(0, 1, writes=["slot0"]), Op(1, 1, "record", event=1), Op(2, 0, "wait_event", event=1),
           kernel(3, 0, reads=["slot0"]),  # the reader
           kernel(4, 1, writes=["slot0"])]  # the next copy, with no wait on the reader
    found = races(ops)
    assert [(r.what, r.first.seq, r.second.seq) for r in found] == [("copy over contents still being read", 3, 4)]
    # ...unless the copy stream waits for the compute stream first
    fixed = ops[:4] + [Op(4, 1, "wait_stream", other=0), kernel(5, 1, writes=["slot0"])]
    assert races(fixed) == []


def test_a_host_synchronize_orders_everything_before_it():
    ops = [kernel(0, 1, writes=["slot0"]), Op(1, -1, "sync", name="device"), kernel(2, 0, reads=["slot0"])]
    assert races(ops) == []


# ---------------------------------------------------------------- the old wrap race, reconstructed
class OldRing(PrefetchRing):
    """PrefetchRing before the shared schedule: in wrap mode, after layer m the next step's copy
    (m + slots - n) was issued into its slot while waiting only for layer m (vLLM's
    ``(index + prefetch_step) % n``), though a later layer of this step may still read that slot."""

    def _old_issue(self, m, step_offset=0):
        slots, n = self.schedule.ring, len(self.order)
        with self.dev.use_stream(self.copy_stream):
            if step_offset or m >= slots:
                self.copy_stream.wait_event(self.freed[(m - slots) % n])
            self.buffers[m % slots][:self.sizes[m]].copy_(self.host[m], non_blocking=True)
            self.copied[m].record(self.copy_stream)

    def begin_step(self, tracer):
        if self.primed:
            return
        self.copy_stream.wait_stream(self.dev.current_stream())
        for m in range(self.schedule.ring):
            self._old_issue(m)
        self.primed = self.schedule.wrap

    def release(self, i, tracer):
        m = self.index.get(i)
        if m is None:
            return
        self.freed[m].record(self.dev.current_stream())
        slots, n = self.schedule.ring, len(self.order)
        if m + slots < n:
            self._old_issue(m + slots)
        elif self.schedule.wrap:
            self._old_issue(m + slots - n, step_offset=1)


def old_model(layers, policy):
    model = build(spec(layers), policy, recording_device("cpu"))
    new = model.provider
    old = OldRing.__new__(OldRing)
    old.__dict__.update(new.__dict__)
    model.provider = old
    return model


@pytest.mark.parametrize("policy", [Prefetch(4, 3, 2, wrap=True), Prefetch(1, 1, 3, wrap=True)],
                         ids=lambda p: p.label.replace(" ", "_"))
def test_the_old_ring_races_and_computes_wrong_logits_and_the_schedule_does_not(policy):
    old = record(old_model(4, policy), PROMPTS, 2)
    assert old.races, "the checker must see the old wrap race"
    assert any(r.what == "read before the copy that filled it" for r in old.races)
    ref = reference(4, 2)
    assert not all(torch.equal(a, b) for a, b in zip(old.logits[1:], ref[1:])), "the race shows on CPU too"
    new = record(build(spec(4), policy, recording_device("cpu")), PROMPTS, 2)
    assert new.races == [], "\n".join(map(str, new.races))
    assert all(torch.equal(a, b) for a, b in zip(new.logits, ref))


def test_the_old_ring_was_race_free_when_slots_divide_the_offloaded_layers():
    # every wrap case tested before had n % slots == 0: no race there, old or new
    assert record(old_model(4, Prefetch(2, 1, 2, wrap=True)), PROMPTS, 2).races == []


# ---------------------------------------------------------------- every policy, explored
@st.composite
def runtime_cases(draw):
    """A model of 1..9 layers, or one pipeline stage of a deeper model (a stage runs its own layers'
    prefetch; vLLM counts the group from the stage's first layer), and a policy."""
    layers = draw(st.integers(1, 9))
    pp = draw(st.integers(1, 3))
    if pp > 1 and layers >= pp:
        stage = draw(st.integers(0, pp - 1))
        layers = spec(layers).stages(pp)[stage].layers
    m = spec(layers)
    kind = draw(st.sampled_from(["prefetch", "prefetch", "prefetch", "copy", "uva", "none"]))
    if kind == "prefetch":
        g = draw(st.integers(1, layers))
        policy = Prefetch(g, draw(st.integers(1, g)), draw(st.integers(1, 5)), wrap=draw(st.booleans()))
    elif kind in ("copy", "uva"):
        gib = draw(st.floats(0.05, 1.0)) * m.layers * m.layer_bytes / GiB
        policy = (VllmCopy if kind == "copy" else VllmUva)(gib)
    else:
        policy = NoOffload()
    return layers, policy, draw(st.integers(1, 3)), draw(st.booleans())


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(runtime_cases())
def test_no_policy_races_and_every_one_computes_the_resident_logits(case):
    layers, policy, steps, join = case  # join: the ring joins its copy stream at each step's end (graph steps)
    got = record(build(spec(layers), policy, recording_device("cpu"), join_at_step_end=join), PROMPTS, steps)
    assert got.races == [], f"{policy.label} on {layers} layers:\n" + "\n".join(map(str, got.races))
    ref = reference(layers, steps)
    for step, (a, b) in enumerate(zip(got.logits, ref)):
        assert torch.equal(a, b), f"{policy.label} on {layers} layers: step {step} differs"
    if isinstance(policy, Prefetch) and policy.place(spec(layers)).offloaded_layers:
        assert any(op.kind == "kernel" and op.writes for op in got.ops), "the recording saw the copies"
        assert any(op.kind == "kernel" and op.reads and op.stream == 0 for op in got.ops), "...and the reads"


# ---------------------------------------------------------------- the schedule itself
@given(st.integers(1, 40), st.integers(1, 9), st.booleans())
def test_schedule_every_slot_has_one_copy_per_layer_and_wrap_issues_each_first_copy_once(n, slots, wrap):
    s = SlotSchedule(n, slots, wrap)
    ring = s.ring
    assert ring == min(n, slots)
    # within a step: copy m >= ring is issued once, after the read of the slot's previous layer
    issued = [s.after_read(m) for m in range(n)]
    assert sorted(x for x in issued if x is not None) == list(range(ring, n))
    for m in range(ring, n):
        assert s.slot(m) == s.slot(m - ring) and s.waits_for(m) == (0, m - ring)
    # the next step's first copies: each once, in order, and only after every read of its slot
    wrapped = [(m, w) for m in range(n) for w in s.wrapped_after(m)]
    if not wrap:
        assert wrapped == [] and all(s.waits_for(m) is None for m in range(ring))
        return
    assert [w for _, w in wrapped] == list(range(ring))
    for m, w in wrapped:
        readers = [x for x in range(n) if s.slot(x) == w]
        assert m >= max(readers), f"copy into slot {w} issued after layer {m}, before reader {max(readers)}"
        assert s.waits_for(w) == (-1, max(readers))
    if n % ring == 0:  # then it is exactly vLLM's (index + prefetch_step) % n
        assert all(w == (m + ring) % n for m, w in wrapped)


@pytest.mark.parametrize("args", [(-1, 2), (3, 0), (2.0, 2), (True, 2)])
def test_schedule_rejects_bad_counts(args):
    with pytest.raises(ConfigError):
        SlotSchedule(*args)


# ---------------------------------------------------------------- vLLM's own schedule, for deployments
@given(st.integers(1, 40), st.integers(1, 8), st.integers(1, 8))
def test_slot_race_flags_exactly_the_layouts_where_vllms_next_copy_lands_on_a_slot_still_to_be_read(layers, g, s):
    from offloadlab.vllm_flags import slot_race

    pol = Prefetch(min(g, layers), 1, s, wrap=True)
    n = pol.offloaded_count(layers)
    # vLLM (prefetch.py): offloaded layer m reads slot m % s; after layer i it copies layer (i + s) % n
    # into slot ((i + s) % n) % s. A race: a layer j > i of the same step reading that slot with other
    # contents (j is not the copied layer itself)
    racy = any(((i + s) % n) % s == j % s and j != (i + s) % n
               for i in range(n) if i + s >= n for j in range(i + 1, n)) if n else False
    assert (slot_race(pol, layers) is not None) == racy, (n, s)


def test_the_optimizer_never_proposes_a_racy_vllm_prefetch_deployment():
    from offloadlab.apps.optimize import candidate_policies
    from offloadlab.vllm_flags import slot_race

    pols = candidate_policies("llama-3.1-70b", "h200", mechanisms=("prefetch",))
    prefetch = [p for p in pols if isinstance(p, Prefetch)]
    assert prefetch and all(slot_race(p, 80) is None for p in prefetch)
