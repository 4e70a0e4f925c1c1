"""The runtime on a CUDA GPU: real streams, events, pinned memory and UVA. Skipped without CUDA
(runtime/gpu_check.py runs them on a GPU machine)."""
import pytest

torch = pytest.importorskip("torch")

from offloadlab import ModelSpec  # noqa: E402
from offloadlab.errors import DoesNotFitError  # noqa: E402
from offloadlab.policy import NoOffload, Prefetch, VllmCopy, VllmUva, interval  # noqa: E402
from offloadlab.runtime import KVCache, Tracer, build  # noqa: E402
from offloadlab.runtime.probe import traced_steps  # noqa: E402
from offloadlab.specs import GiB  # noqa: E402

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

SPEC = ModelSpec("tiny", layers=4, hidden=64, heads=4, kv_heads=2, head_dim=16, intermediate=128, vocab=256,
                 max_context=512)
# big enough that copies take longer than launching them, so streams really run concurrently
MID = ModelSpec("mid", layers=8, hidden=1024, heads=8, kv_heads=2, head_dim=128, intermediate=4096, vocab=1024)
PROMPTS = [[5, 17, 33, 2, 9, 100, 7], [44, 3, 250]]


def _steps(model, prompts=PROMPTS, decode_steps=3, tracer=None):
    from offloadlab.runtime.generate import decode, prefill

    with torch.inference_mode():
        logits, cache = prefill(model, prompts, max(map(len, prompts)) + decode_steps + 1, tracer)
        out = [logits]
        for _ in range(decode_steps):
            out.append(decode(model, out[-1].argmax(-1), cache, tracer))
    torch.cuda.synchronize()
    return out


@pytest.mark.parametrize("spec", [SPEC, MID], ids=["tiny", "mid"])
def test_every_policy_equals_resident_on_cuda(spec):
    layer = spec.layer_bytes / GiB
    ref = _steps(build(spec, NoOffload(), "cuda"))
    policies = ([VllmCopy(1.5 * layer), VllmCopy(spec.layers * layer), VllmUva(2.5 * layer)]
                + [interval(k, b) for k in (1, 2, 3) for b in (1, 2, 3)]
                + [Prefetch(4, 2, 3), Prefetch(2, 1, 1, wrap=True), Prefetch(4, 2, 2, wrap=True)])
    for policy in policies:
        model = build(spec, policy, "cuda")
        for step, (a, b) in enumerate(zip(_steps(model), ref)):
            assert torch.equal(a, b), f"{policy.label}: step {step} differs"
        if policy.place(spec).mechanism in ("copy", "uva", "prefetch"):
            host = [p for layer in model.layers for p in layer.parameters() if p.device.type == "cpu"]
            assert host and all(p.is_pinned() for p in host), f"{policy.label}: offloaded weights not pinned"


def test_prefetch_adds_no_allocations_to_the_resident_forward():
    def allocations(model):
        cache = KVCache(MID, 1, 64, model.device, model.dtype)
        x = torch.randn(1, 32, MID.hidden, device="cuda", dtype=model.dtype)
        with torch.inference_mode():
            model.forward_layers(x, cache)  # warm-up
            torch.cuda.synchronize()
            before = torch.cuda.memory_stats()["allocation.all.allocated"]
            cache.length = 0
            model.forward_layers(x, cache)
            torch.cuda.synchronize()
            return torch.cuda.memory_stats()["allocation.all.allocated"] - before

    resident = allocations(build(MID, NoOffload(), "cuda"))
    assert allocations(build(MID, interval(2, 2), "cuda")) == resident
    assert allocations(build(MID, VllmCopy(2 * MID.layer_bytes / GiB), "cuda")) > resident  # the detector works


def test_cuda_trace_is_well_formed_and_prefetch_overlaps():
    model = build(MID, interval(2, 2), "cuda")
    trace = traced_steps(model, 1, 256, 0, steps=3)
    for lane in trace.lanes():
        spans = sorted((s for s in trace.spans if s.lane == lane), key=lambda s: s.start)
        for a, b in zip(spans, spans[1:]):
            assert a.end <= b.start + 1e-6, f"{lane}: {a} overlaps {b}"
    f = trace.to_frame()
    for _, c in f[f.kind == "copy"].iterrows():
        comp = f[(f.kind == "compute") & (f.layer == c.layer) & (f.step == c.step)]
        assert comp.start.item() >= c.end - 1e-6, f"layer {c.layer} computed before its copy ended"
    copies = f[f.lane == "copy"]
    compute = f[(f.lane == "compute") & (f.kind == "compute")]
    overlap = sum(max(0.0, min(a.end, b.end) - max(a.start, b.start))
                  for a in copies.itertuples() for b in compute.itertuples())
    assert overlap > 0, "copies never ran beside compute: the copy stream is not asynchronous"


def test_tracer_waits_appear_when_copy_bound():
    model = build(MID, interval(1, 1), "cuda")  # every layer offloaded, one slot: decode is copy-bound
    trace = traced_steps(model, 1, 1, 16, steps=2)
    assert any(s.kind == "wait" for s in trace.spans)


def test_does_not_fit_gpu_memory_before_allocating():
    free = torch.cuda.mem_get_info()[0]
    before = torch.cuda.memory_allocated()
    with pytest.raises(DoesNotFitError, match="does not fit GPU memory"):
        build(SPEC, NoOffload(), "cuda", reserve_bytes=free + 1)
    assert torch.cuda.memory_allocated() == before


def test_tracer_on_cuda_records_full_model_steps():
    model = build(SPEC, VllmCopy(SPEC.layer_bytes / GiB), "cuda")
    tracer = Tracer(model.dev)
    _steps(model, decode_steps=1, tracer=tracer)
    trace = tracer.trace()
    assert {s.lane for s in trace.spans} == {"host", "compute"}
    assert sum(s.kind == "copy" for s in trace.spans) == 2  # layer 0, prefill and one decode step


def test_uva_gemm_reads_host_memory_and_slows_with_more_m_tiles():
    """The microbenchmark's UVA GEMM reads a pinned host weight through its device view; past one
    M-tile it cannot get faster (sim/costs.py calibrates from these rows)."""
    from offloadlab.runtime.device import resolve_device
    from offloadlab.runtime.microbench import uva_gemm_times

    rows = uva_gemm_times(resolve_device("cuda"), 4096, 4096, tokens=(1, 64, 1024), reps=3)
    assert [(m, b) for m, b, _ in rows] == [(1, 4096 * 4096 * 2), (64, 4096 * 4096 * 2), (1024, 4096 * 4096 * 2)]
    assert rows[2][2] >= 0.9 * rows[0][2], f"1024 rows read the host weight faster than 1 row: {rows}"


def test_joined_ring_matches_resident_outputs_on_the_gpu():
    ref = _steps(build(MID, NoOffload(), "cuda"))
    got = _steps(build(MID, Prefetch(2, 1, 2, wrap=True), "cuda", join_at_step_end=True))
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b)
