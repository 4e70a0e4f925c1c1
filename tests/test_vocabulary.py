"""One home per concept in the vocabulary: the KV-cache dtype in EngineConfig, the input checks,
probe rows -> Placements, the prefetch rule and budget rounding."""
from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from offloadlab.catalog import get_model
from offloadlab.checks import check_bool, check_int, check_positive, check_range
from offloadlab.errors import ConfigError
from offloadlab.policy import NoOffload, Prefetch, budget_for, floor_budget
from offloadlab.profile import PROBE_POLICIES, probe_placement
from offloadlab.sim import EngineConfig, longbench_multi_news, serving_memory, simulate
from offloadlab.specs import GiB
from offloadlab.vllm_flags import engine_from_vllm


# ---- KV-cache dtype: an engine setting the library honours -------------------------------------
def test_an_fp8_kv_cache_in_engine_config_doubles_the_kv_tokens_of_the_same_bytes():
    auto = serving_memory("llama-3.1-8b", "a100-40gb", NoOffload(), EngineConfig(gpu_memory_utilization=0.8))
    fp8 = serving_memory("llama-3.1-8b", "a100-40gb", NoOffload(),
                         EngineConfig(gpu_memory_utilization=0.8, kv_cache_dtype="fp8"))
    assert fp8.kv_cache == auto.kv_cache  # the same bytes ...
    assert fp8.kv_tokens // 16 in (2 * (auto.kv_tokens // 16), 2 * (auto.kv_tokens // 16) + 1)  # ... hold twice the tokens


def test_a_vllm_command_lines_kv_cache_dtype_reaches_the_simulation():
    """engine_from_vllm gives EngineConfig fields only: its kv_cache_dtype was once a key the library ignored."""
    kw = engine_from_vllm("--kv-cache-dtype fp8 --gpu-memory-utilization 0.8")
    wl = longbench_multi_news(8, seed=1)
    via_flags = simulate("llama-3.1-8b", "a100-40gb", NoOffload(), wl, EngineConfig(**kw), trace_steps=False)
    via_model = simulate(get_model("llama-3.1-8b").with_kv_cache_dtype("fp8"), "a100-40gb", NoOffload(), wl,
                         EngineConfig(gpu_memory_utilization=0.8), trace_steps=False)
    assert via_flags.memory.kv_tokens == via_model.memory.kv_tokens
    assert via_flags.summary["makespan_s"] == via_model.summary["makespan_s"]
    assert via_flags.config["model"] == "llama-3.1-8b+kv-fp8"


def test_the_kv_cache_dtype_is_applied_once_and_checked():
    m = get_model("llama-3.1-8b")
    once = m.with_kv_cache_dtype("fp8_e4m3")
    assert once.kv_bytes == 1 and once.with_kv_cache_dtype("fp8") == once and m.with_kv_cache_dtype("auto") is m
    with pytest.raises(ConfigError, match="kv_cache_dtype='int4'"):
        EngineConfig(kv_cache_dtype="int4")


# ---- checks ------------------------------------------------------------------------------------
@given(st.integers(-5, 5), st.integers(-3, 3))
def test_check_int_accepts_exactly_the_integers_at_or_above_the_minimum(v, low):
    if v >= low:
        assert check_int("f", v, low) == v and check_int("f", np.int64(v), low) == v
    else:
        with pytest.raises(ConfigError, match=f"f={v}: expected an integer >= {low}"):
            check_int("f", v, low)


@pytest.mark.parametrize("bad", [True, 1.0, "1", None, math.nan])
def test_check_int_refuses_what_only_looks_like_an_integer(bad):
    with pytest.raises(ConfigError, match="^layers="):
        check_int("layers", bad, 1)


@pytest.mark.parametrize("v,ok", [(1e-9, True), (3, True), (0, False), (-1.0, False), (math.inf, False),
                                  (math.nan, False), (True, False), ("2", False)])
def test_check_positive(v, ok):
    if ok:
        assert check_positive("bw", v) == v
    else:
        with pytest.raises(ConfigError, match="expected a positive finite number"):
            check_positive("bw", v)


def test_check_range_ends_and_check_bool():
    assert check_range("u", 1, 0, 1, "(0, 1]", low_open=True) == 1
    for v in (0, 1.5, math.nan):
        with pytest.raises(ConfigError, match=r"u=.*: expected \(0, 1\]"):
            check_range("u", v, 0, 1, "(0, 1]", low_open=True)
    with pytest.raises(ConfigError, match="expected True or False"):
        check_bool("wrap", 1)


# ---- probe rows, prefetch rule, budgets --------------------------------------------------------
def test_probe_rows_name_the_placement_they_measured():
    m = get_model("llama-3.1-8b").replace(layers=8)
    assert probe_placement(m, "resident", 0, 0).offloaded_bytes == 0
    sync = probe_placement(m, "sync_prefix", 3, 0)
    assert sync.mechanism == "copy" and sync.offloaded_layers == (0, 1, 2)
    k = probe_placement(m, "async_k", 4, 1)
    assert k.mechanism == "prefetch" and k.offloaded_layers == (3, 7) and k.slots == 1
    with pytest.raises(ConfigError, match="one of"):
        probe_placement(m, "async", 2, 2)
    assert set(PROBE_POLICIES) == {"resident", "sync_prefix", "async_k"}


@given(st.integers(1, 40), st.integers(1, 12), st.integers(1, 12))
def test_prefetch_offloaded_count_is_what_it_places(layers, g, n):
    n = min(n, g)
    p = Prefetch(g, n)
    assert p.offloaded_count(layers) == len(p.place(get_model("llama-3.1-8b").replace(layers=layers)).offloaded_layers)


@given(st.floats(0, 1000, allow_nan=False))
def test_budgets_round_down_to_hundredths_of_a_gib(gib):
    b = floor_budget(gib)
    assert b <= gib + 1e-12 and gib - b < 0.01 + 1e-9 and abs(b * 100 - round(b * 100)) < 1e-6
    assert budget_for(int(gib * GiB)) == floor_budget(int(gib * GiB) / GiB)


@settings(max_examples=60, deadline=None)
@given(st.text(max_size=20), st.one_of(st.none(), st.integers(), st.floats(allow_nan=False), st.text(max_size=10)),
       st.text(max_size=20), st.one_of(st.none(), st.text(min_size=1, max_size=20)))
def test_project_errors_rebuild_from_their_args(field, value, expected, source):
    """pickle (a worker's error) and SimPy (a failed process) rebuild an error as type(e)(*e.args)."""
    import pickle

    from offloadlab.errors import ConfigError, UnknownNameError

    for e in (ConfigError(field, value, expected, source=source), UnknownNameError("model", field, [expected])):
        for again in (type(e)(*e.args), pickle.loads(pickle.dumps(e))):
            assert type(again) is type(e) and str(again) == str(e) and vars(again) == vars(e)
