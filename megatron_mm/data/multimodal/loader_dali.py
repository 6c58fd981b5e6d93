"""The DALI media loader: `fn.readers.webdataset` -> image decode/resize/normalise and
audio decode/resample/log-mel, on the GPU when there is one, on the CPU otherwise (the same
pipeline; only the decoder's device and `device_id` differ, decided in `default_device_id`).

Reading. Each epoch's remaining samples of this rank (`plan.py`) are handed to the reader as
index files written for exactly those samples (`shard_index.write_dali_index`), with
`shard_id=0, num_shards=1`: DALI's own split cannot start mid-shard, and resuming needs that.

Images. `image_spec.py`'s steps (transformers' SigLIP/CLIP processors): `fn.decoders.image`
without EXIF rotation and with libjpeg's fancy upsampling (as Pillow decodes), an RGBA PNG
composited onto white (`_on_white`), `fn.resize` (fixed, or the shorter side to `size` with the
longer side computed as the processors do), `fn.slice` for the centre crop (the processors'
corner, not DALI's rounding), `fn.crop_mirror_normalize` with mean and std divided by
rescale_factor. DALI's resampling kernels differ from Pillow's by about a grey level on smooth
images (tests/test_processors.py states the tolerances).

Audio. WhisperFeatureExtractor's log-mel op for op: the waveform zero-padded / cut to F * 160
samples (`fn.slice`, out_of_bounds_policy="pad") -> `fn.spectrogram` (periodic Hann window
passed in, centred frames, reflect padding, power 2), its last frame dropped ->
`fn.mel_filter_bank` (Slaney scale and area normalisation, 0-8000 Hz, M bins) ->
log10(max(x, 1e-10)) -> max(x, max(x) - 8) -> (x + 4) / 4. The extractor takes 16 kHz only;
other rates go through DALI's windowed sinc (`fn.audio_resample`, after our anti-alias filter
`_antialias`), where the PyTorch loader uses scipy's polyphase filter; they differ only near 8 kHz.

Bad samples. DALI fails a whole batch when one sample does not decode (and the pipeline is
not to be trusted afterwards), so: (1) `shard_index` rejects members whose first bytes are
not JPEG/PNG/WAV/FLAC before DALI sees them (cost: one 12-byte read per member, once per
shard, cached); (2) should a sample still fail (a valid header over a corrupt body), the
failed batch is decoded again one sample per pipeline, the culprit skipped with DALI's
message, and a fresh pipeline carries on after that batch (cost: one pipeline build per
sample of that batch, measured in the README). Samples without an image or audio member
take the other branch of a DALI conditional, so a text-only sample never reaches a decoder.
"""

from __future__ import annotations

import os
import tempfile
from typing import Iterator, Optional

import numpy as np
import torch
from nvidia.dali import fn, math as dmath, pipeline_def, types

from megatron_mm.data.multimodal.image_spec import ImageSpec
from megatron_mm.data.multimodal.loader_base import Decoded, MediaLoader
from megatron_mm.data.multimodal.samples import (
    DYNAMIC_RANGE, HOP, LOG_FLOOR, MEL_FMAX, N_FFT, SAMPLE_RATE, MediaSpec,
)
from megatron_mm.data.multimodal.shard_index import SampleEntry, write_dali_index

_HANN = (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(N_FFT) / N_FFT)).astype(np.float32).tolist()  # periodic
_AA_TAPS = 129  # anti-alias low-pass length (odd: centred, no delay)
_AA_OFFSETS = (np.arange(_AA_TAPS) - _AA_TAPS // 2).astype(np.float32)
_AA_WINDOW = np.hanning(_AA_TAPS).astype(np.float32)
_DALI_FILTERS = {"nearest": types.INTERP_NN, "bilinear": types.INTERP_LINEAR, "bicubic": types.INTERP_CUBIC,
                 "lanczos": types.INTERP_LANCZOS3}


def default_device_id() -> Optional[int]:
    """This process's GPU (its local rank) when torch sees CUDA, else None (CPU pipeline)."""
    return int(os.environ.get("LOCAL_RANK", "0")) if torch.cuda.is_available() else None


@pipeline_def(enable_conditionals=True)
def media_pipeline(paths: list[str], index_paths: list[str], spec: MediaSpec, gpu: bool):
    """(json bytes, image [3, S, S] float, log-mel [M, F] float) per sample; the image/mel of a
    sample without that member is a zero placeholder (the loader returns None for it)."""
    raw_json, raw_image, raw_audio = fn.readers.webdataset(
        paths=paths, index_paths=index_paths, ext=["json", "jpg;png", "wav;flac"],
        missing_component_behavior="empty", random_shuffle=False, name="reader")
    size = spec.image_size
    if raw_image.shape()[0] > 0:
        image = _image(raw_image, spec.image, gpu)
    else:
        image = fn.constant(fdata=0.0, shape=[3, size, size], layout="CHW", device="gpu" if gpu else "cpu")
    if raw_audio.shape()[0] > 0:
        audio, rate = fn.decoders.audio(raw_audio, downmix=True, dtype=types.FLOAT)
        audio = fn.audio_resample(_antialias(audio, rate), in_rate=rate, out_rate=float(SAMPLE_RATE))
        audio = fn.slice(audio, start=[0], shape=[spec.mel_frames * HOP], axes=[0], out_of_bounds_policy="pad")
        power = fn.spectrogram(audio, nfft=N_FFT, window_length=N_FFT, window_step=HOP, window_fn=_HANN,
                               center_windows=True, reflect_padding=True, power=2, layout="ft")
        power = fn.slice(power, start=[0], shape=[spec.mel_frames], axes=[1])  # frames + 1: the last dropped
        mel = fn.mel_filter_bank(power, nfilter=spec.mel_bins, sample_rate=SAMPLE_RATE, freq_low=0.0,
                                 freq_high=MEL_FMAX, normalize=True, mel_formula="slaney")
        mel = dmath.log10(dmath.max(mel, LOG_FLOOR))
        mel = dmath.max(mel, fn.reductions.max(mel) - DYNAMIC_RANGE)
        mel = (mel + 4.0) / 4.0
    else:
        mel = fn.constant(fdata=0.0, shape=[spec.mel_bins, spec.mel_frames], layout="ft")
    return raw_json, image, mel.gpu() if gpu else mel


def _image(raw, spec: ImageSpec, gpu: bool):
    """[3, S, S] float: `image_spec.py`'s steps in DALI operators (decode without EXIF rotation
    and with libjpeg's fancy upsampling, as Pillow; an RGBA PNG composited onto white)."""
    decode = dict(device="mixed" if gpu else "cpu", adjust_orientation=False, jpeg_fancy_upsampling=True)
    if _is_rgba_png(raw):
        image = _on_white(fn.decoders.image(raw, output_type=types.ANY_DATA, **decode))
    else:
        image = fn.decoders.image(raw, output_type=types.RGB, **decode)
    interp = _DALI_FILTERS[spec.resample]
    if spec.resize == "fixed":
        image = fn.resize(image, resize_x=spec.target, resize_y=spec.target, interp_type=interp)
    else:  # the shorter side to `target`, the longer to int(target * long / short)
        height, width = fn.cast(image.shape()[0], dtype=types.INT64), fn.cast(image.shape()[1], dtype=types.INT64)
        landscape = width > height  # a square or portrait image keeps its width at `target`
        new_long = spec.target * dmath.max(width, height) // dmath.min(width, height)
        image = fn.resize(image, interp_type=interp,
                          resize_x=fn.cast(landscape * new_long + (1 - landscape) * spec.target, dtype=types.FLOAT),
                          resize_y=fn.cast(landscape * spec.target + (1 - landscape) * new_long, dtype=types.FLOAT))
    if spec.center_crop:
        corner = (fn.cast(image.shape()[0:2], dtype=types.INT64) - spec.out_size) // 2
        image = fn.slice(image, start=fn.cast(corner, dtype=types.INT32), shape=[spec.out_size] * 2, axis_names="HW")
    scale = spec.rescale_factor  # (x * scale - mean) / std == (x - mean / scale) / (std / scale)
    return fn.crop_mirror_normalize(image, mean=[m / scale for m in spec.mean], std=[s / scale for s in spec.std],
                                    output_layout="CHW", dtype=types.FLOAT)


def _is_rgba_png(raw):
    """Whether encoded image bytes are a PNG of colour type 6 (RGBA), from its IHDR chunk (byte
    25). Only these are decoded with their alpha: DALI 2.4's CPU decoder crashes the process on a
    grey + alpha PNG decoded as ANY_DATA (measured), so those, and PNGs whose transparency is a
    tRNS chunk (palette images), lose their transparency here."""
    head = fn.slice(raw, start=[0], shape=[26], axes=[0], out_of_bounds_policy="pad")
    return (head[0] == 0x89) & (head[25] == 6)


def _on_white(rgba):
    """RGB uint8 of an RGBA image composited onto white, as Pillow's `alpha_composite`:
    round((rgb * a + 255 * (255 - a)) / 255)."""
    rgba = fn.cast(rgba, dtype=types.FLOAT)
    alpha = rgba[:, :, 3:4]
    return fn.cast(dmath.floor((rgba[:, :, 0:3] * alpha + 255.0 * (255.0 - alpha)) / 255.0 + 0.5), dtype=types.UINT8)


def _antialias(audio, rate):
    """`audio` low-passed below 8 kHz (a Hann-windowed sinc, `fn.filter`), unchanged at 16 kHz
    and below. DALI's resampler does not low-pass when it downsamples (a 12 kHz tone at 44.1 kHz
    comes out at 4 kHz at full amplitude), so this runs before `fn.audio_resample`."""
    cutoff = dmath.min(SAMPLE_RATE / 2 / rate, 0.5)  # cycles per input sample
    phase = types.Constant(_AA_OFFSETS) * (2 * np.pi) * cutoff + 1e-9  # the offset avoids 0/0
    taps = fn.reshape(dmath.sin(phase) / phase * 2.0 * cutoff * types.Constant(_AA_WINDOW), shape=[1, _AA_TAPS])
    rows = fn.filter(fn.reshape(audio, shape=[1, -1], layout="HW"), taps, border="constant")
    return fn.reshape(rows, shape=[-1], layout="")


def _dali_reason(err: Exception) -> str:
    """The operator and message of a DALI error, on one line."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    operator = next((line.rstrip(",") for line in lines if line.startswith("Error in")), "DALI error")
    message = lines[lines.index("encountered:") + 1] if "encountered:" in lines[:-1] else lines[0] if lines else ""
    return f"{operator}: {message}"


class DaliMediaLoader(MediaLoader):
    """The MediaLoader on a DALI pipeline of `batch_size` samples and `num_threads` CPU threads.

    `device_id`: the GPU to decode on, None for a CPU-only pipeline; default
    `default_device_id()`.
    """

    def __init__(self, shards: str, batch_size: int = 32, num_threads: int = 2,
                 device_id: Optional[int] = -1, **kwargs):
        super().__init__(shards, **kwargs)
        if batch_size < 1 or num_threads < 1:
            raise ValueError(f"batch_size={batch_size}, num_threads={num_threads}: must be >= 1")
        self.batch_size, self.num_threads = batch_size, num_threads
        self.device_id = default_device_id() if device_id == -1 else device_id
        self.rebuilds = 0  # pipelines built to isolate a sample that failed its batch

    def _pipeline(self, view: list[SampleEntry], batch_size: int):
        """A built pipeline reading exactly `view` (problem-free entries), in order."""
        with tempfile.TemporaryDirectory(prefix="dali-index-") as folder:
            paths, index_paths, begin = [], [], 0
            for i in range(1, len(view) + 1):
                if i == len(view) or view[i].shard != view[begin].shard:
                    index_paths.append(os.path.join(folder, f"{len(paths)}.idx"))
                    write_dali_index(view[begin:i], index_paths[-1])
                    paths.append(view[begin].shard)
                    begin = i
            pipe = media_pipeline(paths, index_paths, self.spec, self.device_id is not None,
                                  batch_size=batch_size, num_threads=self.num_threads,
                                  device_id=self.device_id, seed=self.plan.seed, prefetch_queue_depth=2)
            pipe.build()  # reads the index files
        return pipe

    def _unpack(self, outputs, entries: list[SampleEntry]) -> Iterator[Decoded]:
        raw_json, images, mels = outputs
        for i, entry in enumerate(entries):
            source = raw_json[i].source_info()
            if not source.endswith(f":{entry.key}.json"):
                raise RuntimeError(f"DALI read {source} where the plan has {entry.key} of {entry.shard}")
            image = torch.from_dlpack(images[i]).clone() if entry.image_ext else None
            mel = torch.from_dlpack(mels[i]).clone() if entry.audio_ext else None
            yield np.asarray(raw_json[i]).tobytes(), image, mel

    def _decode_alone(self, entry: SampleEntry) -> Decoded:
        self.rebuilds += 1
        pipe = self._pipeline([entry], 1)
        try:
            outputs = pipe.run()
        except RuntimeError as err:
            return _dali_reason(err)
        return next(self._unpack(outputs, [entry]))

    def _decode_view(self, view: list[SampleEntry]) -> Iterator[Decoded]:
        """Decoded samples of `view`, in order; a failed batch is retried one sample at a time."""
        batch, start = self.batch_size, 0
        while start < len(view):
            failed = None
            pipe = self._pipeline(view[start:], batch)
            for begin in range(start, len(view), batch):
                try:
                    outputs = pipe.run()
                except RuntimeError:
                    failed = begin
                    break
                yield from self._unpack(outputs, view[begin:begin + batch])
            del pipe
            if failed is None:
                return
            for entry in view[failed:failed + batch]:
                yield self._decode_alone(entry)
            start = failed + batch

    def _decode_epoch(self, entries: list[SampleEntry]) -> Iterator[tuple[int, Decoded]]:
        decoded = self._decode_view([e for e in entries if e.problem is None])
        for index, entry in enumerate(entries):
            yield index, entry.problem if entry.problem else next(decoded)
