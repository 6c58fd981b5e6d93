"""A checkpoints folder's layout on disk, shared by training (`checkpoint.py`) and the
converters (`conversion/`), which must write what training reads. No megatron-core import,
so the converters stay light.

    <root>/iter_0000042/                   one iteration (torch_dist)
    <root>/latest_checkpointed_iteration.txt
"""

from __future__ import annotations

import os
import shutil
from typing import Callable, Optional

from megatron_mm.config import Config
from megatron_mm.costs import pipeline_split

TRACKER = "latest_checkpointed_iteration.txt"


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


def publish(root: str, partial: str, iteration: int) -> str:
    """Make the complete `partial` folder iteration `iteration` of `root` and point the
    tracker at it: a crash leaves either the old checkpoint or the new one, never half of it."""
    final = iteration_dir(root, iteration)
    shutil.rmtree(final, ignore_errors=True)
    os.rename(partial, final)
    tmp = os.path.join(root, TRACKER + ".tmp")
    with open(tmp, "w") as f:
        f.write(str(iteration))
    os.replace(tmp, os.path.join(root, TRACKER))
    return final
