"""Cost models and Profiles: hand-computed roofline numbers, calibration from the probe file."""
import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from offloadlab import ConfigError, Profile, get_gpu, get_model, interval
from offloadlab.policy import Placement
from offloadlab.sim import Roofline, StepShape, cost_model, simulate_layers
from offloadlab.sim.costs import FA2_REREAD

M8 = get_model("llama-3.1-8b")
H100 = get_gpu("h100")


def test_step_shape_counts_causal_pairs_by_hand():
    # 2 sequences: (new=3 after 5 cached) -> keys 6+7+8 = 21; (new=1 after 10) -> 11
    s = StepShape.of([(3, 5), (1, 10)])
    assert (s.seqs, s.tokens, s.pairs, s.kv_tokens, s.decode_only) == (2, 4, 32, 19, False)
    assert (s.decodes, s.decode_kv) == (1, 11)  # the one-token sequence alone: 10 cached + 1
    assert StepShape.uniform(4, 1, 100) == StepShape.of([(1, 100)] * 4) == StepShape.decode(4, 404)
    assert StepShape.uniform(4, 1, 100).decode_only
    assert (StepShape.uniform(2, 5, 7).decodes, StepShape.uniform(2, 5, 7).decode_kv) == (0, 0)


@pytest.mark.parametrize("field,value", [("batch", 0), ("new_tokens", 0), ("context", -1)])
def test_step_shape_rejects_bad_values(field, value):
    args = {"batch": 1, "new_tokens": 1, "context": 0, field: value}
    with pytest.raises(ConfigError, match=field):
        StepShape.uniform(args["batch"], args["new_tokens"], args["context"])


# Llama-3.1-8B's decoder layer from its published shapes (hidden 4096, 32 query and 8 KV heads of 128,
# MLP 14336): q 4096x4096, k and v 1024x4096, o 4096x4096, gate, up 14336x4096, down 4096x14336
M8_GEMM_WEIGHTS = [(4096, 4096), (1024, 4096), (1024, 4096), (4096, 4096), (14336, 4096), (14336, 4096),
                   (4096, 14336)]
INF = 1e30  # "infinite" FLOP/s or bandwidth: the other limit alone sets the time


def _brute_force_flops(seqs: list[tuple[int, int]]) -> float:
    """FLOPs of one 8B layer, counted token by token: every GEMM weight does a multiply and an add
    per weight element per token; each new token's query meets every key up to and including its own
    position, one multiply-add for q.k and one for p.v per head dimension of each of the 32 heads."""
    flops = 0.0
    for new, context in seqs:
        for j in range(new):
            flops += sum(2 * o * i for o, i in M8_GEMM_WEIGHTS)
            for _key in range(context + j + 1):
                flops += 32 * 128 * (2 + 2)
    return flops


@pytest.mark.parametrize("seqs", [[(8192, 0)], [(3, 5), (1, 10)], [(1, 4096)] * 4, [(512, 1000), (7, 0)]])
def test_roofline_with_infinite_bandwidth_is_flops_over_peak(seqs):
    """The FLOP-bound limit: every kernel's time is its FLOPs over the peak (efficiency 1), so a layer
    takes all its FLOPs, counted independently, over 989 TFLOP/s."""
    rf = Roofline(M8, H100.replace(hbm_bw=INF), matmul_eff=1.0, attention_eff=1.0, memory_eff=1.0, kernel_floor=0.0)
    assert rf.gpu_time(StepShape.of(seqs)) == pytest.approx(_brute_force_flops(seqs) / 989e12, rel=1e-9)


@pytest.mark.parametrize("batch,context", [(1, 0), (1, 8000), (16, 2048)])
def test_roofline_with_infinite_flops_reads_the_weights_and_the_kv_cache(batch, context):
    """The byte-bound limit of a decode step: the layer's weights (from the parameter shapes, bf16) and
    every sequence's K and V (8 heads x 128 x 2 bytes each, the new token's included) over 3.35 TB/s;
    the activations (a few MB against hundreds) add at most 2% at these batch sizes."""
    rf = Roofline(M8, H100.replace(peak_flops=INF), memory_eff=1.0, kernel_floor=0.0)
    weights = 2 * sum(o * i for o, i in M8_GEMM_WEIGHTS)
    kv = batch * (context + 1) * 2 * 8 * 128 * 2
    t = rf.gpu_time(StepShape.uniform(batch, 1, context))
    assert (weights + kv) / 3.35e12 <= t <= 1.02 * (weights + kv) / 3.35e12


@pytest.mark.parametrize("seqs", [[(8192, 0)], [(1, 4096)] * 64, [(256, 3000)] * 3])
def test_roofline_lies_between_its_two_limits(seqs):
    """Each kernel takes the larger of its FLOP and byte times: the layer is at least the slower limit
    and at most the two added."""
    kw = dict(matmul_eff=0.7, attention_eff=0.5, memory_eff=0.8, kernel_floor=0.0)
    shape = StepShape.of(seqs)
    t = Roofline(M8, H100, **kw).gpu_time(shape)
    flop_bound = Roofline(M8, H100.replace(hbm_bw=INF), **kw).gpu_time(shape)
    byte_bound = Roofline(M8, H100.replace(peak_flops=INF), **kw).gpu_time(shape)
    assert max(flop_bound, byte_bound) <= t * (1 + 1e-12) and t <= (flop_bound + byte_bound) * (1 + 1e-12)


def test_roofline_decode_reads_weights_and_kv_by_hand():
    rf = Roofline(M8, H100, memory_eff=1.0, kernel_floor=0.0)
    B, C = 64, 4096
    weights = 218_103_808 * 2
    kv = B * (C + 1) * 4096  # K and V of 8 heads x 128 x 2 bytes per token
    t = rf.gpu_time(StepShape.uniform(B, 1, C))
    # memory-bound: at least the weight and KV bytes over HBM bandwidth, and not far above
    assert (weights + kv) / 3.35e12 < t < 1.1 * (weights + kv) / 3.35e12


def test_fa2_rereads_a_mixed_steps_decode_kv_by_hand():
    """vLLM V1's FlashAttention-2 call: a mixed step's one-row queries are not GQA-packed, so each of a
    KV head's 4 query heads (Llama-3.1-8B: 32 over 8) reads its cache; FA2_REREAD of the 3 extra reads
    reach HBM. Byte-bound (infinite FLOP/s): the decodes' KV bytes grow by 3 x FA2_REREAD; the prefill
    chunk's and the activations' do not."""
    kw = dict(memory_eff=1.0, kernel_floor=0.0)
    hw = H100.replace(peak_flops=INF)
    packed, fa2 = Roofline(M8, hw, **kw), Roofline(M8, hw, attention_kernel="fa2", **kw)
    mixed = StepShape.of([(512, 0)] + [(1, 2047)] * 64)  # a chunk and 64 decodes of 2,048 KV tokens each
    assert (mixed.decodes, mixed.decode_kv) == (64, 64 * 2048)
    extra = FA2_REREAD * 3 * 64 * 2048 * 4096 / 3.35e12  # 4,096 KV bytes per token per layer
    assert fa2.attention_time(mixed) == pytest.approx(packed.attention_time(mixed) + extra, rel=1e-12)
    for same in (StepShape.uniform(64, 1, 2047), StepShape.of([(512, 0), (300, 100)])):  # decode-only, no decodes
        assert fa2.attention_time(same) == packed.attention_time(same)
    mha = M8.replace(kv_heads=32)
    assert Roofline(mha, hw, attention_kernel="fa2", **kw).attention_time(mixed) == \
        Roofline(mha, hw, **kw).attention_time(mixed)  # one query head per KV head: nothing to pack


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 600), st.integers(0, 5000)), min_size=1, max_size=12))
def test_fa2_never_cheaper_and_only_mixed_steps_differ(seqs):
    shape = StepShape.of(seqs)
    packed, fa2 = Roofline(M8, H100), Roofline(M8, H100, attention_kernel="fa2")
    assert fa2.gpu_time(shape) >= packed.gpu_time(shape)
    if shape.decode_only or not shape.decodes:
        assert fa2.gpu_time(shape) == packed.gpu_time(shape)


def test_unknown_attention_kernel_is_named():
    with pytest.raises(ConfigError, match="attention_kernel"):
        Roofline(M8, H100, attention_kernel="fa4")


def test_more_tokens_never_cost_less():
    rf = Roofline(M8, H100)
    times = [rf.gpu_time(StepShape.uniform(1, t, 0)) for t in (1, 16, 256, 2048, 8192)]
    assert times == sorted(times)


def test_transfer_adds_latency_to_bandwidth():
    rf = Roofline(M8, H100)
    assert rf.transfer(M8.layer_bytes) == pytest.approx(10e-6 + M8.layer_bytes / (64e9 * 0.82))


def test_cuda_graphs_only_for_decode_batches_up_to_the_capture_size():
    rf = Roofline(M8, H100)
    assert rf.layer(StepShape.uniform(8, 1, 100)).host == rf.graph_launch_per_layer
    assert rf.layer(StepShape.uniform(512, 1, 100)).host == rf.eager_launch_per_layer
    assert rf.layer(StepShape.uniform(1, 100, 0)).host == rf.eager_launch_per_layer
    assert Roofline(M8, H100, cuda_graphs=False).layer(StepShape.uniform(8, 1, 100)).host == \
        rf.eager_launch_per_layer


@pytest.mark.parametrize("field", ["matmul_eff", "memory_eff", "attention_eff"])
def test_roofline_rejects_bad_efficiency(field):
    with pytest.raises(ConfigError, match=field):
        Roofline(M8, H100, **{field: 0})


# ---- Profile ----

def test_profile_from_probe_reads_in_stack_times(probe_path):
    d = json.loads(probe_path.read_text())
    p = Profile.from_probe(probe_path)
    resident = {(r["B"], r["T"], r["C"]): r["ms"] for r in d["forward"] if r["policy"] == "resident"}
    got = {(b, t, c): s for b, t, c, s in p.layer_times}
    for k, ms in resident.items():
        assert got[k] == pytest.approx(ms / 1e3 / d["layers"])
    assert p.h2d[0] == (1024**2, d["h2d_bandwidth"][0]["h2d_pinned_GBps"] * 1e9)


def test_profile_save_load_round_trip(tmp_path, probe_path):
    p = Profile.from_probe(probe_path)
    path = p.save(tmp_path / "prof.json")
    assert Profile.load(path) == p
    assert not [f for f in tmp_path.iterdir() if f.name != "prof.json"]  # no temp files left


@pytest.mark.parametrize("edit,field", [
    (lambda d: d.pop("schema"), "schema"),
    (lambda d: d.update(schema="offloadlab.profile/99"), "schema"),
    (lambda d: d.pop("h2d"), "h2d"),
    (lambda d: d.update(h2d=[[1, -5]]), "h2d[0]"),
    (lambda d: d.update(layer_times=[[1, 0, 0, 1.0]]), "layer_times[0]"),
])
def test_profile_load_errors_name_file_and_field(tmp_path, probe_path, edit, field):
    d = json.loads(Profile.from_probe(probe_path).save(tmp_path / "p.json").read_text())
    edit(d)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(d))
    with pytest.raises(ConfigError) as e:
        Profile.load(bad)
    assert "bad.json" in str(e.value) and field in str(e.value)


def test_truncated_profile_is_a_clear_error(tmp_path, probe_path):
    text = Profile.from_probe(probe_path).save(tmp_path / "p.json").read_text()
    bad = tmp_path / "cut.json"
    bad.write_text(text[: len(text) // 2])
    with pytest.raises(ConfigError, match="cut.json"):
        Profile.load(bad)


def test_calibrated_copy_time_matches_measured_layer_copy(probe_path):
    d = json.loads(probe_path.read_text())
    cal = cost_model(M8, H100, Profile.from_probe(probe_path))
    assert cal.transfer(d["layer_bytes"]) == pytest.approx(d["layer_copy_ms"] / 1e3, rel=0.03)


def test_calibrated_reproduces_resident_rows_exactly(probe_path):
    d = json.loads(probe_path.read_text())
    cal = cost_model(M8, H100, Profile.from_probe(probe_path), cuda_graphs=False)
    none = interval(M8.layers + 1).place(M8)
    for r in d["forward"]:
        if r["policy"] != "resident":
            continue
        res = simulate_layers(none, cal.layer(StepShape.uniform(r["B"], r["T"], r["C"])), 0.0, cal.transfer)
        assert res.time * 1e3 == pytest.approx(r["ms"], rel=0.01)


def test_calibrated_predicts_offload_rows_of_the_probe(probe_path):
    """Calibrated from components and resident rows only, the step model predicts the offload rows
    (the development set's fidelity target: MAPE <= 3%, no row off by more than 10%)."""
    d = json.loads(probe_path.read_text())
    cal = cost_model(M8, H100, Profile.from_probe(probe_path), cuda_graphs=False)
    errs = []
    for r in d["forward"]:
        if r["policy"] == "sync_prefix":
            pl = Placement(tuple(M8.layer_param_bytes if i < r["param"] else () for i in range(d["layers"])),
                           M8.layer_bytes, "copy")
        elif r["policy"] == "async_k":
            pl = interval(r["param"], r["nbuf"]).place(M8)
        else:
            continue
        res = simulate_layers(pl, cal.layer(StepShape.uniform(r["B"], r["T"], r["C"])), 0.0, cal.transfer)
        errs.append(abs(res.time * 1e3 / r["ms"] - 1))
    assert len(errs) == 36
    assert sum(errs) / len(errs) <= 0.03
    assert max(errs) <= 0.10


@pytest.mark.parametrize("mode,decode_launch,mixed_launch", [
    ("decode", "graph", "eager"),  # V0, and V1's FULL_DECODE_ONLY
    ("piecewise", "graph", "piecewise"),  # V1's default FULL_AND_PIECEWISE
    ("piecewise_only", "piecewise", "piecewise"),  # cudagraph_mode PIECEWISE
    ("full", "graph", "graph"),  # cudagraph_mode FULL
])
def test_graph_modes_launch_as_vllm_replays_them(mode, decode_launch, mixed_launch):
    rf = Roofline(M8, H100, graph_mode=mode, max_graph_batch=64)
    launch = {"graph": rf.graph_launch_per_layer, "piecewise": rf.piecewise_launch_per_layer,
              "eager": rf.eager_launch_per_layer}
    decode, mixed = StepShape.uniform(8, 1, 100), StepShape.of([(1, 100)] * 7 + [(16, 0)])
    assert rf.launch_time(decode) == launch[decode_launch]
    assert rf.launch_time(mixed) == launch[mixed_launch]
    # beyond the capture size every mode runs eagerly
    assert rf.launch_time(StepShape.of([(1, 100)] * 40 + [(100, 0)])) == rf.eager_launch_per_layer
    assert Roofline(M8, H100, graph_mode=mode, cuda_graphs=False).launch_time(decode) == rf.eager_launch_per_layer


def test_unknown_graph_mode_is_named():
    with pytest.raises(ConfigError, match="graph_mode"):
        Roofline(M8, H100, graph_mode="partial")
