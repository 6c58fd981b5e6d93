"""The part of a media loader that does not decode: sample plan, position, json checks, skips.

A loader subclass only turns one epoch's entries into decoded media (`_decode_epoch`);
everything a trainer relies on is here, identical for DALI and PyTorch:
  * `iter(loader)` yields `MediaSample`s of this data-parallel rank, epoch after epoch, from
    `loader.position` on;
  * `loader.position` is the number of samples of this rank passed so far, skipped ones
    included: checkpoint it and pass it as `start` to resume with exactly the samples an
    uninterrupted run would have seen next;
  * `loader.skipped` counts samples that could not be read (the trainer's `data_skipped`);
    each is logged once as `data: skipped sample <key> in <shard>: <reason>`.
"""

from __future__ import annotations

from typing import Callable, Iterator, Union

import torch

from megatron_mm.data.multimodal.plan import SamplePlan
from megatron_mm.data.multimodal.samples import MediaSample, MediaSpec, SkipLog, parse_meta
from megatron_mm.data.multimodal.shard_index import SampleEntry, load_catalogue, resolve_shards

# What `_decode_epoch` yields per entry: (json bytes, image or None, mel or None), or the
# reason the sample cannot be read.
Decoded = Union[tuple[bytes, "torch.Tensor | None", "torch.Tensor | None"], str]


class MediaLoader:
    """Base of the DALI and PyTorch loaders; see the module docstring."""

    def __init__(self, shards: str, spec: MediaSpec = MediaSpec(), dp_rank: int = 0, dp_size: int = 1,
                 start: int = 0, seed: int = 0, shuffle: bool = False,
                 cache_dir: str = "~/.cache/megatron_mm", log: Callable[[str], None] = print):
        self.spec = spec
        self.plan = SamplePlan(load_catalogue(resolve_shards(shards), cache_dir), dp_rank, dp_size, seed, shuffle)
        self.position = start
        self._skips = SkipLog(log)

    @property
    def skipped(self) -> int:
        return self._skips.skipped

    def _decode_epoch(self, entries: list[SampleEntry]) -> Iterator[tuple[int, Decoded]]:
        """(index into entries, decoded or reason) for every entry, in order."""
        raise NotImplementedError

    def __iter__(self) -> Iterator[MediaSample]:
        for first, entries in self.plan.epochs(self.position):
            delivered = 0
            for index, decoded in self._decode_epoch(entries):
                self.position = first + index + 1
                entry = entries[index]
                if isinstance(decoded, str):
                    self._skips(entry.key, entry.shard, decoded)
                    continue
                raw_json, image, mel = decoded
                try:
                    meta = parse_meta(raw_json, image is not None, mel is not None)
                except ValueError as err:
                    self._skips(entry.key, entry.shard, str(err))
                    continue
                delivered += 1
                yield MediaSample(entry.key, meta, image, mel)
            self.position = first + len(entries)
            if not delivered and len(entries) == self.plan.samples_per_epoch:
                raise RuntimeError(f"data: no readable sample in a whole epoch of dp rank {self.plan.dp_rank} "
                                   f"({len(entries)} samples, {self.skipped} skipped)")
