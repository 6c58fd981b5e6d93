"""Shared helpers: run launch/pretrain.py under torchrun (gloo, CPU) and read its metrics."""

import importlib.util
import json
import os
import socket
import subprocess
import sys

import pytest
import torch

from megatron_mm.runtime import compat

compat.before_megatron_import()  # as the entry points: for the tests that import megatron-core here
# Triton's CPU interpreter for the kernel tests (tests/test_kernels.py): triton reads the variable
# once, so it is set before any test of a worker process imports triton
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICKSTART = os.path.join(ROOT, "configs", "quickstart_text.yaml")
QUICKSTART_MULTIMODAL = os.path.join(ROOT, "configs", "quickstart.yaml")


# The suite runs on two pytest-xdist workers (`-n 2 --dist loadgroup`, the README's test
# command): most runs here are one process on one thread, which leaves the second core idle.
# Every module is one scheduling group, so its module-scoped runs happen once, on one worker;
# modules that share session-scoped runs form one group.
SHARED_GROUPS = {
    "test_training": "text_layout_runs", "test_hf_conversion": "text_layout_runs",  # TextLayoutRuns
    "test_resume_matrix": "text_layout_runs",
    "test_readme": "fresh_home", "test_shipped_configs": "fresh_home",  # the demo set built once in HOME
}


# The longest groups first (measured), so that the short ones fill in around them instead of a
# long one starting last.
LONGEST_FIRST = ["text_layout_runs", "fresh_home", "test_multimodal_training", "test_hf_import_families", "test_slurm",
                 "test_checkpoint_safety", "test_mtp_recompute", "test_ablate", "test_hf_import_families"]


def _group(item) -> str:
    module = item.module.__name__.rsplit(".", 1)[-1]
    return SHARED_GROUPS.get(module, module)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items):
    rank = {group: i for i, group in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(_group(item), len(LONGEST_FIRST)))  # stable: file order within
    for item in items:
        item.add_marker(pytest.mark.xdist_group(_group(item)))


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
    return _run(cmd, timeout, check)


def _run(cmd: list[str], timeout: int, check: bool = True) -> subprocess.CompletedProcess:
    """`cmd` from the checkout as the training tests start it (one thread, warnings off);
    `check`: a failure raises with the tails of its output."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def pretrain_in_turn(runs: list[list[str]], runs_file: str, timeout: int = 900, config: str = QUICKSTART) -> None:
    """One-rank pretraining runs (a list of overrides each) one after another in one process
    (tests/helpers/train_in_turn.py, reading them from `runs_file`): each as
    `pretrain(1, overrides)` would, with one process start for all."""
    with open(runs_file, "w") as f:
        json.dump([[config, overrides] for overrides in runs], f)
    _run([sys.executable, os.path.join(ROOT, "tests", "helpers", "train_in_turn.py"), runs_file], timeout)


def tool(name: str, args: list[str], capsys) -> tuple[int, str, str]:
    """Run tools/NAME.py's main(args) in this process: (exit code, stdout, stderr)."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "tools", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    capsys.readouterr()
    code = module.main(args)
    out, err = capsys.readouterr()
    return code, out, err


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


# --------------------------------------------------------------------------- shared text runs

TEXT_STEPS = 10
TEXT_COMMON = [
    "train.global_batch_size=8", "train.micro_batch_size=1", "train.scheduler.warmup_steps=2",
    "logging.interval=1", "logging.tensorboard=false",
    "checkpoint.save_interval=4",  # iterations 4 and 8 too: the resume tests start from 4
]
# The text quickstart's layouts (world size, overrides); "single" is one rank.
TEXT_LAYOUTS = {
    "single": (1, []),
    "dp2": (2, []),  # the distributed optimizer (the default) shards its state over DP2
    "tp2": (2, ["parallel.tp=2", "parallel.sequence_parallel=true"]),
    "pp2": (2, ["parallel.pp=2"]),
    "pp2_uneven": (2, ["parallel.pp=2", "parallel.first_stage_layers=1", "parallel.last_stage_layers=3"]),
    "ep2": (2, ["parallel.ep=2"]),
    "pp2_vpp2": (2, ["parallel.pp=2", "parallel.vpp=2"]),
    # 4 ranks: EP2 inside the TP2 x DP1 ranks of each stage (8 processes on 2 cores cost a minute more)
    "tp2_pp2_ep2": (4, ["parallel.tp=2", "parallel.pp=2", "parallel.ep=2", "parallel.sequence_parallel=true"]),
}


class TextLayoutRuns:
    """The text quickstart trained TEXT_STEPS steps under each of TEXT_LAYOUTS from the same
    initial weights (an iteration-0 checkpoint) on the same batches, each run at most once a
    session, on first use: the layout-equivalence tests read their losses, the conversion
    tests convert their final checkpoints."""

    def __init__(self, root: str, data_cache: str):
        self.root, self.data = root, [f"data.cache_dir={data_cache}", f"train.steps={TEXT_STEPS}"]
        self._done: set[str] = set()

    @property
    def init(self) -> str:
        """The iteration-0 checkpoints folder every layout starts from."""
        if "init" not in self._done:
            pretrain(1, TEXT_COMMON + self.data + ["train.steps=0", f"run.dir={self.root}/init"])
            self._done.add("init")
        return os.path.join(self.root, "init", "checkpoints")

    def __call__(self, layout: str) -> str:
        """The run folder of `layout` (metrics.jsonl, rank_map.json, checkpoints/)."""
        run_dir = os.path.join(self.root, layout)
        if layout not in self._done:
            nproc, sets = TEXT_LAYOUTS[layout]
            pretrain(nproc, TEXT_COMMON + self.data + sets + [f"checkpoint.load={self.init}", f"run.dir={run_dir}"])
            self._done.add(layout)
        return run_dir


@pytest.fixture(scope="session")
def text_layout_runs(tmp_path_factory, data_cache) -> TextLayoutRuns:
    return TextLayoutRuns(str(tmp_path_factory.mktemp("text-layouts")), data_cache)
