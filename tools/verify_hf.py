"""Compare a megatron checkpoint with its Hugging Face conversion: logits (and MTP logits) of
the megatron model vs the transformers model, fp32 on CPU, same random tokens.

    python tools/verify_hf.py --checkpoint runs/x/checkpoints --hf hf_out [--checkpoint C2 --hf H2 ...]
    torchrun --nproc_per_node=2 tools/verify_hf.py --checkpoint C --hf H --layout tp2 \
        --checkpoint C --hf H --layout pp2 --checkpoint C --hf H --layout ep2

Megatron runs on one rank, or under torchrun with each pair's --layout (tp1, tp2, pp2, ep2,
tp2_pp2_ep2, ...: one per --checkpoint when given; the world must hold it). Last stdout line
(rank 0): one JSON object {"results": [{"checkpoint", "hf", "layout", "logits_max_abs_diff",
"logits_max_abs", "mtp_1_max_abs_diff", ...}], "max_abs_diff"}.
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
    parser.add_argument("--layout", action="append", default=None,
                        help="megatron's layout for the pair (repeatable, one per --checkpoint; default tp1)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if len(args.checkpoint) != len(args.hf) or (args.layout and len(args.layout) != len(args.checkpoint)):
        parser.error("give one --hf (and one --layout, if any) per --checkpoint")
    from megatron_mm.conversion.verify import compare, parse_layout

    for layout in args.layout or []:
        try:
            parse_layout(layout)
        except ValueError as err:
            parser.error(str(err))
    results = compare(list(zip(args.checkpoint, args.hf)), args.batch, args.seed, args.layout)
    if results:  # rank 0
        worst = max(v for r in results for k, v in r.items() if k.endswith("_max_abs_diff"))
        print(json.dumps({"results": results, "max_abs_diff": worst}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
