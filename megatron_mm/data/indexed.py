"""Megatron `.bin/.idx` files and the megatron-core GPTDatasets read from them."""

from __future__ import annotations

import os
from typing import Optional

import torch
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

from megatron_mm.data.tokenizer import SentencePieceTokenizer


def write_indexed_dataset(texts: list[str], tokenizer: SentencePieceTokenizer, prefix: str) -> tuple[int, int]:
    """Tokenize each text as one document (eod appended) into `prefix.bin/.idx`.

    Returns (documents, tokens), the token count including the eod tokens.
    """
    folder = os.path.dirname(prefix)
    if folder:
        os.makedirs(folder, exist_ok=True)
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=DType.optimal_dtype(tokenizer.vocab_size))
    tokens = 0
    for text in texts:
        ids = tokenizer.tokenize(text) + [tokenizer.eod]
        builder.add_item(torch.tensor(ids, dtype=torch.int64))
        builder.end_document()
        tokens += len(ids)
    builder.finalize(prefix + ".idx")
    return len(texts), tokens


def _built_on_every_rank() -> bool:
    """Every rank reads data; megatron-core builds on rank 0 first when torch.distributed is up."""
    return True


def build_gpt_datasets(
    prefix: str,
    tokenizer: SentencePieceTokenizer,
    seq_length: int,
    seed: int,
    split: str,
    num_train_samples: Optional[int],
    num_valid_samples: Optional[int],
    cache_dir: str,
) -> tuple[Optional[GPTDataset], Optional[GPTDataset]]:
    """Train and valid megatron-core GPTDatasets over `prefix.bin/.idx`.

    `split` is megatron's "train,valid,test" weights over documents; a split with zero
    weight comes back None. A sample count of None gives exactly one (shuffled) epoch.
    Shuffle indices are cached under `cache_dir`, keyed by megatron-core's hash of the
    config. Works with or without torch.distributed; when it is initialised every rank
    must call this (rank 0 builds the caches, the others then load them).
    """
    for ext in (".bin", ".idx"):
        if not os.path.isfile(prefix + ext):
            raise FileNotFoundError(f"indexed dataset {prefix}{ext}: not found")
    config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        blend=([prefix], None),
        split=split,
        path_to_cache=cache_dir,
        mmap_bin_files=True,
        tokenizer=tokenizer,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
    )
    sizes = [num_train_samples, num_valid_samples, None]
    train, valid, _ = BlendedMegatronDatasetBuilder(GPTDataset, sizes, _built_on_every_rank, config).build()
    return train, valid
