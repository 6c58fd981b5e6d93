"""Tiny random-weight Hugging Face folders, so the "start from published models" flow runs
offline: OUT/lm (DeepseekV3ForCausalLM + a byte-level BPE tokenizer), OUT/siglip
(SiglipVisionModel), OUT/clip (CLIPVisionModel), OUT/whisper (WhisperModel), each with its
processor's preprocessor_config.json; the same folders for the same --seed.

    python tools/make_tiny_hf.py --out hf_tiny [--seed 0]

megatron_mm/conversion/tiny_hf.py does the work. Last stdout line: one JSON object
{kind: folder, ..., "seconds"}.
"""

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_mm.runtime.compat import before_megatron_import  # noqa: E402

before_megatron_import()  # the demo captions' module imports megatron-core: its notices hidden


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder to write lm/, siglip/, clip/, whisper/ into")
    parser.add_argument("--seed", type=int, default=0, help="weights seed (kind i uses seed + i)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    from transformers.utils import logging as hf_logging

    from megatron_mm.conversion.tiny_hf import make_tiny_hf

    hf_logging.set_verbosity_error()  # e.g. "requires torchvision ... falling back to the PIL processor"
    hf_logging.disable_progress_bar()

    folders = make_tiny_hf(args.out, args.seed)
    print(json.dumps({**folders, "seconds": round(time.perf_counter() - start, 2)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
