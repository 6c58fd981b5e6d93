"""Evaluate a checkpoint on held-out data (one process).

    python tools/evaluate.py --config configs/quickstart.yaml --set checkpoint.load=runs/quickstart/checkpoints

For the multimodal demo set: held-out loss, and the accuracy with which the model picks
the right description of unseen images (shape x colour) and sounds (pitch x sound),
against chance. The last stdout line is one JSON object.
"""

import argparse
import json
import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
warnings.filterwarnings("ignore")

from megatron_mm.config import ConfigError, add_config_args, load_config  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser)
    parser.add_argument("--max-samples", type=int, default=400, help="held-out samples to score")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        from megatron_mm.training.evaluate import evaluate

        result = evaluate(cfg, args.max_samples)
    except ConfigError as err:
        print(f"config error: {err}".replace("\n", "\nconfig error: "), file=sys.stderr)
        return 2
    except Exception as err:
        from megatron_mm.training.checkpoint import CheckpointError

        if not isinstance(err, CheckpointError):
            raise
        print(f"checkpoint error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
