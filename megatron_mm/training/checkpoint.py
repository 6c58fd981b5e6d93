"""Checkpoints with megatron-core `dist_checkpointing` (torch_dist format).

Layout on disk:  <root>/iter_0000010/   one distributed checkpoint per saved iteration
                 <root>/latest_checkpointed_iteration.txt
A checkpoint is written into `iter_N.tmp-<pid>`, flushed to disk and renamed once every rank
has finished, and the tracker file is replaced atomically afterwards (checkpoint_files.py), so
a process killed mid-save never leaves a half-written checkpoint where a resume would find it.
A save that fails (disk full, permission) is a CheckpointError on every rank, the previous
checkpoint untouched. Loading reads the pickled parts through checkpoint_pickles.py first:
a checkpoint from a stranger runs no code.

Model and optimizer state are saved as sharded tensors keyed by global parameter name
(the optimizer in megatron-core's `fully_reshardable` form, in a dict no layout shapes:
optimizer_state.py), so a checkpoint loads with its optimizer state into any TP/PP/EP/ETP/
VPP/DP layout, with or without the distributed optimizer (and any split of the layers over
the pipeline stages). RNG states are per rank and are restored only into the same layout,
layers per stage included.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import signal
import threading
import time
from typing import Optional

import torch
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.transformer.utils import ensure_metadata_has_dp_cp_group
from megatron.core.utils import unwrap_model
from torch.distributed.checkpoint.api import CheckpointException

from megatron_mm.config import Config, to_dict
from megatron_mm.runtime import distributed as runtime
from megatron_mm.training import checkpoint_files as files
from megatron_mm.training import optimizer_state
from megatron_mm.training.checkpoint_files import TRACKER, layout_of, tracked_iteration
from megatron_mm.training.checkpoint_pickles import (PickleRefused, read_checkpoint_pickles,
                                                     weights_only_torch_loads)

FULL_DISK_BYTES = 1 << 20  # a save that failed with less free space than this failed for want of it


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


def _sharded_state(chunks) -> dict:
    """The model's sharded state dict and this rank's RNG state."""
    # GPTModel.sharded_state_dict reads metadata["dp_cp_group"] itself on an MTP stage
    # without the first stage's embedding (megatron-core 0.16.1, gpt_model.py), so the
    # metadata is passed filled in rather than left to the submodules' defaults.
    metadata = ensure_metadata_has_dp_cp_group(None)
    state = {
        f"model{i}": unwrap_model(chunk).sharded_state_dict(metadata=metadata)
        for i, chunk in enumerate(chunks)
    }
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    state["rng_state"] = ShardedObject(
        "rng_state", runtime.rng_state(), (world,), (rank,), replica_id=0
    )
    return state


def _model_part(state: dict) -> dict:
    return {key: value for key, value in state.items() if key.startswith("model")}


def save(root: str, iteration: int, chunks, optimizer, scheduler, cfg: Config,
         data_state: Optional[dict] = None) -> str:
    """Write iteration `iteration`; `data_state` (the same on every rank, e.g. the multimodal
    streams' positions) goes into the common state and comes back from `load`. With
    `checkpoint.keep_last`, older iterations are deleted once this one is published.
    A failure on any rank raises the same CheckpointError on every rank."""
    rank0 = torch.distributed.get_rank() == 0
    folder, error = None, None
    if rank0:
        try:
            folder = files.new_iteration_folder(root, iteration)
        except OSError as err:
            error = _failure(err)
    shared = [folder, error]
    torch.distributed.broadcast_object_list(shared, src=0)
    folder, error = shared
    _raise_if_failed(root, iteration, error)
    _test_kill_at("before_tensors", iteration)
    # Iteration 0 (initial weights) has no optimizer state yet: the model alone is saved.
    with_optimizer = iteration > 0
    state = _sharded_state(chunks)
    if with_optimizer:
        state["optimizer"] = optimizer_state.for_save(optimizer, _model_part(state))
    state.update(
        iteration=iteration,
        has_optimizer=with_optimizer,
        scheduler=scheduler.state_dict(),
        config=to_dict(cfg),
        layout=layout_of(cfg, torch.distributed.get_world_size()),
        data_state=data_state or {},
    )
    try:
        with _writer_errors_unlogged(), _test_kill_during_tensors(iteration, folder):
            dist_checkpointing.save(state, folder, sharded_strategy=("torch_dist", 1))
    except (Exception, CheckpointException) as err:  # disk full, permission: DCP shares write failures
        error = _failure(err, root)
    _raise_if_failed(root, iteration, _first_of_all_ranks(error), folder)
    if rank0:
        try:
            files.install_iteration(root, folder, iteration)
            _test_kill_at("after_tensors", iteration)
            files.move_tracker(root, iteration)
        except OSError as err:
            error = _failure(err)
        if error is None:
            _prune(root, cfg.checkpoint.keep_last, iteration)
    shared = [error]
    torch.distributed.broadcast_object_list(shared, src=0)
    _raise_if_failed(root, iteration, shared[0], folder)
    return files.iteration_dir(root, iteration)


def _prune(root: str, keep_last: Optional[int], published: int) -> None:
    """checkpoint.keep_last, once iteration `published` is: one log line of what went. The
    checkpoint is safe by now, so a deletion that fails is logged and the run goes on."""
    try:
        gone = files.prune(root, keep_last, published)
    except OSError as err:
        print(f"checkpoint.keep_last={keep_last}: cannot delete an older iteration in {root}: {_failure(err)}",
              flush=True)
        return
    if gone:
        print(f"checkpoint.keep_last={keep_last}: deleted iteration(s) {', '.join(map(str, gone))}", flush=True)


def remove_leftovers(root: str) -> None:
    """Rank 0 removes the temporary folders a killed save left in checkpoints folder `root`
    (one log line); the other ranks wait. Call once at start-up, before loading."""
    if torch.distributed.get_rank() == 0:
        gone = files.remove_leftovers(root)
        if gone:
            print(f"removed {len(gone)} unfinished checkpoint folder(s) a killed save left in {root}: "
                  f"{', '.join(gone)}", flush=True)
    torch.distributed.barrier()


def _failure(err: BaseException, root: Optional[str] = None) -> str:
    """One line saying why a save failed: the OSError underneath when there is one (megatron-core's
    writer processes and DCP wrap it, and pass it between processes as text: "[Errno 28] ..."),
    else the innermost message's first line, or a full disk when the file system of `root` has no
    space left (torch's zip writer words ENOSPC as "enforce fail ... unexpected pos 704 vs 598")."""
    pending, seen, messages = [err], set(), []
    while pending:
        e = pending.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.strerror:
            return e.strerror + (f": {e.filename}" if e.filename else "")
        messages.append(str(e).strip())
        pending += [e.__cause__, e.__context__]
        failures = getattr(e, "failures", None)  # DCP's CheckpointException: rank -> (exception, trace)
        if isinstance(failures, dict):
            pending += [f[0] if isinstance(f, tuple) else f for f in failures.values()]
    for text in messages:
        match = re.search(r"\[Errno \d+\] ([^\n:]+)", text)
        if match:
            return match.group(1).strip()
    texts = [text for text in messages if text]
    reason = texts[-1].splitlines()[0][:300] if texts else type(err).__name__
    if root is not None and os.path.isdir(root) and shutil.disk_usage(root).free < FULL_DISK_BYTES:
        return "No space left on device"  # torch's wording of it says less
    return reason


@contextlib.contextmanager
def _writer_errors_unlogged():
    """megatron-core's checkpoint writer logs each failure ("Local process 0 encountered an
    error"); the CheckpointError this module raises says it once, so its log is held back."""
    logger = logging.getLogger("megatron.core.dist_checkpointing")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _first_of_all_ranks(error: Optional[str]) -> Optional[str]:
    errors: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(errors, error)
    return next((e for e in errors if e), None)


def _raise_if_failed(root: str, iteration: int, error: Optional[str], folder: Optional[str] = None) -> None:
    """Raise the save failure `error` (the same on every rank), after rank 0 removed the
    unfinished folder; the tracker still names the previous checkpoint."""
    if error is None:
        return
    if folder and torch.distributed.get_rank() == 0:
        shutil.rmtree(folder, ignore_errors=True)
    try:
        tracked = tracked_iteration(root, lambda reason: CheckpointError(reason))
    except CheckpointError:
        tracked = None
    previous = f"iteration {tracked[1]} is still the latest" if tracked else "no earlier checkpoint there"
    raise CheckpointError(f"checkpoint.dir={root}: cannot save iteration {iteration}: {error} ({previous})")


# Test hook, read here only (tests/test_checkpoint_safety.py): MEGATRON_MM_TEST_KILL_AT=POINT:ITERATION
# makes rank 0 SIGKILL itself while saving iteration ITERATION, at POINT: `before_tensors` (the
# temporary folder exists, nothing written), `during_tensors` (the first .distcp file appears while
# megatron-core's writer processes run; they are left running, as after a real kill) or
# `after_tensors` (the complete folder has its final name, the tracker has not moved).
TEST_KILL_AT = "MEGATRON_MM_TEST_KILL_AT"


def _test_kill_at(point: str, iteration: int) -> None:
    if os.environ.get(TEST_KILL_AT) == f"{point}:{iteration}" and torch.distributed.get_rank() == 0:
        os.kill(os.getpid(), signal.SIGKILL)


@contextlib.contextmanager
def _test_kill_during_tensors(iteration: int, folder: str):
    if os.environ.get(TEST_KILL_AT) != f"during_tensors:{iteration}" or torch.distributed.get_rank() != 0:
        yield
        return

    def watch():
        while not any(name.endswith(".distcp") for name in os.listdir(folder)):
            time.sleep(0.001)
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, daemon=True).start()
    yield
    os.kill(os.getpid(), signal.SIGKILL)  # the watcher missed the writes: never publish


def load(path: str, chunks, optimizer, scheduler, cfg: Config) -> tuple[int, Optional[str], dict]:
    """Restore model, optimizer, scheduler (and RNG when the layout is unchanged); with
    `optimizer=None`, the model weights alone (evaluation, conversion).
    Returns (iteration, note about what was not restored or None, the saved data_state)."""
    folder, iteration = resolve(path)
    if not os.path.exists(os.path.join(folder, "common.pt")):
        raise CheckpointError(f"checkpoint.load={folder}: common.pt is missing (not a complete checkpoint)")
    try:  # before megatron-core reads any of it: a checkpoint from a stranger runs no code
        metadata, common = read_checkpoint_pickles(folder)
    except PickleRefused as err:
        raise CheckpointError(f"checkpoint.load={folder}: {err}") from None
    saved_keys = set(metadata.state_dict_metadata)
    same_layout = common.get("layout") == layout_of(cfg, torch.distributed.get_world_size())
    weights_only = optimizer is None
    with_optimizer = common.get("has_optimizer", True) and not weights_only
    # A converted checkpoint (tools/convert_from_hf.py) has no RNG states: re-seed as for a new layout.
    has_rng = common.get("has_rng_state", True)
    state = _sharded_state(chunks)
    if with_optimizer:
        optimizer_request = optimizer_state.Request(optimizer, _model_part(state))
        state["optimizer"] = optimizer_request.entry(lambda key: key in saved_keys)
    if weights_only or not same_layout or not has_rng:
        state.pop("rng_state")
    try:
        # megatron-core's naming: "missing" = in the checkpoint but not asked for,
        # "unexpected" = asked for but absent from the checkpoint.
        with weights_only_torch_loads():
            loaded, not_requested, absent = dist_checkpointing.load(state, folder, strict="return_all")
    except Exception as err:  # a shape mismatch, a truncated or unreadable file
        raise CheckpointError(f"checkpoint.load={folder}: cannot be loaded into this model: {err}") from err
    if absent:
        raise CheckpointError(
            f"checkpoint.load={folder}: the checkpoint lacks {len(absent)} key(s) this model needs, "
            f"e.g. {sorted(absent)[:3]}"
        )
    # Skipped on purpose: RNG of another layout; everything but weights when loading weights only;
    # the distributed optimizer's copies of the weights when loading without it.
    not_requested = {key for key in not_requested
                     if key != "rng_state" and not (weights_only and key.startswith("optimizer"))
                     and not key.startswith(optimizer_state.MAIN_PARAM_PREFIXES)}
    if not_requested:
        raise CheckpointError(
            f"checkpoint.load={folder}: the checkpoint has {len(not_requested)} key(s) this model does "
            f"not, e.g. {sorted(not_requested)[:3]} (a different model shape?)"
        )
    for i, chunk in enumerate(chunks):
        unwrap_model(chunk).load_state_dict(loaded[f"model{i}"])
    if with_optimizer:
        optimizer_request.load_into(loaded["optimizer"], chunks)
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
