"""The "before buying" study: deployments, what fits, and the best policy per deployment."""
import pytest

from offloadlab import ConfigError, DoesNotFitError, NoOffload, get_gpu, get_model, interval
from offloadlab.sim import EngineConfig, serving_memory, simulate
from offloadlab.sim.workload import fixed
from offloadlab.apps.study import can_serve, deployment, serve


def test_deployment_tensor_parallel_in_a_node_pipeline_across_nodes():
    assert deployment("h100", 4) == (4, 1)
    assert deployment("h100", 16) == (8, 2)
    assert deployment("a100-40gb", 16) == (4, 4)  # Polaris: 4 GPUs a node
    assert deployment("gh200", 4) == (1, 4)  # one superchip a node
    with pytest.raises(ConfigError, match="gpus=12: expected at most 8 or a multiple of the 8"):
        deployment("h100", 12)
    with pytest.raises(ConfigError, match="gpus"):
        deployment("h100", 0)


def test_can_serve_agrees_with_the_memory_plan():
    models = {"70B": "llama-3.1-70b", "405B": "llama-3.1-405b"}
    fit = can_serve(models, ["h100"], [1, 2, 8], ks=(1, 2, 4)).set_index(["model", "gpus"])
    # 70B bf16 (131 GiB) on one H100: only with offload; on two, without
    assert fit.loc[("70B", 1), "fits"] == "only with offload"
    assert fit.loc[("70B", 2), "fits"] == "without offload"
    for (label, n), r in fit.iterrows():
        tp, pp = deployment("h100", n)
        eng = EngineConfig(tensor_parallel=tp, pipeline_parallel=pp)
        for p in r["policies"]:
            serving_memory(models[label], "h100", p, eng)  # every listed policy fits
        for k in {1, 2, 4} - {p.group for p in r["policies"] if p.kind == "prefetch"}:
            with pytest.raises(DoesNotFitError):
                serving_memory(models[label], "h100", interval(k), eng)  # and every other k does not
    # 405B bf16 on one or two H100s: not even with every layer offloaded; the reason says why
    assert fit.loc[("405B", 1), "fits"] == "no" and "not even with interval k=1" in fit.loc[("405B", 1), "reason"]
    assert fit.loc[("405B", 8), "fits"] == "only with offload"


def test_can_serve_reports_deployments_that_cannot_exist():
    fit = can_serve({"8B": "llama-3.1-8b"}, ["h100"], [3])  # 3 does not divide 32 heads
    assert fit.loc[0, "fits"] == "no" and "tensor_parallel" in fit.loc[0, "reason"]


def test_serve_keeps_the_best_with_and_without_offload():
    models = {"8B": get_model("llama-3.1-8b")}
    small = get_gpu("a100-40gb").replace(name="A100-24GB", memory_bytes=24 * 1024**3)
    fit = can_serve(models, [small], [1, 2], ks=(2, 4))
    wl = fixed(24, 1024, 32)
    out = serve(fit, wl, executor="serial")
    assert set(map(tuple, out[["gpus", "offload"]].to_numpy())) == {(1, False), (1, True), (2, False), (2, True)}
    for _, r in out.iterrows():
        tp, pp = deployment(small, int(r["gpus"]))
        eng = EngineConfig(tensor_parallel=tp, pipeline_parallel=pp)
        cands = [NoOffload()] if not r["offload"] else [interval(2), interval(4)]
        best = max(simulate(models["8B"], small, p, wl, eng).summary["output_tok_s"] for p in cands)
        assert r["output_tok_s"] == pytest.approx(best)
        assert r["tok_s_per_gpu"] == pytest.approx(best / r["gpus"])
        assert r["gpu_h_per_Mtok"] == pytest.approx(1e6 / (best / r["gpus"]) / 3600)
        assert r["candidates"] == len(cands)
