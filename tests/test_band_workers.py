"""The band's corner runs on worker processes (offloadlab.apps.pool, sim.start_band): the same numbers as
run here, and a project error raised in a worker comes back as itself."""
from __future__ import annotations

import pytest

from offloadlab.apps.pool import owned
from offloadlab.errors import ConfigError
from offloadlab.policy import interval
from offloadlab.sim import EngineConfig, make_workload, simulate_band, start_band
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


def test_a_project_error_in_a_worker_comes_back_as_itself(pool):
    long = make_workload("fixed", n=1, prompt_len=9000, output_len=100)  # longer than max_model_len (8192)
    with pytest.raises(ConfigError) as here:
        simulate_band("llama-3.1-8b", "a100-40gb", None, long)
    with pytest.raises(ConfigError) as there:
        start_band("llama-3.1-8b", "a100-40gb", None, long, executor=pool)()
    assert str(there.value) == str(here.value) and "at most max_model_len=8192" in str(here.value)
    assert vars(there.value) == vars(here.value)  # field, value, expected, source
