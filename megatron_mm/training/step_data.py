"""What the training loop needs from the data, whichever source: the micro-batches of each
step, the placeholder ids the model replaces, and the position a checkpoint stores.

* Text sources (corpus, indexed, synthetic) are step-addressed: step s's global batch is
  the same samples under every layout, so nothing needs saving.
* Multimodal sources (demo, shards) stream: each data-parallel rank reads its slice of
  the shards through the media loader; a checkpoint stores every rank's stream position.
"""

from __future__ import annotations

from typing import Iterator, Optional

import torch
from megatron.core import parallel_state

from megatron_mm import data as data_lib
from megatron_mm.config import MULTIMODAL_SOURCES, Config, ConfigError
from megatron_mm.data.tokenizer import AUDIO_TOKEN, IMAGE_TOKEN, check_fits, open_tokenizer


def _prepare_once_per_node(env, prepare):
    """Build cached files on each node's local rank 0, then let every rank read them."""
    if env.local_rank == 0:
        prepare()
    torch.distributed.barrier()
    return prepare()


class StepData:
    def __init__(self, cfg: Config, env, device: torch.device, log=print):
        self.cfg, self.device, self.log = cfg, device, log
        self.dp_rank = parallel_state.get_data_parallel_rank()
        self.dp = parallel_state.get_data_parallel_world_size()
        self.multimodal = cfg.data.source in MULTIMODAL_SOURCES
        self.placeholder_ids: dict[str, int] = {}
        self.stream = None
        self._media = [0, 0]  # images and audio clips in this rank's batches of the last step
        if self.multimodal:
            from megatron_mm.data.multimodal.prepare import multimodal_files

            self.shards, tokenizer_path = _prepare_once_per_node(env, lambda: multimodal_files(cfg))
            self.tokenizer = open_tokenizer(tokenizer_path)
            check_fits(self.tokenizer, cfg.model.vocab_size)
            self.placeholder_ids = {"image": self.tokenizer.special_token_id(IMAGE_TOKEN),
                                    "audio": self.tokenizer.special_token_id(AUDIO_TOKEN)}
        else:
            paths = _prepare_once_per_node(env, lambda: data_lib.prepare(cfg))
            self.train_ds, _, _ = data_lib.build_datasets(cfg, *paths)

    def start(self, data_state: dict) -> None:
        """Open the stream where the checkpoint's `data_state` left it (or at the start)."""
        if not self.multimodal:
            return
        positions = data_state.get("positions")
        if positions and len(positions) == self.dp:
            position = positions[self.dp_rank]
        elif positions:  # another data-parallel size: slices differ, restart at the shallowest depth
            position = min(positions)
            self.log(f"data: {len(positions)} stream positions saved for {self.dp} data-parallel ranks; "
                     f"every rank resumes at sample {position} of its new slice")
        else:
            position = 0
        from megatron_mm.data.multimodal.stream import open_stream

        device_id = self.device.index if self.device.type == "cuda" else None
        self.stream = open_stream(self.cfg, self.shards, self.tokenizer, self.dp_rank, self.dp, position,
                                  device_id, log=self.log)

    def iterators(self, step: int, num_microbatches: int, num_chunks: int) -> list[Iterator[dict]]:
        """One iterator over step `step`'s micro-batches per model chunk."""
        t = self.cfg.train
        if not self.multimodal:
            return [data_lib.microbatch_iterator(self.train_ds, step, self.dp_rank, self.dp,
                                                 t.micro_batch_size, t.global_batch_size)
                    for _ in range(num_chunks)]
        batches = [next(self.stream) for _ in range(num_microbatches)]
        self._media = [sum(0 if b[k] is None else b[k].shape[0] for b in batches) for k in ("images", "mels")]
        return [iter(batches) for _ in range(num_chunks)]

    def media_counts(self) -> tuple[int, int]:
        """Images and audio clips in the last step's global batch (0, 0 for text sources).
        Every rank must call it (multimodal sources sum over the data-parallel ranks)."""
        if not self.multimodal:
            return 0, 0
        counts = torch.tensor(self._media, dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(counts, group=parallel_state.get_data_parallel_group())
        return int(counts[0].item()), int(counts[1].item())

    def state(self) -> dict:
        """What a checkpoint keeps (the same on every rank)."""
        if not self.multimodal:
            return {}
        position = torch.tensor([self.stream.position], dtype=torch.int64, device=self.device)
        gathered = [torch.zeros_like(position) for _ in range(self.dp)]
        torch.distributed.all_gather(gathered, position, group=parallel_state.get_data_parallel_group())
        return {"positions": [int(p.item()) for p in gathered]}

    def skipped(self) -> Optional[int]:
        """Samples dropped so far over all data-parallel ranks (unreadable or too long to
        pack); None for text sources. Every rank must call it."""
        if self.stream is None:
            return None
        count = torch.tensor([float(self.stream.skipped)], device=self.device)
        torch.distributed.all_reduce(count, group=parallel_state.get_data_parallel_group())
        return int(count.item())
