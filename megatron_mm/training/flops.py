"""Training FLOPs per token of the DeepSeek-V3-style model (hand-written arithmetic: no
library counts MLA/MoE FLOPs for a megatron-core model).

Counts matrix multiplies only (2 FLOPs per multiply-add): MLA projections, causal attention
scores and values, dense MLP or activated MoE experts (top-k routed + shared) with the
router, the LM head, and MTP layers. Training = 3 × forward (forward + two backward GEMMs).
"""

from __future__ import annotations

from megatron_mm.config import ModelConfig


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


def forward_flops_per_token(m: ModelConfig) -> float:
    dense_layers = m.first_k_dense_layers if m.is_moe else m.num_layers
    layer_flops = sum(
        _attention_forward_flops(m) + _mlp_forward_flops(m, moe=i >= dense_layers)
        for i in range(m.num_layers)
    )
    head = 2 * m.hidden_size * m.vocab_size
    mtp_layer = (
        2 * 2 * m.hidden_size * m.hidden_size  # eh_proj: [h; h] -> h
        + _attention_forward_flops(m)
        + _mlp_forward_flops(m, moe=m.is_moe)
        + head
    )
    return layer_flops + head + m.mtp_num_layers * mtp_layer


def training_flops_per_token(m: ModelConfig) -> float:
    return 3 * forward_flops_per_token(m)
