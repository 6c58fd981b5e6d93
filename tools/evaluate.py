"""Evaluate a checkpoint on held-out data (one process).

    python tools/evaluate.py --config configs/quickstart.yaml --set checkpoint.load=runs/quickstart/checkpoints

For the multimodal demo set, per split (`heldout`: images and sounds never trained on;
`novel`: attribute combinations never trained on): loss, and the accuracy with which the
model picks the right answer to "What shape is this?", "What colour is the shape?", "Is this
sound low, medium or high?" and "Is this a tone or a chord?", against chance.
For the user's own data (data.source=shards), per split of data.eval_shards: the loss over
the learned tokens. Prints an aligned table, then the result as one JSON object, the last
stdout line (--json: only that line).
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_mm.cli import report_errors  # noqa: E402
from megatron_mm.config import add_config_args, load_config  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser)
    parser.add_argument("--max-samples", type=int, default=400, help="samples to score per split")
    parser.add_argument("--json", action="store_true", help="print only the JSON line, no table")
    args = parser.parse_args(argv)

    def work() -> None:
        cfg = load_config(args.config, args.overrides)
        from megatron_mm.training.evaluate import evaluate, evaluation_table

        result = evaluate(cfg, args.max_samples)
        if not args.json:
            print(evaluation_table(result))
        print(json.dumps(result), flush=True)

    return report_errors(work)


if __name__ == "__main__":
    sys.exit(main())
