"""The attention mask of sequences packed from several samples.

Packing fills each sequence with whole samples; with a plain causal mask a sample's tokens
also attend to every sample packed before it (an image caption then sees earlier images).
A block-causal mask keeps attention inside each sample. megatron-core takes such a mask
as a boolean tensor, True where attention is masked out, when the decoder's attention is
built with `AttnMaskType.arbitrary` (models/specs.py): the portable SDPA attention and
Transformer Engine's attention both apply it then. RoPE needs no per-sample positions:
it only sees distances within a sample, the same wherever the sample sits.

That dense mask is O(s²) memory a sample; `model.document_attention=fused` (the default)
hands the model the boundaries instead (packed_attention.py). `document_attention_mode`
names, once for a model, which form its attention takes; `packed_inputs` and
`one_sample_rows_mask` build it from the batch. Every caller of the model goes through them.
"""

from __future__ import annotations

from typing import Optional

import torch

from megatron_mm.models import packed_attention

# What a model built with document masking takes for its packed samples:
DENSE_MASK = "dense_mask"  # attention_mask: the boolean [b, 1, s, s] mask (any spec)
SEGMENT_IDS = "segment_ids"  # attention_mask: the segment ids [b, s] (portable spec: FlexAttention)
THD = "thd"  # packed_seq_params in THD format, inputs flattened to [1, b * s] (TE spec)


def document_attention_mode(cfg, use_transformer_engine: bool) -> Optional[str]:
    """DENSE_MASK, SEGMENT_IDS or THD for a model (`cfg`: a Config) that keeps packed samples
    apart (`cfg.masks_documents`, `model.document_attention`); None for plain causal attention."""
    if not cfg.masks_documents:
        return None
    if cfg.model.document_attention == "dense_mask":
        return DENSE_MASK
    return THD if use_transformer_engine else SEGMENT_IDS


def packed_inputs(mode: Optional[str], segment_ids: Optional[torch.Tensor]) -> dict:
    """The model's keyword arguments `attention_mask` and `packed_seq_params` for packed samples
    `segment_ids` [b, s] (unread when `mode` is None) under `mode`. Under THD the caller
    flattens its [b, s] inputs with `packed_attention.flatten_rows`."""
    if mode == DENSE_MASK:
        return {"attention_mask": document_attention_mask(segment_ids), "packed_seq_params": None}
    if mode == SEGMENT_IDS:
        return {"attention_mask": segment_ids, "packed_seq_params": None}
    if mode == THD:  # Transformer Engine only: not run on the CPU machines.
        return {"attention_mask": None, "packed_seq_params": packed_attention.thd_packed_seq_params(segment_ids)}
    return {"attention_mask": None, "packed_seq_params": None}


def document_attention_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """Block-causal mask for `segment_ids` [b, s] (one value per packed sample, another for
    padding): token i may attend to token j when j <= i and both have the same id.
    Returns megatron-core's boolean mask [b, 1, s, s], True where attention is masked out."""
    if segment_ids.dim() != 2:
        raise ValueError(f"segment_ids: expected [batch, seq], got shape {tuple(segment_ids.shape)}")
    s = segment_ids.shape[1]
    causal = torch.ones(s, s, dtype=torch.bool, device=segment_ids.device).tril()
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    return ~(same & causal)[:, None]


def one_sample_rows_mask(mode: Optional[str], tokens: torch.Tensor) -> Optional[torch.Tensor]:
    """The `attention_mask` for `tokens` [b, s] holding one sample a row (padding after it
    does not matter: causal), for a model of `document_attention_mode` `mode`; None for a
    model that takes none (THD: the TE model is built causal and one sample a row is causal)."""
    if mode in (DENSE_MASK, SEGMENT_IDS):
        return packed_inputs(mode, torch.ones_like(tokens))["attention_mask"]
    return None
