"""A Hugging Face tokenizer folder as the tokenizer of our data path.

A folder with `tokenizer.json` (the `tokenizers` library's file: pure JSON, nothing in it runs,
so a stranger's folder is safe to read; no `trust_remote_code` anywhere) and optionally
`tokenizer_config.json` / `special_tokens_map.json`, which name the end-of-sequence, beginning
and pad tokens. DeepSeek-V3's release folder is of this kind.

Our multimodal pieces (`tokenizer.MULTIMODAL_SPECIAL_TOKENS`: the `<image>`/`<audio>`
placeholders and the chat markers), and `<pad>` when the folder names no pad token, are added as
special tokens when the folder lacks them, in that fixed order after the folder's largest id, so
every process that opens the same folder gets the same ids. `tools/convert_from_hf.py` writes the extended folder (`save`) beside the
checkpoint it makes and grows the model's embedding to the new vocabulary.

Written by hand because megatron-core 0.16.1's `HuggingFaceTokenizer` goes through
`AutoTokenizer` (which may pick a class from the folder and needs `transformers` at data time)
and has no way to add our pieces; this is the few lines of `tokenizers` that our
`MegatronTokenizerBase` interface needs.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import OrderedDict
from typing import Optional

from megatron.core.tokenizers import MegatronTokenizerBase

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILES = ("tokenizer_config.json", "special_tokens_map.json")
PAD_TOKEN = "<pad>"  # added when the folder names no pad token


def _token_text(value) -> Optional[str]:
    """A special-token entry of tokenizer_config.json: a string or {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def _read_special(folder: str) -> dict[str, Optional[str]]:
    """eos/bos/pad token texts from the folder's config files (tokenizer_config.json wins)."""
    found: dict[str, Optional[str]] = {}
    for name in reversed(CONFIG_FILES):
        path = os.path.join(folder, name)
        if not os.path.exists(path):
            continue
        try:
            with open(path, encoding="utf-8") as f:
                config = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"tokenizer {path}: not valid JSON ({err})") from None
        for key in ("eos_token", "bos_token", "pad_token"):
            text = _token_text(config.get(key)) if isinstance(config, dict) else None
            if text:
                found[key] = text
    return found


class HFTokenizer(MegatronTokenizerBase):
    """`folder/tokenizer.json` through `tokenizers`, with `special_tokens` added when missing.

    `eod` (end of document) is the folder's `eos_token`; `pad` its `pad_token`, or, when it
    names none, `<pad>` (added if missing, as `extend_sentencepiece` adds one: multimodal
    packing pads, and megatron-core's GPTDataset warns when pad is another special id). Text
    is encoded without the post-processor's BOS/EOS (as our sentencepiece path: the formatter
    places the document and chat markers itself).
    """

    def __init__(self, folder: str, special_tokens: tuple[str, ...] = ()):
        from tokenizers import AddedToken, Tokenizer

        path = os.path.join(folder, TOKENIZER_FILE)
        if not os.path.isfile(path):
            raise ValueError(f"tokenizer {folder}: no {TOKENIZER_FILE} (a Hugging Face tokenizer folder needs one; "
                             f"a sentencepiece tokenizer is a .model file)")
        super().__init__(folder, {})  # sets self.path
        try:
            self._tok = Tokenizer.from_file(path)
        except Exception as err:  # tokenizers raises its own Exception for a malformed file
            raise ValueError(f"tokenizer {path}: not a tokenizers file ({str(err).splitlines()[0]})") from None
        have = self._tok.get_vocab(with_added_tokens=True)
        special = _read_special(folder)
        pad = special.get("pad_token")
        if pad is None:  # multimodal packing pads; megatron-core's datasets want a pad of its own
            pad = PAD_TOKEN
        self.added = [t for t in (*special_tokens, pad) if t not in have]
        # One at a time: each gets the next id after the largest (tokenizers fills holes otherwise).
        for token in self.added:
            self._tok.add_special_tokens([AddedToken(token, special=True, normalized=False)])
        self._vocab = self._tok.get_vocab(with_added_tokens=True)
        self._inv_vocab = {i: t for t, i in self._vocab.items()}
        eos = special.get("eos_token")
        if eos is None or eos not in self._vocab:
            raise ValueError(f"tokenizer {folder}: names no end-of-sequence token in its vocabulary "
                             f"(eos_token={eos!r} in {' / '.join(CONFIG_FILES)}); it is needed to end each document")
        self._eos = self._vocab[eos]
        self._bos = self._vocab.get(special.get("bos_token") or "", -1)
        self._pad = self._vocab[pad]
        with open(path, "rb") as f:
            digest = hashlib.md5(f.read(), usedforsecurity=False).hexdigest()
        # Keys GPTDataset's cache hash: the file's content and what was added, not its path.
        self.unique_identifiers = OrderedDict([("class", type(self).__name__), ("tokenizer_md5", digest),
                                               ("added", ",".join(self.added))])

    @property
    def vocab_size(self) -> int:
        """Rows an embedding needs: the largest id + 1 (added tokens included)."""
        return max(self._vocab.values()) + 1

    @property
    def vocab(self) -> dict[str, int]:
        return self._vocab

    @property
    def inv_vocab(self) -> dict[int, str]:
        return self._inv_vocab

    @property
    def eod(self) -> int:
        return self._eos

    @property
    def eos(self) -> int:
        return self._eos

    @property
    def bos(self) -> int:
        return self._bos

    @property
    def pad(self) -> int:
        return self._pad

    def special_token_id(self, piece: str) -> int:
        token_id = self._vocab.get(piece)
        if token_id is None:
            raise ValueError(f"tokenizer {self.path}: has no {piece!r} token")
        return token_id

    def tokenize(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def detokenize(self, ids: list[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def save(self, out: str) -> None:
        """Write the folder with the added tokens: `tokenizer.json` (which `AutoTokenizer` and
        this class read) and the folder's config files, the pad token named in them."""
        os.makedirs(out, exist_ok=True)
        self._tok.save(os.path.join(out, TOKENIZER_FILE))
        for name in CONFIG_FILES:
            source = os.path.join(self.path, name)
            config = json.load(open(source, encoding="utf-8")) if os.path.exists(source) else None
            if isinstance(config, dict) or name == CONFIG_FILES[0]:
                config = dict(config or {}, pad_token=self._inv_vocab[self._pad])
                with open(os.path.join(out, name), "w", encoding="utf-8") as f:
                    json.dump(config, f, indent=2, ensure_ascii=False)

    def apply_chat_template(self, *args, **kwargs):
        raise NotImplementedError("HFTokenizer is for our data path; it has no chat template")
