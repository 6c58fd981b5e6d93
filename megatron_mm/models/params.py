"""Parameter counts of the DeepSeek-V3-style model from its config alone.

`estimate_parameters` is hand-written arithmetic over `ModelConfig`, mirroring what
`megatron_mm.models.gpt` builds through megatron-core (MLA attention with q/kv
layernorms, SwiGLU MLPs, MoE with shared experts, RMSNorms without bias, MTP blocks).
It is not derived from the module tree, so it must be checked against a built model
(`count_parameters` of the chunks on a single rank, no parallelism) whenever the layer
specs change. It needs no torch, no process group and no memory, which is the point:
it prices the 671B model on a laptop.
"""

from __future__ import annotations

from megatron_mm.config import ModelConfig


def _attention(m: ModelConfig) -> int:
    """One MLA self-attention block, including its q/kv layernorms (not the input norm)."""
    h, n = m.hidden_size, m.num_attention_heads
    q_head = m.qk_head_dim + m.qk_pos_emb_head_dim
    if m.q_lora_rank is None:
        q = h * n * q_head  # linear_q_proj
    else:
        q = h * m.q_lora_rank + m.q_lora_rank + m.q_lora_rank * n * q_head  # down, q_layernorm, up
    kv = (
        h * (m.kv_lora_rank + m.qk_pos_emb_head_dim)  # linear_kv_down_proj (latent + shared rope key)
        + m.kv_lora_rank  # kv_layernorm
        + m.kv_lora_rank * n * (m.qk_head_dim + m.v_head_dim)  # linear_kv_up_proj
    )
    out = n * m.v_head_dim * h  # linear_proj
    return q + kv + out


def _swiglu(h: int, ffn: int) -> int:
    """Gated MLP: fc1 (h -> 2*ffn, gate and up) and fc2 (ffn -> h), no biases."""
    return 3 * h * ffn


def _layer(m: ModelConfig, moe: bool) -> tuple[int, int]:
    """(total, active) parameters of one transformer layer."""
    h = m.hidden_size
    common = 2 * h + _attention(m)  # input_layernorm, pre_mlp_layernorm, attention
    if not moe:
        dense = _swiglu(h, m.ffn_hidden_size)
        return common + dense, common + dense
    expert = _swiglu(h, m.moe_ffn_hidden_size)
    shared = _swiglu(h, m.num_shared_experts * m.moe_ffn_hidden_size) if m.num_shared_experts else 0
    router = m.num_experts * h  # the expert bias is a buffer, not a parameter
    total = common + router + m.num_experts * expert + shared
    active = common + router + m.moe_router_topk * expert + shared
    return total, active


def estimate_parameters(model_cfg: ModelConfig) -> dict:
    """Parameter counts of the whole model as built on one rank (no parallelism).

    Returns a dict with
      total:                  every parameter of the whole model, MTP layers included;
      active:                 the parameters one token's forward pass multiplies with: the
                              top-k routed experts plus the shared experts of each MoE layer,
                              everything outside the experts, and the output layer, but not
                              the input embedding table (a row lookup). That is the convention
                              DeepSeek's published "activated" counts follow: with it this
                              arithmetic gives 2.45B for V2-Lite (published 2.4B; 2.66B with
                              the embedding) and 36.6B for the V3 main model (published 36.7B;
                              37.6B with the embedding);
      mtp_total, mtp_active:  the MTP layers' share of the above (their embedding and
                              output layer are the main model's, so they add none);
      embedding, output_layer: the input embedding and the (untied) output projection.
    """
    m = model_cfg
    h, vocab = m.hidden_size, m.vocab_size
    embedding = vocab * h
    output_layer = 0 if m.share_embeddings_and_output_weights else vocab * h
    dense_layers = m.num_layers if not m.is_moe else m.first_k_dense_layers
    moe_layers = m.num_layers - dense_layers

    dense_total, dense_active = _layer(m, moe=False)
    total = embedding + output_layer + h  # + final layernorm
    active = output_layer + h
    total += dense_layers * dense_total
    active += dense_layers * dense_active
    if moe_layers:
        moe_total, moe_active = _layer(m, moe=True)
        total += moe_layers * moe_total
        active += moe_layers * moe_active

    # Each MTP module: enorm, hnorm, eh_proj (2h -> h), one transformer layer (MoE when
    # the model is MoE), and its own final layernorm.
    mtp_layer_total, mtp_layer_active = _layer(m, moe=m.is_moe)
    mtp_extra = 2 * h + 2 * h * h + h
    mtp_total = m.mtp_num_layers * (mtp_extra + mtp_layer_total)
    mtp_active = m.mtp_num_layers * (mtp_extra + mtp_layer_active)
    return dict(
        total=total + mtp_total,
        active=active + mtp_active,
        mtp_total=mtp_total,
        mtp_active=mtp_active,
        embedding=embedding,
        output_layer=output_layer,
    )
