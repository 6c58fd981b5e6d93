"""What both media loaders share: the output sample, the media contract's constants, the
checks on a sample's json, and the count/log of skipped samples.

The media contract: an image reaches the model as float32 [3, S, S] as transformers'
SiglipImageProcessor / CLIPImageProcessor would make it (`image_spec.py`); audio as
WhisperFeatureExtractor's log-mel float32 [M, F]: mono, 16 kHz, the waveform zero-padded or
trimmed to F * 160 samples, a centred STFT (n_fft 400, hop 160, periodic Hann, reflect padding)
whose last frame is dropped, M Slaney mel bins over 0-8000 Hz (80, or 128 for large-v3),
log10(max(mel, 1e-10)), then max(x, x.max() - 8) over the whole window, then (x + 4) / 4.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional

import torch

from megatron_mm.data.multimodal.conversations import conversation_turns
from megatron_mm.data.multimodal.image_spec import ImageSpec

SAMPLE_RATE = 16000
N_FFT = 400
HOP = 160
MEL_BINS = 80
MEL_FMAX = 8000.0
LOG_FLOOR = 1e-10
DYNAMIC_RANGE = 8.0  # log10 units kept below the clip's maximum
# The text side's placeholders (megatron_mm.data.tokenizer IMAGE_TOKEN / AUDIO_TOKEN).
PLACEHOLDERS = {"image": "<image>", "audio": "<audio>"}


@dataclass(frozen=True)
class MediaSpec:
    """What the loaders output: images [3, S, S] as `image` says (S = image.out_size,
    model.vision.image_size and .preprocess), log-mels [mel_bins, mel_frames]
    (model.audio.num_mel_bins, .max_frames)."""

    image: ImageSpec = ImageSpec()
    mel_frames: int = 100  # 100 frames = 1 s
    mel_bins: int = MEL_BINS

    def __post_init__(self):
        if self.mel_frames < 1 or self.mel_bins < 1:
            raise ValueError(f"mel_frames={self.mel_frames}, mel_bins={self.mel_bins}: must be >= 1")

    @property
    def image_size(self) -> int:
        return self.image.out_size


class MediaSample(NamedTuple):
    """One decoded sample; `image`/`mel` are None when the sample has none."""

    key: str
    meta: dict
    image: Optional[torch.Tensor]
    mel: Optional[torch.Tensor]


def _texts(meta) -> list[str]:
    """Every text of the json (caption or conversation turns); ValueError naming what is wrong."""
    if not isinstance(meta, dict):
        raise ValueError(f"json is a {type(meta).__name__}, not an object")
    if "text" in meta:
        texts = [meta["text"]]
    elif "conversations" in meta:
        return [text for _, text in conversation_turns(meta["conversations"])]  # a TurnError is a ValueError
    else:
        raise ValueError('json has neither "text" nor a non-empty "conversations" list')
    for text in texts:
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"empty caption ({text!r})")
    return texts


def parse_meta(raw: bytes, has_image: bool, has_audio: bool) -> dict:
    """The sample's json, checked against its media; ValueError with the reason to skip it."""
    try:
        meta = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"json does not parse ({err})") from None
    texts = _texts(meta)
    for kind, present in (("image", has_image), ("audio", has_audio)):
        count = sum(text.count(PLACEHOLDERS[kind]) for text in texts)
        if count > 1:
            raise ValueError(f"{count} {PLACEHOLDERS[kind]} placeholders (at most one a sample)")
        if count and not present:
            raise ValueError(f"the text has {PLACEHOLDERS[kind]} but the sample has no {kind} member")
    return meta


class SkipLog:
    """Counts skipped samples (the trainer's `data_skipped`) and logs each bad sample once."""

    def __init__(self, log: Callable[[str], None] = print):
        self.log, self.skipped, self._seen = log, 0, set()

    def __call__(self, key: str, shard: str, reason: str) -> None:
        self.skipped += 1
        if (shard, key) not in self._seen:
            self._seen.add((shard, key))
            self.log(f"data: skipped sample {key} in {shard}: {reason}")
