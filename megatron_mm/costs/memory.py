"""Per-GPU memory of a layout, from the config alone (no torch, no process group).

Two parts, per pipeline rank (every rank of a pipeline stage holds the same amount):

**Model state** — exact arithmetic over what `megatron_mm.models` builds, checked against
built models (`tests/test_planning.py` counts the parameters of every rank under several
layouts and compares):
  * parameters of this rank: decoder layers of the stage (`costs.pipeline_split.plan`), MLA
    projections and dense/shared-expert MLPs split by TP (column/row-parallel), norms and the
    router whole on every TP rank, `num_experts/ep` routed experts split by ETP, the
    embedding on stage 0 and the output layer + final norm on the last stage (split by TP
    over the vocabulary), MTP layers and a copy of the embedding on the last stage, and the
    vision/audio encoders with their projectors on stage 0 (split by TP like the decoder);
  * bytes: weights in the run's dtype (2 bf16, 4 fp32); gradients in fp32 (megatron-core DDP
    main grads, `grad_reduce_in_fp32`); Adam's two moments in fp32 plus, for bf16, an fp32
    master copy (SGD: one momentum) — the distributed optimizer shards these over the data-
    parallel ranks (`dp` for dense parameters, `expert_dp` for routed experts). Frozen parts
    (`train.freeze`) keep only their weights.

**Activations** — an estimate (a documented rule of thumb, not a measurement), in the run's
dtype, of the tensors a decoder layer keeps for its backward pass, without recomputation,
with flash/SDPA attention (no seq x seq score matrix kept), per token:
  * MLA: input norm in/out 2h; query path 2*q_lora_rank (compressed, normed) and Q
    heads*(qk+rope); key/value path (kv_lora_rank+rope) + kv_lora_rank, K heads*(qk+rope)
    and V heads*v; the attention output heads*v;
  * dense MLP: norm in/out 2h, fc1 output 2*ffn, activation output ffn;
  * MoE: norm in/out 2h, router logits and probabilities (fp32) 2*experts, for each of the
    top-k routed copies its input h, fc1 output 2f/etp, activation output f/etp and output h
    (EP all-to-all moves tokens but, balanced, keeps their number), the shared experts 3*f_s;
  * parts split by TP (heads, FFN) are divided by tp; norm inputs/outputs by tp only with
    sequence parallelism; MoE parts by tp (MoE with TP requires sequence parallelism).
  Times tokens per micro-batch (micro_batch_size * seq_length), times the micro-batches in
  flight on the rank: 1F1B keeps min(pp - rank, micro-batches) of them on pipeline rank
  `rank`; the interleaved schedule keeps megatron-core's warm-up count + 1 model chunks of
  layers/vpp layers each. The last stage adds one micro-batch of logits (the run's dtype plus
  an fp32 copy for the cross-entropy) for the head and every MTP layer. Stage 0 adds the
  encoders' activations assuming one image and one audio clip per sequence.
  * `parallel.recompute: full` (megatron-core's full uniform recomputation, one layer a
    group): a decoder layer keeps only its input, h per token (divided by tp with sequence
    parallelism), an MTP layer its two inputs (2h); during backward one layer at a time runs
    its forward again, so the rank adds, once, the largest of its layers' full activations for
    one micro-batch (as above). The head's logits and the encoders are not recomputed.
  Not counted: temporary buffers (gradients of activations during backward, the optimizer
  step's scratch), communication buffers, allocator fragmentation — the cluster profile's
  `reserved_memory_gib` stands for them. Checked against measured peaks of CPU runs of the
  tiny model (tests/test_memory_measurement.py): the estimate is 0.72-0.96 of the measured
  peak there, the rest being those temporaries and the CPU's math attention, which keeps the
  heads x seq x seq scores this estimate assumes a flash kernel does not. Nor does it count
  them where a GPU keeps them too: with `data.document_mask` (multimodal sources) and
  `model.document_attention=dense_mask` the decoder's attention takes a dense [b, 1, s, s] mask,
  and Transformer Engine then runs its unfused attention (the default, `fused`, builds neither).

`planning.fit.check_fits` refuses a layout whose model state alone does not fit (given a GPU
memory size); the sbatch generator prints the full table.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from megatron_mm.config import Config, ModelConfig
from megatron_mm.costs import pipeline_split

GIB = 2**30


# --------------------------------------------------------------------------- parameters


@dataclass
class RankParams:
    """Parameters one rank holds, by how they are replicated and whether they train."""

    dense: int = 0  # replicated over data parallel: everything but the routed experts
    expert: int = 0  # routed experts: replicated over expert data parallel
    frozen_dense: int = 0  # of `dense`: no gradient, no optimizer state
    frozen_expert: int = 0  # of `expert`

    @property
    def total(self) -> int:
        return self.dense + self.expert

    def add(self, dense: int = 0, expert: int = 0, frozen: bool = False) -> None:
        self.dense += dense
        self.expert += expert
        if frozen:
            self.frozen_dense += dense
            self.frozen_expert += expert


def _attention(m: ModelConfig, tp: int) -> int:
    """One MLA block on one TP rank, its q/kv layernorms included (not the input norm)."""
    h, n = m.hidden_size, m.num_attention_heads
    q_head = m.qk_head_dim + m.qk_pos_emb_head_dim
    if m.q_lora_rank is None:
        q = h * n * q_head // tp  # linear_q_proj (column-parallel)
    else:  # down (column-parallel), q_layernorm (whole), up (column-parallel)
        q = h * m.q_lora_rank // tp + m.q_lora_rank + m.q_lora_rank * n * q_head // tp
    kv = (
        h * (m.kv_lora_rank + m.qk_pos_emb_head_dim) // tp  # linear_kv_down_proj
        + m.kv_lora_rank  # kv_layernorm
        + m.kv_lora_rank * n * (m.qk_head_dim + m.v_head_dim) // tp  # linear_kv_up_proj
    )
    return q + kv + n * m.v_head_dim * h // tp  # + linear_proj (row-parallel)


def _decoder_layer(m: ModelConfig, tp: int, ep: int, etp: int, moe: bool) -> tuple[int, int]:
    """(dense, expert) parameters of one decoder layer on one rank."""
    h = m.hidden_size
    dense = 2 * h + _attention(m, tp)  # input_layernorm, pre_mlp_layernorm
    if not moe:
        return dense + 3 * h * m.ffn_hidden_size // tp, 0  # SwiGLU fc1 (2f) + fc2, no biases
    dense += m.num_experts * h  # router (whole on every rank; its expert bias is a buffer)
    dense += 3 * h * m.num_shared_experts * m.moe_ffn_hidden_size // tp  # shared experts
    expert = (m.num_experts // ep) * 3 * h * m.moe_ffn_hidden_size // etp
    return dense, expert


def _encoder_layers(hidden: int, ffn: int, layers: int, tp: int) -> int:
    """Bidirectional encoder layers (biased linears, two LayerNorms with bias)."""
    per_layer = (
        4 * hidden  # two LayerNorms (weight, bias)
        + 3 * hidden * hidden // tp + 3 * hidden // tp  # linear_qkv (column-parallel, bias split)
        + hidden * hidden // tp + hidden  # linear_proj (row-parallel, bias whole)
        + ffn * hidden // tp + ffn // tp  # linear_fc1
        + hidden * ffn // tp + hidden  # linear_fc2
    )
    return layers * per_layer


def _projector(inp: int, out: int, tp: int) -> int:
    return inp * out // tp + out // tp + out * out // tp + out  # fc1 (column) + fc2 (row)


def encoder_parameters(m: ModelConfig, tp: int) -> dict[str, int]:
    """Parameters of each encoder part on one TP rank (stage 0): vision/audio encoders and
    their projectors (the resampler counts as a projector, as `train.freeze` treats it)."""
    out = {"vision_encoder": 0, "audio_encoder": 0, "projectors": 0}
    v = m.vision
    if v is not None:
        hv = v.hidden_size
        clip = v.arch == "clip"
        out["vision_encoder"] = (
            3 * v.patch_size * v.patch_size * hv + (0 if clip else hv)  # patch embedding (Conv2d; CLIP's unbiased)
            + (v.num_patches + clip) * hv + clip * hv  # learned positions (and CLIP's class token)
            + _encoder_layers(hv, v.ffn_hidden_size, v.num_layers, tp)
            + 2 * hv * (1 + clip)  # post-LayerNorm (and CLIP's pre-LayerNorm)
        )
        if v.projector == "resampler":
            out["projectors"] += (
                v.resampler_tokens * hv + 2 * hv  # queries, LayerNorm
                + hv * hv // tp + hv // tp  # linear_q
                + 2 * hv * hv // tp + 2 * hv // tp  # linear_kv
                + hv * hv // tp + hv  # linear_proj
            )
        out["projectors"] += _projector(hv, m.hidden_size, tp)
    a = m.audio
    if a is not None:
        ha = a.hidden_size
        out["audio_encoder"] = (
            a.num_mel_bins * ha * 3 + ha + ha * ha * 3 + ha  # two Conv1d, kernel 3
            + a.num_frames * ha  # the sinusoidal positions (a frozen parameter)
            + _encoder_layers(ha, a.ffn_hidden_size, a.num_layers, tp) + 2 * ha  # final LayerNorm
        )
        out["projectors"] += _projector(ha, m.hidden_size, tp)
    return out


def rank_parameters(cfg: Config, pp_rank: int) -> RankParams:
    """Parameters of any one rank of pipeline stage `pp_rank` (all its virtual chunks)."""
    m, p, f = cfg.model, cfg.parallel, cfg.train.freeze
    tp, ep, etp, pp = p.tp, p.ep, p.etp, p.pp
    h = m.hidden_size
    counts = pipeline_split.plan(cfg).layers
    first = sum(counts[:pp_rank])
    is_first, is_last = pp_rank == 0, pp_rank == pp - 1
    frozen_lm = f.language_model
    out = RankParams()

    dense_layers = m.first_k_dense_layers if m.is_moe else m.num_layers
    for layer in range(first, first + counts[pp_rank]):
        d, e = _decoder_layer(m, tp, ep, etp, moe=layer >= dense_layers)
        out.add(d, e, frozen_lm)
    vocab = m.vocab_size // tp * h
    if is_first:
        out.add(vocab, 0, frozen_lm)  # word embeddings (RoPE: no position table)
        enc = encoder_parameters(m, tp)
        out.add(enc["vision_encoder"], 0, f.vision_encoder)
        out.add(enc["audio_encoder"], 0, f.audio_encoder)
        out.add(enc["projectors"], 0, f.projectors)
    if is_last:
        out.add(h, 0, frozen_lm)  # final layernorm
        if not (is_first and m.share_embeddings_and_output_weights):
            out.add(vocab, 0, frozen_lm)  # output layer (on a later stage: the tied copy)
        if m.mtp_num_layers:
            if not is_first:
                out.add(vocab, 0, frozen_lm)  # MTP's copy of the embedding
            for _ in range(m.mtp_num_layers):
                d, e = _decoder_layer(m, tp, ep, etp, moe=m.is_moe)
                # enorm, hnorm, eh_proj (2h -> h, column-parallel), final layernorm
                out.add(d + 2 * h + 2 * h * h // tp + h, e, frozen_lm)
    return out


# --------------------------------------------------------------------------- activations


def _layer_activation_elements(m: ModelConfig, tp: int, etp: int, sp: bool, moe: bool, w: int) -> float:
    """Elements (of `w` bytes) kept for backward per token by one decoder layer on one rank
    (see the module doc)."""
    h, n = m.hidden_size, m.num_attention_heads
    norm_div = tp if sp else 1
    q_head = m.qk_head_dim + m.qk_pos_emb_head_dim
    attn = 2 * h / norm_div
    attn += (2 * m.q_lora_rank if m.q_lora_rank else 0) / tp
    attn += (m.kv_lora_rank + m.qk_pos_emb_head_dim + m.kv_lora_rank) / tp
    attn += (2 * n * q_head + 2 * n * m.v_head_dim) / tp  # Q, K, V, attention output
    if not moe:
        return attn + 2 * h / norm_div + 3 * m.ffn_hidden_size / tp
    f, fs = m.moe_ffn_hidden_size, m.num_shared_experts * m.moe_ffn_hidden_size
    mlp = 2 * h + 2 * m.num_experts * 4 / w  # norm in/out; router logits and probabilities in fp32
    mlp += m.moe_router_topk * (2 * h + 3 * f / etp) + 3 * fs
    return attn + mlp / tp


def _encoder_activation_elements(enc, tp: int) -> float:
    """Per media item: tokens x (norms 4h whole; qkv 3h, attention output h, fc1 and its
    activation 2*ffn split by TP), for each encoder layer."""
    if enc is None:
        return 0.0
    tokens = enc.num_patches if hasattr(enc, "num_patches") else enc.num_frames
    per_token = 4 * enc.hidden_size + (4 * enc.hidden_size + 2 * enc.ffn_hidden_size) / tp
    return tokens * per_token * enc.num_layers


def in_flight_chunks(pp: int, vpp: Optional[int], pp_rank: int, microbatches: int) -> int:
    """Model chunks whose activations pipeline rank `pp_rank` holds at its peak: 1F1B keeps
    min(pp - rank, M) micro-batches; the interleaved schedule megatron-core's warm-up + 1."""
    if pp == 1:
        return 1
    if not vpp or vpp == 1:
        return min(pp - pp_rank, microbatches)
    total = microbatches * vpp
    warmup = (pp - pp_rank - 1) * 2 + (vpp - 1) * pp
    return min(warmup + 1, total)


# --------------------------------------------------------------------------- the estimate


@dataclass
class StageMemory:
    stage: int
    layers: int
    params: RankParams
    weights_bytes: float
    grads_bytes: float
    optimizer_bytes: float
    activation_bytes: float
    in_flight: int  # micro-batches (model chunks with VPP) whose activations are held

    @property
    def model_state_bytes(self) -> float:
        return self.weights_bytes + self.grads_bytes + self.optimizer_bytes

    @property
    def total_bytes(self) -> float:
        return self.model_state_bytes + self.activation_bytes

    def as_dict(self) -> dict:
        return dict(
            stage=self.stage, layers=self.layers, params=self.params.total,
            expert_params=self.params.expert,
            weights_gib=self.weights_bytes / GIB, grads_gib=self.grads_bytes / GIB,
            optimizer_gib=self.optimizer_bytes / GIB, model_state_gib=self.model_state_bytes / GIB,
            activations_gib=self.activation_bytes / GIB, in_flight=self.in_flight,
            total_gib=self.total_bytes / GIB,
        )


@dataclass
class MemoryEstimate:
    tp: int
    pp: int
    ep: int
    etp: int
    vpp: Optional[int]
    dp: int
    expert_dp: int
    world_size: int
    microbatches: int
    dtype: str
    distributed_optimizer: bool
    recompute: str = "none"
    stages: list[StageMemory] = field(default_factory=list)

    def layout_text(self) -> str:
        return (f"tp{self.tp}.pp{self.pp}.ep{self.ep}.etp{self.etp}.dp{self.dp} "
                f"(expert dp {self.expert_dp}, vpp {self.vpp or '-'}) on {self.world_size} ranks")

    @property
    def worst(self) -> StageMemory:
        return max(self.stages, key=lambda s: s.total_bytes)

    def table(self) -> list[str]:
        """Human-readable lines: one per pipeline stage (first, last and the largest shown
        when there are many)."""
        lines = [
            f"{'stage':>5} {'layers':>6} {'params/GPU':>11} {'weights':>8} {'grads':>7} {'optim':>7} "
            f"{'model state':>11} {'activations':>11} {'in flight':>9} {'total':>7}   (GiB)"
        ]
        shown = self.stages
        if len(shown) > 6:
            keep = {0, 1, len(shown) - 2, len(shown) - 1, self.worst.stage}
            shown = [s for s in shown if s.stage in keep]
        previous = -1
        for s in shown:
            if s.stage != previous + 1:
                lines.append(f"{'...':>5}")
            previous = s.stage
            lines.append(
                f"{s.stage:>5} {s.layers:>6} {s.params.total / 1e9:>10.3f}B {s.weights_bytes / GIB:>8.2f} "
                f"{s.grads_bytes / GIB:>7.2f} {s.optimizer_bytes / GIB:>7.2f} {s.model_state_bytes / GIB:>11.2f} "
                f"{s.activation_bytes / GIB:>11.2f} {s.in_flight:>9} {s.total_bytes / GIB:>7.2f}"
            )
        return lines

    def as_dict(self) -> dict:
        return dict(
            tp=self.tp, pp=self.pp, ep=self.ep, etp=self.etp, vpp=self.vpp, dp=self.dp,
            expert_dp=self.expert_dp, world_size=self.world_size, microbatches=self.microbatches,
            recompute=self.recompute, stages=[s.as_dict() for s in self.stages],
        )


def estimate_memory(cfg: Config, world_size: int) -> MemoryEstimate:
    """Per-GPU memory of `cfg` on `world_size` ranks, for every pipeline stage. Assumes a
    config `validate` accepts for that world size."""
    m, p, t = cfg.model, cfg.parallel, cfg.train
    dp = world_size // (p.tp * p.pp)
    expert_dp = world_size // (p.etp * p.ep * p.pp)
    microbatches = max(t.global_batch_size // (t.micro_batch_size * dp), 1)
    bf16 = cfg.precision.dtype == "bf16"
    w = 2 if bf16 else 4
    adam = cfg.train.optimizer.name == "adam"
    opt_per_param = (4 if bf16 else 0) + (8 if adam else 4)  # fp32 master copy + moments
    distributed = cfg.train.optimizer.use_distributed_optimizer
    tokens = t.micro_batch_size * m.seq_length
    vpp = p.vpp if p.vpp and p.pp > 1 else None

    est = MemoryEstimate(p.tp, p.pp, p.ep, p.etp, vpp, dp, expert_dp, world_size, microbatches,
                         cfg.precision.dtype, distributed, p.recompute)
    counts = pipeline_split.plan(cfg).layers
    dense_layers = m.first_k_dense_layers if m.is_moe else m.num_layers
    recompute = p.recompute == "full"
    layer_input = m.hidden_size / (p.tp if p.sequence_parallel else 1)  # what a recomputed layer keeps
    for rank in range(p.pp):
        params = rank_parameters(cfg, rank)
        trainable_dense = params.dense - params.frozen_dense
        trainable_expert = params.expert - params.frozen_expert
        optimizer = opt_per_param * (
            trainable_dense / (dp if distributed else 1) + trainable_expert / (expert_dp if distributed else 1)
        )
        first = sum(counts[:rank])
        layers = [_layer_activation_elements(m, p.tp, p.etp, p.sequence_parallel, i >= dense_layers, w)
                  for i in range(first, first + counts[rank])]
        per_mb = (len(layers) * layer_input if recompute else sum(layers)) * tokens
        chunks = in_flight_chunks(p.pp, vpp, rank, microbatches)
        activations = per_mb * w * chunks / (vpp or 1)
        recomputed = max(layers, default=0.0)  # the one layer whose forward runs again in backward
        if rank == 0:
            media = _encoder_activation_elements(m.vision, p.tp) + _encoder_activation_elements(m.audio, p.tp)
            held = -(-chunks // (vpp or 1))  # micro-batches with a chunk-0 forward in flight
            activations += media * t.micro_batch_size * w * held
        if rank == p.pp - 1 and m.mtp_num_layers:
            mtp_layer = _layer_activation_elements(m, p.tp, p.etp, p.sequence_parallel, m.is_moe, w)
            activations += m.mtp_num_layers * (2 * layer_input if recompute else mtp_layer) * tokens * w
            recomputed = max(recomputed, mtp_layer)
        if rank == p.pp - 1:
            activations += (1 + m.mtp_num_layers) * tokens * m.vocab_size / p.tp * (w + 4)
        if recompute:
            activations += recomputed * tokens * w
        est.stages.append(StageMemory(
            stage=rank, layers=counts[rank], params=params,
            weights_bytes=params.total * w,
            grads_bytes=(trainable_dense + trainable_expert) * 4,
            optimizer_bytes=optimizer,
            activation_bytes=activations,
            in_flight=chunks,
        ))
    return est
