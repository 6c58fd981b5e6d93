"""Peak memory of HF conversion at a real model's width: writes a random DeepseekV3 folder of the
model config's shape (streamed, bf16 by default) for each layer count asked, converts it HF ->
megatron (written as TP2 x PP2 x EP2 ranks' chunks; PP1 for an odd layer count) and back, each conversion in its own
process, and reports each process's peak resident set size.

    python tools/measure_conversion_memory.py --config configs/models/deepseek_v2_lite_16b.yaml \
        --layers 2 4 8 --work /tmp/convmem [--set model.router_score_function=sigmoid ...]

--fp8: the random folder is in DeepSeek-V3's FP8 release format (projections float8_e4m3fn with
128x128 block scales), imported with --dtype bf16 and exported back with --fp8-blockwise.

The tool converts every shape as a DeepseekV3 folder, with DeepSeek-V3's sigmoid router and
expert bias (the README's numbers were measured so; V2-Lite's own softmax router converts too,
as DeepseekV2, with the same tensors but the expert biases). Folders are deleted after use (--keep to keep them). Last stdout line: one JSON
object with a row per layer count and the peak-RSS growth per layer (least squares).
"""

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from megatron_mm.runtime.compat import before_megatron_import  # noqa: E402

before_megatron_import()  # its notices hidden, its fused functions compiled when first used

V3_ROUTER = ["model.router_score_function=sigmoid", "model.router_pre_softmax=false", "model.router_expert_bias=true",
             "model.aux_loss_coeff=0"]


def write_random_hf(m, folder: str, dtype, seed: int = 0, max_shard_bytes: int = 5 * 2**30,
                    fp8_blockwise: bool = False) -> int:
    """A DeepseekV3 folder of shape `m` with N(0, 0.02) weights, written tensor by tensor
    (`fp8_blockwise`: the release's projections quantized, with their block scales)."""
    import torch

    from megatron_mm.conversion import fp8, mapping
    from megatron_mm.conversion.safetensors_io import ShardWriter, nbytes, write_index

    os.makedirs(folder, exist_ok=True)
    plan = [(name, tuple(shape), torch.float32 if name.endswith("e_score_correction_bias") else dtype)
            for name, shape in mapping.hf_shapes(m).items()]
    if fp8_blockwise:
        plan = fp8.plan_with_scales(plan)
    shards, size = [[]], 0
    for entry in plan:
        if shards[-1] and size + nbytes(entry[1], entry[2]) > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += nbytes(entry[1], entry[2])
    generator = torch.Generator().manual_seed(seed)

    def random_tensors():
        for key, shape in mapping.hf_shapes(m).items():
            if key.endswith("norm.weight"):
                yield key, torch.ones(shape, dtype=dtype)
            elif key.endswith("e_score_correction_bias"):
                yield key, torch.zeros(shape, dtype=torch.float32)
            else:
                yield key, torch.empty(shape, dtype=dtype).normal_(0, 0.02, generator=generator)

    tensors = fp8.quantize_items(random_tensors()) if fp8_blockwise else random_tensors()
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        writer = ShardWriter(os.path.join(folder, name), shard)
        for _ in shard:
            key, tensor = next(tensors)
            writer.write(key, tensor)
            weight_map[key] = name
            del tensor
        writer.close()
    write_index(folder, weight_map, sum(nbytes(s, d) for _, s, d in plan))
    config = mapping.hf_config(m, dtype)
    if fp8_blockwise:
        config["quantization_config"] = fp8.QUANTIZATION_CONFIG
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    return sum(nbytes(s, d) for _, s, d in plan)


def run(args: list[str]) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable] + args, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{args[0]} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="a model (or training) YAML config")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--layers", type=int, nargs="+", required=True, help="layer counts to measure")
    parser.add_argument("--work", required=True, help="scratch folder (needs about 2 x the model's bytes)")
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    parser.add_argument("--fp8", action="store_true", help="the folder in DeepSeek-V3's FP8 block format (see above)")
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args(argv)

    import torch

    from megatron_mm.config import load_config
    from megatron_mm.models.params import estimate_parameters

    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    base = load_config(args.config, V3_ROUTER + args.overrides).model
    tools = os.path.dirname(os.path.abspath(__file__))
    rows = []
    for layers in args.layers:
        m = dataclasses.replace(base, num_layers=layers, first_k_dense_layers=min(base.first_k_dense_layers, layers - 1))
        folder = os.path.join(args.work, f"L{layers}")
        shutil.rmtree(folder, ignore_errors=True)
        start = time.time()
        total = write_random_hf(m, os.path.join(folder, "hf"), dtype, fp8_blockwise=args.fp8)
        made = time.time() - start
        fp8_args = (["--dtype", args.dtype], ["--fp8-blockwise"]) if args.fp8 else ([], [])
        to_mg = run([os.path.join(tools, "convert_from_hf.py"), "--hf", os.path.join(folder, "hf"),
                     "--out", os.path.join(folder, "megatron"), "--tp", "2", "--pp", "2" if layers % 2 == 0 else "1",
                     "--ep", "2",
                     "--no-progress"] + fp8_args[0])
        shutil.rmtree(os.path.join(folder, "hf"))
        to_hf = run([os.path.join(tools, "convert_to_hf.py"), "--checkpoint", os.path.join(folder, "megatron"),
                     "--out", os.path.join(folder, "hf_back"), "--tokenizer", "none", "--no-progress"] + fp8_args[1])
        largest = max(v for k, v in estimate_parameters(m).items() if k in ("embedding", "output_layer"))
        rows.append({"layers": layers, "parameters": estimate_parameters(m)["total"], "bytes": total,
                     "write_random_s": round(made, 1),
                     "from_hf_peak_rss_gib": to_mg["peak_rss_gib"], "from_hf_after_imports_gib": to_mg["rss_after_imports_gib"],
                     "from_hf_s": to_mg["seconds"],
                     "to_hf_peak_rss_gib": to_hf["peak_rss_gib"], "to_hf_after_imports_gib": to_hf["rss_after_imports_gib"],
                     "to_hf_s": to_hf["seconds"], "largest_tensor_gib": round(largest * dtype.itemsize / 2**30, 3)})
        print(json.dumps(rows[-1]), flush=True)
        if not args.keep:
            shutil.rmtree(folder)

    def slope(key):
        if len(rows) < 2:
            return None
        xs, ys = [r["layers"] for r in rows], [r[key] for r in rows]
        mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
        return round(sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs), 4)

    full = dataclasses.replace(base)
    print(json.dumps({"config": args.config, "dtype": args.dtype, "fp8_blockwise": args.fp8, "rows": rows,
                      "from_hf_gib_per_layer": slope("from_hf_peak_rss_gib"),
                      "to_hf_gib_per_layer": slope("to_hf_peak_rss_gib"),
                      "full_model_layers": full.num_layers, "full_model_parameters": estimate_parameters(full)["total"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
