"""Check a conversion: the megatron model (built under a parallel layout, loaded from the
checkpoint whatever layout wrote it) and the converted Hugging Face model give the same logits
(and MTP logits) on the same tokens, fp32 on CPU.

Runs megatron on the process's gloo ranks (one rank, or those torchrun started; a layout such
as `tp2`, `pp2`, `ep2` or `tp2_pp2_ep2` needs as many), so call it in a process of its own
(tools/verify_hf.py does). Rank 0 runs transformers and compares; the last pipeline stage's
first tensor- and data-parallel rank sends it the megatron logits, gathered over TP.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Optional

import torch

from megatron_mm.config import Config, ParallelConfig
from megatron_mm.conversion.hf_model import load_pretrained
from megatron_mm.conversion.to_hf import OURS_FILE
from megatron_mm.models.attention_mask import document_attention_mode, one_sample_rows_mask

_LAYOUT_PART = re.compile(r"(tp|pp|ep|etp)([1-9][0-9]*)$")


def parse_layout(name: str) -> ParallelConfig:
    """`tp1`, `tp2`, `pp2`, `ep2`, `tp2_pp2_ep2`, ... (sizes joined by `_`; sequence parallel under TP)."""
    sizes = {}
    for part in name.split("_"):
        match = _LAYOUT_PART.match(part)
        if match is None:
            raise ValueError(f"layout {name!r}: give tpN, ppN, epN or etpN joined by _ (e.g. tp2_pp2_ep2)")
        sizes[match[1]] = int(match[2])
    tp = sizes.get("tp", 1)
    return ParallelConfig(tp=tp, pp=sizes.get("pp", 1), ep=sizes.get("ep", 1), etp=sizes.get("etp", 1),
                          sequence_parallel=tp > 1)


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
    """The megatron model of `cfg` under `parallel` (default one rank) on this process's gloo
    ranks, loadable from any checkpoint of it."""

    def __init__(self, cfg: Config, placeholder_ids: Optional[dict] = None, parallel: Optional[ParallelConfig] = None):
        from megatron.core import parallel_state

        from megatron_mm.models.gpt import build_model_chunks, transformer_config
        from megatron_mm.runtime import compat
        from megatron_mm.runtime import distributed as runtime

        self.cfg = dataclasses.replace(cfg, parallel=parallel or ParallelConfig())
        self.runtime = runtime
        # torchrun's ranks, or one (the variables of a SLURM allocation around us are not ours)
        env = runtime.dist_env(os.environ if "RANK" in os.environ else {})
        hardware = runtime.detect_hardware()
        runtime.init_distributed(env, hardware)
        if parallel_state.model_parallel_is_initialized():  # an earlier reference's layout
            parallel_state.destroy_model_parallel()
        runtime.init_model_parallel(self.cfg.parallel)
        compat.apply(hardware)
        compat.seed_everything(0)
        tc = transformer_config(self.cfg, compat.transformer_config_overrides(hardware))
        (self.chunk,) = build_model_chunks(self.cfg, tc, False, placeholder_ids)
        self.chunk.eval()
        self.captured = {}
        if self.chunk.post_process:
            self.chunk.decoder.register_forward_hook(lambda mod, args, out: self.captured.__setitem__("decoder", out))
            if getattr(self.chunk, "mtp", None) is not None:
                self.chunk.mtp.register_forward_hook(lambda mod, args, out: self.captured.__setitem__("mtp", out))

    def load(self, checkpoint_path: str) -> int:
        from megatron_mm.training import checkpoint

        iteration, _, _ = checkpoint.load(checkpoint_path, [self.chunk], None, None, self.cfg)
        return iteration

    @property
    def reports(self) -> bool:
        """This rank holds the logits: last pipeline stage, first TP and DP rank."""
        from megatron.core import parallel_state as ps

        return (ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0
                and ps.get_data_parallel_rank() == 0)

    @torch.no_grad()
    def logits(self, tokens, images=None, mels=None) -> Optional[tuple[torch.Tensor, list[torch.Tensor]]]:
        """Main logits [b, s, V] and each MTP depth's logits [b, s-1-k, V], on every rank of the
        last pipeline stage (None elsewhere). All ranks of the layout call it together."""
        from megatron.core.pipeline_parallel import get_forward_backward_func
        from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

        b, s = tokens.shape
        positions = torch.arange(s).unsqueeze(0).expand(b, s)
        media = {k: v for k, v in (("images", images), ("mels", mels)) if v is not None}
        attention_mask = one_sample_rows_mask(document_attention_mode(self.cfg, False), tokens)

        def forward_step(data_iterator, model):
            # labels make megatron run its MTP block (it needs them); the output is a loss we drop
            output = model(tokens, positions, attention_mask, labels=tokens,
                           loss_mask=torch.ones_like(tokens, dtype=torch.float), **media)
            return output, None

        self.captured.clear()
        get_forward_backward_func()(forward_step_func=forward_step, data_iterator=None, model=[self.chunk],
                                    num_microbatches=1, seq_length=s, micro_batch_size=b, forward_only=True)
        if not self.chunk.post_process:
            return None
        head = self.chunk.output_layer
        weight = self.chunk.shared_embedding_or_output_weight() if self.chunk.share_embeddings_and_output_weights else None
        mtp_layers = self.cfg.model.mtp_num_layers
        # with MTP, megatron's MTP block returns [main; depth 1; ...] hidden states (each this
        # rank's sequence slice under sequence parallelism), the main part as the head takes it
        hidden = self.captured["mtp"] if "mtp" in self.captured else self.captured["decoder"]
        part = hidden.shape[0] // (1 + mtp_layers) if "mtp" in self.captured else hidden.shape[0]

        def project(h: torch.Tensor) -> torch.Tensor:  # [s/tp, b, h] -> [b, s, V]
            return gather_from_tensor_model_parallel_region(head(h, weight=weight)[0]).transpose(0, 1)

        main = project(hidden[:part])
        depths = [project(hidden[(k + 1) * part:(k + 2) * part])[:, : s - 1 - k] for k in range(mtp_layers)]
        return main, depths

    def close(self) -> None:
        self.runtime.shutdown()


def _placeholder_ids(hf_folder: str) -> dict:
    path = os.path.join(hf_folder, OURS_FILE)
    return (json.load(open(path)).get("placeholder_ids") or {}) if os.path.exists(path) else {}


def compare(pairs: list[tuple[str, str]], batch: int = 2, seed: int = 0,
            layouts: Optional[list[str]] = None) -> list[dict]:
    """For each (megatron checkpoint, converted HF folder), with the megatron model under
    `layouts[i]` (default `tp1`): max |logit difference| of the main head and of each MTP
    depth, on the same random tokens (and media). Every rank calls it; rank 0 gets the rows
    (the others an empty list)."""
    from megatron_mm.conversion.dcp import DistCheckpointReader
    from megatron_mm.conversion.to_hf import config_of_checkpoint

    layouts = layouts or ["tp1"] * len(pairs)
    if len(layouts) != len(pairs):
        raise ValueError("compare: give one layout per pair")
    results = []
    reference, built = None, None
    hf_models: dict = {}
    for (checkpoint_path, hf_folder), layout in zip(pairs, layouts):
        cfg = config_of_checkpoint(DistCheckpointReader(checkpoint_path))
        placeholder_ids = _placeholder_ids(hf_folder)
        model_key = (json.dumps(dataclasses.asdict(cfg.model), sort_keys=True), layout, json.dumps(placeholder_ids))
        if model_key != built:  # one megatron model serves consecutive pairs of one model and layout
            reference, built = MegatronReference(cfg, placeholder_ids, parse_layout(layout)), model_key
        reference.load(checkpoint_path)
        tokens, images, mels = sample_inputs(cfg, placeholder_ids, batch, seed)
        megatron_logits = reference.logits(tokens, images, mels)
        gathered = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(gathered, megatron_logits if reference.reports else None)
        if torch.distributed.get_rank() != 0:
            continue
        want, want_mtp = next(g for g in gathered if g is not None)
        if hf_folder not in hf_models:
            hf_models[hf_folder] = load_pretrained(hf_folder, dtype=torch.float32, attn_implementation="eager",
                                                  experts_implementation="eager")
        hf = hf_models[hf_folder]
        with torch.no_grad():
            got = hf(tokens, images=images, mels=mels).logits
            got_mtp = hf.mtp_logits(tokens, images, mels)
        row = {"checkpoint": checkpoint_path, "hf": hf_folder, "layout": layout,
               "logits_max_abs_diff": float((got - want).abs().max()), "logits_max_abs": float(want.abs().max())}
        if len(got_mtp) != len(want_mtp):
            raise ValueError(f"compare: {hf_folder} holds {len(got_mtp)} MTP layer(s), {checkpoint_path} "
                             f"{len(want_mtp)}")
        for k, (a, b) in enumerate(zip(got_mtp, want_mtp)):
            row[f"mtp_{k + 1}_max_abs_diff"] = float((a - b).abs().max())
        one_rank = reference.cfg.parallel.tp == reference.cfg.parallel.pp == 1
        for kind, media in (("vision", images), ("audio", mels)):
            if media is not None and one_rank:  # the encoders alone: [n, tokens, llm_hidden] both sides
                with torch.no_grad():
                    want_enc = getattr(reference.chunk, kind)(media).transpose(0, 1)
                    got_enc = getattr(hf, kind)(media)
                row[f"{kind}_max_abs_diff"] = float((got_enc - want_enc).abs().max())
                row[f"{kind}_max_abs"] = float(want_enc.abs().max())
        results.append(row)
    if reference is not None:
        reference.close()
    return results
