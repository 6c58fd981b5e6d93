"""Several one-rank trainings, one after another, in one process (tests only): what
`launch/pretrain.py --config CONFIG --set ...` does for each, without paying Python's and
megatron-core's imports (about 5 s a process on 2 cores) again for every short run.

    python tests/helpers/train_in_turn.py RUNS.json     # [[config, [override, ...]], ...]

`training.loop.run` starts and ends its own process group each time, so nothing carries
from one run to the next (test_resume_matrix.py compares these runs with launches of their
own, one of them bit for bit). A run that fails stops the rest (exit 1, its traceback).
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from megatron_mm.runtime.compat import before_megatron_import  # noqa: E402

before_megatron_import()

from megatron_mm.config import load_config  # noqa: E402
from megatron_mm.training.loop import run  # noqa: E402


def main(path: str) -> None:
    with open(path) as f:
        runs = json.load(f)
    for config, overrides in runs:
        run(load_config(config, overrides))


if __name__ == "__main__":
    main(sys.argv[1])
