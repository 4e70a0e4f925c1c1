"""offloadlab.apps.sweep: grids, keys, cache, errors in rows, and the same frame from every executor."""
from __future__ import annotations

import json

import pandas as pd
import pytest

import offloadlab.apps.sweep as sw
from offloadlab import ConfigError, UnknownNameError, interval
from offloadlab.policy import NoOffload, VllmCopy
from offloadlab.sim import EngineConfig, longbench_multi_news
from offloadlab.apps.sweep import INPUT_COLUMNS, SimConfig, grid, pareto_front, sweep

# small and fast: 12 requests of up to ~2k prompt tokens, 32 output tokens
WL = longbench_multi_news(12, output_len=32)


def small_grid():
    return grid(k=[2, 4], slots=[1, 2], host_link_GBps=[16, 64], gpu_memory_utilization=0.8)


@pytest.fixture(scope="module")
def serial_frame():
    return sweep(small_grid(), WL, executor="serial", progress=False)


# ---- grid and keys ------------------------------------------------------------------------------
def test_grid_is_the_cartesian_product_last_axis_fastest():
    cs = grid(gpu=["a100", "h100"], k=[2, 3, 4], slots=[1, 2], host_link_GBps=[16, None], mode="prefill-only")
    assert len(cs) == 2 * 3 * 2 * 2
    assert [c.host_link_bw for c in cs[:2]] == [16e9, None]
    assert cs[0].policy == interval(2, 1) and cs[2].policy == interval(2, 2) and cs[4].policy == interval(3, 1)
    assert {c.hardware.name for c in cs[:12]} == {"A100-SXM4-40GB"}
    assert all(c.engine.mode == "prefill-only" for c in cs)
    assert len({c.key(WL) for c in cs}) == len(cs)
    assert [c.key(WL) for c in cs] == [c.key(WL) for c in grid(gpu=["a100", "h100"], k=[2, 3, 4], slots=[1, 2],
                                                              host_link_GBps=[16, None], mode="prefill-only")]
    assert grid(k=[]) == []


def test_key_covers_every_input_and_the_workload():
    base = SimConfig("llama-3.1-8b", "A100-SXM4-40GB", interval(2), EngineConfig(gpu_memory_utilization=0.8))
    k = base.key(WL)
    assert len(k) == 64 and k == base.key(WL)
    # the same thing spelled differently is the same key
    assert SimConfig.build(gpu="a100", policy="interval:2,2", gpu_memory_utilization=0.8).key(WL) == k
    assert base.replace(host_link_GBps=32).key(WL) == k  # the A100's catalog link is 32 GB/s
    assert base.replace(engine={"gpu_memory_utilization": 0.8}).key(WL) == k
    others = [base.replace(host_link_GBps=16), base.replace(k=2, slots=3), base.replace(gpu="a100-80gb"),
              base.replace(gpu_memory_utilization=0.9), base.replace(mode="prefill-only"),
              base.replace(max_num_seqs=128), base.replace(chunked_prefill=True), base.replace(model="llama-3.2-1b"),
              base.replace(policy=VllmCopy(6.5)), base.replace(policy=NoOffload())]
    assert len({o.key(WL) for o in others} | {k}) == len(others) + 1
    assert base.key(longbench_multi_news(12, output_len=33)) != k
    assert base.key(longbench_multi_news(12, output_len=32, seed=1)) != k
    assert base.key() != k
    assert "interval k=2 buf=2" in base.label and "A100-SXM4-40GB" in base.label


def test_a_config_looks_up_its_model_and_gpu_once(monkeypatch):
    """The catalog look-ups of a SimConfig (its fields never change) are made once, at construction, not
    again for its key, row, job and label; a replaced config looks up its own."""
    calls = []
    for name in ("get_gpu", "get_model"):
        real = getattr(sw, name)
        monkeypatch.setattr(sw, name, lambda x, real=real, name=name: (calls.append(name), real(x))[1])
    c = SimConfig(model="llama-3.1-8b", gpu="h100", policy="interval:2", engine={"kv_cache_dtype": "fp8"},
                  host_link_bw=32e9)
    assert sorted(calls) == ["get_gpu", "get_model"]
    for _ in range(2):
        c.key(longbench_multi_news(n=4)), c.inputs(), c.job(), c.label  # noqa: B018
    assert len(calls) == 2
    assert c.hardware.name == "H100-SXM5-80GB" and c.hardware.host_link_bw == 32e9
    from offloadlab.catalog import get_model

    assert c.model_spec.kv_bytes_per_token * 2 == get_model("llama-3.1-8b").kv_bytes_per_token  # fp8: not counted
    a100 = c.replace(gpu="A100-SXM4-40GB")
    assert a100.hardware.name == "A100-SXM4-40GB" and a100.hardware.host_link_bw == 32e9 and len(calls) == 4


def test_bad_configs_fail_at_construction_naming_the_field():
    with pytest.raises(ConfigError, match="config field"):
        grid(bandwidth=[1, 2])
    with pytest.raises(ConfigError, match="k"):
        grid(policy=["none"], k=[2])
    with pytest.raises(ConfigError, match="slots"):
        grid(slots=[1, 2])
    with pytest.raises(ConfigError, match="k \\(group size\\)"):
        grid(k=[0])
    with pytest.raises(ConfigError, match="host_link_bw"):
        SimConfig(host_link_bw=-1.0)
    with pytest.raises(ConfigError, match="gpu_memory_utilization"):
        grid(gpu_memory_utilization=[1.5])
    with pytest.raises(UnknownNameError, match="unknown GPU"):
        grid(gpu=["a100", "tpu-v9"])
    with pytest.raises(ConfigError, match="policy"):
        SimConfig(policy="interval")
    with pytest.raises(ConfigError, match="profile"):
        SimConfig(profile="no/such/profile.json")
    with pytest.raises(ConfigError, match="configs\\[0\\]"):
        sweep(["interval:2"], WL, progress=False)
    with pytest.raises(ConfigError, match="executor"):
        sweep([SimConfig()], WL, executor="threads", progress=False)


# ---- the frame -----------------------------------------------------------------------------------
def test_one_row_per_config_in_input_order_with_inputs_and_outputs(serial_frame):
    df = serial_frame
    cs = small_grid()
    assert len(df) == len(cs)
    assert list(df.columns[:len(INPUT_COLUMNS)]) == list(INPUT_COLUMNS) and list(df.columns[-2:]) == ["error", "error_kind"]
    assert list(df["key"]) == [c.key(WL) for c in cs]
    assert list(df["k"]) == [c.policy.group for c in cs] and list(df["slots"]) == [c.policy.slots for c in cs]
    assert list(df["host_link_GBps"]) == [16.0, 64.0] * 4
    assert df["error"].isna().all() and df["error_kind"].isna().all()
    for col in ("throughput_rps", "ttft_p90_s", "tpot_p50_s", "mem_kv_cache", "mem_staging", "offloaded_layers",
                "util_copy", "gpu_memory_utilization", "max_num_seqs", "max_num_batched_tokens"):
        assert col in df.columns and df[col].notna().all(), col
    assert "wall_s" not in df.columns  # wall-clock time would break determinism
    assert (df["gpu"] == "A100-SXM4-40GB").all() and (df["policy_kind"] == "prefetch").all()
    # more host bandwidth is never slower; two buffers cost one more layer of staging memory
    fast, slow = df[df.host_link_GBps == 64], df[df.host_link_GBps == 16]
    assert (fast["throughput_rps"].to_numpy() >= slow["throughput_rps"].to_numpy()).all()
    two, one = df[df.slots == 2], df[df.slots == 1]
    assert (two["mem_staging"].to_numpy() > one["mem_staging"].to_numpy()).all()


def test_sweep_is_deterministic(serial_frame):
    again = sweep(small_grid(), WL, executor="serial", progress=False)
    pd.testing.assert_frame_equal(again, serial_frame)
    assert again.to_csv() == serial_frame.to_csv()


def test_duplicates_simulated_once(monkeypatch):
    calls = _count_simulations(monkeypatch)
    c = SimConfig.build(k=4, gpu_memory_utilization=0.8)
    df = sweep([c, c.replace(gpu="a100"), c], WL, executor="serial", progress=False)
    assert len(df) == 3 and len(calls) == 1
    assert df.drop(columns=[]).iloc[0].equals(df.iloc[2])


def test_a_calibrated_profile_is_an_input(probe_path):
    base = SimConfig.build(gpu="h100", k=2, gpu_memory_utilization=0.8)
    cal = base.replace(profile=probe_path)
    assert isinstance(cal.profile, str) and cal.key(WL) != base.key(WL)
    df = sweep([base, cal], WL, executor="serial", progress=False)
    assert df["profile"].tolist() == [None, str(probe_path)] and df["error"].isna().all()
    assert df.loc[0, "throughput_rps"] != df.loc[1, "throughput_rps"]


# ---- errors --------------------------------------------------------------------------------------
def test_a_config_that_raises_is_reported_in_its_row(tmp_path):
    cs = [SimConfig.build(k=2), SimConfig.build(model="llama-3.1-70b", policy="none"), SimConfig.build(k=4)]
    df = sweep(cs, WL, executor="serial", cache_dir=tmp_path, progress=False)
    assert df["error"].isna().tolist() == [True, False, True]
    assert df.loc[1, "error"].startswith("DoesNotFitError: llama-3.1-70b on A100-SXM4-40GB")
    assert df["error_kind"].tolist() == [None, sw.DOES_NOT_FIT, None]  # typed where caught, not parsed from text
    assert pd.isna(df.loc[1, "throughput_rps"]) and df.loc[1, "model"] == "llama-3.1-70b"
    assert df.loc[0, "throughput_rps"] > 0
    # a project error is deterministic, so it is cached too, with its kind
    assert len(list(tmp_path.glob("*.json"))) == 3
    again = sweep(cs, WL, executor="serial", cache_dir=tmp_path, progress=False)
    pd.testing.assert_frame_equal(again, df)


def test_a_bad_value_met_inside_the_simulator_is_a_bad_config_row():
    from offloadlab.sim import EngineConfig

    cs = [SimConfig.build(k=2, engine=EngineConfig(max_model_len=64))]  # every request is longer than 64 tokens
    df = sweep(cs, WL, executor="serial", progress=False)
    assert df.loc[0, "error"].startswith("ConfigError") and df.loc[0, "error_kind"] == sw.BAD_CONFIG


def test_an_unexpected_exception_is_reported_and_not_cached(tmp_path, monkeypatch):
    real = sw.simulate

    def flaky(model, gpu, policy, *a, **kw):
        if getattr(policy, "group", None) == 4:
            raise RuntimeError("boom")
        return real(model, gpu, policy, *a, **kw)

    monkeypatch.setattr(sw, "simulate", flaky)
    cs = [SimConfig.build(k=2), SimConfig.build(k=4)]
    df = sweep(cs, WL, executor="serial", cache_dir=tmp_path, progress=False)
    assert df["error"].tolist() == [None, "RuntimeError: boom"] and df["error_kind"].tolist() == [None, sw.FAILED]
    assert [p.stem for p in tmp_path.glob("*.json")] == [cs[0].key(WL)]


# ---- cache ---------------------------------------------------------------------------------------
def _count_simulations(monkeypatch) -> list:
    calls, real = [], sw.simulate

    def counted(*a, **kw):
        calls.append(a[2])
        return real(*a, **kw)

    monkeypatch.setattr(sw, "simulate", counted)
    return calls


def test_cache_hit_on_rerun_and_resume_after_interruption(tmp_path, monkeypatch, serial_frame):
    cs = small_grid()
    calls = _count_simulations(monkeypatch)
    first = sweep(cs, WL, executor="serial", cache_dir=tmp_path, progress=False)
    assert len(calls) == len(cs) and len(list(tmp_path.glob("*.json"))) == len(cs)
    pd.testing.assert_frame_equal(first, serial_frame)
    entry = json.loads((tmp_path / f"{cs[0].key(WL)}.json").read_text())
    assert entry["code"] == sw.CODE_FINGERPRINT and entry["error"] is None and "throughput_rps" in entry["outputs"]

    calls.clear()
    second = sweep(cs, WL, executor="serial", cache_dir=tmp_path, progress=False)
    assert calls == []  # nothing simulated
    pd.testing.assert_frame_equal(second, serial_frame)

    # an interrupted sweep: two results missing, one written by another version of the simulator
    (tmp_path / f"{cs[1].key(WL)}.json").unlink()
    (tmp_path / f"{cs[5].key(WL)}.json").unlink()
    stale = tmp_path / f"{cs[3].key(WL)}.json"
    stale.write_text(json.dumps({**json.loads(stale.read_text()), "code": "older"}))
    (tmp_path / f"{cs[6].key(WL)}.json").write_text("{half a fi")  # torn by a crash (atomic writes prevent it)
    third = sweep(cs, WL, executor="serial", cache_dir=tmp_path, progress=False)
    assert calls == [cs[i].policy for i in (1, 3, 5, 6)]
    pd.testing.assert_frame_equal(third, serial_frame)


# ---- executors -----------------------------------------------------------------------------------
def test_process_pool_equals_serial(serial_frame):
    df = sweep(small_grid(), WL, executor=2, progress=False, chunksize=3)
    pd.testing.assert_frame_equal(df, serial_frame)


def test_process_pool_from_a_multithreaded_parent_equals_serial(serial_frame):
    """Like a Jupyter kernel: the pool's workers come from a fork server, not a fork of this process."""
    import threading

    stop = threading.Event()
    t = threading.Thread(target=stop.wait)
    t.start()
    try:
        df = sweep(small_grid(), WL, executor=2, progress=False)
    finally:
        stop.set()
        t.join()
    pd.testing.assert_frame_equal(df, serial_frame)


def test_a_task_lost_by_the_executor_is_reported_warned_and_not_cached(tmp_path):
    from concurrent.futures import BrokenExecutor, Executor, Future

    class Broken(Executor):
        def submit(self, fn, *args, **kwargs):
            f = Future()
            f.set_exception(BrokenExecutor("worker died"))
            return f

    cs = small_grid()[:3]
    with pytest.warns(RuntimeWarning, match="failed in the executor.*worker died"):
        df = sweep(cs, WL, executor=Broken(), cache_dir=tmp_path, progress=False)
    assert df["error"].tolist() == ["BrokenExecutor: worker died"] * 3 and set(df["error_kind"]) == {sw.EXECUTOR}
    assert not list(tmp_path.glob("*.json"))


def test_any_executor_and_errors_through_it(serial_frame):
    from concurrent.futures import ThreadPoolExecutor

    cs = [*small_grid(), SimConfig.build(model="llama-3.1-70b", policy="none")]
    with ThreadPoolExecutor(2) as ex:
        df = sweep(cs, WL, executor=ex, progress=False)
    pd.testing.assert_frame_equal(df.iloc[:-1], serial_frame, check_dtype=False)  # NaN row: ints became floats
    assert df.iloc[-1]["error"].startswith("DoesNotFitError")


def test_dask_local_cluster_equals_serial(serial_frame):
    distributed = pytest.importorskip("distributed")
    with distributed.LocalCluster(n_workers=1, threads_per_worker=2, processes=False, dashboard_address=None,
                                  timeout="20s") as cluster, distributed.Client(cluster, timeout="20s") as client:
        df = sweep(small_grid(), WL, executor=client.get_executor(), progress=False)
    pd.testing.assert_frame_equal(df, serial_frame)


# ---- analysis ------------------------------------------------------------------------------------
def test_pareto_front():
    df = pd.DataFrame({"x": [1, 2, 3, 2, 1, 3], "y": [5, 4, 1, 2, 5, 0], "name": list("abcdef")})
    front = pareto_front(df, "x", "y")
    assert list(front["name"]) == ["a", "e", "b", "c"]  # d is beaten by b, f by c; a and e tie
    assert list(pareto_front(df, "x", "y", maximize=(False, True))["name"]) == ["a", "e"]


def test_the_cache_fingerprint_covers_every_module_a_simulated_row_imports():
    # read from the sources, not a hand-written list: offloadlab.metrics (how runs are summarised) was
    # once missing, so editing it served stale cached rows
    mods = sw._imported_modules("offloadlab.apps.sweep")
    import offloadlab.sim.run as run_mod

    for needed in ("offloadlab.metrics", "offloadlab.sim.metrics", "offloadlab.sim.step", "offloadlab.sim.serving",
                   "offloadlab.schedule", "offloadlab.policy", "offloadlab.specs", run_mod.__name__):
        assert needed in mods, needed
    assert not any(m.startswith(("offloadlab.runtime", "offloadlab.apps.cli")) for m in mods), "only what a row runs"


def test_the_cache_fingerprint_changes_with_any_imported_source(monkeypatch):
    from pathlib import Path

    import offloadlab.metrics

    real = Path.read_bytes
    target = Path(offloadlab.metrics.__file__)
    monkeypatch.setattr(Path, "read_bytes", lambda p: real(p) + (b"# edited" if p == target else b""))
    assert sw._code_fingerprint() != sw.CODE_FINGERPRINT
    monkeypatch.undo()
    assert sw._code_fingerprint() == sw.CODE_FINGERPRINT
