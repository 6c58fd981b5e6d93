"""Shared helpers: run launch/pretrain.py under torchrun (gloo, CPU) and read its metrics."""

import json
import os
import socket
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICKSTART = os.path.join(ROOT, "configs", "quickstart_text.yaml")
QUICKSTART_MULTIMODAL = os.path.join(ROOT, "configs", "quickstart.yaml")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pretrain(nproc: int, overrides: list[str], timeout: int = 600, check: bool = True,
             config: str = QUICKSTART) -> subprocess.CompletedProcess:
    """Run pretraining on `nproc` gloo ranks with `config` (the text quickstart) plus overrides."""
    args = ["--config", config] + [a for o in overrides for a in ("--set", o)]
    script = os.path.join(ROOT, "launch", "pretrain.py")
    if nproc == 1:
        cmd = [sys.executable, script] + args
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               f"--master_port={free_port()}", script] + args
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def losses(run_dir: str) -> dict[int, float]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f)}


@pytest.fixture(scope="session")
def fresh_home(tmp_path_factory) -> str:
    """A HOME for commands run as a user would type them (the configs' `~/.cache/megatron_mm`
    is then a temporary folder), shared by the whole session so each data set is built once."""
    return str(tmp_path_factory.mktemp("home"))


@pytest.fixture(scope="session")
def data_cache(fresh_home) -> str:
    """The configs' data cache under `fresh_home`: tests that name it and commands run with
    HOME=fresh_home build the generated corpus and demo set once between them."""
    return os.path.join(fresh_home, ".cache", "megatron_mm")
