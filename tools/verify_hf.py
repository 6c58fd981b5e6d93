"""Compare a megatron checkpoint with its Hugging Face conversion: logits (and MTP logits) of
the megatron model on one rank vs the transformers model, fp32 on CPU, same random tokens.

    python tools/verify_hf.py --checkpoint runs/x/checkpoints --hf hf_out [--checkpoint C2 --hf H2 ...]

Pairs must share one model config. Last stdout line: one JSON object
{"results": [{"checkpoint", "hf", "logits_max_abs_diff", "mtp_1_max_abs_diff", ...}], "max_abs_diff"}.
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from megatron_mm.runtime.compat import before_megatron_import  # noqa: E402

before_megatron_import()  # its notices hidden, its fused functions compiled when first used


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", action="append", required=True, help="megatron checkpoint (repeatable)")
    parser.add_argument("--hf", action="append", required=True, help="its converted folder (repeatable)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if len(args.checkpoint) != len(args.hf):
        parser.error("give one --hf per --checkpoint")
    from megatron_mm.conversion.verify import compare

    results = compare(list(zip(args.checkpoint, args.hf)), args.batch, args.seed)
    worst = max(v for r in results for k, v in r.items() if k.endswith("_max_abs_diff"))
    print(json.dumps({"results": results, "max_abs_diff": worst}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
