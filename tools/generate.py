"""Continue a prompt with a megatron checkpoint of any layout (one process, CPU or one GPU).

    python tools/generate.py --checkpoint runs/quickstart_text/checkpoints --prompt "the cat" --max-new-tokens 16
    python tools/generate.py --checkpoint runs/quickstart/checkpoints --chat --image shape.png \
        --prompt "What shape is this?"

Greedy at --temperature 0 (the default); otherwise sampled from softmax(logits / T) cut to the
top-p nucleus, with --seed (the same seed gives the same text). The model and tokenizer are
the ones the checkpoint's stored config names (--set k=v changes it, e.g. data.tokenizer=PATH).
The prompt is formatted as training formats a caption (--chat: as a user turn, the answer
follows <|assistant|>); --image/--audio files are decoded as training decodes them. Prints the
new text, then one JSON object (iteration, prompt_ids, ids, text) as the last line.
megatron_mm/training/generate.py does the work.
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_mm.runtime.compat import before_megatron_import  # noqa: E402

before_megatron_import()

from megatron_mm.cli import report_errors  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="checkpoints folder (latest iteration) or an iter_* folder")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--image", help="an image file (JPEG/PNG) for a model with a vision encoder")
    parser.add_argument("--audio", help="an audio file (WAV/FLAC) for a model with an audio encoder")
    parser.add_argument("--chat", action="store_true", help="the prompt is a user turn; the answer follows")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a value of the stored config (repeatable)")
    args = parser.parse_args(argv)

    def work() -> None:
        from megatron_mm.training.generate import generate, stored_config

        cfg = stored_config(args.checkpoint, args.overrides)
        result = generate(cfg, args.prompt, args.image, args.audio, args.max_new_tokens, args.temperature,
                          args.top_p, args.seed, args.chat)
        print(result["text"])
        print(json.dumps(result), flush=True)

    return report_errors(work)


if __name__ == "__main__":
    sys.exit(main())
