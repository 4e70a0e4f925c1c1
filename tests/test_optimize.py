"""The policy optimizer: best is feasible and unbeaten, constraints hold, flags deploy it, no-fit is an error."""
import pandas as pd
import pytest

from offloadlab import DoesNotFitError, NoOffload, Prefetch, VllmCopy, VllmUva, interval
from offloadlab.apps.cli import main
from offloadlab.apps.optimize import NoFeasiblePolicyError, candidate_policies, optimize
from offloadlab.sim import EngineConfig, longbench_multi_news, serving_memory
from offloadlab.vllm_flags import policy_from_vllm

ENGINE = EngineConfig(gpu_memory_utilization=0.8)
SMALL = [NoOffload(), interval(2), interval(4), Prefetch(4, 1, 2, wrap=True), Prefetch(8, 1, 1, wrap=True),
         Prefetch(4, 2, 2, wrap=True), VllmUva(2.0), VllmCopy(2.0), VllmUva(6.5), VllmCopy(6.5)]


@pytest.fixture(scope="module")
def wl():
    return longbench_multi_news(30, seed=0)


def _equivalent(a, b) -> bool:
    if isinstance(a, Prefetch):  # vLLM's prefetch backend always prefetches across steps (wrap=True)
        return isinstance(b, Prefetch) and (a.group, a.per_group, a.slots, a.params) == \
            (b.group, b.per_group, b.slots, b.params)
    return a == b


def test_best_is_feasible_and_unbeaten(wl):
    r = optimize("llama-3.1-8b", "a100-40gb", wl, ENGINE, candidates=SMALL, tolerance=0.0)
    assert len(r.table) == len(SMALL) and r.table["feasible"].all()
    assert r.best["feasible"] and r.best["throughput_rps"] == r.table["throughput_rps"].max()
    assert r.policy == SMALL[int(r.best["candidate"])] and r.best["policy"] == r.policy.label
    assert r.best["bound"] in r.explanation and "interval k=2" in r.explanation and "KV cache" in r.explanation
    # with the default tolerance a near-tie may go to more KV cache, but never to a clearly worse candidate
    r2 = optimize("llama-3.1-8b", "a100-40gb", wl, ENGINE, candidates=SMALL)
    assert r2.best["throughput_rps"] >= (1 - 0.005) * r2.table["throughput_rps"].max()


def test_latency_objective_is_minimized(wl):
    r = optimize("llama-3.1-8b", "a100-40gb", wl, ENGINE, candidates=SMALL, objective="tpot_p99_s", tolerance=0.0)
    assert r.best["tpot_p99_s"] == r.feasible["tpot_p99_s"].min()


def test_min_kv_tokens_forces_offload(wl):
    none_kv = serving_memory("llama-3.1-8b", "a100-40gb", NoOffload(), ENGINE).kv_tokens
    r = optimize("llama-3.1-8b", "a100-40gb", wl, ENGINE, candidates=SMALL, min_kv_tokens=none_kv + 1)
    assert r.best["policy_kind"] != "none" and r.best["mem_kv_tokens"] > none_kv
    assert (r.feasible["mem_kv_tokens"] > none_kv).all()
    none = r.table[r.table["policy_kind"] == "none"].iloc[0]
    assert not none["feasible"] and "min_kv_tokens" in none["reason"]
    assert pd.isna(none["throughput_rps"])  # known from the memory plan: not simulated


def test_latency_limit_is_honoured(wl):
    base = optimize("llama-3.1-8b", "a100-40gb", wl, ENGINE, candidates=SMALL)
    limit = float(base.table["tpot_p99_s"].median())
    r = optimize("llama-3.1-8b", "a100-40gb", wl, ENGINE, candidates=SMALL, max_tpot_p99_s=limit)
    assert (r.feasible["tpot_p99_s"] <= limit).all() and (~r.table["feasible"]).any()
    assert r.table.loc[~r.table["feasible"], "reason"].str.startswith("TPOT p99").all()
    with pytest.raises(NoFeasiblePolicyError):
        optimize("llama-3.1-8b", "a100-40gb", wl, ENGINE, candidates=SMALL, max_tpot_p99_s=1e-6)


@pytest.mark.parametrize("policy", [interval(4), Prefetch(4, 2, 2, wrap=True), VllmUva(2.0), VllmCopy(2.0),
                                    NoOffload()])
def test_best_flags_round_trip(wl, policy):
    r = optimize("llama-3.1-8b", "a100-40gb", wl, ENGINE, candidates=[policy])
    assert _equivalent(r.policy, policy_from_vllm(r.vllm_flags))


def test_default_search_flags_round_trip_and_size(wl):
    r = optimize("llama-3.1-8b", "a100-40gb", longbench_multi_news(10), ENGINE, mechanisms=("prefetch", "vllm"))
    assert _equivalent(r.policy, policy_from_vllm(r.vllm_flags))
    for model, gpu in (("llama-3.1-8b", "a100-40gb"), ("llama-3.1-70b", "h100"), ("llama-3.1-405b", "h200")):
        n = len(candidate_policies(model, gpu, ENGINE))
        assert 60 <= n <= 150, (model, gpu, n)


def test_does_not_fit_raises():
    with pytest.raises(DoesNotFitError, match=r"405b does not fit on A100-SXM4-40GB .* with any of \d+ candidate policies"):
        optimize("llama-3.1-405b", "a100-40gb", longbench_multi_news(5))


def test_bad_input():
    wl = longbench_multi_news(5)
    for kw in ({"objective": "speed"}, {"min_kv_tokens": -1}, {"max_ttft_p99_s": 0}, {"mechanisms": ("foo",)}):
        with pytest.raises(Exception) as e:
            optimize("llama-3.1-8b", "a100-40gb", wl, **kw)
        assert type(e.value).__name__ == "ConfigError"


def test_cli_optimize_prints_flags(tmp_path, capsys):
    args = ["optimize", "--requests", "15", "--gpu-memory-utilization", "0.8", "--mechanisms", "prefetch,vllm",
            "--min-kv-tokens", "150000", "--quiet", "--csv", str(tmp_path / "o.csv")]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "top 10 feasible" in out and "choice:" in out and "vllm serve MODEL" in out.split("deploy with: ")[1]
    flags = out.split("deploy with: ")[1].splitlines()[0]
    assert policy_from_vllm(flags).kind in ("prefetch", "vllm")
    df = pd.read_csv(tmp_path / "o.csv")
    assert {"feasible", "reason", "vllm_flags"} <= set(df.columns) and df["feasible"].iloc[0]


@pytest.mark.parametrize("args", [["--min-kv-tokens", "-5"], ["--model", "nope"], ["--objective", "speed"],
                                  ["--mechanisms", "foo"], ["--max-tpot-p99", "0"]])
def test_cli_optimize_bad_input(capsys, args):
    assert main(["optimize", "--requests", "5", "--quiet", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("offloadlab: error:") and "\n" not in err


@pytest.mark.parametrize("row,words", [
    (dict(bound="copy-bound", policy_kind="prefetch", util_link=0.97, util_compute=0.12, util_host=0.01,
          offloaded_bytes=1), ["copy-bound", "busy 97%", "GPU computing 12%"]),
    (dict(bound="copy-bound", policy_kind="vllm", util_link=0.9, util_compute=1.0, util_host=0.01,
          offloaded_bytes=1), ["copy-bound", "compute stream busy 100%", "copies on it"]),
    (dict(bound="copy-bound", policy_kind="uva", util_link=0.99, util_compute=0.99, util_host=0.01,
          offloaded_bytes=1), ["kernels reading the weights over it"]),
    (dict(bound="launch-bound", policy_kind="none", util_link=0.0, util_compute=0.3, util_host=0.8,
          offloaded_bytes=0), ["launch-bound", "busy 80%", "30% for the GPU"]),
    (dict(bound="compute-bound", policy_kind="none", util_link=0.0, util_compute=0.95, util_host=0.1,
          offloaded_bytes=0), ["nothing is copied"]),
    (dict(bound="compute-bound", policy_kind="prefetch", util_link=0.4, util_compute=0.95, util_host=0.1,
          offloaded_bytes=1), ["copies hide behind compute", "busy only 40%"]),
])
def test_bound_reason_names_the_limit_and_its_numbers(row, words):
    from offloadlab.apps.optimize import bound_reason

    text = bound_reason(row)
    for w in words:
        assert w in text, (w, text)
