"""A checkpoint's model in this one process, whatever layout saved it: what evaluation and
generation share. megatron-core's `dist_checkpointing.load` reshards the saved chunks into the
one-rank model (`checkpoint.load`), so no conversion step is needed."""

from __future__ import annotations

from contextlib import contextmanager

from megatron_mm.config import Config, ConfigError, validate
from megatron_mm.models.gpt import transformer_config
from megatron_mm.planning.fit import check_fits
from megatron_mm.runtime import compat
from megatron_mm.runtime import distributed as runtime
from megatron_mm.training import checkpoint
from megatron_mm.training.loop import build_model


@contextmanager
def one_process(cfg: Config):
    """Validate `cfg` for one process, start its (one-rank) process group and model-parallel
    state; yields (env, hardware, device); shuts down on exit."""
    env = runtime.dist_env()
    hardware = runtime.detect_hardware()
    validate(cfg, env.world_size, hardware)
    check_fits(cfg, env.world_size, hardware)
    if env.world_size != 1:
        raise ConfigError([f"world size={env.world_size}: runs on one process"])
    if not cfg.checkpoint.load:
        raise ConfigError(["checkpoint.load=None: name the checkpoint to read"])
    device = runtime.init_distributed(env, hardware)
    try:
        runtime.init_model_parallel(cfg.parallel)
        compat.apply(hardware)
        compat.seed_everything(cfg.train.seed)
        yield env, hardware, device
    finally:
        runtime.shutdown()


def load_model(cfg: Config, hardware, placeholder_ids: dict[str, int]):
    """The model `cfg` describes with `checkpoint.load`'s weights, in eval mode; (model, iteration)."""
    tc = transformer_config(cfg, compat.transformer_config_overrides(hardware))
    model = build_model(cfg, tc, hardware, placeholder_ids)
    iteration, _, _ = checkpoint.load(cfg.checkpoint.load, model, None, None, cfg)
    return model[0].eval(), iteration
