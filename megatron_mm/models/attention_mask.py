"""The attention mask of sequences packed from several samples.

Packing fills each sequence with whole samples; with a plain causal mask a sample's tokens
also attend to every sample packed before it (an image caption then sees earlier images).
A block-causal mask keeps attention inside each sample. megatron-core takes such a mask
as a boolean tensor, True where attention is masked out, when the decoder's attention is
built with `AttnMaskType.arbitrary` (models/specs.py): the portable SDPA attention and
Transformer Engine's attention both apply it then. RoPE needs no per-sample positions:
it only sees distances within a sample, the same wherever the sample sits.
"""

from __future__ import annotations

from typing import Optional

import torch


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


def one_sample_rows_mask(masks_documents: bool, tokens: torch.Tensor) -> Optional[torch.Tensor]:
    """The mask for `tokens` [b, s] holding one sample a row (padding after it does not
    matter: causal), for a model built with `masks_documents` (`Config.masks_documents`);
    None for a model that takes none."""
    return document_attention_mask(torch.ones_like(tokens)) if masks_documents else None
