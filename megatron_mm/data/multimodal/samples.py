"""What both media loaders share: the output sample, the media contract's constants, the
checks on a sample's json, and the count/log of skipped samples.

The media contract: an image reaches the model as float32 [3, S, S], RGB, resized (no
crop), (x/255 - 0.5) / 0.5; audio as a Whisper-style log-mel float32 [80, F]: mono, 16 kHz,
n_fft 400, hop 160, 80 Slaney mel bins over 0-8000 Hz, log10(max(mel, 1e-10)), then
max(x, x.max() - 8), then (x + 4) / 4, then padded with zeros / trimmed to F frames.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional

import torch

from megatron_mm.data.multimodal.conversations import conversation_turns

SAMPLE_RATE = 16000
N_FFT = 400
HOP = 160
MEL_BINS = 80
MEL_FMAX = 8000.0
LOG_FLOOR = 1e-10
DYNAMIC_RANGE = 8.0  # log10 units kept below the clip's maximum
IMAGE_MEAN = IMAGE_STD = 127.5  # default: (x/255 - 0.5) / 0.5 == (x - 127.5) / 127.5 (SigLIP)
# The text side's placeholders (megatron_mm.data.tokenizer IMAGE_TOKEN / AUDIO_TOKEN).
PLACEHOLDERS = {"image": "<image>", "audio": "<audio>"}


@dataclass(frozen=True)
class MediaSpec:
    """Output sizes: images [3, image_size, image_size] as (RGB - image_mean) / image_std
    (0-255 scale), mels [80, mel_frames]."""

    image_size: int = 32  # model.vision.image_size
    mel_frames: int = 100  # model.audio.max_frames (100 frames = 1 s)
    image_mean: tuple[float, float, float] = (IMAGE_MEAN,) * 3  # model.vision.image_mean
    image_std: tuple[float, float, float] = (IMAGE_STD,) * 3  # model.vision.image_std

    def __post_init__(self):
        if self.image_size < 1 or self.mel_frames < 1:
            raise ValueError(f"image_size={self.image_size}, mel_frames={self.mel_frames}: must be >= 1")


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
