"""Which samples each rank reads at each step.

The global batch of step `s` (numbered from 1) is samples `[(s-1)*gbs, s*gbs)`, wrapped
modulo the dataset length, whatever the parallel layout; data-parallel rank `r` of `dp`
owns the contiguous slice `[r*gbs/dp, (r+1)*gbs/dp)` of it, cut into micro-batches of
`mbs`. The position in the data is therefore just the step number, which is all a resumed
run needs.
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import Dataset, default_collate


class GlobalBatchSampler:
    """Sample indices per (step, data-parallel rank, micro-batch) for a dataset of `dataset_length`."""

    def __init__(self, dataset_length: int, micro_batch_size: int, global_batch_size: int, dp_size: int):
        if dataset_length < 1:
            raise ValueError("GlobalBatchSampler: the dataset is empty")
        if min(micro_batch_size, global_batch_size, dp_size) < 1:
            raise ValueError(
                f"GlobalBatchSampler: micro_batch_size={micro_batch_size}, "
                f"global_batch_size={global_batch_size} and dp_size={dp_size} must be at least 1"
            )
        if global_batch_size % (micro_batch_size * dp_size):
            raise ValueError(
                f"global_batch_size={global_batch_size} is not divisible by "
                f"micro_batch_size*dp_size={micro_batch_size}*{dp_size}"
            )
        self.dataset_length = dataset_length
        self.micro_batch_size = micro_batch_size
        self.global_batch_size = global_batch_size
        self.dp_size = dp_size
        self.per_rank = global_batch_size // dp_size
        self.num_microbatches = self.per_rank // micro_batch_size

    def global_batch(self, step: int) -> list[int]:
        """All sample indices of training step `step` (from 1), in rank order."""
        if step < 1:
            raise ValueError(f"step={step}: steps are numbered from 1")
        start = (step - 1) * self.global_batch_size
        return [(start + i) % self.dataset_length for i in range(self.global_batch_size)]

    def rank_indices(self, step: int, dp_rank: int) -> list[int]:
        """The contiguous slice of the global batch that data-parallel rank `dp_rank` owns."""
        if not 0 <= dp_rank < self.dp_size:
            raise ValueError(f"dp_rank={dp_rank}: must be in [0, {self.dp_size})")
        begin = dp_rank * self.per_rank
        return self.global_batch(step)[begin:begin + self.per_rank]

    def microbatch(self, step: int, dp_rank: int, m: int) -> list[int]:
        """Sample indices of micro-batch `m` (from 0) of `dp_rank` at `step`."""
        if not 0 <= m < self.num_microbatches:
            raise ValueError(f"micro-batch {m}: must be in [0, {self.num_microbatches})")
        begin = m * self.micro_batch_size
        return self.rank_indices(step, dp_rank)[begin:begin + self.micro_batch_size]


def microbatch_iterator(
    dataset: Dataset, step: int, dp_rank: int, dp_size: int, mbs: int, gbs: int
) -> Iterator[dict[str, torch.Tensor]]:
    """Iterate this rank's micro-batches of `step` in order, each a dict of [mbs, seq] tensors.

    Arguments are checked at once; samples are read as the iterator advances.
    """
    sampler = GlobalBatchSampler(len(dataset), mbs, gbs, dp_size)
    batches = [sampler.microbatch(step, dp_rank, m) for m in range(sampler.num_microbatches)]
    return (default_collate([dataset[i] for i in indices]) for indices in batches)
