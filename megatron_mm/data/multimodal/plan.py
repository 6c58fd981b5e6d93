"""Which samples a data-parallel rank reads, in which order, from a resume position.

One epoch is every sample of the catalogue, shards in order (or, with `shuffle`, in a
permutation drawn from `seed + epoch`, the same on every rank), samples inside a shard in
stored order. Rank r of W reads the contiguous slice `[n·r/W, n·(r+1)/W)` of the epoch,
as DALI's `shard_id`/`num_shards` split does: ranks are disjoint and together read every
sample. A rank's position counts the samples of its slices it has passed, skipped ones
included, across epochs; starting from position p gives exactly the samples an
uninterrupted run would have seen after its first p.

Why not DALI's own `random_shuffle`/`shard_id`: its shuffle buffer cannot be reproduced by
the reference loader nor restarted from a position, and its reader cannot start mid-shard.
Shuffle samples when building shards; this plan only permutes whole shards.
"""

from __future__ import annotations

import random
from typing import Iterator

from megatron_mm.data.multimodal.shard_index import SampleEntry


class SamplePlan:
    """The epochs of one data-parallel rank over a catalogue (list of per-shard entry lists)."""

    def __init__(self, catalogue: list[list[SampleEntry]], dp_rank: int = 0, dp_size: int = 1,
                 seed: int = 0, shuffle: bool = False):
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank={dp_rank}: must be in [0, dp_size={dp_size})")
        self.catalogue, self.dp_rank, self.dp_size = catalogue, dp_rank, dp_size
        self.seed, self.shuffle = seed, shuffle
        self.total = sum(len(entries) for entries in catalogue)
        self.start = self.total * dp_rank // dp_size
        self.end = self.total * (dp_rank + 1) // dp_size
        if self.end == self.start:
            raise ValueError(f"dp_size={dp_size}: more ranks than the {self.total} samples of the shards")

    @property
    def samples_per_epoch(self) -> int:
        """This rank's samples in one epoch (ranks differ by at most one)."""
        return self.end - self.start

    def shard_order(self, epoch: int) -> list[int]:
        order = list(range(len(self.catalogue)))
        if self.shuffle:
            random.Random(self.seed + epoch).shuffle(order)
        return order

    def epoch_slice(self, epoch: int) -> list[SampleEntry]:
        """This rank's samples of `epoch`, in reading order."""
        entries = [e for shard in self.shard_order(epoch) for e in self.catalogue[shard]]
        return entries[self.start:self.end]

    def epochs(self, position: int = 0) -> Iterator[tuple[int, list[SampleEntry]]]:
        """(position of the first entry, entries) for the rest of each epoch, from `position` on."""
        if position < 0:
            raise ValueError(f"position={position}: must be >= 0")
        epoch, offset = divmod(position, self.samples_per_epoch)
        while True:
            yield position, self.epoch_slice(epoch)[offset:]
            position += self.samples_per_epoch - offset
            epoch, offset = epoch + 1, 0
