"""The text side of a multimodal sample: chat template, placeholder runs, loss mask, packing.

A sample's json (the `json` member of a shard, see `shards.py`) becomes `tokens` and a
`loss_mask` of the same length, where `loss_mask[i] = 1` means token i is a training
target (it is learned from the tokens before it; with labels `tokens[1:]`, use
`loss_mask[1:]`).

* Pretraining `{"text"}`: every text token and the closing end-of-document token are
  learned.
* Instruction `{"conversations"}` (any dialect `conversations.py` reads: human/gpt,
  user/assistant, role/content), rendered with this template (markers are single
  sentencepiece pieces, see `tokenizer.MULTIMODAL_SPECIAL_TOKENS`)::

      [{system} <|end|>] <|user|> {human} <|end|> <|assistant|> {gpt} <|end|> ... </s>

  Only the gpt answers and the `<|end|>` that closes each answer are learned (the model
  must learn where an answer stops); human turns, the role markers and `</s>` are not.
  An opening system turn is context in front of the first marker, closed by `<|end|>` and
  not learned (no piece of its own, so tokenizers without one keep working).
* Each `<image>` / `<audio>` in the text becomes a run of `num_image_tokens` /
  `num_audio_tokens` copies of its placeholder id, never learned. Media without a
  placeholder go first (image before audio). At most one image and one audio a sample.

`SequencePacker` then packs formatted samples greedily, in order, into sequences of
`seq_length + 1` tokens, padded with loss 0, never splitting a sample; a sample longer
than that is skipped and listed in `skipped`, for the caller to log and count.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Collection, Iterable

import numpy as np

from megatron_mm.data.multimodal.conversations import SYSTEM, USER, TurnError, conversation_turns
from megatron_mm.data.tokenizer import (
    ASSISTANT_TOKEN, AUDIO_TOKEN, END_TOKEN, IMAGE_TOKEN, MULTIMODAL_SPECIAL_TOKENS, USER_TOKEN,
    SentencePieceTokenizer, train_sentencepiece,
)

MEDIA_KINDS = ("image", "audio")  # also the order of media that have no placeholder
PLACEHOLDER = {"image": IMAGE_TOKEN, "audio": AUDIO_TOKEN}
_PLACEHOLDER_SPLIT = re.compile(f"({re.escape(IMAGE_TOKEN)}|{re.escape(AUDIO_TOKEN)})")
_KIND_OF = {token: kind for kind, token in PLACEHOLDER.items()}


@dataclass
class FormattedSample:
    tokens: np.ndarray  # int64 [n]
    loss_mask: np.ndarray  # float32 [n], 1 where the token is a target
    media: list[str]  # "image"/"audio", in the order of their placeholder runs

    def __len__(self) -> int:
        return len(self.tokens)


class TextFormatter:
    """Turns one sample's json (+ which media it has) into a `FormattedSample`."""

    def __init__(self, tokenizer: SentencePieceTokenizer, num_image_tokens: int, num_audio_tokens: int):
        if num_image_tokens < 1 or num_audio_tokens < 1:
            raise ValueError(f"num_image_tokens={num_image_tokens}, num_audio_tokens={num_audio_tokens}: "
                             f"must be at least 1")
        self.tokenizer = tokenizer
        self.run_length = {"image": num_image_tokens, "audio": num_audio_tokens}
        self.ids = {kind: tokenizer.special_token_id(token) for kind, token in PLACEHOLDER.items()}
        self.user = tokenizer.special_token_id(USER_TOKEN)
        self.assistant = tokenizer.special_token_id(ASSISTANT_TOKEN)
        self.end = tokenizer.special_token_id(END_TOKEN)

    def format(self, sample: dict, media: Collection[str]) -> FormattedSample:
        """`sample` holds "text" or "conversations"; `media` names the kinds the sample carries."""
        unknown = set(media) - set(MEDIA_KINDS)
        if unknown:
            raise ValueError(f"media {sorted(unknown)}: must be among {MEDIA_KINDS}")
        tokens: list[int] = []
        mask: list[float] = []
        order: list[str] = []

        def emit(ids: list[int], learn: bool) -> None:
            tokens.extend(ids)
            mask.extend([float(learn)] * len(ids))

        def emit_text(text: str, learn: bool) -> None:
            for piece in _PLACEHOLDER_SPLIT.split(text):
                if piece in _KIND_OF:
                    self._emit_media(_KIND_OF[piece], media, order, emit)
                elif piece.strip():
                    emit(self.tokenizer.tokenize(piece), learn)

        if "text" in sample and "conversations" not in sample:
            emit_text(sample["text"], True)
            emit([self.tokenizer.eod], True)
        elif "conversations" in sample and "text" not in sample:
            try:
                turns = conversation_turns(sample["conversations"])
            except TurnError as err:
                raise ValueError(str(err)) from None
            for role, text in turns:
                if role == SYSTEM:
                    emit_text(text, False)
                    emit([self.end], False)
                elif role == USER:
                    emit([self.user], False)
                    emit_text(text, False)
                    emit([self.end], False)
                else:
                    emit([self.assistant], False)
                    emit_text(text, True)
                    emit([self.end], True)
            emit([self.tokenizer.eod], False)
        else:
            raise ValueError(f"sample with keys {sorted(sample)}: needs exactly one of \"text\" or \"conversations\"")
        tokens, mask = self._media_first(media, order, tokens, mask)
        return FormattedSample(np.asarray(tokens, dtype=np.int64), np.asarray(mask, dtype=np.float32), order)

    def _emit_media(self, kind: str, media: Collection[str], order: list[str], emit) -> None:
        if kind not in media:
            raise ValueError(f"the text has {PLACEHOLDER[kind]} but the sample has no {kind}")
        if kind in order:
            raise ValueError(f"the text has more than one {PLACEHOLDER[kind]} (at most one a sample)")
        order.append(kind)
        emit([self.ids[kind]] * self.run_length[kind], False)

    def _media_first(self, media, order, tokens, mask) -> tuple[list[int], list[float]]:
        """Put the runs of media that had no placeholder in front, in MEDIA_KINDS order."""
        first = [kind for kind in MEDIA_KINDS if kind in media and kind not in order]
        head = [self.ids[kind] for kind in first for _ in range(self.run_length[kind])]
        order[:0] = first
        return head + tokens, [0.0] * len(head) + mask


def media_runs(tokens: np.ndarray, placeholder_ids: dict[str, int]) -> list[tuple[str, int, int]]:
    """(kind, start, length) of each maximal run of a placeholder id in `tokens`, in order."""
    kind_of = {token_id: kind for kind, token_id in placeholder_ids.items()}
    runs: list[tuple[str, int, int]] = []
    for i, token in enumerate(np.asarray(tokens).tolist()):
        kind = kind_of.get(token)
        if kind is None:
            continue
        if runs and runs[-1][0] == kind and runs[-1][1] + runs[-1][2] == i:
            runs[-1] = (kind, runs[-1][1], runs[-1][2] + 1)
        else:
            runs.append((kind, i, 1))
    return runs


@dataclass
class PackedSequence:
    tokens: np.ndarray  # int64 [seq_length + 1]
    loss_mask: np.ndarray  # float32 [seq_length + 1], 0 on padding
    segment_ids: np.ndarray  # int32 [seq_length + 1]: 1, 2, ... for the packed samples in order, 0 on padding
    media: list[tuple[Any, str]]  # (sample ref, kind) in the order of the placeholder runs
    samples: list[Any] = field(default_factory=list)  # refs of the packed samples, in order


class SequencePacker:
    """Greedy, in-order packing of formatted samples into `seq_length + 1` token sequences.

    `add` returns the sequences it completed (a sample that does not fit closes the
    current one); `flush` returns the last, partial one. `ref` is whatever identifies a
    sample to the caller (e.g. its shard key); it comes back in `media` and `samples`.
    """

    def __init__(self, seq_length: int, pad_id: int):
        if seq_length < 1:
            raise ValueError(f"seq_length={seq_length}: must be at least 1")
        if pad_id < 0:
            raise ValueError(f"pad_id={pad_id}: must be a token id (the tokenizer has no pad piece?)")
        self.capacity, self.pad_id = seq_length + 1, pad_id
        self.skipped: list[tuple[Any, int]] = []  # (ref, length) of samples longer than capacity
        self._items: list[tuple[Any, FormattedSample]] = []
        self._used = 0

    def add(self, ref: Any, sample: FormattedSample) -> list[PackedSequence]:
        if len(sample) > self.capacity:
            self.skipped.append((ref, len(sample)))
            return []
        done = self.flush() if self._used + len(sample) > self.capacity else []
        self._items.append((ref, sample))
        self._used += len(sample)
        return done

    @property
    def open_refs(self) -> list[Any]:
        """Refs of the samples in the sequence still being filled."""
        return [ref for ref, _ in self._items]

    def flush(self) -> list[PackedSequence]:
        if not self._items:
            return []
        pad = self.capacity - self._used
        packed = PackedSequence(
            tokens=np.concatenate([s.tokens for _, s in self._items] + [np.full(pad, self.pad_id, np.int64)]),
            loss_mask=np.concatenate([s.loss_mask for _, s in self._items] + [np.zeros(pad, np.float32)]),
            media=[(ref, kind) for ref, s in self._items for kind in s.media],
            samples=[ref for ref, _ in self._items],
            segment_ids=np.concatenate([np.full(len(s), i, np.int32) for i, (_, s) in enumerate(self._items, 1)]
                                       + [np.zeros(pad, np.int32)]),
        )
        self._items, self._used = [], 0
        return [packed]


def pack_samples(items: Iterable[tuple[Any, FormattedSample]], seq_length: int,
                 pad_id: int) -> tuple[list[PackedSequence], list[tuple[Any, int]]]:
    """All of `items` packed: (sequences, skipped (ref, length) of samples too long to fit)."""
    packer = SequencePacker(seq_length, pad_id)
    sequences = [packed for ref, sample in items for packed in packer.add(ref, sample)]
    return sequences + packer.flush(), packer.skipped


def sample_texts(sample: dict) -> list[str]:
    """The text of a sample (caption or every turn's value) without media placeholders."""
    if "text" in sample:
        texts = [sample["text"]]
    else:
        texts = [text for _, text in conversation_turns(sample["conversations"])] if "conversations" in sample else []
    return [_PLACEHOLDER_SPLIT.sub(" ", text) for text in texts]


def train_multimodal_tokenizer(samples: Iterable[dict], model_prefix: str, vocab_size: int = 512,
                               byte_fallback: bool = False) -> str:
    """Train a SentencePiece model on the samples' texts with the multimodal special pieces.

    Returns the `.model` path. For the demo set, pass the rows of train.jsonl; a vocab of
    512 matches the tiny model.
    """
    texts = [text for sample in samples for text in sample_texts(sample)]
    return train_sentencepiece(texts, model_prefix, vocab_size, byte_fallback=byte_fallback,
                               special_tokens=MULTIMODAL_SPECIAL_TOKENS)
