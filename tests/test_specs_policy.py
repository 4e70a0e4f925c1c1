"""Tests of the shared vocabulary: ModelSpec arithmetic against the published Llama 3.1 shapes,
HardwareSpec checks, the catalogs and user catalog files, and the offload policies.

Expected parameter counts are computed here from each model's published config.json figures
(hidden, heads, KV heads, head dim, MLP size, vocab, layers), written out independently of
ModelSpec's properties.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from offloadlab import catalog
from offloadlab.catalog import get_gpu, get_model, gpu_names, load_catalog_file, model_names
from offloadlab.errors import ConfigError, UnknownNameError
from offloadlab.policy import NoOffload, Prefetch, VllmCopy, interval, parse_policy
from offloadlab.specs import GiB, HardwareSpec, ModelSpec

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def llama_params(layers, hidden, heads, kv_heads, head_dim, mlp, vocab, tied=False):
    """Parameter count of a Llama-3 decoder, from its config.json numbers (by hand)."""
    q = hidden * heads * head_dim  # q_proj
    k = v = hidden * kv_heads * head_dim  # k_proj, v_proj
    o = heads * head_dim * hidden  # o_proj
    gate = up = down = hidden * mlp  # SwiGLU MLP
    norms = 2 * hidden  # input and post-attention RMSNorm
    per_layer = q + k + v + o + gate + up + down + norms
    embed = vocab * hidden
    lm_head = 0 if tied else vocab * hidden
    return layers * per_layer + embed + lm_head + hidden, per_layer  # + final norm


# ---------------------------------------------------------------- ModelSpec against the published shapes
def test_llama_8b_by_hand():
    m = get_model("llama-3.1-8b")
    total, per_layer = llama_params(32, 4096, 32, 8, 128, 14336, 128256)
    assert total == 8_030_261_248  # the published 8.03 B
    assert per_layer == 218_112_000
    assert m.layers == 32
    assert m.params == total
    assert m.layer_params == per_layer
    assert m.layer_bytes == 2 * per_layer == 436_224_000
    assert m.kv_bytes_per_token == 2 * 8 * 128 * 2 * 32 == 131_072
    assert m.kv_bytes_per_token_layer == 4096
    assert m.weight_total_bytes == 2 * total
    # the per-parameter sizes, in vLLM's registration order (fused qkv, o, fused gate_up, down, 2 norms)
    assert m.layer_param_bytes == (2 * 4096 * (4096 + 2 * 1024), 2 * 4096 * 4096, 2 * 2 * 14336 * 4096,
                                   2 * 4096 * 14336, 2 * 4096, 2 * 4096)
    assert m.layer_matmul_params == per_layer - 2 * 4096


def test_llama_8b_layer_bytes_match_the_probe_file(probe_path):
    data = json.loads(probe_path.read_text())
    m = get_model(data["model"])
    assert m.layer_bytes == data["layer_bytes"]
    assert m.layers == data["layers"]


@pytest.mark.parametrize("name, shape, published", [
    ("llama-3.1-70b", (80, 8192, 64, 8, 128, 28672, 128256), 70.55e9),
    ("llama-3.3-70b", (80, 8192, 64, 8, 128, 28672, 128256), 70.55e9),
    ("llama-3.1-405b", (126, 16384, 128, 8, 128, 53248, 128256), 405.85e9),
])
def test_big_llamas_by_hand(name, shape, published):
    m = get_model(name)
    total, per_layer = llama_params(*shape)
    assert m.params == total
    assert m.layer_bytes == 2 * per_layer
    assert m.params == pytest.approx(published, rel=1e-3)
    assert m.kv_bytes_per_token == 2 * 8 * 128 * 2 * shape[0]


def test_70b_exact_count():
    # 80 x 855,654,400 + 2 x 128,256 x 8,192 + 8,192
    assert get_model("llama-3.1-70b").params == 70_553_706_496


def test_tied_embeddings_count_the_embedding_once():
    # Llama-3.2-1B: 16 layers, hidden 2048, 32 heads, 8 KV heads, head dim 64, MLP 8192, tied: 1.24 B
    m = get_model("llama-3.2-1b")
    total, _ = llama_params(16, 2048, 32, 8, 64, 8192, 128256, tied=True)
    assert m.params == total == 1_235_814_400


def test_fp8_weights_halve_the_bytes_not_the_params():
    m = get_model("llama-3.1-8b")
    f8 = m.replace(weight_bytes=1.0)
    assert f8.params == m.params
    assert f8.layer_bytes * 2 == m.layer_bytes
    assert f8.kv_bytes_per_token == m.kv_bytes_per_token  # KV dtype is separate


@pytest.mark.parametrize("field, value", [("layers", 0), ("hidden", -1), ("heads", 2.5), ("vocab", True),
                                          ("weight_bytes", 0), ("kv_bytes", -2.0)])
def test_modelspec_rejects_bad_fields(field, value):
    kw = dict(name="x", layers=2, hidden=64, heads=4, kv_heads=2, head_dim=16, intermediate=128, vocab=100)
    kw[field] = value
    with pytest.raises(ConfigError) as e:
        ModelSpec(**kw)
    assert field in str(e.value) and e.value.value == value


def test_modelspec_kv_heads_must_divide_heads():
    with pytest.raises(ConfigError, match="kv_heads"):
        ModelSpec("x", layers=2, hidden=64, heads=6, kv_heads=4, head_dim=16, intermediate=128, vocab=100)


@pytest.mark.parametrize("field, value", [("host_link_bw", -1e9), ("hbm_bw", 0), ("memory_bytes", -1.0),
                                          ("h2d_efficiency", 0.0), ("h2d_efficiency", 1.5),
                                          ("host_link_latency", -1e-6), ("gpus_per_node", 0)])
def test_hardwarespec_rejects_bad_fields(field, value):
    kw = dict(name="g", memory_bytes=8 * GiB, hbm_bw=1e12, peak_flops=1e14, host_link_bw=3e10)
    kw[field] = value
    with pytest.raises(ConfigError) as e:
        HardwareSpec(**kw)
    assert field in str(e.value)


# ---------------------------------------------------------------- catalogs
def test_gpu_catalog_reads_the_datasheet():
    h = get_gpu("H100-SXM5-80GB")
    assert h.memory_bytes == 80 * GiB
    assert h.hbm_bw == 3.35e12 and h.peak_flops == 989e12
    assert h.host_link_bw == 64e9
    assert h.h2d_bw == pytest.approx(0.82 * 64e9)  # ~52.5 GB/s, as measured (52-54 GB/s)
    a = get_gpu("a100")  # the paper's GPU, by alias
    assert a.name == "A100-SXM4-40GB" and a.memory_bytes == 40 * GiB and a.host_link_bw == 32e9
    gh = get_gpu("GH200")
    assert gh.host_link == "NVLink-C2C" and gh.host_link_bw == 450e9 and gh.h2d_efficiency == 0.9
    assert gh.host_memory_bytes == 480e9
    assert get_gpu(h) is h


def test_names_are_case_insensitive():
    assert get_model("Llama-3.1-8B") is get_model("llama-3.1-8b")
    assert get_gpu("h100-sxm5-80gb") is get_gpu("H100-SXM5-80GB")


def test_unknown_model_lists_known_names():
    with pytest.raises(UnknownNameError) as e:
        get_model("llama-9-000b")
    msg = str(e.value)
    assert "llama-9-000b" in msg
    for name in ("llama-3.1-8b", "llama-3.1-70b", "llama-3.1-405b"):
        assert name in msg
    assert set(e.value.known) == set(model_names())
    assert isinstance(e.value, KeyError)  # callers may catch it as a KeyError


def test_unknown_gpu_lists_known_names():
    with pytest.raises(UnknownNameError) as e:
        get_gpu("V100")
    msg = str(e.value)
    assert "'V100'" in msg
    for name in gpu_names():
        assert name in msg
    assert "A100-SXM4-40GB" in msg and "h100" in msg  # datasheet names and aliases


def test_packaged_hardware_csv_is_the_shared_copy():
    shared = SHARED_DATA / "hardware.csv"
    if not shared.exists():
        pytest.skip(f"{shared} not present")
    packaged = REPO / "offloadlab" / "catalog" / "hardware.csv"
    assert packaged.read_bytes() == shared.read_bytes()


def test_load_catalog_file_adds_a_model_and_a_gpu(tmp_path, clean_user_catalog):
    f = tmp_path / "mine.yaml"
    f.write_text(
        "models:\n"
        "  test-13b: {layers: 40, hidden: 5120, heads: 40, kv_heads: 40, head_dim: 128,\n"
        "             intermediate: 13824, vocab: 32000}\n"
        "  test-70b-fp8: {base: llama-3.1-70b, weight_bytes: 1}\n"
        "gpus:\n"  # YAML 1.1 floats with a signed exponent, and a plain integer
        "  test-gpu: {memory_bytes: 8.6e+10, hbm_bw: 3.35e+12, peak_flops: 9.89e+14, host_link_bw: 6.4e+10}\n"
        "  test-h100-slow: {base: h100, host_link_bw: 16000000000}\n")
    added = load_catalog_file(f)
    assert added == (["test-13b", "test-70b-fp8"], ["test-gpu", "test-h100-slow"])
    m = get_model("test-13b")
    # Llama-2-13B by hand: 40 x (4 x 5120^2 + 3 x 5120 x 13824 + 2 x 5120) + 2 x 32000 x 5120 + 5120
    assert m.params == 40 * (4 * 5120**2 + 3 * 5120 * 13824 + 2 * 5120) + 2 * 32000 * 5120 + 5120
    assert m.params == pytest.approx(13.0e9, rel=0.02)
    assert "test-13b" in model_names()
    f8 = get_model("test-70b-fp8")
    assert f8.layer_bytes * 2 == get_model("llama-3.1-70b").layer_bytes and f8.name == "test-70b-fp8"
    g = get_gpu("TEST-GPU")
    assert g.memory_bytes == 8.6e10 and g.host_link_bw == 6.4e10
    slow = get_gpu("test-h100-slow")
    assert slow.host_link_bw == 1.6e10 and slow.hbm_bw == get_gpu("h100").hbm_bw


# Regression (found in 65c4593): the documented format did not load, because yaml.safe_load (YAML 1.1)
# reads 8.6e10 as the string '8.6e10' and HardwareSpec rejected it.
def test_load_catalog_file_docstring_example(tmp_path, clean_user_catalog):
    doc = catalog.load_catalog_file.__doc__
    example = " " * 8 + doc[doc.index("models:"):]  # the block as indented in the docstring
    f = tmp_path / "doc.yaml"
    f.write_text("\n".join(line[8:] for line in example.splitlines()))
    models, gpus = load_catalog_file(f)
    assert models == ["my-model", "my-70b-fp8"] and gpus == ["my-gpu"]
    g = get_gpu("my-gpu")
    assert (g.memory_bytes, g.hbm_bw, g.peak_flops, g.host_link_bw) == (8.6e10, 3.35e12, 9.89e14, 6.4e10)
    assert get_model("my-70b-fp8").weight_bytes == 1


def test_load_catalog_file_json(tmp_path, clean_user_catalog):
    f = tmp_path / "mine.json"
    f.write_text(json.dumps({"models": {"test-json": {"base": "llama-3.1-8b", "layers": 4}}}))
    load_catalog_file(f)
    assert get_model("test-json").layers == 4
    assert get_model("test-json").layer_bytes == get_model("llama-3.1-8b").layer_bytes


def test_load_catalog_file_rejects_an_unknown_field(tmp_path, clean_user_catalog):
    f = tmp_path / "bad.yaml"
    f.write_text("models:\n  test-bad: {layers: 4, hiddn: 64, heads: 4, kv_heads: 2, head_dim: 16,\n"
                 "             intermediate: 128, vocab: 100}\n")
    with pytest.raises(ConfigError) as e:
        load_catalog_file(f)
    assert "hiddn" in str(e.value) and str(f) in str(e.value)
    assert "test-bad" not in model_names()


def test_load_catalog_file_other_errors(tmp_path, clean_user_catalog):
    f = tmp_path / "top.yaml"
    f.write_text("modles: {}\n")
    with pytest.raises(ConfigError, match="modles"):
        load_catalog_file(f)
    f.write_text("models:\n  test-missing: {layers: 4}\n")
    with pytest.raises(ConfigError, match="test-missing"):
        load_catalog_file(f)
    f.write_text("models:\n  test-neg: {base: llama-3.1-8b, layers: -3}\n")
    with pytest.raises(ConfigError, match="layers"):
        load_catalog_file(f)
    with pytest.raises(ConfigError, match="path"):
        load_catalog_file(tmp_path / "absent.yaml")
    f.write_text("gpus:\n  test-g: {base: no-such-gpu}\n")
    with pytest.raises(UnknownNameError):
        load_catalog_file(f)


# ---------------------------------------------------------------- policies
def small(layers: int) -> ModelSpec:
    return ModelSpec("small", layers=layers, hidden=128, heads=4, kv_heads=2, head_dim=32, intermediate=256,
                     vocab=1000)


@settings(max_examples=150, deadline=None)
@given(st.integers(1, 40), st.integers(1, 50), st.integers(1, 8))
def test_interval_offloads_every_kth_layer(layers, k, buffers):
    m = small(layers)
    p = interval(k, buffers).place(m)
    expected = [i for i in range(layers) if i % k == k - 1]
    assert list(p.offloaded_layers) == expected
    assert p.mechanism == "prefetch" and p.slots == buffers and p.layers == layers
    assert p.offloaded_bytes == len(expected) * m.layer_bytes
    # every offloaded layer is offloaded whole
    for i in expected:
        assert p.layer_offloaded_bytes(i) == m.layer_bytes
    if expected:
        assert p.staging_bytes == buffers * m.layer_bytes  # vLLM allocates every slot
    else:
        assert k > layers
        assert p.staging_bytes == 0


@pytest.mark.parametrize("k", [33, 34, 1000])
def test_interval_beyond_layers_offloads_nothing(k):
    p = interval(k).place(get_model("llama-3.1-8b"))
    assert p.offloaded_layers == () and p.offloaded_bytes == 0 and p.staging_bytes == 0


def test_interval_2_on_8b():
    m = get_model("llama-3.1-8b")
    p = interval(2).place(m)
    assert p.offloaded_layers == tuple(range(1, 32, 2))
    assert p.offloaded_bytes == 16 * 436_224_000
    assert p.staging_bytes == 2 * 436_224_000
    assert interval(1).place(m).offloaded_bytes == 32 * 436_224_000


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 12), st.data())
def test_prefetch_offloads_the_last_n_of_every_group(layers, data):
    g = data.draw(st.integers(1, layers + 2))
    n = data.draw(st.integers(1, g))
    p = Prefetch(g, n, 3).place(small(layers))
    # group j covers layers j*g .. j*g+g-1; its last n are offloaded
    expected = [i for i in range(layers) if i - (i // g) * g >= g - n]
    assert list(p.offloaded_layers) == expected


@settings(max_examples=150, deadline=None)
@given(st.integers(1, 6), st.floats(0.0, 1.0))
def test_vllm_copy_follows_vllms_rule(layers, frac):
    m = small(layers)
    gb = frac * layers * m.layer_bytes / GiB
    budget = gb * GiB
    p = VllmCopy(gb).place(m)
    assert p.mechanism == "copy" and p.layers == layers
    # the offloaded parameters are a prefix of (layer 0's params, layer 1's params, ...)
    flat = [(i, b) for i in range(layers) for b in m.layer_param_bytes]
    got = [(i, b) for i in range(layers) for b in p.offloaded[i]]
    assert got == flat[:len(got)]
    # vLLM offloads a parameter while the offloaded total is below the budget
    total = sum(b for _, b in got)
    assert total == p.offloaded_bytes
    assert total >= budget
    if got:
        assert total - got[-1][1] < budget  # exceeded by less than the last parameter
    else:
        assert budget == 0
    # the copy path's staging: one layer's fresh copies at a time
    assert p.staging_bytes == max((p.layer_offloaded_bytes(i) for i in range(layers)), default=0)


def test_vllm_copy_small_budgets_on_8b():
    m = get_model("llama-3.1-8b")
    assert VllmCopy(0).place(m).offloaded_bytes == 0
    # one byte of budget offloads the first parameter: layer 0's fused qkv (6144 x 4096 bf16)
    p = VllmCopy(1 / GiB).place(m)
    assert p.offloaded[0] == (6144 * 4096 * 2,) and p.offloaded_layers == (0,)
    # 6.5 GiB: whole layers 0..14 (15 x 436,224,000 = 6.09 GiB) plus parameters of layer 15
    p = VllmCopy(6.5).place(m)
    assert p.offloaded_layers == tuple(range(16))
    assert all(p.layer_offloaded_bytes(i) == m.layer_bytes for i in range(15))
    assert 0 < p.layer_offloaded_bytes(15) < m.layer_bytes


def test_vllm_copy_whole_model_and_beyond():
    m = small(4)
    exact = VllmCopy(4 * m.layer_bytes / GiB).place(m)
    assert exact.offloaded_bytes == 4 * m.layer_bytes
    with pytest.raises(ConfigError) as e:
        VllmCopy(4 * m.layer_bytes / GiB * 1.01).place(m)
    assert e.value.field == "cpu_offload_gb"
    with pytest.raises(ConfigError, match="cpu_offload_gb"):
        VllmCopy(20).place(get_model("llama-3.1-8b"))  # 8B's layers are 13.0 GiB


@pytest.mark.parametrize("value", [-1, -0.5, float("nan"), "4", True])
def test_vllm_copy_rejects_bad_budgets(value):
    with pytest.raises(ConfigError, match="cpu_offload_gb"):
        VllmCopy(value)


@pytest.mark.parametrize("kw, field", [
    (dict(group=0), "k (group size)"),
    (dict(group=-2), "k (group size)"),
    (dict(group=2, slots=0), "staging buffers"),
    (dict(group=2, per_group=0), "per_group"),
    (dict(group=2, per_group=3), "per_group"),
    (dict(group=2.0), "k (group size)"),
    (dict(group=True), "k (group size)"),
])
def test_prefetch_errors_name_the_field(kw, field):
    with pytest.raises(ConfigError) as e:
        Prefetch(**kw)
    assert e.value.field == field
    assert field in str(e.value)


def test_no_offload():
    p = NoOffload().place(small(5))
    assert p.offloaded_layers == () and p.offloaded_bytes == 0 and p.staging_bytes == 0
    assert p.mechanism == "none" and p.layers == 5


@pytest.mark.parametrize("text, policy", [
    ("none", NoOffload()),
    ("vllm:6.5", VllmCopy(6.5)),
    ("vllm:0", VllmCopy(0.0)),
    ("interval:2", Prefetch(2, 1, 2)),
    ("interval:3,4", Prefetch(3, 1, 4)),
    ("prefetch:4,2,3", Prefetch(4, 2, 3)),
    ("  interval:2  ", Prefetch(2, 1, 2)),
])
def test_parse_policy(text, policy):
    assert parse_policy(text) == policy


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 200), st.integers(1, 16), st.integers(1, 16))
def test_parse_policy_round_trips(k, n, s):
    assert parse_policy(f"interval:{k},{s}") == interval(k, s)
    assert parse_policy(f"interval:{k}") == interval(k, 2)
    g = max(k, n)
    assert parse_policy(f"prefetch:{g},{n},{s}") == Prefetch(g, n, s)
    gb = k / 16
    assert parse_policy(f"vllm:{gb!r}") == VllmCopy(gb)


@pytest.mark.parametrize("text, field", [
    ("bogus", "policy"),
    ("interval", "policy"),
    ("interval:x", "policy"),
    ("interval:2.5", "policy"),
    ("interval:1,2,3", "policy"),
    ("none:1", "policy"),
    ("vllm:lots", "policy"),
    ("vllm:1,2", "policy"),
    ("prefetch:4,1", "policy"),
    ("interval:0", "k (group size)"),
    ("interval:2,0", "staging buffers"),
    ("prefetch:2,3,1", "per_group"),
    ("vllm:-1", "cpu_offload_gb"),
])
def test_parse_policy_errors_name_the_field(text, field):
    with pytest.raises(ConfigError) as e:
        parse_policy(text)
    assert e.value.field == field
    assert field in str(e.value)
    if field == "policy":  # the message shows the accepted syntax
        assert "interval:K" in str(e.value)


def test_labels():
    assert interval(2, 4).label == "interval k=2 buf=4"
    assert Prefetch(4, 2, 3).label == "prefetch g=4 n=2 s=3"
    assert VllmCopy(6.5).label == "vllm 6.5GiB"
    assert NoOffload().label == "none"


def test_staging_is_exactly_the_prefetch_step_like_vllm():
    # vllm/model_executor/offloader/prefetch.py: StaticBufferPool(slot_capacity=prefetch_step) holds
    # prefetch_step copies of each offloaded parameter, with no min() against the offloaded count
    m = get_model("llama-3.1-8b").replace(layers=4)
    pl = interval(4, 3).place(m)  # one offloaded layer, three slots: three layer-sized buffers
    assert len(pl.offloaded_layers) == 1 and pl.staging_bytes == 3 * m.layer_bytes


def test_catalog_file_is_all_or_nothing(tmp_path, clean_user_catalog):
    f = tmp_path / "half.yaml"
    f.write_text("models:\n  fine-model: {base: llama-3.1-8b, layers: 4}\n"
                 "gpus:\n  broken-gpu: {memory_bytes: -1, hbm_bw: 1, peak_flops: 1, host_link_bw: 1}\n")
    with pytest.raises(ConfigError, match="memory_bytes"):
        load_catalog_file(f)
    assert "fine-model" not in model_names()


@pytest.mark.parametrize("k", [2, 3, 4, 5, 8, 16])
def test_paper_compares_equal_offloaded_layers(k):
    from offloadlab.apps.paper import paper_policies

    none, vllm, ours = paper_policies(k=k)
    m = get_model("llama-3.1-8b")
    assert len(vllm.place(m).offloaded_layers) == len(ours.place(m).offloaded_layers)
    assert vllm.place(m).offloaded_bytes == pytest.approx(ours.place(m).offloaded_bytes, abs=2 * 4096 * 2)


@pytest.mark.parametrize("name", ["llama-3.1-70b", "llama-3.1-405b"])
def test_fp8_catalog_models_halve_the_weight_bytes_only(name):
    bf16, fp8 = get_model(name), get_model(name + "-fp8")
    assert fp8.params == bf16.params and fp8.layers == bf16.layers
    assert fp8.layer_bytes * 2 == bf16.layer_bytes and fp8.weight_total_bytes * 2 == bf16.weight_total_bytes
    assert fp8.kv_bytes_per_token == bf16.kv_bytes_per_token  # the KV cache dtype is a separate choice


def test_a_user_node_in_yaml_drives_layout_and_host_limits(tmp_path, clean_user_catalog):
    """A node a user describes (GPUs per node, per host link, host memory, network) is what the
    parallel layout and the pinned-memory check use."""
    from offloadlab.sim import EngineConfig, layout, serving_memory
    from offloadlab.errors import DoesNotFitError

    f = tmp_path / "nodes.yaml"
    f.write_text("gpus:\n  h100-quad: {base: H100-SXM5-80GB, gpus_per_node: 4, gpus_per_host_link: 4,\n"
                 "              host_memory_bytes: 1.0e11, network_bw: 2.5e10}\n")
    load_catalog_file(f)
    lay = layout("llama-3.1-70b", "h100-quad", 4, 2)
    assert (lay.nodes, lay.link_share) == (2, 4)  # four GPUs copy through one host link
    assert lay.send_time(0, 1000) == pytest.approx(5e-6 + 1000 * 8192 * 2 / 2.5e10)  # between nodes
    with pytest.raises(DoesNotFitError, match="pinned host memory"):  # 100 GB of host per node
        serving_memory("llama-3.1-70b", "h100-quad", interval(1), EngineConfig(tensor_parallel=4))
