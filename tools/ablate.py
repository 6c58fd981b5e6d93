"""Parallel-layout ablation: benchmark one config under a list of layouts and tabulate them.

    python tools/ablate.py --config F [--set k=v ...] --layouts FILE.yaml --steps M [--warmup N] \\
        --out DIR [--launcher local|slurm] [--cluster configs/clusters/NAME.yaml] [--timeout S] \\
        [slurm: --partition P --account A --qos Q --time T --python PY --setup CMD]

The layouts file is a YAML list of layouts, each
    - name: pp2              # letters, digits, _ . + - (a folder name, and the SLURM job name)
      ranks: 2               # local: processes (1: plain python, more: torchrun --nproc_per_node)
      nodes: 1               # slurm: nodes (default: ranks / the cluster's ranks per node)
      set: [parallel.pp=2]   # --set overrides on top of the command's

Every layout runs tools/benchmark.py (--steps, --warmup; --cluster for MFU): with
`--launcher local` one after another on this machine, with `--launcher slurm` as one job a
layout (written by tools/make_sbatch.py --benchmark), all submitted at once and then waited
for. A layout that the config rules refuse for its world size (the same `validate` and
memory check every launch runs) is recorded as failed without starting anything.

DIR/NAME/ holds request.json (what was asked), log.txt (the run's output), job.json (SLURM:
the job) and then benchmark.json (its report) or error.txt (one line: why it failed). The
sweep goes on past a failed layout. A rerun with the same request skips layouts that have
their benchmark.json, waits for SLURM jobs submitted before and still unread, and runs
failed ones again. Finally DIR/ablation.csv, ablation.md and ablation.png (tokens/s, peak
memory measured and estimated per layout) are written from the reports on disk.

Exit status 0; 1 when a layout failed (the tables still list it); 2 for a bad command,
config or layouts file (one line each). The last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_mm import ablation  # noqa: E402
from megatron_mm.cli import report_errors  # noqa: E402
from megatron_mm.config import add_config_args  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser)
    parser.add_argument("--layouts", required=True, help="YAML list of {name, ranks|nodes, set: [k=v, ...]}")
    parser.add_argument("--steps", type=int, required=True, help="timed steps a layout")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    parser.add_argument("--out", required=True, help="folder for the layouts' runs and the tables")
    parser.add_argument("--launcher", choices=["local", "slurm"], default="local")
    parser.add_argument("--cluster", help="cluster profile (configs/clusters/*.yaml): MFU peak; required for slurm")
    parser.add_argument("--timeout", type=float, default=3600,
                        help="local: seconds a layout may run before it is stopped and recorded as failed "
                             "(default 3600; 0: no limit)")
    slurm = parser.add_argument_group("--launcher slurm (passed to tools/make_sbatch.py)")
    slurm.add_argument("--time", default="1:00:00", help="sbatch --time a layout (default 1:00:00)")
    slurm.add_argument("--partition")
    slurm.add_argument("--account")
    slurm.add_argument("--qos")
    slurm.add_argument("--python", default=sys.executable, help="interpreter on the compute nodes (default: this one)")
    slurm.add_argument("--setup", action="append", default=[], metavar="CMD", help="shell line before srun (repeatable)")
    slurm.add_argument("--poll", type=float, default=5.0, help="seconds between job state checks (default 5)")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        parser.error(f"--steps={args.steps} must be >= 1 and --warmup={args.warmup} >= 0")
    if args.launcher == "slurm" and not args.cluster:
        parser.error("--launcher slurm needs --cluster (ranks a node, environment, MFU peak)")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    command = "python tools/ablate.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    failed: list[str] = []
    code = report_errors(lambda: failed.extend(ablation.sweep(args, command)))
    return code or (1 if failed else 0)


if __name__ == "__main__":
    sys.exit(main())
