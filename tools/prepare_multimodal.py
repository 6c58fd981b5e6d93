"""Your own multimodal data: seed JSONL -> shards + a tokenizer with the multimodal pieces.

    python tools/prepare_multimodal.py --jsonl data/mine/train.jsonl --heldout data/mine/heldout.jsonl --out data/mine/prepared

Rows are captions {"text", "image"?, "audio"?} or {"conversations": [...], "image"?, "audio"?}
with turns {"from": "human"|"gpt"|"user"|"assistant", "value"} or {"role": "user"|"assistant",
"content"}, optionally opened by a system turn; media paths relative to the JSONL's folder.
Writes OUT/train/ (and OUT/heldout/) shards and OUT/tokenizer.model, trained on the train rows'
text (--vocab-size, default and at most the config's model.vocab_size) or, with --tokenizer, an
existing sentencepiece model extended with the pieces it lacks. Bad rows are reported on stderr
as `FILE: row N: field: reason` and left out; progress goes to stderr. Prints the training and
evaluation commands; the last stdout line is a JSON summary (with the commands). Exit 2 on bad
input (one line), 0 otherwise. megatron_mm/data/multimodal/own_data.py does the work.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_mm.runtime.compat import before_megatron_import  # noqa: E402

before_megatron_import()  # its notices hidden, its fused functions compiled when first used

from megatron_mm.config import ConfigError, load_config  # noqa: E402
from megatron_mm.data.multimodal.own_data import prepare_own_data, training_commands  # noqa: E402

DEFAULT_CONFIG = "configs/quickstart.yaml"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jsonl", required=True, help="train rows (seed JSONL); media paths relative to its folder")
    parser.add_argument("--out", required=True, help="output folder (train/, heldout/, tokenizer.model)")
    parser.add_argument("--heldout", help="held-out rows for tools/evaluate.py (seed JSONL)")
    parser.add_argument("--vocab-size", type=int, help="tokenizer vocabulary (an upper bound; default model.vocab_size)")
    parser.add_argument("--tokenizer", help="extend this sentencepiece .model instead of training one")
    parser.add_argument("--byte-fallback", action="store_true", help="train with byte fallback (no <unk>)")
    parser.add_argument("--samples-per-shard", type=int, default=1000)
    parser.add_argument("--run-dir", help="run.dir of the printed commands (default runs/<name of --out>)")
    # the training config the data is for (its model.vocab_size); unlike add_config_args, optional
    parser.add_argument("--config", default=DEFAULT_CONFIG, help=f"training config (default {DEFAULT_CONFIG})")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value (repeatable); passed on to the printed commands")
    args = parser.parse_args(argv)

    def stderr(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    try:
        cfg = load_config(args.config, args.overrides)
        summary = prepare_own_data(args.jsonl, args.out, cfg.model.vocab_size, heldout=args.heldout,
                                   vocab_size=args.vocab_size, tokenizer=args.tokenizer,
                                   byte_fallback=args.byte_fallback, samples_per_shard=args.samples_per_shard,
                                   report=stderr, log=lambda m: stderr(f"prepare_multimodal: {m}"))
    except ConfigError as err:
        stderr(f"prepare_multimodal: config error: {err}".replace("\n", "; "))
        return 2
    except (ValueError, OSError) as err:
        stderr(f"prepare_multimodal: error: {err}")
        return 2
    run_dir = args.run_dir or os.path.join("runs", os.path.basename(os.path.normpath(args.out)))
    commands = training_commands(args.config, args.overrides, summary, run_dir)
    print("train:", flush=True)
    print(f"  {commands['train']}")
    if "evaluate" in commands:
        print("evaluate:")
        print(f"  {commands['evaluate']}")
    print(json.dumps({**summary, "commands": commands}, ensure_ascii=False), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
