"""Write the procedural multimodal demo set (captioned shapes and tones; no downloads).

    python tools/make_demo_data.py --out data/demo --n 2000 --seed 0
    python tools/make_demo_data.py --out data/text --n 2000 --seed 1 --text    # text only

--text writes DIR/corpus.txt instead: N documents of the generated text corpus (the text
quickstart's), separated by blank lines, the input format of tools/prepare_data.py.

Writes DIR/train.jsonl, DIR/heldout.jsonl (new renders of the trained attribute combinations),
DIR/novel.jsonl (combinations never trained on; both with "label" for scoring) and media under
DIR/media/; see megatron_mm/data/multimodal/demo.py. Turn a JSONL into shards with
tools/build_shards.py. Progress goes to stderr; the last stdout line is a JSON summary.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from megatron_mm.runtime.compat import before_megatron_import  # noqa: E402

before_megatron_import()  # its notices hidden, its fused functions compiled when first used

from megatron_mm.data.corpus import generate_corpus  # noqa: E402
from megatron_mm.data.multimodal.demo import make_demo_data  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output folder (must not already hold a demo set)")
    parser.add_argument("--n", type=int, required=True, help="number of train samples")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--heldout", type=int, help="number of held-out samples (default n // 10)")
    parser.add_argument("--image-size", type=int, default=32, help="image side in pixels")
    parser.add_argument("--text", action="store_true", help="write DIR/corpus.txt (generated text) instead")
    args = parser.parse_args(argv)
    if args.text:
        os.makedirs(args.out, exist_ok=True)
        path = os.path.join(args.out, "corpus.txt")
        with open(path, "w") as f:
            f.write("\n\n".join(generate_corpus(args.n, args.seed)) + "\n")
        print(json.dumps({"corpus": path, "documents": args.n}), flush=True)
        return 0
    try:
        summary = make_demo_data(args.out, args.n, args.seed, args.heldout, args.image_size,
                                 log=lambda m: print(f"make_demo_data: {m}", file=sys.stderr, flush=True))
    except (ValueError, OSError) as err:
        print(f"make_demo_data: error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
