"""Per-step metrics: `metrics.jsonl`, TensorBoard scalars under `tb/`, one console line.

Only the logging rank (global rank 0) creates a `MetricsLogger`; values arrive already
reduced across ranks.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Optional


def _fmt_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


class MetricsLogger:
    def __init__(self, run_dir: str, total_steps: int, tensorboard: bool = True):
        os.makedirs(run_dir, exist_ok=True)
        self.total_steps = total_steps
        self.jsonl = open(os.path.join(run_dir, "metrics.jsonl"), "a", buffering=1)
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(os.path.join(run_dir, "tb"))
        self.started = time.monotonic()
        self.first_step: Optional[int] = None

    def log(self, step: int, metrics: dict) -> None:
        record = {"step": step, **metrics}
        self.jsonl.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)) and value is not None and math.isfinite(value):
                    self.writer.add_scalar(key.replace(".", "/"), value, step)
            self.writer.flush()
        self._console(step, metrics)

    def _console(self, step: int, m: dict) -> None:
        if self.first_step is None:
            self.first_step, self.started = step, time.monotonic() - m.get("step_time_s", 0.0)
        done = step - self.first_step + 1
        per_step = (time.monotonic() - self.started) / max(done, 1)
        eta = _fmt_duration(per_step * (self.total_steps - step))
        width = 20
        filled = int(width * step / max(self.total_steps, 1))
        bar = "#" * filled + "." * (width - filled)
        parts = [
            f"[{bar}] step {step}/{self.total_steps}",
            f"loss {m['loss']:.4f}",
            f"lr {m['lr']:.2e}",
            f"grad {m['grad_norm']:.3f}" if m.get("grad_norm") is not None else "grad -",
            f"{m['tokens_per_s']:.0f} tok/s",
            f"{m['tflops_per_gpu']:.3f} TFLOP/s/GPU",
            f"mfu {m['mfu']:.1%}" if m.get("mfu") is not None else "mfu -",
            f"{m['step_time_s']:.2f} s/step",
            f"ETA {eta}",
        ]
        print(" | ".join(parts), flush=True, file=sys.stdout)

    def close(self) -> None:
        self.jsonl.close()
        if self.writer is not None:
            self.writer.close()
