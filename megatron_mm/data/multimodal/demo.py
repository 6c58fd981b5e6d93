"""The procedural multimodal demo set: captioned shapes and tones, generated, no downloads.

`make_demo_data(out, n, seed)` writes

* `out/train.jsonl` (n rows), `out/heldout.jsonl` and `out/novel.jsonl`, in the seed JSONL formats that
  `tools/build_shards.py` reads: pretraining `{"text", "image"?, "audio"?}` and
  instruction `{"conversations": [{"from": "human"|"gpt", "value"}], "image"?, "audio"?}`,
  media paths relative to `out`. Every row also has `"task"` and, when it has media,
  `"label"`: `shape`, `colour`, `position`, `count` for an image; `pitch`, `sound`,
  `volume` for audio (both sets of keys for a sample with both). An evaluator scores a
  held-out answer against them (`TASK_LABEL` says which key a question task asks for).
* `out/media/{train,heldout,novel}/`: PNG or JPEG shapes (`image_size` square, default 32) and
  16 kHz mono 16-bit WAV or FLAC tones/chords of 0.6-1.0 s.

Train rows are images (40 %), audio (30 %), both (10 %) and text-only sentences from the
built-in corpus (20 %, one sentence each); 30 % of the media rows are instruction questions.
Held-out and novel rows have media only. Held-out rows are new renders (their own random
stream: other sizes, positions, colour jitter, phases) of the attribute combinations the train
rows use; novel rows are attribute combinations no train row has: image (shape, colour,
placement) and audio (pitch, sound, volume) triples are split by fixed rules
(`image_is_heldout`, `audio_is_heldout`) so that every shape, colour, placement, pitch, sound
and volume, and every shape-colour pair, is still seen in training.
Everything is fixed by `seed` (`random.Random`, numpy's PCG64 for noise).
"""

from __future__ import annotations

import itertools
import json
import os
import random
import time
from typing import Callable, Optional

from megatron_mm.data.corpus import TEMPLATES
from megatron_mm.data.multimodal.demo_media import (
    COLOURS, PITCHES, PLACEMENTS, SHAPES, SOUNDS, VOLUMES, render_audio, render_image, save_audio,
    save_image,
)
from megatron_mm.data.tokenizer import AUDIO_TOKEN, IMAGE_TOKEN

TRAIN_KINDS = {"image": 0.4, "audio": 0.3, "image_audio": 0.1, "text": 0.2}
HELDOUT_KINDS = {"image": 0.5, "audio": 0.4, "image_audio": 0.1}
INSTRUCTION_FRACTION = 0.3
JPEG_FRACTION = 0.25  # the rest PNG
FLAC_FRACTION = 0.25  # the rest WAV
MIN_IMAGE_SIZE = 16

WHERE = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom",
         "center": "in the center", "left and right": "on the left and right",
         "top and bottom": "at the top and bottom"}
PLURAL = {"circle": "circles", "square": "squares", "triangle": "triangles", "cross": "crosses"}
# Question tasks: (task, question, label key the answer states).
IMAGE_QUESTIONS = [("image_shape", "What shape is this?", "shape"),
                   ("image_colour", "What colour is the shape?", "colour"),
                   ("image_position", "Where is the shape?", "position"),
                   ("image_describe", "Describe the image.", None)]
AUDIO_QUESTIONS = [("audio_pitch", "Is this sound low, medium or high?", "pitch"),
                   ("audio_sound", "Is this a tone or a chord?", "sound"),
                   ("audio_describe", "Describe the sound.", None)]
TASK_LABEL = {task: key for task, _, key in IMAGE_QUESTIONS + AUDIO_QUESTIONS if key}


def image_is_heldout(shape: str, colour: str, placement: str) -> bool:
    """One placement per shape-colour pair is held out (16 of 112 combinations)."""
    index = SHAPES.index(shape) + list(COLOURS).index(colour) + list(PLACEMENTS).index(placement)
    return index % len(PLACEMENTS) == 0


def audio_is_heldout(pitch: str, sound: str, volume: str) -> bool:
    """4 of the 12 (pitch, sound, volume) combinations, at most one volume per (pitch, sound)."""
    index = list(PITCHES).index(pitch) + SOUNDS.index(sound) + list(VOLUMES).index(volume)
    return index % len(PITCHES) == 0


def _combos(attributes: tuple, is_heldout: Callable[..., bool], heldout: bool) -> list[tuple]:
    return [c for c in itertools.product(*attributes) if is_heldout(*c) == heldout]


def image_label(shape: str, colour: str, placement: str) -> dict:
    return {"shape": shape, "colour": colour, "position": placement, "count": len(PLACEMENTS[placement])}


def audio_label(pitch: str, sound: str, volume: str) -> dict:
    return {"pitch": pitch, "sound": sound, "volume": volume}


def describe_image(label: dict) -> str:
    if label["count"] == 1:
        return f"a {label['colour']} {label['shape']} {WHERE[label['position']]}"
    return f"two {label['colour']} {PLURAL[label['shape']]} {WHERE[label['position']]}"


def describe_audio(label: dict) -> str:
    return f"a {label['volume']} {label['pitch']} {label['sound']}"


def answer(label: dict, key: Optional[str], describe: Callable[[dict], str]) -> str:
    if key is None:
        return describe(label) + "."
    if key == "shape":
        return ("a " + label["shape"] if label["count"] == 1 else "two " + PLURAL[label["shape"]]) + "."
    if key == "position":
        return WHERE[label["position"]] + "."
    if key == "sound":
        return "a " + label["sound"] + "."
    return label[key] + "."


# Caption templates; "{d}." has no placeholder, so its media goes first.
IMAGE_CAPTIONS = ["{p} {d}.", "{p} this is {d}.", "{p} a picture of {d}.", "{d}."]
AUDIO_CAPTIONS = ["{p} {d}.", "{p} the sound of {d}.", "{d}."]


class _SplitWriter:
    """Renders one split's samples into rows and media files."""

    def __init__(self, out: str, split: str, seed: int, image_size: int):
        self.out, self.split, self.image_size = out, split, image_size
        self.rng = random.Random(f"megatron_mm-demo-{seed}-{split}")
        heldout = split == "novel"  # unseen combinations; "heldout" re-renders the train ones
        self.image_combos = _combos((SHAPES, tuple(COLOURS), tuple(PLACEMENTS)), image_is_heldout, heldout)
        self.audio_combos = _combos((tuple(PITCHES), SOUNDS, tuple(VOLUMES)), audio_is_heldout, heldout)
        os.makedirs(os.path.join(out, "media", split), exist_ok=True)

    def _media_path(self, index: int, ext: str) -> str:
        return f"media/{self.split}/{index:07d}.{ext}"

    def _image(self, index: int) -> tuple[str, dict]:
        combo = self.rng.choice(self.image_combos)
        path = self._media_path(index, "jpg" if self.rng.random() < JPEG_FRACTION else "png")
        save_image(render_image(*combo, self.image_size, self.rng), os.path.join(self.out, path))
        return path, image_label(*combo)

    def _audio(self, index: int) -> tuple[str, dict]:
        combo = self.rng.choice(self.audio_combos)
        path = self._media_path(index, "flac" if self.rng.random() < FLAC_FRACTION else "wav")
        save_audio(render_audio(*combo, self.rng), os.path.join(self.out, path))
        return path, audio_label(*combo)

    def _question(self, placeholder: str, questions: list, label: dict, describe) -> dict:
        task, question, key = self.rng.choice(questions)
        return {"conversations": [{"from": "human", "value": f"{placeholder}\n{question}"},
                                  {"from": "gpt", "value": answer(label, key, describe)}],
                "task": task}

    def sample(self, index: int, kind: str) -> dict:
        """One JSONL row of `kind` (image, audio, image_audio or text); writes its media."""
        rng = self.rng
        if kind == "text":
            return {"text": rng.choice(TEMPLATES)(rng), "task": "text"}
        if kind == "image_audio":
            image, ilabel = self._image(index)
            audio, alabel = self._audio(index)
            if rng.random() < 0.75:
                text = f"{IMAGE_TOKEN} {describe_image(ilabel)}. {AUDIO_TOKEN} {describe_audio(alabel)}."
            else:
                text = f"{describe_image(ilabel)}. {describe_audio(alabel)}."
            return {"text": text, "image": image, "audio": audio, "task": "image_audio_caption",
                    "label": {**ilabel, **alabel}}
        if kind == "image":
            path, label = self._image(index)
            placeholder, questions, describe, captions = IMAGE_TOKEN, IMAGE_QUESTIONS, describe_image, IMAGE_CAPTIONS
        elif kind == "audio":
            path, label = self._audio(index)
            placeholder, questions, describe, captions = AUDIO_TOKEN, AUDIO_QUESTIONS, describe_audio, AUDIO_CAPTIONS
        else:
            raise ValueError(f"sample kind {kind!r}: must be image, audio, image_audio or text")
        if rng.random() < INSTRUCTION_FRACTION:
            row = self._question(placeholder, questions, label, describe)
        else:
            caption = rng.choice(captions).format(p=placeholder, d=describe(label))
            row = {"text": caption, "task": f"{kind}_caption"}
        return {**row, kind: path, "label": label}

    def kind(self, weights: dict[str, float]) -> str:
        return self.rng.choices(list(weights), weights=list(weights.values()))[0]


def _write_split(out: str, split: str, count: int, seed: int, image_size: int, kinds: dict,
                 log: Callable[[str], None]) -> dict:
    writer = _SplitWriter(out, split, seed, image_size)
    stats = {"rows": 0, "image": 0, "audio": 0, "text_only": 0, "instruction": 0}
    with open(os.path.join(out, f"{split}.jsonl"), "w", encoding="utf-8") as f:
        for index in range(count):
            row = writer.sample(index, writer.kind(kinds))
            f.write(json.dumps(row) + "\n")
            stats["rows"] += 1
            stats["image"] += "image" in row
            stats["audio"] += "audio" in row
            stats["text_only"] += "image" not in row and "audio" not in row
            stats["instruction"] += "conversations" in row
            if (index + 1) % 500 == 0 or index + 1 == count:
                log(f"{split}: {index + 1}/{count} samples")
    return stats


def make_demo_data(out: str, n: int, seed: int, heldout: Optional[int] = None, image_size: int = 32,
                   log: Callable[[str], None] = lambda message: None) -> dict:
    """Write the demo set into `out` (see the module docstring); return the summary.

    `heldout` (the size of the held-out and of the novel split) defaults to n // 10 (at least 1).
    `out` must not already hold a demo set.
    """
    heldout = max(1, n // 10) if heldout is None else heldout
    if n < 1:
        raise ValueError(f"n={n}: must be at least 1")
    if heldout < 0:
        raise ValueError(f"heldout={heldout}: must be at least 0")
    if image_size < MIN_IMAGE_SIZE:
        raise ValueError(f"image_size={image_size}: must be at least {MIN_IMAGE_SIZE}")
    existing = [name for name in ("train.jsonl", "heldout.jsonl", "novel.jsonl", "media") if os.path.exists(os.path.join(out, name))]
    if existing:
        raise ValueError(f"out={out}: already holds {', '.join(existing)}; remove them or pick another folder")
    start = time.perf_counter()
    os.makedirs(out, exist_ok=True)
    summary = {"out": out, "seed": seed, "image_size": image_size}
    for split, count, kinds in (("train", n, TRAIN_KINDS), ("heldout", heldout, HELDOUT_KINDS),
                                ("novel", heldout, HELDOUT_KINDS)):
        summary[split] = _write_split(out, split, count, seed, image_size, kinds, log)
    summary["seconds"] = round(time.perf_counter() - start, 3)
    return summary
