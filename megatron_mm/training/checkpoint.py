"""Checkpoints with megatron-core `dist_checkpointing` (torch_dist format).

Layout on disk:  <root>/iter_0000010/   one distributed checkpoint per saved iteration
                 <root>/latest_checkpointed_iteration.txt
A checkpoint is written into `iter_N.partial` and renamed once every rank has finished, and
the tracker file is replaced atomically afterwards, so a crash mid-save never leaves a
half-written checkpoint where a resume would find it.

Model and optimizer state are saved as sharded tensors keyed by global parameter name
(the optimizer in megatron-core's `fully_reshardable` form), so a checkpoint loads into any
TP/PP/EP/VPP layout (and any split of the layers over the pipeline stages). RNG states are
per rank and are restored only into the same layout, layers per stage included.
"""

from __future__ import annotations

import os
import pickle
import shutil
from typing import Optional

import torch
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.transformer.utils import ensure_metadata_has_dp_cp_group
from megatron.core.utils import unwrap_model

from megatron_mm.config import Config, to_dict
from megatron_mm.runtime import distributed as runtime
from megatron_mm.training.checkpoint_files import TRACKER, iteration_dir, layout_of, publish, tracked_iteration

OPTIMIZER_SHARDING = {"distrib_optim_sharding_type": "fully_reshardable"}


class CheckpointError(RuntimeError):
    """A checkpoint that was asked for but cannot be used."""


def resolve(path: str) -> tuple[str, int]:
    """`path` is a checkpoints folder (its latest iteration) or one `iter_*` folder.
    Returns (iteration folder, iteration) or raises CheckpointError saying what is wrong."""
    def fail(reason: str) -> CheckpointError:
        return CheckpointError(f"checkpoint.load={path}: {reason}")

    tracked = tracked_iteration(path, fail)
    if tracked:
        folder, iteration = tracked
    elif os.path.basename(os.path.normpath(path)).startswith("iter_"):
        folder = path
        try:
            iteration = int(os.path.basename(os.path.normpath(path))[len("iter_"):])
        except ValueError:
            raise fail("cannot read an iteration from the name") from None
    else:
        raise fail(f"no checkpoint here (neither {TRACKER} nor an iter_* folder)")
    if not dist_checkpointing.check_is_distributed_checkpoint(folder):
        raise CheckpointError(f"checkpoint.load={folder}: not a complete distributed checkpoint (metadata missing)")
    return folder, iteration


def _sharded_state(chunks, optimizer, is_loading: bool, with_optimizer: bool) -> dict:
    # GPTModel.sharded_state_dict reads metadata["dp_cp_group"] itself on an MTP stage
    # without the first stage's embedding (megatron-core 0.16.1, gpt_model.py), so the
    # metadata is passed filled in rather than left to the submodules' defaults.
    metadata = ensure_metadata_has_dp_cp_group(None)
    state = {
        f"model{i}": unwrap_model(chunk).sharded_state_dict(metadata=metadata)
        for i, chunk in enumerate(chunks)
    }
    if with_optimizer:
        state["optimizer"] = optimizer.sharded_state_dict(
            state, is_loading=is_loading, metadata=OPTIMIZER_SHARDING
        )
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    state["rng_state"] = ShardedObject(
        "rng_state", runtime.rng_state(), (world,), (rank,), replica_id=0
    )
    return state


def save(root: str, iteration: int, chunks, optimizer, scheduler, cfg: Config,
         data_state: Optional[dict] = None) -> str:
    """Write iteration `iteration`; `data_state` (the same on every rank, e.g. the multimodal
    streams' positions) goes into the common state and comes back from `load`."""
    final = iteration_dir(root, iteration)
    partial = final + ".partial"
    rank0 = torch.distributed.get_rank() == 0
    if rank0:
        shutil.rmtree(partial, ignore_errors=True)
        os.makedirs(partial)
    torch.distributed.barrier()
    # Iteration 0 (initial weights) has no optimizer state yet: the model alone is saved.
    with_optimizer = iteration > 0
    state = _sharded_state(chunks, optimizer, is_loading=False, with_optimizer=with_optimizer)
    state.update(
        iteration=iteration,
        has_optimizer=with_optimizer,
        scheduler=scheduler.state_dict(),
        config=to_dict(cfg),
        layout=layout_of(cfg, torch.distributed.get_world_size()),
        data_state=data_state or {},
    )
    dist_checkpointing.save(state, partial, sharded_strategy=("torch_dist", 1))
    torch.distributed.barrier()
    if rank0:
        publish(root, partial, iteration)
    torch.distributed.barrier()
    return final


def load(path: str, chunks, optimizer, scheduler, cfg: Config) -> tuple[int, Optional[str], dict]:
    """Restore model, optimizer, scheduler (and RNG when the layout is unchanged); with
    `optimizer=None`, the model weights alone (evaluation, conversion).
    Returns (iteration, note about what was not restored or None, the saved data_state)."""
    folder, iteration = resolve(path)
    try:
        common = dist_checkpointing.load_common_state_dict(folder)
    except pickle.UnpicklingError as err:  # torch.load's weights-only loader refused it
        raise CheckpointError(f"checkpoint.load={folder}: common.pt is corrupt or holds objects torch's "
                              "safe loader refuses (it is not loaded unsafely)") from err
    except Exception as err:  # common.pt missing or truncated
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CheckpointError(f"checkpoint.load={folder}: cannot read its common state: {reason}") from err
    same_layout = common.get("layout") == layout_of(cfg, torch.distributed.get_world_size())
    weights_only = optimizer is None
    with_optimizer = common.get("has_optimizer", True) and not weights_only
    # A converted checkpoint (tools/convert_from_hf.py) has no RNG states: re-seed as for a new layout.
    has_rng = common.get("has_rng_state", True)
    state = _sharded_state(chunks, optimizer, is_loading=True, with_optimizer=with_optimizer)
    if weights_only or not same_layout or not has_rng:
        state.pop("rng_state")
    try:
        # megatron-core's naming: "missing" = in the checkpoint but not asked for,
        # "unexpected" = asked for but absent from the checkpoint.
        loaded, not_requested, absent = dist_checkpointing.load(state, folder, strict="return_all")
    except Exception as err:  # a shape mismatch, a truncated or unreadable file
        raise CheckpointError(f"checkpoint.load={folder}: cannot be loaded into this model: {err}") from err
    if absent:
        raise CheckpointError(
            f"checkpoint.load={folder}: the checkpoint lacks {len(absent)} key(s) this model needs, "
            f"e.g. {sorted(absent)[:3]}"
        )
    # Skipped on purpose: RNG of another layout; everything but weights when loading weights only.
    # (optimizer keys are "optimizer.*", or "chained_N.optimizer.*" when MoE gives two optimizers)
    not_requested = {key for key in not_requested
                     if key != "rng_state" and not (weights_only and key.startswith(("optimizer", "chained_")))}
    if not_requested:
        raise CheckpointError(
            f"checkpoint.load={folder}: the checkpoint has {len(not_requested)} key(s) this model does "
            f"not, e.g. {sorted(not_requested)[:3]} (a different model shape?)"
        )
    for i, chunk in enumerate(chunks):
        unwrap_model(chunk).load_state_dict(loaded[f"model{i}"])
    if with_optimizer:
        optimizer.load_state_dict(loaded["optimizer"])
        scheduler.load_state_dict(loaded["scheduler"])
    note = None
    if weights_only:
        pass
    elif same_layout and has_rng:
        runtime.restore_rng_state(loaded["rng_state"])
    elif not has_rng:
        note = f"converted from {common.get('converted_from', 'another format')}: RNG states seeded afresh"
    else:
        note = f"layout changed from {common.get('layout')}: RNG states re-seeded, not restored"
    return iteration, note, common.get("data_state") or {}
