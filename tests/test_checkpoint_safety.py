"""Checkpoints survive what happens to real runs: a process SIGKILLed at any moment of a save
(before, during and after the tensor files are written) resumes from the last complete
iteration and continues bit-exactly; a full disk stops the run with one line and leaves the
earlier checkpoint loadable; `checkpoint.keep_last` keeps exactly N; and a checkpoint whose
pickles would run code is refused in one line, by the training loader and the converters,
with nothing run.

The runs are the text quickstart on one rank from the shared initial weights, so the
uninterrupted reference is test_training's single-rank run (conftest.TextLayoutRuns)."""

from __future__ import annotations

import builtins
import glob
import os
import pickle
import shutil
import signal
import subprocess
import sys

import pytest
import torch

from conftest import QUICKSTART, ROOT, TEXT_COMMON, TEXT_STEPS, losses, pretrain

KILL_POINTS = ("before_tensors", "during_tensors", "after_tensors")
SAVE = ["checkpoint.save_interval=4"]  # iterations 4, 8 and 10, as in the reference run


def tracker(folder) -> int:
    with open(os.path.join(folder, "latest_checkpointed_iteration.txt")) as f:
        return int(f.read())


def pretrain_killed(overrides: list[str], kill_at: str, out_dir: str) -> str:
    """Start one-rank training that SIGKILLs itself at `kill_at` (checkpoint.py's test hook);
    then kill what it left running (megatron-core's writer processes) by process group.
    Returns its stdout."""
    args = ["--config", QUICKSTART] + [a for o in overrides for a in ("--set", o)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "MEGATRON_MM_TEST_KILL_AT": kill_at}
    os.makedirs(out_dir, exist_ok=True)
    out_path = os.path.join(out_dir, "stdout.txt")
    with open(out_path, "w") as out, open(os.path.join(out_dir, "stderr.txt"), "w") as err:
        proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "launch", "pretrain.py")] + args,
                                stdout=out, stderr=err, env=env, cwd=ROOT, start_new_session=True)
        try:
            code = proc.wait(timeout=300)
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    text = open(out_path).read()
    assert code == -signal.SIGKILL, (code, text[-2000:], open(os.path.join(out_dir, "stderr.txt")).read()[-3000:])
    return text


@pytest.fixture(scope="module")
def killed_chain(tmp_path_factory, text_layout_runs) -> dict:
    """One checkpoints folder, four starts: three killed while saving iteration 8 (one per
    point; each later start resumes from the folder), then one that finishes. keep_last=2."""
    root = tmp_path_factory.mktemp("killed")
    ckpt = str(root / "checkpoints")
    base = TEXT_COMMON + text_layout_runs.data + SAVE + ["checkpoint.keep_last=2", f"checkpoint.dir={ckpt}"]
    seen = {}
    for i, point in enumerate(KILL_POINTS):
        load = text_layout_runs.init if i == 0 else ckpt
        run = str(root / point)
        stdout = pretrain_killed(base + [f"checkpoint.load={load}", f"run.dir={run}"], f"{point}:8", run)
        seen[point] = {"run": run, "stdout": stdout, "tracker": tracker(ckpt), "entries": sorted(os.listdir(ckpt)),
                       "leftover": sorted(os.listdir(p) for p in glob.glob(os.path.join(ckpt, "iter_*.tmp-*")))}
    final = str(root / "final")
    proc = pretrain(1, base + [f"checkpoint.load={ckpt}", f"run.dir={final}"])
    seen["final"] = {"run": final, "stdout": proc.stdout, "tracker": tracker(ckpt), "entries": sorted(os.listdir(ckpt))}
    return seen


def test_kill_before_tensors_leaves_the_previous_checkpoint(killed_chain):
    seen = killed_chain["before_tensors"]
    assert seen["tracker"] == 4
    assert seen["leftover"] == [[]]  # the temporary folder, nothing written into it
    assert "iter_0000008" not in seen["entries"]


def test_kill_during_tensors_leaves_the_previous_checkpoint(killed_chain):
    seen = killed_chain["during_tensors"]
    assert "removed 1 unfinished checkpoint folder(s)" in seen["stdout"]  # the first kill's
    assert "at step 4" in seen["stdout"]
    assert seen["tracker"] == 4
    [files] = seen["leftover"]
    assert any(name.endswith(".distcp") for name in files) and "metadata.json" not in files, files


def test_kill_after_tensors_before_the_tracker_moves(killed_chain):
    seen = killed_chain["after_tensors"]
    assert seen["tracker"] == 4 and "iter_0000008" in seen["entries"]  # complete, but not published
    assert "at step 4" in seen["stdout"]


def test_resume_after_the_kills_is_bit_exact_and_keeps_last_2(killed_chain, text_layout_runs):
    """Every start logged the uninterrupted run's losses bit for bit (the killed ones up to
    step 8, the last one 5..10, resumed from 4 over the complete but unpublished iteration 8);
    the folder then holds exactly the newest two iterations and no temporary folder."""
    want = losses(text_layout_runs("single"))
    for name in (*KILL_POINTS, "final"):
        got = losses(killed_chain[name]["run"])
        first = 1 if name == "before_tensors" else 5
        assert sorted(got) == list(range(first, 9 if name != "final" else TEXT_STEPS + 1)), (name, sorted(got))
        for step, loss in got.items():
            assert loss == want[step], (name, step, loss, want[step])
    final = killed_chain["final"]
    assert "resumed from" in final["stdout"] and "at step 4" in final["stdout"]
    assert final["tracker"] == TEXT_STEPS
    assert final["entries"] == ["iter_0000008", "iter_0000010", "latest_checkpointed_iteration.txt"]
    assert "checkpoint.keep_last=2: deleted iteration(s) 4" in final["stdout"]


# --------------------------------------------------------------------------- full disk


@pytest.fixture
def small_tmpfs(tmp_path, text_layout_runs):
    """A tmpfs that holds one checkpoint of the text quickstart and a half (we are root)."""
    one = sum(os.path.getsize(p) for p in glob.glob(os.path.join(text_layout_runs("single"), "checkpoints",
                                                                     "iter_0000004", "*")))
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    size_kib = int(one * 1.5) // 1024
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kib}k", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {done.stderr.strip()}")
    try:
        yield str(mount)
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_full_disk_stops_with_one_line_and_keeps_the_earlier_checkpoint(small_tmpfs, text_layout_runs, tmp_path):
    ckpt = os.path.join(small_tmpfs, "checkpoints")
    run = [*TEXT_COMMON, *text_layout_runs.data, "train.global_batch_size=2", "checkpoint.save_interval=2", "train.steps=3"]
    proc = pretrain(1, run + [f"checkpoint.load={text_layout_runs.init}", f"checkpoint.dir={ckpt}",
                              f"run.dir={tmp_path}/full"], check=False)
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if "error" in line.lower()]
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert lines == [f"checkpoint error: checkpoint.dir={ckpt}: cannot save iteration 3: No space left on device "
                     "(iteration 2 is still the latest)"], proc.stderr[-3000:]
    assert proc.stderr.strip() == lines[0]  # nothing else: no traceback, no log of megatron-core's writer
    assert sorted(os.listdir(ckpt)) == ["iter_0000002", "latest_checkpointed_iteration.txt"]
    # iteration 2 loads: resuming from it repeats the failed run's step 3 bit for bit
    pretrain(1, run + [f"checkpoint.load={ckpt}", f"checkpoint.dir={tmp_path}/elsewhere", f"run.dir={tmp_path}/resumed"])
    want = losses(f"{tmp_path}/full")
    assert sorted(want) == [1, 2, 3]
    assert losses(f"{tmp_path}/resumed") == {3: want[3]}


# --------------------------------------------------------------------------- untrusted pickles


class Payload:
    """Unpickling it creates the file `marker` (as `os.system` or anything else could run)."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return builtins.open, (self.marker, "w")


def _crafted(source: str, dest, part: str):
    """A copy of iteration folder `source` whose `part` (common.pt, .metadata or an object in a
    .distcp file) would create `dest/MARKER` when unpickled. Returns (folder, marker)."""
    folder = dest / "iter_0000000"
    shutil.copytree(source, folder)
    marker = str(dest / "MARKER")
    if part == "common.pt":
        torch.save({"iteration": 0, "config": Payload(marker)}, folder / "common.pt")
    elif part == ".metadata":
        with open(folder / ".metadata", "wb") as f:
            pickle.dump(Payload(marker), f)
    else:  # the rng_state object DCP's load planner unpickles with weights_only=False
        from megatron_mm.conversion.dcp import DistCheckpointWriter
        from megatron_mm.training.checkpoint_pickles import read_checkpoint_pickles

        metadata, common = read_checkpoint_pickles(str(folder))
        shutil.rmtree(folder)
        writer = DistCheckpointWriter(str(folder))
        writer.add_object("rng_state/shard_0_1", Payload(marker))
        writer.finish(common)
    return folder, marker


@pytest.mark.parametrize("part", ["common.pt", ".metadata", "object"])
def test_converter_refuses_a_pickle_that_would_run_code(part, text_layout_runs, tmp_path, capsys):
    from megatron_mm.conversion.cli import run_conversion
    from megatron_mm.conversion.to_hf import convert_to_hf

    folder, marker = _crafted(os.path.join(text_layout_runs.init, "iter_0000000"), tmp_path, part)
    code = run_conversion(lambda: convert_to_hf(str(folder), str(tmp_path / "hf"), progress=False))
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith(f"conversion error: checkpoint {folder}: ") and "refused" in lines[0], lines[0]
    assert not os.path.exists(marker)


def test_training_refuses_a_pickle_that_would_run_code(text_layout_runs, tmp_path):
    """megatron-core's loader would unpickle `.metadata` with a plain pickle.load; the training
    loader refuses it first (read_checkpoint_pickles, which the converter tests above cover part
    by part), in one line, exit 2."""
    folder, marker = _crafted(os.path.join(text_layout_runs.init, "iter_0000000"), tmp_path, ".metadata")
    proc = pretrain(1, [*TEXT_COMMON, *text_layout_runs.data, f"checkpoint.load={folder}", f"run.dir={tmp_path}/run"],
                    check=False)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith(f"checkpoint error: checkpoint.load={folder}: ") and "refused" in lines[0], lines[0]
    assert not os.path.exists(marker)


def test_weights_only_torch_loads_covers_megatron_cores_unsafe_calls(tmp_path):
    """Inside `weights_only_torch_loads`, even torch.load(weights_only=False) (DCP's
    load_bytes) refuses a payload."""
    import io

    from megatron_mm.training.checkpoint_pickles import weights_only_torch_loads

    marker = str(tmp_path / "MARKER")
    buffer = io.BytesIO()
    torch.save([Payload(marker)], buffer)
    with weights_only_torch_loads(), pytest.raises(pickle.UnpicklingError):
        torch.load(io.BytesIO(buffer.getvalue()), weights_only=False)
    assert not os.path.exists(marker) and "TORCH_FORCE_WEIGHTS_ONLY_LOAD" not in os.environ
