"""The command line: the main job runs and writes its outputs; bad input is one line and exit 2."""
import json
import subprocess
import sys

import pandas as pd
import pytest

from offloadlab.apps.cli import main


def test_paper_writes_table_csvs_and_plot(tmp_path, capsys):
    assert main(["paper", "--requests", "20", "--out", str(tmp_path), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "interval k=2 buf=2" in out and "vllm" in out
    res = pd.read_csv(tmp_path / "paper_results.csv")
    assert len(res) == 6 and set(res["mode"]) == {"prefill-only", "prefill+decode"}
    assert (tmp_path / "paper.png").read_bytes()[:4] == b"\x89PNG"
    mem = pd.read_csv(tmp_path / "paper_memory.csv")
    assert mem["kv_cache_GiB"].iloc[0] < mem["kv_cache_GiB"].max()  # offload frees room for the KV cache


def test_run_writes_json_trace_and_requests(tmp_path, capsys):
    args = ["run", "--policy", "interval:4,2", "--workload", "multi_news", "--requests", "10",
            "--json", str(tmp_path / "r.json"), "--trace", str(tmp_path / "t.json"),
            "--requests-csv", str(tmp_path / "q.csv")]
    assert main(args) == 0
    row = json.loads((tmp_path / "r.json").read_text())
    assert row["requests"] == 10 and row["offloaded_layers"] == 8
    chrome = json.loads((tmp_path / "t.json").read_text())
    assert any(e["ph"] == "X" for e in chrome["traceEvents"])
    assert len(pd.read_csv(tmp_path / "q.csv")) == 10


def test_step_prints_lanes(capsys):
    assert main(["step", "--gpu", "h100", "--policy", "vllm:4", "--new-tokens", "512"]) == 0
    out = capsys.readouterr().out
    assert "step time" in out and "link" in out


def test_list_names_catalog_entries(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "llama-3.1-405b" in out and "GH200-96GB" in out and "llama-3.1-405b-fp8" in out
    assert "A100-SXM4-40GB" in out and "node: 4 GPUs (1 per host link), 512 GiB host, 12.5 GB/s network" in out


def _kv_tokens(out: str) -> int:
    return int(next(line.split()[1] for line in out.splitlines() if line.startswith("kv_tokens")))


def test_fp8_kv_cache_doubles_the_tokens_that_fit(capsys):
    args = ["memory", "--model", "llama-3.1-70b", "--gpu", "h100", "-tp", "2", "--policy", "none"]
    assert main(args) == 0
    bf16 = _kv_tokens(capsys.readouterr().out)
    assert main(args + ["--kv-cache-dtype", "fp8"]) == 0
    fp8 = _kv_tokens(capsys.readouterr().out)
    assert fp8 // 16 == 2 * (bf16 // 16) or fp8 // 16 == 2 * (bf16 // 16) + 1  # whole blocks of the same bytes


def test_pipeline_parallel_step_traces_every_stage(tmp_path, capsys):
    trace = tmp_path / "pp.json"
    assert main(["step", "--model", "llama-3.1-70b", "--gpu", "h100", "-pp", "2", "--new-tokens", "256",
                 "--trace", str(trace)]) == 0
    chrome = json.loads(trace.read_text())
    assert {e["pid"] for e in chrome["traceEvents"] if e["ph"] == "X"} == {0, 1}  # one process per stage's GPU
    assert any(e.get("name") == "send" or e.get("cat") == "send" for e in chrome["traceEvents"] if e["ph"] == "X")


@pytest.mark.parametrize("args,needle", [
    (["run", "--gpu", "H900"], "unknown GPU 'H900'; known:"),
    (["run", "--model", "llama-9"], "unknown model 'llama-9'; known:"),
    (["run", "--policy", "interval:0"], "k (group size)=0"),
    (["run", "--policy", "interval:2,0"], "staging buffers=0"),
    (["run", "--policy", "vllm:100"], "cpu_offload_gb=100.0"),
    (["run", "--policy", "warp:3"], "policy='warp:3'"),
    (["run", "--model", "llama-3.1-70b", "--policy", "none"], "does not fit"),
    (["run", "--gpu-memory-utilization", "1.5"], "gpu_memory_utilization=1.5"),
    (["run", "--rate", "-1"], "rate"),
    (["memory", "--model", "llama-3.1-405b", "--gpu", "a100", "--policy", "interval:2"], "does not fit"),
    (["run", "-pp", "0"], "pipeline_parallel=0"),
    (["run", "--model", "llama-3.2-1b", "-pp", "17"], "pipeline_parallel=17: expected an integer in 1..16"),
    (["step", "--gpu", "h100", "-tp", "16"], "tensor_parallel=16: expected at most the 8 GPUs"),
])
def test_bad_input_is_one_line_and_exit_2(args, needle, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert needle in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_malformed_workload_and_catalog_files(tmp_path, capsys):
    wl = tmp_path / "w.csv"
    wl.write_text("prompt_len,output_len\n100,10\nabc,5\n")
    assert main(["run", "--workload", str(wl)]) == 2
    err = capsys.readouterr().err
    assert "w.csv" in err and "row 2" in err and "prompt_len" in err
    cat = tmp_path / "c.yaml"
    cat.write_text("models:\n  tiny: {layers: 2, hiden: 64}\n")
    assert main(["list", "--catalog", str(cat)]) == 2
    assert "hiden" in capsys.readouterr().err
    cat.write_text("models: [unclosed\n")
    assert main(["list", "--catalog", str(cat)]) == 2
    assert "c.yaml" in capsys.readouterr().err


def test_console_script_exits_nonzero_without_traceback():
    p = subprocess.run([sys.executable, "-m", "offloadlab.apps.cli", "run", "--gpu", "nope"], capture_output=True, text=True)
    assert p.returncode == 2 and "Traceback" not in p.stderr and "unknown GPU" in p.stderr


def test_compare_tabulates_policies_with_bounds_flags_and_misfits(tmp_path, capsys):
    args = ["compare", "--requests", "10", "--policy", "none", "--policy", "interval:2",
            "--vllm", "--cpu-offload-gb 4", "--policy", "vllm:100", "--csv", str(tmp_path / "c.csv")]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "does not run:" in out and "cpu_offload_gb=100" in out
    df = pd.read_csv(tmp_path / "c.csv")
    assert list(df["policy"]) == ["none", "interval k=2 buf=2", "vllm 100GiB", "uva 4GiB"]  # --policy, then --vllm
    assert set(df["bound"].dropna()) <= {"copy-bound", "launch-bound", "compute-bound"}
    assert df.loc[1, "vllm_flags"].endswith("--offload-group-size 2 --offload-num-in-group 1 --offload-prefetch-step 2")


class _SlowRecordingExecutor:
    """A thread pool whose tasks take longer (0.05 s more, every second one 0.2 s: a band's high corner
    ends after its low one), recording at each submit the tasks submitted before that were still running."""

    def __init__(self):
        from concurrent.futures import ThreadPoolExecutor

        self.pool, self.futures, self.running = ThreadPoolExecutor(2), [], []

    def submit(self, fn, *args, **kw):
        import time

        self.running.append([i for i, f in enumerate(self.futures) if not f.done()])
        pause = 0.2 if len(self.futures) % 2 else 0.05
        self.futures.append(self.pool.submit(lambda: (time.sleep(pause), fn(*args, **kw))[1]))
        return self.futures[-1]


def test_compare_collects_a_failed_policys_corners_before_the_next_policy(monkeypatch, capsys):
    """A policy that fails (vllm:100 offloads more than the model has) had its band's corners started on
    the workers: both are waited for (sim.start_corners), not left running beside the next policy's."""
    import contextlib

    import offloadlab.apps.cli as cli

    ex = _SlowRecordingExecutor()
    monkeypatch.setattr(cli, "_band_pool", lambda a: contextlib.nullcontext(ex))
    args = ["compare", "--requests", "10", "--policy", "vllm:100", "--policy", "none", "--policy", "vllm:200"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "cpu_offload_gb=100" in out and "cpu_offload_gb=200" in out and "compute-bound" in out
    assert len(ex.futures) == 6 and all(f.done() for f in ex.futures)  # two corners a policy
    assert ex.running[0::2] == [[]] * 3  # none still running when the next policy's were submitted
    ex.pool.shutdown()


def test_a_command_loads_each_profile_file_once(tmp_path, monkeypatch, capsys):
    """--profile's files are read once, before any work, and the Profiles passed on (the description, the
    run, its band's corners, every policy), not read again by each."""
    import offloadlab.apps.pool as pool
    from offloadlab.profile import Profile

    monkeypatch.setattr(pool, "usable_cores", lambda: 1)  # the corners (and the paper's plot) in this process
    loads = []
    real = Profile.load.__func__

    def counted(cls, path, *a, **kw):
        loads.append(str(path))
        return real(cls, path, *a, **kw)

    monkeypatch.setattr(Profile, "load", classmethod(counted))
    probe = "validation/traces/h100_llama8b_probe.json"
    prof = ["--profile", "validation/traces/profiles/h100_llama-3.1-8b_v0", "--profile", probe]
    for args in (["run", "--requests", "10", "--gpu", "h100"], ["compare", "--requests", "10", "--gpu", "h100"],
                 ["step", "--gpu", "h100"], ["paper", "--requests", "4", "--gpu", "h100", "--quiet", "--out",
                                             str(tmp_path)],
                 ["validate", "validation/traces/serving/rtx4090_llama-3.1-8b"], ["validate", probe]):
        loads.clear()
        assert main(args + prof) == 0, args
        assert loads == [prof[1], prof[3]], args
    capsys.readouterr()


def test_vllm_command_line_brings_its_engine_flags(tmp_path, capsys):
    out = tmp_path / "r.json"
    line = "vllm serve meta-llama/Llama-3.1-70B -tp 2 --max-model-len 4096 --cpu-offload-gb 8"
    assert main(["run", "--model", "llama-3.1-70b", "--gpu", "h100", "--requests", "8", "--vllm", line,
                 "--json", str(out)]) == 0
    row = json.loads(out.read_text())
    assert row["tensor_parallel"] == 2 and row["policy"] == "uva 8GiB"
    assert "deploy with: VLLM_USE_V2_MODEL_RUNNER=0 vllm serve MODEL --tensor-parallel-size 2 --cpu-offload-gb 8.0" in capsys.readouterr().out
    # the same setting on both command lines must agree; two vLLM lines of one comparison too
    assert main(["run", "--model", "llama-3.1-70b", "--gpu", "h100", "-tp", "4", "--vllm", line]) == 2
    assert "--tensor-parallel-size=4: expected what the --vllm command line says (2)" in capsys.readouterr().err
    assert main(["compare", "--model", "llama-3.1-70b", "--gpu", "h100", "--vllm", line, "--vllm", "-tp 4"]) == 2
    assert "the same in every --vllm line" in capsys.readouterr().err


def test_engine_defaults_in_the_help_are_engine_configs():
    """The CLI leaves engine defaults to EngineConfig (so a --vllm line can set them); its help names them."""
    import re

    from offloadlab.apps.cli import build_parser
    from offloadlab.sim import EngineConfig

    sub = build_parser()._subparsers._group_actions[0].choices["run"]
    helps = {a.dest: a.help for a in sub._actions}
    eng = EngineConfig()
    for dest in ("gpu_memory_utilization", "max_num_seqs", "max_num_batched_tokens", "max_model_len",
                 "tensor_parallel", "pipeline_parallel"):
        assert re.fullmatch(r"default (\S+)", helps[dest]).group(1) == f"{getattr(eng, dest):g}", dest


def test_study_tabulates_what_fits_and_simulates_on_request(tmp_path, capsys):
    assert main(["study", "--model", "llama-3.1-405b", "--gpu", "h100", "--gpu", "h200", "--gpus", "2,4,8"]) == 0
    out = capsys.readouterr().out
    h100 = next(line for line in out.splitlines() if "H100-SXM5-80GB" in line).split()
    h200 = next(line for line in out.splitlines() if "H200-SXM-141GB" in line).split()
    assert h100[-3:] == ["-", "-", "k<=2"] and h200[-3:] == ["-", "k<=2", "yes"]  # columns 2, 4, 8 GPUs
    assert "405b on 4x H100-SXM5-80GB: not even with interval k=1" in out and "pinned host memory" in out
    csv = tmp_path / "s.csv"
    assert main(["study", "--model", "llama-3.1-8b", "--gpu", "a100-40gb", "--gpus", "1", "--ks", "2",
                 "--simulate", "--requests", "8", "--quiet", "--csv", str(csv)]) == 0
    df = pd.read_csv(csv)
    assert list(df["offload"]) == [False, True] and list(df["policy"]) == ["none", "interval k=2 buf=2"]
    assert (df["tok_s_per_gpu"] > 0).all()
    assert main(["study", "--gpus", "1,x"]) == 2
    assert "--gpus='1,x': expected comma-separated integers" in capsys.readouterr().err


def test_study_honours_the_kv_cache_dtype(tmp_path, capsys):
    """An fp8 KV cache halves the KV bytes per token: the study's memory plan must see it (it was
    accepted and ignored before)."""
    rows = {}
    for dtype in ("auto", "fp8"):
        csv = tmp_path / f"{dtype}.csv"
        assert main(["study", "--model", "llama-3.1-8b", "--gpu", "a100-40gb", "--gpus", "1", "--ks", "2",
                     "--kv-cache-dtype", dtype, "--simulate", "--requests", "4", "--quiet", "--csv", str(csv)]) == 0
        rows[dtype] = pd.read_csv(csv).set_index("offload")
    for off in (False, True):
        assert rows["fp8"].loc[off, "mem_kv_tokens"] // 16 in (2 * (rows["auto"].loc[off, "mem_kv_tokens"] // 16),
                                                               2 * (rows["auto"].loc[off, "mem_kv_tokens"] // 16) + 1)


def test_the_cli_and_list_import_neither_pandas_nor_matplotlib():
    """Imported only by the commands that build tables or plots (pandas alone takes 0.3 s to import)."""
    code = ("import sys; from offloadlab.apps.cli import main; assert main(['list']) == 0; "
            "print(sorted(m for m in ('pandas', 'matplotlib', 'simpy') if m in sys.modules))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert p.stdout.splitlines()[-1] == "[]"
