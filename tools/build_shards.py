"""Turn a seed JSONL (captions or conversations, with image/audio paths) into WebDataset shards.

    python tools/build_shards.py --jsonl data/demo/train.jsonl --out data/demo/shards

Each bad row is reported on stderr as `row N: field: reason` and left out; the rest are
written (megatron_mm/data/multimodal/shards.py has the formats and the checks). Exits 0
when any row was written, 1 when none was. The last stdout line is a JSON summary
(rows, written, bad, shards).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from megatron_mm.runtime.compat import before_megatron_import  # noqa: E402

before_megatron_import()  # its notices hidden, its fused functions compiled when first used

from megatron_mm.data.multimodal.shards import build_shards  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jsonl", required=True, help="seed JSONL; media paths relative to its folder")
    parser.add_argument("--out", required=True, help="output folder for shard-NNNNNN.tar (must hold none)")
    parser.add_argument("--samples-per-shard", type=int, default=1000)
    args = parser.parse_args(argv)

    def stderr(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    try:
        summary = build_shards(args.jsonl, args.out, args.samples_per_shard, report=stderr,
                               log=lambda m: stderr(f"build_shards: {m}"))
    except (ValueError, OSError) as err:
        stderr(f"build_shards: error: {err}")
        return 2
    print(json.dumps(summary), flush=True)
    if summary["written"] == 0:
        stderr(f"build_shards: error: none of the {summary['rows']} rows of {args.jsonl} could be written")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
