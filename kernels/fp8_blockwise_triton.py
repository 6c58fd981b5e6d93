"""Triton kernels for block-scaled FP8 (the format and the error bound: kernels/fp8_blockwise.py,
whose torch references these match bit for bit; call them through its dispatch functions).

One program per block: a 128x128 weight block, or 32 rows of 1x128 activation tiles; it reads
the block, takes the amax of each 128x128 block or 1x128 tile, writes the scales and codes (or
reads codes and scales and writes values).

Hand-written here because neither Triton nor torch gives it: the e4m3 codes are encoded and
decoded with integer and fp32 arithmetic (`_e4m3_code`, `_e4m3_value`) instead of Triton's
float8 casts, and a bf16 result is rounded by its bits (`_bf16_bits`), so that the kernels
- give torch's round-to-nearest-even on every backend: Triton's CPU interpreter converts to
  fp8/bf16 by truncating bit fields and rounds half up with a carry bug (measured, triton 3.9:
  124.1 -> 64.0 where torch's cast gives 128.0);
- need no float8 support from the GPU (A100s have none: sm_80 cannot convert to e4m3).
The kernels read any float dtype, compute in fp32, and divide with IEEE rounding
(`tl.math.div_rn`; Triton's `/` is an approximate division on NVIDIA GPUs).
Importing this module decides interpreter or compiler: TRITON_INTERPRET=1 must be set before.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.fp8_blockwise import (BLOCK, E4M3_MAX, FP8, ZERO_BLOCK_SCALE, _check_activation_pair,
                                   _check_weight_pair, activation_scale_shape, weight_scale_shape)


@triton.jit
def _e4m3_code(v):
    """float8_e4m3fn code (uint8) of fp32 `v` (|v| <= 448), rounded to nearest, ties to even."""
    bits = v.to(tl.int32, bitcast=True)
    sign = (bits >> 31) & 1
    magnitude = tl.abs(v)
    exponent = tl.maximum((magnitude.to(tl.int32, bitcast=True) >> 23) - 127, -6)  # e4m3: no exponent below -6
    # 2^(exponent + 20): fp32 numbers in [magic, 2 magic) are spaced 2^(exponent - 3), e4m3's
    # spacing at `magnitude`, so the IEEE add rounds `magnitude` onto the e4m3 grid (nearest, even).
    magic = ((exponent + 20 + 127) << 23).to(tl.float32, bitcast=True)
    rounded = (magnitude + magic) - magic
    rounded_bits = rounded.to(tl.int32, bitcast=True)
    rounded_exponent = (rounded_bits >> 23) - 127
    normal_code = ((rounded_exponent + 7) << 3) | ((rounded_bits >> 20) & 7)
    subnormal_code = (rounded * 512.0).to(tl.int32)  # rounded = k * 2^-9, k = 0..7
    code = tl.where(rounded_exponent >= -6, normal_code, subnormal_code)
    return (code | (sign << 7)).to(tl.uint8)


@triton.jit
def _e4m3_value(code):
    """fp32 value of a float8_e4m3fn code (uint8): exact; 0x7F / 0xFF are NaN."""
    c = code.to(tl.int32)
    exponent = (c >> 3) & 15
    mantissa = c & 7
    normal = (((exponent + 120) << 23) | (mantissa << 20)).to(tl.float32, bitcast=True)  # 2^(e-7) (1 + m/8)
    magnitude = tl.where(exponent > 0, normal, mantissa.to(tl.float32) * 0.001953125)  # subnormal: m 2^-9
    magnitude = tl.where((c & 127) == 127, float("nan"), magnitude)
    return tl.where((c >> 7) == 1, -magnitude, magnitude)


@triton.jit
def _bf16_bits(x):
    """bfloat16 bit pattern (uint16) of fp32 `x`: torch's rounding (nearest, ties to even; NaN -> 0x7FC0)."""
    bits = x.to(tl.uint32, bitcast=True)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return tl.where(x != x, 0x7FC0, rounded).to(tl.uint16)


@triton.jit
def _scale_of(amax):
    return tl.where(amax > 0, tl.math.div_rn(amax, 448.0), 1.0)


@triton.jit
def _weight_block(rows, cols, BLOCK: tl.constexpr):
    """This program's BLOCK x BLOCK block: element offsets, which lie inside the weight, and the
    offset of its scale."""
    block_row = tl.program_id(0)
    block_col = tl.program_id(1)
    r = block_row * BLOCK + tl.arange(0, BLOCK)[:, None]
    c = block_col * BLOCK + tl.arange(0, BLOCK)[None, :]
    inside = (r < rows) & (c < cols)
    return r.to(tl.int64) * cols + c, inside, block_row * tl.cdiv(cols, BLOCK) + block_col


@triton.jit
def _activation_tiles(rows, k, BLOCK: tl.constexpr, ROWS: tl.constexpr):
    """This program's ROWS tiles of 1 x BLOCK: element offsets, which lie inside, the rows (a
    column) and the offsets of their scales."""
    r = tl.program_id(0) * ROWS + tl.arange(0, ROWS)[:, None]
    tile = tl.program_id(1)
    c = tile * BLOCK + tl.arange(0, BLOCK)[None, :]
    inside = (r < rows) & (c < k)
    return r.to(tl.int64) * k + c, inside, r, r.to(tl.int64) * tl.cdiv(k, BLOCK) + tile


@triton.jit
def _store_dequantized(out_ptr, offsets, y, inside, OUT_BF16: tl.constexpr):
    if OUT_BF16:
        tl.store(out_ptr + offsets, _bf16_bits(y), mask=inside)
    else:
        tl.store(out_ptr + offsets, y, mask=inside)


@triton.jit
def _quantize_weight_kernel(w_ptr, code_ptr, scale_ptr, rows, cols, BLOCK: tl.constexpr):
    offsets, inside, scale_offset = _weight_block(rows, cols, BLOCK)
    w = tl.load(w_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
    scale = _scale_of(tl.max(tl.abs(w)))
    v = tl.clamp(tl.math.div_rn(w, scale), -448.0, 448.0)
    tl.store(code_ptr + offsets, _e4m3_code(v), mask=inside)
    tl.store(scale_ptr + scale_offset, scale)


@triton.jit
def _dequantize_weight_kernel(code_ptr, scale_ptr, out_ptr, rows, cols, BLOCK: tl.constexpr,
                              OUT_BF16: tl.constexpr):
    offsets, inside, scale_offset = _weight_block(rows, cols, BLOCK)
    scale = tl.load(scale_ptr + scale_offset)
    y = _e4m3_value(tl.load(code_ptr + offsets, mask=inside, other=0)) * scale
    _store_dequantized(out_ptr, offsets, y, inside, OUT_BF16)


@triton.jit
def _quantize_activation_kernel(x_ptr, code_ptr, scale_ptr, rows, k, BLOCK: tl.constexpr, ROWS: tl.constexpr):
    """ROWS rows x BLOCK columns: ROWS tiles of 1 x BLOCK, one scale each."""
    offsets, inside, r, scale_offsets = _activation_tiles(rows, k, BLOCK, ROWS)
    x = tl.load(x_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
    scale = _scale_of(tl.max(tl.abs(x), axis=1))[:, None]
    v = tl.clamp(tl.math.div_rn(x, scale), -448.0, 448.0)
    tl.store(code_ptr + offsets, _e4m3_code(v), mask=inside)
    tl.store(scale_ptr + scale_offsets, scale, mask=r < rows)


@triton.jit
def _dequantize_activation_kernel(code_ptr, scale_ptr, out_ptr, rows, k, BLOCK: tl.constexpr, ROWS: tl.constexpr,
                                  OUT_BF16: tl.constexpr):
    offsets, inside, r, scale_offsets = _activation_tiles(rows, k, BLOCK, ROWS)
    scale = tl.load(scale_ptr + scale_offsets, mask=r < rows, other=1.0)
    y = _e4m3_value(tl.load(code_ptr + offsets, mask=inside, other=0)) * scale
    _store_dequantized(out_ptr, offsets, y, inside, OUT_BF16)


# --------------------------------------------------------------------------- launchers

assert (E4M3_MAX, ZERO_BLOCK_SCALE) == (448.0, 1.0), "the kernels spell out 448 and 1.0"
ACTIVATION_ROWS = 32  # rows of 1x128 tiles one program quantizes


def _output(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device):
    """(tensor to return, the buffer the kernel writes, OUT_BF16): the kernels write fp32 or bf16
    bits; any other dtype is written as fp32 and cast by torch."""
    if dtype == torch.bfloat16:
        out = torch.empty(shape, dtype=dtype, device=device)
        return out, out.view(torch.uint16), True
    out = torch.empty(shape, dtype=torch.float32, device=device)
    return out, out, False


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if weight.dim() != 2:
        raise ValueError(f"quantize_weight: a 2-D weight, got shape {tuple(weight.shape)}")
    weight = weight.contiguous()
    rows, cols = weight.shape
    codes = torch.empty(rows, cols, dtype=FP8, device=weight.device)
    scales = torch.empty(weight_scale_shape(weight.shape), dtype=torch.float32, device=weight.device)
    if codes.numel():
        _quantize_weight_kernel[scales.shape](weight, codes.view(torch.uint8), scales, rows, cols, BLOCK=BLOCK)
    return codes, scales


def dequantize_weight(codes: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    _check_weight_pair(codes, scales)
    codes, scales = codes.contiguous(), scales.float().contiguous()
    rows, cols = codes.shape
    out, buffer, out_bf16 = _output((rows, cols), dtype, codes.device)
    if codes.numel():
        _dequantize_weight_kernel[scales.shape](codes.view(torch.uint8), scales, buffer, rows, cols, BLOCK=BLOCK,
                                                OUT_BF16=out_bf16)
    return out.to(dtype)


def quantize_activation(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.contiguous()
    k = x.shape[-1]
    rows = x.numel() // k if k else 0
    codes = torch.empty(x.shape, dtype=FP8, device=x.device)
    scales = torch.empty(activation_scale_shape(x.shape), dtype=torch.float32, device=x.device)
    if codes.numel():
        grid = (triton.cdiv(rows, ACTIVATION_ROWS), scales.shape[-1])
        _quantize_activation_kernel[grid](x, codes.view(torch.uint8), scales, rows, k, BLOCK=BLOCK,
                                          ROWS=ACTIVATION_ROWS)
    return codes, scales


def dequantize_activation(codes: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    _check_activation_pair(codes, scales)
    codes, scales = codes.contiguous(), scales.float().contiguous()
    k = codes.shape[-1]
    out, buffer, out_bf16 = _output(tuple(codes.shape), dtype, codes.device)
    if codes.numel():
        rows = codes.numel() // k
        grid = (triton.cdiv(rows, ACTIVATION_ROWS), scales.shape[-1])
        _dequantize_activation_kernel[grid](codes.view(torch.uint8), scales, buffer, rows, k, BLOCK=BLOCK,
                                            ROWS=ACTIVATION_ROWS, OUT_BF16=out_bf16)
    return out.to(dtype)
