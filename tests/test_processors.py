"""Both media loaders against the published processors on the same files: transformers'
SiglipImageProcessor / CLIPImageProcessor (the Pillow classes; torchvision is not installed) and
WhisperFeatureExtractor, each loaded from a preprocessor_config.json that transformers itself
wrote, our settings read from the same file (`conversion/hf_preprocessor.py`).

Tolerances (measured 2026-12-07, transformers 5.24, Pillow 13, DALI 2.4 CPU):
  * PyTorch loader: bit-identical images and log-mels (the same operations in the same order).
  * DALI images, in 0-255 pixel levels before normalisation: <= 1 level on smooth images
    (JPEG, RGBA, grey, up- and downscaled); on pixel noise, where Pillow's and DALI's resampling
    kernels differ most, <= 9 levels max (measured 8) and <= 0.5 levels mean (measured 0.30).
  * DALI log-mels: <= 2e-4 (measured 8.7e-5): DALI's FFT and mel filters against torch's.
A grey + alpha PNG keeps its transparency only in the PyTorch loader (DALI's decoder cannot give
its alpha channel; loader_dali.py), so the DALI comparison leaves it out.
"""

import io
import json
import os
import warnings

import numpy as np
import pytest
import soundfile
import torch
from PIL import Image

warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")

from transformers import WhisperFeatureExtractor  # noqa: E402
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil  # noqa: E402
from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil  # noqa: E402

from megatron_mm.config import VisionConfig  # noqa: E402
from megatron_mm.conversion.dcp import ConversionError  # noqa: E402
from megatron_mm.conversion.hf_preprocessor import audio_features_from_hf, image_preprocess_from_hf  # noqa: E402
from megatron_mm.data.multimodal.fixture import write_shard  # noqa: E402
from megatron_mm.data.multimodal.image_spec import image_spec  # noqa: E402
from megatron_mm.data.multimodal.loader_torch import TorchMediaLoader  # noqa: E402
from megatron_mm.data.multimodal.samples import MediaSpec  # noqa: E402

dali = pytest.importorskip("megatron_mm.data.multimodal.loader_dali")

SMOOTH_LEVELS, NOISE_LEVELS, NOISE_MEAN_LEVELS, DALI_MEL_TOL = 1.01, 9.01, 0.5, 2e-4
IMAGE_SIZE = 32
CLIPS_S = {"short": 0.7, "long": 1.3, "over_30s": 31.0}  # against 1 s and 30 s windows


def _image(mode: str, width: int, height: int, fmt: str, smooth: bool, seed: int) -> bytes:
    """An encoded image: gradients (smooth) or pixel noise, alpha rising from left to right."""
    if smooth:
        y, x = np.mgrid[0:height, 0:width]
        rgb = np.stack([x * 255 / width, y * 255 / height, (x + y) * 127 / (width + height)], -1)
    else:
        rgb = np.random.default_rng(seed).integers(0, 256, (height, width, 3))
    alpha = np.broadcast_to(np.linspace(0, 255, width)[None, :, None], (height, width, 1))
    rgba = Image.fromarray(np.concatenate([rgb, alpha], -1).astype(np.uint8), "RGBA").convert(mode)
    buffer = io.BytesIO()
    rgba.save(buffer, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buffer.getvalue()


# key -> (ext, mode, width, height, smooth): odd sizes, portrait/landscape, up- and downscaling.
IMAGES = {
    "jpeg_smooth": ("jpg", "RGB", 333, 500, True), "rgba_smooth": ("png", "RGBA", 64, 47, True),
    "grey_smooth": ("png", "L", 301, 200, True), "tiny_smooth": ("png", "RGB", 20, 13, True),
    "jpeg_noise": ("jpg", "RGB", 37, 23, False), "rgba_noise": ("png", "RGBA", 50, 71, False),
    "grey_noise": ("png", "L", 300, 199, False), "la_smooth": ("png", "LA", 45, 61, True),
}
DALI_LEAVES_OUT = {"la_smooth"}


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    """(shard folder, {key: image bytes}, {key: 16 kHz waveform}) of one shard holding them all."""
    folder = tmp_path_factory.mktemp("media")
    images = {key: _image(mode, w, h, "JPEG" if ext == "jpg" else "PNG", smooth, seed)
              for seed, (key, (ext, mode, w, h, smooth)) in enumerate(IMAGES.items())}
    rng = np.random.default_rng(0)
    waves = {}
    for i, (key, seconds) in enumerate(CLIPS_S.items()):
        t = np.arange(int(16000 * seconds)) / 16000
        waves[key] = (0.3 * np.sin(2 * np.pi * 220 * (i + 1) * t) + 0.01 * rng.standard_normal(len(t))).astype(np.float32)
    samples = [{"__key__": key, "json": b'{"text": "<image> x"}', IMAGES[key][0]: data} for key, data in images.items()]
    for key, wave in waves.items():
        buffer = io.BytesIO()
        soundfile.write(buffer, wave, 16000, format="WAV", subtype="FLOAT")
        samples.append({"__key__": key, "json": b'{"text": "<audio> x"}', "wav": buffer.getvalue()})
    write_shard(str(folder / "media.tar"), samples)
    return str(folder), images, waves


# case -> (image processor as transformers builds it, mel bins, window in frames)
CASES = {
    "siglip_whisper80_1s": (lambda: SiglipImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}), 80, 100),
    "clip_whisper128_30s": (lambda: CLIPImageProcessorPil(size={"shortest_edge": 40}, crop_size=IMAGE_SIZE), 128, 3000),
}


@pytest.fixture(scope="module", params=list(CASES))
def case(request, media, tmp_path_factory):
    """Processors saved by transformers and loaded back, and both loaders' samples by key."""
    make_processor, bins, frames = CASES[request.param]
    folder = tmp_path_factory.mktemp(request.param)
    make_processor().save_pretrained(folder / "vision")
    WhisperFeatureExtractor(feature_size=bins).save_pretrained(folder / "audio")
    processor_class = type(make_processor())
    processor = processor_class.from_pretrained(folder / "vision")
    extractor = WhisperFeatureExtractor.from_pretrained(folder / "audio")
    vision = VisionConfig(image_size=IMAGE_SIZE, preprocess=image_preprocess_from_hf(str(folder / "vision"), IMAGE_SIZE))
    features = audio_features_from_hf(str(folder / "audio"))
    assert features.num_mel_bins == bins and features.chunk_frames == 3000
    spec = MediaSpec(image=image_spec(vision), mel_frames=frames, mel_bins=features.num_mel_bins)
    shards, images, waves = media
    n = len(images) + len(waves)
    out = {}
    for name, loader in (("torch", TorchMediaLoader(shards, spec=spec, cache_dir=str(folder))),
                         ("dali", dali.DaliMediaLoader(shards, spec=spec, batch_size=4, device_id=None,
                                                       cache_dir=str(folder)))):
        stream = iter(loader)
        out[name] = {sample.key: sample for sample in (next(stream) for _ in range(n))}
    return processor, extractor, vision.preprocess, frames, out


def test_images_as_the_processor(case, media):
    processor, _, pre, _, out = case
    _, images, _ = media
    level = torch.tensor(pre.std).view(3, 1, 1) / pre.rescale_factor  # one 0-255 level in output units
    for key, data in images.items():
        with Image.open(io.BytesIO(data)) as image:
            expected = torch.from_numpy(processor(image)["pixel_values"][0])
        assert expected.shape == (3, IMAGE_SIZE, IMAGE_SIZE)
        assert torch.equal(out["torch"][key].image, expected), key
        if key in DALI_LEAVES_OUT:
            continue
        levels = (out["dali"][key].image - expected).abs() * level
        if IMAGES[key][4]:
            assert levels.max() <= SMOOTH_LEVELS, (key, float(levels.max()))
        else:
            assert levels.max() <= NOISE_LEVELS and levels.mean() <= NOISE_MEAN_LEVELS, \
                (key, float(levels.max()), float(levels.mean()))


def test_log_mel_as_whisper(case, media):
    _, extractor, _, frames, out = case
    _, _, waves = media
    for key, wave in waves.items():
        expected = torch.from_numpy(extractor(wave, sampling_rate=16000, max_length=frames * 160)["input_features"][0])
        assert expected.shape == (extractor.feature_size, frames)
        assert torch.equal(out["torch"][key].mel, expected), key
        error = (out["dali"][key].mel - expected).abs().max()
        assert error <= DALI_MEL_TOL, (key, float(error))


def _write(folder, data: dict) -> str:
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "preprocessor_config.json"), "w") as f:
        json.dump(data, f)
    return str(folder)


def test_legacy_clip_file_reads_as_the_current_one(tmp_path):
    """openai/clip-vit-large-patch14's file: CLIPFeatureExtractor, int size and crop_size."""
    legacy = _write(tmp_path / "legacy", {"feature_extractor_type": "CLIPFeatureExtractor", "size": 224,
                                          "crop_size": 224, "do_center_crop": True, "resample": 3})
    CLIPImageProcessorPil().save_pretrained(tmp_path / "current")
    assert image_preprocess_from_hf(legacy, 224) == image_preprocess_from_hf(str(tmp_path / "current"), 224)


REFUSED = {
    "unknown type": ({"image_processor_type": "ViTImageProcessor"}, "processor type ViTImageProcessor: not an image processor"),
    "size mismatch": ({"image_processor_type": "SiglipImageProcessor", "size": {"height": 64, "width": 64}},
                      "makes 64x64 images, but the encoder's image_size is 32"),
    "box filter": ({"image_processor_type": "SiglipImageProcessor", "size": {"height": 32, "width": 32}, "resample": 4},
                   "resample=4: must be one of"),
    "not square": ({"image_processor_type": "CLIPImageProcessor", "size": {"shortest_edge": 32}, "do_center_crop": False},
                   "without do_center_crop gives images that are not square"),
    "audio file": ({"feature_extractor_type": "WhisperFeatureExtractor"}, "processor type WhisperFeatureExtractor: not an image"),
    "no type": ({"size": 32}, "names no image_processor_type or feature_extractor_type"),
}


@pytest.mark.parametrize("name", list(REFUSED))
def test_image_folder_refused_in_one_line(name, tmp_path):
    data, message = REFUSED[name]
    with pytest.raises(ConversionError, match=message) as err:
        image_preprocess_from_hf(_write(tmp_path, data), IMAGE_SIZE)
    assert "\n" not in str(err.value)


def test_audio_folder_refused_in_one_line(tmp_path):
    with pytest.raises(ConversionError, match=r"sampling_rate=44100: the loaders compute Whisper's features") as err:
        audio_features_from_hf(_write(tmp_path / "a", {"feature_extractor_type": "WhisperFeatureExtractor",
                                                       "sampling_rate": 44100}))
    assert "\n" not in str(err.value)
    with pytest.raises(ConversionError, match="SiglipImageProcessor: not an audio feature extractor"):
        audio_features_from_hf(_write(tmp_path / "b", {"image_processor_type": "SiglipImageProcessor"}))
    with pytest.raises(ConversionError, match="no preprocessor_config.json"):
        audio_features_from_hf(str(tmp_path / "missing"))


def test_quickstart_images_unchanged(media):
    """The quickstart's preprocess (rescale_factor 1, its data set's mean/std on the 0-255 scale)
    gives the images of the code before the processors, bit for bit: RGB, bilinear resize,
    (x - mean) / std in float32. The default (SigLIP's x/255, 0.5, 0.5) equals the old default
    (x - 127.5) / 127.5 to float32 rounding. Opaque images only: transparency is now on white."""
    from megatron_mm.config import load_config
    from megatron_mm.data.multimodal.loader_torch import decode_image

    quickstart = load_config(os.path.join(os.path.dirname(__file__), "..", "configs", "quickstart.yaml")).model.vision
    _, images, _ = media
    for key in ("jpeg_smooth", "grey_smooth", "tiny_smooth", "jpeg_noise", "grey_noise"):
        with Image.open(io.BytesIO(images[key])) as image:
            rgb = image.convert("RGB").resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR)
        pixels = torch.from_numpy(np.asarray(rgb, dtype=np.float32)).permute(2, 0, 1)
        for vision, mean, std in ((quickstart, quickstart.preprocess.mean, quickstart.preprocess.std),
                                  (VisionConfig(image_size=IMAGE_SIZE), [127.5] * 3, [127.5] * 3)):
            before = (pixels - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
            now = decode_image(images[key], image_spec(vision))
            if vision is quickstart:
                assert torch.equal(now, before), key
            else:
                assert (now - before).abs().max() <= 2e-7, key
