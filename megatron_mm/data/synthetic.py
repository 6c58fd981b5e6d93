"""Random-token samples for benchmarks, shaped exactly like megatron-core GPTDataset's."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset


class SyntheticDataset(Dataset):
    """`num_samples` samples of uniform random tokens; sample `i` depends only on `seed + i`.

    Like GPTDataset, each sample is one draw of `seq_length + 1` tokens: `tokens` is the
    first `seq_length`, `labels` the last `seq_length`.
    """

    def __init__(self, num_samples: int, seq_length: int, vocab_size: int, seed: int):
        if num_samples < 1 or seq_length < 1 or vocab_size < 1:
            raise ValueError(
                f"SyntheticDataset: num_samples={num_samples}, seq_length={seq_length} and "
                f"vocab_size={vocab_size} must all be at least 1"
            )
        self.num_samples = num_samples
        self.seq_length = seq_length
        self.vocab_size = vocab_size
        self.seed = seed

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not 0 <= index < self.num_samples:
            raise IndexError(f"sample {index} out of range for {self.num_samples} samples")
        generator = torch.Generator().manual_seed(self.seed + index)
        text = torch.randint(0, self.vocab_size, (self.seq_length + 1,), generator=generator, dtype=torch.int64)
        return {
            "tokens": text[:-1].contiguous(),
            "labels": text[1:].contiguous(),
            "loss_mask": torch.ones(self.seq_length, dtype=torch.float32),
            "position_ids": torch.arange(self.seq_length, dtype=torch.int64),
        }
