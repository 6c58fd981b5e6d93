"""The plain PyTorch media loader: a DataLoader over the `webdataset` library, Pillow (images
exactly as transformers' Siglip/CLIP image processors) and torch (Whisper's log-mel,
`melspec.py`). It is the fallback where DALI is missing and the reference the DALI loader is
checked against (same plan, so same keys in the same order).

Each DataLoader worker streams the epoch's tars with `webdataset` (tarfile underneath) and
decodes every W-th sample (worker w takes entries w, w+W, ...); the DataLoader hands results
back round-robin, which restores the stored order. A sample that cannot be read comes back
as its reason (not as an exception), so workers never die and the main process counts it.
"""

from __future__ import annotations

import io
from typing import Iterator, Optional

import numpy as np
import soundfile
import torch
import webdataset
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from transformers.image_transforms import convert_to_rgb

from megatron_mm.data.multimodal.loader_base import Decoded, MediaLoader
from megatron_mm.data.multimodal.melspec import log_mel, resample
from megatron_mm.data.multimodal.image_spec import ImageSpec
from megatron_mm.data.multimodal.samples import MediaSpec
from megatron_mm.data.multimodal.shard_index import AUDIO_EXTS, IMAGE_EXTS, SampleEntry, split_name

_PIL_FILTERS = {"nearest": Image.NEAREST, "bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC,
                "lanczos": Image.LANCZOS}


class _StreamErrors:
    """webdataset hooks that keep reading after an error and remember it per sample key.

    `select_files` sees each member's name before its data is read, so an error (a truncated
    tar) is charged to the sample of the member being read, as `shard_index.scan_tar` does.
    """

    def __init__(self):
        self.member, self.by_key = "", {}

    def select(self, name: str) -> bool:
        self.member = name
        return True

    def __call__(self, exn: Exception) -> bool:
        message = f"{type(exn).__name__}: {exn.args[0] if exn.args else exn}"
        self.by_key.setdefault(split_name(self.member)[0], message)
        return True


def _runs_by_shard(entries: list[SampleEntry]) -> Iterator[tuple[int, list[SampleEntry]]]:
    """(index of the first entry, entries) for each run of consecutive entries of one shard."""
    begin = 0
    for i in range(1, len(entries) + 1):
        if i == len(entries) or entries[i].shard != entries[begin].shard:
            yield begin, entries[begin:i]
            begin = i


def stream_shard(entries: list[SampleEntry]) -> Iterator[tuple[int, Optional[dict], Optional[str]]]:
    """(index into entries, webdataset sample or None, stream error or None) for each entry,
    which must be a run of one shard in stored order; an entry the stream never delivered
    comes with None."""
    errors = _StreamErrors()
    wanted = {entry.key: i for i, entry in enumerate(entries)}
    pipeline = webdataset.DataPipeline(
        webdataset.SimpleShardList([entries[0].shard]),
        webdataset.tarfile_to_samples(handler=errors, select_files=errors.select))
    done = 0
    for sample in pipeline:
        index = wanted.get(sample["__key__"], -1)
        if index < done:  # before this run (or unknown): read past it
            continue
        for missing in range(done, index):
            yield missing, None, errors.by_key.get(entries[missing].key)
        yield index, sample, errors.by_key.get(sample["__key__"])
        done = index + 1
        if done == len(entries):
            return
    for missing in range(done, len(entries)):
        yield missing, None, errors.by_key.get(entries[missing].key)


def decode_image(data: bytes, spec: ImageSpec) -> torch.Tensor:
    """[3, out_size, out_size] float32, step for step as transformers' image processors
    (`image_spec.py`): RGB with transparency on white, Pillow resize, centre crop, rescale in
    float64, (x - mean) / std in float32."""
    with Image.open(io.BytesIO(data)) as image:
        rgb = Image.fromarray(convert_to_rgb(image, return_numpy=True))
    rgb = rgb.resize(spec.resized(*rgb.size), _PIL_FILTERS[spec.resample])
    left, top = spec.crop_corner(*rgb.size)
    pixels = np.asarray(rgb)[top:top + spec.out_size, left:left + spec.out_size]
    scaled = (torch.from_numpy(pixels.transpose(2, 0, 1).copy()).double() * spec.rescale_factor).float()
    mean, std = torch.tensor(spec.mean).view(3, 1, 1), torch.tensor(spec.std).view(3, 1, 1)
    return ((scaled - mean) / std).contiguous()


def decode_audio(data: bytes, frames: int, n_mels: int) -> torch.Tensor:
    """[n_mels, frames] Whisper log-mel of a WAV/FLAC clip: channels averaged, resampled to 16 kHz."""
    wave, rate = soundfile.read(io.BytesIO(data), dtype="float32", always_2d=True)
    if len(wave) == 0:
        raise ValueError("audio has no frames")
    return log_mel(resample(wave.mean(axis=1), rate), frames, n_mels)


def decode_sample(sample: Optional[dict], error: Optional[str], spec: MediaSpec) -> Decoded:
    """(json bytes, image or None, mel or None) of one webdataset sample, or why not."""
    if error:
        return f"tar stream error while reading it ({error})"
    if sample is None:
        return "not in the tar stream"
    images = [ext for ext in IMAGE_EXTS if ext in sample]
    audios = [ext for ext in AUDIO_EXTS if ext in sample]
    if "json" not in sample:
        return "no json member"
    if len(images) > 1 or len(audios) > 1:
        return f"more than one member of a kind ({', '.join(images + audios)})"
    try:
        image = decode_image(sample[images[0]], spec.image) if images else None
    except Exception as err:  # PIL raises many types (OSError, SyntaxError, ValueError...)
        return f"{images[0]} does not decode ({type(err).__name__}: {err})"
    try:
        mel = decode_audio(sample[audios[0]], spec.mel_frames, spec.mel_bins) if audios else None
    except Exception as err:  # soundfile, resampling and the STFT raise several types
        return f"{audios[0]} does not decode ({type(err).__name__}: {err})"
    return sample["json"], image, mel


class _EpochDataset(IterableDataset):
    """One epoch's entries; worker w of W yields (index, decoded) for indices w, w+W, ..."""

    def __init__(self, entries: list[SampleEntry], spec: MediaSpec):
        self.entries, self.spec = entries, spec

    def __iter__(self) -> Iterator[tuple[int, Decoded]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        for first, run in _runs_by_shard(self.entries):
            mine = [i for i in range(len(run)) if (first + i) % workers == worker]
            if not mine:
                continue
            for i, sample, error in stream_shard(run[:mine[-1] + 1]):
                if (first + i) % workers == worker:
                    yield first + i, decode_sample(sample, error, self.spec)


class TorchMediaLoader(MediaLoader):
    """The MediaLoader on a torch DataLoader with `num_workers` worker processes (0: in process)."""

    def __init__(self, shards: str, num_workers: int = 0, **kwargs):
        super().__init__(shards, **kwargs)
        if num_workers < 0:
            raise ValueError(f"num_workers={num_workers}: must be >= 0")
        self.num_workers = num_workers

    def _decode_epoch(self, entries: list[SampleEntry]) -> Iterator[tuple[int, Decoded]]:
        if not entries:
            return
        workers = min(self.num_workers, len(entries))
        yield from DataLoader(_EpochDataset(entries, self.spec), batch_size=None, num_workers=workers,
                              prefetch_factor=4 if workers else None)
