"""Every shipped config that runs on a CPU trains a short run as a user would start it:
`python launch/pretrain.py --config C --set train.steps=2`, in a folder of its own, with a fresh
HOME (its data cache). A config written for a longer run has its schedule scaled to fit, with
one printed line. The configs that do not run here are listed with the reason, computed
(validate's refusal, or a model too large for a CPU), and the split is pinned, so a config
that stops validating on a CPU fails here instead of quietly moving to the other list.
"""

from __future__ import annotations

import glob
import json
import math
import os
import subprocess
import sys

import pytest

from conftest import ROOT
from megatron_mm.config import ConfigError, Hardware, load_config, validate
from megatron_mm.models.params import estimate_parameters

CPU = Hardware(has_cuda=False, fp8_capable=False, has_transformer_engine=False, device_name="cpu")
CPU_PARAMETER_LIMIT = 50_000_000  # a short run of more takes minutes a step on 2 cores
NOT_RUN_CONFIGS = ("clusters", "ablations")  # cluster profiles and layout lists, not run configs
RUNS_ON_CPU = ["configs/bench/cpu_item5.yaml", "configs/models/tiny.yaml", "configs/models/tiny_alt.yaml", "configs/quickstart.yaml",
               "configs/quickstart_text.yaml"]
# the quickstarts' README commands already run them as written, short runs included (test_readme)
RUN_BY_README = ["configs/quickstart.yaml", "configs/quickstart_text.yaml"]


def run_configs() -> list[str]:
    paths = sorted(glob.glob(os.path.join(ROOT, "configs", "**", "*.yaml"), recursive=True))
    return [os.path.relpath(p, ROOT) for p in paths if os.path.relpath(p, ROOT).split(os.sep)[1] not in NOT_RUN_CONFIGS]


def cpu_refusal(path: str) -> str | None:
    """Why `path` does not run on one CPU machine, or None."""
    cfg = load_config(os.path.join(ROOT, path), ["train.steps=2"])
    p = cfg.parallel
    world = math.lcm(p.tp * p.pp, p.ep * p.etp * p.pp)
    try:
        validate(cfg, world, CPU)
    except ConfigError as err:
        return f"refused on a CPU: {err.problems[0]}"
    total = estimate_parameters(cfg.model)["total"]
    if total > CPU_PARAMETER_LIMIT:
        return f"{total / 1e9:.1f}B parameters: too large for a CPU"
    return None


def test_the_configs_that_run_on_a_cpu_are_the_expected_ones():
    reasons = {path: cpu_refusal(path) for path in run_configs()}
    print("\nshipped configs that do not run on a CPU:")
    for path, reason in reasons.items():
        if reason:
            print(f"  {path}: {reason}")
    assert [path for path, reason in reasons.items() if reason is None] == RUNS_ON_CPU


@pytest.mark.parametrize("path", [path for path in RUNS_ON_CPU if path not in RUN_BY_README])
def test_shipped_config_trains_two_steps(path, fresh_home, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    env.update(HOME=fresh_home, OMP_NUM_THREADS="1")
    cmd = [sys.executable, os.path.join(ROOT, "launch", "pretrain.py"), "--config", os.path.join(ROOT, path),
           "--set", "train.steps=2"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{path}:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    run_dir = load_config(os.path.join(ROOT, path)).run.dir
    with open(tmp_path / run_dir / "metrics.jsonl") as f:
        records = [json.loads(line) for line in f]
    logged = [r["step"] for r in records]
    assert logged[-1] == 2 and all(math.isfinite(r["loss"]) for r in records), records
    warmup = load_config(os.path.join(ROOT, path)).train.scheduler.warmup_steps
    if warmup >= 2:
        assert f"schedule: train.scheduler.warmup_steps={warmup} scaled to this 2-step run: warmup_steps=1, " \
               "decay_steps=2" in proc.stdout.splitlines()
