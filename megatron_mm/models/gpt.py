"""The DeepSeek-V3-style language model: our config → megatron-core MLATransformerConfig →
`GPTModel` chunks for this pipeline rank (one per virtual stage)."""

from __future__ import annotations

from typing import Optional

import torch
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.transformer_config import MLATransformerConfig

from megatron_mm.config import Config
from megatron_mm.costs import pipeline_split
from megatron_mm.models.attention_mask import document_attention_mode
from megatron_mm.models.encoders import build_encoders
from megatron_mm.models.multimodal import MultimodalGPTModel, freeze
from megatron_mm.models.specs import backend_for, decoder_block_spec, mtp_block_spec


def transformer_config(cfg: Config, device_overrides: dict) -> MLATransformerConfig:
    """Map our typed config onto megatron-core's; `device_overrides` come from the runtime
    compat layer (fusions and initialisation that this machine cannot do). The layers per
    pipeline stage are `pipeline_split.plan(cfg)`'s (explicit, balanced for the encoders, or even)."""
    m, p = cfg.model, cfg.parallel
    split = pipeline_split.plan(cfg)
    bf16 = cfg.precision.dtype == "bf16"
    moe = {}
    if m.is_moe:
        moe = dict(
            num_moe_experts=m.num_experts,
            moe_ffn_hidden_size=m.moe_ffn_hidden_size,
            moe_shared_expert_intermediate_size=(
                m.num_shared_experts * m.moe_ffn_hidden_size if m.num_shared_experts else None
            ),
            moe_layer_freq=[0] * m.first_k_dense_layers + [1] * (m.num_layers - m.first_k_dense_layers),
            moe_router_topk=m.moe_router_topk,
            moe_router_score_function=m.router_score_function,
            moe_router_pre_softmax=m.router_pre_softmax,
            moe_router_enable_expert_bias=m.router_expert_bias,
            # A frozen language model keeps its routing too (the bias update is not an optimizer step).
            moe_router_bias_update_rate=0.0 if cfg.train.freeze.language_model else m.router_bias_update_rate,
            moe_router_topk_scaling_factor=m.router_topk_scaling_factor,
            moe_router_num_groups=m.router_num_groups,
            moe_router_group_topk=m.router_group_topk,
            moe_router_load_balancing_type="seq_aux_loss" if m.aux_loss_coeff > 0 else "none",
            moe_aux_loss_coeff=m.aux_loss_coeff,
            moe_router_dtype="fp32",
            moe_token_dispatcher_type="alltoall",
            moe_grouped_gemm=m.moe_grouped_gemm,
            moe_per_layer_logging=True,
        )
    fp8 = {}
    if cfg.precision.fp8:
        fp8 = dict(fp8="hybrid" if cfg.precision.fp8 == "delayed" else "e4m3",
                   fp8_recipe=cfg.precision.fp8)
    recompute = {}
    if p.recompute == "full":
        recompute = dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    kwargs = dict(
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        ffn_hidden_size=m.ffn_hidden_size,
        num_attention_heads=m.num_attention_heads,
        q_lora_rank=m.q_lora_rank,
        kv_lora_rank=m.kv_lora_rank,
        qk_head_dim=m.qk_head_dim,
        qk_pos_emb_head_dim=m.qk_pos_emb_head_dim,
        v_head_dim=m.v_head_dim,
        qk_layernorm=True,
        rope_type=m.rope_type,
        rotary_base=m.rotary_base,
        rotary_scaling_factor=m.rotary_scaling_factor,
        original_max_position_embeddings=m.original_max_position_embeddings,
        beta_fast=m.beta_fast,
        beta_slow=m.beta_slow,
        mscale=m.mscale,
        mscale_all_dim=m.mscale_all_dim,
        normalization="RMSNorm",
        layernorm_epsilon=m.norm_epsilon,
        gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,
        add_bias_linear=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=m.init_method_std,
        mtp_num_layers=m.mtp_num_layers or None,
        mtp_loss_scaling_factor=m.mtp_loss_scaling_factor,
        tensor_model_parallel_size=p.tp,
        pipeline_model_parallel_size=p.pp,
        virtual_pipeline_model_parallel_size=p.vpp if p.pp > 1 else None,
        num_layers_in_first_pipeline_stage=split.first,
        num_layers_in_last_pipeline_stage=split.last,
        expert_model_parallel_size=p.ep,
        expert_tensor_parallel_size=p.etp,
        sequence_parallel=p.sequence_parallel,
        bf16=bf16,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
        pipeline_dtype=torch.bfloat16 if bf16 else torch.float32,
        calculate_per_token_loss=True,
        # megatron-core 0.16.1's default "full" is deprecated by megatron-core itself
        # (transformer_config.py __post_init__ warns, then turns it into []): pass [] directly.
        cuda_graph_scope=[],
        **moe,
        **fp8,
        **recompute,
    )
    kwargs.update(device_overrides)
    return MLATransformerConfig(**kwargs)


def build_model_chunks(cfg: Config, tc: MLATransformerConfig, use_transformer_engine: bool,
                       placeholder_ids: Optional[dict[str, int]] = None) -> list[GPTModel]:
    """This rank's model: one GPTModel per virtual pipeline stage (one without VPP)."""
    backend = backend_for(use_transformer_engine)
    vpp = tc.virtual_pipeline_model_parallel_size or 1
    multimodal = cfg.model.vision is not None or cfg.model.audio is not None
    # Packed samples attending to themselves only: every forward then passes their boundaries.
    documents = document_attention_mode(cfg, use_transformer_engine)
    chunks = []
    for vp_stage in range(vpp):
        stage = vp_stage if tc.virtual_pipeline_model_parallel_size else None
        pre_process = parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=stage)
        kwargs = dict(
            config=tc,
            transformer_layer_spec=decoder_block_spec(tc, backend, vp_stage=stage, documents=documents),
            vocab_size=cfg.model.vocab_size,
            max_sequence_length=cfg.model.seq_length,
            pre_process=pre_process,
            post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=stage),
            share_embeddings_and_output_weights=cfg.model.share_embeddings_and_output_weights,
            position_embedding_type="rope",
            rotary_base=int(cfg.model.rotary_base),
            mtp_block_spec=mtp_block_spec(tc, backend, vp_stage=stage, documents=documents),
            vp_stage=stage,
        )
        if multimodal:
            encoders = build_encoders(cfg.model, tc, backend) if pre_process else {}
            chunk = MultimodalGPTModel(**kwargs, encoders=encoders, placeholder_ids=placeholder_ids or {})
            freeze(chunk, cfg.train.freeze)
        else:
            chunk = GPTModel(**kwargs)
        _reduce_replicated_experts(tc, chunk)
        chunks.append(chunk)
    return chunks


def _reduce_replicated_experts(tc: MLATransformerConfig, chunk: torch.nn.Module) -> None:
    """With EP=1 and expert TP below TP (our etp=1 under TP2), every TP rank holds whole
    copies of the experts but, with sequence parallelism, routes only its own sequence slice
    through them, so their gradients must be summed over TP, as for layernorms. megatron-core
    0.16.1 does not (it marks expert weights `tensor_model_parallel`, and reduces them over
    the expert-data-parallel group, which holds the TP peers, only when EP > 1): each TP rank
    stepped its copy with its own slice's gradient, and the copies drifted apart. Marked
    here like a layernorm: `sequence_parallel` (finalize_model_grads sums it over TP) and
    not `tensor_model_parallel` (the gradient norm counts it once, not once per TP rank).
    Optimizer and checkpoint layout stay as they are, so checkpoints still move between
    layouts. (Found through the MoE layers: megatron-core's TE grouped linears set no `is_expert`.)"""
    if not tc.num_moe_experts or tc.expert_model_parallel_size > 1:
        return
    if (tc.expert_tensor_parallel_size or tc.tensor_model_parallel_size) >= tc.tensor_model_parallel_size:
        return
    for module in chunk.modules():
        if isinstance(module, MoELayer):  # its routed experts, whichever module runs them
            for param in module.experts.parameters():
                param.sequence_parallel = True
                param.tensor_model_parallel = False


def count_parameters(chunks: list[torch.nn.Module]) -> int:
    return sum(p.numel() for c in chunks for p in c.parameters())
