"""Hugging Face DeepseekV3 or DeepseekV2 (V2-Lite) folder, with optionally a SigLIP / CLIP vision
encoder and a Whisper encoder -> megatron-core dist checkpoint that launch/pretrain.py resumes
from (`--set checkpoint.load=OUT`) under any layout.

    python tools/convert_from_hf.py --hf hf_out --out ckpt_from_hf [--tp 2 --pp 2 --ep 2] [--mtp-layers 1]
    python tools/convert_from_hf.py --hf LM_DIR --vision SIGLIP_DIR --audio WHISPER_DIR --out CKPT
    python launch/pretrain.py --config configs/quickstart_text.yaml --set checkpoint.load=ckpt_from_hf

--vision takes a SiglipVisionModel / CLIPVisionModel folder or a dual-tower SiglipModel /
CLIPModel folder (its vision tower); --audio a Whisper folder (its encoder). Their shapes come
from their config.json; which layer feeds the projector and whether CLIP's class token is kept
from --config and --set model.vision.KEY=VALUE (model.vision.feature_layer,
model.vision.keep_class_token; LLaVA with CLIP: -2 and false); their projectors are freshly
initialised from --seed (default train.seed).

The model shape comes from config.json (a folder written by convert_to_hf also brings our
training settings and encoders); the MTP depth from the weights: a folder without MTP tensors
(transformers' save_pretrained, fine-tunes) imports without MTP and says so in one line;
--mtp-layers N then adds N freshly initialised MTP modules for training (drawn with --seed S,
default the stored config's train.seed), and --mtp-layers 0 leaves a folder's MTP layers out.
--tp/--pp/--ep/--etp/--vpp choose the layout whose ranks'
chunks the checkpoint is written as (default one rank); megatron reshards on load, so any
layout resumes from it. --config FILE [--set k=v] gives the rest of the stored config and
must agree with config.json on the model. Streams: memory holds about one tensor.
An FP8 block-scaled folder (DeepSeek-V3's release format, `quantization_config` fp8) is read
dequantized: each FP8 weight becomes code * scale per 128x128 block, in --dtype (default: the
dtype of the folder's unquantized weights, bf16 for the release).
Last stdout line: one JSON object (out, iteration, tensors, files, layout, family, mtp_layers,
mtp_initialised, seconds, peak_rss_gib, rss_after_imports_gib).
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_mm.conversion.cli import DTYPES, run_conversion, torch_dtype  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hf", required=True, help="Hugging Face model folder")
    parser.add_argument("--vision", default=None, help="SigLIP or CLIP folder (vision-only or dual-tower)")
    parser.add_argument("--audio", default=None, help="Whisper folder (its encoder is taken)")
    parser.add_argument("--out", required=True, help="checkpoints folder to write (iter_N + tracker)")
    for name in ("tp", "pp", "ep", "etp"):
        parser.add_argument(f"--{name}", type=int, default=1, help=f"parallel.{name} of the written layout")
    parser.add_argument("--vpp", type=int, default=None, help="parallel.vpp of the written layout")
    parser.add_argument("--iteration", type=int, default=0, help="iteration number to write (training resumes after it)")
    parser.add_argument("--config", default=None, help="YAML config for the non-model sections")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--mtp-layers", type=int, default=None, metavar="N",
                        help="MTP modules: N fresh ones for a folder without MTP weights, 0 to leave a folder's out "
                             "(default: what the weights hold)")
    parser.add_argument("--seed", type=int, default=None,
                        help="seed of fresh MTP modules and projectors (default: train.seed of the stored config)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="cast weights (default: as stored; FP8 weights: as the unquantized ones)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    from megatron_mm.config import ParallelConfig, load_config
    from megatron_mm.conversion.from_hf import convert_from_hf

    def convert() -> dict:
        imported = tuple(f"model.{kind}." for kind, folder in (("vision", args.vision), ("audio", args.audio)) if folder)
        encoder_overrides = [o for o in args.overrides if imported and o.startswith(imported)]
        overrides = [o for o in args.overrides if o not in encoder_overrides]
        base = load_config(args.config, overrides) if (args.config or overrides) else None
        parallel = ParallelConfig(tp=args.tp, pp=args.pp, ep=args.ep, etp=args.etp, vpp=args.vpp,
                                  sequence_parallel=args.tp > 1)
        return convert_from_hf(args.hf, args.out, parallel, base, dtype=torch_dtype(args.dtype),
                               iteration=args.iteration, progress=not args.no_progress, mtp_layers=args.mtp_layers,
                               seed=args.seed, vision=args.vision, audio=args.audio,
                               encoder_overrides=encoder_overrides)

    return run_conversion(convert)


if __name__ == "__main__":
    sys.exit(main())
