"""Pretraining entry point.

    torchrun --nproc_per_node=N launch/pretrain.py --config FILE [--set key=value ...]
    srun python launch/pretrain.py --config FILE ...     (rank from SLURM variables)
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_mm.cli import report_errors  # noqa: E402
from megatron_mm.config import add_config_args, load_config  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser)
    args = parser.parse_args(argv)

    def work() -> None:
        cfg = load_config(args.config, args.overrides)
        from megatron_mm.training.loop import run

        run(cfg)

    return report_errors(work)


if __name__ == "__main__":
    sys.exit(main())
