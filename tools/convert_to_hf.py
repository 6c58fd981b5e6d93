"""megatron-core dist checkpoint (saved under any TP/PP/EP/VPP layout) -> Hugging Face folder.

    python tools/convert_to_hf.py --checkpoint runs/quickstart/checkpoints --out hf_out
    python -c "from transformers import AutoModelForCausalLM as M; M.from_pretrained('hf_out')"   # text model
    python -c "from megatron_mm.conversion.hf_model import load_pretrained; load_pretrained('hf_out')"  # + encoders

--checkpoint is a checkpoints folder (its latest iteration) or one iter_* folder. The model
shape comes from the config stored in the checkpoint (or --config FILE [--set k=v], which
must agree with it). Writes DeepseekV3ForCausalLM (DeepseekV2ForCausalLM for a softmax router)
safetensors shards + index, config.json,
the tokenizer (the run's sentencepiece model, or --tokenizer PATH / none), megatron_mm.json,
and for a multimodal model encoders.safetensors. Streams: memory holds about one tensor.
--fp8-blockwise writes DeepSeek-V3's FP8 release format (python tools/convert_to_hf.py
--checkpoint CKPT --out hf_fp8 --dtype bf16 --fp8-blockwise); convert_from_hf reads it back.
Last stdout line: one JSON object (out, tensors, bytes, shards, iteration, layout, seconds,
peak_rss_gib,
rss_after_imports_gib).
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_mm.conversion.cli import DTYPES, run_conversion, torch_dtype  # noqa: E402


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
    parser.add_argument("--fp8-blockwise", action="store_true",
                        help="DeepSeek-V3's FP8 release format: attention and MLP projections as float8_e4m3fn with "
                             "a float32 weight_scale_inv per 128x128 block (the rest in --dtype)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    args = parser.parse_args(argv)

    from megatron_mm.config import config_from_tree, load_config, to_dict
    from megatron_mm.conversion.dcp import DistCheckpointReader
    from megatron_mm.conversion.to_hf import config_of_checkpoint, convert_to_hf

    def convert() -> dict:
        cfg = None
        if args.config:
            cfg = load_config(args.config, args.overrides)
        elif args.overrides:  # --set over the stored config
            cfg = config_from_tree(to_dict(config_of_checkpoint(DistCheckpointReader(args.checkpoint))), args.overrides)
        return convert_to_hf(args.checkpoint, args.out, cfg, dtype=torch_dtype(args.dtype), tokenizer=args.tokenizer,
                             max_shard_bytes=int(args.max_shard_gib * 2**30), progress=not args.no_progress,
                             fp8_blockwise=args.fp8_blockwise)

    return run_conversion(convert)


if __name__ == "__main__":
    sys.exit(main())
