"""Load a converted folder: the language model with `transformers`, the encoders in plain torch.

    from megatron_mm.conversion.hf_model import load_pretrained
    model = load_pretrained("hf_out")            # one call; CPU, fp32 unless dtype= is given
    out = model(input_ids, images=images, mels=mels)      # .logits [b, s, vocab]
    model.language_model                          # transformers DeepseekV3ForCausalLM (or DeepseekV2ForCausalLM)
    model.tokenizer                               # transformers tokenizer (AutoTokenizer)
    model.mtp                                     # transformers MtpModel (MTP weights), or None

A text-only folder is also a plain Hugging Face checkpoint:
`AutoModelForCausalLM.from_pretrained("hf_out")` loads the same language model (it reports the
MTP weights, kept at `model.layers.{num_hidden_layers + k}` as in DeepSeek-V3's release, as
unexpected keys; transformers' own ignore rule names layer 61, DeepSeek-V3's depth).

The encoders are transformers' own: the vision tower a `SiglipVisionModel` / `CLIPVisionModel`
loaded from `vision_encoder/`, the audio encoder a `WhisperEncoder` from `audio_encoder/` (our
encoders are those architectures: models/encoders.py). Only the projectors (and the resampler),
which transformers has no class for, are small torch modules here, read from
`encoders.safetensors` under their megatron names.
"""

from __future__ import annotations

import json
import os
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from megatron_mm.config import AudioConfig, VisionConfig, _build
from megatron_mm.conversion.mapping import family_of_hf, mtp_layers_in
from megatron_mm.conversion.safetensors_io import HFFolderReader, ShardReader
from megatron_mm.conversion.to_hf import OURS_FILE


def _heads(x: torch.Tensor, n: int) -> torch.Tensor:  # [b, t, n*d] -> [b, n, t, d]
    return x.view(x.shape[0], x.shape[1], n, -1).transpose(1, 2)


class _Projector(nn.Module):
    def __init__(self, i: int, o: int):
        super().__init__()
        self.linear_fc1, self.linear_fc2 = nn.Linear(i, o), nn.Linear(o, o)

    def forward(self, x):
        return self.linear_fc2(F.gelu(self.linear_fc1(x)))


class _CrossAttention(nn.Module):
    """megatron CrossAttention with our spec: q from the queries, fused kv (per head [k; v])
    from the features, no mask, biases."""

    def __init__(self, h: int, heads: int):
        super().__init__()
        self.heads = heads
        self.linear_q, self.linear_kv, self.linear_proj = nn.Linear(h, h), nn.Linear(h, 2 * h), nn.Linear(h, h)

    def forward(self, queries, features):  # [b, q, h], [b, t, h] -> [b, q, h]
        b, t, h = features.shape
        q = _heads(self.linear_q(queries), self.heads)
        kv = self.linear_kv(features).view(b, t, self.heads, 2, h // self.heads)
        k, v = kv[:, :, :, 0].transpose(1, 2), kv[:, :, :, 1].transpose(1, 2)
        return self.linear_proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, -1, h))


class _Resampler(nn.Module):
    def __init__(self, h: int, heads: int, num_queries: int, eps: float):
        super().__init__()
        self.queries = nn.Parameter(torch.zeros(num_queries, h))
        self.norm = nn.LayerNorm(h, eps=eps)
        self.attention = _CrossAttention(h, heads)

    def forward(self, x):  # [b, t, h] -> [b, q, h]
        queries = self.queries.unsqueeze(0).expand(x.shape[0], -1, -1)
        return queries + self.attention(queries, self.norm(x))


class VisionEncoder(nn.Module):
    """transformers' `SiglipVisionModel` / `CLIPVisionModel` (`tower`) at the configured layer
    (`hidden_states[feature_layer]`, or `last_hidden_state` with `post_layernorm`; CLIP's class
    token dropped unless kept) → optional resampler → our MLP projector. [n, 3, S, S] -> [n, tokens, llm_h]."""

    def __init__(self, tower: nn.Module, cfg: VisionConfig, llm_hidden: int):
        super().__init__()
        self.tower, self.cfg = tower, cfg
        self.resampler = (_Resampler(cfg.hidden_size, cfg.num_attention_heads, cfg.resampler_tokens, cfg.layer_norm_eps)
                          if cfg.projector == "resampler" else None)
        self.projector = _Projector(cfg.hidden_size, llm_hidden)

    def features(self, images):
        out = self.tower(images, output_hidden_states=True)
        x = out.last_hidden_state if self.cfg.post_layernorm else out.hidden_states[self.cfg.feature_layer]
        return x[:, 1:] if self.cfg.arch == "clip" and not self.cfg.keep_class_token else x

    def forward(self, images):
        x = self.features(images)
        if self.resampler is not None:
            x = self.resampler(x)
        return self.projector(x)


class AudioEncoder(nn.Module):
    """transformers' `WhisperEncoder` (`encoder`) → average pooling → our MLP projector.
    [n, mels, frames] -> [n, tokens, llm_h]."""

    def __init__(self, encoder: nn.Module, cfg: AudioConfig, llm_hidden: int):
        super().__init__()
        self.encoder, self.pool = encoder, cfg.pool
        self.projector = _Projector(cfg.hidden_size, llm_hidden)

    def forward(self, mels):
        x = self.encoder(mels).last_hidden_state
        x = F.avg_pool1d(x.transpose(1, 2), self.pool, self.pool).transpose(1, 2)
        return self.projector(x)


def _load_projectors(module: nn.Module, get, prefix: str, skip: str) -> None:
    """The projector (and resampler) tensors, kept under their megatron names."""
    with torch.no_grad():
        for name, param in module.named_parameters():
            if not name.startswith(skip):
                param.copy_(get(prefix + name))


def _load_encoder(folder: str, ours: dict, kind: str, llm_hidden: int, dtype: torch.dtype, projectors):
    import transformers

    path = os.path.join(folder, ours["encoder_folders"][kind])
    if kind == "vision":
        cfg = _build(VisionConfig, ours["model"]["vision"], "model.vision")
        cls = {"siglip": transformers.SiglipVisionModel, "clip": transformers.CLIPVisionModel}[cfg.arch]
        module = VisionEncoder(cls.from_pretrained(path, dtype=torch.float32), cfg, llm_hidden)
        skip = "tower."
    else:
        from transformers.models.whisper.modeling_whisper import WhisperEncoder

        cfg = _build(AudioConfig, ours["model"]["audio"], "model.audio")
        module = AudioEncoder(WhisperEncoder.from_pretrained(path, dtype=torch.float32), cfg, llm_hidden)
        skip = "encoder."
    _load_projectors(module, projectors.read, f"{kind}.", skip)
    return module.to(dtype).eval()


class MultimodalCausalLM(nn.Module):
    """The converted model: `language_model` (transformers DeepseekV3ForCausalLM) with our
    encoders writing their outputs over the `<image>`/`<audio>` placeholder tokens, as
    megatron_mm's MultimodalGPTModel does (batch-major, then sequence order)."""

    def __init__(self, language_model, vision=None, audio=None, placeholder_ids=None, tokenizer=None, mtp=None):
        super().__init__()
        self.language_model, self.vision, self.audio = language_model, vision, audio
        self.placeholder_ids = dict(placeholder_ids or {})
        self.tokenizer, self.mtp = tokenizer, mtp

    def embed(self, input_ids, images=None, mels=None) -> torch.Tensor:
        embeddings = self.language_model.get_input_embeddings()(input_ids)
        for kind, encoder, media in (("image", self.vision, images), ("audio", self.audio, mels)):
            if encoder is None:
                continue
            slots = input_ids == self.placeholder_ids[kind]
            if media is None or media.shape[0] == 0:
                if slots.any():
                    raise ValueError(f"{int(slots.sum())} {kind} placeholder tokens but no {kind} input")
                continue
            features = encoder(media.to(embeddings.dtype))  # [n, t, h]
            if features.shape[0] * features.shape[1] != int(slots.sum()):
                raise ValueError(f"{kind}: {features.shape[0]} input(s) x {features.shape[1]} tokens do not fill "
                                 f"the {int(slots.sum())} placeholder tokens")
            embeddings = embeddings.masked_scatter(slots.unsqueeze(-1), features.reshape(-1, features.shape[-1]))
        return embeddings

    def forward(self, input_ids, images=None, mels=None, **kwargs):
        return self.language_model(inputs_embeds=self.embed(input_ids, images, mels), **kwargs)

    @torch.no_grad()
    def mtp_logits(self, input_ids, images=None, mels=None) -> list[torch.Tensor]:
        """Logits of each MTP depth k at every position t (predicting token t+2+k), as megatron
        computes them in training: depth k combines the previous depth's hidden state at t
        with the embedding of token t+1+k. Positions whose shifted token falls off the end
        are left out: depth k gives s-1-k positions."""
        if self.mtp is None:
            return []
        out = self.language_model(inputs_embeds=self.embed(input_ids, images, mels), output_hidden_states=True)
        hidden = out.hidden_states[-1]  # after the final norm, as megatron feeds its MTP
        s = input_ids.shape[1]
        positions = torch.arange(s, device=input_ids.device).unsqueeze(0).expand_as(input_ids)
        logits = []
        for k in range(len(self.mtp.layers)):
            shifted = input_ids[:, 1 + k:]
            hidden = hidden[:, : shifted.shape[1]]
            hidden = self.mtp.forward_layer(k, hidden, positions[:, : shifted.shape[1]], None, input_ids=shifted)
            logits.append(self.mtp._project_to_logits(hidden))
        return logits


def _language_model_class(config: dict, mtp_layers: int):
    """The transformers class of the folder's family; for DeepseekV3 with MTP weights, told that
    `model.layers.{L..L+k}` are MTP weights (to skip when loading the main model, and for
    transformers' MtpModel to find)."""
    import transformers

    cls = getattr(transformers, family_of_hf(config).architecture)
    patterns = [rf"model\.layers\.{config['num_hidden_layers'] + k}\..*" for k in range(mtp_layers)]
    if not patterns:
        return cls
    return type(cls.__name__, (cls,), {
        "_keys_to_ignore_on_load_unexpected": list(cls._keys_to_ignore_on_load_unexpected or []) + patterns,
        "__module__": cls.__module__})


def load_pretrained(folder: str, dtype: torch.dtype = torch.float32, load_mtp: bool = True,
                    attn_implementation: Optional[str] = None,
                    experts_implementation: Optional[str] = None) -> MultimodalCausalLM:
    """Everything in a folder written by tools/convert_to_hf.py, ready for `model(input_ids, ...)`.
    `attn_implementation` / `experts_implementation` choose transformers' kernels ("eager": the
    plain loops; its default grouped_mm experts need rows of a multiple of 16 bytes on CPU)."""
    from transformers import AutoTokenizer

    config = json.load(open(os.path.join(folder, "config.json")))
    # MTP layers: those the weights hold (transformers' DeepseekV3Config says 1 and writes none)
    mtp_layers = mtp_layers_in(HFFolderReader(folder).keys(), config["num_hidden_layers"])
    kwargs = {"dtype": dtype}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if experts_implementation:
        kwargs["experts_implementation"] = experts_implementation
    lm = _language_model_class(config, mtp_layers).from_pretrained(folder, **kwargs).eval()
    mtp = None
    if load_mtp and mtp_layers:
        from transformers.modeling_layers import MtpModel

        mtp = MtpModel.from_pretrained(lm).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder) if os.path.exists(os.path.join(folder, "tokenizer_config.json")) else None
    ours_path = os.path.join(folder, OURS_FILE)
    ours = json.load(open(ours_path)) if os.path.exists(ours_path) else {}
    vision = audio = None
    if ours.get("encoder_folders"):
        projectors = ShardReader(os.path.join(folder, ours["encoders_file"]))
        hidden = ours["model"]["hidden_size"]
        if "vision" in ours["encoder_folders"]:
            vision = _load_encoder(folder, ours, "vision", hidden, dtype, projectors)
        if "audio" in ours["encoder_folders"]:
            audio = _load_encoder(folder, ours, "audio", hidden, dtype, projectors)
    return MultimodalCausalLM(lm, vision, audio, ours.get("placeholder_ids"), tokenizer, mtp).eval()
