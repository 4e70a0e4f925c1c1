"""The runtime on CPU: offloaded outputs equal resident outputs exactly, the staging ring never
allocates, traces are well-formed, bad input fails before any work."""
import pytest

torch = pytest.importorskip("torch")

from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from offloadlab import ConfigError, DoesNotFitError, ModelSpec, get_model  # noqa: E402
from offloadlab.policy import (NoOffload, Placement, Prefetch, VllmCopy, VllmUva, copy_prefix,  # noqa: E402
                               interval)
from offloadlab.runtime import KVCache, Tracer, build, generate  # noqa: E402
from offloadlab.runtime.offload import PrefetchRing  # noqa: E402
from offloadlab.specs import GiB  # noqa: E402
from offloadlab.trace import Trace  # noqa: E402

torch.set_num_threads(1)  # tiny kernels: extra threads only spin against the other tests

SPEC = ModelSpec("tiny", layers=4, hidden=64, heads=4, kv_heads=2, head_dim=16, intermediate=128, vocab=256,
                 max_context=512)
PROMPTS = [[5, 17, 33, 2, 9, 100, 7], [44, 3, 250]]  # batch 2, left-padded by 4
LAYER_GIB = SPEC.layer_bytes / GiB


def run_steps(model, prompts=PROMPTS, decode_steps=3, tracer=None):
    """Logits of the prefill and of each greedy decode step."""
    from offloadlab.runtime.generate import decode, prefill

    with torch.inference_mode():
        logits, cache = prefill(model, prompts, max(map(len, prompts)) + decode_steps + 1, tracer)
        out = [logits]
        for _ in range(decode_steps):
            out.append(decode(model, out[-1].argmax(-1), cache, tracer))
    return out


@pytest.fixture(scope="module")
def reference():
    return run_steps(build(SPEC, NoOffload(), "cpu"))


POLICIES = (
    [VllmCopy(g * LAYER_GIB) for g in (0.3, 1.0, 2.5, 4.0)]
    + [VllmCopy(1.5 * LAYER_GIB, params=("gate_up_proj",)), VllmCopy(0.3 * LAYER_GIB, params=("self_attn",))]
    + [VllmUva(2.5 * LAYER_GIB)]
    + [interval(k, b) for k in range(1, 6) for b in range(1, 4)]
    + [Prefetch(4, 2, 3), Prefetch(4, 2, 1), Prefetch(3, 3, 2), Prefetch(2, 1, 2, params=("mlp",)),
       Prefetch(2, 1, 1, wrap=True), Prefetch(4, 2, 2, wrap=True)]
)


@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: p.label.replace(" ", "_"))
def test_offloaded_outputs_equal_resident_exactly(policy, reference):
    model = build(SPEC, policy, "cpu")
    assert model.provider.mechanism == (policy.place(SPEC).mechanism if policy.place(SPEC).offloaded_layers else "none")
    got = run_steps(model)
    assert len(got) == len(reference)
    for step, (a, b) in enumerate(zip(got, reference)):
        assert torch.equal(a, b), f"{policy.label}: step {step} ({'prefill' if step == 0 else 'decode'}) differs"


@pytest.mark.parametrize("layers", [0, 1, 3, 4])
def test_copy_prefix_placement_equals_resident(layers, reference):
    assert all(torch.equal(a, b) for a, b in zip(run_steps(build(SPEC, copy_prefix(SPEC, layers), "cpu")), reference))


def test_equality_is_not_vacuous(reference):
    other = run_steps(build(SPEC, NoOffload(), "cpu", seed=1))
    assert not torch.equal(other[0], reference[0]), "a different seed must change the logits"
    assert all(torch.isfinite(x).all() for x in reference)


def test_tied_embeddings():
    tied = SPEC.replace(name="tiny-tied", tied_embeddings=True)
    model = build(tied, interval(2), "cpu")
    assert model.lm_head is None
    a, b = run_steps(model), run_steps(build(tied, NoOffload(), "cpu"))
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_generate_is_deterministic_and_policy_independent():
    a = generate(build(SPEC, NoOffload(), "cpu"), PROMPTS, 5)
    b = generate(build(SPEC, interval(2, 1), "cpu"), PROMPTS, 5)
    assert a.shape == (2, 5) and torch.equal(a, b)


# ---- the model's math: padding, KV cache and RoPE positions (fp32, so different shapes agree closely) ----

SPEC32 = SPEC.replace(name="tiny-fp32", weight_bytes=4, kv_bytes=4)


def test_left_padding_does_not_change_a_sequence():
    model = build(SPEC32, NoOffload(), "cpu")
    batched = run_steps(model, PROMPTS, 2)
    alone = run_steps(model, PROMPTS[1:], 2)
    for a, b in zip(batched, alone):
        torch.testing.assert_close(a[1], b[0], atol=1e-4, rtol=1e-4)


def test_decode_with_cache_matches_prefill_of_the_longer_prompt():
    from offloadlab.runtime.generate import prefill

    model = build(SPEC32, NoOffload(), "cpu")
    with torch.inference_mode():
        steps = run_steps(model, PROMPTS[:1], 1)
        longer = PROMPTS[0] + [int(steps[0].argmax(-1))]
        logits, _ = prefill(model, [longer], len(longer))
    torch.testing.assert_close(steps[1], logits, atol=1e-4, rtol=1e-4)


def test_chunked_prefill_matches_one_prefill():
    model = build(SPEC32, NoOffload(), "cpu")
    ids = torch.tensor([PROMPTS[0]])
    with torch.inference_mode():
        whole = model(ids, model_cache(model, 1, 8), all_logits=True)
        cache = model_cache(model, 1, 8)
        first = model(ids[:, :4], cache, all_logits=True)
        second = model(ids[:, 4:], cache, all_logits=True)
    torch.testing.assert_close(torch.cat([first, second], 1), whole, atol=1e-4, rtol=1e-4)


def model_cache(model, batch, slots):
    return KVCache(model.spec, batch, slots, model.device, model.dtype)


def test_parameters_are_named_and_shaped_as_the_modelspec():
    model = build(SPEC, interval(2), "cpu")
    for layer in model.layers:
        assert [(n, tuple(p.shape)) for n, p in layer.named_parameters()] == list(SPEC.layer_param_shapes)


# ---- the staging ring ----

ALLOCATING = ("empty", "_to_copy", "clone", "new_", "zeros", "ones", "full", "rand", "cat", "stack")


class _OpLog(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func.__name__)
        return func(*args, **(kwargs or {}))


class _Watched:
    """Wraps a weight provider: logs every aten op its begin_step/acquire/release run."""

    def __init__(self, inner, log):
        self.inner, self.log, self.mechanism = inner, log, inner.mechanism
        self.acquired = []

    def begin_step(self, tracer):
        with self.log:
            self.inner.begin_step(tracer)

    def acquire(self, i, tracer):
        with self.log:
            w = self.inner.acquire(i, tracer)
        self.acquired.append((i, tuple(t.data_ptr() for t in w)))
        return w

    def release(self, i, tracer):
        with self.log:
            self.inner.release(i, tracer)


@pytest.mark.parametrize("policy", [interval(1, 1), interval(2, 2), interval(3, 3), Prefetch(4, 2, 2, wrap=True)],
                         ids=lambda p: p.label.replace(" ", "_"))
def test_staging_ring_never_allocates_and_reuses_its_buffers(policy):
    model = build(SPEC, policy, "cpu")
    ring = model.provider
    assert isinstance(ring, PrefetchRing)
    buffers = [(b, b.data_ptr()) for b in ring.buffers]
    log = _OpLog()
    model.provider = watched = _Watched(ring, log)
    run_steps(model, decode_steps=2)
    allocating = [op for op in log.ops if any(a in op for a in ALLOCATING)]
    assert not allocating, f"the ring allocated: {allocating}"
    assert "copy_.default" in log.ops
    assert [(b, b.data_ptr()) for b in ring.buffers] == buffers, "staging buffers were replaced"
    slot_ptrs = [p for _, p in buffers]
    for i, ptrs in watched.acquired:
        m = ring.index.get(i)
        if m is not None:  # an offloaded layer computes from slot m % slots, nowhere else
            assert ptrs[0] == slot_ptrs[m % ring.schedule.ring], f"layer {i} did not read slot {m % ring.schedule.ring}"
    assert len(ring.buffers) == min(policy.slots, len(ring.order))


def test_copy_path_allocates_fresh_device_tensors_every_step():
    model = build(SPEC, VllmCopy(LAYER_GIB), "cpu")
    log = _OpLog()
    model.provider = _Watched(model.provider, log)
    run_steps(model, decode_steps=1)
    assert sum("empty" in op for op in log.ops) == 2 * len(SPEC.layer_param_shapes), "one per parameter per step"


# ---- traces ----


def _check_lanes(trace: Trace):
    for lane in trace.lanes():
        spans = sorted((s for s in trace.spans if s.lane == lane), key=lambda s: (s.start, s.end))
        for a, b in zip(spans, spans[1:]):
            assert a.end <= b.start, f"{lane}: {a} overlaps {b}"


@pytest.mark.parametrize("policy", [interval(2, 1), Prefetch(4, 2, 2), Prefetch(2, 1, 1, wrap=True),
                                    VllmCopy(1.5 * LAYER_GIB), NoOffload()], ids=lambda p: p.label.replace(" ", "_"))
def test_trace_is_well_formed(policy, tmp_path):
    model = build(SPEC, policy, "cpu")
    tracer = Tracer(model.dev, {"policy": policy.label})
    run_steps(model, decode_steps=2, tracer=tracer)
    trace = tracer.trace()
    assert trace.meta["source"] == "runtime" and trace.meta["policy"] == policy.label
    assert set(trace.lanes()) <= {"host", "compute", "copy"}
    _check_lanes(trace)
    f = trace.to_frame()
    pl = policy.place(SPEC)
    for step in range(3):
        s = f[f.step == step]
        comp = s[(s.lane == "compute") & (s.kind == "compute")]
        assert sorted(comp.layer) == list(range(-1, SPEC.layers + 1)), "embed, every layer, LM head"
        assert sorted(s[s.lane == "host"].layer) == list(range(SPEC.layers))
        copies = f[(f.kind == "copy") & (f.step == step)]
        assert sorted(copies.layer) == list(pl.offloaded_layers if pl.mechanism != "none" else [])
        for _, c in copies.iterrows():  # each offloaded layer computes after its copy
            start = comp[comp.layer == c.layer].start.item()
            assert start >= c.end, f"step {step}: layer {c.layer} computed at {start} before its copy ended {c.end}"
    path = trace.save(tmp_path / "t.json")
    assert len(Trace.load(path).spans) == len(trace.spans)
    trace.save_chrome(tmp_path / "t.chrome.json")


def test_forward_layers_trace_matches_the_simulators_vocabulary():
    model = build(SPEC, interval(2), "cpu")
    tracer = Tracer(model.dev)
    x = torch.randn(1, 8, SPEC.hidden, dtype=model.dtype)
    with torch.inference_mode():
        tracer.begin_step()
        model.forward_layers(x, model_cache(model, 1, 8), tracer)
    trace = tracer.trace()
    kinds = {(s.lane, s.kind) for s in trace.spans}
    assert kinds == {("host", "launch"), ("compute", "compute"), ("copy", "copy")}


# ---- bad input, before any work ----


def test_cuda_requested_without_cuda_is_a_config_error():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ConfigError, match="device.*CUDA"):
        build(SPEC, NoOffload(), "cuda")


def test_policy_that_does_not_fit_host_memory_fails_before_allocating():
    with pytest.raises(DoesNotFitError, match="llama-3.1-405b.*does not fit host memory"):
        build(get_model("llama-3.1-405b"), interval(2), "cpu")


def test_reserve_that_does_not_fit_is_reported_with_numbers():
    with pytest.raises(DoesNotFitError, match="GiB"):
        build(SPEC, NoOffload(), "cpu", reserve_bytes=1 << 60)


def test_bad_placements_and_dtypes_are_config_errors():
    with pytest.raises(ConfigError, match="placement"):
        build(SPEC, NoOffload().place(SPEC.replace(layers=3)), "cpu")
    wrong = Placement(tuple((5,) if i == 0 else () for i in range(4)), SPEC.layer_bytes, "copy")
    with pytest.raises(ConfigError, match=r"placement.offloaded\[0\]"):
        build(SPEC, wrong, "cpu")
    with pytest.raises(ConfigError, match="weight_bytes"):
        build(SPEC.replace(weight_bytes=1), NoOffload(), "cpu")
    with pytest.raises(ConfigError, match="dtype"):
        build(SPEC, NoOffload(), "cpu", dtype=torch.float32)
    with pytest.raises(ConfigError, match="device"):
        build(SPEC, NoOffload(), "tpu")


# ---- the ring joins its copy stream at the step's end, as vLLM's CUDA-graph steps do ----


class _StreamLog:
    """A stand-in compute stream that logs what it is made to wait for."""

    def __init__(self, log):
        self.log = log

    def wait_event(self, event):
        self.log.append(("wait_event", event))

    def wait_stream(self, stream):
        self.log.append(("wait_stream", stream))


class _LoggingDevice:
    def __init__(self, dev, log):
        self.dev, self.log = dev, log

    def current_stream(self):
        return _StreamLog(self.log)

    def __getattr__(self, name):
        return getattr(self.dev, name)


@pytest.mark.parametrize("join", [False, True])
def test_prefetch_ring_joins_the_copy_stream_at_the_step_end_in_graph_mode(join, reference):
    model = build(SPEC, Prefetch(2, 1, 1, wrap=True), "cpu", join_at_step_end=join)
    ring = model.provider
    log = []
    ring.dev = _LoggingDevice(ring.dev, log)
    got = run_steps(model, decode_steps=2)
    assert all(torch.equal(a, b) for a, b in zip(got, reference[:3]))  # joined or not, the same numbers
    ends = [e for e in log if e[0] == "wait_stream" and e[1] is ring.copy_stream]
    # joined: one join per step (prefill + 2 decodes), after the wrapped copy for the next step was issued
    assert ring.joins == len(ends) == (3 if join else 0)
    if join:
        assert log[-1] == ("wait_stream", ring.copy_stream), "the join is the step's last wait"
    with pytest.raises(ConfigError, match="join_at_step_end"):
        build(SPEC, Prefetch(2, 1, 1, wrap=True), "cpu", join_at_step_end="yes")


def test_memory_needs_counts_the_pinned_host_memory_this_runtime_allocates():
    """The runtime pins every offloaded parameter on its own (copy path, UVA) or one flat tensor per
    prefetched layer, whether or not the policy (as vLLM would) pins: each allocation rounded up to a
    power of two by PyTorch's caching host allocator."""
    from offloadlab.catalog import get_model
    from offloadlab.policy import Prefetch, VllmCopy, pinned_bytes
    from runtime.offload import memory_needs

    m = get_model("llama-3.2-1b")
    for pin in (True, False):
        pl = VllmCopy(0.5, pin_memory=pin).place(m)
        need = memory_needs(m, pl)
        assert need["host"] == pl.offloaded_bytes
        assert need["host_pinned"] == pinned_bytes(b for p in pl.offloaded for b in p) > pl.offloaded_bytes
        pf = Prefetch(4, 1, 2, pin_memory=pin).place(m)
        assert memory_needs(m, pf)["host_pinned"] == pinned_bytes(pf.layer_offloaded_bytes(i)
                                                                  for i in pf.offloaded_layers)
