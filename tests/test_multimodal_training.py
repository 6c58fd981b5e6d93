"""The multimodal model (MoE + MLA language model, ViT and audio encoders on pipeline stage 0)
trained on CPU/gloo: layout equivalence, where the encoders live, and resume.

Every run starts from the same initial weights (an iteration-0 checkpoint loaded through
dist_checkpointing) and reads the same procedural demo set (200 samples, built once into the
session's `data_cache`). The multimodal stream is sharded per data-parallel rank, so the
global batch of a step is the same samples only for the same DP size: every compared layout
has DP=1 (1 rank, PP2, TP2, TP2xPP2), and the TP/PP peers of a replica read the same stream.

Measured (2 shared cores, fp32, 8 steps of 8 packed 128-token sequences, micro-batch 2):
max loss difference from one rank 0.0 for PP2 (DALI) and TP2xPP2, 4.8e-7 (8.6e-8 relative,
one step) for TP2; step-1 gradient norm within 6e-8 relative; resume at step 4 reproduces
steps 5-8 bit for bit. The file took 3 min 21 s wall (2 min 26 s CPU) with other work on
the same cores (load 4-11).
"""

import json
import os
import re
import subprocess
import sys

import pytest
import torch

from conftest import QUICKSTART_MULTIMODAL, ROOT, losses, pretrain

from megatron_mm.models.attention_mask import document_attention_mask

STEPS, RESUME_AT = 8, 4
COMMON = [
    "data.demo_samples=200", "data.loader=torch",
    "train.global_batch_size=8", "train.micro_batch_size=2",
    "train.scheduler.warmup_steps=2", f"train.scheduler.decay_steps={STEPS}",
    "logging.interval=1", "logging.tensorboard=false", "checkpoint.save_interval=0",
]
# Same as tests/test_training.py: TP partial sums may reorder fp32 reductions.
LOSS_TOLERANCE = 2e-4
# Step 1's gradient norm: same weights, same batch, no history to amplify rounding, so a
# gradient-reduction bug shows here first (the step-1 loss cannot see it, and Adam's first
# update is nearly scale-free). Measured <= 1e-7; the TP bugs fixed with this test gave 3e-4.
GRAD_NORM_TOLERANCE = 1e-5

LAYOUTS = {  # all DP=1; PP2 reads the demo set through DALI instead of the PyTorch loader
    "pp2_dali": (2, ["parallel.pp=2", "data.loader=dali"]),
    "tp2": (2, ["parallel.tp=2", "parallel.sequence_parallel=true"]),
    "tp2_pp2": (4, ["parallel.tp=2", "parallel.pp=2", "parallel.sequence_parallel=true"]),
}


def run(nproc: int, overrides: list[str]):
    return pretrain(nproc, COMMON + overrides, config=QUICKSTART_MULTIMODAL)


def first_grad_norm(run_dir) -> float:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return json.loads(f.readline())["grad_norm"]


def parameters(run_dir) -> dict:
    with open(os.path.join(run_dir, "parameters.json")) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_cache):
    """Initial weights (iteration 0) and the single-rank loss curve from them."""
    root = tmp_path_factory.mktemp("mm-reference")
    data = [f"data.cache_dir={data_cache}", f"train.steps={STEPS}"]
    run(1, data + ["train.steps=0", f"run.dir={root}/init"])
    init = f"{root}/init/checkpoints"
    # a checkpoint at step 4 too: the resume test starts from it
    run(1, data + [f"checkpoint.load={init}", f"run.dir={root}/single", f"checkpoint.save_interval={RESUME_AT}"])
    return {"init": init, "data": data, "losses": losses(f"{root}/single"), "single": f"{root}/single",
            "grad_norm": first_grad_norm(f"{root}/single"), "parameters": parameters(f"{root}/single")}


@pytest.fixture(scope="module")
def layout_run(reference, tmp_path_factory):
    """Runs a layout from the initial weights once; returns (run dir, stdout)."""
    done = {}

    def get(name):
        if name not in done:
            nproc, layout = LAYOUTS[name]
            run_dir = tmp_path_factory.mktemp(f"mm-{name}")
            proc = run(nproc, reference["data"] + layout + [
                f"checkpoint.load={reference['init']}", f"run.dir={run_dir}", "checkpoint.save_at_end=false"])
            done[name] = (str(run_dir), proc.stdout)
        return done[name]

    return get


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_matches_single_rank(name, reference, layout_run):
    run_dir, _ = layout_run(name)
    got, want = losses(run_dir), reference["losses"]
    assert sorted(got) == sorted(want) == list(range(1, STEPS + 1))
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=LOSS_TOLERANCE), (name, step, got[step], want[step])
    assert first_grad_norm(run_dir) == pytest.approx(reference["grad_norm"], rel=GRAD_NORM_TOLERANCE)


def step_metrics(run_dir) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_flops_count_the_steps_images_and_clips(reference, layout_run):
    """TFLOP/s counts the encoders for the images and clips each step actually held (summed
    over the data-parallel ranks), the same under every layout that reads the same samples."""
    from megatron_mm.config import load_config
    from megatron_mm.training.loop import step_flops

    cfg = load_config(QUICKSTART_MULTIMODAL, COMMON)
    single, tp2_pp2 = step_metrics(reference["single"]), step_metrics(layout_run("tp2_pp2")[0])
    assert [(m["images"], m["audio_clips"]) for m in single] == [(m["images"], m["audio_clips"]) for m in tp2_pp2]
    for m in single:
        assert m["images"] + m["audio_clips"] > 0
        assert m["flops"] == pytest.approx(step_flops(cfg, m["images"], m["audio_clips"]), rel=1e-12)
        assert m["flops"] > step_flops(cfg)  # the encoders' share is in


@pytest.mark.parametrize("name", ["pp2_dali", "tp2_pp2"])
def test_encoders_only_on_stage_0(name, reference, layout_run):
    """Later stages build no encoder; the stages together hold exactly the single-rank
    model (TP shards counted once)."""
    run_dir, stdout = layout_run(name)
    single = reference["parameters"]["stages"][0]
    stages = parameters(run_dir)["stages"]
    assert len(stages) == 2
    assert stages[0]["encoder_parameters"] == single["encoder_parameters"] > 0
    assert stages[1]["encoder_parameters"] == 0
    assert "stage 1: " in stdout and stdout.split("stage 1: ")[1].splitlines()[0].endswith(", 0 in encoders")
    assert sum(s["parameters"] for s in stages) == single["parameters"]


def test_tp2_counts_each_parameter_once(reference, layout_run):
    run_dir, _ = layout_run("tp2")
    assert parameters(run_dir)["stages"] == reference["parameters"]["stages"]


def test_resume_is_bit_exact_and_changes_data_parallel_size(reference, tmp_path):
    """The single-rank run's step-4 checkpoint resumed to step 8 (as after a kill at step 4):
    the same losses bit for bit as the uninterrupted run, so the stream restarted exactly where
    it stood. The same checkpoint resumed on 2 data-parallel ranks runs (each rank restarts at
    the saved depth of its new slice: other samples, so no equality is claimed)."""
    data = reference["data"]
    ckpt = os.path.join(reference["single"], "checkpoints", f"iter_{RESUME_AT:07d}")

    run(1, data + [f"checkpoint.load={ckpt}", f"run.dir={tmp_path}/same"])
    same, want = losses(f"{tmp_path}/same"), reference["losses"]
    assert sorted(same) == list(range(RESUME_AT + 1, STEPS + 1))
    for step in same:
        assert same[step] == want[step], (step, same[step], want[step])

    proc = run(2, data + [f"checkpoint.load={ckpt}", f"run.dir={tmp_path}/dp2"])
    saved = re.search(r"data: 1 stream positions saved for 2 data-parallel ranks; "
                      r"every rank resumes at sample (\d+) of its new slice", proc.stdout)
    assert saved and int(saved.group(1)) > 0, proc.stdout[-2000:]
    dp2 = losses(f"{tmp_path}/dp2")
    assert sorted(dp2) == list(range(RESUME_AT + 1, STEPS + 1))
    assert all(0 < loss < 10 for loss in dp2.values())


def test_two_stage_llava_training(reference, tmp_path):
    """Stage 1 trains the projectors alone (encoders and language model frozen); stage 2
    starts from its weights with a fresh optimizer (checkpoint.load_optimizer=false) and
    trains everything. Read back from the checkpoints: stage 1 changed exactly the projector
    tensors, stage 2 changed the rest too."""
    from megatron_mm.conversion.dcp import DistCheckpointReader

    data = reference["data"]
    frozen = ["train.freeze.vision_encoder=true", "train.freeze.audio_encoder=true",
              "train.freeze.language_model=true"]
    run(1, data + frozen + [f"checkpoint.load={reference['init']}", "train.steps=2", f"run.dir={tmp_path}/stage1"])
    run(1, data + [f"checkpoint.load={tmp_path}/stage1/checkpoints", "checkpoint.load_optimizer=false",
                   "train.steps=2", f"run.dir={tmp_path}/stage2"])
    assert sorted(losses(f"{tmp_path}/stage2")) == [1, 2]  # a new run: steps count from 1
    readers = [DistCheckpointReader(path) for path in
               (reference["init"], f"{tmp_path}/stage1/checkpoints", f"{tmp_path}/stage2/checkpoints")]
    keys = [k for k in readers[0].tensor_keys() if not k.endswith("_extra_state")]
    changed = {stage: {k for k in keys if not torch.equal(readers[stage - 1].read(k), readers[stage].read(k))}
               for stage in (1, 2)}
    projectors = {k for k in keys if ".projector." in k}
    assert projectors and changed[1] == projectors  # the routers' expert biases too stay put
    assert {k for k in keys if k.startswith(("vision.transformer", "audio.transformer", "decoder."))
            and k.endswith("weight")} <= changed[2]

def test_document_attention_mask_is_block_causal():
    segments = torch.tensor([[1, 1, 2, 2, 2, 0], [1, 1, 1, 1, 1, 1]])
    allowed = ~document_attention_mask(segments)[:, 0]
    expected = torch.zeros(6, 6, dtype=torch.bool)
    expected[:2, :2] = expected[2:5, 2:5] = expected[5:, 5:] = True
    assert torch.equal(allowed[0], expected & torch.ones(6, 6, dtype=torch.bool).tril())
    assert torch.equal(allowed[1], torch.ones(6, 6, dtype=torch.bool).tril())  # one sample: plain causal
    with pytest.raises(ValueError, match="segment_ids"):
        document_attention_mask(segments[0])



def test_packed_samples_attend_only_to_themselves():
    """tests/helpers/document_mask_probe.py: sample B's token losses packed after sample A,
    after another A, and alone in its sequence, with the same weights; masked with the fused
    attention (FlexAttention over segment ids, the default), with the dense mask, and with the
    fused attention and an MTP layer. Measured: masked (each way) 0.0 (other A) and 4.8e-7
    (alone: positions differ, rounding only); unmasked 0.11 and 0.11. Fused against dense on
    the packed sequence: losses 4.8e-7 apart, parameter gradients 3.3e-7 (relative to the
    largest)."""
    probe = os.path.join(ROOT, "tests", "helpers", "document_mask_probe.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, probe], capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    unmasked = result["unmasked"]
    for masked in (result["masked"], result["dense_mask"], result["masked_mtp"]):
        assert masked["vs_other"] <= 1e-5 and masked["vs_alone"] <= 1e-5, result
        assert masked["refuses_no_mask"], result
    assert result["fused_vs_dense"] <= 1e-5 and result["fused_vs_dense_grad"] <= 1e-5, result
    assert result["masked_mtp"]["vs_masked"] <= 1e-6 and result["masked_mtp"]["grads_finite"], result
    # The probe can tell: without the mask, B's losses depend on what was packed before it.
    assert unmasked["vs_other"] > 1e-2 and unmasked["vs_alone"] > 1e-2, result
