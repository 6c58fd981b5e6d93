"""Build the model of several configs under one layout each and print every rank's parameter
count (run under torchrun on CPU/gloo). Used by tests/test_planning.py to check
`megatron_mm.costs.memory.rank_parameters` against real megatron-core models.

    torchrun --nproc_per_node=4 tests/helpers/count_rank_params.py CASES.json OUT.json

CASES.json: a list of {"name", "config", "overrides": [...]}; OUT.json gets
{name: [{"rank", "pp", "params"} for every rank]} from rank 0.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402
from megatron.core import parallel_state  # noqa: E402

from megatron_mm.config import load_config  # noqa: E402
from megatron_mm.models.gpt import build_model_chunks, count_parameters, transformer_config  # noqa: E402
from megatron_mm.runtime import compat  # noqa: E402
from megatron_mm.runtime import distributed as runtime  # noqa: E402


def main(cases_path: str, out_path: str) -> None:
    env = runtime.dist_env()
    hardware = runtime.detect_hardware()
    runtime.init_distributed(env, hardware)
    compat.apply(hardware)
    with open(cases_path) as f:
        cases = json.load(f)
    results = {}
    for case in cases:
        cfg = load_config(case["config"], case["overrides"])
        runtime.init_model_parallel(cfg.parallel)
        compat.seed_everything(cfg.train.seed)
        tc = transformer_config(cfg, compat.transformer_config_overrides(hardware))
        chunks = build_model_chunks(cfg, tc, False, {"image": 4, "audio": 5})
        mine = {"rank": env.rank, "pp": parallel_state.get_pipeline_model_parallel_rank(),
                "params": count_parameters(chunks)}
        gathered = [None] * env.world_size
        torch.distributed.all_gather_object(gathered, mine)
        results[case["name"]] = gathered
        del chunks
        parallel_state.destroy_model_parallel()
    if env.rank == 0:
        with open(out_path, "w") as f:
            json.dump(results, f)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
