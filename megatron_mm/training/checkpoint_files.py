"""A checkpoints folder's layout on disk, shared by training (`checkpoint.py`) and the
converters (`conversion/`), which must write what training reads. No megatron-core import,
so the converters stay light.

    <root>/iter_0000042/                   one iteration (torch_dist)
    <root>/latest_checkpointed_iteration.txt
"""

from __future__ import annotations

import os
import shutil

from megatron_mm.config import Config
from megatron_mm.models import pipeline_split

TRACKER = "latest_checkpointed_iteration.txt"


def iteration_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


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
