"""Check a conversion: the megatron model (built on one rank, loaded from the checkpoint under
whatever layout saved it) and the converted Hugging Face model give the same logits (and MTP
logits) on the same tokens, fp32 on CPU.

Runs megatron on a one-rank gloo process group, so call it in a process of its own
(tools/verify_hf.py does).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from megatron_mm.config import Config, ParallelConfig
from megatron_mm.conversion.hf_model import load_pretrained
from megatron_mm.models.attention_mask import one_sample_rows_mask


def sample_inputs(cfg: Config, placeholder_ids: dict, batch: int = 2, seed: int = 0):
    """Random tokens (ids above the special pieces) with, for a multimodal model, one image and
    one audio placeholder run per sample, and random media."""
    m = cfg.model
    g = torch.Generator().manual_seed(seed)
    seq = min(m.seq_length, 48)
    tokens = torch.randint(16, m.vocab_size, (batch, seq), generator=g)
    images = mels = None
    at = 2
    if m.vision is not None and "image" in placeholder_ids:
        n = m.vision.num_tokens
        tokens[:, at:at + n] = placeholder_ids["image"]
        at += n + 2
        images = torch.randn(batch, 3, m.vision.image_size, m.vision.image_size, generator=g)
    if m.audio is not None and "audio" in placeholder_ids:
        n = m.audio.num_tokens
        tokens[:, at:at + n] = placeholder_ids["audio"]
        mels = torch.randn(batch, m.audio.num_mel_bins, m.audio.max_frames, generator=g)
    if at + (m.audio.num_tokens if mels is not None else 0) > seq:
        raise ValueError("sequence too short for the media placeholders")
    return tokens, images, mels


class MegatronReference:
    """The megatron model of `cfg` on one rank (gloo), loadable from any checkpoint of it."""

    def __init__(self, cfg: Config, placeholder_ids: Optional[dict] = None):
        from megatron_mm.models.gpt import build_model_chunks, transformer_config
        from megatron_mm.runtime import compat
        from megatron_mm.runtime import distributed as runtime

        self.cfg = dataclasses.replace(cfg, parallel=ParallelConfig())
        self.runtime = runtime
        env = runtime.dist_env({})
        hardware = runtime.detect_hardware()
        runtime.init_distributed(env, hardware)
        runtime.init_model_parallel(self.cfg.parallel)
        compat.apply(hardware)
        compat.seed_everything(0)
        tc = transformer_config(self.cfg, compat.transformer_config_overrides(hardware))
        self.chunk = build_model_chunks(self.cfg, tc, False, placeholder_ids)[0].eval()
        self.captured = {}
        self.chunk.decoder.register_forward_hook(lambda mod, args, out: self.captured.__setitem__("decoder", out))
        if getattr(self.chunk, "mtp", None) is not None:
            self.chunk.mtp.register_forward_hook(lambda mod, args, out: self.captured.__setitem__("mtp", out))

    def load(self, checkpoint_path: str) -> int:
        from megatron_mm.training import checkpoint

        iteration, _, _ = checkpoint.load(checkpoint_path, [self.chunk], None, None, self.cfg)
        return iteration

    @torch.no_grad()
    def logits(self, tokens, images=None, mels=None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Main logits [b, s, V] and each MTP depth's logits [b, s-1-k, V]."""
        b, s = tokens.shape
        positions = torch.arange(s).unsqueeze(0).expand(b, s)
        media = {k: v for k, v in (("images", images), ("mels", mels)) if v is not None}
        self.captured.clear()
        # labels make megatron run its MTP block (it needs them); the output is a loss we drop
        attention_mask = one_sample_rows_mask(self.cfg.masks_documents, tokens)
        self.chunk(tokens, positions, attention_mask, labels=tokens, loss_mask=torch.ones_like(tokens, dtype=torch.float),
                   **media)
        head = self.chunk.output_layer
        weight = self.chunk.shared_embedding_or_output_weight() if self.chunk.share_embeddings_and_output_weights else None
        hidden = self.captured["decoder"]
        main = head(hidden[:s] if "mtp" not in self.captured else self.captured["mtp"][:s], weight=weight)[0]
        depths = []
        mtp_layers = self.cfg.model.mtp_num_layers
        for k in range(mtp_layers):
            h = self.captured["mtp"][(k + 1) * s:(k + 2) * s]
            depths.append(head(h, weight=weight)[0].transpose(0, 1)[:, : s - 1 - k])
        return main.transpose(0, 1), depths

    def close(self) -> None:
        self.runtime.shutdown()


def compare(pairs: list[tuple[str, str]], batch: int = 2, seed: int = 0) -> list[dict]:
    """For each (megatron checkpoint, converted HF folder): max |logit difference| of the main
    head and of each MTP depth, on the same random tokens (and media)."""
    from megatron_mm.conversion.dcp import DistCheckpointReader
    from megatron_mm.conversion.mapping import compare_model_configs
    from megatron_mm.conversion.to_hf import config_of_checkpoint

    results = []
    reference = None
    for checkpoint_path, hf_folder in pairs:
        cfg = config_of_checkpoint(DistCheckpointReader(checkpoint_path))
        hf = load_pretrained(hf_folder, dtype=torch.float32, attn_implementation="eager")
        if reference is None:
            reference = MegatronReference(cfg, hf.placeholder_ids)
        else:  # one megatron model serves every pair: their configs must agree on the numerics
            compare_model_configs(cfg.model, reference.cfg.model, checkpoint_path, pairs[0][0])
            for kind in ("vision", "audio"):
                if dataclasses.asdict(cfg.model).get(kind) != dataclasses.asdict(reference.cfg.model).get(kind):
                    raise ValueError(f"compare: {checkpoint_path} has another model.{kind} than {pairs[0][0]}")
        reference.load(checkpoint_path)
        tokens, images, mels = sample_inputs(cfg, hf.placeholder_ids, batch, seed)
        want, want_mtp = reference.logits(tokens, images, mels)
        with torch.no_grad():
            got = hf(tokens, images=images, mels=mels).logits
            got_mtp = hf.mtp_logits(tokens, images, mels)
        row = {"checkpoint": checkpoint_path, "hf": hf_folder, "logits_max_abs_diff": float((got - want).abs().max()),
               "logits_max_abs": float(want.abs().max())}
        for k, (a, b) in enumerate(zip(got_mtp, want_mtp, strict=True)):
            row[f"mtp_{k + 1}_max_abs_diff"] = float((a - b).abs().max())
        for kind, media in (("vision", images), ("audio", mels)):
            if media is not None:  # the encoders alone: [n, tokens, llm_hidden] both sides
                with torch.no_grad():
                    want_enc = getattr(reference.chunk, kind)(media).transpose(0, 1)
                    got_enc = getattr(hf, kind)(media)
                row[f"{kind}_max_abs_diff"] = float((got_enc - want_enc).abs().max())
                row[f"{kind}_max_abs"] = float(want_enc.abs().max())
        results.append(row)
    if reference is not None:
        reference.close()
    return results
