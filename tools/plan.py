"""Rank the parallel layouts of a model on N GPUs of a cluster by estimated step time.

    python tools/plan.py --config F [--set k=v ...] --cluster configs/clusters/NAME.yaml --gpus N \
        [--top K] [--json FILE] [--micro-batch-sizes 1,2,4]

Tries every TP, PP, VPP, EP, ETP, micro-batch size and recomputation (none/full) with the
config's model, precision and global batch; keeps the layouts `validate` accepts for the
cluster and whose per-GPU memory estimate fits in gpu_memory_gib - reserved_memory_gib; ranks
them by estimated step time (megatron_mm/planning/planner.py lists every assumption). Prints a
table of the best K and ends with one JSON line (the best K); --json FILE gets every fitting
layout. Each row's `--set` arguments (in the JSON) select that layout for launch/pretrain.py or
tools/make_sbatch.py. Exit 2 with one line per problem on a bad config or cluster, or when no
layout fits.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_mm.cli import report_errors  # noqa: E402
from megatron_mm.config import ConfigError, add_config_args, load_config  # noqa: E402
from megatron_mm.planning.cluster import load_cluster  # noqa: E402
from megatron_mm.planning.planner import Candidate, PlanResult, plan_layouts  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser)
    parser.add_argument("--cluster", required=True, help="cluster profile, configs/clusters/NAME.yaml")
    parser.add_argument("--gpus", required=True, type=int, help="GPUs of the job (whole nodes beyond one)")
    parser.add_argument("--top", type=int, default=10, help="rows to print and in the JSON line (default 10)")
    parser.add_argument("--json", help="write every fitting layout, with its memory and time parts, here")
    parser.add_argument("--micro-batch-sizes", default="1,2,4", help="micro-batch sizes to try (default 1,2,4)")
    return parser.parse_args(argv)


def _layers(layers: list[int]) -> str:
    """[3, 4, 4, 4, 2] -> '3+4x3+2'."""
    runs: list[list[int]] = []
    for n in layers:
        if runs and runs[-1][0] == n:
            runs[-1][1] += 1
        else:
            runs.append([n, 1])
    return "+".join(f"{n}x{k}" if k > 1 else f"{n}" for n, k in runs)


def table(ranked: list[Candidate]) -> list[str]:
    head = (f"{'#':>3} {'tp':>2} {'pp':>2} {'vpp':>3} {'ep':>3} {'etp':>3} {'dp':>4} {'edp':>4} {'mbs':>3} "
            f"{'recomp':>6} {'layers/stage':<14} {'GiB':>5} {'step s':>7} {'tokens/s':>10} {'MFU':>6} | "
            f"{'compute':>7} {'tp':>5} {'ep':>5} {'pp':>5} {'bubble':>6} {'dp':>5}  (s)")
    lines = [head]
    for i, c in enumerate(ranked, 1):
        lay, t = c.layout, c.time
        lines.append(
            f"{i:>3} {lay.tp:>2} {lay.pp:>2} {lay.vpp or '-':>3} {lay.ep:>3} {lay.etp:>3} {c.dp:>4} {c.expert_dp:>4} "
            f"{lay.micro_batch_size:>3} {lay.recompute:>6} {_layers(c.stage_layers):<14} {c.memory_gib:>5.1f} "
            f"{t.total:>7.2f} {c.tokens_per_s:>10,.0f} {c.mfu:>6.1%} | {t.compute:>7.2f} {t.tp_comm:>5.2f} "
            f"{t.ep_comm:>5.2f} {t.pp_comm:>5.2f} {t.bubble:>6.2f} {t.dp_comm:>5.2f}")
    return lines


def summary(result: PlanResult) -> str:
    refused = sum(result.refused.values())
    reasons = ", ".join(f"{n} {key}" for key, n in result.refused.most_common(3))
    over = (f"{result.too_big} over the {result.usable_gib:g} GiB usable"
            + (f" (smallest {result.smallest_too_big_gib:.1f} GiB)" if result.smallest_too_big_gib else ""))
    return (f"{result.enumerated} layouts tried: {refused} refused by validate"
            + (f" ({reasons})" if reasons else "") + f", {over}, {len(result.ranked)} fit")


def main(argv=None) -> int:
    args = parse_args(argv)

    def work() -> None:
        try:
            sizes = tuple(int(x) for x in args.micro_batch_sizes.split(","))
        except ValueError:
            raise ConfigError([f"--micro-batch-sizes={args.micro_batch_sizes}: expected numbers, e.g. 1,2,4"]) from None
        if args.top < 1:
            raise ConfigError([f"--top={args.top}: must be at least 1"])
        cfg = load_config(args.config, args.overrides)
        cluster = load_cluster(args.cluster)
        result = plan_layouts(cfg, cluster, args.gpus, sizes)
        m, t = cfg.model, cfg.train
        nodes = -(-args.gpus // cluster.gpus_per_node)
        print(f"plan: {args.config} on {args.gpus} x {cluster.gpu} ({cluster.name}, {nodes} node(s)); global batch "
              f"{t.global_batch_size} x {m.seq_length} tokens, {cfg.precision.dtype}"
              + (f" + fp8 {cfg.precision.fp8}" if cfg.precision.fp8 else ""))
        print(summary(result))
        if not result.ranked:
            examples = [result.refused_example[k] for k, _ in result.refused.most_common(3)]
            raise ConfigError([f"--gpus={args.gpus}: no layout fits ({summary(result)})"]
                              + [f"e.g. {e}" for e in examples])
        top = result.ranked[:args.top]
        print("estimates (megatron_mm/planning/planner.py); GiB: worst pipeline stage; times per step")
        print("\n".join(table(top)))
        best = top[0]
        print(f"best: --set {' --set '.join(best.layout.overrides())}")
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"config": args.config, "cluster": cluster.name, "gpus": args.gpus,
                           "enumerated": result.enumerated, "refused": dict(result.refused),
                           "too_big": result.too_big, "usable_gib": result.usable_gib,
                           "layouts": [c.as_dict() for c in result.ranked]}, f, indent=1)
        print(json.dumps({"config": args.config, "cluster": cluster.name, "gpus": args.gpus,
                          "enumerated": result.enumerated, "fit": len(result.ranked),
                          "top": [c.as_dict() for c in top]}))

    return report_errors(work)


if __name__ == "__main__":
    sys.exit(main())
