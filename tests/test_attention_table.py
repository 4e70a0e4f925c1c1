"""Measured attention in ``Calibrated`` (sim/costs.py ``_AttentionTable``): LLMServingSim's attention tables,
transferred by their ratio to the measured GPU's roofline, looked up by step shape."""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from offloadlab.catalog import get_gpu, get_model
from offloadlab.profile import Profile
from offloadlab.sim.costs import BAND_TRANSFER_MODEL, Calibrated, Roofline, StepShape, datasheet_gpu
from offloadlab.sim.vllm_engine import attention_kernel

PROFILES = Path(__file__).resolve().parents[1] / "validation" / "traces" / "profiles"
RTX4090, PRO6000 = PROFILES / "rtx4090_llama-3.1-8b", PROFILES / "rtxpro6000_llama-3.1-8b"


@pytest.fixture(scope="module")
def p4090() -> Profile:
    return Profile.load(RTX4090)


@pytest.fixture(scope="module")
def pro6000() -> Profile:
    return Profile.load(PRO6000)


def _roofline(gpu: str, tp: int = 1, model: str = "llama-3.1-8b") -> Roofline:
    """The roofline V1 runs on ``gpu`` (its attention kernel as vllm_engine picks it), of the tp shard."""
    hw = get_gpu(gpu)
    return Roofline(get_model(model).shard(tp), hw, attention_kernel=attention_kernel(hw))


def _without_attention(p: Profile) -> Profile:
    return dataclasses.replace(p, attention=())


def _table_step(pc: int, kvp: int, nd: int, kvd: int) -> StepShape:
    """The step a table row measured: one chunk of pc tokens after kvp cached ones, nd decodes after kvd."""
    return StepShape.of([(pc, kvp)] * (pc > 0) + [(1, kvd)] * nd)


def _attention_seconds(rf: Roofline, with_att: Calibrated, without: Calibrated, s: StepShape) -> float:
    """The calibrated attention time of step ``s``: the two calibrations differ by their attention only."""
    return with_att.gpu_host(s)[0] - without.gpu_host(s)[0] + rf.attention_time(s)


@pytest.mark.parametrize("bundle, gpu, tp", [(RTX4090, "RTX-4090-24GB", 1), (PRO6000, "RTX-PRO-6000-Blackwell-96GB", 1),
                                             (PRO6000, "RTX-PRO-6000-Blackwell-96GB", 2)])
def test_on_the_measured_gpu_and_model_a_measured_shape_gives_the_measured_time_back(bundle, gpu, tp):
    p = Profile.load(bundle)
    rf = _roofline(gpu, tp)
    cal, plain = Calibrated(rf, p), Calibrated(rf, _without_attention(p))
    rows = [r for r in p.attention if r[4] == tp]
    for pc, kvp, nd, kvd, _, sec in rows[::7]:  # every kind, every axis value (the grid's sizes are prime to 7)
        got = _attention_seconds(rf, cal, plain, _table_step(pc, kvp, nd, kvd))
        assert got == pytest.approx(sec, rel=1e-9), (pc, kvp, nd, kvd)


def test_the_whole_layer_at_measured_shapes_is_the_measured_kernels_of_that_degree(pro6000):
    """TP 2 on the bundle's GPU: every GEMM from the TP-2 table of the same operator (a TP-2 gate_up_proj is
    as large as the whole model's down_proj: not that one), elementwise and attention measured, the all-reduce
    the datasheet's."""
    rf = _roofline("RTX-PRO-6000-Blackwell-96GB", 2)
    cal = Calibrated(rf, pro6000)
    kern = {(op, t): s for op, t, ktp, s in pro6000.kernels if ktp == 2}
    att = {r[:4]: r[5] for r in pro6000.attention if r[4] == 2}
    for pc, kvp, nd, kvd in ((0, 0, 64, 1024), (0, 0, 16, 256), (512, 2048, 0, 0), (1024, 0, 32, 4096)):
        s = _table_step(pc, kvp, nd, kvd)
        want = sum(kern[op, s.tokens] for op in ("qkv_proj", "o_proj", "gate_up_proj", "down_proj", "elementwise"))
        want += att[pc, kvp, nd, kvd] + 2 * rf.allreduce_time(s.tokens)
        assert cal.gpu_host(s)[0] == pytest.approx(want, rel=1e-9), (pc, kvp, nd, kvd)


def test_the_attention_source_is_said_and_another_degree_is_a_model_transfer_with_a_wider_band(pro6000, p4090):
    own = Calibrated(_roofline("RTX-4090-24GB"), p4090)
    assert "attention by step shape from its tp1 table" in own.describe()
    assert "attention from the datasheet" in Calibrated(_roofline("RTX-4090-24GB"), _without_attention(p4090)).describe()
    tp2 = Calibrated(_roofline("RTX-PRO-6000-Blackwell-96GB", 2), pro6000)
    assert "from its tp2 table" in tp2.describe() and "another degree" not in tp2.describe()
    only_tp1 = dataclasses.replace(pro6000, attention=tuple(r for r in pro6000.attention if r[4] == 1))
    moved = Calibrated(_roofline("RTX-PRO-6000-Blackwell-96GB", 2), only_tp1)
    assert "from its tp1 table (another degree's: a model transfer)" in moved.describe()
    # the same table on its own degree and moved to another: the attention factor gains BAND_TRANSFER_MODEL
    kept = Calibrated(_roofline("RTX-PRO-6000-Blackwell-96GB", 1), only_tp1)
    for kind, (lo, hi) in kept._evidence["attention"].items():
        w = hi - 1
        assert moved._evidence["attention"][kind][1] - 1 == pytest.approx(math.hypot(w, BAND_TRANSFER_MODEL), rel=1e-12)
        assert 0 < w < 0.35


def test_the_band_of_measured_attention_is_narrower_than_the_datasheets(p4090):
    rf = _roofline("RTX-4090-24GB")
    cal, plain = Calibrated(rf, p4090), Calibrated(rf, _without_attention(p4090))
    for s in (StepShape.decode(128, 128 * 3000), StepShape.of([(256, 8000)] + [(1, 900)] * 100)):
        lo, hi = cal.band(s).gpu
        assert lo < 1 < hi
        assert plain.band(s).gpu[0] < lo and hi < plain.band(s).gpu[1]
    # the attention factor is the table's own leave-one-out error: inside the datasheet attention band
    assert datasheet_gpu(rf, attention=True)[0] < cal.band(StepShape.decode(256, 256 * 16000)).gpu[0]


def test_another_gpu_takes_the_ratio_not_the_time(p4090):
    """The 4090's table on the RTX PRO 6000: its ratio to the 4090's roofline, times the PRO 6000's roofline."""
    src, dst = _roofline("RTX-4090-24GB"), _roofline("RTX-PRO-6000-Blackwell-96GB")
    on_src, src_plain = Calibrated(src, p4090), Calibrated(src, _without_attention(p4090))
    on_dst, dst_plain = Calibrated(dst, p4090), Calibrated(dst, _without_attention(p4090))
    for s in (_table_step(0, 0, 64, 2048), _table_step(2048, 0, 0, 0), _table_step(128, 4096, 32, 1024)):
        ratio = _attention_seconds(src, on_src, src_plain, s) / src.attention_time(s)
        assert _attention_seconds(dst, on_dst, dst_plain, s) == pytest.approx(dst.attention_time(s) * ratio, rel=1e-9)


def _table(p: Profile, tp: int = 1):
    return Calibrated(_roofline("RTX-4090-24GB", tp), p)._attention


def _step(draw_seqs) -> StepShape:
    return StepShape.of(draw_seqs)


steps = st.lists(st.tuples(st.integers(1, 3000), st.integers(0, 40000)), min_size=1, max_size=300).map(_step)


@settings(max_examples=200, deadline=None)
@given(s=steps)
def test_any_step_gets_a_finite_ratio_between_the_tables_extremes(p4090, s):
    """Multilinear interpolation (clamped at the grid's ends) is a convex combination of measured ratios."""
    table = _table(p4090)
    kind, r = table.lookup(s)
    ratios = table.kinds[kind][5]
    assert math.isfinite(r) and ratios.min() <= r <= ratios.max()
    assert table.lookup(s) == (kind, r) and table.ratio(StepShape(*dataclasses.astuple(s))) == r  # memo: the same


@settings(max_examples=60, deadline=None)
@given(keep=st.lists(st.booleans(), min_size=99, max_size=99), s=st.tuples(st.integers(1, 256), st.integers(0, 20000)))
def test_an_incomplete_table_recovers_its_measured_points_and_stays_between_its_extremes(p4090, keep, s):
    """A table that is not a full grid (rows dropped at random, decode-only kind): every measured shape still
    gives its ratio back, and any step a ratio between the kept ones (corner weights renormalized, else the
    nearest measured point)."""
    decode = [r for r in p4090.attention if r[0] == 0]
    kept = [r for r, k in zip(decode, keep) if k] or decode[:1]
    p = dataclasses.replace(p4090, attention=tuple(kept))
    table, full = _table(p), _table(p4090)
    for pc, kvp, nd, kvd, _, _ in kept:
        step = _table_step(pc, kvp, nd, kvd)
        assert table.ratio(step) == pytest.approx(full.ratio(step), rel=1e-12)
    ratios = table.kinds[0][5]
    r = table.ratio(StepShape.decode(s[0], s[0] * (s[1] + 1)))
    assert math.isfinite(r) and ratios.min() <= r <= ratios.max()


@settings(max_examples=100, deadline=None)
@given(nd=st.sampled_from([1, 2, 4, 8, 16, 32, 64, 128]), i=st.integers(0, 9), w=st.floats(0, 1))
def test_between_two_measured_contexts_the_ratio_lies_between_theirs(p4090, nd, i, w):
    """Along one axis (a decode batch's context, in log coordinates), the ratio moves from one measured
    point's to the next one's and no further."""
    kvs = [16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384]
    table = _table(p4090)
    a, b = table.ratio(_table_step(0, 0, nd, kvs[i])), table.ratio(_table_step(0, 0, nd, kvs[i + 1]))
    kv = round(math.exp(math.log(kvs[i]) + w * (math.log(kvs[i + 1]) - math.log(kvs[i]))))
    r = table.ratio(StepShape.decode(nd, nd * (kv + 1)))
    assert min(a, b) - 1e-12 <= r <= max(a, b) + 1e-12


def test_a_step_of_several_prompt_chunks_is_costed_as_one_chunk_at_their_mean_context(p4090):
    """Two 300-token chunks after 1,000 and 3,000 cached tokens, with 8 decodes at 511 and 1,535 tokens:
    the table's coordinates are a 600-token chunk after 2,000 and 8 decodes after 1,023."""
    table = _table(p4090)
    s = StepShape.of([(300, 1000), (300, 3000)] + [(1, 511)] * 4 + [(1, 1535)] * 4)
    assert table.ratio(s) == table._interpolate(2, (600, 2000.0, 8, 1023.0))


def test_an_all_reduce_no_profile_measured_gets_the_ring_models_band(pro6000):
    """The bundles time one GPU's shard, no all-reduce: at TP 2 its term is the ring model's over PCIe, and so
    is its band (BAND_ALLREDUCE_PCIE, wider than with the same all-reduce measured). Over the host link (no
    NVLink) the all-reduces carry their factor apart (Band.comm); the rest of the layer's is the same."""
    from offloadlab.sim.costs import BAND_ALLREDUCE_PCIE

    rf = _roofline("RTX-PRO-6000-Blackwell-96GB", 2)
    sizes = [2.0 ** k for k in range(10, 28)]
    rows = tuple((b, 2, rf.allreduce_seconds(b, 2)) for b in sizes)  # measured exactly as the ring model says
    unmeasured, measured = Calibrated(rf, pro6000), Calibrated(rf, dataclasses.replace(pro6000, allreduce=rows))
    for s in (StepShape.decode(64, 64 * 1000), StepShape.uniform(1, 2048, 0)):
        assert unmeasured.gpu_host(s)[0] == pytest.approx(measured.gpu_host(s)[0], rel=1e-9)
        assert unmeasured.band(s).gpu == measured.band(s).gpu
        (lo, hi), (mlo, mhi) = unmeasured.band(s).comm, measured.band(s).comm
        assert (lo, hi) == BAND_ALLREDUCE_PCIE and lo < mlo and hi > mhi


@pytest.mark.parametrize("bundle,tp", [(RTX4090, 1), (PRO6000, 1), (PRO6000, 2)])
def test_fa2_reread_share_is_what_the_stored_tables_measure(bundle, tp):
    """FA2_REREAD (Roofline.attention_time) from each stored table: a mixed step's decode attention (its
    time less its prefill chunk's alone) over the same decodes' time alone, median over the rows where
    the decodes dominate, is 1 + share x (query heads per KV head - 1). The constant is the median of
    four whole tables' shares (0.24-0.34; Qwen3-32B's is not stored, and the RTX PRO 6000 ones are
    stored on their x2 grid only, which gives 0.22 at both degrees): each stored one within 0.07."""
    from offloadlab.sim.costs import FA2_REREAD
    import statistics

    t = {(pc, kvp, nd, kvd): sec for pc, kvp, nd, kvd, ktp, sec in Profile.load(bundle).attention if ktp == tp}
    rs = []
    for (pc, kvp, nd, kvd), sec in t.items():
        if pc and nd >= 32 and kvd >= 512 and pc <= 512:
            alone, dec = t.get((pc, kvp, 0, 0)), t.get((0, 0, nd, kvd))
            if alone and dec and dec > 3 * alone:
                rs.append((sec - alone) / dec)
    assert len(rs) >= 100
    m = get_model("llama-3.1-8b")
    share = (statistics.median(rs) - 1) / (m.heads // m.kv_heads - 1)
    assert abs(share - FA2_REREAD) <= 0.07, share
