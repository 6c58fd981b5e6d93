"""A checkpoint resumes under another parallel layout with its optimizer state.

The sources are the shared text layout runs (conftest.TextLayoutRuns: the text quickstart,
10 steps from the same initial weights, a checkpoint at iteration 4). Each resumes its
iteration-4 checkpoint under three other layouts, every change of expert parallelism in both
directions among them, experts laid out apart from the dense layers, the distributed optimizer on and off; the next 3 steps' losses must be
those of the source run's own steps 5-7 (which resuming in the saving layout repeats bit for
bit: test_training.py for one rank, `test_same_layout_resume_is_bit_exact` here for EP2).
That the optimizer's moments and step count come across is checked on the tensors: a run
that resumes and has nothing to train saves its state at once, which must equal the source's.
"""

from __future__ import annotations

import os

import pytest
import torch

from conftest import TEXT_COMMON, TEXT_STEPS, losses, pretrain, pretrain_in_turn
from megatron_mm.conversion.dcp import DistCheckpointReader

RESUME_AT, NEXT_STEPS = 4, 3
# fp32; the layouts reduce in different orders (TP partial sums, DP and EP gradient sums)
LOSS_TOLERANCE = 2e-4
TARGETS = {  # world size, overrides
    "single": (1, []),
    "single_plain": (1, ["train.optimizer.use_distributed_optimizer=false"]),  # torch's Adam state as is
    "tp2": (2, ["parallel.tp=2", "parallel.sequence_parallel=true"]),
    # the experts' own layout (EP2 x ETP1) folded into the dense one's (TP2); ETP2 needs an
    # uneven all_gather, which gloo lacks (validate refuses it on CPU)
    "tp2_ep2": (2, ["parallel.tp=2", "parallel.ep=2", "parallel.sequence_parallel=true"]),
    "pp2": (2, ["parallel.pp=2"]),
    "ep2": (2, ["parallel.ep=2"]),  # and DP2 for the dense parameters (distributed optimizer)
}
# source layout (TEXT_LAYOUTS) -> the layouts it resumes under: EP 1 -> 2 and 2 -> 1 both,
# the distributed optimizer on -> off (and off -> on below); one rank where that suffices
MATRIX = {
    "single": ["ep2", "tp2", "single_plain"],
    "tp2": ["ep2", "single", "single_plain"],
    "pp2": ["tp2_ep2", "single", "single_plain"],
    "ep2": ["single", "single_plain", "pp2"],
    "pp2_vpp2": ["ep2", "single", "single_plain"],
    "tp2_pp2_ep2": ["single", "single_plain", "ep2"],  # TP2 x PP2 x EP2 on 4 ranks
    "dp2": ["ep2", "single", "single_plain"],
}
PAIRS = [(source, target) for source, targets in MATRIX.items() for target in targets]
MOMENT_PAIRS = [("single", "ep2"), ("ep2", "single"), ("tp2_pp2_ep2", "single_plain")]
# the one-rank resumes of this module (source, target, steps): run in turn in one process
IN_TURN = [(s, t, RESUME_AT + NEXT_STEPS) for s, t in PAIRS if TARGETS[t][0] == 1] + [
    (s, t, RESUME_AT) for s, t in MOMENT_PAIRS if TARGETS[t][0] == 1] + [
    ("single", "single", RESUME_AT + NEXT_STEPS)]  # last: bit for bit after all the others
_runs: dict[tuple, str] = {}


def _resume_run(text_layout_runs, root, source, target, steps, checkpoint) -> tuple[str, list[str]]:
    """(run folder, overrides) of `source`'s iteration-4 checkpoint (or `checkpoint`) resumed
    under `target` up to step `steps`."""
    run = os.path.join(root, f"{source}-to-{target}-{steps}" + ("-chained" if checkpoint else ""))
    checkpoint = checkpoint or os.path.join(text_layout_runs(source), "checkpoints", f"iter_{RESUME_AT:07d}")
    # the source's schedule (decay over its 10 steps), not one fitted to this shorter run
    return run, TEXT_COMMON + text_layout_runs.data + TARGETS[target][1] + [
        f"train.steps={steps}", f"train.scheduler.decay_steps={TEXT_STEPS}", "checkpoint.save_interval=0",
        f"checkpoint.load={checkpoint}", f"run.dir={run}"]


def resume(text_layout_runs, root, source: str, target: str, steps: int = RESUME_AT + NEXT_STEPS,
           checkpoint: str | None = None) -> str:
    """The run folder of `source`'s iteration-4 checkpoint (or `checkpoint`) resumed under
    `target` up to step `steps` (at most once a module: some tests share runs). The first
    one-rank resume asked for runs all of IN_TURN in one process."""
    key = (source, target, steps, checkpoint)
    if key not in _runs and checkpoint is None and (source, target, steps) in IN_TURN:
        runs = {(s, t, n, None): _resume_run(text_layout_runs, root, s, t, n, None) for s, t, n in IN_TURN}
        pretrain_in_turn([sets for _, sets in runs.values()], os.path.join(root, "in_turn.json"))
        _runs.update({k: run for k, (run, _) in runs.items()})
    if key not in _runs:
        run, sets = _resume_run(text_layout_runs, root, source, target, steps, checkpoint)
        pretrain(TARGETS[target][0], sets)
        _runs[key] = run
    return _runs[key]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("resume-matrix"))


@pytest.mark.parametrize("source,target", PAIRS, ids=[f"{s}-to-{t}" for s, t in PAIRS])
def test_next_steps_match_the_source(text_layout_runs, root, source, target):
    got = losses(resume(text_layout_runs, root, source, target))
    want = losses(text_layout_runs(source))
    assert sorted(got) == list(range(RESUME_AT + 1, RESUME_AT + NEXT_STEPS + 1))
    for step, loss in got.items():
        assert loss == pytest.approx(want[step], rel=LOSS_TOLERANCE), (source, target, step, loss, want[step])


@pytest.mark.parametrize("layout", ["ep2", "single"])
def test_same_layout_resume_is_bit_exact(text_layout_runs, root, layout):
    """The reference above: resuming in the saving layout repeats the uninterrupted run's
    losses exactly. EP2: a chained expert optimizer, RNG restored. One rank: run in turn after
    every other one-rank resume of this module in the same process, so nothing of those runs
    may carry into it."""
    got, want = losses(resume(text_layout_runs, root, layout, layout)), losses(text_layout_runs(layout))
    assert got == {step: want[step] for step in got}


def test_plain_optimizer_checkpoint_resumes_under_the_distributed_one(text_layout_runs, root):
    """Saved without the distributed optimizer (no fp32 copy of the weights in the checkpoint),
    resumed with it under EP2: steps 8-10 still follow the one-rank run."""
    plain = resume(text_layout_runs, root, "single", "single_plain")
    chained = resume(text_layout_runs, root, "single", "ep2", steps=TEXT_STEPS,
                     checkpoint=os.path.join(plain, "checkpoints"))
    got, want = losses(chained), losses(text_layout_runs("single"))
    assert sorted(got) == list(range(RESUME_AT + NEXT_STEPS + 1, TEXT_STEPS + 1))
    for step, loss in got.items():
        assert loss == pytest.approx(want[step], rel=2 * LOSS_TOLERANCE), (step, loss, want[step])


def _optimizer_state(folder: str) -> tuple[float, dict[str, torch.Tensor]]:
    """(step count, Adam's moments by parameter) of one iteration folder."""
    reader = DistCheckpointReader(folder)
    moments = {key: reader.read(key) for key in reader.metadata.state_dict_metadata
               if key.startswith(("optimizer.state.exp_avg.", "optimizer.state.exp_avg_sq."))}
    return reader.common["optimizer"]["step"], moments


@pytest.mark.parametrize("source,target", MOMENT_PAIRS)
def test_moments_and_step_count_come_across(text_layout_runs, root, source, target):
    """Resumed with nothing to train, the run saves the state it loaded: Adam's moments of
    every parameter and the step count, exactly as the source saved them."""
    run = resume(text_layout_runs, root, source, target, steps=RESUME_AT)
    folder = f"iter_{RESUME_AT:07d}"
    step, moments = _optimizer_state(os.path.join(run, "checkpoints", folder))
    want_step, want = _optimizer_state(os.path.join(text_layout_runs(source), "checkpoints", folder))
    assert step == want_step == RESUME_AT
    assert sorted(moments) == sorted(want) and len(want) > 50
    for key, tensor in want.items():
        assert tensor.abs().sum() > 0, key  # a moment that could tell a lost state from a kept one
        assert torch.equal(moments[key], tensor), key
