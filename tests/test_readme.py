"""Every shell command in README.md runs as written.

The commands of README.md's fenced ```bash blocks (and the `$ ` lines of its example-output
blocks) run in README order, each through `bash -c` exactly as written, in one shared copy of
the checkout (so a later command finds what an earlier one wrote, as it would for a reader
going down the page). Only environment variables point elsewhere: HOME (so `~/.cache`, the
data cache of every config, is a fresh temporary folder) and OMP_NUM_THREADS=1.

No command may print a Python warning (megatron-core's notices about what a CPU lacks are
hidden, runtime/compat.py NOTICES). Commands that cannot run here are listed in SKIPPED with the reason; a README command that is
neither run nor listed, or a listed command that is no longer in the README, fails the test,
so the list and the README stay in step. The quickstart, too long for CI as written, runs in
REDUCED form: the same commands minus the package installs (the suite's own setup did them)
with fewer steps. A command may run at most 3 minutes. Where the README shows what a command
prints and the output is deterministic, the output is checked against it (PRINTS and the `$`
blocks).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from typing import Optional

import pytest

from conftest import ROOT

README = os.path.join(ROOT, "README.md")
TIME_LIMIT_S = 180

# A unique piece of the command -> why it does not run here.
SKIPPED = {
    "python -m pytest -q -n 2 --dist loadgroup tests": "the test suite itself (this test is part of it)",
    "tensorboard --logdir": "starts a web server that runs until stopped",
    "configs/bench/deepseek_v2_lite_4layers_1gpu.yaml": "needs a GPU (a 2.1B-parameter bf16 model)",
    "--launcher slurm": "needs a SLURM cluster with GPU partitions (tests/test_slurm.py runs the same tool "
                        "through a one-machine SLURM)",
    "sbatch job.sbatch": "needs a SLURM cluster of H800 nodes (tests/test_slurm.py submits generated jobs to a "
                         "one-machine SLURM)",
    "--set run.dir=runs/stage1": "over 3 minutes (1,200 steps); tests/test_multimodal_training.py trains "
                                 "stage 1 and stage 2 with the same flags",
    "--set run.dir=runs/stage2": "needs stage 1's checkpoint (above)",
    "configs/ablations/tiny_cpu.yaml": "over 3 minutes in CI (9 layouts, 2 min 4 s on a quiet machine); "
                                       "tests/test_ablate.py runs the same tool on two layouts",
    "tools/gpu_report.py": "needs a GPU for its numbers; tests/test_gpu_report.py runs its --cpu-smoke mode",
    "tools/te_bundle.py": "downloads and rewrites NVIDIA's 276 MB wheel (results/te_bundle.md); tests/test_te_bundle.py "
                          "runs every step but the GPU smoke on a synthetic wheel",
    "tools/compare_cpu_speed.py --config configs/bench/cpu_item5.yaml": "about 3 minutes (two rounds of both "
                                                                        "trainings at the issue-18 shape); "
                                                                        "tests/test_cpu_speed.py runs the tool "
                                                                        "at toy size",
    "--hf DeepSeek-V2-Lite": "needs DeepSeek-V2-Lite's released weights (31 GB), which cannot be downloaded here; "
                             "tests/test_hf_import_families.py imports V2- and V2-Lite-shaped folders saved by "
                             "transformers",
}

# A unique piece of the command -> (pieces to drop, extra arguments per matching program).
QUICKSTART = "python launch/pretrain.py --config configs/quickstart.yaml && python tools/evaluate.py"
REDUCED = {
    QUICKSTART: {
        "drop": r"pip install [^&]*&& ",
        "append": {
            "launch/pretrain.py --config configs/quickstart.yaml": " --set train.steps=10",
            "tools/evaluate.py --config configs/quickstart.yaml": " --max-samples 24",
        },
    },
}

# A unique piece of the command -> (the first line of the README block that shows its output,
# how many lines of it to compare). Words must match; numbers to NUMBER_TOLERANCE (relative: the
# same float arithmetic on another CPU may round the last printed digit differently).
PRINTS = {
    "python tools/plan.py --config configs/models/deepseek_v2_lite_16b.yaml": ("plan: configs/models/deepseek_v2_lite_16b", None),
    "python tools/evaluate.py --config configs/quickstart.yaml --set data.source=shards": ("checkpoint iteration 20", 3),
}
NUMBER_TOLERANCE = 1e-3


def excerpt_matches(shown, printed) -> bool:
    """`shown` (a README excerpt of a JSON report) is in `printed`: the keys it shows, with equal
    values, numbers to NUMBER_TOLERANCE (the README rounds them)."""
    if isinstance(shown, dict):
        return isinstance(printed, dict) and all(k in printed and excerpt_matches(v, printed[k])
                                                 for k, v in shown.items())
    if isinstance(shown, float) and isinstance(printed, (int, float)):
        return abs(shown - printed) <= NUMBER_TOLERANCE * max(abs(shown), abs(printed))
    return shown == printed


def same_numbers(printed: list[str], shown: list[str]) -> bool:
    """Lines equal word for word, numbers (1,234 / 0.748 / 39.5%) within NUMBER_TOLERANCE."""
    if len(printed) != len(shown):
        return False
    number = re.compile(r"-?\d[\d,]*\.?\d*")
    for a, b in zip(printed, shown):
        if number.sub("#", a).split() != number.sub("#", b).split():
            return False
        for x, y in zip(number.findall(a), number.findall(b)):
            x, y = float(x.replace(",", "")), float(y.replace(",", ""))
            if abs(x - y) > NUMBER_TOLERANCE * max(abs(x), abs(y)):
                return False
    return True
# A unique piece of the command -> (the first line of the README's JSON excerpt of its report,
# the fields of it that do not depend on timing).
PRINTS_JSON = {
    "torchrun --nproc_per_node=2 tools/benchmark.py": (
        '{"world_size": 2, "device": "cpu",', ["world_size", "device", "layout", "mfu", "mfu_source", "loss"]),
}


@dataclass
class Command:
    line: int  # README line the command starts on
    text: str
    output: Optional[list[str]] = None  # what the README shows it printing (a `$` block)


def _blocks(text: str):
    for m in re.finditer(r"^```(\w*)\n(.*?)^```", text, re.S | re.M):
        yield m.group(1), text[: m.start()].count("\n") + 2, m.group(2)


def readme_commands(text: str) -> list[Command]:
    """The shell commands of the README: ```bash blocks (continuation lines joined, comment
    lines dropped) and `$ ` lines of untyped blocks with the lines after them as output."""
    commands = []
    for lang, first, body in _blocks(text):
        lines = body.splitlines()
        if lang in ("bash", "sh"):
            pending, start = "", first
            for i, line in enumerate(lines):
                if not pending and (not line.strip() or line.lstrip().startswith("#")):
                    continue
                start = start if pending else first + i
                if line.endswith("\\"):
                    pending += line[:-1]
                    continue
                commands.append(Command(start, pending + line))
                pending = ""
        elif lang == "" and lines and lines[0].startswith("$ "):
            for i, line in enumerate(lines):
                if line.startswith("$ "):
                    commands.append(Command(first + i, line[2:], []))
                elif commands[-1].output is not None:
                    commands[-1].output.append(line)
    return commands


def output_block(text: str, first_line: str) -> list[str]:
    found = [body.splitlines() for lang, _, body in _blocks(text) if body.startswith(first_line)]
    assert len(found) == 1, f"README: {len(found)} output blocks start with {first_line!r}"
    return found[0]


def matching(table: dict, command: str) -> Optional[str]:
    keys = [k for k in table if k in command]
    assert len(keys) <= 1, f"{command!r} matches several entries: {keys}"
    return keys[0] if keys else None


def reduced(command: str) -> str:
    rule = REDUCED[matching(REDUCED, command)]
    command = re.sub(rule["drop"], "", command)
    for program, extra in rule["append"].items():
        assert program in command, f"reduced form: {program!r} is not in {command!r}"
        end = command.find(" &&", command.index(program))  # the end of that program's arguments
        end = len(command) if end < 0 else end
        command = command[:end] + extra + command[end:]
    return command


TEXT = open(README).read()
COMMANDS = readme_commands(TEXT)


def test_every_readme_command_is_run_or_skipped_for_a_reason():
    listed = {**SKIPPED, **REDUCED, **PRINTS, **PRINTS_JSON}
    unused = [k for k in listed if not any(k in c.text for c in COMMANDS)]
    assert not unused, f"listed in tests/test_readme.py but in no README command: {unused}"
    for c in COMMANDS:
        matching(SKIPPED, c.text)  # never ambiguous
    print("\nREADME commands not run here:")
    for c in COMMANDS:
        key = matching(SKIPPED, c.text)
        if key:
            print(f"  line {c.line}: {c.text[:90]}{'...' if len(c.text) > 90 else ''}\n      {SKIPPED[key]}")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> dict:
    """A copy of the checkout (what git tracks) and a HOME of its own."""
    root = tmp_path_factory.mktemp("readme")
    checkout, home = root / "checkout", root / "home"
    home.mkdir()
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True)
    names = [n for n in tracked.stdout.split("\0") if n] if tracked.returncode == 0 else []
    if names:
        for name in names:
            if os.path.exists(os.path.join(ROOT, name)):
                (checkout / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(os.path.join(ROOT, name), checkout / name)
    else:  # not a git checkout: everything but what runs leave behind
        shutil.copytree(ROOT, checkout, ignore=shutil.ignore_patterns(".git", "runs", "data", "__pycache__"))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONWARNINGS",)}
    env.update(HOME=str(home), OMP_NUM_THREADS="1")
    return {"cwd": str(checkout), "env": env}


RUN = [c for c in COMMANDS if not matching(SKIPPED, c.text)]


@pytest.mark.parametrize("command", RUN, ids=[f"line{c.line}" for c in RUN])
def test_readme_command(workspace, command):
    text = reduced(command.text) if matching(REDUCED, command.text) else command.text
    try:
        proc = subprocess.run(["bash", "-c", text], cwd=workspace["cwd"], env=workspace["env"],
                              capture_output=True, text=True, timeout=TIME_LIMIT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"README line {command.line}: over {TIME_LIMIT_S} s: {text}")
    printed = (proc.stdout + proc.stderr).splitlines()
    if command.output is not None:  # a `$` example: what the README shows is what it prints
        shown = [line for line in command.output if line != "..."]
        assert [line for line in printed if line in shown] == shown, \
            f"README line {command.line}: {text}\nshows:\n" + "\n".join(shown) + "\nprinted:\n" + "\n".join(printed)
        return
    assert proc.returncode == 0, (f"README line {command.line} failed ({proc.returncode}): {text}\n"
                                  f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    warned = [line for line in proc.stderr.splitlines() if re.search(r"\w+Warning: ", line)]
    assert not warned, f"README line {command.line} prints warnings a user cannot act on:\n" + "\n".join(warned)
    key = matching(PRINTS, command.text)
    if key:
        first, last = PRINTS[key]
        shown = output_block(TEXT, first)[:last]
        lines = proc.stdout.splitlines()
        start = next((i for i, line in enumerate(lines) if line.startswith(first)), None)
        assert start is not None and same_numbers(lines[start: start + len(shown)], shown), \
            f"README line {command.line} prints something else than the README shows:\n{proc.stdout}"
    key = matching(PRINTS_JSON, command.text)
    if key:
        first, fields = PRINTS_JSON[key]
        shown, printed = json.loads("\n".join(output_block(TEXT, first))), json.loads(proc.stdout.splitlines()[-1])
        assert all(excerpt_matches(shown[f], printed[f]) for f in fields), \
            f"README line {command.line}: the report differs from the README's excerpt:\n{proc.stdout.splitlines()[-1]}"
