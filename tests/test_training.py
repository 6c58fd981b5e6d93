"""Multi-rank training on CPU/gloo with real megatron-core: layout equivalence, resume,
learning. Every layout starts from the same initial weights (an iteration-0 checkpoint
loaded through dist_checkpointing) and sees the same global batches."""

import json
import os

import pytest

from conftest import QUICKSTART, TEXT_COMMON, TEXT_LAYOUTS, TEXT_STEPS, losses, pretrain

STEPS = TEXT_STEPS
COMMON = TEXT_COMMON
# Reduction order differs between layouts (TP partial sums, DP gradient sums); fp32.
LOSS_TOLERANCE = 2e-4
LAYOUTS = [name for name in TEXT_LAYOUTS if name != "single"]


@pytest.fixture(scope="module")
def reference(text_layout_runs):
    """Initial weights (iteration 0) and the single-rank loss curve from them."""
    single = text_layout_runs("single")
    return {"init": text_layout_runs.init, "data": text_layout_runs.data, "losses": losses(single),
            "single": single}


def test_single_rank_curve_is_complete(reference):
    assert sorted(reference["losses"]) == list(range(1, STEPS + 1))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_layout_matches_single_rank(layout, reference, text_layout_runs):
    nproc, sets = TEXT_LAYOUTS[layout]
    run_dir = text_layout_runs(layout)
    got, want = losses(run_dir), reference["losses"]
    assert sorted(got) == sorted(want)
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=LOSS_TOLERANCE), (layout, step, got[step], want[step])
    check_rank_map(run_dir, nproc, sets)


def check_rank_map(run_dir: str, nproc: int, layout: list[str]) -> None:
    """The coordinates and parameter count every rank reported (rank_map.json) are what the
    planner predicts: megatron-core's RankGenerator and `rank_parameters`."""
    from megatron_mm.config import load_config
    from megatron_mm.planning.layout import rank_map
    from megatron_mm.costs.memory import rank_parameters

    cfg = load_config(QUICKSTART, layout)
    p = cfg.parallel
    with open(os.path.join(run_dir, "rank_map.json")) as f:
        reported = json.load(f)["ranks"]
    keys = ("rank", "tp", "pp", "dp", "ep", "etp", "edp")
    predicted = rank_map(p.tp, p.pp, p.ep, p.etp, nproc, gpus_per_node=nproc)
    assert [{k: r[k] for k in keys} for r in reported] == [{k: getattr(c, k) for k in keys} for c in predicted]
    assert [r["params"] for r in reported] == [rank_parameters(cfg, c.pp).total for c in predicted]


def test_resume_is_bit_exact(reference, tmp_path):
    """Resuming the single-rank run's step-4 checkpoint (as after a kill at step 4) gives the
    same losses for steps 5..10 bit for bit (into other layouts: test_resume_matrix.py)."""
    data = reference["data"]
    ckpt = os.path.join(reference["single"], "checkpoints", "iter_0000004")
    pretrain(1, [*COMMON, *data, f"checkpoint.load={ckpt}", f"run.dir={tmp_path}/same"])
    want, same = reference["losses"], losses(f"{tmp_path}/same")
    assert sorted(same) == list(range(5, STEPS + 1))
    for step in same:
        assert same[step] == want[step], (step, same[step], want[step])


def test_metrics_contract(reference):
    with open(os.path.join(reference["single"], "metrics.jsonl")) as f:
        record = json.loads(f.readline())
    for key in ("step", "loss", "lr", "grad_norm", "tokens_per_s", "tflops_per_gpu", "mfu",
                "moe/load_imbalance_layer2"):
        assert key in record, key
    assert record["moe/load_imbalance_layer2"] >= 1.0
    assert "moe/load_imbalance_layer1" not in record  # layer 1 is dense


def test_missing_and_corrupt_checkpoints_are_reported(reference, tmp_path):
    proc = pretrain(1, COMMON + reference["data"] + [f"checkpoint.load={tmp_path}", f"run.dir={tmp_path}/r"], check=False)
    assert proc.returncode != 0 and "no checkpoint here" in proc.stderr
    bad = tmp_path / "bad"
    (bad / "iter_0000003").mkdir(parents=True)
    (bad / "latest_checkpointed_iteration.txt").write_text("3")
    proc = pretrain(1, COMMON + reference["data"] + [f"checkpoint.load={bad}", f"run.dir={tmp_path}/r2"], check=False)
    assert proc.returncode != 0 and "not a complete distributed checkpoint" in proc.stderr
