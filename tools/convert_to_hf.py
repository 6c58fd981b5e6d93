"""megatron-core dist checkpoint (saved under any TP/PP/EP/VPP layout) -> Hugging Face folder.

    python tools/convert_to_hf.py --checkpoint runs/quickstart/checkpoints --out hf_out
    python -c "from transformers import AutoModelForCausalLM as M; M.from_pretrained('hf_out')"   # text model
    python -c "from megatron_mm.conversion.hf_model import load_pretrained; load_pretrained('hf_out')"  # + encoders

--checkpoint is a checkpoints folder (its latest iteration) or one iter_* folder. The model
shape comes from the config stored in the checkpoint (or --config FILE [--set k=v], which
must agree with it). Writes DeepseekV3ForCausalLM safetensors shards + index, config.json,
the tokenizer (the run's sentencepiece model, or --tokenizer PATH / none), megatron_mm.json,
and for a multimodal model encoders.safetensors. Streams: memory holds about one tensor.
Last stdout line: one JSON object (out, tensors, bytes, shards, iteration, layout, seconds,
peak_rss_gib,
rss_after_imports_gib).
"""

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="checkpoints folder or iter_* folder")
    parser.add_argument("--out", required=True, help="output folder (created)")
    parser.add_argument("--config", default=None, help="YAML config (default: the one stored in the checkpoint)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value (with or without --config)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="cast weights (default: as saved)")
    parser.add_argument("--tokenizer", default=None, help="sentencepiece .model, or 'none' (default: the run's)")
    parser.add_argument("--max-shard-gib", type=float, default=5.0, help="safetensors shard size limit")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    args = parser.parse_args(argv)

    import torch

    from megatron_mm.config import ConfigError, load_config
    from megatron_mm.conversion.dcp import ConversionError, DistCheckpointReader
    from megatron_mm.conversion.to_hf import config_of_checkpoint, convert_to_hf

    from megatron_mm.conversion.progress import peak_rss_gib

    start = time.time()
    baseline = peak_rss_gib()  # after imports
    try:
        cfg = None
        if args.config or args.overrides:
            if args.config:
                cfg = load_config(args.config, args.overrides)
            else:  # --set over the stored config
                from megatron_mm.config import Config, _build, _set_dotted, to_dict

                tree = to_dict(config_of_checkpoint(DistCheckpointReader(args.checkpoint)))
                for item in args.overrides:
                    if "=" not in item:
                        raise ConfigError([f"--set {item!r}: expected dotted.key=value"])
                    key, raw = item.split("=", 1)
                    _set_dotted(tree, key.strip(), raw.strip())
                cfg = _build(Config, tree)
        summary = convert_to_hf(args.checkpoint, args.out, cfg,
                                dtype=getattr(torch, DTYPES[args.dtype]) if args.dtype else None,
                                tokenizer=args.tokenizer, max_shard_bytes=int(args.max_shard_gib * 2**30),
                                progress=not args.no_progress)
    except (ConversionError, ConfigError) as err:
        print(f"conversion error: {err}".replace("\n", "\nconversion error: "), file=sys.stderr)
        return 2
    summary["seconds"] = round(time.time() - start, 2)
    summary["peak_rss_gib"] = round(peak_rss_gib(), 3)
    summary["rss_after_imports_gib"] = round(baseline, 3)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
