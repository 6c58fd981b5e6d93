"""The data path: corpus, tokenizer, indexed files, GPTDataset samples, batches, caching, tool."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys

import numpy
import pytest
import torch
from megatron.core.datasets.indexed_dataset import IndexedDataset

from megatron_mm import data
from megatron_mm.config import Config
from megatron_mm.data.batches import GlobalBatchSampler, microbatch_iterator
from megatron_mm.data.corpus import COLOUR_OF, generate_corpus
from megatron_mm.data.indexed import build_gpt_datasets, write_indexed_dataset
from megatron_mm.data.synthetic import SyntheticDataset
from megatron_mm.data.tokenizer import SentencePieceTokenizer, train_sentencepiece

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE_KEYS = {"tokens", "labels", "loss_mask", "position_ids"}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A 200-document corpus, its 256-piece tokenizer and its indexed dataset."""
    folder = tmp_path_factory.mktemp("built")
    texts = generate_corpus(200, seed=3)
    tokenizer = SentencePieceTokenizer(train_sentencepiece(texts, str(folder / "tok"), 256))
    prefix = str(folder / "corpus")
    counts = write_indexed_dataset(texts, tokenizer, prefix)
    return {"texts": texts, "tokenizer": tokenizer, "prefix": prefix, "counts": counts, "folder": folder}


def small_config(tmp_path, **data_overrides) -> Config:
    cfg = Config()
    cfg.model.vocab_size = 256
    cfg.model.seq_length = 32
    cfg.data.cache_dir = str(tmp_path / "cache")
    cfg.data.corpus_documents = 200
    for key, value in data_overrides.items():
        setattr(cfg.data, key, value)
    return cfg


# --------------------------------------------------------------------------- corpus


def test_corpus_is_deterministic_and_consistent():
    corpus = generate_corpus(400, seed=11)
    assert corpus == generate_corpus(400, seed=11)
    assert corpus != generate_corpus(400, seed=12)
    assert all(20 <= len(doc.split()) <= 120 for doc in corpus)
    text = " ".join(corpus)
    sums = re.findall(r"(\d+) plus (\d+) is (\d+)\.", text)
    products = re.findall(r"(\d+) times (\d+) is (\d+)\.", text)
    assert sums and products
    assert all(int(a) + int(b) == int(c) for a, b, c in sums)
    assert all(int(a) * int(b) == int(c) for a, b, c in products)
    colours = re.findall(r"the (\w+) is (\w+)\.", text)
    assert colours and all(COLOUR_OF[thing] == colour for thing, colour in colours)


# --------------------------------------------------------------------------- tokenizer


def test_tokenizer_round_trip_and_special_tokens(built, tmp_path):
    tokenizer, texts = built["tokenizer"], built["texts"]
    assert tokenizer.vocab_size <= 256
    assert (tokenizer.eod, tokenizer.bos, tokenizer.pad) == (2, 1, 3)
    assert tokenizer.inv_vocab[tokenizer.eod] == "</s>" and tokenizer.vocab["</s>"] == tokenizer.eod
    assert len(tokenizer.vocab) == tokenizer.vocab_size
    for text in texts[:50]:
        ids = tokenizer.tokenize(text)
        assert 0 < len(ids) and max(ids) < tokenizer.vocab_size and tokenizer.eod not in ids
        assert tokenizer.detokenize(ids) == text
    again = SentencePieceTokenizer(train_sentencepiece(texts, str(tmp_path / "again"), 256))
    assert again.vocab == tokenizer.vocab  # training is deterministic


# --------------------------------------------------------------------------- indexed files


def test_indexed_dataset_round_trip(built):
    tokenizer, texts = built["tokenizer"], built["texts"]
    written = [tokenizer.tokenize(t) + [tokenizer.eod] for t in texts]
    assert built["counts"] == (len(texts), sum(map(len, written)))
    dataset = IndexedDataset(built["prefix"])
    assert len(dataset) == len(texts)
    assert [dataset[i].tolist() for i in range(len(texts))] == written


def check_gpt_sample(sample: dict, seq_length: int, vocab_size: int) -> None:
    assert set(sample) == SAMPLE_KEYS
    for key in SAMPLE_KEYS:
        assert sample[key].shape == (seq_length,)
    assert sample["tokens"].dtype == torch.int64 and sample["loss_mask"].dtype == torch.float32
    assert torch.equal(sample["labels"][:-1], sample["tokens"][1:])
    assert torch.equal(sample["position_ids"], torch.arange(seq_length))
    assert int(sample["tokens"].max()) < vocab_size


def test_gpt_datasets_samples(built, tmp_path):
    tokenizer = built["tokenizer"]
    train, valid = build_gpt_datasets(built["prefix"], tokenizer, 32, 1234, "90,10,0", None, None,
                                      str(tmp_path / "cache"))
    # Arrays read from an IndexedDataset are views of its mmap: keep the dataset alive.
    indexed = train.dataset
    tokens_in_split = lambda ds: int(indexed.sequence_lengths[ds.indices].sum())
    assert len(train) == (tokens_in_split(train) - 1) // 32  # one epoch, last partial sample dropped
    assert len(valid) == (tokens_in_split(valid) - 1) // 32
    assert len(train.indices) == 180 and len(valid.indices) == 20
    for i in (0, 1, len(train) - 1):
        check_gpt_sample(train[i], 32, tokenizer.vocab_size)
    check_gpt_sample(valid[0], 32, tokenizer.vocab_size)
    # Each sample (tokens plus the last label) is a window of the training documents,
    # concatenated in megatron-core's shuffled document order.
    stream = numpy.concatenate([indexed[int(d)] for d in train.document_index]).astype(numpy.int64).tobytes()
    for i in (0, 7, len(train) - 1):
        window = torch.cat([train[i]["tokens"], train[i]["labels"][-1:]]).numpy().tobytes()
        assert stream.find(window) % 8 == 0
    assert os.listdir(tmp_path / "cache")  # shuffle indices were cached

    longer, none = build_gpt_datasets(built["prefix"], tokenizer, 32, 1234, "100,0,0", 5 * len(train), None,
                                      str(tmp_path / "cache"))
    assert none is None and len(longer) >= 5 * len(train)


def test_gpt_datasets_same_with_torch_distributed(built, tmp_path):
    args = (built["prefix"], built["tokenizer"], 32, 7, "90,10,0", None, None, str(tmp_path / "cache"))
    plain, _ = build_gpt_datasets(*args)
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        distributed, _ = build_gpt_datasets(*args)
    finally:
        torch.distributed.destroy_process_group()
    assert len(distributed) == len(plain)
    for i in range(0, len(plain), 17):
        assert torch.equal(distributed[i]["tokens"], plain[i]["tokens"])


# --------------------------------------------------------------------------- synthetic


def test_synthetic_dataset_matches_gpt_sample_format():
    dataset = SyntheticDataset(num_samples=10, seq_length=16, vocab_size=50, seed=5)
    sample = dataset[3]
    check_gpt_sample(sample, 16, 50)
    assert torch.equal(sample["tokens"], SyntheticDataset(10, 16, 50, seed=5)[3]["tokens"])
    assert torch.equal(sample["tokens"], SyntheticDataset(10, 16, 50, seed=4)[4]["tokens"])  # seed + index
    assert not torch.equal(sample["tokens"], dataset[4]["tokens"])
    assert torch.equal(sample["loss_mask"], torch.ones(16))
    with pytest.raises(IndexError):
        dataset[10]


# --------------------------------------------------------------------------- batches


def layout_batch(step: int, dp: int, mbs: int, gbs: int, length: int) -> list[int]:
    sampler = GlobalBatchSampler(length, mbs, gbs, dp)
    return [i for r in range(dp) for m in range(sampler.num_microbatches) for i in sampler.microbatch(step, r, m)]


def test_global_batch_is_layout_independent():
    for step in (1, 2, 3):
        expected = list(range((step - 1) * 8, step * 8))
        for dp, mbs in ((1, 4), (2, 2), (4, 1)):
            assert layout_batch(step, dp, mbs, 8, length=100) == expected
    assert set(layout_batch(1, 2, 2, 8, 100)).isdisjoint(layout_batch(2, 2, 2, 8, 100))
    sampler = GlobalBatchSampler(100, 2, 8, 2)
    assert sampler.num_microbatches == 2
    assert sampler.rank_indices(2, 1) == [12, 13, 14, 15]
    assert sampler.microbatch(2, 1, 1) == [14, 15]
    assert layout_batch(2, 2, 2, 8, length=10) == [8, 9, 0, 1, 2, 3, 4, 5]  # wraps around
    with pytest.raises(ValueError, match="divisible"):
        GlobalBatchSampler(100, 3, 8, 1)
    with pytest.raises(ValueError, match="numbered from 1"):
        sampler.global_batch(0)


def test_microbatch_iterator_collates_the_rank_slice():
    dataset = SyntheticDataset(40, 16, 50, seed=0)
    batches = list(microbatch_iterator(dataset, step=2, dp_rank=1, dp_size=2, mbs=2, gbs=8))
    assert len(batches) == 2
    for batch, indices in zip(batches, ([12, 13], [14, 15])):
        assert set(batch) == SAMPLE_KEYS and batch["tokens"].shape == (2, 16)
        for key in SAMPLE_KEYS:
            assert torch.equal(batch[key], torch.stack([dataset[i][key] for i in indices]))


# --------------------------------------------------------------------------- prepare / build


def temp_folders(cache_dir: str) -> list[str]:
    return [name for name in os.listdir(cache_dir) if name.startswith(".")]


def test_prepare_corpus_builds_once(tmp_path, capsys, monkeypatch):
    cfg = small_config(tmp_path)
    prefix, model = data.prepare_corpus(cfg)
    assert "building the corpus" in capsys.readouterr().out
    assert os.path.dirname(prefix).startswith(cfg.data.cache_dir + os.sep + "corpus-")
    assert os.stat(os.path.dirname(prefix)).st_mode & 0o777 == 0o755
    indexed = IndexedDataset(prefix)
    assert len(indexed) == 200
    tokenizer = SentencePieceTokenizer(model)
    first = generate_corpus(1, data.CORPUS_SEED)[0]
    assert indexed[0].tolist() == tokenizer.tokenize(first) + [tokenizer.eod]

    def no_rebuild(*args):
        raise AssertionError("rebuilt a cached corpus")

    monkeypatch.setattr(data, "_build_corpus", no_rebuild)
    assert data.prepare(cfg) == (prefix, model)
    assert capsys.readouterr().out == ""
    assert temp_folders(cfg.data.cache_dir) == []

    train, valid, vocab = data.build_datasets(cfg, prefix, model)
    assert vocab == tokenizer.vocab_size <= 256
    assert len(train) > 0 and valid is not None
    check_gpt_sample(train[0], 32, vocab)


def test_prepare_corpus_loses_rename_race(tmp_path, monkeypatch):
    cfg = small_config(tmp_path)
    final = data._corpus_dir(cfg)
    build = data._build_corpus

    def another_process_wins(folder, *args):
        result = build(folder, *args)
        shutil.copytree(folder, final)
        open(os.path.join(final, "winner"), "w").close()
        return result

    monkeypatch.setattr(data, "_build_corpus", another_process_wins)
    prefix, model = data.prepare_corpus(cfg)
    assert os.path.dirname(prefix) == final and os.path.exists(os.path.join(final, "winner"))
    assert os.path.isfile(prefix + ".bin") and os.path.isfile(model)
    assert temp_folders(cfg.data.cache_dir) == []


def test_build_datasets_synthetic(tmp_path):
    cfg = small_config(tmp_path, source="synthetic")
    cfg.model.vocab_size = 100
    assert data.prepare(cfg) == (None, None)
    train, valid, vocab = data.build_datasets(cfg, None, None)
    assert vocab == 100 and len(train) == cfg.train.steps * cfg.train.global_batch_size
    check_gpt_sample(train[0], 32, 100)
    assert not torch.equal(train[0]["tokens"], valid[0]["tokens"])


def test_tokenizer_larger_than_model_vocab_is_rejected(built, tmp_path):
    cfg = small_config(tmp_path, source="indexed", prefix=built["prefix"])
    cfg.model.vocab_size = 64
    model = str(built["folder"] / "tok.model")
    with pytest.raises(ValueError, match=rf"model.vocab_size=64 .*{built['tokenizer'].vocab_size}"):
        data.build_datasets(cfg, built["prefix"], model)


# --------------------------------------------------------------------------- tools/prepare_data.py


def load_tool():
    spec = importlib.util.spec_from_file_location("prepare_data_tool", os.path.join(REPO, "tools", "prepare_data.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_prepare_data_tool_end_to_end(tmp_path, built):
    documents = built["texts"][:30]
    source = tmp_path / "docs.txt"
    source.write_text("\n\n\n".join(documents) + "\n  \n")
    prefix = str(tmp_path / "out" / "mine")
    run = subprocess.run(
        [sys.executable, "tools/prepare_data.py", "--input", str(source), "--out", prefix, "--vocab-size", "200"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert run.returncode == 0, run.stderr
    summary = json.loads(run.stdout.strip().splitlines()[-1])
    tokenizer = SentencePieceTokenizer(prefix + ".model")
    written = [tokenizer.tokenize(doc) + [tokenizer.eod] for doc in documents]
    assert summary == {"documents": 30, "tokens": sum(map(len, written)), "vocab_size": tokenizer.vocab_size,
                       "prefix": prefix, "tokenizer": prefix + ".model"}
    assert tokenizer.vocab_size <= 200
    dataset = IndexedDataset(prefix)
    assert [dataset[i].tolist() for i in range(len(dataset))] == written


def test_prepare_data_tool_reuses_a_tokenizer_and_reports_bad_input(tmp_path, built, capsys):
    tool = load_tool()
    source = tmp_path / "docs.jsonl"
    source.write_text("\n".join(json.dumps({"text": t}) for t in built["texts"][:5]) + "\n")
    model = str(built["folder"] / "tok.model")
    assert tool.main(["--input", str(source), "--out", str(tmp_path / "j"), "--tokenizer", model]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["documents"] == 5 and summary["tokenizer"] == model
    indexed = IndexedDataset(str(tmp_path / "j"))
    assert indexed[4].tolist() == built["tokenizer"].tokenize(built["texts"][4]) + [2]

    (tmp_path / "empty.txt").write_text("\n \n\n")
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"body": 1}\n')
    cases = {str(tmp_path / "missing.txt"): "file not found", str(tmp_path / "empty.txt"): "no documents",
             str(tmp_path / "bad.jsonl"): "bad.jsonl:2"}
    for path, message in cases.items():
        assert tool.main(["--input", path, "--out", str(tmp_path / "x"), "--vocab-size", "100"]) == 2
        assert message in capsys.readouterr().err
