"""Attention over packed samples without a dense mask (models/packed_attention.py,
portable.FlexSegmentAttention, `model.document_attention`), in process and cheap.

* The block mask, applied the way FlexAttention applies it (full blocks whole, partial blocks
  through the mask function, unlisted blocks skipped), is exactly the dense block-causal mask.
* Building it creates no tensor anywhere near [s, s].
* FlexSegmentAttention gives the dense-mask SDPA's values and gradients (fp32, query/key head
  size 24, value 16, three 128-token blocks), with this machine's kernel (on a CPU compat's:
  torch refuses FlexAttention's backward there); and torch's FlexAttention itself (eager,
  forward only on a CPU) gives the same values over the block mask. Measured at most ~1e-6
  apart; tolerance 1e-5.
* The THD PackedSeqParams (Transformer Engine's packed format, not runnable here) has a
  sequence start at each row start and each change of sample.

The whole model on packed multimodal batches (fused against dense, losses and gradients; a
sample's losses independent of what is packed before it) is the document-mask probe in
tests/test_multimodal_training.py.
"""

import os
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from conftest import ROOT

from megatron_mm.config import ConfigError, Hardware, load_config, validate
from megatron_mm.models import packed_attention
from megatron_mm.models.attention_mask import (
    DENSE_MASK, SEGMENT_IDS, THD, document_attention_mask, document_attention_mode, one_sample_rows_mask,
    packed_inputs,
)

QUICKSTART = os.path.join(ROOT, "configs", "quickstart.yaml")
TOLERANCE = 1e-5  # fp32; measured <= 2e-6 (outputs and gradients)


def packed_segments(batch: int, seq: int, seed: int) -> torch.Tensor:
    """Rows of packed samples 1, 2, ... of random lengths (1 to 59 tokens), the last row one
    sample; the last eighth of each row padding (0)."""
    g = torch.Generator().manual_seed(seed)
    real = seq - seq // 8
    rows = []
    for r in range(batch):
        ids, n = [], 1
        while len(ids) < real:
            ids += [n] * (real if r == batch - 1 else int(torch.randint(1, 60, (1,), generator=g)))
            n += 1
        rows.append(ids[:real] + [0] * (seq - real))
    return torch.tensor(rows)


def applied_mask(block_mask, seq: int) -> torch.Tensor:
    """The [b, s, s] attention (True = attended) FlexAttention computes from `block_mask`."""
    block = block_mask.BLOCK_SIZE[0]
    b, n = block_mask.kv_num_blocks.shape[0], block_mask.kv_num_blocks.shape[-1]
    q = torch.arange(n * block)[:, None]
    kv = torch.arange(n * block)[None, :]
    out = torch.zeros(b, n * block, n * block, dtype=torch.bool)
    lists = ((block_mask.kv_num_blocks, block_mask.kv_indices, False),
             (block_mask.full_kv_num_blocks, block_mask.full_kv_indices, True))
    for num, indices, full in lists:
        for batch in range(b):
            for i in range(n):
                for j in indices[batch, 0, i, : num[batch, 0, i]].tolist():
                    rows, cols = slice(i * block, (i + 1) * block), slice(j * block, (j + 1) * block)
                    assert not out[batch, rows, cols].any(), f"block ({i}, {j}) listed twice"
                    if full:
                        out[batch, rows, cols] = True
                    else:
                        qi, ki = q[rows].clamp(max=seq - 1), kv[:, cols].clamp(max=seq - 1)
                        out[batch, rows, cols] = block_mask.mask_mod(batch, 0, qi, ki)
    return out[:, :seq, :seq]


@pytest.mark.parametrize("seq,block", [(100, 16), (64, 16), (7, 16)])
def test_block_mask_applies_the_dense_mask(seq, block):
    segments = packed_segments(3, seq, seed=seq)
    block_mask = packed_attention.segment_block_mask(segments, block)
    dense_allowed = ~document_attention_mask(segments)[:, 0]
    assert torch.equal(applied_mask(block_mask, seq), dense_allowed)
    # Blocks after the diagonal are never listed: at most n(n+1)/2 blocks a row.
    n = -(-seq // block)
    listed = block_mask.kv_num_blocks + block_mask.full_kv_num_blocks
    assert int(listed.sum(-1).max()) <= n * (n + 1) // 2


class LargestTensor(TorchFunctionMode):
    """Records the largest tensor any torch function or tensor method returns."""

    largest = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_block_mask_builds_no_seq_by_seq_tensor():
    batch, seq = 2, 4096
    segments = packed_segments(batch, seq, seed=0)
    with LargestTensor() as watch:
        block_mask = packed_attention.segment_block_mask(segments)
    # The padded ids [b, s] are the largest: 8192 elements, against 33.5 million of [b, 1, s, s].
    assert watch.largest <= batch * seq, watch.largest
    assert tuple(block_mask.kv_indices.shape) == (batch, 1, seq // 128, seq // 128)
    with LargestTensor() as watch:  # the watch sees a dense mask being built
        document_attention_mask(segments[:, :256])
    assert watch.largest == batch * 256 * 256


@pytest.fixture(scope="module")
def flex_attention():
    """FlexSegmentAttention with the kernel this machine runs (compat's eager FlexAttention on a
    CPU: torch refuses FlexAttention's backward there), for this module only."""
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_mm.models.portable import FlexSegmentAttention
    from megatron_mm.runtime import compat

    config = TransformerConfig(num_layers=1, hidden_size=32, num_attention_heads=2, attention_dropout=0.0,
                               cuda_graph_scope=[])
    module = FlexSegmentAttention(config, 1, AttnMaskType.padding_causal, "self", softmax_scale=0.3)
    with pytest.MonkeyPatch.context() as patch:
        if not torch.cuda.is_available():
            patch.setattr(packed_attention, "kernel", compat._flex_attention_through_sdpa)
        yield module


def test_fused_attention_matches_dense_mask_values_and_gradients(flex_attention):
    seq, batch, heads = 300, 2, 2  # three 128-token blocks, the last one partial
    segments = packed_segments(batch, seq, seed=1)
    g = torch.Generator().manual_seed(2)
    inputs = [torch.randn(seq, batch, heads, dim, generator=g) for dim in (24, 24, 16)]  # q, k, v: [s, b, h, d]
    weights = torch.randn(seq, batch, heads * 16, generator=g)

    def run(attend):
        q, k, v = (t.clone().requires_grad_() for t in inputs)
        out = attend(q, k, v)
        return [out, *torch.autograd.grad((out * weights).sum(), (q, k, v))]

    def dense(q, k, v):  # SDPAttention's arithmetic over the dense mask (portable.py)
        q, k, v = (t.permute(1, 2, 0, 3) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=~document_attention_mask(segments), scale=0.3)
        return out.permute(2, 0, 1, 3).reshape(seq, batch, -1)

    fused = run(lambda q, k, v: flex_attention(q, k, v, segments))
    for name, a, b in zip(("output", "dq", "dk", "dv"), fused, run(dense)):
        difference = float((a - b).detach().abs().max())
        assert a.shape == b.shape and difference <= TOLERANCE, (name, difference)


def test_flex_attention_itself_over_the_block_mask_matches_dense():
    from torch.nn.attention.flex_attention import flex_attention

    seq, batch, heads = 300, 2, 2
    segments = packed_segments(batch, seq, seed=3)
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(batch, heads, seq, dim, generator=g) for dim in (24, 24, 16))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "flex_attention called without torch.compile()": expected here
        out = flex_attention(q, k, v, block_mask=packed_attention.segment_block_mask(segments), scale=0.3)
    dense = F.scaled_dot_product_attention(q, k, v, attn_mask=~document_attention_mask(segments), scale=0.3)
    assert float((out - dense).abs().max()) <= TOLERANCE


def test_fused_attention_refuses_a_missing_or_dense_mask(flex_attention):
    q = torch.randn(8, 1, 2, 4)
    with pytest.raises(ValueError, match="attention_mask of segment ids"):
        flex_attention(q, q, q, None)
    with pytest.raises(ValueError, match="attention_mask of segment ids"):
        flex_attention(q, q, q, document_attention_mask(torch.ones(1, 8)))


def test_thd_packed_seq_params():
    segments = torch.tensor([[1, 1, 2, 2, 2, 0], [1, 1, 1, 1, 1, 1], [3, 4, 4, 4, 0, 0]])
    params = packed_attention.thd_packed_seq_params(segments)
    assert params.qkv_format == "thd"
    assert params.cu_seqlens_q.dtype == torch.int32
    assert params.cu_seqlens_q.tolist() == [0, 2, 5, 6, 12, 13, 16, 18]  # rows flattened: 6 + 6 + 6
    assert params.cu_seqlens_kv is params.cu_seqlens_q
    assert params.max_seqlen_q == params.max_seqlen_kv == 6
    assert packed_attention.flatten_rows(segments).tolist() == [segments.flatten().tolist()]


def test_document_attention_mode_and_model_inputs():
    def mode(overrides, use_te=False):
        return document_attention_mode(load_config(QUICKSTART, overrides), use_te)

    assert mode([]) == SEGMENT_IDS  # the default: fused
    assert mode([], use_te=True) == THD
    assert mode(["model.document_attention=dense_mask"]) == mode(["model.document_attention=dense_mask"], True) == DENSE_MASK
    assert mode(["data.document_mask=false"]) is None
    segments = torch.tensor([[1, 1, 2, 0]])
    assert packed_inputs(SEGMENT_IDS, segments)["attention_mask"] is segments  # no [b, 1, s, s]
    assert packed_inputs(DENSE_MASK, segments)["attention_mask"].shape == (1, 1, 4, 4)
    thd = packed_inputs(THD, segments)
    assert thd["attention_mask"] is None and thd["packed_seq_params"].cu_seqlens_q.tolist() == [0, 2, 3, 4]
    assert packed_inputs(None, None) == {"attention_mask": None, "packed_seq_params": None}
    tokens = torch.zeros(2, 5, dtype=torch.long)
    assert torch.equal(one_sample_rows_mask(SEGMENT_IDS, tokens), torch.ones(2, 5, dtype=torch.long))
    assert one_sample_rows_mask(DENSE_MASK, tokens).shape == (2, 1, 5, 5)
    assert one_sample_rows_mask(THD, tokens) is None and one_sample_rows_mask(None, tokens) is None


@pytest.mark.parametrize("overrides,line", [
    (["model.document_attention=flash"], "model.document_attention=flash: must be fused or dense_mask"),
    (["model.document_attention=dense_mask", "model.mtp_num_layers=1"],
     "model.document_attention=dense_mask: cannot serve model.mtp_num_layers=1 (megatron-core's MTP layer "
     "takes no arbitrary mask): use fused, or data.document_mask=false"),
])
def test_bad_document_attention_is_refused(overrides, line):
    with pytest.raises(ConfigError) as err:
        validate(load_config(QUICKSTART, overrides), 1, Hardware())
    assert err.value.problems == [line]
    validate(load_config(QUICKSTART, ["model.mtp_num_layers=1"]), 1, Hardware())  # fused serves MTP
