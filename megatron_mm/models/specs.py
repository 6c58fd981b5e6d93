"""Backend spec providers and the DeepSeek-V3-style layer/block specs built from them.

Two megatron-core `BackendSpecProvider`s of ours:
  * `TESpecs` — Transformer Engine linears, norm and attention (needed for FP8);
  * `PortableSpecs` — megatron-core's torch tensor-parallel linears plus our SDPA attention
    and sequence-parallel RMSNorm / LayerNorm (`portable.py`); runs anywhere torch runs.
Both keep layernorms unfused, so every parameter has the same name (and the same
dist-checkpoint key) under either backend and a checkpoint moves between them. (TE modules
also keep an `_extra_state` entry for FP8 metadata.) Routed experts are megatron-core's
`SequentialMLP`, or with `model.moe_grouped_gemm` one grouped GEMM per projection: our
`GroupedMLP` (grouped_experts.py) on the portable backend, megatron-core's `TEGroupedMLP` under
TE; all three save the same dist-checkpoint keys.
"""

from __future__ import annotations

from typing import Optional

import torch

from megatron.core.models.backends import LocalSpecProvider
from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_mtp_block_spec_for_backend,
    get_mlp_module_spec_for_backend,
)
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.mlp import MLPSubmodules
from megatron.core.transformer.moe.experts import SequentialMLP
from megatron.core.transformer.attention import (
    CrossAttention,
    CrossAttentionSubmodules,
    SelfAttention,
    SelfAttentionSubmodules,
)
from megatron.core.transformer.mlp import MLP
from megatron.core.transformer import multi_latent_attention
from megatron.core.transformer.multi_latent_attention import (
    MLASelfAttention,
    MLASelfAttentionSubmodules,
)
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import (
    TransformerLayer,
    TransformerLayerSubmodules,
    get_transformer_layer_offset,
)
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add

from megatron_mm.models.attention_mask import DENSE_MASK, SEGMENT_IDS
from megatron_mm.models.grouped_experts import GroupedMLP
from megatron_mm.models.portable import FlexSegmentAttention, Norm, SDPAttention


class PortableSpecs(LocalSpecProvider):
    """Torch-only modules: megatron-core TP linears, SDPA attention, SP-capable norms (RMSNorm
    or LayerNorm by `config.normalization`, as `TENorm`)."""

    def layer_norm(self, rms_norm: bool = False, for_qk: bool = False) -> type:
        return Norm

    def core_attention(self) -> type:
        return SDPAttention

    def grouped_mlp_modules(self, moe_use_grouped_gemm: bool, moe_use_legacy_grouped_gemm: bool):
        return GroupedMLP if moe_use_grouped_gemm else SequentialMLP, MLPSubmodules(
            linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear
        )


def _te_specs_class():
    from megatron.core.extensions.transformer_engine import (
        TEColumnParallelLinear,
        TEDotProductAttention,
        TENorm,
        TERowParallelLinear,
    )
    from megatron.core.extensions.transformer_engine_spec_provider import TESpecProvider

    class TESpecs(TESpecProvider):
        """Transformer Engine modules, unfused so parameter names match `PortableSpecs`."""

        def fuse_layernorm_and_linear(self) -> bool:
            return False

        def layer_norm(self, rms_norm: bool = False, for_qk: bool = False) -> type:
            return TENorm

        def core_attention(self) -> type:
            return TEDotProductAttention

        def grouped_mlp_modules(self, moe_use_grouped_gemm, moe_use_legacy_grouped_gemm):
            if moe_use_grouped_gemm:  # TEGroupedMLP over TE's grouped linears
                return super().grouped_mlp_modules(True, False)
            return SequentialMLP, MLPSubmodules(
                linear_fc1=TEColumnParallelLinear, linear_fc2=TERowParallelLinear
            )

        def activation_func(self):
            return None

    return TESpecs


def backend_for(use_transformer_engine: bool):
    """The spec provider for this machine (the runtime decides `use_transformer_engine`)."""
    return _te_specs_class()() if use_transformer_engine else PortableSpecs()


class _SumGradOverTP(torch.autograd.Function):
    """Identity forward; backward sums the gradient over the tensor-parallel group."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        torch.distributed.all_reduce(grad, group=ctx.group)
        return grad, None


class TPMLASelfAttention(MLASelfAttention):
    """megatron-core's MLA with two tensor-parallel gradient fixes (megatron-core 0.16.1;
    both bite only with TP > 1 and the column-parallel down projections our specs use).

    * The shared RoPE key `k_pos_emb` is cut from the output of
      `linear_kv_down_proj` after `gather_from_tensor_model_parallel_region`, whose backward
      is a plain split; each TP rank expands it over its own heads only, so its gradient
      must be summed over TP ranks and never is (Megatron-LM issue #1699, open). Here the
      gathered tensor's RoPE columns pass through `_SumGradOverTP` (identity forward,
      all-reduce backward; megatron's own `copy_to_tensor_model_parallel_region` would
      silently skip the sum: its `_reduce` all-reduces `grad.contiguous()`, a copy, when
      the gradient of a column slice is not contiguous).
    * `finalize_model_grads` sums every `q_layernorm` gradient over TP (written for
      per-head q norms). MLA's q norm acts on the whole latent: without sequence
      parallelism every rank already holds its full gradient, which the sum doubled. The
      weight is marked `average_gradients_across_tp_domain` instead (an average of equal
      values); with sequence parallelism the sum is right and nothing changes.
    """

    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        self._kv_down_out = None
        if self.tp_group.size() > 1:
            self.linear_kv_down_proj.register_forward_hook(self._remember_kv_down)
            if config.q_lora_rank is not None and not config.sequence_parallel:
                self.q_layernorm.weight.average_gradients_across_tp_domain = True

    def _remember_kv_down(self, module, args, output):
        self._kv_down_out = output[0]

    def get_query_key_value_tensors(self, *args, **kwargs):
        original = multi_latent_attention.gather_from_tensor_model_parallel_region
        rope = self.config.qk_pos_emb_head_dim

        def gather(tensor, *a, **k):
            out = original(tensor, *a, **k)
            if tensor is not self._kv_down_out:
                return out
            latent, k_pos_emb = out.split([out.size(-1) - rope, rope], dim=-1)
            return torch.cat([latent, _SumGradOverTP.apply(k_pos_emb, self.tp_group)], dim=-1)

        multi_latent_attention.gather_from_tensor_model_parallel_region = gather
        try:
            return super().get_query_key_value_tensors(*args, **kwargs)
        finally:
            multi_latent_attention.gather_from_tensor_model_parallel_region = original
            self._kv_down_out = None


def decoder_attention(backend, documents: Optional[str]) -> tuple[AttnMaskType, type]:
    """The decoder's mask type and core attention for `documents`, the model's
    `attention_mask.document_attention_mode`: arbitrary over the dense mask (either backend);
    padding_causal over segment ids (portable: FlexSegmentAttention, which reads no mask type:
    causal inside each sample; megatron-core 0.16.1's MTP layer refuses `arbitrary` but takes
    this); causal without document masking and under THD (TE turns causal into padding_causal
    over the packed samples' cu_seqlens)."""
    if documents == SEGMENT_IDS:
        return AttnMaskType.padding_causal, FlexSegmentAttention
    if documents == DENSE_MASK:
        return AttnMaskType.arbitrary, backend.core_attention()
    return AttnMaskType.causal, backend.core_attention()


def mla_layer_spec(backend, moe: bool, num_experts: Optional[int], documents: Optional[str] = None,
                   grouped_gemm: bool = False) -> ModuleSpec:
    """One decoder layer: RMSNorm → MLA self-attention → RMSNorm → dense MLP or MoE.
    `documents`: how packed samples are kept apart (`decoder_attention`).
    `grouped_gemm`: routed experts as grouped GEMMs (`config.moe_grouped_gemm`)."""
    attn_mask_type, core_attention = decoder_attention(backend, documents)
    norm = backend.layer_norm(rms_norm=True)
    mlp = get_mlp_module_spec_for_backend(
        backend=backend, num_experts=num_experts if moe else None, moe_grouped_gemm=grouped_gemm
    )
    linear = backend.column_parallel_linear()
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=norm,
            self_attention=ModuleSpec(
                module=TPMLASelfAttention,
                params={"attn_mask_type": attn_mask_type},
                submodules=MLASelfAttentionSubmodules(
                    linear_q_proj=linear,
                    linear_q_down_proj=linear,
                    linear_q_up_proj=linear,
                    linear_kv_down_proj=linear,
                    linear_kv_up_proj=linear,
                    core_attention=core_attention,
                    linear_proj=backend.row_parallel_linear(),
                    q_layernorm=backend.layer_norm(rms_norm=True, for_qk=True),
                    kv_layernorm=backend.layer_norm(rms_norm=True, for_qk=True),
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=norm,
            mlp=mlp,
            mlp_bda=get_bias_dropout_add,
        ),
    )


def encoder_layer_spec(backend) -> ModuleSpec:
    """One encoder layer (SigLIP / CLIP / Whisper): LayerNorm → bidirectional self-attention →
    LayerNorm → MLP, every linear with a bias (the encoder config says LayerNorm and the activation)."""
    norm = backend.layer_norm(rms_norm=False)
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=norm,
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": AttnMaskType.no_mask},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=backend.column_parallel_linear(),
                    core_attention=backend.core_attention(),
                    linear_proj=backend.row_parallel_linear(),
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=norm,
            mlp=ModuleSpec(
                module=MLP,
                submodules=MLPSubmodules(
                    linear_fc1=backend.column_parallel_linear(), linear_fc2=backend.row_parallel_linear()
                ),
            ),
            mlp_bda=get_bias_dropout_add,
        ),
    )


def encoder_block_spec(backend, num_layers: int) -> TransformerBlockSubmodules:
    """`num_layers` encoder layers; the final norm, when the block has one (post_process), is
    Whisper's `layer_norm`."""
    return TransformerBlockSubmodules(
        layer_specs=[encoder_layer_spec(backend)] * num_layers, layer_norm=backend.layer_norm(rms_norm=False)
    )


def cross_attention_spec(backend) -> ModuleSpec:
    """Learned queries attending to encoder features (the resampler), no mask."""
    return ModuleSpec(
        module=CrossAttention,
        params={"attn_mask_type": AttnMaskType.no_mask},
        submodules=CrossAttentionSubmodules(
            linear_q=backend.column_parallel_linear(),
            linear_kv=backend.column_parallel_linear(),
            core_attention=backend.core_attention(),
            linear_proj=backend.row_parallel_linear(),
        ),
    )


def decoder_block_spec(
    config: TransformerConfig, backend, vp_stage: Optional[int], pp_rank: Optional[int] = None,
    documents: Optional[str] = None,
) -> TransformerBlockSubmodules:
    """The layers this pipeline stage (and virtual stage) builds; `config.moe_layer_freq`
    marks which global layers are MoE (DeepSeek-V3: the first k are dense)."""
    pattern = config.moe_layer_freq if config.num_moe_experts else [0] * config.num_layers
    dense = mla_layer_spec(backend, moe=False, num_experts=None, documents=documents)
    moe = (mla_layer_spec(backend, moe=True, num_experts=config.num_moe_experts, documents=documents,
                          grouped_gemm=config.moe_grouped_gemm)
           if config.num_moe_experts else None)
    specs = [moe if is_moe else dense for is_moe in pattern]
    offset = get_transformer_layer_offset(config, vp_stage=vp_stage, pp_rank=pp_rank)
    count = get_num_layers_to_build(config, vp_stage=vp_stage, pp_rank=pp_rank)
    return TransformerBlockSubmodules(
        layer_specs=specs[offset : offset + count], layer_norm=backend.layer_norm(rms_norm=True)
    )


def mtp_block_spec(config: TransformerConfig, backend, vp_stage: Optional[int], documents: Optional[str] = None):
    """Multi-token-prediction block (built on the last stage only), or None."""
    if not config.mtp_num_layers:
        return None
    layer = mla_layer_spec(backend, moe=bool(config.num_moe_experts), num_experts=config.num_moe_experts,
                           documents=documents, grouped_gemm=config.moe_grouped_gemm)
    return get_gpt_mtp_block_spec_for_backend(config, layer, backend=backend, vp_stage=vp_stage)

