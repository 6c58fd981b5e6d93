"""Custom kernels (Triton), each beside a plain-torch reference that gives the same bits:
`kernels.fp8_blockwise` (block-scaled FP8: quantize / dequantize weights and activations).
Nothing is imported here: `import kernels` must stay cheap and must not need triton."""
