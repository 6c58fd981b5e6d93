"""Renderers for the procedural demo set: coloured shapes (PIL) and tones/chords (numpy).

Every random choice comes from the `random.Random` passed in, so a render is fixed by the
generator's seed. Attribute names (shapes, colours, placements, pitches, ...) are the
vocabulary of the captions and of the held-out labels in `demo.py`.
"""

from __future__ import annotations

import random

import numpy as np
import soundfile
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "cross")
COLOURS = {"red": (220, 50, 50), "green": (60, 190, 70), "blue": (60, 90, 235), "yellow": (235, 215, 50)}
# Where the shape sits: one shape at one of five places, or two shapes side by side.
PLACEMENTS = {
    "left": [(0.25, 0.5)], "right": [(0.75, 0.5)], "top": [(0.5, 0.25)], "bottom": [(0.5, 0.75)],
    "center": [(0.5, 0.5)], "left and right": [(0.25, 0.5), (0.75, 0.5)],
    "top and bottom": [(0.5, 0.25), (0.5, 0.75)],
}

SAMPLE_RATE = 16000
PITCHES = {"low": 220.0, "medium": 440.0, "high": 880.0}  # A3, A4, A5
SOUNDS = ("tone", "chord")  # a chord is the major triad on the pitch
VOLUMES = {"quiet": 0.15, "loud": 0.6}  # peak amplitude before jitter
FADE_S = 0.01  # linear fade in and out, so a tone starts and stops without a click


def _jitter_colour(rgb: tuple[int, int, int], rng: random.Random) -> tuple[int, ...]:
    return tuple(min(255, max(0, c + rng.randint(-15, 15))) for c in rgb)


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill) -> None:
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        s = 0.85 * r
        draw.rectangle([cx - s, cy - s, cx + s, cy + s], fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + 0.8 * r), (cx + r, cy + 0.8 * r)], fill=fill)
    elif shape == "cross":
        w = 0.35 * r
        draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=fill)
        draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=fill)
    else:
        raise ValueError(f"shape={shape!r}: must be one of {SHAPES}")


def render_image(shape: str, colour: str, placement: str, size: int, rng: random.Random) -> Image.Image:
    """An RGB `size`x`size` image of one or two `colour` `shape`s at `placement` on a dark background.

    A render varies the background shade, the colour (±15 a channel), the size (±15 %)
    and the position (±size/16).
    """
    background = tuple(rng.randint(0, 12) for _ in range(3))
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    centres = PLACEMENTS[placement]
    fill = _jitter_colour(COLOURS[colour], rng)
    radius = size * (0.17 if len(centres) == 1 else 0.13) * rng.uniform(0.85, 1.15)
    for fx, fy in centres:
        cx = fx * size + rng.uniform(-1.0, 1.0) * size / 16
        cy = fy * size + rng.uniform(-1.0, 1.0) * size / 16
        _draw_shape(draw, shape, cx, cy, radius, fill)
    return image


def render_audio(pitch: str, sound: str, volume: str, rng: random.Random) -> np.ndarray:
    """A mono float32 waveform at `SAMPLE_RATE`: a `pitch` tone or major chord, 0.6-1.0 s.

    A render varies the pitch (±half a semitone), the phases, the duration, the level
    (±15 %) and adds faint white noise.
    """
    f0 = PITCHES[pitch] * 2.0 ** (rng.uniform(-0.5, 0.5) / 12)
    if sound == "tone":
        freqs = [f0]
    elif sound == "chord":
        freqs = [f0, f0 * 2.0 ** (4 / 12), f0 * 2.0 ** (7 / 12)]
    else:
        raise ValueError(f"sound={sound!r}: must be one of {SOUNDS}")
    n = int(rng.uniform(0.6, 1.0) * SAMPLE_RATE)
    t = np.arange(n) / SAMPLE_RATE
    wave = sum(np.sin(2 * np.pi * f * t + rng.uniform(0, 2 * np.pi)) for f in freqs) / len(freqs)
    fade = min(int(FADE_S * SAMPLE_RATE), n // 2)
    envelope = np.ones(n)
    envelope[:fade] = np.linspace(0.0, 1.0, fade)
    envelope[n - fade:] = np.linspace(1.0, 0.0, fade)
    noise = np.random.default_rng(rng.getrandbits(32)).normal(0.0, 0.003, n)
    level = VOLUMES[volume] * rng.uniform(0.85, 1.15)
    return (wave * envelope * level + noise).astype(np.float32)


def save_image(image: Image.Image, path: str) -> None:
    """PNG (lossless) or JPEG (quality 95, no chroma subsampling), by the path's extension."""
    if path.endswith(".png"):
        image.save(path, format="PNG")
    elif path.endswith(".jpg"):
        image.save(path, format="JPEG", quality=95, subsampling=0)  # 4:4:4 keeps small shapes saturated
    else:
        raise ValueError(f"{path}: image path must end in .png or .jpg")


def save_audio(wave: np.ndarray, path: str) -> None:
    """16-bit PCM WAV or FLAC at `SAMPLE_RATE`, by the path's extension."""
    if path.endswith(".wav"):
        audio_format = "WAV"
    elif path.endswith(".flac"):
        audio_format = "FLAC"
    else:
        raise ValueError(f"{path}: audio path must end in .wav or .flac")
    soundfile.write(path, wave, SAMPLE_RATE, subtype="PCM_16", format=audio_format)
