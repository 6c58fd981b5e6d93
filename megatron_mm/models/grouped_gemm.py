"""One GEMM for all local experts: `x[rows of group g] @ weights[g].T`, groups = expert-sorted rows.

Hand-written because megatron-core's grouped GEMMs need Transformer Engine (`TEGroupedLinear`)
or the `grouped_gemm` package (legacy `GroupedMLP`); torch ships the kernel itself,
`torch._grouped_mm` (public as `torch.nn.functional.grouped_mm`): CUTLASS on Hopper and later,
a per-group loop inside torch on the CPU. What it needs, and how it is met here:

* Offsets, not a list: `offs[g]` is the exclusive end row of group g, int32 on the input's
  device, the cumulative sum of `tokens_per_expert` computed where that tensor lives (the
  all-to-all dispatcher has already moved it to the host for its split sizes; another
  dispatcher may leave it on the device, then nothing here reads it on the host).
* No per-group row padding: in the 2-D input x 3-D weight form no group size needs aligning
  (only FP8/FP4 grouped GEMMs pad groups, TE's `Fp8Padding`; FP8 experts are TE's path).
  The kernel's 16-byte rule applies to row strides and base pointers, i.e. to the static
  hidden and expert-FFN sizes (multiples of 8 in bf16), checked from shapes, never from data.
* Its own backward (`_GroupedLinear`), for memory: torch's autograd formula would keep the
  stacked (groups, out, in) weight copy alive from forward to backward, one more copy of the
  rank's expert weights per MoE layer and micro-batch in flight; here forward and backward
  each stack the weights for their call only and keep the parameters themselves. Input
  gradient: a grouped GEMM with the weights untransposed; weight gradients: one grouped GEMM
  of the 2-D x 2-D form (`grad.T @ x`, grouped along the rows). The incoming gradient is made
  contiguous first (the kernel rejects the stride-0 one `out.sum()` gives), and a call with no
  rows at all takes the loop (the weight gradients' contraction would be empty, which the
  kernel's layout check rejects).
* Where the kernel cannot serve the call (CUDA before Hopper, a dtype other than bf16 on CUDA,
  row sizes that are not a multiple of 16 bytes, on any device), the same math runs as a loop of `F.linear` over the groups: the same
  parameters and results, one matmul per group.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F


def uses_grouped_kernel(x: torch.Tensor, out_features: int) -> bool:
    """Whether `torch._grouped_mm` serves a call with input `x` (rows, in) and `out_features`."""
    if not hasattr(torch, "_grouped_mm") or x.shape[0] == 0:
        return False
    # 16-byte row strides (checked on the CPU too: "strides should be multiple of 16 bytes")
    aligned = (x.shape[1] * x.element_size()) % 16 == 0 and (out_features * x.element_size()) % 16 == 0
    if not aligned:
        return False
    if x.device.type == "cpu":
        return True
    if x.device.type != "cuda" or x.dtype != torch.bfloat16:
        return False
    return torch.cuda.get_device_capability(x.device) >= (9, 0)


def group_offsets(tokens_per_expert: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Exclusive end row of each group, int32 on `device` (computed where the counts live)."""
    return torch.cumsum(tokens_per_expert, 0, dtype=torch.int32).to(device, non_blocking=True)


class _GroupedLinear(torch.autograd.Function):
    """`torch._grouped_mm` forward and backward over per-expert weights, keeping no stacked copy."""

    @staticmethod
    def forward(ctx, x, offs, *weights):
        ctx.save_for_backward(x, offs, *weights)
        return torch._grouped_mm(x, torch.stack(weights).transpose(-2, -1), offs=offs)

    @staticmethod
    def backward(ctx, grad):
        x, offs, *weights = ctx.saved_tensors
        grad = grad.contiguous()
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = torch._grouped_mm(grad, torch.stack(weights), offs=offs)
        if any(ctx.needs_input_grad[2:]):
            grad_w = torch._grouped_mm(grad.t(), x, offs=offs).unbind(0)  # (groups, out, in)
        return (grad_x, None, *(grad_w if grad_w is not None else [None] * len(weights)))


def grouped_linear(x: torch.Tensor, weights: Sequence[torch.Tensor],
                   tokens_per_expert: torch.Tensor) -> torch.Tensor:
    """`cat_g(x_g @ weights[g].T)` for the row groups `x_g` of sizes `tokens_per_expert`;
    `weights[g]` is (out, in), as `F.linear` takes it. Differentiable in `x` and every weight."""
    if uses_grouped_kernel(x, weights[0].shape[0]):
        return _GroupedLinear.apply(x, group_offsets(tokens_per_expert, x.device), *weights)
    sizes = tokens_per_expert.tolist()
    parts = [F.linear(rows, w) for rows, w in zip(torch.split(x, sizes), weights)]
    return torch.cat(parts) if parts else x.new_empty(0, weights[0].shape[0])
