"""A checkpoints folder's layout on disk, shared by training (`checkpoint.py`) and the
converters (`conversion/`), which must write what training reads. No megatron-core import,
so the converters stay light.

    <root>/iter_0000042/                   one iteration (torch_dist)
    <root>/latest_checkpointed_iteration.txt
    <root>/iter_0000043.tmp-<pid>/         an iteration being written (or left by a crash)

Crash safety: an iteration is written under a temporary name (`new_iteration_folder`), every
file and the folder are flushed to disk (fsync), then it takes its final name
(`install_iteration`) and only then does the tracker move (`move_tracker`: a temporary file,
fsync, `os.replace`, fsync of the folder). A process killed at any moment leaves the tracker
naming a complete iteration. `remove_leftovers` clears the temporary folders a crash left,
`prune` deletes old iterations (`checkpoint.keep_last`) once a newer one is published.
"""

from __future__ import annotations

import ctypes
import os
import re
import shutil
from typing import Callable, Optional

from megatron_mm.config import Config
from megatron_mm.costs import pipeline_split

TRACKER = "latest_checkpointed_iteration.txt"
TEMPORARY = ".tmp-"  # in the name of a folder that is not (or no longer) a published iteration
_ITERATION = re.compile(r"^iter_(\d{7,})$")


def iteration_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def tracked_iteration(path: str, fail: Callable[[str], Exception]) -> Optional[tuple[str, int]]:
    """(iteration folder, iteration) that the tracker of checkpoints folder `path` names, or
    None when `path` has no tracker. A missing `path`, a corrupt tracker or a missing folder
    raise `fail(reason)` (training and the converters word their errors differently)."""
    if not os.path.isdir(path):
        raise fail("no such folder")
    tracker = os.path.join(path, TRACKER)
    if not os.path.exists(tracker):
        return None
    with open(tracker) as f:
        text = f.read().strip()
    if not text.isdigit():
        raise fail(f"{TRACKER} is corrupt ({text[:40]!r})")
    iteration = int(text)
    folder = iteration_dir(path, iteration)
    if not os.path.isdir(folder):
        raise fail(f"{TRACKER} names iteration {iteration} but {folder} is missing")
    return folder, iteration


def layout_of(cfg: Config, world_size: int) -> dict:
    """The parallel layout a checkpoint records (RNG states are restored only into the same)."""
    p = cfg.parallel
    return {"tp": p.tp, "pp": p.pp, "ep": p.ep, "etp": p.etp, "vpp": p.vpp, "world_size": world_size,
            "stage_layers": pipeline_split.plan(cfg).layers}


def new_iteration_folder(root: str, iteration: int) -> str:
    """An empty folder in `root` to write iteration `iteration` into, under a temporary name."""
    os.makedirs(root, exist_ok=True)
    folder = f"{iteration_dir(root, iteration)}{TEMPORARY}{os.getpid()}"
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder)
    return folder


def install_iteration(root: str, folder: str, iteration: int) -> str:
    """Flush the complete `folder` to disk and give it its final name, iteration `iteration` of
    `root` (the tracker does not move). An existing folder of that name (the tracker may name
    it) is swapped out atomically where the file system can (Linux renameat2), then removed."""
    final = iteration_dir(root, iteration)
    fsync_tree(folder)
    if os.path.exists(final):
        if not _exchange(folder, final):  # two renames: a crash in between loses the old copy
            os.rename(final, folder + "-old")
            os.rename(folder, final)
            folder += "-old"
        fsync_dir(root)
        shutil.rmtree(folder)
    else:
        os.rename(folder, final)
    fsync_dir(root)
    return final


def move_tracker(root: str, iteration: int) -> None:
    """Point the tracker of `root` at iteration `iteration`, atomically and durably."""
    tmp = os.path.join(root, TRACKER + TEMPORARY.rstrip("-"))
    with open(tmp, "w") as f:
        f.write(str(iteration))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(root, TRACKER))
    fsync_dir(root)


def publish(root: str, folder: str, iteration: int) -> str:
    """Make the complete `folder` iteration `iteration` of `root` and point the tracker at it:
    a crash leaves either the old checkpoint or the new one, never half of it."""
    final = install_iteration(root, folder, iteration)
    move_tracker(root, iteration)
    return final


def remove_leftovers(root: str) -> list[str]:
    """Remove the temporary folders (`iter_*.tmp-*`) a killed save left in `root`; their names."""
    if not os.path.isdir(root):
        return []
    gone = sorted(name for name in os.listdir(root) if name.startswith("iter_") and TEMPORARY in name)
    for name in gone:
        shutil.rmtree(os.path.join(root, name), ignore_errors=True)
    return gone


def prune(root: str, keep_last: Optional[int], published: int) -> list[int]:
    """With `keep_last` N, delete all but the newest N iterations of `root` up to `published` (the
    iteration the tracker has just moved to; later ones, left by an earlier run, stay). Each is
    renamed to a temporary name first, so a crash mid-delete leaves no half folder under an
    iteration's name. Returns the deleted iterations."""
    if keep_last is None:
        return []
    iterations = sorted(int(m.group(1)) for m in map(_ITERATION.match, os.listdir(root)) if m)
    older = [n for n in iterations if n <= published][:-keep_last]
    for n in older:
        doomed = f"{iteration_dir(root, n)}{TEMPORARY}delete"
        os.rename(iteration_dir(root, n), doomed)
        shutil.rmtree(doomed)
    return older


def fsync_tree(folder: str) -> None:
    """Flush every file under `folder`, then the folders themselves, to disk."""
    for dirpath, _, files in os.walk(folder):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(dirpath)


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _exchange(a: str, b: str) -> bool:
    """Swap paths `a` and `b` in one step (renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0
