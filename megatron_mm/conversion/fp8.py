"""FP8 block-scaled Hugging Face folders, DeepSeek-V3's release format: which tensors are FP8,
the `quantization_config` of config.json, and the two hooks the converters call: reading a
folder's FP8 weights dequantized (`DequantizingReader`, HF -> megatron) and writing weights
quantized (`plan_with_scales` + `quantize_items`, megatron -> HF).

The format (DeepSeek-V3's README_WEIGHTS.md): a quantized weight `W.weight` is stored as
`float8_e4m3fn` with a float32 `W.weight_scale_inv` beside it, one scale per 128x128 block
(shape ceil(rows/128) x ceil(cols/128), edge blocks scaled as if zero-padded); the weight is
`code * scale` per block. The release quantizes every attention projection (q_proj or
q_a_proj/q_b_proj, kv_a_proj_with_mqa, kv_b_proj, o_proj) and every MLP projection (gate_proj,
up_proj, down_proj of the dense MLPs, the routed experts and the shared experts), MTP layers'
included; norms, embeddings, the router (`mlp.gate.weight`), `e_score_correction_bias`, the MTP
`eh_proj` and `lm_head` stay in bf16. The arithmetic (amax / 448 scales, rounding, the error
bound) is kernels/fp8_blockwise.py's; on CPU tensors it runs the torch reference.
"""

from __future__ import annotations

import re
from typing import Iterable, Iterator, Optional

import torch

from kernels import fp8_blockwise
from megatron_mm.conversion.dcp import ConversionError
from megatron_mm.conversion.safetensors_io import HFFolderReader

SCALE_SUFFIX = "_scale_inv"
QUANTIZATION_CONFIG = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                       "weight_block_size": [fp8_blockwise.BLOCK, fp8_blockwise.BLOCK]}
_QUANTIZED = re.compile(r"^model\.layers\.\d+\.(self_attn\.(q_proj|q_a_proj|q_b_proj|kv_a_proj_with_mqa|kv_b_proj|o_proj)"
                        r"|mlp\.((experts\.\d+|shared_experts)\.)?(gate_proj|up_proj|down_proj))\.weight$")


def quantized_in_release(name: str) -> bool:
    """Whether DeepSeek-V3's FP8 release stores HF tensor `name` in FP8 (with a scale beside it)."""
    return _QUANTIZED.match(name) is not None


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# --------------------------------------------------------------------------- megatron -> HF


def plan_with_scales(plan: list[tuple[str, tuple, torch.dtype]]) -> list[tuple[str, tuple, torch.dtype]]:
    """The shard plan of an FP8 folder: each weight the release quantizes becomes float8_e4m3fn,
    followed by its float32 scales (the order `quantize_items` yields them in)."""
    out = []
    for name, shape, dtype in plan:
        if quantized_in_release(name):
            out.append((name, shape, fp8_blockwise.FP8))
            out.append((name + SCALE_SUFFIX, fp8_blockwise.weight_scale_shape(shape), torch.float32))
        else:
            out.append((name, shape, dtype))
    return out


def quantize_items(items: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) in, the same with each weight the release quantizes replaced by
    (name, codes), (name + "_scale_inv", scales); one tensor at a time."""
    for name, tensor in items:
        if quantized_in_release(name):
            codes, scales = fp8_blockwise.quantize_weight(tensor)
            yield name, codes
            yield name + SCALE_SUFFIX, scales
        else:
            yield name, tensor


# --------------------------------------------------------------------------- HF -> megatron


def check_quantization_config(config: dict, where: str) -> Optional[dict]:
    """config.json's `quantization_config` when it is one we read (None when absent); anything
    else raises ConversionError naming the field."""
    q = config.get("quantization_config")
    if q is None:
        return None
    if not isinstance(q, dict):
        raise ConversionError(f"{where}: quantization_config is {type(q).__name__}, not an object")
    expected = {"quant_method": ("fp8",), "fmt": ("e4m3", None), "activation_scheme": ("dynamic", None),
                "scale_fmt": ("float", "ue8m0", None), "expert_dtype": ("fp8", None)}
    for key, allowed in expected.items():
        if q.get(key) not in allowed:
            raise ConversionError(f"{where}: quantization_config.{key}={q.get(key)!r} is not converted (only "
                                  f"DeepSeek-V3's block FP8: quant_method fp8, fmt e4m3, dynamic activations)")
    block = q.get("weight_block_size", QUANTIZATION_CONFIG["weight_block_size"])
    if list(block or []) != QUANTIZATION_CONFIG["weight_block_size"]:
        raise ConversionError(f"{where}: quantization_config.weight_block_size={block!r} is not converted (only "
                              f"{QUANTIZATION_CONFIG['weight_block_size']} blocks)")
    return q


class DequantizingReader:
    """An HFFolderReader's tensors under their names, less the `_scale_inv` tensors, with each
    FP8 weight read as `code * scale` per 128x128 block in `dtype` (None: the dtype of the
    folder's unquantized weights, the embedding's). Every scale is checked (present, float32,
    the weight's block grid) before any tensor is read."""

    def __init__(self, reader: HFFolderReader, dtype: Optional[torch.dtype]):
        self.inner, self.folder = reader, reader.folder
        scale_names = {name for name in reader.keys() if name.endswith(SCALE_SUFFIX)}
        self.scale_of = {name[: -len(SCALE_SUFFIX)]: name for name in scale_names}
        self.where = {name: file for name, file in reader.where.items() if name not in scale_names}
        for weight, scale in sorted(self.scale_of.items()):
            self._check_pair(weight, scale)
        for name in sorted(self.where):
            if reader.dtype(name) == fp8_blockwise.FP8 and name not in self.scale_of:
                raise ConversionError(f"{self.folder}: {name} is float8_e4m3fn in {reader.file_of(name)} but its "
                                      f"scale {name}{SCALE_SUFFIX} is missing")
        embedding = "model.embed_tokens.weight"
        self.out_dtype = dtype or (reader.dtype(embedding) if embedding in self.where else torch.bfloat16)

    def _check_pair(self, weight: str, scale: str) -> None:
        reader, file = self.inner, self.inner.file_of(scale)
        if weight not in reader.where:
            raise ConversionError(f"{self.folder}: {scale} in {file} scales no tensor ({weight} is missing)")
        if reader.dtype(weight) != fp8_blockwise.FP8:
            raise ConversionError(f"{self.folder}: {weight} has a scale ({scale}) but is "
                                  f"{_dtype_name(reader.dtype(weight))}, not float8_e4m3fn")
        shape = tuple(reader.shape(weight))
        want = fp8_blockwise.weight_scale_shape(shape) if len(shape) == 2 else None
        if tuple(reader.shape(scale)) != want or reader.dtype(scale) != torch.float32:
            raise ConversionError(f"{self.folder}: {scale} is {_dtype_name(reader.dtype(scale))} "
                                  f"{tuple(reader.shape(scale))} in {file}; the {shape} weight needs float32 {want} "
                                  "(one scale per 128x128 block)")

    def keys(self) -> list[str]:
        return list(self.where)

    def shape(self, name: str) -> tuple:
        return self.inner.shape(name)

    def file_of(self, name: str) -> str:
        return self.inner.file_of(name)

    def dtype(self, name: str) -> torch.dtype:
        """The dtype `read(name)` gives."""
        return self.out_dtype if name in self.scale_of else self.inner.dtype(name)

    def read(self, name: str) -> torch.Tensor:
        tensor = self.inner.read(name)
        if name not in self.scale_of:
            return tensor
        return fp8_blockwise.dequantize_weight(tensor, self.inner.read(self.scale_of[name]), self.out_dtype)


def reader_for(reader: HFFolderReader, config: dict, dtype: Optional[torch.dtype]):
    """`reader` itself for a folder without quantization_config (which then must hold no scales),
    else a DequantizingReader over it."""
    if check_quantization_config(config, f"{reader.folder}/config.json") is None:
        stray = sorted(name for name in reader.keys() if name.endswith(SCALE_SUFFIX))
        if stray:
            raise ConversionError(f"{reader.folder}: {stray[0]} in {reader.file_of(stray[0])} is an FP8 block scale, "
                                  "but config.json has no quantization_config")
        return reader
    return DequantizingReader(reader, dtype)
