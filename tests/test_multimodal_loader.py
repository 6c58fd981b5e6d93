"""The DALI and PyTorch media loaders: agreement, DP sharding, resume position, bad data.

Runs on CPU (DALI's CPU pipeline); small fixture shards are written per test module.
"""

import json
import os
import tarfile
import warnings

import pytest
import torch

warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")

from megatron_mm.data.multimodal.fixture import fixture_sample, write_fixture_shards, write_shard  # noqa: E402
from megatron_mm.data.multimodal.image_spec import ImageSpec  # noqa: E402
from megatron_mm.data.multimodal.loader_torch import TorchMediaLoader  # noqa: E402
from megatron_mm.data.multimodal.plan import SamplePlan  # noqa: E402
from megatron_mm.data.multimodal.samples import MediaSpec  # noqa: E402
from megatron_mm.data.multimodal.shard_index import load_catalogue, resolve_shards  # noqa: E402

dali = pytest.importorskip("megatron_mm.data.multimodal.loader_dali")

# Measured on the fixture (README): images differ by at most 5/255 levels (resize kernels,
# JPEG IDCT); mels of 16 kHz clips by < 1e-4; of 44.1 kHz clips by < 0.18 (max) in the top mel
# bin (near 8 kHz, where DALI's and scipy's anti-alias filters differ; most at the frame where a
# clip shorter than the window is cut to silence, a broadband step), and ~1e-3 on average.
IMAGE_TOL = 6 / 127.5
MEL_TOL_16K, MEL_TOL_RESAMPLED, MEL_MEAN_TOL_RESAMPLED = 1e-3, 0.2, 5e-3


def loaders(shards, cache, log=None, **kwargs):
    """{"dali": ..., "torch": ...} over the same shards and options."""
    extra = {"log": log} if log else {}
    return {"dali": dali.DaliMediaLoader(shards, batch_size=4, device_id=None, cache_dir=cache, **extra, **kwargs),
            "torch": TorchMediaLoader(shards, cache_dir=cache, **extra, **kwargs)}


def take(loader, n):
    it = iter(loader)
    return [next(it) for _ in range(n)]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    folder = tmp_path_factory.mktemp("shards")
    write_fixture_shards(str(folder), 22, samples_per_shard=8)
    return str(folder)


@pytest.fixture(scope="module")
def bad_shards(tmp_path_factory):
    """10 good samples in two shards, plus one of each bad case; the last shard is truncated."""
    folder = tmp_path_factory.mktemp("bad")
    good = [fixture_sample(i) for i in range(10)]
    caption = json.dumps({"text": "<image> a picture"}).encode()
    garbage = {"__key__": "bad-garbage", "json": caption, "jpg": os.urandom(300)}
    corrupt_body = {"__key__": "bad-body", "json": caption, "jpg": b"\xff\xd8\xff\xe0" + b"\x00\x10JFIF" * 50}
    no_audio = {"__key__": "bad-noaudio", "json": json.dumps({"text": "listen: <audio>"}).encode()}
    empty = {**fixture_sample(0), "__key__": "bad-empty", "json": json.dumps({"text": "  "}).encode()}
    write_shard(str(folder / "a.tar"), good[:3] + [garbage, corrupt_body] + good[3:5] + [no_audio])
    write_shard(str(folder / "b.tar"), good[5:7] + [empty] + good[7:])
    truncated = {**fixture_sample(0), "__key__": "bad-truncated"}
    path = write_shard(str(folder / "c.tar"), [fixture_sample(10), truncated])
    with tarfile.open(path) as archive:
        wav = archive.getmember("bad-truncated.wav")
    os.truncate(path, wav.offset_data + wav.size // 2)  # cut inside the last sample's audio
    return str(folder)


BAD_KEYS = {"bad-garbage", "bad-body", "bad-noaudio", "bad-empty", "bad-truncated"}


def test_loaders_agree(shards, tmp_path):
    out = {name: take(loader, 22) for name, loader in loaders(shards, str(tmp_path)).items()}
    d, t = out["dali"], out["torch"]
    assert [s.key for s in d] == [s.key for s in t] == [f"{i:06d}" for i in range(1, 23)]
    assert [s.meta for s in d] == [s.meta for s in t]
    rates = {s.key: 16000 if (int(s.key) - 1) // 2 % 2 == 0 else 44100 for s in t}
    for a, b in zip(d, t):
        assert (a.image is None) == (b.image is None) and (a.mel is None) == (b.mel is None), a.key
        if b.image is not None:
            assert a.image.shape == b.image.shape == (3, 32, 32) and a.image.dtype == b.image.dtype
            assert (a.image - b.image).abs().max() <= IMAGE_TOL, a.key
            assert -1.0 <= float(b.image.min()) and float(b.image.max()) <= 1.0
        if b.mel is not None:
            assert a.mel.shape == b.mel.shape == (80, 100)
            error = (a.mel - b.mel).abs()
            if rates[b.key] == 16000:
                assert error.max() <= MEL_TOL_16K, (a.key, float(error.max()))
            else:
                assert error.max() <= MEL_TOL_RESAMPLED and error.mean() <= MEL_MEAN_TOL_RESAMPLED, a.key
    assert sum(s.image is not None for s in t) == 12 and sum(s.mel is not None for s in t) == 11


def test_image_normalisation_from_spec(shards, tmp_path):
    """model.vision.preprocess's rescale_factor/mean/std reach both loaders:
    (x * rescale_factor - mean) / std per channel."""
    mean, std = (20.0, 40.0, 60.0), (50.0, 25.0, 100.0)
    spec = MediaSpec(image=ImageSpec(32, rescale_factor=1.0, mean=mean, std=std), mel_frames=100)
    plain = {n: take(l, 22) for n, l in loaders(shards, str(tmp_path)).items()}
    custom = {n: take(l, 22) for n, l in loaders(shards, str(tmp_path), spec=spec).items()}
    m, sd = torch.tensor(mean).view(3, 1, 1), torch.tensor(std).view(3, 1, 1)
    for name in ("dali", "torch"):
        for a, b in zip(plain[name], custom[name]):
            if a.image is not None:
                expected = (a.image * 127.5 + 127.5 - m) / sd
                assert (b.image - expected).abs().max() < 1e-4, (name, a.key)


def test_dp_sharding(shards, tmp_path):
    catalogue = load_catalogue(resolve_shards(shards), str(tmp_path))
    for shuffle in (False, True):
        slices = [[e.key for e in SamplePlan(catalogue, r, 3, seed=5, shuffle=shuffle).epoch_slice(0)]
                  for r in range(3)]
        assert sorted(k for s in slices for k in s) == [f"{i:06d}" for i in range(1, 23)]
        assert [len(s) for s in slices] == [7, 7, 8]
    # Both loaders read rank 1 of 2 the same way: keys 12..22 of the stored order.
    for name, loader in loaders(shards, str(tmp_path), dp_rank=1, dp_size=2).items():
        assert [s.key for s in take(loader, 11)] == [f"{i:06d}" for i in range(12, 23)], name
    with pytest.raises(ValueError, match="dp_rank=2"):
        SamplePlan(catalogue, 2, 2)


@pytest.mark.parametrize("name", ["dali", "torch"])
def test_resume_position(name, bad_shards, tmp_path):
    """Interrupting after k samples and resuming at loader.position repeats nothing and loses
    nothing, across an epoch boundary, with shard shuffling and skipped samples on the way."""
    opts = dict(shuffle=True, seed=3, dp_rank=0, dp_size=2, log=lambda line: None)
    full = loaders(bad_shards, str(tmp_path), **opts)[name]
    expected = [s.key for s in take(full, 14)]
    assert full.plan.samples_per_epoch == 8 and full.position > 8  # crossed into epoch 2
    first = loaders(bad_shards, str(tmp_path), **opts)[name]
    head = [s.key for s in take(first, 5)]
    resumed = loaders(bad_shards, str(tmp_path), start=first.position, **opts)[name]
    assert head + [s.key for s in take(resumed, 9)] == expected
    assert resumed.position == full.position


@pytest.mark.parametrize("name", ["dali", "torch"])
def test_bad_samples_skipped_logged_counted(name, bad_shards, tmp_path):
    lines = []
    loader = loaders(bad_shards, str(tmp_path), log=lines.append)[name]
    keys = [s.key for s in take(loader, 22)]  # two epochs of 11 good samples
    assert keys == 2 * [f"{i:06d}" for i in range(1, 12)]
    assert loader.skipped == 2 * len(BAD_KEYS) - 1  # the epoch-2 skip at its end is not yet passed
    assert len(lines) == len(BAD_KEYS)  # once per bad sample, not once per epoch
    logged = {line.split()[3]: line for line in lines}
    assert set(logged) == BAD_KEYS
    assert all(line.startswith(f"data: skipped sample {key} in {bad_shards}/") for key, line in logged.items())
    assert "has <audio> but the sample has no audio" in logged["bad-noaudio"]
    assert "empty caption" in logged["bad-empty"]
    if name == "dali":
        assert "not a JPEG or PNG" in logged["bad-garbage"] and "truncated tar" in logged["bad-truncated"]
        assert "decoders.image" in logged["bad-body"] and loader.rebuilds == 2 * 4  # batch of 4, twice


def test_torch_workers_keep_order(bad_shards, tmp_path):
    lines = []
    loader = TorchMediaLoader(bad_shards, num_workers=2, cache_dir=str(tmp_path), log=lines.append)
    assert [s.key for s in take(loader, 11)] == [f"{i:06d}" for i in range(1, 12)]
    assert loader.skipped == 4 and len(lines) == 4  # the truncated one comes after the last good one


def test_no_shards(tmp_path):
    with pytest.raises(ValueError, match="no .tar shards"):
        TorchMediaLoader(str(tmp_path), cache_dir=str(tmp_path))


def test_training_runs_through_bad_samples(bad_shards, data_cache, tmp_path):
    """A multimodal run over shards with a corrupt image, an undecodable one, a missing audio
    member, an empty caption and a truncated tar: it trains its steps, names each bad
    sample once and counts them in metrics.jsonl's `data_skipped`."""
    from conftest import QUICKSTART_MULTIMODAL, pretrain

    from megatron_mm.config import load_config
    from megatron_mm.data.multimodal.prepare import prepare_demo

    cache = [f"data.cache_dir={data_cache}", "data.demo_samples=200"]
    tokenizer = prepare_demo(load_config(QUICKSTART_MULTIMODAL, cache))["tokenizer"]  # any tokenizer with <image>/<audio>
    proc = pretrain(1, cache + ["data.source=shards", f"data.shards={bad_shards}", f"data.tokenizer={tokenizer}",
                                "train.steps=3", "train.scheduler.warmup_steps=1", "train.global_batch_size=2",
                                "train.micro_batch_size=1",
                                "logging.interval=1", "logging.tensorboard=false", f"run.dir={tmp_path}"],
                    config=QUICKSTART_MULTIMODAL)
    with open(os.path.join(tmp_path, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    assert [r["step"] for r in rows] == [1, 2, 3]
    for key in BAD_KEYS:
        assert f"skipped sample {key}" in proc.stdout + proc.stderr, key
    assert rows[-1]["data_skipped"] >= len(BAD_KEYS)
