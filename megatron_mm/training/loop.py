"""Pretraining, top to bottom: validate → start ranks → data → model → optimizer →
resume → train steps (log, checkpoint, stop on SIGTERM) → final checkpoint.

Everything parallel is megatron-core's: DDP + distributed optimizer, the pipeline
schedules (1F1B, interleaved with VPP), `finalize_model_grads` (gradient all-reduce,
per-token loss scaling, MoE expert-bias update), `dist_checkpointing`.
"""

from __future__ import annotations

import json
import os
import signal
import time
from functools import partial
from typing import Callable

import torch
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.distributed.finalize_model_grads import finalize_model_grads
from megatron.core.optimizer import OptimizerConfig as MegatronOptimizerConfig
from megatron.core.optimizer import get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.timers import Timers
from megatron.core.transformer.module import Float16Module
from megatron.core.transformer.multi_token_prediction import MTPLossLoggingHelper
from megatron.core.utils import unwrap_model

from megatron_mm.config import Config, schedule_steps, validate
from megatron_mm.costs import pipeline_split
from megatron_mm.costs.flops import step_training_flops
from megatron_mm.models.attention_mask import THD, document_attention_mode, packed_inputs
from megatron_mm.models.packed_attention import flatten_rows
from megatron_mm.models.gpt import build_model_chunks, count_parameters, transformer_config
from megatron_mm.planning.fit import check_fits
from megatron_mm.runtime import compat
from megatron_mm.runtime import distributed as runtime
from megatron_mm.training import checkpoint, step_timers
from megatron_mm.training.metrics import MetricsLogger
from megatron_mm.training.step_data import StepData


def log0(*args) -> None:
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        print(*args, flush=True)


# --------------------------------------------------------------------------- model and optimizer


def uses_transformer_engine(hardware) -> bool:
    return hardware.has_transformer_engine and hardware.has_cuda


def build_model(cfg: Config, tc, hardware, placeholder_ids: dict[str, int]) -> list[DistributedDataParallel]:
    chunks = build_model_chunks(cfg, tc, uses_transformer_engine(hardware), placeholder_ids)
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=cfg.train.optimizer.use_distributed_optimizer,
        check_for_nan_in_grad=True,
    )
    model = []
    for i, chunk in enumerate(chunks):
        chunk.cuda()  # the runtime sends this to the CPU where there is no GPU
        if tc.bf16:
            chunk = Float16Module(tc, chunk)
        model.append(
            DistributedDataParallel(config=tc, ddp_config=ddp_config, module=chunk, disable_bucketing=i > 0)
        )
    return model


def stage_parameter_counts(model, device) -> list[dict]:
    """Per pipeline stage: distinct parameters and those in the vision/audio encoders.

    A rank holds 1/k of a parameter replicated on k ranks of its stage: dense weights not
    split by TP are replicated over TP x DP, the rest over DP; expert weights
    (`allreduce=False`) over ETP (unless split by it) x expert DP. Later stages' copies of a
    tied embedding (`shared`) are skipped. Summed over a stage's ranks: what the stage owns."""
    ps = parallel_state
    dp, tp = ps.get_data_parallel_world_size(), ps.get_tensor_model_parallel_world_size()
    edp, etp = ps.get_expert_data_parallel_world_size(), ps.get_expert_tensor_parallel_world_size()
    counts = torch.zeros(ps.get_pipeline_model_parallel_world_size(), 2, dtype=torch.float64, device=device)
    row = counts[ps.get_pipeline_model_parallel_rank()]
    for chunk in model:
        module = unwrap_model(chunk)
        encoders = {id(p) for name in ("vision", "audio") if getattr(module, name, None) is not None
                    for p in getattr(module, name).parameters()}
        for p in module.parameters():
            if getattr(p, "shared", False):
                continue
            split = getattr(p, "tensor_model_parallel", False)
            if getattr(p, "allreduce", True):
                share = p.numel() / dp / (1 if split else tp)
            else:
                share = p.numel() / edp / (1 if split else etp)
            row[0] += share
            row[1] += share if id(p) in encoders else 0
    torch.distributed.all_reduce(counts)
    return [{"stage": i, "parameters": round(float(n)), "encoder_parameters": round(float(e))}
            for i, (n, e) in enumerate(counts.tolist())]


def build_optimizer(cfg: Config, tc, model):
    o, s = cfg.train.optimizer, cfg.train.scheduler
    steps = schedule_steps(cfg.train)
    if steps.note:
        log0(steps.note)
    optimizer = get_megatron_optimizer(
        MegatronOptimizerConfig(
            optimizer=o.name,
            lr=o.lr,
            min_lr=o.min_lr,
            weight_decay=o.weight_decay,
            adam_beta1=o.adam_beta1,
            adam_beta2=o.adam_beta2,
            adam_eps=o.adam_eps,
            clip_grad=o.clip_grad,
            bf16=tc.bf16,
            params_dtype=tc.params_dtype,
            use_distributed_optimizer=o.use_distributed_optimizer,
        ),
        model,
    )
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=o.lr,
        min_lr=o.min_lr,
        lr_warmup_steps=steps.warmup_steps,
        lr_decay_steps=max(steps.decay_steps, steps.warmup_steps + 1),  # steps=0: never used
        lr_decay_style=s.decay_style,
        start_wd=o.weight_decay,
        end_wd=o.weight_decay,
        wd_incr_steps=max(cfg.train.steps, 1),
        wd_incr_style="constant",
    )
    return optimizer, scheduler


# --------------------------------------------------------------------------- one step


def forward_step(device, documents, data_iterator, model):
    """One micro-batch through this rank's chunk (every pipeline stage reads the batch:
    the first for tokens and media, all for the packed samples' boundaries, the last for
    labels). `documents`: the model's `attention_mask.document_attention_mode`."""
    batch = next(data_iterator)
    rows = [batch[k].to(device) for k in ("tokens", "labels", "loss_mask", "position_ids")]
    packed = packed_inputs(documents, batch["segment_ids"].to(device) if documents else None)
    if documents == THD:  # Transformer Engine only (not run on the CPU machines): one token stream
        rows = [flatten_rows(t) for t in rows]
    tokens, labels, loss_mask, position_ids = rows
    media = {k: batch[k].to(device) for k in ("images", "mels") if batch.get(k) is not None}
    output = model(tokens, position_ids, labels=labels, loss_mask=loss_mask, **packed, **media)
    return output, partial(loss_func, loss_mask)


def loss_func(loss_mask, output_tensor):
    """Per-token loss: megatron-core sums (loss, tokens) over micro-batches and DP ranks and
    divides gradients by the global token count, so the step's loss is the global-batch
    token mean whatever the layout."""
    losses = output_tensor.float().view(-1)
    mask = loss_mask.float().view(-1)
    loss_sum = torch.sum(losses * mask)
    num_tokens = mask.sum().to(torch.int)
    report = torch.stack([loss_sum.detach(), num_tokens.float()])
    return loss_sum, num_tokens, {"lm loss": report}


class ExpertLoadTracker:
    """Captures each MoE layer's tokens-per-expert for the step before megatron-core's
    `finalize_model_grads` consumes them (expert-bias update) and zeroes them."""

    def __init__(self, model, num_layers: int, num_experts: int, device: torch.device):
        self.routers = [
            m for chunk in model for m in chunk.modules() if getattr(m, "local_tokens_per_expert", None) is not None
        ]
        self.counts = torch.zeros(num_layers, max(num_experts, 1), device=device)

    def finalize(self, *args, **kwargs):
        self.counts.zero_()
        for router in self.routers:
            self.counts[router.layer_number - 1] += router.local_tokens_per_expert.detach().float()
        return finalize_model_grads(*args, **kwargs)

    def imbalance(self) -> dict:
        """max/mean tokens per expert for every MoE layer (1.0 = perfectly balanced)."""
        counts = self.counts.clone()
        torch.distributed.all_reduce(counts, group=parallel_state.get_tensor_and_data_parallel_group())
        torch.distributed.all_reduce(counts, group=parallel_state.get_pipeline_model_parallel_group())
        counts = counts.cpu()
        out = {}
        for layer, row in enumerate(counts):
            if row.sum() > 0:
                out[f"moe/load_imbalance_layer{layer + 1}"] = float(row.max() / row.mean())
        return out


def reduce_step_losses(losses: list[dict], num_microbatches: int, mtp_layers: int, device: torch.device) -> dict:
    """Global-batch loss (and MTP loss) on every rank: sum over micro-batches on the last
    stage, over data-parallel ranks, then across the pipeline so rank 0 has it."""
    values = torch.zeros(2 + mtp_layers, device=device)
    if parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        lm = torch.zeros(2, device=device)
        for item in losses:
            lm += item["lm loss"].detach().float()
        torch.distributed.all_reduce(lm, group=parallel_state.get_data_parallel_group())
        values[:2] = lm
        tracker = MTPLossLoggingHelper.tracker
        if mtp_layers and "values" in tracker:
            MTPLossLoggingHelper.reduce_loss_in_tracker()
            values[2:] = tracker["values"].detach().float() / num_microbatches
            MTPLossLoggingHelper.clean_loss_in_tracker()
    torch.distributed.all_reduce(values, group=parallel_state.get_pipeline_model_parallel_group())
    out = {"loss": float(values[0] / values[1]), "tokens": int(values[1])}
    for i in range(mtp_layers):
        out[f"mtp_{i + 1}_loss"] = float(values[2 + i])
    return out


def step_flops(cfg: Config, images: int = 0, clips: int = 0) -> float:
    """Model FLOPs of one training step, for TFLOP/s and MFU: the language model over every
    position of the global batch and the encoders over its `images` and audio `clips`;
    recomputation is not counted (MFU's convention: the model's FLOPs, not the hardware's)."""
    tokens = cfg.train.global_batch_size * cfg.model.seq_length
    return step_training_flops(cfg, tokens, images, clips, recompute="none")


def gather_rank_records(record: dict) -> list[dict]:
    """Every rank's `record`, in rank order, on every rank."""
    records = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(records, {"rank": torch.distributed.get_rank(), **record})
    return records


# --------------------------------------------------------------------------- stopping


class StopSignal:
    """SIGTERM/SIGUSR1 (SLURM preemption or time limit) ask for a checkpoint and a clean exit;
    every rank agrees on stopping at the same step."""

    def __init__(self, device: torch.device):
        self.device = device
        self.requested = False
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.requested = True
        print(f"[rank {torch.distributed.get_rank()}] received signal {signum}: will checkpoint and stop", flush=True)

    def agreed(self) -> bool:
        flag = torch.tensor([1.0 if self.requested else 0.0], device=self.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())


# --------------------------------------------------------------------------- the run


def run(cfg: Config, timers: Timers | None = None, on_log: Callable[[int, dict], None] | None = None) -> dict:
    """Train per `cfg`; returns the last logged metrics (on every rank).

    `timers` (megatron-core's, see step_timers.py) time the parts of every step; each logged
    step's metrics then also hold `ranks`: every rank's step time, peak memory and timer seconds.
    `on_log(step, metrics)` is called on every rank for every logged step."""
    env = runtime.dist_env()
    hardware = runtime.detect_hardware()
    validate(cfg, env.world_size, hardware)  # before any process group starts
    check_fits(cfg, env.world_size, hardware)
    if cfg.checkpoint.load:
        checkpoint.resolve(cfg.checkpoint.load)  # a missing or incomplete checkpoint: also before
    device = runtime.init_distributed(env, hardware)
    try:
        return _train(cfg, env, hardware, device, timers, on_log)
    finally:
        runtime.shutdown()


def _train(cfg: Config, env, hardware, device, timers=None, on_log=None) -> dict:
    runtime.init_model_parallel(cfg.parallel)
    applied = compat.apply(hardware)
    compat.seed_everything(cfg.train.seed)
    rank0 = env.rank == 0
    p, t = cfg.parallel, cfg.train
    dp = parallel_state.get_data_parallel_world_size()
    num_microbatches = t.global_batch_size // (t.micro_batch_size * dp)
    log0(f"megatron_mm: {env.world_size} rank(s) via {env.launcher} on {hardware.device_name}; "
         f"tp={p.tp} pp={p.pp} vpp={p.vpp} ep={p.ep} etp={p.etp} dp={dp}; "
         f"{num_microbatches} micro-batch(es) of {t.micro_batch_size} per step; workarounds: {', '.join(applied) or 'none'}")
    summary = compat.runtime_summary(hardware)  # what megatron-core runs without, and its notices hidden
    if summary:
        log0(summary)

    # Data (files built once per node, then read by every rank).
    data = StepData(cfg, env, device, log=log0)

    # Model, optimizer, schedule.
    tc = transformer_config(cfg, compat.transformer_config_overrides(hardware))
    split = pipeline_split.plan(cfg)
    built = pipeline_split.megatron_stage_layers(tc)
    if built != split.layers:  # the plan must be what megatron-core builds
        raise RuntimeError(f"pipeline split {split.layers} planned, but megatron-core builds {built}")
    if p.pp > 1:
        log0(split.describe())
    memory = runtime.PeakMemory(device)  # weights, gradients, optimizer state, activations
    model = build_model(cfg, tc, hardware, data.placeholder_ids)
    optimizer, scheduler = build_optimizer(cfg, tc, model)
    loads = ExpertLoadTracker(
        model, cfg.model.num_layers + cfg.model.mtp_num_layers, cfg.model.num_experts or 0, device
    )
    tc.grad_scale_func = optimizer.scale_loss
    tc.timers, tc.barrier_with_L1_time = timers, False  # time the step without adding barriers to it
    tc.finalize_model_grads_func = loads.finalize
    if len(model) > 1:
        tc.no_sync_func = [m.no_sync for m in model]
    log0(f"model: {count_parameters(model):,} parameters on rank 0")
    runtime.write_rank_map(os.path.join(cfg.run.dir, "rank_map.json"), env, count_parameters(model))
    stages = stage_parameter_counts(model, device)
    for st in stages:
        log0(f"stage {st['stage']}: {st['parameters']:,} parameters, {st['encoder_parameters']:,} in encoders")
    if rank0:
        os.makedirs(cfg.run.dir, exist_ok=True)
        with open(os.path.join(cfg.run.dir, "parameters.json"), "w") as f:
            json.dump({"stages": stages, "total": sum(st["parameters"] for st in stages)}, f, indent=1)

    # Resume (after clearing what a save killed mid-way left in the checkpoints folder).
    ckpt_root = cfg.checkpoint_dir
    checkpoint.remove_leftovers(ckpt_root)
    start, data_state = 0, {}
    if cfg.checkpoint.load and not cfg.checkpoint.load_optimizer:
        iteration, _, _ = checkpoint.load(cfg.checkpoint.load, model, None, None, cfg)
        log0(f"weights from {cfg.checkpoint.load} (iteration {iteration}); optimizer, schedule and data start afresh")
    elif cfg.checkpoint.load:
        start, note, data_state = checkpoint.load(cfg.checkpoint.load, model, optimizer, scheduler, cfg)
        log0(f"resumed from {cfg.checkpoint.load} at step {start}" + (f" ({note})" if note else ""))
    data.start(data_state)
    if t.steps == 0 or start >= t.steps:
        path = checkpoint.save(ckpt_root, start, model, optimizer, scheduler, cfg, data.state())
        log0(f"nothing to train (steps={t.steps}, start={start}); checkpoint at {path}")
        return {}

    logger = MetricsLogger(cfg.run.dir, t.steps, cfg.logging.tensorboard) if rank0 else None
    stop = StopSignal(device)
    forward_backward = get_forward_backward_func()
    documents = document_attention_mode(cfg, uses_transformer_engine(hardware))
    # The activations' [s, b] between pipeline stages: [b * s, 1] when THD flattens the rows.
    seq_length, micro_batch_size = cfg.model.seq_length, t.micro_batch_size
    if documents == THD:
        seq_length, micro_batch_size = seq_length * micro_batch_size, 1
    tokens_per_step = t.global_batch_size * cfg.model.seq_length
    last: dict = {}
    saved_at = start
    for step in range(start + 1, t.steps + 1):
        memory.step_start()
        started = time.perf_counter()
        iterators = data.iterators(step, num_microbatches, len(model))
        for chunk in model:
            chunk.zero_grad_buffer()
        optimizer.zero_grad()
        losses = forward_backward(
            forward_step_func=partial(forward_step, device, documents),
            data_iterator=iterators if len(model) > 1 else iterators[0],
            model=model if len(model) > 1 else model[0],
            num_microbatches=num_microbatches,
            seq_length=seq_length,
            micro_batch_size=micro_batch_size,
            forward_only=False,
        )
        if timers is not None:
            timers("optimizer", log_level=1).start()
        ok, grad_norm, _ = optimizer.step()
        if not ok:
            raise RuntimeError(f"step {step}: optimizer step failed (NaN/inf gradients)")
        scheduler.step(increment=1)
        if timers is not None:
            timers("optimizer").stop()
        step_time = time.perf_counter() - started
        timed = step_timers.read(timers) if timers is not None else None
        memory.step_done()

        if step % cfg.logging.interval == 0 or step == t.steps:
            metrics = reduce_step_losses(losses, num_microbatches, cfg.model.mtp_num_layers, device)
            metrics.update(loads.imbalance())
            images, clips = data.media_counts()
            flops = step_flops(cfg, images, clips)
            tflops = flops / step_time / env.world_size / 1e12
            peak_tflops = cfg.logging.peak_tflops_per_gpu
            metrics.update(
                lm_loss=metrics["loss"],
                lr=scheduler.get_lr(optimizer.param_groups[0]),
                grad_norm=None if grad_norm is None else float(grad_norm),
                tokens_per_s=tokens_per_step / step_time,
                flops=flops,
                tflops_per_gpu=tflops,
                mfu=tflops / peak_tflops if peak_tflops else None,
                step_time_s=step_time,
                peak_memory_gib=memory.peak_gib(),
            )
            skipped = data.skipped()
            if skipped is not None:
                metrics.update(data_skipped=skipped, images=images, audio_clips=clips)
            if timers is not None:
                metrics["ranks"] = gather_rank_records(
                    {"step_time_s": step_time, "peak_memory_gib": memory.rank_gib(), "timers": timed})
            last = metrics
            if logger:
                logger.log(step, metrics)
            if on_log:
                on_log(step, metrics)

        stopping = stop.agreed()
        if (cfg.checkpoint.save_interval and step % cfg.checkpoint.save_interval == 0) or (
            stopping and cfg.checkpoint.save_on_sigterm
        ):
            path = checkpoint.save(ckpt_root, step, model, optimizer, scheduler, cfg, data.state())
            saved_at = step
            log0(f"saved checkpoint {path}")
        if stopping:
            log0(f"stopping after step {step} on signal")
            break
    else:
        if saved_at != t.steps and cfg.checkpoint.save_at_end:
            path = checkpoint.save(ckpt_root, t.steps, model, optimizer, scheduler, cfg, data.state())
            log0(f"saved checkpoint {path}")
    if logger:
        logger.close()
    return last
