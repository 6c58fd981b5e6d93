"""Media loader throughput: images/s and audio clips/s of the DALI pipeline and the PyTorch
DataLoader (+ Pillow, numpy/torch log-mel) on the same shards, in one run.

    python tools/benchmark_data.py --shards DIR [--loader dali|torch|both] [--batch 32] [--seconds 20]
    python tools/benchmark_data.py --shards /tmp/bench --make 512 --image-px 256   # fixture shards first

Each loader gets `--workers` CPU threads (DALI) or worker processes (PyTorch); DALI decodes
`--batch` samples a batch (the PyTorch loader hands out single samples). Timing starts after
the first sample (pipeline build, worker start-up) and covers `--seconds` of reading,
epochs repeating as needed. Progress goes to stderr; the last stdout line is a JSON object.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from megatron_mm.runtime.compat import before_megatron_import  # noqa: E402

before_megatron_import()  # its notices hidden, its fused functions compiled when first used

from megatron_mm.data.multimodal.fixture import write_fixture_shards  # noqa: E402
from megatron_mm.data.multimodal.image_spec import ImageSpec  # noqa: E402
from megatron_mm.data.multimodal.samples import MediaSpec  # noqa: E402


def make_loader(kind: str, args: argparse.Namespace):
    common = dict(spec=MediaSpec(ImageSpec(args.image_size), args.mel_frames), cache_dir=args.cache_dir)
    if kind == "dali":
        from megatron_mm.data.multimodal.loader_dali import DaliMediaLoader
        return DaliMediaLoader(args.shards, batch_size=args.batch, num_threads=args.workers, **common)
    from megatron_mm.data.multimodal.loader_torch import TorchMediaLoader
    return TorchMediaLoader(args.shards, num_workers=args.workers, **common)


def measure(kind: str, args: argparse.Namespace) -> dict:
    start = time.perf_counter()
    loader = make_loader(kind, args)
    stream = iter(loader)
    next(stream)
    startup = time.perf_counter() - start
    samples = images = audio = 0
    begin = last_report = time.perf_counter()
    while (now := time.perf_counter()) - begin < args.seconds:
        sample = next(stream)
        samples += 1
        images += sample.image is not None
        audio += sample.mel is not None
        if now - last_report >= 2.0:
            print(f"{kind}: {now - begin:.0f} s, {samples} samples, {images / (now - begin):.0f} images/s",
                  file=sys.stderr, flush=True)
            last_report = now
    seconds = time.perf_counter() - begin
    result = {"images_per_s": round(images / seconds, 1), "audio_per_s": round(audio / seconds, 1),
              "samples_per_s": round(samples / seconds, 1), "samples": samples, "seconds": round(seconds, 2),
              "startup_s": round(startup, 2), "skipped": loader.skipped}
    print(f"{kind}: {json.dumps(result)}", file=sys.stderr, flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", required=True, help="folder (or glob) of WebDataset .tar shards")
    parser.add_argument("--loader", choices=["dali", "torch", "both"], default="both")
    parser.add_argument("--batch", type=int, default=32, help="DALI batch size")
    parser.add_argument("--seconds", type=float, default=20.0, help="timed reading per loader")
    parser.add_argument("--workers", type=int, default=2, help="DALI threads / DataLoader workers")
    parser.add_argument("--image-size", type=int, default=32, help="output S of [3, S, S] images")
    parser.add_argument("--mel-frames", type=int, default=100, help="output F of [80, F] log-mels")
    parser.add_argument("--cache-dir", default="~/.cache/megatron_mm", help="where shard indexes are cached")
    parser.add_argument("--make", type=int, default=0, metavar="N",
                        help="first write N fixture samples into --shards (must hold no .tar)")
    parser.add_argument("--image-px", type=int, default=256, help="fixture image size (with --make)")
    args = parser.parse_args()
    if args.batch < 1 or args.seconds <= 0 or args.workers < 0:
        parser.error(f"--batch={args.batch} must be >= 1, --seconds={args.seconds} > 0, --workers={args.workers} >= 0")
    if args.make:
        if glob.glob(os.path.join(args.shards, "*.tar")):
            parser.error(f"--make: --shards={args.shards} already holds .tar shards")
        paths = write_fixture_shards(args.shards, args.make, samples_per_shard=128, image_px=args.image_px)
        print(f"wrote {args.make} fixture samples in {len(paths)} shards to {args.shards}", file=sys.stderr)
    kinds = ["dali", "torch"] if args.loader == "both" else [args.loader]
    report = {"shards": args.shards, "batch": args.batch, "workers": args.workers,
              "image_size": args.image_size, "mel_frames": args.mel_frames}
    for kind in kinds:
        report[kind] = measure(kind, args)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
