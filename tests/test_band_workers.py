"""The band's corner runs on worker processes (offloadlab.apps.pool, sim.start_band): the same numbers as
run here, and a project error raised in a worker comes back as itself."""
from __future__ import annotations

import pytest

from offloadlab.apps.pool import owned
from offloadlab.errors import ConfigError
from offloadlab.policy import interval
from offloadlab.sim import EngineConfig, make_workload, simulate_band, start_band, start_corners
from offloadlab.validation.serving_run import replay_serving_run

WL = make_workload("sharegpt_8k", n=60, seed=3, rate=4.0).clipped(8192)[0]
RUN = "validation/traces/serving/rtx4090_llama-3.1-8b"


@pytest.fixture(scope="module")
def pool():
    with owned(2) as p:
        yield p


def test_corners_on_workers_equal_corners_here(pool):
    for eng in (EngineConfig(), EngineConfig(scheduler="v1", chunked_prefill=True, max_num_batched_tokens=2048)):
        here = simulate_band("llama-3.1-8b", "a100-40gb", interval(2), WL, eng)
        there = start_band("llama-3.1-8b", "a100-40gb", interval(2), WL, eng, executor=pool)()
        assert here == there and set(here) == {"throughput_rps", "output_tok_s", "ttft_mean_s", "ttft_p99_s",
                                               "tpot_mean_s", "tpot_p99_s", "makespan_s"}
        assert all(lo <= hi for lo, hi in here.values())


def test_a_replay_with_its_corners_on_workers_equals_one_here(pool):
    here = replay_serving_run(RUN, trace_steps=False).summary
    there = replay_serving_run(RUN, trace_steps=False, executor=pool).summary
    assert here == there and "band_lo_ttft_mean_s" in here


def _raise_config_error(result):
    raise ConfigError("corner field", 7, "something else", source="a worker")


def test_a_project_error_in_a_worker_comes_back_as_itself(pool):
    pending = start_corners(_raise_config_error, "llama-3.1-8b", "a100-40gb", None, WL, executor=pool)
    with pytest.raises(ConfigError) as e:
        pending()
    assert str(e.value) == "a worker: corner field=7: expected something else"
    assert (e.value.field, e.value.value, e.value.source) == ("corner field", 7, "a worker")
    # the simulator's own errors too: a request longer than max_model_len
    long = make_workload("fixed", n=1, prompt_len=9000, output_len=100)
    with pytest.raises(ConfigError, match="at most max_model_len=8192"):
        start_band("llama-3.1-8b", "a100-40gb", None, long, executor=pool)()
