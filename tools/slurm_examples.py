"""Regenerate the example sbatch scripts in slurm/ and the rank maps + refusals page:

    python tools/slurm_examples.py > results/slurm_maps.md

Runs tools/make_sbatch.py for the three example jobs (DeepSeek-V3 671B on 256 H800 nodes,
DeepSeek-V2-Lite ~16B on 2 H800 nodes and on 4 A100 nodes) and for ten requests that must
be refused, each with its one-line reason (`REFUSALS`, also checked by tests/test_planning.py).
"""

from __future__ import annotations

import contextlib
import io
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tools"))

import make_sbatch  # noqa: E402

V3 = "configs/layouts/deepseek_v3_671b_pp16_ep64.yaml"
V2 = "configs/layouts/deepseek_v2_lite_pp2_ep8.yaml"
H800 = "configs/clusters/h800.yaml"
A100 = "configs/clusters/a100_80gb.yaml"
# The example scripts name a site checkout; regenerate them with --repo for yours.
SITE = ["--repo", "/path/to/megatron_mm", "--partition", "train", "--time", "2-00:00:00"]

MAPS = [
    ("DeepSeek-V3 671B on 256 H800 nodes (PP16 x EP64, as DeepSeek reported)",
     ["--config", V3, "--cluster", H800, "--nodes", "256", "--print-map", "--map-nodes", "2",
      "--out", "slurm/h800_deepseek_v3_671b_256nodes.sbatch", *SITE]),
    ("The same with TP4 and sequence parallelism (fits without activation recomputation; memory only)",
     ["--config", V3, "--cluster", H800, "--nodes", "256", "--set", "parallel.tp=4",
      "--set", "parallel.sequence_parallel=true", "--out", os.devnull, *SITE]),
    ("DeepSeek-V2-Lite (~16B) on 2 H800 nodes (PP2 x EP8)",
     ["--config", V2, "--cluster", H800, "--nodes", "2", "--print-map",
      "--out", "slurm/h800_deepseek_v2_lite_2nodes.sbatch", *SITE]),
    ("DeepSeek-V2-Lite (~16B) on 4 A100 80GB nodes (PP2 x EP8 x DP16)",
     ["--config", V2, "--cluster", A100, "--nodes", "4", "--print-map",
      "--out", "slurm/a100_deepseek_v2_lite_4nodes.sbatch", *SITE]),
]

# (what is wrong, make_sbatch arguments, the one line it must print)
REFUSALS = [
    ("TP larger than a node",
     ["--config", V2, "--cluster", H800, "--nodes", "4", "--set", "parallel.tp=16", "--set", "parallel.sequence_parallel=true"],
     "refused: parallel.tp=16: is larger than the 8 GPUs of a node (NVIDIA H800 80GB HBM3 (h800)): "
     "a tensor-parallel group must stay inside one node"),
    ("world not divisible by the expert layout",
     ["--config", V2, "--cluster", H800, "--nodes", "3"],
     "refused: parallel.ep*parallel.etp*parallel.pp=16: must divide the world size 24"),
    ("FP8 on A100",
     ["--config", V3, "--cluster", A100, "--nodes", "256"],
     "refused: precision.fp8=blockwise: needs a GPU with FP8 (Hopper/Ada, compute capability >= 8.9); "
     "this is NVIDIA A100-SXM4-80GB (a100_80gb)"),
    ("model state does not fit (V3 on 16 nodes, EP8)",
     ["--config", V3, "--cluster", H800, "--nodes", "16", "--set", "parallel.ep=8"],
     "refused: parallel=tp1.pp16.ep8.etp1.dp8 (expert dp 1, vpp -) on 128 ranks: model state needs 101.0 GiB "
     "a GPU on pipeline stage 1 (weights, gradients, optimizer; planner estimate), more than the 74.1 GiB "
     "usable of a 79.1 GiB NVIDIA H800 80GB HBM3 (h800)"),
    ("61 layers on 16 even stages",
     ["--config", V3, "--cluster", H800, "--nodes", "256", "--set", "parallel.first_stage_layers=null",
      "--set", "parallel.last_stage_layers=null"],
     "refused: model.num_layers=61: must be divisible by parallel.pp*parallel.vpp=16 "
     "(or set parallel.first_stage_layers / parallel.last_stage_layers)"),
    ("uneven split the middle stages cannot share",
     ["--config", V3, "--cluster", H800, "--nodes", "256", "--set", "parallel.first_stage_layers=4",
      "--set", "parallel.last_stage_layers=4"],
     "refused: parallel.first_stage_layers+parallel.last_stage_layers=4+4: leaves 53 of model.num_layers=61 "
     "for the other 14 stage(s): must be a positive multiple of 14 (megatron-core rule)"),
    ("experts not divisible by EP",
     ["--config", V2, "--cluster", H800, "--nodes", "3", "--set", "parallel.ep=3"],
     "refused: model.num_experts=64: must be divisible by parallel.ep=3"),
    ("MoE with TP but no sequence parallelism",
     ["--config", V2, "--cluster", H800, "--nodes", "2", "--set", "parallel.tp=2"],
     "refused: parallel.sequence_parallel=False: must be true for an MoE model with parallel.tp=2 > 1 "
     "(megatron-core rule)"),
    ("global batch not divisible by micro-batch x DP",
     ["--config", V2, "--cluster", A100, "--nodes", "2", "--set", "train.global_batch_size=100"],
     "refused: train.global_batch_size=100: must be divisible by train.micro_batch_size*data_parallel=1*8=8"),
    ("checkpoint signal longer than the time limit",
     ["--config", V2, "--cluster", H800, "--nodes", "2", "--time", "00:20:00", "--signal-minutes", "30"],
     "refused: --signal-minutes=30: must be shorter than --time=00:20:00, or the checkpoint signal would "
     "come before the job starts training"),
]


def run(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = make_sbatch.main(argv)
    finally:
        os.chdir(cwd)
    return rc, out.getvalue(), err.getvalue()


def main() -> int:
    print("# SLURM rank maps and refusals\n")
    print("Generated by `python tools/slurm_examples.py > results/slurm_maps.md` (tools/make_sbatch.py for "
          "each request; the example scripts land in `slurm/`). Memory figures are the planner's estimate "
          "(`megatron_mm/costs/memory.py`): the model state is exact arithmetic checked against built "
          "models; activations are a rule of thumb without recomputation.\n")
    for title, argv in MAPS:
        rc, out, err = run(argv)
        assert rc == 0, err
        lines = [line for line in out.splitlines()
                 if not line.startswith(("{", "note:", f"wrote {os.devnull}"))]
        print(f"## {title}\n")
        print("```\npython tools/make_sbatch.py " + " ".join(argv) + "\n```\n")
        print("```")
        print("\n".join(lines))
        print("```\n")
    print("## Ten requests refused\n")
    print("| what | request (make_sbatch.py arguments) | one-line reason (stderr, exit 2) |")
    print("|---|---|---|")
    for what, argv, expected in REFUSALS:
        rc, out, err = run(argv + ["--out", os.devnull])
        lines = [line for line in err.splitlines() if line.startswith("refused:")]
        assert rc == 2 and lines == [expected], (what, rc, lines)
        print(f"| {what} | `{' '.join(argv)}` | `{lines[0]}` |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
