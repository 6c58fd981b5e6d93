"""The multimodal model: megatron-core's GPTModel with vision and audio encoders on the
first pipeline stage.

`MultimodalGPTModel` is a `GPTModel` (so every language-model parameter keeps the name and
dist-checkpoint key it has in the text-only model, and a text checkpoint loads into it)
plus, on the chunk that owns the embedding (pipeline stage 0, first virtual stage), one
encoder per modality. Later stages build no encoder.

On stage 0 the forward pass embeds the tokens, runs each encoder on its media, writes the
encoder outputs over that modality's placeholder tokens (batch-major, then in sequence
order: the order the data side lays the media out in), scatters the sequence over the
tensor-parallel ranks when sequence parallelism is on, and hands the result to GPTModel
as `decoder_input`. Everything after that is GPTModel's: decoder, MTP, loss.
"""

from __future__ import annotations

from typing import Optional

import torch
from megatron.core import tensor_parallel
from megatron.core.models.gpt import GPTModel


class MultimodalGPTModel(GPTModel):
    """GPTModel + `encoders` ({"image": module, "audio": module}, modules mapping a media
    batch to [tokens, n, hidden]) whose outputs replace `placeholder_ids[kind]` tokens."""

    def __init__(self, *args, encoders: dict[str, torch.nn.Module], placeholder_ids: dict[str, int], **kwargs):
        super().__init__(*args, scatter_embedding_sequence_parallel=False, **kwargs)
        if encoders and not self.pre_process:
            raise ValueError("encoders belong on the chunk that embeds the tokens (pipeline stage 0)")
        missing = sorted(set(encoders) - set(placeholder_ids))
        if missing:
            raise ValueError(f"no placeholder token id for {missing}")
        # Attribute names are the checkpoint prefixes: `vision.*`, `audio.*`.
        self.vision = encoders.get("image")
        self.audio = encoders.get("audio")
        self.placeholder_ids = dict(placeholder_ids)

    def forward(self, input_ids, position_ids, attention_mask, labels=None, loss_mask=None,
                images: Optional[torch.Tensor] = None, mels: Optional[torch.Tensor] = None,
                packed_seq_params=None):
        decoder_input = None
        if self.pre_process:
            embeddings = self.embedding(input_ids=input_ids, position_ids=position_ids)  # [s, b, h]
            for kind, encoder, media in (("image", self.vision, images), ("audio", self.audio, mels)):
                if encoder is not None:
                    embeddings = self._insert(embeddings, input_ids, kind, encoder, media)
            if self.config.sequence_parallel:
                embeddings = tensor_parallel.scatter_to_sequence_parallel_region(embeddings)
            decoder_input = embeddings
        return super().forward(
            input_ids, position_ids, attention_mask, decoder_input=decoder_input, labels=labels,
            loss_mask=loss_mask, packed_seq_params=packed_seq_params,
        )

    def _insert(self, embeddings, input_ids, kind: str, encoder, media) -> torch.Tensor:
        slots = (input_ids == self.placeholder_ids[kind])  # [b, s]
        num_slots = int(slots.sum())
        if media is None or media.shape[0] == 0:
            if num_slots:
                raise ValueError(f"{num_slots} {kind} placeholder tokens in the batch but no {kind} input")
            return embeddings
        dtype = next(encoder.parameters()).dtype  # bf16 runs: Float16Module casts positional inputs only
        features = encoder(media.to(dtype))  # [t, n, h]
        if features.shape[0] * features.shape[1] != num_slots:
            raise ValueError(
                f"{kind}: {features.shape[1]} input(s) x {features.shape[0]} tokens do not fill the "
                f"{num_slots} placeholder tokens of the batch"
            )
        flat = features.transpose(0, 1).reshape(-1, features.shape[-1]).to(embeddings.dtype)
        batch_major = embeddings.transpose(0, 1)  # [b, s, h]
        batch_major = batch_major.masked_scatter(slots.unsqueeze(-1), flat)
        return batch_major.transpose(0, 1).contiguous()


def freeze(model: MultimodalGPTModel, parts) -> list[str]:
    """Stop gradients for the parts `parts` (a FreezeConfig) names; return their prefixes.
    Must run before megatron's DDP wraps the model (it only tracks trainable parameters)."""
    frozen = []
    for name, param in model.named_parameters():
        top = name.split(".")[0]
        if top in ("vision", "audio"):
            is_projector = ".projector." in f".{name}" or ".resampler." in f".{name}"
            hit = parts.projectors if is_projector else (
                parts.vision_encoder if top == "vision" else parts.audio_encoder)
        else:
            hit = parts.language_model
        if hit:
            param.requires_grad_(False)
            frozen.append(name)
    return frozen
