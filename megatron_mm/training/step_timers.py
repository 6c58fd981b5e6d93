"""Where a training step's time goes, from megatron-core's own timers.

Given a `megatron.core.timers.Timers` as `TransformerConfig.timers`, megatron-core 0.16.1 times
the parts below (its pipeline schedules, p2p communicator and `finalize_model_grads`); the
training loop adds `optimizer` (Megatron-LM's name) around the optimizer and schedule step.
`read` takes each timer's seconds since the last read; `split` turns per-step seconds into the
parts of a step. A timer runs only at or below the `Timers` log level it was built with, and
each start/stop synchronises the GPU (megatron-core's `Timer`; the CPU needs none).
"""

from __future__ import annotations

from megatron.core.timers import DummyTimer, Timers

# Timer name -> the log level megatron-core starts it with (Timers asserts they agree).
P2P = [  # pipeline_parallel/p2p_communication.py P2PCommunicator: blocking sends/receives
    "forward-recv", "forward-send", "backward-recv", "backward-send",
    "forward-send-backward-recv", "backward-send-forward-recv",
    "forward-send-forward-recv", "backward-send-backward-recv",
    "forward-backward-send-forward-backward-recv",
]
GRAD_SYNC = [  # distributed/finalize_model_grads.py
    "all-grads-sync", "conditional-embedder-grads-all-reduce",
    "non-tensor-parallel-grads-all-reduce", "embedding-grads-all-reduce",
]
LEVELS = {
    "forward-backward": 1,  # schedules.py: the whole forward_backward_func call
    "forward-compute": 2,  # schedules.py forward_step: batch, model forward and loss, per micro-batch
    "backward-compute": 2,  # schedules.py backward_step: autograd backward, per micro-batch
    **{name: 2 for name in P2P},
    **{name: 1 for name in GRAD_SYNC},
    "optimizer": 1,  # training/loop.py: optimizer.step() and the learning-rate schedule step
}

# Parts of a step: the timers that measure each.
PARTS = {
    "forward": ["forward-compute"],
    "backward": ["backward-compute"],  # with parallel.recompute=full it holds the recomputed forward
    "pipeline_p2p": P2P,  # waiting on a peer stage (pipeline bubble) + transfer: one blocking wait
    "grad_sync": GRAD_SYNC,  # data-parallel gradient reduction, SP norm / tied-embedding all-reduces
    "optimizer": ["optimizer"],  # distributed optimizer's parameter all-gather included
}
OTHER = ("step time minus the measured parts: building the step's batch iterators, zeroing "
         "gradients, the schedule's own work, the rest of finalize_model_grads (MoE expert-bias update)")


def make_timers(level: int = 2) -> Timers:
    return Timers(level, "minmax")


def read(timers: Timers) -> dict[str, float]:
    """Seconds each timer of `LEVELS` ran since the last read (then reset to 0), for those
    running at this `Timers`' log level."""
    out = {}
    for name, level in LEVELS.items():
        timer = timers(name, log_level=level)
        if not isinstance(timer, DummyTimer):
            out[name] = timer.elapsed(reset=True)
    return out


def split(seconds: dict[str, float], step_time: float) -> dict[str, float] | None:
    """Seconds of each part of `PARTS` and the derived `other` (`OTHER`), from timer seconds
    and the step time they fall in; None when the timers ran at too low a level to tell."""
    if not all(name in seconds for names in PARTS.values() for name in names):
        return None
    parts = {part: sum(seconds[name] for name in names) for part, names in PARTS.items()}
    parts["other"] = step_time - sum(parts.values())
    return parts
