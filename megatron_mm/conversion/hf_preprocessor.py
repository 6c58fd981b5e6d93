"""The preprocessing settings of a Hugging Face encoder folder, from its preprocessor_config.json.

`image_preprocess_from_hf` fills `model.vision.preprocess` from a SigLIP or CLIP folder;
`audio_features_from_hf` reads a Whisper folder's feature settings. What the loaders cannot do as
the named processor does is refused in one line (`ConversionError`). The JSON is read as data
(`json.load`): no processor class is instantiated from a stranger's folder. A key the file leaves
out takes the value of the processor class (transformers 5.x `SiglipImageProcessor`,
`CLIPImageProcessor`, `WhisperFeatureExtractor`), listed in `_DEFAULTS` below; tests/test_processors.py
checks the result against those classes loaded from the same file.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

from megatron_mm.config import ImagePreprocessConfig
from megatron_mm.conversion.dcp import ConversionError

FILE = "preprocessor_config.json"
_OPENAI_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
_OPENAI_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
# The class attributes of the processors (what a key missing from the file means).
_DEFAULTS: dict[str, dict[str, Any]] = {
    "siglip": dict(do_resize=True, size={"height": 224, "width": 224}, resample=3, do_center_crop=False,
                   do_rescale=True, rescale_factor=1 / 255, do_normalize=True, image_mean=[0.5] * 3,
                   image_std=[0.5] * 3),
    "clip": dict(do_resize=True, size={"shortest_edge": 224}, resample=3, do_center_crop=True,
                 crop_size={"height": 224, "width": 224}, do_rescale=True, rescale_factor=1 / 255,
                 do_normalize=True, image_mean=_OPENAI_CLIP_MEAN, image_std=_OPENAI_CLIP_STD),
}
_IMAGE_TYPES = {"SiglipImageProcessor": "siglip", "CLIPImageProcessor": "clip", "CLIPFeatureExtractor": "clip"}
_AUDIO_TYPES = ("WhisperFeatureExtractor",)
_PIL_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic"}  # PIL.Image.Resampling values
# What our log-mel computes (data/multimodal/samples.py); a Whisper folder must say the same.
_WHISPER_FIXED = {"sampling_rate": 16000, "n_fft": 400, "hop_length": 160, "dither": 0.0}


@dataclass(frozen=True)
class WhisperFeatures:
    """A Whisper folder's feature settings: mel bins (model.audio.num_mel_bins) and the frames of
    its extractor's chunk (chunk_length s * 100; the encoder's own window, max_source_positions * 2
    frames, is what model.audio.max_frames should be)."""

    num_mel_bins: int
    chunk_frames: int


def _read(folder: str) -> tuple[str, str, dict]:
    """(path, processor type without a Fast/Pil suffix, the JSON object) of `folder`."""
    path = os.path.join(folder, FILE)
    if not os.path.isfile(path):
        raise ConversionError(f"{folder}: no {FILE} (the encoder's processor settings)")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConversionError(f"{path}: not readable JSON ({' '.join(str(err).split())})") from None
    if not isinstance(data, dict):
        raise ConversionError(f"{path}: not a JSON object")
    kind = data.get("image_processor_type") or data.get("feature_extractor_type")
    if not isinstance(kind, str):
        raise ConversionError(f"{path}: names no image_processor_type or feature_extractor_type")
    for suffix in ("Fast", "Pil"):
        kind = kind[:-len(suffix)] if kind.endswith(suffix) else kind
    return path, kind, data


def _square(path: str, key: str, value: Any, shortest_edge: bool) -> tuple[str, int]:
    """("fixed" | "shortest_edge", n) of a `size`/`crop_size` value: a dict, or an int (which the
    processors, not defaulting to squares, read as the shortest edge for `size`)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return ("shortest_edge" if shortest_edge else "fixed"), value
    if isinstance(value, dict) and set(value) == {"shortest_edge"} and shortest_edge:
        return "shortest_edge", value["shortest_edge"]
    if isinstance(value, dict) and set(value) == {"height", "width"} and value["height"] == value["width"]:
        return "fixed", value["height"]
    raise ConversionError(f"{path}: {key}={value}: must be a square {{height, width}}"
                          + (" or {shortest_edge}" if shortest_edge else ""))


def image_preprocess_from_hf(folder: str, image_size: int, arch: str | None = None) -> ImagePreprocessConfig:
    """model.vision.preprocess for the SigLIP or CLIP encoder in `folder`, whose input is
    `image_size` square (its config's image_size); refused when its processor makes another size.
    A folder without preprocessor_config.json (a tower saved alone by `save_pretrained`) gets
    its `arch`'s processor as published, sized to the encoder; without `arch` it is refused."""
    if arch is not None and not os.path.isfile(os.path.join(folder, FILE)):
        crop = _DEFAULTS[arch]["do_center_crop"]
        size = {"shortest_edge": image_size} if crop else {"height": image_size, "width": image_size}
        path, kind, data = os.path.join(folder, FILE), next(k for k, v in _IMAGE_TYPES.items() if v == arch), dict(
            size=size, crop_size={"height": image_size, "width": image_size})
    else:
        path, kind, data = _read(folder)
    if kind not in _IMAGE_TYPES:
        raise ConversionError(f"{path}: processor type {kind}: not an image processor megatron_mm can follow "
                              f"(known: SiglipImageProcessor, CLIPImageProcessor)")
    settings = {**_DEFAULTS[_IMAGE_TYPES[kind]], **data}
    if not settings["do_resize"]:
        raise ConversionError(f"{path}: do_resize=false: the encoder takes {image_size}x{image_size} images, "
                              "so every image must be resized")
    resize, size = _square(path, "size", settings["size"], shortest_edge=True)
    crop = bool(settings["do_center_crop"])
    if crop:
        _, crop_size = _square(path, "crop_size", settings.get("crop_size"), shortest_edge=False)
    out = crop_size if crop else size
    if resize == "shortest_edge" and not crop:
        raise ConversionError(f"{path}: size={settings['size']} without do_center_crop gives images that are not "
                              "square; the encoder takes a square image")
    if out != image_size:
        raise ConversionError(f"{path}: makes {out}x{out} images, but the encoder's image_size is {image_size}")
    if crop and size < crop_size:
        raise ConversionError(f"{path}: size={size} is smaller than crop_size={crop_size} (the processor would pad "
                              "with zeros; the loaders do not)")
    resample = settings["resample"]
    if resample not in _PIL_RESAMPLE:
        raise ConversionError(f"{path}: resample={resample}: must be one of "
                              f"{', '.join(f'{k} ({v})' for k, v in _PIL_RESAMPLE.items())} (DALI has no other)")
    mean, std = (settings["image_mean"], settings["image_std"]) if settings["do_normalize"] else (0.0, 1.0)
    return ImagePreprocessConfig(resize=resize, size=size, center_crop=crop, resample=_PIL_RESAMPLE[resample],
                                 rescale_factor=float(settings["rescale_factor"]) if settings["do_rescale"] else 1.0,
                                 mean=_per_channel(mean), std=_per_channel(std))


def _per_channel(value) -> list[float]:
    """A mean/std as three floats (the processors take one number for all channels, too)."""
    return [float(value)] * 3 if isinstance(value, (int, float)) else [float(v) for v in value]


def audio_features_from_hf(folder: str) -> WhisperFeatures:
    """The feature settings of the Whisper encoder in `folder`."""
    path, kind, data = _read(folder)
    if kind not in _AUDIO_TYPES:
        raise ConversionError(f"{path}: processor type {kind}: not an audio feature extractor megatron_mm can "
                              f"follow (known: {', '.join(_AUDIO_TYPES)})")
    settings = {"feature_size": 80, "chunk_length": 30, **_WHISPER_FIXED, **data}
    for key, value in _WHISPER_FIXED.items():
        if settings[key] != value:
            raise ConversionError(f"{path}: {key}={settings[key]}: the loaders compute Whisper's features with "
                                  f"{key}={value}")
    return WhisperFeatures(num_mel_bins=int(settings["feature_size"]),
                           chunk_frames=int(settings["chunk_length"]) * _WHISPER_FIXED["sampling_rate"]
                           // _WHISPER_FIXED["hop_length"])
