"""Where a serving run's prediction error comes from: one engine-model change at a time.

    python benchmarks/serving_fidelity.py [RUN_DIR]

Replays a serving-run directory (default: the stored RTX 4090 run) from the V0 scheduler with
chunked prefill and the datasheet's memory size (what `offloadlab run --chunked-prefill` did before
the V1 engine existed) up to the V1 engine `offloadlab validate RUN_DIR` uses, printing the errors of each step. The last two rows
are diagnostics, not models: the KV cache forced to the measured block count, and GEMMs at the
efficiency this GPU's prefill steps imply; nothing here feeds back into the defaults.
"""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

from offloadlab.validation.serving_run import plan_replay, replay_serving_run

RUN = Path(__file__).resolve().parents[1] / "validation" / "traces" / "serving" / "rtx4090_llama-3.1-8b"
COLS = ["ttft_mean_s", "ttft_p50_s", "tpot_mean_s", "tpot_p50_s", "e2e_mean_s", "e2e_p50_s", "throughput_rps"]


def row(label: str, plan) -> None:
    s = replay_serving_run(plan, trace_steps=False).summary
    print(f"{label:58s} " + " ".join(f"{s['error_' + c]:+7.1%}" for c in COLS)
          + f" {s['predicted_makespan_s']:7.1f} {s['predicted_preemptions']:5d} {s['predicted_kv_blocks']:5d}")


def main(run: str | Path = RUN) -> None:
    final = plan_replay(run)
    eng, kw = final.engine, final.cost_kw
    datasheet_gpu = dataclasses.replace(final.gpu, memory_bytes=24 * 1024**3) if "4090" in final.gpu.name else final.gpu
    v0 = dataclasses.replace(eng, scheduler="v0", prefix_caching=False, reserve_full_isl=False,
                             async_scheduling=False)
    print(f"{'':58s} " + " ".join(f"{c[:-2]:>7s}" for c in COLS) + " makespan preempt KVblk")
    row("V0 scheduler, chunked prefill, datasheet memory", dataclasses.replace(final, engine=v0, cost_kw={},
                                                                                gpu=datasheet_gpu))
    v1 = dataclasses.replace(eng, prefix_caching=False, async_scheduling=False)
    row("V1 scheduler; KV budget after V1's sampler profiling", dataclasses.replace(final, engine=v1, cost_kw={},
                                                                                    gpu=datasheet_gpu))
    v1 = dataclasses.replace(v1, prefix_caching=True)
    row(" + prefix caching (a preempted request finds its blocks)", dataclasses.replace(final, engine=v1, cost_kw={},
                                                                                        gpu=datasheet_gpu))
    v1 = dataclasses.replace(v1, async_scheduling=True)
    row(" + async scheduling, piecewise CUDA graphs, FA2 mixed steps", dataclasses.replace(final, engine=v1, gpu=datasheet_gpu))
    row(" + the device's total memory as measured (= validate)", final)
    blocks = final.run.measured_kv_blocks
    if blocks:
        # diagnostic: the KV cache the run recorded (validate --recorded-kv-cache: vLLM's num_gpu_blocks_override)
        forced = dataclasses.replace(eng, num_gpu_blocks_override=blocks)
        row(f"diagnostic: KV cache forced to the measured {blocks} blocks", dataclasses.replace(final, engine=forced))
        row("diagnostic: and GEMMs at 87% of peak (this GPU's prefill)",
            dataclasses.replace(final, engine=forced, cost_kw={**kw, "matmul_eff": 0.87}))

if __name__ == "__main__":
    main(*sys.argv[1:])
