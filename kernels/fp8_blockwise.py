"""Block-scaled FP8 (DeepSeek-V3's recipe): quantize and dequantize 128x128 weight blocks and
1x128 activation tiles, as plain-torch references and as Triton kernels
(`kernels/fp8_blockwise_triton.py`), behind one dispatch per operation.

The format (DeepSeek-V3's README_WEIGHTS.md and its inference/kernel.py):
- codes are `float8_e4m3fn` (1 sign, 4 exponent bits with bias 7, 3 mantissa bits; largest
  finite 448, no infinities);
- each block (weights: 128 rows x 128 columns; activations: 1 row x 128 columns) has one
  float32 scale `s = amax(|block|) / 448`, stored by the release as `<weight>_scale_inv`; a
  block that does not fill 128x128 at a tensor's edge is scaled as if zero-padded, so a weight
  of shape (rows, cols) has scales of shape (ceil(rows/128), ceil(cols/128));
- code = round_to_nearest_even(w / s) (fp32 division), clamped to +-448; dequantized
  w' = float(code) * s (fp32 multiply), then cast to the wanted dtype.
- A block of zeros gets scale 1.0 (`ZERO_BLOCK_SCALE`); its codes are 0 and dequantize to 0
  whatever the scale. DeepSeek-V3's own kernels have no convention (their `amax / 448` gives a
  scale of 0 and 0/0 codes); transformers' FP8 quantizer (`Fp8Quantize`, which writes this
  format) uses 1.0, which is what we follow.

Error bound of a round trip (exact, tested in tests/test_kernels.py): with v = w / s in
[-448, 448], e4m3 rounding to nearest moves v by at most half a unit in the last place:
2^-4 |v| for normals (|v| >= 2^-6: 3 mantissa bits) and 2^-10 for subnormals (|v| < 2^-6: the
spacing there is 2^-9). Scaled back and including the fp32 roundings of w / s and code * s
(each <= 2^-24 relative, and |w| <= 448 s inside a block):

    |dequantize(quantize(w)) - w| <= 2^-4 |w| + 2^-10 s        elementwise, s its block's scale

for a float32 result (a bf16 result adds bf16's own rounding, 2^-9 relative)
(a weight of magnitude amax loses at most 2^-4 relative; values far below the block's amax
lose at most 2^-10 s = amax * 2^-10 / 448 absolute). The fp32 roundings fit in the bound's
slack: they add at most 2^-22.9 |w| <= 2^-14 s.

Dispatch: `backend="auto"` runs the Triton kernel on CUDA tensors (when triton is installed)
and the torch reference on any other device; `backend="triton"` forces the kernel (on CPU
tensors only under Triton's interpreter, TRITON_INTERPRET=1 set before the first call);
`backend="torch"` forces the reference. Both give bit-identical codes and scales.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Literal

import torch

BLOCK = 128
E4M3_MAX = 448.0
ZERO_BLOCK_SCALE = 1.0
FP8 = torch.float8_e4m3fn

Backend = Literal["auto", "torch", "triton"]


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def weight_scale_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    """Scales of a 2-D weight of `shape`: one per 128x128 block, edge blocks included."""
    rows, cols = shape
    return ceil_div(rows, BLOCK), ceil_div(cols, BLOCK)


def activation_scale_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Scales of an activation tensor (..., K): one per 1x128 tile of each row."""
    return (*shape[:-1], ceil_div(shape[-1], BLOCK))


def _scale_of(amax: torch.Tensor) -> torch.Tensor:
    return torch.where(amax > 0, amax / E4M3_MAX, torch.full_like(amax, ZERO_BLOCK_SCALE))


def _encode(values: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """values / scales (broadcast) rounded to e4m3 codes (torch's cast: nearest, ties to even)."""
    return (values / scales).clamp(-E4M3_MAX, E4M3_MAX).to(FP8)


# --------------------------------------------------------------------------- torch references


def quantize_weight_reference(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(float8_e4m3fn codes of `weight`'s shape, float32 scales (ceil(rows/128), ceil(cols/128))).
    Works one row of blocks at a time, so temporaries hold 128 rows, not the whole weight."""
    if weight.dim() != 2:
        raise ValueError(f"quantize_weight: a 2-D weight, got shape {tuple(weight.shape)}")
    rows, cols = weight.shape
    block_rows, block_cols = weight_scale_shape(weight.shape)
    codes = torch.empty(rows, cols, dtype=FP8, device=weight.device)
    scales = torch.empty(block_rows, block_cols, dtype=torch.float32, device=weight.device)
    padded_cols = block_cols * BLOCK
    for r in range(block_rows):
        band = weight[r * BLOCK:(r + 1) * BLOCK].float()
        band = torch.nn.functional.pad(band, (0, padded_cols - cols))  # zeros do not change amax
        tiles = band.view(band.shape[0], block_cols, BLOCK)  # (rows in band, block, column in block)
        scales[r] = _scale_of(tiles.abs().amax(dim=(0, 2)))
        codes[r * BLOCK:(r + 1) * BLOCK] = _encode(tiles, scales[r][None, :, None]).view(-1, padded_cols)[:, :cols]
    return codes, scales


def dequantize_weight_reference(codes: torch.Tensor, scales: torch.Tensor,
                                dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """float(code) * its block's scale, cast to `dtype`; one row of blocks at a time."""
    _check_weight_pair(codes, scales)
    rows, cols = codes.shape
    out = torch.empty(rows, cols, dtype=dtype, device=codes.device)
    for r in range(scales.shape[0]):
        per_column = scales[r].float().repeat_interleave(BLOCK)[:cols]
        out[r * BLOCK:(r + 1) * BLOCK] = (codes[r * BLOCK:(r + 1) * BLOCK].float() * per_column).to(dtype)
    return out


def quantize_activation_reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(float8_e4m3fn codes of `x`'s shape, float32 scales (..., ceil(K/128))): one scale per
    1x128 tile of the last dimension (per token, per 128 channels); 128 rows at a time."""
    k = x.shape[-1]
    flat = x.reshape(-1, k)
    tiles_per_row = ceil_div(k, BLOCK)
    codes = torch.empty(flat.shape, dtype=FP8, device=x.device)
    scales = torch.empty(flat.shape[0], tiles_per_row, dtype=torch.float32, device=x.device)
    for start in range(0, flat.shape[0], BLOCK):
        band = torch.nn.functional.pad(flat[start:start + BLOCK].float(), (0, tiles_per_row * BLOCK - k))
        tiles = band.view(band.shape[0], tiles_per_row, BLOCK)
        scales[start:start + BLOCK] = _scale_of(tiles.abs().amax(dim=2))
        codes[start:start + BLOCK] = _encode(tiles, scales[start:start + BLOCK, :, None]).view(band.shape)[:, :k]
    return codes.reshape(x.shape), scales.reshape(activation_scale_shape(x.shape))


def dequantize_activation_reference(codes: torch.Tensor, scales: torch.Tensor,
                                    dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """float(code) * its tile's scale, cast to `dtype`; 128 rows at a time."""
    _check_activation_pair(codes, scales)
    k = codes.shape[-1]
    flat_codes, flat_scales = codes.reshape(-1, k), scales.reshape(-1, scales.shape[-1])
    out = torch.empty(flat_codes.shape, dtype=dtype, device=codes.device)
    for start in range(0, flat_codes.shape[0], BLOCK):
        per_channel = flat_scales[start:start + BLOCK].float().repeat_interleave(BLOCK, dim=1)[:, :k]
        out[start:start + BLOCK] = (flat_codes[start:start + BLOCK].float() * per_channel).to(dtype)
    return out.reshape(codes.shape)


def _check_weight_pair(codes: torch.Tensor, scales: torch.Tensor) -> None:
    if codes.dim() != 2 or tuple(scales.shape) != weight_scale_shape(codes.shape):
        raise ValueError(f"dequantize_weight: codes {tuple(codes.shape)} need scales "
                         f"{weight_scale_shape(codes.shape) if codes.dim() == 2 else '(2-D codes)'}, "
                         f"got {tuple(scales.shape)}")


def _check_activation_pair(codes: torch.Tensor, scales: torch.Tensor) -> None:
    if tuple(scales.shape) != activation_scale_shape(codes.shape):
        raise ValueError(f"dequantize_activation: codes {tuple(codes.shape)} need scales "
                         f"{activation_scale_shape(codes.shape)}, got {tuple(scales.shape)}")


# --------------------------------------------------------------------------- dispatch


def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def _use_triton(tensor: torch.Tensor, backend: Backend) -> bool:
    if backend == "torch":
        return False
    if backend == "auto":
        return tensor.is_cuda and triton_installed()
    if backend != "triton":
        raise ValueError(f"backend={backend!r}: one of auto, torch, triton")
    if not triton_installed():
        raise RuntimeError("backend='triton': triton is not installed (pip install triton)")
    if not tensor.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("backend='triton' on a CPU tensor runs in Triton's interpreter: set "
                           "TRITON_INTERPRET=1 before the first call")
    return True


def _triton():
    from kernels import fp8_blockwise_triton

    return fp8_blockwise_triton


def quantize_weight(weight: torch.Tensor, backend: Backend = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """A 2-D weight -> (float8_e4m3fn codes, float32 scales per 128x128 block)."""
    if _use_triton(weight, backend):
        return _triton().quantize_weight(weight)
    return quantize_weight_reference(weight)


def dequantize_weight(codes: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.bfloat16,
                      backend: Backend = "auto") -> torch.Tensor:
    """float8_e4m3fn codes and their 128x128 block scales -> a `dtype` weight."""
    if _use_triton(codes, backend):
        return _triton().dequantize_weight(codes, scales, dtype)
    return dequantize_weight_reference(codes, scales, dtype)


def quantize_activation(x: torch.Tensor, backend: Backend = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """(..., K) activations -> (float8_e4m3fn codes, float32 scales per 1x128 tile)."""
    if _use_triton(x, backend):
        return _triton().quantize_activation(x)
    return quantize_activation_reference(x)


def dequantize_activation(codes: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.bfloat16,
                          backend: Backend = "auto") -> torch.Tensor:
    if _use_triton(codes, backend):
        return _triton().dequantize_activation(codes, scales, dtype)
    return dequantize_activation_reference(codes, scales, dtype)
