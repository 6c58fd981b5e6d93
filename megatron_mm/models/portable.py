"""Portable (no Transformer Engine) modules for megatron-core specs.

megatron-core's own local spec cannot serve an MLA + MoE model (see DESIGN.md): its
`DotProductAttention` assumes one head size for keys and values, and its
`WrappedTorchNorm` refuses sequence parallelism. These modules fill the gap; they are
written by hand because no library provides them with megatron-core's module interface.
`Norm` is the portable counterpart of Transformer Engine's `TENorm`: RMSNorm or LayerNorm (with
bias: the SigLIP / CLIP / Whisper encoders) as `config.normalization` says, with TE's
parameter names (`weight`, `bias`), so a checkpoint moves between the two backends.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_mm.models import packed_attention


class SDPAttention(MegatronModule):
    """Core attention on `torch.nn.functional.scaled_dot_product_attention`.

    Takes megatron's layout (query [sq, b, heads, qk_dim], key likewise, value
    [sk, b, heads, v_dim]) with any key and value head sizes, and returns
    [sq, b, heads * v_dim]. Causal masking for `AttnMaskType.causal`, none for `no_mask`,
    and megatron's boolean mask (True = masked out) otherwise, which `arbitrary` requires.
    """

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        k_channels: Optional[int] = None,
        v_channels: Optional[int] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection=None,
    ):
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError("SDPAttention does not support context parallelism")
        self.attn_mask_type = attn_mask_type
        self.softmax_scale = softmax_scale
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: Optional[torch.Tensor],
        attn_mask_type: Optional[AttnMaskType] = None,
        attention_bias: Optional[torch.Tensor] = None,
        packed_seq_params=None,
    ) -> torch.Tensor:
        if packed_seq_params is not None:
            raise ValueError("SDPAttention does not support packed sequences (use the TE spec)")
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        q, k, v = _heads_first(query, key, value)
        mask, causal = None, False
        if mask_type == AttnMaskType.causal:
            causal = True
        elif mask_type == AttnMaskType.arbitrary and attention_mask is None:
            raise ValueError("attention built with AttnMaskType.arbitrary needs an attention_mask")
        elif mask_type != AttnMaskType.no_mask and attention_mask is not None:
            mask = ~attention_mask
        if attention_bias is not None:
            bias = attention_bias.to(q.dtype)
            mask = bias if mask is None else bias.masked_fill(~mask, float("-inf"))
        dropout = self.dropout_p if self.training else 0.0
        with tensor_parallel.get_cuda_rng_tracker().fork():
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal, scale=self.softmax_scale
            )
        return _sequence_first(out)


class FlexSegmentAttention(SDPAttention):
    """Causal attention inside each packed sample, through FlexAttention (packed_attention.py).

    Its `attention_mask` (which it requires, whatever the mask type) is the batch's segment ids [b, s] (attention_mask.SEGMENT_IDS), from which
    each forward builds a block mask of [b, 1, s/128, s/128]; no [b, 1, s, s] tensor exists.
    Any query/key and value head sizes. No dropout (the model's attention dropout is 0)."""

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None) -> torch.Tensor:
        if attention_mask is None or attention_mask.dim() != 2:
            raise ValueError("FlexSegmentAttention needs an attention_mask of segment ids [batch, seq], got "
                             f"{None if attention_mask is None else tuple(attention_mask.shape)}")
        if packed_seq_params is not None or attention_bias is not None:
            raise ValueError("FlexSegmentAttention takes neither packed_seq_params nor attention_bias")
        if self.training and self.dropout_p:
            raise ValueError(f"FlexSegmentAttention has no attention dropout (got {self.dropout_p})")
        q, k, v = _heads_first(query, key, value)
        block_mask = packed_attention.segment_block_mask(attention_mask)
        return _sequence_first(packed_attention.flex_attention(q, k, v, block_mask, self.softmax_scale))


def _heads_first(query, key, value):
    """megatron's [s, b, heads, dim] → [b, heads, s, dim]; key/value heads repeated to the
    query's (grouped-query attention)."""
    q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
    if k.shape[1] != q.shape[1]:
        repeat = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
    return q, k, v


def _sequence_first(out: torch.Tensor) -> torch.Tensor:
    """[b, heads, s, v_dim] → megatron's [s, b, heads * v_dim]."""
    b, _, s, _ = out.shape
    return out.permute(2, 0, 1, 3).reshape(s, b, -1)


def _mark_sequence_parallel(param: torch.nn.Parameter, config: TransformerConfig) -> None:
    setattr(param, "sequence_parallel", config.sequence_parallel)


class RMSNorm(torch.nn.Module):
    """RMSNorm whose weight is marked `sequence_parallel` when the config is, so that
    megatron-core's `finalize_model_grads` all-reduces its gradient across the
    tensor-parallel group (each TP rank then sees only its sequence slice)."""

    def __init__(
        self,
        config: TransformerConfig,
        hidden_size: int,
        eps: float = 1e-6,
        persist_layer_norm: bool = False,
        zero_centered_gamma: bool = False,
        normalization: str = "RMSNorm",
    ):
        super().__init__()
        if config.normalization != "RMSNorm":
            raise ValueError(f"portable spec supports RMSNorm only, not {config.normalization}")
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        _mark_sequence_parallel(self.weight, config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


class LayerNorm(torch.nn.Module):
    """LayerNorm with weight and bias (both marked `sequence_parallel` like RMSNorm's weight)."""

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **unused):
        super().__init__()
        if config.normalization != "LayerNorm":
            raise ValueError(f"LayerNorm built for normalization={config.normalization}")
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        self.bias = torch.nn.Parameter(torch.zeros(hidden_size, dtype=config.params_dtype))
        for param in (self.weight, self.bias):
            _mark_sequence_parallel(param, config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, (x.shape[-1],), self.weight, self.bias, self.eps)


class Norm:
    """RMSNorm or LayerNorm by `config.normalization`, as TE's `TENorm` chooses."""

    def __new__(cls, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **kwargs):
        norm = {"RMSNorm": RMSNorm, "LayerNorm": LayerNorm}.get(config.normalization)
        if norm is None:
            raise ValueError(f"portable spec: no norm {config.normalization!r} (RMSNorm or LayerNorm)")
        return norm(config, hidden_size, eps, **kwargs)
