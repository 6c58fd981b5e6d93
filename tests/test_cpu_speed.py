"""The transformers baseline (conversion/transformers_baseline.py) and tools/compare_cpu_speed.py at
toy size: the baseline's model is ours (the same parameter count as the model our loop builds),
it learns a fixed batch, and the tool alternates both and reports what it printed."""

import json
import math
import os

import pytest

from conftest import QUICKSTART, tool

TOY = ["data.source=synthetic", "train.global_batch_size=4", "train.micro_batch_size=2",
       "logging.tensorboard=false", "checkpoint.save_interval=0"]


def test_baseline_learns_a_fixed_batch():
    import torch

    from megatron_mm.config import load_config
    from megatron_mm.conversion.transformers_baseline import measure_transformers_training

    torch.set_num_threads(1)
    cfg = load_config(QUICKSTART, TOY)
    result = measure_transformers_training(cfg, steps=3, warmup=2, device="cpu")
    losses = result["losses"]
    assert len(losses) == 5 and all(math.isfinite(x) for x in losses)
    assert losses[0] == pytest.approx(math.log(cfg.model.vocab_size), abs=0.1)  # random init, uniform guess
    assert all(b < a for a, b in zip(losses, losses[1:])), losses  # Adam on the same tokens every step
    assert losses[-1] < losses[0] - 0.05, losses
    assert len(result["step_seconds"]) == 3 and result["tokens_per_s"] > 0
    assert result["tokens_per_s"] == pytest.approx(4 * cfg.model.seq_length * 3 / sum(result["step_seconds"]))
    assert 0 < result["peak_memory_gib"] < 1  # the profiler's tensors on step 2, as our loop measures


def test_tool_alternates_and_models_match(tmp_path, capsys):
    from megatron_mm.config import load_config
    from megatron_mm.conversion.transformers_baseline import hf_model

    run_dir = tmp_path / "run"
    args = ["--config", QUICKSTART, *[a for o in TOY + [f"run.dir={run_dir}"] for a in ("--set", o)],
            "--rounds", "2", "--steps", "1", "--warmup", "2", "--threads", "1", "--out", str(tmp_path / "c.json")]
    code, out, err = tool("compare_cpu_speed", args, capsys)
    assert code == 0, err
    lines = out.strip().splitlines()
    report = json.loads(lines[-1])
    assert report == json.load(open(tmp_path / "c.json"))
    assert lines[0].split() == ["round", "ours", "tok/s", "transformers", "tok/s", "ratio", "fastest", "steps"]
    assert len(report["rounds"]) == 2 and report["threads"] == 1
    for i, r in enumerate(report["rounds"]):
        ours, hf = r["ours"], r["transformers"]
        assert r["ratio"] == pytest.approx(ours["tokens_per_s"] / hf["tokens_per_s"])
        assert r["fastest_step_ratio"] == pytest.approx(hf["step_seconds"][0] / ours["step_seconds"][0])
        row = lines[1 + i].split()
        assert row == [str(i + 1), f"{ours['tokens_per_s']:,.0f}", f"{hf['tokens_per_s']:,.0f}",
                       f"{r['ratio']:.2f}", f"{r['fastest_step_ratio']:.2f}"]
        assert len(ours["losses"]) == 1 and len(hf["losses"]) == 3
    assert report["ratio"]["min"] <= report["ratio"]["median"] <= report["ratio"]["max"]
    # The same model: the parameters our loop built (parameters.json) are transformers' count.
    cfg = load_config(QUICKSTART, TOY)
    ours_total = json.load(open(os.path.join(run_dir, "benchmark", "parameters.json")))["total"]
    assert ours_total == sum(p.numel() for p in hf_model(cfg).parameters())
