"""The data path: built-in corpus, SentencePiece tokenizer, megatron indexed datasets,
synthetic tokens, and the step-addressed batch sampler.

`prepare(cfg)` makes the files a source needs (once per cache, safe across processes) and
`build_datasets(cfg, prefix, tokenizer)` opens them on every rank.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Optional

from torch.utils.data import Dataset

from megatron_mm.config import Config
from megatron_mm.data.cache import build_once
from megatron_mm.data.batches import GlobalBatchSampler, microbatch_iterator
from megatron_mm.data.corpus import CORPUS_VERSION, generate_corpus
from megatron_mm.data.indexed import build_gpt_datasets, write_indexed_dataset
from megatron_mm.data.synthetic import SyntheticDataset
from megatron_mm.data.tokenizer import SentencePieceTokenizer, check_fits, open_tokenizer, train_sentencepiece

__all__ = [
    "GlobalBatchSampler", "SentencePieceTokenizer", "SyntheticDataset", "build_datasets",
    "build_gpt_datasets", "generate_corpus", "microbatch_iterator", "prepare", "prepare_corpus",
    "train_sentencepiece", "write_indexed_dataset",
]

CORPUS_SEED = 1234  # the corpus is fixed; train.seed only changes the sample order
# Keeps synthetic valid samples apart from train ones (torch's CPU generator keeps 32 seed bits).
SYNTHETIC_VALID_SEED_OFFSET = 1 << 31


def _corpus_dir(cfg: Config) -> str:
    """`<cache_dir>/corpus-<hash of everything that decides the files>`."""
    params = {"documents": cfg.data.corpus_documents, "seed": CORPUS_SEED,
              "vocab_size": cfg.model.vocab_size, "version": CORPUS_VERSION}
    digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:12]
    return os.path.join(os.path.expanduser(cfg.data.cache_dir), f"corpus-{digest}")


def _build_corpus(folder: str, num_documents: int, vocab_size: int) -> tuple[int, int, int]:
    """Write tokenizer.model and corpus.bin/.idx into `folder`; return (documents, tokens, vocab)."""
    texts = generate_corpus(num_documents, CORPUS_SEED)
    tokenizer = SentencePieceTokenizer(train_sentencepiece(texts, os.path.join(folder, "tokenizer"), vocab_size))
    documents, tokens = write_indexed_dataset(texts, tokenizer, os.path.join(folder, "corpus"))
    return documents, tokens, tokenizer.vocab_size


def prepare_corpus(cfg: Config) -> tuple[str, str]:
    """Build the generated corpus once per cache; return (indexed prefix, tokenizer .model).

    The folder is built under a temporary name and renamed into place, so a reader never
    sees a partial one; when processes race, the first rename wins and the rest use it.
    """
    final = _corpus_dir(cfg)
    paths = os.path.join(final, "corpus"), os.path.join(final, "tokenizer.model")
    if os.path.isdir(final):
        return paths
    print(f"data: building the corpus ({cfg.data.corpus_documents} documents, "
          f"vocab {cfg.model.vocab_size}) in {final}", flush=True)

    def build(folder: str) -> None:
        documents, tokens, vocab = _build_corpus(folder, cfg.data.corpus_documents, cfg.model.vocab_size)
        print(f"data: corpus ready: {documents} documents, {tokens} tokens, vocab {vocab}", flush=True)

    build_once(final, build)
    return paths


def prepare(cfg: Config) -> tuple[Optional[str], Optional[str]]:
    """(indexed prefix, tokenizer .model) for `cfg.data.source`; (None, None) for synthetic."""
    source = cfg.data.source
    if source == "synthetic":
        return None, None
    if source == "corpus":
        return prepare_corpus(cfg)
    if source == "indexed":
        return cfg.data.prefix, cfg.data.tokenizer
    raise ValueError(f"data.source={source}: must be synthetic, corpus or indexed")


def run_tokenizer(cfg: Config) -> Optional[str]:
    """The tokenizer a run with `cfg` trains with: `data.tokenizer` when set (an imported model's,
    tools/convert_from_hf.py), else the one the corpus and demo sources build in their cache;
    None for synthetic data. It may not exist on this machine."""
    d = cfg.data
    if d.tokenizer or d.source in ("indexed", "shards"):
        return d.tokenizer
    if d.source == "corpus":
        return os.path.join(_corpus_dir(cfg), "tokenizer.model")
    if d.source == "demo":
        from megatron_mm.data.multimodal.prepare import demo_dir

        return os.path.join(demo_dir(cfg), "tokenizer.model")
    return None


def build_datasets(
    cfg: Config, prefix: Optional[str], tokenizer_path: Optional[str]
) -> tuple[Dataset, Optional[Dataset], int]:
    """(train, valid, tokenizer vocab size) for `cfg.data.source`, from `prepare(cfg)`'s paths.

    Corpus and indexed data are megatron-core GPTDatasets of one shuffled epoch each (the
    batch sampler wraps around it); valid is None when `data.split` gives it no weight.
    Synthetic data has `train.steps` global batches of train samples and one of valid.
    With torch.distributed initialised, every rank must call this.
    """
    d, m, t = cfg.data, cfg.model, cfg.train
    if d.source == "synthetic":
        train_len = max(t.steps, 1) * t.global_batch_size
        train = SyntheticDataset(train_len, m.seq_length, m.vocab_size, t.seed)
        valid = SyntheticDataset(t.global_batch_size, m.seq_length, m.vocab_size,
                                 t.seed + SYNTHETIC_VALID_SEED_OFFSET)
        return train, valid, m.vocab_size
    if d.source not in ("corpus", "indexed"):
        raise ValueError(f"data.source={d.source}: must be synthetic, corpus or indexed")
    if not prefix or not tokenizer_path:
        raise ValueError(f"data.source={d.source}: needs an indexed prefix and a tokenizer "
                         f"(got prefix={prefix!r}, tokenizer={tokenizer_path!r})")
    tokenizer = open_tokenizer(tokenizer_path)
    check_fits(tokenizer, cfg.model.vocab_size)
    cache = os.path.join(os.path.expanduser(d.cache_dir), "gpt-indices")
    train, valid = build_gpt_datasets(prefix, tokenizer, m.seq_length, t.seed, d.split, None, None, cache)
    if train is None or len(train) == 0:
        raise ValueError(f"data.split={d.split}: leaves no training samples of "
                         f"model.seq_length={m.seq_length} in {prefix}")
    return train, valid, tokenizer.vocab_size
