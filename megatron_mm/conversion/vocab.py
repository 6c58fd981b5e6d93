"""Growing an imported language model's vocabulary to its tokenizer's (HF -> megatron import).

The tokenizer (the HF folder's own `tokenizer.json`, or `--tokenizer DIR|FILE.model`) gets our
multimodal pieces when it lacks them (`data.tokenizer.open_tokenizer`: special tokens after the
largest id; `extend_sentencepiece` for a `.model`), and is written beside the checkpoint
(`OUT/tokenizer/` or `OUT/tokenizer.model`), which the stored config's `data.tokenizer` names.
When its ids then pass the embedding's rows, the embedding and the output layer grow to
`padded_rows(tokenizer size)`: the next multiple of `VOCAB_MULTIPLE`, 128, Megatron-LM's
`--make-vocab-size-divisible-by` default: it is divisible by every tensor-parallel size in use
(powers of two up to 8, a node; up to 128), so the rows split evenly over TP ranks, and keeps the
rows a multiple of 64 for the GPU's matmul tiles. New rows are the mean of the existing rows (a
new token starts as the average token: its logit neither dominates nor vanishes, the usual
choice when adding tokens to a trained model); old rows are copied unchanged. A tokenizer that
fits leaves the model as it is (never shrunk: the folder's extra rows may be in use).
"""

from __future__ import annotations

import dataclasses
import math
import os
import tempfile
from typing import Callable, Optional

import torch

from megatron_mm.conversion.dcp import ConversionError

VOCAB_MULTIPLE = 128


def padded_rows(tokens: int) -> int:
    return math.ceil(tokens / VOCAB_MULTIPLE) * VOCAB_MULTIPLE


@dataclasses.dataclass
class VocabPlan:
    source: str  # the tokenizer read (folder or .model)
    tokens: int  # its size with the multimodal pieces
    added: list[str]  # the pieces it lacked
    old_rows: int  # the folder's embedding rows
    rows: int  # the checkpoint's
    name: str  # the extended tokenizer's name in the checkpoints folder: tokenizer/ or tokenizer.model
    write: Callable[[str], object]  # writes it at a path

    def grow(self, weight: torch.Tensor) -> torch.Tensor:
        """`weight` [old_rows, h] with rows up to `rows` appended, each the mean of the old rows."""
        if self.rows == self.old_rows:
            return weight
        mean = weight.float().mean(dim=0, keepdim=True).to(weight.dtype)
        return torch.cat([weight, mean.expand(self.rows - self.old_rows, -1)], dim=0)

    def install(self, out: str) -> str:
        """Write the extended tokenizer into the checkpoints folder `out`; its absolute path."""
        final = os.path.abspath(os.path.join(out, self.name))
        self.write(final)
        return final


def plan_vocab(hf: str, tokenizer: Optional[str], rows: int) -> Optional[VocabPlan]:
    """The plan for `tokenizer` (default: `hf` itself when it holds a tokenizer.json; None when
    there is no tokenizer to read) against an embedding of `rows` rows."""
    from megatron_mm.data.hf_tokenizer import TOKENIZER_FILE
    from megatron_mm.data.tokenizer import extend_sentencepiece, open_tokenizer

    if tokenizer is None:
        if not os.path.exists(os.path.join(hf, TOKENIZER_FILE)):
            return None
        tokenizer = hf
    if not os.path.exists(tokenizer):
        raise ConversionError(f"--tokenizer {tokenizer}: not found")
    try:
        if os.path.isdir(tokenizer):
            opened = open_tokenizer(tokenizer)
            tokens, added, name, write = opened.vocab_size, opened.added, "tokenizer", opened.save
        else:
            with tempfile.TemporaryDirectory() as scratch:  # extended once to count it; written at install
                added = extend_sentencepiece(tokenizer, os.path.join(scratch, "t.model"))
                tokens = open_tokenizer(os.path.join(scratch, "t.model")).vocab_size
            name, write = "tokenizer.model", lambda path: extend_sentencepiece(tokenizer, path)
    except ValueError as err:
        raise ConversionError(str(err)) from None
    return VocabPlan(tokenizer, tokens, added, rows, rows if tokens <= rows else padded_rows(tokens), name, write)
