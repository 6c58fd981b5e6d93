"""Microbenchmark of the block-FP8 kernels: GB/s of each operation, the Triton kernel against
the torch reference, on one tensor shape per operation.

    python -m kernels.bench                      # CPU: the torch reference (a few seconds)
    python -m kernels.bench --triton             # + the Triton kernels (CPU: the interpreter, smaller shapes)
    python -m kernels.bench --rows 7168 --cols 18432 --repeats 5   # on a GPU: both, CUDA tensors

GB/s counts the bytes an operation must move once: quantize reads the input and writes the
1-byte codes and the float32 scales; dequantize reads codes and scales and writes the output.
On a GPU both backends run (the reference on CUDA tensors too); on CPU the Triton kernels run
only with --triton, through Triton's interpreter (numpy, one program at a time: a correctness
tool, its speed says nothing about a GPU), on shapes cut to --interpreter-rows rows.
Last stdout line: one JSON object (device, dtype, rows: one per backend and operation).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def _timed(fn: Callable[[], object], repeats: int, synchronize: Callable[[], None]) -> float:
    """Best seconds of `repeats` calls after one warm-up call."""
    fn()
    synchronize()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=4096, help="weight rows (and activation tokens)")
    parser.add_argument("--cols", type=int, default=7168, help="weight columns (and activation channels)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="input / dequantized dtype")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per measurement (best is kept)")
    parser.add_argument("--triton", action="store_true", help="on CPU, also run the Triton kernels (interpreter)")
    parser.add_argument("--interpreter-rows", type=int, default=128, help="rows of the interpreter's shapes on CPU")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    args = parser.parse_args(argv)

    import torch

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    on_gpu = device.type == "cuda"
    if args.triton and not on_gpu:
        os.environ["TRITON_INTERPRET"] = "1"  # before kernels.fp8_blockwise_triton is imported
    from kernels import fp8_blockwise as fp8

    backends = ["torch"] + (["triton"] if on_gpu or args.triton else [])
    if "triton" in backends and not fp8.triton_installed():
        raise SystemExit("kernels.bench: triton is not installed (pip install triton)")
    dtype = getattr(torch, DTYPES[args.dtype])
    synchronize = torch.cuda.synchronize if on_gpu else (lambda: None)
    generator = torch.Generator(device=device).manual_seed(0)
    rows_out = []
    for backend in backends:
        rows = args.rows if on_gpu or backend == "torch" else min(args.rows, args.interpreter_rows)
        repeats = args.repeats if on_gpu or backend == "torch" else 1
        weight = torch.randn(rows, args.cols, generator=generator, device=device).to(dtype)
        numel, in_bytes = weight.numel(), weight.numel() * weight.element_size()
        codes, scales = fp8.quantize_weight(weight, backend="torch")
        act_codes, act_scales = fp8.quantize_activation(weight, backend="torch")
        operations = {
            "quantize_weight (128x128)": (lambda: fp8.quantize_weight(weight, backend=backend),
                                          in_bytes + numel + scales.numel() * 4),
            "dequantize_weight (128x128)": (lambda: fp8.dequantize_weight(codes, scales, dtype, backend=backend),
                                            numel + scales.numel() * 4 + in_bytes),
            "quantize_activation (1x128)": (lambda: fp8.quantize_activation(weight, backend=backend),
                                            in_bytes + numel + act_scales.numel() * 4),
            "dequantize_activation (1x128)": (
                lambda: fp8.dequantize_activation(act_codes, act_scales, dtype, backend=backend),
                numel + act_scales.numel() * 4 + in_bytes),
        }
        for name, (fn, moved) in operations.items():
            seconds = _timed(fn, repeats, synchronize)
            rows_out.append({"operation": name, "backend": backend, "shape": [rows, args.cols],
                             "seconds": float(f"{seconds:.4g}"), "gb_per_s": float(f"{moved / seconds / 1e9:.4g}")})
    where = str(device) + ("" if on_gpu else f", {torch.get_num_threads()} thread(s)")
    print(f"block FP8 kernels, {args.dtype}, {where}")
    print(f"{'operation':32s} {'backend':8s} {'shape':>14s} {'ms':>10s} {'GB/s':>8s}")
    for row in rows_out:
        backend = row["backend"] + ("*" if row["backend"] == "triton" and not on_gpu else "")
        print(f"{row['operation']:32s} {backend:8s} {'x'.join(map(str, row['shape'])):>14s} "
              f"{row['seconds'] * 1e3:10.2f} {row['gb_per_s']:8.4g}")
    if "triton" in backends and not on_gpu:
        print("* Triton's CPU interpreter (numpy): checks the kernels, not their speed")
    print(json.dumps({"device": str(device), "dtype": args.dtype, "threads": torch.get_num_threads(),
                      "rows": rows_out}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
