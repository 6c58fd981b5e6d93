"""Whether a layout's model state fits one GPU: the memory rule a run checks after `validate`.

`validate` (config.py) decides whether a config can run at all; this adds, where the GPU's
memory is known (`Hardware.gpu_memory_gib`: a cluster profile or the detected GPU), that the
model state alone (weights, gradients, optimizer; `costs.memory`) fits on every pipeline
stage. Activations are estimated and reported by the planner, not enforced.
"""

from __future__ import annotations

from megatron_mm.config import Config, ConfigError, Hardware
from megatron_mm.costs.memory import GIB, estimate_memory


def check_fits(cfg: Config, world_size: int, hardware: Hardware) -> None:
    """Raise ConfigError (one line) when the model state of a config `validate` accepted does
    not fit in the GPU memory `hardware` gives; no check without a GPU memory size."""
    if not hardware.gpu_memory_gib:
        return
    est = estimate_memory(cfg, world_size)
    worst = max(est.stages, key=lambda st: st.model_state_bytes)
    usable = hardware.gpu_memory_gib - hardware.reserved_memory_gib
    need = worst.model_state_bytes / GIB
    if need > usable:
        raise ConfigError([
            f"parallel={est.layout_text()}: model state needs {need:.1f} GiB a GPU on pipeline stage "
            f"{worst.stage} (weights, gradients, optimizer; planner estimate), more than the {usable:g} GiB "
            f"usable of a {hardware.gpu_memory_gib:g} GiB {hardware.device_name}"])
