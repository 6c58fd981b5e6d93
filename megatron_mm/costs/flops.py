"""Training FLOPs of the DeepSeek-V3-style model and of its vision and audio encoders
(hand-written arithmetic: no library counts MLA/MoE FLOPs for a megatron-core model, nor
our encoders, whose shapes are ours: models/encoders.py).

Counts matrix multiplies and convolutions only (2 FLOPs per multiply-add; norms,
activations, softmax, pooling, rotary embeddings and the embedding lookup are left out):
MLA projections (query down/up or direct, key-value down with the shared RoPE key, key-value
up, output), attention scores and values, dense MLP or MoE (router, top-k routed experts:
each token runs exactly `moe_router_topk` experts, and shared experts), the LM head, and
the MTP layers (eh_proj, one decoder layer, their own pass through the LM head).

Conventions:
* Causal attention is priced at seq/2 keys a query (what a causal kernel such as flash
  attention computes). `torch.utils.flop_counter` prices every query against every key (the
  CPU kernels compute the whole score matrix and mask it); tests/test_flops.py adds the
  difference explicitly. Encoder attention is bidirectional: every key. The recomputation
  of the scores inside a flash-attention backward is not counted (model FLOPs: the four
  gradient GEMMs only).
* Training = forward + backward, priced by what megatron-core and torch compute:
  - a GEMM against a trained weight: 3 × forward (the input gradient and the weight
    gradient; megatron-core's linears compute the input gradient even where the input needs
    none: a projector behind a frozen encoder);
  - a GEMM against a frozen weight whose input needs a gradient (a frozen language model
    or projector with something trainable below it): 2 ×; with nothing trainable below: 1 ×;
  - attention scores and values (no weights) and the MoE router (megatron-core's
    `RouterGatingLinearFunction` computes its weight gradient even when frozen): 3 ×
    wherever a gradient passes through them;
  - the convolution that reads the media (the patch embedding, the first audio
    convolution): torch computes no input gradient for it, so 2 × when trained, 1 × frozen.
* A frozen language model (LLaVA stage 1) is priced as if every token back-propagates to
  trainable encoders or projectors; a sequence with no trainable medium runs no backward.
* `recompute="full"` (parallel.recompute): each decoder layer and each MTP layer (eh_proj +
  its decoder layer) runs its forward once more in the backward pass (megatron-core's
  `tensor_parallel.checkpoint`); the LM head and the encoders are not recomputed.

Measured against `torch.utils.flop_counter.FlopCounterMode` on the real megatron-core model
(tests/test_flops.py: the tiny text MoE+MLA model with an MTP layer, with and without full
recomputation, and the tiny multimodal model with the MLP projector or the resampler and
with frozen encoders, projectors or language model): relative difference 0 (equal to the
FLOP), forward and training, in total and per part, once causal attention is priced the
counter's way. That check found the media-reading convolutions' backward (2 ×, not 3 ×)
and the frozen resampler's query projection (1 ×) and attention (3 ×).
"""

from __future__ import annotations

from typing import Optional

from megatron_mm.config import AudioConfig, Config, FreezeConfig, ModelConfig, VisionConfig

RECOMPUTE = ("none", "full")

# --------------------------------------------------------------------------- language model
# Forward FLOPs per token come in two kinds, priced apart when the language model is frozen:
# GEMMs against the model's linear weights, and "always back-propagated" work (attention
# scores and values, the router) whose backward is 2 × forward whatever is frozen.


def _attention_parts(m: ModelConfig) -> tuple[float, float]:
    """(projections, scores and values) forward FLOPs per token of one MLA layer."""
    h, heads = m.hidden_size, m.num_attention_heads
    qk = m.qk_head_dim + m.qk_pos_emb_head_dim
    if m.q_lora_rank:
        q = h * m.q_lora_rank + m.q_lora_rank * heads * qk  # linear_q_down_proj, linear_q_up_proj
    else:
        q = h * heads * qk  # linear_q_proj
    kv = h * (m.kv_lora_rank + m.qk_pos_emb_head_dim) + m.kv_lora_rank * heads * (m.qk_head_dim + m.v_head_dim)
    out = heads * m.v_head_dim * h
    # Causal attention: on average a query sees seq/2 keys (query·key over qk, weights·value over v).
    scores = (m.seq_length / 2) * heads * (qk + m.v_head_dim)
    return 2 * (q + kv + out), 2 * scores


def _mlp_parts(m: ModelConfig, moe: bool) -> tuple[float, float]:
    """(expert or dense GEMMs, router) forward FLOPs per token of one MLP or MoE layer."""
    h = m.hidden_size
    if not moe:
        return 2 * 3 * h * m.ffn_hidden_size, 0.0  # gated: gate, up, down
    experts = m.moe_router_topk + m.num_shared_experts
    return 2 * experts * 3 * h * m.moe_ffn_hidden_size, 2 * h * m.num_experts


def attention_forward_flops(m: ModelConfig) -> float:
    """Forward FLOPs per token of one MLA self-attention layer (causal: seq/2 keys)."""
    return sum(_attention_parts(m))


def mlp_forward_flops(m: ModelConfig, moe: bool) -> float:
    """Forward FLOPs per token of a dense MLP or of an MoE layer (router, activated experts)."""
    return sum(_mlp_parts(m, moe))


def lm_head_forward_flops(m: ModelConfig) -> float:
    return 2 * m.hidden_size * m.vocab_size


def _mtp_layer_parts(m: ModelConfig) -> tuple[float, float]:
    """One MTP layer without its LM-head pass: eh_proj ([h; h] -> h) and one decoder layer."""
    attention, mlp = _attention_parts(m), _mlp_parts(m, moe=m.is_moe)
    return 2 * 2 * m.hidden_size * m.hidden_size + attention[0] + mlp[0], attention[1] + mlp[1]


def mtp_layer_forward_flops(m: ModelConfig) -> float:
    return sum(_mtp_layer_parts(m))


def _layer_parts(m: ModelConfig) -> list[tuple[float, float]]:
    dense_layers = m.first_k_dense_layers if m.is_moe else m.num_layers
    out = []
    for i in range(m.num_layers):
        attention, mlp = _attention_parts(m), _mlp_parts(m, moe=i >= dense_layers)
        out.append((attention[0] + mlp[0], attention[1] + mlp[1]))
    return out


def layer_forward_flops_per_token(m: ModelConfig) -> list[float]:
    """Forward FLOPs per token of each decoder layer (the first k dense, the rest MoE)."""
    return [sum(parts) for parts in _layer_parts(m)]


def head_forward_flops_per_token(m: ModelConfig) -> float:
    """The LM head and the MTP layers (each with its own head pass): the last stage's extra."""
    return lm_head_forward_flops(m) + m.mtp_num_layers * (mtp_layer_forward_flops(m) + lm_head_forward_flops(m))


def forward_flops_per_token(m: ModelConfig) -> float:
    return sum(layer_forward_flops_per_token(m)) + head_forward_flops_per_token(m)


def _training(parts: tuple[float, float], frozen: bool, recomputed: bool) -> float:
    weights, always = parts
    return (2 if frozen else 3) * weights + 3 * always + (weights + always if recomputed else 0.0)


def _check_recompute(recompute: str) -> None:
    if recompute not in RECOMPUTE:
        raise ValueError(f"recompute={recompute!r}: must be one of {RECOMPUTE}")


def layer_training_flops_per_token(m: ModelConfig, recompute: str = "none", frozen: bool = False) -> list[float]:
    """Training FLOPs per token of each decoder layer; `frozen`: the language model is
    (train.freeze.language_model), `recompute`: parallel.recompute."""
    _check_recompute(recompute)
    return [_training(parts, frozen, recompute == "full") for parts in _layer_parts(m)]


def _head_training_parts(m: ModelConfig, recompute: str, frozen: bool) -> dict[str, float]:
    """Per token: "mtp" (the MTP layers without their head pass) and "lm_head" (the main and
    the MTP head passes, never recomputed)."""
    _check_recompute(recompute)
    return {"mtp": m.mtp_num_layers * _training(_mtp_layer_parts(m), frozen, recompute == "full"),
            "lm_head": (1 + m.mtp_num_layers) * _training((lm_head_forward_flops(m), 0.0), frozen, False)}


def head_training_flops_per_token(m: ModelConfig, recompute: str = "none", frozen: bool = False) -> float:
    """Training FLOPs per token of the LM head and the MTP layers (their heads not recomputed)."""
    return sum(_head_training_parts(m, recompute, frozen).values())


def training_flops_per_token(m: ModelConfig, recompute: str = "none", frozen: bool = False) -> float:
    """Training FLOPs per token of the language model (3 × forward, plus one forward of the
    decoder and MTP layers with full recomputation; a frozen language model's weights get no
    gradient)."""
    return sum(layer_training_flops_per_token(m, recompute, frozen)) + head_training_flops_per_token(m, recompute, frozen)


# --------------------------------------------------------------------------- encoders
# Encoders are never recomputed (models/encoders.py builds their TransformerConfig without
# megatron-core's recompute settings).


def _encoder_layers_forward_flops(num_layers: int, tokens: int, h: int, ffn: int) -> float:
    """Bidirectional layers (models/specs.py encoder_layer_spec) over `tokens` tokens: fused
    QKV and output projection, every query against all `tokens` keys, a two-matrix MLP."""
    per_token = 4 * h * h + 2 * h * ffn + 2 * tokens * h  # qkv + proj, fc1 + fc2, scores + values
    return 2 * num_layers * tokens * per_token


def _projector_forward_flops(tokens: int, enc_hidden: int, llm_hidden: int) -> float:
    return 2 * tokens * (enc_hidden * llm_hidden + llm_hidden * llm_hidden)  # MLPProjector: fc1, fc2


def _vision_parts(v: VisionConfig, llm_hidden: int) -> dict[str, float]:
    h, t = v.hidden_size, v.num_patches
    parts = {
        "stem": 2 * t * 3 * v.patch_size * v.patch_size * h,  # patch embedding (reads the image)
        "encoder": _encoder_layers_forward_flops(v.num_layers, t, h, v.ffn_hidden_size),
        "projector": _projector_forward_flops(v.num_tokens, h, llm_hidden),
        "queries": 0.0, "cross_attention": 0.0,
    }
    if v.projector == "resampler":
        q = v.resampler_tokens
        parts["queries"] = 2 * q * h * h  # linear_q over the learned queries
        parts["projector"] += 2 * (t * 2 * h * h + q * h * h)  # linear_kv over the features, linear_proj
        parts["cross_attention"] = 2 * 2 * q * t * h  # scores + values
    return parts


def _audio_parts(a: AudioConfig, llm_hidden: int) -> dict[str, float]:
    h, t = a.hidden_size, a.num_frames
    return {
        "stem": 2 * a.max_frames * a.num_mel_bins * 3 * h,  # conv1 (stride 1, reads the mel features)
        "encoder": 2 * t * h * 3 * h + _encoder_layers_forward_flops(a.num_layers, t, h, a.ffn_hidden_size),  # conv2
        "projector": _projector_forward_flops(a.num_tokens, h, llm_hidden),
        "queries": 0.0, "cross_attention": 0.0,
    }


def _forward(parts: dict[str, float]) -> dict[str, float]:
    return {"encoder": parts["stem"] + parts["encoder"],
            "projector": parts["projector"] + parts["queries"] + parts["cross_attention"]}


def vision_forward_flops(v: VisionConfig, llm_hidden: int) -> dict[str, float]:
    """Forward FLOPs for one image: {"encoder", "projector"} (the resampler counts as projector)."""
    return _forward(_vision_parts(v, llm_hidden))


def audio_forward_flops(a: AudioConfig, llm_hidden: int) -> dict[str, float]:
    """Forward FLOPs for one clip of `max_frames` frames: {"encoder", "projector"}."""
    return _forward(_audio_parts(a, llm_hidden))


def _encoder_training(p: dict[str, float], encoder_frozen: bool, projector_frozen: bool) -> dict[str, float]:
    """Training FLOPs of one medium's encoder and projector, by the rules in the module docstring."""
    encoder = p["stem"] + p["encoder"] if encoder_frozen else 2 * p["stem"] + 3 * p["encoder"]
    if not projector_frozen:  # trained: every GEMM 3 ×, even behind a frozen encoder
        projector = 3 * (p["projector"] + p["queries"] + p["cross_attention"])
    elif encoder_frozen:  # nothing below or inside needs a gradient
        projector = p["projector"] + p["queries"] + p["cross_attention"]
    else:  # input gradients only; the frozen learned queries need none
        projector = 2 * p["projector"] + p["queries"] + 3 * p["cross_attention"]
    return {"encoder": encoder, "projector": projector}


def encoder_training_parts(m: ModelConfig, freeze: FreezeConfig) -> dict[str, dict[str, float]]:
    """Training FLOPs for one image ("image") and one audio clip ("audio"), each split into
    {"encoder", "projector"}, with the backward pass priced by what `freeze` leaves trainable."""
    out = {}
    if m.vision is not None:
        out["image"] = _encoder_training(_vision_parts(m.vision, m.hidden_size), freeze.vision_encoder, freeze.projectors)
    if m.audio is not None:
        out["audio"] = _encoder_training(_audio_parts(m.audio, m.hidden_size), freeze.audio_encoder, freeze.projectors)
    return out


def encoder_training_flops(m: ModelConfig, freeze: FreezeConfig) -> dict[str, float]:
    """Training FLOPs for one image ("image") and one audio clip ("audio"), for the
    encoders `m` configures, with the backward pass priced by what `freeze` leaves trainable."""
    return {kind: sum(parts.values()) for kind, parts in encoder_training_parts(m, freeze).items()}


# --------------------------------------------------------------------------- a training step


def step_training_flops_by_part(cfg: Config, tokens: int, images: int = 0, clips: int = 0,
                                recompute: Optional[str] = None) -> dict[str, float]:
    """Training FLOPs of one step of `cfg` over `tokens` language-model positions (every
    position of every sequence, media placeholders and padding included), `images` images
    and `clips` audio clips, by part: "decoder", "mtp" (the MTP layers without their head
    pass), "lm_head" (the main and the MTP head passes), and "vision_encoder",
    "vision_projector", "audio_encoder", "audio_projector" where configured. `recompute`:
    None for the config's parallel.recompute, or "none" / "full"."""
    m, frozen = cfg.model, cfg.train.freeze.language_model
    recompute = cfg.parallel.recompute if recompute is None else recompute
    parts = {"decoder": tokens * sum(layer_training_flops_per_token(m, recompute, frozen)),
             **{part: tokens * flops for part, flops in _head_training_parts(m, recompute, frozen).items()}}
    for kind, name, count in (("image", "vision", images), ("audio", "audio", clips)):
        per_sample = encoder_training_parts(m, cfg.train.freeze).get(kind)
        if per_sample is not None:
            parts[f"{name}_encoder"] = count * per_sample["encoder"]
            parts[f"{name}_projector"] = count * per_sample["projector"]
        elif count:
            raise ValueError(f"{count} {kind} input(s) but the model has no {name} encoder")
    return parts


def step_training_flops(cfg: Config, tokens: int, images: int = 0, clips: int = 0,
                        recompute: Optional[str] = None) -> float:
    """Training FLOPs of one step (see `step_training_flops_by_part`), encoders included."""
    return sum(step_training_flops_by_part(cfg, tokens, images, clips, recompute).values())
