"""The same model trained by plain `transformers` + torch AdamW: the reference our step's speed
is compared with (tools/compare_cpu_speed.py on CPU; tools/gpu_report.py on a GPU).

The model is transformers' `DeepseekV3ForCausalLM` (or `DeepseekV2ForCausalLM` for a softmax
router) built from the `config.json` our HF export writes for the config
(`conversion.mapping.hf_config`, the one mapping), randomly initialised, in `dtype` (default:
the config's precision) on `device`, with transformers' default attention and experts
kernels for that device. It trains like our loop: a global batch of `micro_batch_size` x
`global_batch_size / micro_batch_size` accumulated micro-batches of `seq_length` tokens, the
per-token mean loss of the global batch, gradient clipping at `train.optimizer.clip_grad`,
`torch.optim.AdamW` with the config's learning rate (constant), betas, eps and weight decay.
Its tokens are one fixed random global batch (seeded by `train.seed`) repeated every step:
the data costs nothing, and the loss falls, so a test can see the model learn.

Hand-written because no library times "the same model, trained by transformers" against a
megatron config; the timing is the plain one: `perf_counter` around each step (after a device
synchronisation on a GPU), `warmup` untimed steps first.
"""

from __future__ import annotations

import statistics
import time
from typing import Optional

import torch

from megatron_mm.config import Config

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def hf_model(cfg: Config, dtype: torch.dtype = torch.float32, device: str = "cpu") -> torch.nn.Module:
    """transformers' causal LM of the config's language model, randomly initialised."""
    import transformers

    from megatron_mm.conversion.mapping import OURS_KEY, hf_config

    config = hf_config(cfg.model, dtype)
    config.pop(OURS_KEY)
    architecture = config.pop("architectures")[0]
    hf = transformers.AutoConfig.for_model(config.pop("model_type"), **config)
    torch.manual_seed(cfg.train.seed)
    return getattr(transformers, architecture)._from_config(hf, dtype=dtype).to(device)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_transformers_training(cfg: Config, steps: int, warmup: int, device: str,
                                  dtype: Optional[torch.dtype] = None) -> dict:
    """Train `warmup` + `steps` steps; returns tokens_per_s (mean over the timed steps),
    step_seconds (each timed step), losses (every step's, warm-up included) and
    peak_memory_gib (the device's peak on a GPU; on CPU the tensors' peak of the second step,
    measured as our loop measures it (runtime.distributed.PeakMemory), and None when there are
    fewer than two warm-up steps, so no timed step carries the profiler)."""
    from megatron_mm.runtime.distributed import PeakMemory

    if steps < 1 or warmup < 0:
        raise ValueError(f"steps={steps} must be >= 1 and warmup={warmup} >= 0")
    device = torch.device(device)
    dtype = dtype or DTYPES[cfg.precision.dtype]
    t, o = cfg.train, cfg.train.optimizer
    seq = cfg.model.seq_length
    accumulation = t.global_batch_size // t.micro_batch_size
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model = hf_model(cfg, dtype, device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=o.lr, betas=(o.adam_beta1, o.adam_beta2),
                                  eps=o.adam_eps, weight_decay=o.weight_decay)
    generator = torch.Generator().manual_seed(t.seed)
    tokens = torch.randint(0, cfg.model.vocab_size, (accumulation, t.micro_batch_size, seq + 1), generator=generator)
    inputs, labels = tokens[..., :-1].to(device), tokens[..., 1:].to(device)
    memory = PeakMemory(device)

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        total = torch.zeros((), device=device, dtype=torch.float32)
        for i in range(accumulation):
            logits = model(input_ids=inputs[i]).logits
            loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), labels[i].flatten())
            (loss / accumulation).backward()
            total += loss.detach()
        if o.clip_grad:
            torch.nn.utils.clip_grad_norm_(model.parameters(), o.clip_grad)
        optimizer.step()
        return float(total / accumulation)

    losses, seconds = [], []
    for i in range(warmup + steps):
        timed = i >= warmup
        if not timed:
            memory.step_start()
        _synchronize(device)
        started = time.perf_counter()
        losses.append(step())
        _synchronize(device)
        if timed:
            seconds.append(time.perf_counter() - started)
        else:
            memory.step_done()
    return {
        "tokens_per_s": t.global_batch_size * seq / statistics.fmean(seconds),
        "step_seconds": seconds,
        "losses": losses,
        "peak_memory_gib": memory.rank_gib(),
    }
