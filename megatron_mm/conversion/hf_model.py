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

Why the encoders are not SigLIP / Whisper checkpoints: our ViT and audio encoder are megatron-core
`TransformerBlock`s whose norms are RMSNorm (no mean subtraction, no bias), while
`SiglipVisionModel` and `WhisperEncoder` use LayerNorm with bias; SigLIP's MLP uses tanh-GELU
(ours exact GELU); Whisper's key projection has no bias (ours has); our ViT has no CLS token or
pooling head. Loading our weights into those classes would run and compute something else, so
`encoders.safetensors` keeps the megatron names and this module has the two encoders
(`VisionEncoder`, `AudioEncoder`) as small torch modules checked against megatron's outputs.
"""

from __future__ import annotations

import json
import math
import os
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from megatron_mm.config import AudioConfig, VisionConfig, _build
from megatron_mm.conversion.mapping import family_of_hf, mtp_layers_in
from megatron_mm.conversion.safetensors_io import HFFolderReader, ShardReader
from megatron_mm.conversion.to_hf import OURS_FILE


class _RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x):
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def _heads(x: torch.Tensor, n: int) -> torch.Tensor:  # [b, t, n*d] -> [b, n, t, d]
    return x.view(x.shape[0], x.shape[1], n, -1).transpose(1, 2)


class _EncoderLayer(nn.Module):
    """megatron TransformerLayer with our encoder spec: pre-RMSNorm, fused QKV (per head
    [q; k; v]), no mask, biases, GELU MLP."""

    def __init__(self, h: int, heads: int, ffn: int, eps: float):
        super().__init__()
        self.heads = heads
        self.input_layernorm, self.pre_mlp_layernorm = _RMSNorm(h, eps), _RMSNorm(h, eps)
        self.linear_qkv, self.linear_proj = nn.Linear(h, 3 * h), nn.Linear(h, h)
        self.linear_fc1, self.linear_fc2 = nn.Linear(h, ffn), nn.Linear(ffn, h)

    def forward(self, x):  # [b, t, h]
        b, t, h = x.shape
        qkv = self.linear_qkv(self.input_layernorm(x)).view(b, t, self.heads, 3, h // self.heads)
        q, k, v = (qkv[:, :, :, i].transpose(1, 2) for i in range(3))
        attn = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, h)
        x = x + self.linear_proj(attn)
        return x + self.linear_fc2(F.gelu(self.linear_fc1(self.pre_mlp_layernorm(x))))


class _Encoder(nn.Module):
    def __init__(self, cfg, eps: float):
        super().__init__()
        self.layers = nn.ModuleList(_EncoderLayer(cfg.hidden_size, cfg.num_attention_heads, cfg.ffn_hidden_size, eps)
                                    for _ in range(cfg.num_layers))
        self.final_layernorm = _RMSNorm(cfg.hidden_size, eps)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return self.final_layernorm(x)

    def load_stacked(self, get, prefix: str) -> None:
        """megatron stacks an encoder block's layers: `{prefix}layers.X` is [L, ...]."""
        names = {"input_layernorm.weight": "input_layernorm.weight", "pre_mlp_layernorm.weight": "pre_mlp_layernorm.weight",
                 "self_attention.linear_qkv.weight": "linear_qkv.weight", "self_attention.linear_qkv.bias": "linear_qkv.bias",
                 "self_attention.linear_proj.weight": "linear_proj.weight", "self_attention.linear_proj.bias": "linear_proj.bias",
                 "mlp.linear_fc1.weight": "linear_fc1.weight", "mlp.linear_fc1.bias": "linear_fc1.bias",
                 "mlp.linear_fc2.weight": "linear_fc2.weight", "mlp.linear_fc2.bias": "linear_fc2.bias"}
        with torch.no_grad():
            for ours, local in names.items():
                stacked = get(f"{prefix}layers.{ours}")
                for i, layer in enumerate(self.layers):
                    layer.get_parameter(local).copy_(stacked[i])
            self.final_layernorm.weight.copy_(get(f"{prefix}final_layernorm.weight"))


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
        self.norm = _RMSNorm(h, eps)
        self.attention = _CrossAttention(h, heads)

    def forward(self, x):  # [b, t, h] -> [b, q, h]
        queries = self.queries.unsqueeze(0).expand(x.shape[0], -1, -1)
        return queries + self.attention(queries, self.norm(x))


class VisionEncoder(nn.Module):
    """Our ViT (models/encoders.py): patches + learned positions → RMSNorm transformer →
    optional resampler → MLP projector into the LLM width. [n, 3, H, W] -> [n, tokens, llm_h]."""

    def __init__(self, cfg: VisionConfig, llm_hidden: int, eps: float):
        super().__init__()
        self.patch_size, self.grid = cfg.patch_size, cfg.image_size // cfg.patch_size
        self.patch_embedding = nn.Conv2d(3, cfg.hidden_size, cfg.patch_size, cfg.patch_size)
        self.position_embeddings = nn.Parameter(torch.zeros(self.grid * self.grid, cfg.hidden_size))
        self.transformer = _Encoder(cfg, eps)
        self.resampler = (_Resampler(cfg.hidden_size, cfg.num_attention_heads, cfg.resampler_tokens, eps)
                          if cfg.projector == "resampler" else None)
        self.projector = _Projector(cfg.hidden_size, llm_hidden)

    def forward(self, images):
        patches = self.patch_embedding(images)
        rows, cols = patches.shape[-2:]
        pos = self.position_embeddings
        if (rows, cols) != (self.grid, self.grid):
            grid = pos.reshape(1, self.grid, self.grid, -1).permute(0, 3, 1, 2)
            grid = F.interpolate(grid.float(), size=(rows, cols), mode="bicubic", align_corners=False)
            pos = grid.to(pos.dtype).permute(0, 2, 3, 1).reshape(rows * cols, -1)
        x = self.transformer(patches.flatten(2).transpose(1, 2) + pos)
        if self.resampler is not None:
            x = self.resampler(x)
        return self.projector(x)


def _sinusoids(length: int, channels: int) -> torch.Tensor:
    scales = torch.exp(-math.log(10000) / (channels // 2 - 1) * torch.arange(channels // 2))
    angles = torch.arange(length)[:, None] * scales[None, :]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


class AudioEncoder(nn.Module):
    """Our Whisper-style encoder: two convolutions (the second stride 2) + sinusoids → RMSNorm
    transformer → average pooling → MLP projector. [n, mels, frames] -> [n, tokens, llm_h]."""

    def __init__(self, cfg: AudioConfig, llm_hidden: int, eps: float):
        super().__init__()
        h = cfg.hidden_size
        self.pool, self.max_frames = cfg.pool, cfg.max_frames
        self.conv1 = nn.Conv1d(cfg.num_mel_bins, h, 3, padding=1)
        self.conv2 = nn.Conv1d(h, h, 3, stride=2, padding=1)
        self.register_buffer("positions", _sinusoids(cfg.num_frames, h), persistent=False)
        self.transformer = _Encoder(cfg, eps)
        self.projector = _Projector(h, llm_hidden)

    def forward(self, mels):
        x = F.gelu(self.conv2(F.gelu(self.conv1(mels)))).transpose(1, 2) + self.positions.to(mels.dtype)
        x = self.transformer(x)
        x = F.avg_pool1d(x.transpose(1, 2), self.pool, self.pool).transpose(1, 2)
        return self.projector(x)


def _load_encoder(module: nn.Module, get, prefix: str) -> None:
    direct = {name: param for name, param in module.named_parameters() if not name.startswith("transformer.")}
    with torch.no_grad():
        for name, param in direct.items():
            param.copy_(get(prefix + name))
    module.transformer.load_stacked(get, prefix + "transformer.")


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
    if ours.get("encoders_file"):
        reader = ShardReader(os.path.join(folder, ours["encoders_file"]))
        model_cfg = ours["model"]
        eps, hidden = model_cfg["norm_epsilon"], model_cfg["hidden_size"]
        if model_cfg.get("vision"):
            vision = VisionEncoder(_build(VisionConfig, model_cfg["vision"], "model.vision"), hidden, eps)
            _load_encoder(vision, reader.read, "vision.")
            vision = vision.to(dtype).eval()
        if model_cfg.get("audio"):
            audio = AudioEncoder(_build(AudioConfig, model_cfg["audio"], "model.audio"), hidden, eps)
            _load_encoder(audio, reader.read, "audio.")
            audio = audio.to(dtype).eval()
    return MultimodalCausalLM(lm, vision, audio, ours.get("placeholder_ids"), tokenizer, mtp).eval()
