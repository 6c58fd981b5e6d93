"""Build a data folder once per cache, safely across processes.

`build_once(final, build)` calls `build(tmp)` on a fresh temporary folder beside `final`
and renames it into place, so a reader never sees a partial folder; when several
processes race, the first rename wins and the others use its result.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Callable


def build_once(final: str, build: Callable[[str], None]) -> bool:
    """Make `final` with `build` unless it exists; True when this call built it."""
    if os.path.isdir(final):
        return False
    root = os.path.dirname(final)
    os.makedirs(root, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(final)}-", dir=root)
    try:
        build(tmp)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache is for every user
        os.rename(tmp, final)
        return True
    except OSError:
        if not os.path.isdir(final):  # a real failure, not a lost rename race
            raise
        return False
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
