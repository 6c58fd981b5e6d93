"""Multimodal micro-batches for one data-parallel rank: media loader → text formatting →
packing → collation.

Every rank of a data-parallel replica (its tensor and pipeline peers) runs the same stream
and so sees the same micro-batches. `position` is what a checkpoint stores: the loader
position of the first sample not yet delivered in a micro-batch; a stream started there
delivers exactly what an uninterrupted one would have delivered next (packing is greedy
and in order, so the samples of the sequences still being filled are read again).
"""

from __future__ import annotations

import os
from collections import deque
from typing import Iterator, Optional

import numpy as np
import torch

from megatron_mm.data.multimodal.image_spec import image_spec
from megatron_mm.data.multimodal.loader_base import MediaLoader
from megatron_mm.data.multimodal.samples import MediaSpec
from megatron_mm.data.multimodal.text import PackedSequence, SequencePacker, TextFormatter


class MultimodalBatches:
    """Iterator of micro-batches: `tokens`, `labels`, `loss_mask`, `position_ids`,
    `segment_ids` (which packed sample each input token belongs to; 0: padding) [mbs, s],
    `images` [n, 3, S, S] and `mels` [n, M, F] in placeholder order (batch-major)."""

    def __init__(self, loader: MediaLoader, formatter: TextFormatter, seq_length: int,
                 micro_batch_size: int, pad_id: int, log=print):
        self.loader, self.formatter = loader, formatter
        self.packer = SequencePacker(seq_length, pad_id)
        self.micro_batch_size = micro_batch_size
        self.position = loader.position
        self.unpackable = 0
        self._log = log
        self._ready: deque[PackedSequence] = deque()
        self._samples = self._read()

    @property
    def skipped(self) -> int:
        """Samples dropped so far: unreadable (the loader's count) or too long to pack."""
        return self.loader.skipped + self.unpackable

    def _read(self) -> Iterator[list[PackedSequence]]:
        for sample in self.loader:
            index = self.loader.position - 1  # this sample's position
            media = [kind for kind, value in (("image", sample.image), ("audio", sample.mel)) if value is not None]
            try:
                formatted = self.formatter.format(sample.meta, media)
            except ValueError as err:
                self.unpackable += 1
                self._log(f"data: skipped sample {sample.key}: {err}")
                continue
            before = len(self.packer.skipped)
            done = self.packer.add((index, sample), formatted)
            if len(self.packer.skipped) > before:
                self.unpackable += 1
                self._log(f"data: skipped sample {sample.key}: {len(formatted)} tokens do not fit "
                          f"a sequence of {self.packer.capacity}")
            yield done

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        while len(self._ready) < self.micro_batch_size:
            self._ready.extend(next(self._samples))
        batch = [self._ready.popleft() for _ in range(self.micro_batch_size)]
        pending = [seq.samples[0][0] for seq in self._ready] + [ref[0] for ref in self.packer.open_refs[:1]]
        self.position = min(pending) if pending else self.loader.position
        return collate(batch)


def collate(sequences: list[PackedSequence]) -> dict:
    tokens = torch.from_numpy(np.stack([s.tokens for s in sequences]))
    mask = torch.from_numpy(np.stack([s.loss_mask for s in sequences]))
    segments = torch.from_numpy(np.stack([s.segment_ids for s in sequences]))
    seq_length = tokens.shape[1] - 1
    images = [sample.image for s in sequences for (_, sample), kind in s.media if kind == "image"]
    mels = [sample.mel for s in sequences for (_, sample), kind in s.media if kind == "audio"]
    return {
        "tokens": tokens[:, :-1].contiguous(),
        "labels": tokens[:, 1:].contiguous(),
        "loss_mask": mask[:, 1:].contiguous(),
        "position_ids": torch.arange(seq_length).expand(len(sequences), seq_length).contiguous(),
        "segment_ids": segments[:, :-1].contiguous(),
        "images": torch.stack(images) if images else None,
        "mels": torch.stack(mels) if mels else None,
    }


def open_stream(cfg, shards: str, tokenizer, dp_rank: int, dp_size: int, position: int,
                device_id: Optional[int], log=print) -> MultimodalBatches:
    """The configured loader (`data.loader`) over `shards` for this data-parallel rank, from
    `position`, formatted and packed for the model. `device_id`: the GPU DALI decodes on."""
    m, d = cfg.model, cfg.data
    spec = MediaSpec(**(dict(image=image_spec(m.vision)) if m.vision else {}),
                     **(dict(mel_frames=m.audio.max_frames, mel_bins=m.audio.num_mel_bins) if m.audio else {}))
    common = dict(spec=spec, dp_rank=dp_rank, dp_size=dp_size, start=position, seed=cfg.train.seed,
                  cache_dir=os.path.join(os.path.expanduser(d.cache_dir), "shard-index"), log=log)
    # Each loader module is imported only when chosen: DALI's takes ~1 s, the PyTorch one's
    # transformers ~1.5 s (imported here, in the main process, its DataLoader workers inherit it).
    if d.loader == "dali":
        from megatron_mm.data.multimodal.loader_dali import DaliMediaLoader

        loader = DaliMediaLoader(shards, batch_size=32, num_threads=d.loader_threads, device_id=device_id, **common)
    else:
        from megatron_mm.data.multimodal.loader_torch import TorchMediaLoader

        loader = TorchMediaLoader(shards, num_workers=0, **common)
    formatter = TextFormatter(tokenizer, num_image_tokens=m.vision.num_tokens if m.vision else 1,
                              num_audio_tokens=m.audio.num_tokens if m.audio else 1)
    return MultimodalBatches(loader, formatter, m.seq_length, cfg.train.micro_batch_size, tokenizer.pad, log)
