"""Your own multimodal data, from seed JSONL to the files `data.source=shards` reads.

`prepare_own_data(jsonl, out, model_vocab_size, ...)` writes into `out`:

* `train/shard-*.tar`: the JSONL's good rows (`shards.build_shards`: captions
  `{"text", "image"?, "audio"?}` and conversations in any dialect of `conversations.py`;
  one `FILE: row N: field: reason` line per bad row, which is left out);
* `heldout/shard-*.tar` when a held-out JSONL is given (`data.eval_shards`, for
  `tools/evaluate.py`);
* `tokenizer.model`: a sentencepiece model with the multimodal pieces (`<image>`, `<audio>`,
  `<|user|>`, `<|assistant|>`, `<|end|>`), either trained on the text of the written train
  rows (`vocab_size`, at most `model_vocab_size`, the model's embedding rows) or an existing
  model extended with the pieces it lacks (`tokenizer.extend_sentencepiece`).

`training_commands` then gives the `launch/pretrain.py` and `tools/evaluate.py` command lines
that train on and evaluate these files.
"""

from __future__ import annotations

import os
import shlex
import time
from typing import Callable, Optional

from megatron_mm.data.multimodal.shards import build_shards
from megatron_mm.data.multimodal.text import sample_texts, train_multimodal_tokenizer
from megatron_mm.data.tokenizer import SentencePieceTokenizer, extend_sentencepiece

TOKENIZER_NAME = "tokenizer"  # out/tokenizer.model (+ .vocab when trained)


def _too_large(what: str, pieces: int, model_vocab_size: int) -> str:
    return (f"{what} has {pieces} pieces, more than model.vocab_size={model_vocab_size} (the model's "
            f"embedding rows); pass --set model.vocab_size={pieces} or more (a multiple of parallel.tp)")


def prepare_own_data(jsonl: str, out: str, model_vocab_size: int, heldout: Optional[str] = None,
                     vocab_size: Optional[int] = None, tokenizer: Optional[str] = None,
                     byte_fallback: bool = False, samples_per_shard: int = 1000,
                     report: Callable[[str], None] = print,
                     log: Callable[[str], None] = lambda message: None) -> dict:
    """Build `out`'s shards and tokenizer (see the module docstring); return the summary:
    train (and heldout) shard summaries, tokenizer, vocab_size, tokenizer_source (trained or
    extended), added_pieces, seconds. ValueError for bad input, before anything is written
    where it can be known then (sizes, missing files, an unusable existing tokenizer)."""
    start = time.perf_counter()
    if vocab_size is not None and tokenizer is not None:
        raise ValueError("--vocab-size and --tokenizer: give one (an existing tokenizer keeps its vocabulary)")
    if vocab_size is not None and not 1 <= vocab_size <= model_vocab_size:
        raise ValueError(f"--vocab-size={vocab_size}: must be between 1 and model.vocab_size={model_vocab_size} "
                         f"(the model's embedding rows; raise it with --set model.vocab_size=...)")
    for flag, path in (("--jsonl", jsonl), ("--heldout", heldout), ("--tokenizer", tokenizer)):
        if path is not None and not os.path.isfile(path):
            raise ValueError(f"{flag} {path}: file not found")
    for split in ("train", "heldout"):
        folder = os.path.join(out, split)
        if os.path.isdir(folder) and os.listdir(folder):
            raise ValueError(f"--out {out}: {folder} is not empty; pick a new folder")
    model_path = os.path.join(out, TOKENIZER_NAME + ".model")
    added: list[str] = []
    if tokenizer is not None:  # extend first: a tokenizer that cannot serve stops before the shards
        log(f"extending {tokenizer} with the multimodal pieces it lacks -> {model_path}")
        added = extend_sentencepiece(tokenizer, model_path)
        pieces = SentencePieceTokenizer(model_path).vocab_size
        if pieces > model_vocab_size:
            os.remove(model_path)
            raise ValueError(_too_large(f"--tokenizer {tokenizer} (with the multimodal pieces)", pieces,
                                        model_vocab_size))

    texts: list[dict] = []
    summary: dict = {}
    for split, path in (("train", jsonl), ("heldout", heldout)):
        if path is None:
            continue
        log(f"building {split} shards from {path} -> {os.path.join(out, split)}")
        keep = texts.append if split == "train" and tokenizer is None else None
        built = build_shards(path, os.path.join(out, split), samples_per_shard,
                             report=lambda line, path=path: report(f"{path}: {line}"), log=log, on_written=keep)
        if built["written"] == 0:
            raise ValueError(f"{path}: none of its {built['rows']} rows could be written (each is reported above)")
        log(f"{split}: {built['written']} of {built['rows']} rows written in {built['shards']} shards, "
            f"{built['bad']} bad")
        summary[split] = {k: built[k] for k in ("rows", "written", "bad", "shards", "out")}

    if tokenizer is None:
        target = vocab_size or model_vocab_size
        log(f"training a sentencepiece tokenizer (vocab_size up to {target}) on the text of "
            f"{len(texts)} rows -> {model_path}")
        train_multimodal_tokenizer(texts, os.path.join(out, TOKENIZER_NAME), target, byte_fallback)
        lines = sum(len(sample_texts(row)) for row in texts)
        log(f"tokenizer trained on {lines} texts")
    pieces = SentencePieceTokenizer(model_path).vocab_size
    if pieces > model_vocab_size:  # cannot happen for a trained one (vocab_size is an upper bound)
        raise ValueError(_too_large(model_path, pieces, model_vocab_size))
    summary.update({"tokenizer": model_path, "vocab_size": pieces,
                    "tokenizer_source": "extended" if tokenizer else "trained", "added_pieces": added,
                    "seconds": round(time.perf_counter() - start, 3)})
    return summary


def training_commands(config: str, overrides: list[str], summary: dict, run_dir: str) -> dict[str, str]:
    """The `train` (launch/pretrain.py) and, when there are held-out shards, `evaluate`
    (tools/evaluate.py) command lines for the files of `summary` (from `prepare_own_data`)
    under `config` + `overrides`, run from the repository root."""
    sets = list(overrides) + ["data.source=shards", f"data.shards={summary['train']['out']}",
                              f"data.tokenizer={summary['tokenizer']}"]
    if "heldout" in summary:
        sets.append(f"data.eval_shards={summary['heldout']['out']}")
    sets.append(f"run.dir={run_dir}")
    args = f"--config {shlex.quote(config)} " + " ".join(f"--set {shlex.quote(s)}" for s in sets)
    checkpoints = shlex.quote(f"checkpoint.load={os.path.join(run_dir, 'checkpoints')}")
    commands = {"train": f"python launch/pretrain.py {args}"}
    if "heldout" in summary:
        commands["evaluate"] = f"python tools/evaluate.py {args} --set {checkpoints}"
    return commands
