"""The files a multimodal run reads: shards and a tokenizer with the modality pieces.

`data.source=demo` (the quickstart) generates the procedural caption set once per cache
(`tools/make_demo_data.py` + `tools/build_shards.py` + a tokenizer trained on its
captions); `data.source=shards` reads the user's shards and tokenizer as they are.
"""

from __future__ import annotations

import hashlib
import json
import os

from megatron_mm.config import Config
from megatron_mm.data.cache import build_once
from megatron_mm.data.multimodal.demo import make_demo_data
from megatron_mm.data.multimodal.shards import build_shards
from megatron_mm.data.multimodal.text import train_multimodal_tokenizer

DEMO_VERSION = 3
DEMO_SEED = 0  # the demo set is fixed; train.seed only changes initialisation and order


def demo_dir(cfg: Config) -> str:
    params = {"samples": cfg.data.demo_samples, "seed": DEMO_SEED, "vocab_size": cfg.model.vocab_size,
              "image_size": cfg.model.vision.image_size if cfg.model.vision else 32, "version": DEMO_VERSION}
    digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:12]
    return os.path.join(os.path.expanduser(cfg.data.cache_dir), f"demo-{digest}")


def prepare_demo(cfg: Config) -> dict:
    """Build (once) and return the demo set's paths: train/heldout/novel shards and jsonl, tokenizer."""
    final = demo_dir(cfg)
    paths = {
        "train": os.path.join(final, "train"), "heldout": os.path.join(final, "heldout"),
        "novel": os.path.join(final, "novel"),
        "train_jsonl": os.path.join(final, "raw", "train.jsonl"),
        "heldout_jsonl": os.path.join(final, "raw", "heldout.jsonl"),
        "novel_jsonl": os.path.join(final, "raw", "novel.jsonl"),
        "tokenizer": os.path.join(final, "tokenizer.model"),
    }
    if os.path.isdir(final):
        return paths
    print(f"data: building the demo set ({cfg.data.demo_samples} samples) in {final}", flush=True)

    def build(folder: str) -> None:
        image_size = cfg.model.vision.image_size if cfg.model.vision else 32
        make_demo_data(os.path.join(folder, "raw"), cfg.data.demo_samples, DEMO_SEED, image_size=image_size)
        for split in ("train", "heldout", "novel"):
            summary = build_shards(os.path.join(folder, "raw", f"{split}.jsonl"), os.path.join(folder, split),
                                   samples_per_shard=500)
            if summary["bad"]:
                raise RuntimeError(f"demo set: {summary['bad']} bad rows in {split} (a generator bug)")
        with open(os.path.join(folder, "raw", "train.jsonl")) as f:
            rows = [json.loads(line) for line in f if line.strip()]
        train_multimodal_tokenizer(rows, os.path.join(folder, "tokenizer"), cfg.model.vocab_size)
        print(f"data: demo set ready: {len(rows)} train samples", flush=True)

    build_once(final, build)
    return paths


def multimodal_files(cfg: Config) -> tuple[str, str]:
    """(train shards, tokenizer .model) of a multimodal data source."""
    if cfg.data.source == "demo":
        paths = prepare_demo(cfg)
        return paths["train"], paths["tokenizer"]
    if cfg.data.source == "shards":
        return cfg.data.shards, cfg.data.tokenizer
    raise ValueError(f"data.source={cfg.data.source}: not a multimodal source (demo or shards)")
