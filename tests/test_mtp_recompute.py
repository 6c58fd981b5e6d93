"""Multi-token prediction and full recomputation on CPU/gloo: one MTP layer on the last pipeline
stage reproduces one rank's LM and MTP losses under PP2, and parallel.recompute=full reproduces
recompute=none bit for bit, on one rank and under PP2. All runs start from one iteration-0
checkpoint (its own file: on a pytest-xdist worker of its own beside tests/test_training.py)."""

import json

import pytest

from conftest import TEXT_COMMON, pretrain

COMMON = TEXT_COMMON
LOSS_TOLERANCE = 2e-4  # as tests/test_training.py: TP/PP reductions may reorder fp32 sums


@pytest.fixture(scope="module")
def mtp_runs(tmp_path_factory, data_cache) -> dict:
    """With one MTP layer, from one set of initial weights: 4 steps on one rank and under PP2,
    each with parallel.recompute=none and full. Metrics rows per (nproc, recompute)."""
    root = tmp_path_factory.mktemp("mtp")
    mtp = [*COMMON, f"data.cache_dir={data_cache}", "model.mtp_num_layers=1", "train.steps=4"]
    pretrain(1, mtp + ["train.steps=0", f"run.dir={root}/init"])
    rows = {}
    for nproc, layout in ((1, []), (2, ["parallel.pp=2"])):
        for recompute in ("none", "full"):
            out = root / f"{nproc}_{recompute}"
            pretrain(nproc, mtp + layout + [f"checkpoint.load={root}/init/checkpoints",
                                            f"parallel.recompute={recompute}", f"run.dir={out}"])
            with open(out / "metrics.jsonl") as f:
                rows[nproc, recompute] = [json.loads(line) for line in f]
    return rows


def test_mtp_loss_matches_across_pipeline(mtp_runs):
    """With one MTP layer (on the last stage), PP2 reproduces one rank's LM and MTP losses."""
    for a, b in zip(mtp_runs[1, "none"], mtp_runs[2, "none"], strict=True):
        assert 4.0 < a["mtp_1_loss"] < 7.0
        assert b["loss"] == pytest.approx(a["loss"], rel=LOSS_TOLERANCE)
        assert b["mtp_1_loss"] == pytest.approx(a["mtp_1_loss"], rel=LOSS_TOLERANCE)


def test_full_recompute_reproduces_the_losses(mtp_runs):
    """parallel.recompute=full (every decoder and MTP layer recomputes its forward in the
    backward pass, runtime/compat.py cpu_checkpoint_rng on CPU) gives the losses, MTP losses
    and gradient norms of recompute=none, on one rank and under PP2. Measured: identical to
    the last bit over 4 steps (the recomputed forward runs the same kernels in the same
    order), so the test asks for equality."""
    for nproc in (1, 2):
        plain_rows, full_rows = mtp_runs[nproc, "none"], mtp_runs[nproc, "full"]
        assert [r["step"] for r in full_rows] == [1, 2, 3, 4]
        for plain, recomputed in zip(plain_rows, full_rows, strict=True):
            for key in ("loss", "mtp_1_loss", "grad_norm"):
                assert recomputed[key] == plain[key], (nproc, plain["step"], key, recomputed[key], plain[key])
