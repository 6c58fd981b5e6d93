"""Small deterministic WebDataset shards for the loader tests and `tools/benchmark_data.py`.

Sample i (key `%06d` of i+1) cycles through image+audio, image only, audio only and text
only; images are Pillow-drawn shapes (JPEG, PNG, a grayscale and an RGBA PNG, sizes around
`image_px`, some smaller than the model's so both resize directions are exercised); audio
is a numpy tone written with the stdlib `wave` at 16 kHz or 44.1 kHz, mono or stereo,
0.5-1.5 s long. The procedural training set lives in `demo.py`; this is only for checks.
"""

from __future__ import annotations

import io
import json
import os
import wave

import numpy as np
import webdataset
from PIL import Image, ImageDraw

COLOURS = [(220, 40, 40), (40, 180, 60), (40, 80, 220), (230, 200, 40), (160, 60, 200)]
TONES_HZ = [220.0, 330.0, 440.0, 660.0, 880.0]


def image_bytes(i: int, image_px: int, rng: np.random.Generator) -> tuple[str, bytes]:
    """(ext, encoded image) of a coloured shape on a noisy background."""
    w = max(8, int(image_px * rng.uniform(0.4, 1.5)))
    h = max(8, int(image_px * rng.uniform(0.4, 1.5)))
    background = rng.integers(0, 255, (h, w, 3), dtype=np.uint8) // 4 + 96
    image = Image.fromarray(background)
    draw = ImageDraw.Draw(image)
    box = sorted(rng.integers(0, w, 2).tolist()), sorted(rng.integers(0, h, 2).tolist())
    draw.ellipse((box[0][0], box[1][0], box[0][1] + 2, box[1][1] + 2), fill=COLOURS[i % len(COLOURS)])
    mode, fmt = [("RGB", "JPEG"), ("RGB", "PNG"), ("L", "PNG"), ("RGBA", "PNG")][(i // 4 * 2 + i) % 4]
    buffer = io.BytesIO()
    image.convert(mode).save(buffer, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return ("jpg" if fmt == "JPEG" else "png"), buffer.getvalue()


def wav_bytes(i: int, rng: np.random.Generator) -> bytes:
    """A 16-bit PCM tone with a little noise: 16 kHz or 44.1 kHz, mono or stereo."""
    rate = (16000, 44100)[(i // 2) % 2]
    channels = 1 + (i // 4) % 2
    t = np.arange(int(rate * rng.uniform(0.5, 1.5))) / rate
    tone = 0.3 * np.sin(2 * np.pi * TONES_HZ[i % len(TONES_HZ)] * t) + 0.01 * rng.standard_normal(len(t))
    pcm = (np.repeat(tone[:, None], channels, axis=1) * 32767).astype("<i2")
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(channels)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(pcm.tobytes())
    return buffer.getvalue()


def fixture_sample(i: int, image_px: int = 48, seed: int = 0) -> dict:
    """Sample i as a webdataset dict (`__key__`, `json`, maybe `jpg`/`png` and `wav`)."""
    rng = np.random.default_rng([seed, i])
    kind = i % 4  # 0 image+audio, 1 image, 2 audio, 3 text only
    sample = {"__key__": f"{i + 1:06d}"}
    text = f"sample {i + 1}: shape {i % len(COLOURS)}, tone {i % len(TONES_HZ)}"
    if kind in (0, 1):
        ext, data = image_bytes(i, image_px, rng)
        sample[ext] = data
        text = "<image> " + text
    if kind in (0, 2):
        sample["wav"] = wav_bytes(i, rng)
        text = text + " <audio>" if i % 3 else text  # sometimes no placeholder: media goes first
    sample["json"] = json.dumps({"text": text, "label": i % len(COLOURS)}).encode()
    return sample


def write_shard(path: str, samples: list[dict]) -> str:
    """Write `samples` (webdataset dicts of bytes) as one tar; returns its path."""
    with webdataset.TarWriter(path, encoder=False, mtime=0) as writer:
        for sample in samples:
            writer.write(sample)
    return path


def write_fixture_shards(out: str, n: int, samples_per_shard: int = 16, image_px: int = 48,
                         seed: int = 0) -> list[str]:
    """`n` fixture samples as `shard-000000.tar`, ... in `out`; returns the shard paths."""
    os.makedirs(out, exist_ok=True)
    samples = [fixture_sample(i, image_px, seed) for i in range(n)]
    return [write_shard(os.path.join(out, f"shard-{s // samples_per_shard:06d}.tar"),
                        samples[s:s + samples_per_shard]) for s in range(0, n, samples_per_shard)]
