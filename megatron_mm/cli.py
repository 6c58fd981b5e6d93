"""What the command-line entry points share: bad input is one line per problem on stderr and
exit status 2, never a traceback (config errors before anything starts, checkpoint errors
when a checkpoint is missing or corrupt). Anything else is a bug and raises.

Under torchrun or srun every rank meets the same config error, so only the global rank 0
(RANK, else SLURM_PROCID; a lone process is rank 0) prints it. Under torchrun the ranks also
wait for one another (at most LEAVE_TIMEOUT_S, through the store torchrun's agent keeps)
and then leave at once: torchrun kills the ranks still running once one has exited, and each
rank should report 2, not a SIGTERM (a rank with an error that torchrun stops anyway leaves
with 2). An error that only some ranks meet (a checkpoint file one rank cannot read) is still
printed under torchrun: by each such rank whose message rank 0 did not print, prefixed with
its rank. (Under srun, with no store before the process group, only rank 0 prints.)"""

from __future__ import annotations

import os
import sys
import time
from typing import Callable, Mapping, Optional

from megatron_mm.config import ConfigError

LEAVE_TIMEOUT_S = 20.0  # how long a rank with an error waits for the others under torchrun


def _error_lines(err: BaseException) -> Optional[list[str]]:
    """The user-facing lines of a config or checkpoint error, else None (a bug: re-raise)."""
    if isinstance(err, ConfigError):
        return [f"config error: {line}" for line in str(err).split("\n")]
    if type(err).__name__ == "CheckpointError":  # imports megatron-core: only when needed
        from megatron_mm.training.checkpoint import CheckpointError

        if isinstance(err, CheckpointError):
            return [f"checkpoint error: {line}" for line in str(err).split("\n")]
    return None


def _torchrun_store(environ: Mapping[str, str] = os.environ):
    """A client of the store torchrun's agent keeps for its workers, or None elsewhere."""
    if environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() != "true" or "MASTER_PORT" not in environ:
        return None
    try:
        import datetime

        from torch.distributed import TCPStore

        return TCPStore(environ.get("MASTER_ADDR", "127.0.0.1"), int(environ["MASTER_PORT"]), is_master=False,
                        timeout=datetime.timedelta(seconds=10))
    except Exception:  # no store to reach: print and leave alone
        return None


def _report(lines: list[str], environ: Mapping[str, str] = os.environ) -> bool:
    """Print `lines` once for all ranks (see the module's docstring); True when the ranks met
    through torchrun's store (and should now leave at once)."""
    from megatron_mm.runtime.distributed import rank_from_env, world_size_from_env

    rank, world = rank_from_env(environ), world_size_from_env(environ)
    message = "\n".join(lines)
    if rank == 0:
        # first, before joining the count below: once every rank has joined, any may leave,
        # and torchrun then stops the others (rank 0 too) with SIGTERM
        print(message, file=sys.stderr, flush=True)
    store = _torchrun_store(environ) if world > 1 else None
    if store is None:
        return False
    prefix = f"megatron_mm/error_exit/{environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
    try:
        store.set(f"{prefix}/rank{rank}", message)
        store.add(f"{prefix}/count", 1)
        deadline = time.monotonic() + LEAVE_TIMEOUT_S
        while store.add(f"{prefix}/count", 0) < world and time.monotonic() < deadline:
            time.sleep(0.05)
        rank0 = store.get(f"{prefix}/rank0").decode() if store.check([f"{prefix}/rank0"]) else None
    except Exception:  # the store went away (torchrun stopping): print what this rank knows
        rank0 = None if rank else message
    if rank != 0 and rank0 != message:
        print("\n".join(f"[rank {rank}] {line}" for line in lines), file=sys.stderr, flush=True)
    return True


def _exit_2_on_sigterm():
    """From here this rank's outcome is its error: torchrun's SIGTERM (sent to the ranks still
    running, or still exiting, once a sibling has left with the same error) ends it with 2.
    Returns the previous handler (None where none could be installed)."""
    import signal

    def leave(signum, frame):
        sys.stderr.flush()
        sys.stdout.flush()
        os._exit(2)

    try:
        return signal.signal(signal.SIGTERM, leave)
    except ValueError:  # not the main thread: keep the default
        return None


def report_errors(work: Callable[[], None]) -> int:
    """Run `work`; return 0, or 2 after printing a config or checkpoint error (once for all ranks)."""
    from megatron_mm.runtime import compat

    compat.before_megatron_import()
    try:
        work()
    except Exception as err:
        lines = _error_lines(err)
        if lines is None:
            raise
        from megatron_mm.runtime.distributed import world_size_from_env

        previous = _exit_2_on_sigterm() if world_size_from_env() > 1 else None
        if _report(lines):
            # The ranks leave together, now: interpreter teardown (a second or more with torch
            # and megatron-core loaded) would outlast torchrun's 0.1 s watch of its workers,
            # and a SIGTERM arriving during teardown kills with -15 (Python has restored the
            # default handler by then).
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(2)
        if previous is not None:
            import signal

            signal.signal(signal.SIGTERM, previous)
        return 2
    return 0
