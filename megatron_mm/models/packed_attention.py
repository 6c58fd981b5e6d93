"""Attention over packed samples without a dense [b, 1, s, s] mask (`model.document_attention=fused`).

A batch carries its packed samples' boundaries as `segment_ids` [b, s] (one id per sample, 0 on
padding; data/multimodal/stream.py). The dense mask built from them (attention_mask.py) costs
O(s²) memory a sample and forces Transformer Engine onto its unfused attention. Here the same
block-causal attention ("token i sees token j when j <= i and both are in the same sample") is
expressed in the two forms fused kernels take:

* `segment_block_mask`: a FlexAttention `BlockMask` for the portable spec (portable.py,
  `FlexSegmentAttention`). Hand-written rather than `create_block_mask`, which without
  torch.compile evaluates the mask over all [b, h, s, s] positions (the tensor this module
  exists to avoid): each (query block, key block) pair is classified from the blocks' smallest
  and largest segment id, so what is built is [b, 1, s/128, s/128].
* `thd_packed_seq_params`: megatron-core's `PackedSeqParams` in TE's THD format (the rows
  flattened into one token stream, `cu_seqlens` at each sample and row start) for the TE spec.

`flex_attention` runs the FlexAttention kernel: `torch.compile(flex_attention)` (eager
FlexAttention materialises the scores). torch 2.13 refuses FlexAttention's backward on a CPU;
there runtime/compat.py (`cpu_flex_attention`) applies the block mask's mask function through
SDPA instead, as torch's eager FlexAttention would.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from megatron.core.packed_seq_params import PackedSeqParams
from torch.nn.attention.flex_attention import BlockMask

BLOCK_SIZE = 128  # FlexAttention's default sparse block


def segment_block_mask(segment_ids: torch.Tensor, block_size: int = BLOCK_SIZE) -> BlockMask:
    """Block-causal `BlockMask` for `segment_ids` [b, s]: the same attention as
    attention_mask.document_attention_mask, without any [s, s] tensor.

    A (query block, key block) pair is empty when the key block lies after the query block or
    their id ranges do not overlap; full when it lies strictly before and both blocks hold one
    and the same id; partial (FlexAttention applies the mask function there) otherwise."""
    if segment_ids.dim() != 2:
        raise ValueError(f"segment_ids: expected [batch, seq], got shape {tuple(segment_ids.shape)}")
    b, s = segment_ids.shape
    n = -(-s // block_size)
    # Pad with each row's last id so a block's min/max are those of its real tokens.
    padded = torch.cat([segment_ids, segment_ids[:, -1:].expand(b, n * block_size - s)], dim=1)
    blocks = padded.view(b, n, block_size)
    lo, hi = blocks.amin(-1), blocks.amax(-1)  # [b, n]
    index = torch.arange(n, device=segment_ids.device)
    before = index[None, :] < index[:, None]  # key block j strictly before query block i: [n(q), n(kv)]
    causal = index[None, :] <= index[:, None]
    q_lo, q_hi, kv_lo, kv_hi = lo[:, :, None], hi[:, :, None], lo[:, None, :], hi[:, None, :]
    overlap = (q_lo <= kv_hi) & (kv_lo <= q_hi)
    full = before & (q_lo == q_hi) & (kv_lo == kv_hi) & (q_lo == kv_lo)
    partial = causal & overlap & ~full
    return BlockMask.from_kv_blocks(
        *_kv_blocks(partial), *_kv_blocks(full), BLOCK_SIZE=block_size,
        mask_mod=_same_segment_causal(segment_ids), seq_lengths=(s, s),
    )


def _kv_blocks(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """BlockMask's sparse form of `blocks` [b, n, n] (bool): per query block, how many key
    blocks, and their indices first (the rest of each row is ignored)."""
    num = blocks.sum(-1, dtype=torch.int32)[:, None]  # [b, 1, n]
    indices = torch.argsort(blocks.to(torch.int8), dim=-1, descending=True, stable=True)
    return num, indices.to(torch.int32)[:, None]  # [b, 1, n, n]


def _same_segment_causal(segment_ids: torch.Tensor) -> Callable:
    def mask_mod(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (segment_ids[b, q_idx] == segment_ids[b, kv_idx])

    return mask_mod


_compiled: Optional[Callable] = None


def _compiled_flex_attention(query, key, value, block_mask: BlockMask, scale: Optional[float]) -> torch.Tensor:
    global _compiled
    if _compiled is None:
        from torch.nn.attention.flex_attention import flex_attention as flex

        _compiled = torch.compile(flex, dynamic=False)
    return _compiled(query, key, value, block_mask=block_mask, scale=scale)


kernel: Callable = _compiled_flex_attention  # runtime/compat.py swaps it where there is no GPU


def flex_attention(query, key, value, block_mask: BlockMask, scale: Optional[float]) -> torch.Tensor:
    """FlexAttention's fused kernel on [b, heads, s, dim] tensors (value dim may differ)."""
    return kernel(query, key, value, block_mask, scale)


def thd_packed_seq_params(segment_ids: torch.Tensor) -> PackedSeqParams:
    """TE's THD description of `segment_ids` [b, s]: the rows flattened into one stream of
    b * s tokens (the model's inputs must be flattened alike, `flatten_rows`), a sequence
    starting at every row start and wherever the id changes (padding is a sequence too)."""
    if segment_ids.dim() != 2:
        raise ValueError(f"segment_ids: expected [batch, seq], got shape {tuple(segment_ids.shape)}")
    starts = torch.ones_like(segment_ids, dtype=torch.bool)
    starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    total = torch.tensor([segment_ids.numel()], device=segment_ids.device)
    cu_seqlens = torch.cat([starts.flatten().nonzero().squeeze(1), total]).to(torch.int32)
    longest = int(cu_seqlens.diff().max())
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu_seqlens, cu_seqlens_kv=cu_seqlens,
                           max_seqlen_q=longest, max_seqlen_kv=longest)


def flatten_rows(tensor: torch.Tensor) -> torch.Tensor:
    """[b, s] → [1, b * s], the THD layout `thd_packed_seq_params` describes."""
    return tensor.reshape(1, -1)
