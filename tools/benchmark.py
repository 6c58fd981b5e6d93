"""Training throughput of a config: step time, tokens/s, TFLOP/s and MFU per GPU, peak memory
per rank, and where the step time goes (megatron-core's timers).

    python tools/benchmark.py --config F [--set k=v ...] --steps M [--warmup N] \\
        [--cluster configs/clusters/h800.yaml] [--out bench.json]
    torchrun --nproc_per_node=K tools/benchmark.py --config F ...      (or under srun)

Runs N warm-up and M timed steps of the config's training (its data, its layout) through the
training loop, never writing a checkpoint (a `checkpoint.load` gives the weights only). MFU
is TFLOP/s per GPU over the cluster profile's peak (`peak_tflops_fp8` when `precision.fp8` is
set, else `peak_tflops_bf16`); without `--cluster`, over `logging.peak_tflops_per_gpu`. The
last stdout line is the JSON object, also written to `--out`. The loop's `metrics.jsonl` goes
to `<run.dir>/benchmark/`.
"""

import argparse
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_mm.cli import report_errors  # noqa: E402
from megatron_mm.config import add_config_args, load_config  # noqa: E402
from megatron_mm.planning.layout import parallel_layout  # noqa: E402


def benchmark_settings(cfg, warmup: int, steps: int) -> None:
    """Train warmup + steps steps of the config's learning-rate schedule, log every step,
    write no checkpoint and no TensorBoard events."""
    cfg.train.scheduler.decay_steps = cfg.train.scheduler.decay_steps or cfg.train.steps
    cfg.train.steps = warmup + steps
    cfg.checkpoint.save_interval = 0
    cfg.checkpoint.save_at_end = cfg.checkpoint.save_on_sigterm = cfg.checkpoint.load_optimizer = False
    cfg.logging.interval, cfg.logging.tensorboard = 1, False
    cfg.run.dir = os.path.join(cfg.run.dir, "benchmark")


def peak_tflops(cfg, cluster_path):
    """(peak TFLOP/s per GPU or None, where it comes from or why there is none)."""
    if cluster_path is None:
        peak = cfg.logging.peak_tflops_per_gpu
        return peak, "logging.peak_tflops_per_gpu" if peak else "no --cluster profile and no logging.peak_tflops_per_gpu"
    from megatron_mm.planning.cluster import load_cluster

    profile = load_cluster(cluster_path)
    key = "peak_tflops_fp8" if cfg.precision.fp8 else "peak_tflops_bf16"
    peak = getattr(profile, key)
    return peak, f"cluster {profile.name}: {key}" if peak else f"cluster profile {profile.name} has no {key}"


def summarize(cfg, records: list[dict], world_size: int, peak, peak_source: str) -> dict:
    """The JSON report from the timed steps' metrics (each with every rank's record)."""
    from megatron_mm.training import step_timers

    times = [r["step_time_s"] for r in records]
    mean = statistics.fmean(times)
    tokens = cfg.train.global_batch_size * cfg.model.seq_length
    flops = statistics.fmean(r["flops"] for r in records)
    tflops = sum(r["flops"] for r in records) / sum(times) / world_size / 1e12
    ranks = []
    for i, last in enumerate(records[-1]["ranks"]):
        mine = [r["ranks"][i] for r in records]
        timers = {name: statistics.fmean(m["timers"][name] for m in mine) for name in last["timers"]}
        step = statistics.fmean(m["step_time_s"] for m in mine)
        ranks.append({"rank": last["rank"], "peak_memory_gib": last["peak_memory_gib"], "step_time_s": step,
                      "split_s": step_timers.split(timers, step),
                      "timers_s": {name: s for name, s in timers.items() if s > 0}})
    return {
        "world_size": world_size,
        "layout": parallel_layout(cfg, world_size),
        "precision": {"dtype": cfg.precision.dtype, "fp8": cfg.precision.fp8},
        "timed_steps": [r["step"] for r in records],
        "step_time_s": {"mean": mean, "min": min(times), "max": max(times), "per_step": times},
        "tokens_per_step": tokens,
        "tokens_per_s": tokens / mean,
        "tokens_per_s_per_gpu": tokens / mean / world_size,
        "flops_per_step": flops,
        "flops_counted": "model FLOPs (costs/flops.py): the language model over every position and the "
                         "encoders over the step's images and clips; recomputation not counted",
        "tflops_per_gpu": tflops,
        "peak_tflops_per_gpu": peak,
        "mfu": tflops / peak if peak else None,
        "mfu_source": peak_source,
        "peak_memory_gib": [r["peak_memory_gib"] for r in ranks],
        "time_split": None if ranks[0]["split_s"] is None else {
            "measured": step_timers.PARTS,
            "derived": {"other": step_timers.OTHER},
            "note": "per rank below (split_s: seconds per step, mean over the timed steps, of that rank's step "
                    "time, from building the step's batch iterators to the end of its optimizer step); timers: "
                    "megatron-core's Timers, started by its schedules, p2p communicator and finalize_model_grads, "
                    "and by training/loop.py (optimizer)",
        },
        "ranks": ranks,
        "loss": {"final": records[-1]["loss"], "per_step": [r["loss"] for r in records]},
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser)
    parser.add_argument("--steps", type=int, required=True, help="timed steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--cluster", help="cluster profile (configs/clusters/*.yaml) with the GPU's peak TFLOP/s")
    parser.add_argument("--timing-level", type=int, choices=[0, 1, 2], default=2,
                        help="megatron-core timer level: 2 splits the step time (each timer synchronises the "
                             "GPU); 0 times the whole step only")
    parser.add_argument("--out", help="also write the JSON report here")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        parser.error(f"--steps={args.steps} must be >= 1 and --warmup={args.warmup} >= 0")

    def work() -> None:
        cfg = load_config(args.config, args.overrides)
        peak, peak_source = peak_tflops(cfg, args.cluster)
        cfg.logging.peak_tflops_per_gpu = peak  # the loop's metrics.jsonl mfu against the same peak
        benchmark_settings(cfg, args.warmup, args.steps)

        from megatron_mm.runtime import distributed as runtime
        from megatron_mm.training import step_timers
        from megatron_mm.training.loop import run

        records = []

        def keep_timed_steps(step: int, metrics: dict) -> None:
            if step > args.warmup:
                records.append({"step": step, **metrics})

        run(cfg, step_timers.make_timers(args.timing_level), on_log=keep_timed_steps)
        if runtime.dist_env().rank != 0:
            return
        report = {"config": args.config, "overrides": args.overrides, "device": runtime.detect_hardware().device_name,
                  "cluster": args.cluster, "warmup_steps": args.warmup,
                  **summarize(cfg, records, runtime.world_size_from_env(), peak, peak_source)}
        if args.out:
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            with open(args.out, "w") as f:
                json.dump(report, f, indent=1)
        print(json.dumps(report), flush=True)

    return report_errors(work)


if __name__ == "__main__":
    sys.exit(main())
