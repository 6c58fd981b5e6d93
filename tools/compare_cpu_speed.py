"""Training speed of a config on this CPU: our step (tools/benchmark.py) against the same model
trained by plain transformers + torch AdamW (megatron_mm/conversion/transformers_baseline.py),
alternating, `--rounds` times each, in one run:

    python tools/compare_cpu_speed.py --config configs/bench/cpu_item5.yaml --rounds 2 \\
        [--set k=v ...] [--steps 4] [--warmup 2] [--threads 2] [--out compare.json]

Each round runs ours first (a fresh `tools/benchmark.py --timing-level 0` process: no step
timers, as the baseline has none), then transformers in this process, each with `--warmup`
untimed and `--steps` timed steps on the config's global batch. Alternating is what makes the
ratio mean something on a machine shared with other work: a load that comes and goes hits both.
Printed: a table (a row per round: both tokens/s from the mean step time, their ratio, and the
ratio of the fastest steps, which a passing load disturbs least), then one JSON line (the last
line; also written to `--out`).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from megatron_mm.cli import report_errors  # noqa: E402
from megatron_mm.config import add_config_args, load_config  # noqa: E402


def ours(args, threads: int) -> dict:
    """tools/benchmark.py in a fresh process: its report's tokens/s and step times."""
    cmd = [sys.executable, os.path.join(ROOT, "tools", "benchmark.py"), "--config", args.config,
           *[a for o in args.overrides for a in ("--set", o)],
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--timing-level", "0"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"tokens_per_s": report["tokens_per_s"], "step_seconds": report["step_time_s"]["per_step"],
            "losses": report["loss"]["per_step"], "peak_memory_gib": report["peak_memory_gib"][0]}


def fastest_step_ratio(a: dict, b: dict) -> float:
    """tokens/s of a's fastest step over b's (the same tokens a step)."""
    return min(b["step_seconds"]) / min(a["step_seconds"])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser)
    parser.add_argument("--rounds", type=int, default=2, help="ours then transformers, this many times")
    parser.add_argument("--steps", type=int, default=4, help="timed steps of each run")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (2 keep the CPU memory "
                        "measurement, made on step 2, out of the timed steps)")
    parser.add_argument("--threads", type=int, help="torch threads for both (default: OMP_NUM_THREADS, else torch's)")
    parser.add_argument("--out", help="also write the JSON report here")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.steps < 1 or args.warmup < 0:
        parser.error(f"--rounds={args.rounds} and --steps={args.steps} must be >= 1, --warmup={args.warmup} >= 0")

    def work() -> None:
        import torch

        from megatron_mm.conversion.transformers_baseline import measure_transformers_training

        cfg = load_config(args.config, args.overrides)
        threads = args.threads or int(os.environ.get("OMP_NUM_THREADS") or torch.get_num_threads())
        torch.set_num_threads(threads)
        rounds = []
        print(f"{'round':>5}  {'ours tok/s':>10}  {'transformers tok/s':>18}  {'ratio':>5}  {'fastest steps':>13}",
              flush=True)
        for i in range(args.rounds):
            a = ours(args, threads)
            b = measure_transformers_training(cfg, args.steps, args.warmup, "cpu")
            r = {"round": i + 1, "ours": a, "transformers": b, "ratio": a["tokens_per_s"] / b["tokens_per_s"],
                 "fastest_step_ratio": fastest_step_ratio(a, b)}
            rounds.append(r)
            print(f"{i + 1:>5}  {a['tokens_per_s']:>10,.0f}  {b['tokens_per_s']:>18,.0f}  {r['ratio']:>5.2f}  "
                  f"{r['fastest_step_ratio']:>13.2f}", flush=True)
        ratios = [r["ratio"] for r in rounds]
        report = {
            "config": args.config, "overrides": args.overrides, "device": "cpu", "threads": threads,
            "steps": args.steps, "warmup": args.warmup,
            "tokens_per_step": cfg.train.global_batch_size * cfg.model.seq_length,
            "rounds": rounds,
            "ratio": {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)},
            "fastest_step_ratio": statistics.median(r["fastest_step_ratio"] for r in rounds),
        }
        if args.out:
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            with open(args.out, "w") as f:
                json.dump(report, f, indent=1)
        print(json.dumps(report), flush=True)

    return report_errors(work)


if __name__ == "__main__":
    sys.exit(main())
