"""Cluster profiles (`configs/clusters/NAME.yaml`): what one node of a cluster offers.

Used by `validate` (through `Hardware`: FP8, GPUs per node) and `fit.check_fits` (GPU memory),
by the sbatch generator (tasks and GPUs per node, NCCL environment, MFU peak) and by memory
planning.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from typing import Optional

import yaml

from megatron_mm.config import ConfigError, Hardware

CHECKOUT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this project's folder


@dataclass
class ClusterProfile:
    name: str
    gpu: Optional[str]  # marketing name of the GPU; None: CPU-only nodes (gloo), e.g. the test cluster
    gpus_per_node: int  # also the tasks (ranks) per node: one task a GPU
    gpu_memory_gib: Optional[float] = None
    reserved_memory_gib: float = 0.0  # CUDA context, NCCL buffers, allocator slack: not for the model
    peak_tflops_bf16: Optional[float] = None  # dense (no sparsity), per GPU
    peak_tflops_fp8: Optional[float] = None  # dense, per GPU; None without FP8 tensor cores
    fp8: bool = False  # FP8 tensor cores (Hopper/Ada) and Transformer Engine in the cluster's image
    transformer_engine: bool = True  # the cluster's image has Transformer Engine
    nvlink_gb_s: Optional[float] = None  # NVLink bandwidth per GPU, GB/s, both directions together
    infiniband_gbit_s_per_node: Optional[float] = None  # all HCAs of a node together, one direction
    infiniband_hcas_per_node: Optional[int] = None
    cpus_per_task: int = 1
    exclusive: bool = True  # `#SBATCH --exclusive`
    gres: bool = True  # `#SBATCH --gpus-per-node`; false for CPU-only nodes
    env: dict = field(default_factory=dict)  # exported before srun (NCCL, InfiniBand, threads)
    notes: str = ""

    @property
    def has_gpus(self) -> bool:
        return self.gpu is not None

    def hardware(self) -> Hardware:
        """What `validate` and `check_fits` should assume about a rank of a job on this cluster."""
        if not self.has_gpus:
            return Hardware(device_name=f"CPU node ({self.name})", gpus_per_node=self.gpus_per_node)
        return Hardware(
            has_cuda=True,
            fp8_capable=self.fp8,
            has_transformer_engine=self.transformer_engine,
            device_name=f"{self.gpu} ({self.name})",
            gpus_per_node=self.gpus_per_node,
            gpu_memory_gib=self.gpu_memory_gib,
            reserved_memory_gib=self.reserved_memory_gib,
        )


def project_path(path: str) -> str:
    """A file of this project relative to the checkout (a job runs from its own checkout),
    any other file absolute."""
    path = os.path.abspath(path)
    return os.path.relpath(path, CHECKOUT) if path.startswith(CHECKOUT + os.sep) else path


def load_cluster(path: str) -> ClusterProfile:
    """Read a profile; a bad one raises ConfigError with one line per problem."""
    where = f"--cluster {path}"
    if not os.path.exists(path):
        raise ConfigError([f"{where}: not found (profiles: configs/clusters/*.yaml)"])
    try:
        with open(path) as f:
            tree = yaml.safe_load(f)
    except yaml.YAMLError as err:
        raise ConfigError([f"{where}: not YAML: {' '.join(str(err).split())}"]) from None
    if not isinstance(tree, dict):
        raise ConfigError([f"{where}: top level must be a mapping"])
    known = {f.name for f in fields(ClusterProfile)}
    unknown = sorted(set(tree) - known)
    if unknown:
        raise ConfigError([f"{where}: unknown key {', '.join(unknown)} (known: {', '.join(sorted(known))})"])
    missing = [k for k in ("name", "gpu", "gpus_per_node") if k not in tree]
    if missing:
        raise ConfigError([f"{where}: missing {', '.join(missing)}"])
    profile = ClusterProfile(**tree)
    problems = []
    if not isinstance(profile.gpus_per_node, int) or profile.gpus_per_node < 1:
        problems.append(f"{where}: gpus_per_node={profile.gpus_per_node}: must be a whole number >= 1")
    if profile.has_gpus and not (isinstance(profile.gpu_memory_gib, (int, float)) and profile.gpu_memory_gib > 0):
        problems.append(f"{where}: gpu_memory_gib={profile.gpu_memory_gib}: must be > 0 for a GPU cluster")
    if profile.fp8 and not profile.peak_tflops_fp8:
        problems.append(f"{where}: fp8=true needs peak_tflops_fp8")
    if not isinstance(profile.env, dict):
        problems.append(f"{where}: env: must be a mapping of variable to value")
    if problems:
        raise ConfigError(problems)
    return profile
