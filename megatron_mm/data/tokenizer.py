"""SentencePiece training and the tokenizer megatron-core's GPTDataset reads.

`GPTDatasetConfig.tokenizer` is typed `megatron.core.tokenizers.MegatronTokenizerBase`
in megatron-core 0.16.1 (the older `megatron.core.datasets.megatron_tokenizer` class is
`MegatronLegacyTokenizer`, deprecated), so `SentencePieceTokenizer` subclasses that.
"""

from __future__ import annotations

import hashlib
import os
from collections import OrderedDict

import sentencepiece as spm
from megatron.core.tokenizers import MegatronTokenizerBase

UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3

# Multimodal special pieces: media placeholders and the chat template's role markers
# (megatron_mm/data/multimodal/text.py). Trained as sentencepiece user-defined symbols, so
# each is always one piece with its own id, right after the four ids above.
IMAGE_TOKEN = "<image>"
AUDIO_TOKEN = "<audio>"
USER_TOKEN = "<|user|>"
ASSISTANT_TOKEN = "<|assistant|>"
END_TOKEN = "<|end|>"
MULTIMODAL_SPECIAL_TOKENS = (IMAGE_TOKEN, AUDIO_TOKEN, USER_TOKEN, ASSISTANT_TOKEN, END_TOKEN)


def _training_lines(texts: list[str]) -> list[str]:
    """SentencePiece trains on lines: split documents on newlines, drop blank ones."""
    return [line for text in texts for line in text.splitlines() if line.strip()]


def train_sentencepiece(
    texts: list[str], model_prefix: str, vocab_size: int, byte_fallback: bool = False,
    special_tokens: tuple[str, ...] = (),
) -> str:
    """Train a BPE SentencePiece model on `texts`; return the path of `<model_prefix>.model`.

    Deterministic: one thread, no sentence sampling or shuffling. `vocab_size` is an upper
    bound (`hard_vocab_limit=False`), so a small corpus gives a smaller vocabulary. Ids
    0-3 are unk, bos, eos (the end-of-document token) and pad; `special_tokens` (e.g.
    `MULTIMODAL_SPECIAL_TOKENS`) follow as user-defined symbols, each always one piece.
    """
    lines = _training_lines(texts)
    if not lines:
        raise ValueError("train_sentencepiece: no non-empty text to train on")
    folder = os.path.dirname(model_prefix)
    if folder:
        os.makedirs(folder, exist_ok=True)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines),
            model_prefix=model_prefix,
            vocab_size=vocab_size,
            model_type="bpe",
            hard_vocab_limit=False,
            character_coverage=1.0,
            byte_fallback=byte_fallback,
            split_digits=True,
            num_threads=1,
            input_sentence_size=0,
            shuffle_input_sentence=False,
            max_sentence_length=1 << 16,
            unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID, pad_id=PAD_ID,
            user_defined_symbols=list(special_tokens),
            minloglevel=2,
        )
    except RuntimeError as err:
        raise ValueError(f"sentencepiece training with vocab_size={vocab_size} failed: {err}") from err
    return model_prefix + ".model"


def extend_sentencepiece(model_path: str, out_path: str,
                         special_tokens: tuple[str, ...] = MULTIMODAL_SPECIAL_TOKENS) -> list[str]:
    """Write `model_path` to `out_path` with the `special_tokens` it lacks appended as
    user-defined pieces (each then always one piece, with the next free id), and a `<pad>`
    control piece if it has no pad (multimodal packing pads). Returns the pieces added.

    The model is read as sentencepiece's ModelProto (protobuf data, nothing executed); its
    other pieces and ids are unchanged, so text without the new pieces encodes as before.
    A model without an end-of-sequence piece is refused (it ends every document).
    """
    from sentencepiece import sentencepiece_model_pb2

    if not os.path.isfile(model_path):
        raise ValueError(f"tokenizer {model_path}: file not found")
    proto = sentencepiece_model_pb2.ModelProto()
    try:
        with open(model_path, "rb") as f:
            proto.ParseFromString(f.read())
    except Exception as err:  # protobuf's DecodeError, or anything a stranger's bytes provoke
        raise ValueError(f"tokenizer {model_path}: not a sentencepiece model ({type(err).__name__})") from None
    if not proto.pieces:
        raise ValueError(f"tokenizer {model_path}: not a sentencepiece model (no pieces)")
    piece_type = sentencepiece_model_pb2.ModelProto.SentencePiece
    have = {p.piece for p in proto.pieces}
    if not 0 <= proto.trainer_spec.eos_id < len(proto.pieces):
        raise ValueError(f"tokenizer {model_path}: has no end-of-sequence piece (eos_id="
                         f"{proto.trainer_spec.eos_id}); it is needed to end each document")
    added = []
    for token in special_tokens:
        if token not in have:
            piece = proto.pieces.add()
            piece.piece, piece.score, piece.type = token, 0.0, piece_type.USER_DEFINED
            added.append(token)
    if not 0 <= proto.trainer_spec.pad_id < len(proto.pieces) - len(added):
        pad = next((t for t in ("<pad>", "<|pad|>", "<mm_pad>") if t not in have), None)
        piece = proto.pieces.add()
        piece.piece, piece.score, piece.type = pad, 0.0, piece_type.CONTROL
        proto.trainer_spec.pad_id = len(proto.pieces) - 1
        added.append(pad)
    folder = os.path.dirname(out_path)
    if folder:
        os.makedirs(folder, exist_ok=True)
    with open(out_path, "wb") as f:
        f.write(proto.SerializeToString())
    try:
        spm.SentencePieceProcessor(model_file=out_path)
    except (RuntimeError, OSError) as err:
        raise ValueError(f"tokenizer {model_path}: sentencepiece cannot load it once extended ({err})") from None
    return added


def _file_md5(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.md5(f.read(), usedforsecurity=False).hexdigest()


class SentencePieceTokenizer(MegatronTokenizerBase):
    """A SentencePiece `.model` with the interface megatron-core's datasets use.

    The end-of-document token `eod` is SentencePiece's eos; `pad` is -1 for a model
    trained without a pad piece (megatron-core then pads with an id that never occurs).
    """

    def __init__(self, model_path: str):
        if not os.path.isfile(model_path):
            raise FileNotFoundError(f"sentencepiece model {model_path}: not found")
        super().__init__(model_path, {})  # sets self.path
        self._sp = spm.SentencePieceProcessor(model_file=model_path)
        if self._sp.eos_id() < 0:
            raise ValueError(f"sentencepiece model {model_path}: has no eos piece to use as end of document")
        self._vocab = {self._sp.id_to_piece(i): i for i in range(self._sp.get_piece_size())}
        self._inv_vocab = {i: piece for piece, i in self._vocab.items()}
        # Keys GPTDataset's cache hash; the file content, not its path, identifies the tokenizer.
        self.unique_identifiers = OrderedDict(
            [("class", type(self).__name__), ("model_md5", _file_md5(model_path))]
        )

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def vocab(self) -> dict[str, int]:
        return self._vocab

    @property
    def inv_vocab(self) -> dict[int, str]:
        return self._inv_vocab

    @property
    def eod(self) -> int:
        return self._sp.eos_id()

    @property
    def eos(self) -> int:
        return self._sp.eos_id()

    @property
    def bos(self) -> int:
        return self._sp.bos_id()

    @property
    def pad(self) -> int:
        return self._sp.pad_id()

    def special_token_id(self, piece: str) -> int:
        """The id of a special piece such as `IMAGE_TOKEN`; an error if the model lacks it."""
        token_id = self._vocab.get(piece)
        if token_id is None:
            raise ValueError(f"sentencepiece model {self.path}: has no {piece!r} piece; train it with "
                             f"special_tokens={MULTIMODAL_SPECIAL_TOKENS} (see multimodal.text)")
        return token_id

    @property
    def special_ids(self) -> dict[str, int]:
        """Ids of the multimodal special pieces this model has (placeholders, chat markers)."""
        return {piece: self._vocab[piece] for piece in MULTIMODAL_SPECIAL_TOKENS if piece in self._vocab}

    def tokenize(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def detokenize(self, ids: list[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

    def apply_chat_template(self, *args, **kwargs):
        raise NotImplementedError("SentencePieceTokenizer is for pretraining; it has no chat template")


def open_tokenizer(path: str):
    """The tokenizer `data.tokenizer` names: a sentencepiece `.model` file, or a Hugging Face
    tokenizer folder (`tokenizer.json`; `hf_tokenizer.HFTokenizer`), which gets the multimodal
    pieces it lacks as special tokens."""
    if os.path.isdir(path):
        from megatron_mm.data.hf_tokenizer import HFTokenizer

        return HFTokenizer(path, MULTIMODAL_SPECIAL_TOKENS)
    return SentencePieceTokenizer(path)


def check_fits(tokenizer, vocab_size: int) -> None:
    """Refuse, in one line, a tokenizer with ids past the model's embedding rows (they would fail
    deep inside the embedding lookup). Called where a run opens its data, right after the model's
    config is known and before it is built or a checkpoint is loaded (`training.step_data.StepData`
    for multimodal sources, `data.build_datasets` for text ones)."""
    from megatron_mm.config import ConfigError

    if tokenizer.vocab_size > vocab_size:
        raise ConfigError([f"data.tokenizer={tokenizer.path}: has {tokenizer.vocab_size} tokens, more than "
                           f"model.vocab_size={vocab_size} (the model's embedding rows); set model.vocab_size to at "
                           f"least {tokenizer.vocab_size} (tools/convert_from_hf.py grows an imported model's)"])
