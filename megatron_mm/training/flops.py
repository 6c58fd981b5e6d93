"""Training FLOPs of the DeepSeek-V3-style model and of its vision and audio encoders
(hand-written arithmetic: no library counts MLA/MoE FLOPs for a megatron-core model, nor
our encoders, whose shapes are ours: models/encoders.py).

Counts matrix multiplies only (2 FLOPs per multiply-add; norms, activations, softmax,
pooling and the embedding lookup are left out): MLA projections, causal attention scores
and values, dense MLP or activated MoE experts (top-k routed + shared) with the router,
the LM head, and MTP layers. Training = 3 × forward (forward + two backward GEMMs).

Encoders (per image / per audio clip): the patch-embedding convolution or the two audio
convolutions, bidirectional self-attention layers over the encoder's own tokens, the
resampler's cross-attention when configured, and the MLP projector into the LLM's hidden
size. `encoder_training_flops` prices the backward pass by what trains: a frozen encoder
(its input, the media, needs no gradient) runs forward only; a frozen projector behind a
trained encoder still back-propagates its input gradient (2 ×).
"""

from __future__ import annotations

from megatron_mm.config import AudioConfig, FreezeConfig, ModelConfig, VisionConfig

# --------------------------------------------------------------------------- language model


def _attention_forward_flops(m: ModelConfig) -> float:
    h, heads = m.hidden_size, m.num_attention_heads
    qk = m.qk_head_dim + m.qk_pos_emb_head_dim
    if m.q_lora_rank:
        q = h * m.q_lora_rank + m.q_lora_rank * heads * qk
    else:
        q = h * heads * qk
    kv = h * (m.kv_lora_rank + m.qk_pos_emb_head_dim) + m.kv_lora_rank * heads * (m.qk_head_dim + m.v_head_dim)
    out = heads * m.v_head_dim * h
    # Causal attention: on average each query sees seq/2 keys.
    scores = (m.seq_length / 2) * heads * (qk + m.v_head_dim)
    return 2 * (q + kv + out + scores)


def _mlp_forward_flops(m: ModelConfig, moe: bool) -> float:
    h = m.hidden_size
    if not moe:
        return 2 * 3 * h * m.ffn_hidden_size  # gated: gate, up, down
    experts = m.moe_router_topk + m.num_shared_experts
    return 2 * (h * m.num_experts + experts * 3 * h * m.moe_ffn_hidden_size)


def layer_forward_flops_per_token(m: ModelConfig) -> list[float]:
    """Forward FLOPs per token of each decoder layer (the first k dense, the rest MoE)."""
    dense_layers = m.first_k_dense_layers if m.is_moe else m.num_layers
    return [_attention_forward_flops(m) + _mlp_forward_flops(m, moe=i >= dense_layers) for i in range(m.num_layers)]


def head_forward_flops_per_token(m: ModelConfig) -> float:
    """The LM head and the MTP layers (each with its own head pass): the last stage's extra."""
    head = 2 * m.hidden_size * m.vocab_size
    mtp_layer = (
        2 * 2 * m.hidden_size * m.hidden_size  # eh_proj: [h; h] -> h
        + _attention_forward_flops(m)
        + _mlp_forward_flops(m, moe=m.is_moe)
        + head
    )
    return head + m.mtp_num_layers * mtp_layer


def forward_flops_per_token(m: ModelConfig) -> float:
    return sum(layer_forward_flops_per_token(m)) + head_forward_flops_per_token(m)


def training_flops_per_token(m: ModelConfig) -> float:
    return 3 * forward_flops_per_token(m)


# --------------------------------------------------------------------------- encoders


def _encoder_layers_forward_flops(num_layers: int, tokens: int, h: int, ffn: int) -> float:
    """Bidirectional layers (models/specs.py encoder_layer_spec) over `tokens` tokens: fused
    QKV and output projection, every query against all `tokens` keys, a two-matrix MLP."""
    per_token = 4 * h * h + 2 * h * ffn + 2 * tokens * h  # qkv + proj, fc1 + fc2, scores + values
    return 2 * num_layers * tokens * per_token


def _projector_forward_flops(tokens: int, enc_hidden: int, llm_hidden: int) -> float:
    return 2 * tokens * (enc_hidden * llm_hidden + llm_hidden * llm_hidden)  # MLPProjector: fc1, fc2


def vision_forward_flops(v: VisionConfig, llm_hidden: int) -> dict[str, float]:
    """Forward FLOPs for one image: {"encoder", "projector"} (the resampler counts as projector)."""
    h, t = v.hidden_size, v.num_patches
    patch_embedding = 2 * t * 3 * v.patch_size * v.patch_size * h
    encoder = patch_embedding + _encoder_layers_forward_flops(v.num_layers, t, h, v.ffn_hidden_size)
    projector = _projector_forward_flops(v.num_tokens, h, llm_hidden)
    if v.projector == "resampler":
        q = v.resampler_tokens
        projector += 2 * (q * h * h + t * 2 * h * h + 2 * q * t * h + q * h * h)  # q, kv, scores+values, proj
    return {"encoder": encoder, "projector": projector}


def audio_forward_flops(a: AudioConfig, llm_hidden: int) -> dict[str, float]:
    """Forward FLOPs for one clip of `max_frames` frames: {"encoder", "projector"}."""
    h, t = a.hidden_size, a.num_frames
    convs = 2 * (a.max_frames * a.num_mel_bins * 3 * h + t * h * 3 * h)  # conv1 (stride 1), conv2 (stride 2)
    encoder = convs + _encoder_layers_forward_flops(a.num_layers, t, h, a.ffn_hidden_size)
    return {"encoder": encoder, "projector": _projector_forward_flops(a.num_tokens, h, llm_hidden)}


def encoder_training_flops(m: ModelConfig, freeze: FreezeConfig) -> dict[str, float]:
    """Training FLOPs for one image ("image") and one audio clip ("audio"), for the
    encoders `m` configures, with the backward pass priced by what `freeze` leaves trainable."""
    out = {}
    for kind, cfg, forward, encoder_frozen in (
        ("image", m.vision, vision_forward_flops, freeze.vision_encoder),
        ("audio", m.audio, audio_forward_flops, freeze.audio_encoder),
    ):
        if cfg is None:
            continue
        f = forward(cfg, m.hidden_size)
        projector_factor = 3 if not freeze.projectors else (2 if not encoder_frozen else 1)
        out[kind] = (1 if encoder_frozen else 3) * f["encoder"] + projector_factor * f["projector"]
    return out
