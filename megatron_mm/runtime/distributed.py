"""Distributed start-up from torchrun or SLURM variables, and megatron-core parallel state.

torchrun sets RANK/LOCAL_RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT. Under `srun` (one task a
GPU) the same facts come from SLURM_PROCID/SLURM_LOCALID/SLURM_NTASKS, and the rendezvous
host is the first node of SLURM_JOB_NODELIST. A plain `python launch/pretrain.py` is one rank.
"""

from __future__ import annotations

import datetime
import os
import re
import socket
from dataclasses import dataclass
from typing import Mapping, Optional

import torch

from megatron_mm.config import Hardware
from megatron_mm.planning.layout import ORDER


@dataclass(frozen=True)
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    master_addr: str
    master_port: int
    launcher: str  # torchrun, slurm or single


def expand_nodelist(nodelist: str) -> list[str]:
    """Expand a SLURM node list such as `gpu[01-03,07],login1` into host names.
    (Written by hand so that no `scontrol` call is needed inside every task.)"""
    hosts: list[str] = []
    for prefix, ranges, plain in re.findall(r"([^,\[]+)\[([^\]]+)\]|([^,\[\]]+)", nodelist):
        if plain:
            hosts.append(plain)
            continue
        for part in ranges.split(","):
            lo, _, hi = part.partition("-")
            if not hi:
                hosts.append(prefix + lo)
                continue
            for i in range(int(lo), int(hi) + 1):
                hosts.append(f"{prefix}{i:0{len(lo)}d}")
    return hosts


def dist_env(environ: Mapping[str, str] = os.environ) -> DistEnv:
    if "RANK" in environ and "WORLD_SIZE" in environ:
        return DistEnv(
            rank=int(environ["RANK"]),
            local_rank=int(environ.get("LOCAL_RANK", 0)),
            world_size=int(environ["WORLD_SIZE"]),
            master_addr=environ.get("MASTER_ADDR", "127.0.0.1"),
            master_port=int(environ.get("MASTER_PORT", 29500)),
            launcher="torchrun",
        )
    if "SLURM_PROCID" in environ and "SLURM_NTASKS" in environ:
        nodes = expand_nodelist(environ.get("SLURM_JOB_NODELIST", environ.get("SLURM_NODELIST", "")))
        job = int(environ.get("SLURM_JOB_ID", "0"))
        return DistEnv(
            rank=int(environ["SLURM_PROCID"]),
            local_rank=int(environ.get("SLURM_LOCALID", 0)),
            world_size=int(environ["SLURM_NTASKS"]),
            master_addr=environ.get("MASTER_ADDR", nodes[0] if nodes else "127.0.0.1"),
            master_port=int(environ.get("MASTER_PORT", 20000 + job % 20000)),
            launcher="slurm",
        )
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return DistEnv(0, 0, 1, "127.0.0.1", port, "single")


def world_size_from_env(environ: Mapping[str, str] = os.environ) -> int:
    return int(environ.get("WORLD_SIZE", environ.get("SLURM_NTASKS", 1)))


def rank_from_env(environ: Mapping[str, str] = os.environ) -> int:
    """This process's global rank from the launcher's variables; 0 for a lone process."""
    return int(environ.get("RANK", environ.get("SLURM_PROCID", 0)))


def detect_hardware() -> Hardware:
    """What this machine offers; the only place that asks whether a GPU is here."""
    has_cuda = torch.cuda.is_available()
    try:
        import transformer_engine  # noqa: F401

        has_te = True
    except Exception:  # ImportError, or a TE build that fails to load its library
        has_te = False
    if not has_cuda:
        return Hardware(False, False, has_te, "cpu")
    major, minor = torch.cuda.get_device_capability()
    memory = torch.cuda.get_device_properties(0).total_memory / 2**30
    return Hardware(True, (major, minor) >= (8, 9), has_te, torch.cuda.get_device_name(), gpu_memory_gib=memory)


def init_distributed(env: DistEnv, hardware: Hardware, timeout_minutes: int = 30) -> torch.device:
    """Start the default process group (NCCL on GPUs, gloo on CPU); return this rank's device."""
    if hardware.has_cuda:
        torch.cuda.set_device(env.local_rank)
        device, backend = torch.device("cuda", env.local_rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(
            backend=backend,
            init_method=f"tcp://{env.master_addr}:{env.master_port}",
            rank=env.rank,
            world_size=env.world_size,
            timeout=datetime.timedelta(minutes=timeout_minutes),
            device_id=device if hardware.has_cuda else None,  # binds NCCL to this rank's GPU
        )
    return device


def init_model_parallel(parallel) -> None:
    from megatron.core import parallel_state

    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=parallel.tp,
        pipeline_model_parallel_size=parallel.pp,
        virtual_pipeline_model_parallel_size=parallel.vpp if parallel.pp > 1 else None,
        expert_model_parallel_size=parallel.ep,
        expert_tensor_parallel_size=parallel.etp,
        order=ORDER,
    )


def write_rank_map(path: str, env: DistEnv, num_parameters: int) -> None:
    """Every rank's host and parallel coordinates (and parameter count) into one JSON file
    written by rank 0: what the planner's rank map (`megatron_mm.planning.layout`) predicts."""
    import json

    from megatron.core import parallel_state as ps

    mine = dict(
        rank=env.rank, local_rank=env.local_rank, host=socket.gethostname(),
        slurm_node=os.environ.get("SLURMD_NODENAME"), slurm_node_id=os.environ.get("SLURM_NODEID"),
        tp=ps.get_tensor_model_parallel_rank(), pp=ps.get_pipeline_model_parallel_rank(),
        dp=ps.get_data_parallel_rank(), ep=ps.get_expert_model_parallel_rank(),
        etp=ps.get_expert_tensor_parallel_rank(), edp=ps.get_expert_data_parallel_rank(),
        params=num_parameters,
    )
    ranks = [None] * env.world_size
    torch.distributed.all_gather_object(ranks, mine)
    if env.rank == 0:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(path, "w") as f:
            json.dump({"world_size": env.world_size, "order": ORDER, "ranks": ranks}, f, indent=1)


def shutdown() -> None:
    from megatron.core import parallel_state

    if torch.distributed.is_initialized():
        parallel_state.destroy_model_parallel()
        torch.distributed.destroy_process_group()


def rng_state() -> dict:
    """Every RNG state this rank draws from (for bit-exact resume)."""
    from megatron.core import tensor_parallel

    state = {
        "torch": torch.get_rng_state(),
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(state: dict) -> None:
    from megatron.core import tensor_parallel

    torch.set_rng_state(state["torch"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class PeakMemory:
    """Peak memory of this rank's tensors: what `megatron_mm.costs.memory` estimates
    (weights, gradients, optimizer state, activations), plus the temporaries of the moment.
    The loop calls `step_start` before and `step_done` after every step and logs `peak_gib` (a
    collective: the maximum over all ranks).

    GPU: the CUDA caching allocator's peak since the model was built, `max_memory_allocated`.

    CPU: torch keeps no CPU allocator statistics, and the process's peak RSS is dominated by
    Python, torch and megatron-core themselves (0.43 GiB on one rank of the tiny model, whose
    tensors peak at 6 MiB) and by glibc's heap slack, so it says nothing about what the planner
    models. Here the second training step of the process is measured, the first that runs
    beside Adam's state (the steps after it repeat its allocations): the bytes of every tensor
    storage Python can reach when it starts (weights, gradient buffers, optimizer state), then
    the profiler's memory events (`profile_memory=True`: each allocation and free of c10's CPU
    allocator, with its address) replayed in order. The profiler sees only the thread that
    started it, so a block freed on gloo's threads never shows its free: allocations made
    inside c10d collectives (gloo's internal copies) are left out, and so is any block whose
    free never shows (its address handed out again first, or no tensor holds it at the end) —
    communication buffers, which the estimate does not model either. A block alive at the start
    counts until its address is handed out again (its free is not reported), else to the end.
    Repeats within 10 KiB, 0.25 % (tests/test_memory_measurement.py). Costs the measured step the
    profiler's slowdown plus a fraction of a second of replay, and starts the profiler quietly
    (`_start_quietly`: without its `USDT: ... profiler_start/stop` and "Memory block of unknown
    size" lines). `peak_gib` is None on CPU until step 2 is done (and for a
    one-step run), then stays at step 2's peak.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.steps = 0
        self.cpu_peak_bytes: Optional[int] = None
        self._profiler = None
        self._alive_at_start: dict[int, int] = {}
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)

    def step_start(self) -> None:
        """Before each training step: on CPU, step 2 starts the measurement."""
        if self.device.type != "cuda" and self.steps == 1:
            from torch.profiler import ProfilerActivity, profile

            self._alive_at_start = live_cpu_storages()
            self._profiler = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
            _start_quietly(self._profiler)

    def step_done(self) -> None:
        """After each training step: on CPU, step 2 ends the measurement."""
        self.steps += 1
        if self._profiler is not None:
            self._profiler.stop()
            events = self._profiler.profiler.kineto_results.experimental_event_tree()
            self.cpu_peak_bytes = cpu_tensor_peak_bytes(events, self._alive_at_start, live_cpu_storages())
            self._profiler, self._alive_at_start = None, {}

    def rank_gib(self) -> Optional[float]:
        """This rank's peak, or None on CPU before step 2 is done."""
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**30
        return None if self.cpu_peak_bytes is None else self.cpu_peak_bytes / 2**30

    def peak_gib(self) -> Optional[float]:
        """Maximum over all ranks (every rank must call it), or None on CPU before step 2 is done."""
        mine = self.rank_gib()
        if mine is None:
            return None
        peak = torch.tensor([mine], dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(peak, op=torch.distributed.ReduceOp.MAX)
        return float(peak.item())


def _start_quietly(profiler) -> None:
    """Start the memory profiler without the two lines torch prints for it, neither of which a
    user can act on: Kineto's `USDT: ... profiler_start` / `profiler_stop` (printed at every
    level below 6; Kineto reads KINETO_LOG_LEVEL once, at its first use, so the variable is set
    for that moment only and a user's own setting is kept), and c10's "Memory block of unknown
    size was allocated before the profiling started" (CPUAllocator.cpp, a C++ log line, not a
    Python warning, printed once a process at the first free of a block allocated before the
    profiler started): a block of our own is freed first, while stderr points at /dev/null."""
    import sys

    user_level = os.environ.get("KINETO_LOG_LEVEL")
    os.environ["KINETO_LOG_LEVEL"] = user_level or "6"
    sentinel = torch.empty(16)  # after live_cpu_storages(): outside the measurement
    try:
        profiler.start()
    finally:
        if user_level is None:
            os.environ.pop("KINETO_LOG_LEVEL", None)
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        del sentinel
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def live_cpu_storages() -> dict[int, int]:
    """Address -> bytes of the CPU storage of every tensor Python can reach (tensors are
    GC-tracked; views share their base's storage)."""
    import gc

    from torch._subclasses.fake_tensor import FakeTensor

    out = {}
    for obj in gc.get_objects():
        # type(), not isinstance(): isinstance asks objects for __class__, and some answer with a
        # warning (torch.distributed.reduce_op: "FutureWarning: ... is deprecated"). Fake tensors
        # (left by torch.compile's tracing) say "cpu" but own no memory, and reading their
        # data_ptr warns: skipped.
        kind = type(obj)
        if issubclass(kind, torch.Tensor) and not issubclass(kind, FakeTensor) and obj.device.type == "cpu":
            try:
                storage = obj.untyped_storage()
                out[storage.data_ptr()] = storage.nbytes()
            except (RuntimeError, NotImplementedError):  # tensors without storage (sparse, subclasses)
                pass
    return out


def cpu_tensor_peak_bytes(roots, alive_at_start: dict[int, int], alive_at_end: dict[int, int]) -> int:
    """Peak live bytes of CPU tensors over a profiler window: the storages alive at its start,
    then the allocations and frees of its event tree (`roots`); `PeakMemory` says which count."""
    from torch._C._profiler import _EventType

    changes: list[tuple[int, int, int]] = []  # (time ns, address, bytes; negative: a free)
    stack = [(node, False) for node in roots]
    while stack:
        node, in_collective = stack.pop()
        if node.tag == _EventType.Allocation:
            f = node.extra_fields
            if f.device.type == "cpu" and (f.alloc_size < 0 or not in_collective):
                changes.append((node.start_time_ns, f.ptr, f.alloc_size))
            continue
        in_collective = in_collective or node.name.startswith("c10d::")
        stack.extend((child, in_collective) for child in node.children)
    changes.sort(key=lambda c: c[0])
    counted = [False] * len(changes)  # an allocation and its free, or one alive at the end
    open_at: dict[int, int] = {}  # address -> index of its latest allocation not yet freed
    for i, (_, ptr, size) in enumerate(changes):
        if size > 0:
            open_at[ptr] = i
        elif ptr in open_at:
            counted[open_at.pop(ptr)] = counted[i] = True
    for ptr, i in open_at.items():
        counted[i] = ptr in alive_at_end
    start = dict(alive_at_start)
    now = peak = sum(start.values())
    for (_, ptr, size), keep in zip(changes, counted):
        if size > 0 and ptr in start:  # freed, unreported, before its address came back
            now -= start.pop(ptr)
        if keep:
            now += size
            peak = max(peak, now)
    return peak
