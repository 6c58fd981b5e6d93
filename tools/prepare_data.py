"""Turn a text file into a megatron indexed dataset (and a SentencePiece tokenizer).

    python tools/prepare_data.py --input docs.txt --out data/mydata --vocab-size 512

The input is .txt (documents separated by blank lines) or .jsonl (one {"text": ...} per
line). Writes PREFIX.model/.vocab (unless --tokenizer names an existing model) and
PREFIX.bin/.idx; use them with data.source=indexed, data.prefix=PREFIX,
data.tokenizer=PREFIX.model. Progress goes to stderr; the last stdout line is a JSON
summary.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from megatron_mm.runtime.compat import before_megatron_import  # noqa: E402

before_megatron_import()  # its notices hidden, its fused functions compiled when first used

from megatron_mm.data.indexed import write_indexed_dataset  # noqa: E402
from megatron_mm.data.tokenizer import open_tokenizer, train_sentencepiece  # noqa: E402


class InputError(ValueError):
    """An input file that cannot be read as documents."""


def progress(message: str) -> None:
    print(f"prepare_data: {message}", file=sys.stderr, flush=True)


def _read_jsonl(path: str) -> list[str]:
    texts = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise InputError(f"{path}:{number}: not JSON ({err.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise InputError(f"{path}:{number}: expected an object with a string \"text\" field")
            texts.append(record["text"])
    return texts


def _read_txt(path: str) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return re.split(r"\n[ \t]*\n", f.read())


def read_documents(path: str) -> list[str]:
    """Non-empty documents of a .txt or .jsonl file, stripped."""
    if not os.path.isfile(path):
        raise InputError(f"--input {path}: file not found")
    if path.endswith(".jsonl"):
        texts = _read_jsonl(path)
    elif path.endswith(".txt"):
        texts = _read_txt(path)
    else:
        raise InputError(f"--input {path}: expected a .txt or .jsonl file")
    documents = [t.strip() for t in texts if t.strip()]
    if not documents:
        raise InputError(f"--input {path}: no documents (the file is empty or blank)")
    return documents


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", required=True, help=".txt (blank-line separated) or .jsonl (\"text\" field)")
    parser.add_argument("--out", required=True, metavar="PREFIX", help="output prefix for .bin/.idx/.model")
    parser.add_argument("--vocab-size", type=int, help="tokenizer vocabulary size (an upper bound)")
    parser.add_argument("--tokenizer", help="use this existing SentencePiece .model (or Hugging Face tokenizer folder) instead of training one")
    parser.add_argument("--byte-fallback", action="store_true",
                        help="train with byte fallback (no <unk>; needs --vocab-size above 260)")
    args = parser.parse_args(argv)
    if args.tokenizer is None and args.vocab_size is None:
        parser.error("--vocab-size is required unless --tokenizer is given")
    if args.vocab_size is not None and args.vocab_size < 1:
        parser.error(f"--vocab-size={args.vocab_size}: must be at least 1")
    return args


def prepare(args: argparse.Namespace) -> dict:
    """Read, tokenize and write; return the summary."""
    documents = read_documents(args.input)
    progress(f"read {len(documents)} documents from {args.input}")
    if args.tokenizer:
        model_path = args.tokenizer
    else:
        progress(f"training a sentencepiece tokenizer (vocab_size {args.vocab_size}) -> {args.out}.model")
        model_path = train_sentencepiece(documents, args.out, args.vocab_size, args.byte_fallback)
    tokenizer = open_tokenizer(model_path)
    if args.vocab_size is not None and tokenizer.vocab_size > args.vocab_size:
        raise InputError(f"--tokenizer {model_path} has {tokenizer.vocab_size} pieces, "
                         f"more than --vocab-size={args.vocab_size}")
    progress(f"tokenizing into {args.out}.bin/.idx")
    count, tokens = write_indexed_dataset(documents, tokenizer, args.out)
    progress(f"wrote {count} documents, {tokens} tokens (vocab {tokenizer.vocab_size})")
    return {"documents": count, "tokens": tokens, "vocab_size": tokenizer.vocab_size,
            "prefix": args.out, "tokenizer": model_path}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        summary = prepare(args)
    except (ValueError, OSError) as err:
        print(f"prepare_data: error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
