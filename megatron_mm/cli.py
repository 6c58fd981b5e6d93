"""What the command-line entry points share: bad input is one line per problem on stderr and
exit status 2, never a traceback (config errors before anything starts, checkpoint errors
when a checkpoint is missing or corrupt). Anything else is a bug and raises."""

from __future__ import annotations

import sys
from typing import Callable

from megatron_mm.config import ConfigError


def report_errors(work: Callable[[], None]) -> int:
    """Run `work`; return 0, or 2 after printing a config or checkpoint error."""
    try:
        work()
    except ConfigError as err:
        print(f"config error: {err}".replace("\n", "\nconfig error: "), file=sys.stderr)
        return 2
    except Exception as err:
        from megatron_mm.training.checkpoint import CheckpointError  # imports megatron-core: only when needed

        if not isinstance(err, CheckpointError):
            raise
        print(f"checkpoint error: {err}", file=sys.stderr)
        return 2
    return 0
