"""Layout planner: for a model, a cluster profile and a GPU count, every layout (TP, PP, VPP,
EP, ETP, micro-batch size, recomputation none/full; DP is what is left), kept when `validate`
and `fit.check_fits` accept it (with the profile's `Hardware`) and its per-GPU memory estimate
fits, ranked by an estimated step time. Pure Python over the typed config, no torch.

Everything below is an ESTIMATE from a model of the hardware, not a measurement; it ranks
layouts against each other and says roughly how fast. What it assumes:

Layouts
  * Sequence parallelism is on whenever tp > 1 (megatron-core requires it for MoE + TP; for a
    dense model it only saves memory).
  * Pipeline split: the even split when pp*vpp divides the layers; otherwise, of the splits
    megatron-core accepts (`pipeline_split.candidate_splits`), the one whose slowest stage
    has the fewest training FLOPs (`parallel.first_stage_layers`/`last_stage_layers` are set
    accordingly; the config's own values are replaced). VPP is tried up to `MAX_VPP`.
  * Memory: `costs.memory.estimate_memory` (its docstring lists what it counts); a layout
    fits when its largest pipeline stage needs at most `gpu_memory_gib - reserved_memory_gib`.

Step time = (M + (pp-1)/vpp) x t_mb + t_dp, where M is the micro-batches per step, t_mb the
time of one micro-batch on the slowest pipeline stage (the 1F1B/interleaved schedules run in
lockstep, and the bubble is (pp-1)/vpp micro-batch times: a fraction (pp-1)/(vpp*M)), and t_dp
the data-parallel gradient exchange. Nothing overlaps: this project's DDP runs with
overlap_grad_reduce off, and communication inside a micro-batch is counted beside compute
(megatron-core can overlap some of it on GPUs, so real steps can be faster). Per micro-batch on
one GPU of a stage:
  * compute: the stage's training FLOPs (`pipeline_split.stage_flops`: 3 x forward of its decoder
    layers, LM head and MTP layers on the last stage, encoders on the first; with recompute=full
    one more forward of the decoder layers) / tp, at `MATMUL_EFFICIENCY` x the cluster's dense
    peak (`peak_flops`: BF16; FP8 when precision.fp8 is set, optimistic as attention stays in
    BF16; half the BF16 peak for fp32, i.e. TF32 tensor cores). Routed
    experts are assumed balanced, so a GPU computes the expert FLOPs of its own tokens. No
    GEMM-size effect: a larger micro-batch is never faster here (only a smaller bubble and less
    memory favour mbs 1), while on a GPU its bigger GEMMs can be.
  * TP/SP: per decoder layer and pass (forward, backward, the recomputed forward) two
    all-gathers and two reduce-scatters of the micro-batch's [seq, mbs, hidden] activation,
    ring cost (tp-1)/tp of it, over NVLink (`validate` keeps TP groups inside a node).
    Embedding, head and MTP collectives are left out.
  * EP: per MoE layer and pass a dispatch and a combine all-to-all, each sending the GPU's
    tokens x top-k x hidden, (ep-1)/ep of it to other GPUs; the part bound for other nodes
    over InfiniBand, the rest over NVLink, at the same time (the slower sets the time). With
    etp > 1, an all-gather and a reduce-scatter of the dispatched tokens in the expert-TP group.
  * PP: per micro-batch and model chunk, the activation forward and its gradient back
    ([seq, mbs, hidden], divided by tp with SP) over InfiniBand whenever the job spans nodes
    (some stage boundary then crosses nodes, and the slowest link gates the pipeline), else
    NVLink.
  * DP, once a step: with the distributed optimizer a reduce-scatter of fp32 gradients
    (grad_reduce_in_fp32) and an all-gather of the weights in the run's dtype, dense
    parameters over dp and routed experts over expert dp, ring cost (n-1)/n; without it an
    all-reduce (twice the gradient volume). Over InfiniBand when a pipeline stage's ranks
    (which hold every DP and expert-DP group) do not sit inside one node.
  * Bandwidths from the profile: NVLink one direction = nvlink_gb_s / 2, InfiniBand per GPU
    one direction = infiniband_gbit_s_per_node / 8 / gpus_per_node, both at `LINK_EFFICIENCY`
    (DeepSeek-V3's report measured about 160 of the H800's 200 GB/s NVLink). No latency term.
  Left out: optimizer step and gradient clipping (memory-bound, small), data loading, the
  MoE router and permutation kernels, load imbalance between experts, stragglers.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterator, Optional

from megatron_mm.config import Config, ConfigError, validate
from megatron_mm.costs import pipeline_split
from megatron_mm.costs.flops import step_training_flops
from megatron_mm.costs.memory import GIB, MemoryEstimate, estimate_memory
from megatron_mm.planning.cluster import ClusterProfile
from megatron_mm.planning.fit import check_fits

MATMUL_EFFICIENCY = 0.45  # fraction of the dense peak a training step's GEMMs reach (assumed)
LINK_EFFICIENCY = 0.8  # fraction of a link's nominal bandwidth collectives reach (assumed)
MAX_VPP = 8
RECOMPUTE = ("none", "full")


@dataclass(frozen=True)
class Layout:
    tp: int
    pp: int
    vpp: Optional[int]
    ep: int
    etp: int
    micro_batch_size: int
    recompute: str
    first_stage_layers: Optional[int] = None
    last_stage_layers: Optional[int] = None

    def apply(self, cfg: Config) -> Config:
        """`cfg` with this layout (sequence parallelism on with TP)."""
        parallel = dataclasses.replace(
            cfg.parallel, tp=self.tp, pp=self.pp, vpp=self.vpp, ep=self.ep, etp=self.etp,
            sequence_parallel=self.tp > 1, first_stage_layers=self.first_stage_layers,
            last_stage_layers=self.last_stage_layers, recompute=self.recompute)
        train = dataclasses.replace(cfg.train, micro_batch_size=self.micro_batch_size)
        return dataclasses.replace(cfg, parallel=parallel, train=train)

    def overrides(self) -> list[str]:
        """The `--set` arguments that select this layout."""
        null = lambda v: "null" if v is None else v  # noqa: E731
        return [f"parallel.tp={self.tp}", f"parallel.pp={self.pp}", f"parallel.vpp={null(self.vpp)}",
                f"parallel.ep={self.ep}", f"parallel.etp={self.etp}",
                f"parallel.sequence_parallel={'true' if self.tp > 1 else 'false'}",
                f"parallel.first_stage_layers={null(self.first_stage_layers)}",
                f"parallel.last_stage_layers={null(self.last_stage_layers)}",
                f"parallel.recompute={self.recompute}", f"train.micro_batch_size={self.micro_batch_size}"]


@dataclass
class StepTime:
    """Seconds a training step spends on each part (see the module docstring)."""

    compute: float
    tp_comm: float
    ep_comm: float
    pp_comm: float
    bubble: float
    dp_comm: float

    @property
    def total(self) -> float:
        return self.compute + self.tp_comm + self.ep_comm + self.pp_comm + self.bubble + self.dp_comm


@dataclass
class Candidate:
    layout: Layout
    dp: int
    expert_dp: int
    microbatches: int
    stage_layers: list[int]
    memory: MemoryEstimate
    time: StepTime
    tokens_per_s: float
    mfu: float  # model FLOPs (3 x forward, recomputation not counted) / (step time x GPUs x `peak_flops`)

    @property
    def memory_gib(self) -> float:
        return self.memory.worst.total_bytes / GIB

    def as_dict(self) -> dict:
        t = self.time
        return dict(
            **dataclasses.asdict(self.layout), dp=self.dp, expert_dp=self.expert_dp, microbatches=self.microbatches,
            stage_layers=self.stage_layers, memory_gib=self.memory_gib,
            memory_stage=self.memory.worst.stage, step_time_s=t.total, tokens_per_s=self.tokens_per_s, mfu=self.mfu,
            time_s=dict(compute=t.compute, tp_comm=t.tp_comm, ep_comm=t.ep_comm, pp_comm=t.pp_comm,
                        bubble=t.bubble, dp_comm=t.dp_comm),
            overrides=self.layout.overrides(),
        )


@dataclass
class PlanResult:
    gpus: int
    usable_gib: float
    ranked: list[Candidate]  # fit, fastest first
    enumerated: int = 0
    refused: Counter = field(default_factory=Counter)  # key of validate's first complaint -> layouts
    refused_example: dict = field(default_factory=dict)  # key -> one complaint in full
    too_big: int = 0  # valid, but the memory estimate exceeds the usable memory
    smallest_too_big_gib: Optional[float] = None


# --------------------------------------------------------------------------- time model


def model_flops_per_step(cfg: Config) -> float:
    """Model FLOPs of a step for MFU, as training reports it (`loop.step_flops`: no
    recomputation), with one image and one audio clip a sequence (`pipeline_split`'s assumption)."""
    sequences = cfg.train.global_batch_size
    return step_training_flops(cfg, sequences * cfg.model.seq_length, images=sequences if cfg.model.vision else 0,
                               clips=sequences if cfg.model.audio else 0, recompute="none")


def peak_flops(cfg: Config, cluster: ClusterProfile) -> float:
    """Dense peak FLOP/s of one GPU for the run's precision (the MFU denominator too)."""
    if cfg.precision.fp8:
        return cluster.peak_tflops_fp8 * 1e12
    return cluster.peak_tflops_bf16 * 1e12 * (1.0 if cfg.precision.dtype == "bf16" else 0.5)


def _bandwidths(cluster: ClusterProfile) -> tuple[float, Optional[float]]:
    """(NVLink, InfiniBand per GPU) bytes/s, one direction, at LINK_EFFICIENCY."""
    nvlink = cluster.nvlink_gb_s / 2 * 1e9 * LINK_EFFICIENCY
    ib = None
    if cluster.infiniband_gbit_s_per_node:
        ib = cluster.infiniband_gbit_s_per_node / 8 / cluster.gpus_per_node * 1e9 * LINK_EFFICIENCY
    return nvlink, ib


def _remote_fraction(stride: int, size: int, gpus_per_node: int) -> float:
    """Of a group's other members (ranks 0, stride, ..., (size-1)*stride: the first group;
    the others are shifted copies), the share on another node than rank 0."""
    if size <= 1:
        return 0.0
    return sum(1 for j in range(1, size) if (j * stride) // gpus_per_node != 0) / (size - 1)


def step_time(cfg: Config, gpus: int, cluster: ClusterProfile, memory: MemoryEstimate) -> StepTime:
    """Estimated seconds of one training step of `cfg` (a validated layout) on `gpus` GPUs."""
    m, p, t = cfg.model, cfg.parallel, cfg.train
    g = cluster.gpus_per_node
    w = 2 if cfg.precision.dtype == "bf16" else 4
    peak = peak_flops(cfg, cluster) * MATMUL_EFFICIENCY
    nvlink, ib = _bandwidths(cluster)
    multi_node = gpus > g
    dp, v = gpus // (p.tp * p.pp), (p.vpp if p.vpp and p.pp > 1 else 1)
    expert_dp = gpus // (p.ep * p.etp * p.pp)
    microbatches = t.global_batch_size // (t.micro_batch_size * dp)
    passes = 3 if p.recompute == "full" else 2  # forward, backward, the recomputed forward
    tokens = t.micro_batch_size * m.seq_length
    activation = tokens * m.hidden_size * w  # one [seq, mbs, hidden] tensor, whole

    layers = pipeline_split.plan(cfg).layers
    flops = pipeline_split.stage_flops(cfg, layers)[0]
    dense_layers = m.first_k_dense_layers if m.is_moe else m.num_layers
    stage_indices = pipeline_split.stage_layer_indices(layers, p.vpp if p.pp > 1 else None)

    tp_per_layer = 0.0
    if p.tp > 1:
        tp_per_layer = passes * 4 * activation * (p.tp - 1) / p.tp / nvlink
    ep_per_layer = 0.0
    if m.is_moe and p.ep * p.etp > 1:
        sent = tokens / p.tp * m.moe_router_topk * m.hidden_size * w  # this GPU's tokens, top-k copies
        remote = _remote_fraction(p.etp, p.ep, g)
        to_others = sent * (p.ep - 1) / p.ep
        all_to_all = max(to_others * (1 - remote) / nvlink, to_others * remote / ib if remote else 0.0)
        expert_tp = 2 * sent * (p.etp - 1) / nvlink
        ep_per_layer = passes * (2 * all_to_all + expert_tp)
    pp_per_mb = 0.0
    if p.pp > 1:
        boundary = activation / (p.tp if p.sequence_parallel else 1)
        pp_per_mb = 2 * v * boundary / (ib if multi_node else nvlink)

    parts = []  # per stage: (compute, tp, ep, pp) seconds of one micro-batch
    for stage, indices in enumerate(stage_indices):
        moe_layers = sum(1 for i in indices if i >= dense_layers)
        parts.append((flops[stage] * t.micro_batch_size / p.tp / peak, len(indices) * tp_per_layer,
                      moe_layers * ep_per_layer, pp_per_mb))
    slowest = max(parts, key=sum)
    per_mb = sum(slowest)

    stage_ranks = gpus // p.pp
    dp_bw = ib if (stage_ranks > g or g % stage_ranks) else nvlink
    dp_time = 0.0
    for st in memory.stages:
        per_param = (4 + w) if memory.distributed_optimizer else 2 * 4
        dense = per_param * st.params.dense * (dp - 1) / dp
        expert = per_param * st.params.expert * (expert_dp - 1) / expert_dp
        dp_time = max(dp_time, (dense + expert) / dp_bw)
    compute, tp_comm, ep_comm, pp_comm = (microbatches * x for x in slowest)
    return StepTime(compute, tp_comm, ep_comm, pp_comm, (p.pp - 1) / v * per_mb, dp_time)


# --------------------------------------------------------------------------- enumeration


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def pipeline_split_for(cfg: Config, pp: int, vpp: Optional[int]) -> Optional[tuple[Optional[int], Optional[int]]]:
    """(first_stage_layers, last_stage_layers) the planner gives pp/vpp (None, None: even);
    None when no split exists."""
    layers, v = cfg.model.num_layers, vpp or 1
    if layers < pp * v:
        return None
    if layers % (pp * v) == 0:
        return None, None
    splits = pipeline_split.candidate_splits(layers, pp, vpp)
    if not splits:
        return None
    probe = dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, pp=pp, vpp=vpp))
    best = pipeline_split.balanced(probe, splits)
    return best[0], best[-1]


def candidate_layouts(cfg: Config, gpus: int, gpus_per_node: int,
                      micro_batch_sizes: tuple[int, ...] = (1, 2, 4)) -> Iterator[Layout]:
    """Every layout to try: TP and ETP dividing a node's GPUs, PP dividing what TP leaves,
    VPP up to MAX_VPP, EP x ETP dividing a pipeline stage's ranks, each micro-batch size,
    recompute none/full. `validate` decides which can run."""
    moe = cfg.model.is_moe
    in_node = [d for d in _divisors(gpus_per_node) if gpus % d == 0]
    for tp in in_node:
        for pp in _divisors(gpus // tp):
            for vpp in [None] + (list(range(2, MAX_VPP + 1)) if pp > 1 else []):
                split = pipeline_split_for(cfg, pp, vpp)
                if split is None:
                    continue
                stage = gpus // pp
                for etp in ([e for e in in_node if stage % e == 0] if moe else [1]):
                    for ep in (_divisors(stage // etp) if moe else [1]):
                        for mbs in micro_batch_sizes:
                            for recompute in RECOMPUTE:
                                yield Layout(tp, pp, vpp, ep, etp, mbs, recompute, *split)


def plan_layouts(cfg: Config, cluster: ClusterProfile, gpus: int,
                 micro_batch_sizes: tuple[int, ...] = (1, 2, 4)) -> PlanResult:
    """Enumerate, validate, estimate memory and step time; the fitting layouts fastest first."""
    problems = []
    if not cluster.has_gpus or not cluster.peak_tflops_bf16 or not cluster.nvlink_gb_s:
        problems.append(f"--cluster {cluster.name}: needs gpu, peak_tflops_bf16 and nvlink_gb_s to time a step")
    if gpus < 1 or (gpus > cluster.gpus_per_node and gpus % cluster.gpus_per_node):
        problems.append(f"--gpus={gpus}: must be at most {cluster.gpus_per_node} or a multiple of it "
                        f"(whole nodes of {cluster.name})")
    elif gpus > cluster.gpus_per_node and not cluster.infiniband_gbit_s_per_node:
        problems.append(f"--gpus={gpus}: spans nodes, but cluster {cluster.name} has no infiniband_gbit_s_per_node")
    if cfg.precision.fp8 and not cluster.peak_tflops_fp8:
        problems.append(f"precision.fp8={cfg.precision.fp8}: cluster {cluster.name} has no peak_tflops_fp8")
    if problems:
        raise ConfigError(problems)

    hardware = cluster.hardware()
    usable = cluster.gpu_memory_gib - cluster.reserved_memory_gib
    result = PlanResult(gpus, usable, [])
    tokens_per_step = cfg.train.global_batch_size * cfg.model.seq_length
    peak = peak_flops(cfg, cluster)
    for layout in candidate_layouts(cfg, gpus, cluster.gpus_per_node, micro_batch_sizes):
        result.enumerated += 1
        c = layout.apply(cfg)
        try:
            validate(c, gpus, hardware)
            check_fits(c, gpus, hardware)
        except ConfigError as err:
            key = err.problems[0].split("=", 1)[0]
            result.refused[key] += 1
            result.refused_example.setdefault(key, err.problems[0])
            continue
        memory = estimate_memory(c, gpus)
        need = memory.worst.total_bytes / GIB
        if need > usable:
            result.too_big += 1
            result.smallest_too_big_gib = min(need, result.smallest_too_big_gib or need)
            continue
        time = step_time(c, gpus, cluster, memory)
        result.ranked.append(Candidate(
            layout=layout, dp=memory.dp, expert_dp=memory.expert_dp, microbatches=memory.microbatches,
            stage_layers=[s.layers for s in memory.stages], memory=memory, time=time,
            tokens_per_s=tokens_per_step / time.total,
            mfu=model_flops_per_step(c) / time.total / gpus / peak,
        ))
    result.ranked.sort(key=lambda cand: cand.time.total)
    return result
