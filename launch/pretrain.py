"""Pretraining entry point.

    torchrun --nproc_per_node=N launch/pretrain.py --config FILE [--set key=value ...]
    srun python launch/pretrain.py --config FILE ...     (rank from SLURM variables)
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_mm.config import ConfigError, add_config_args, load_config  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser)
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        from megatron_mm.training.loop import run

        run(cfg)
    except ConfigError as err:
        print(f"config error: {err}".replace("\n", "\nconfig error: "), file=sys.stderr)
        return 2
    except Exception as err:
        from megatron_mm.training.checkpoint import CheckpointError

        if not isinstance(err, CheckpointError):
            raise
        print(f"checkpoint error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
