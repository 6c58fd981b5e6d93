"""Vision (SigLIP-style ViT) and audio (Whisper-style) encoders with their projectors into
the LLM's hidden size, built from megatron-core pieces: a `TransformerBlock` of
bidirectional layers from our spec provider, tensor-parallel linears, `CrossAttention`.

Each encoder maps a media batch to `[tokens, n, llm_hidden]` (megatron's sequence-first
layout), which `MultimodalGPTModel` writes over the placeholder tokens. Encoders run with
the LLM's tensor parallelism but never pipeline- or sequence-parallel: they sit whole on
pipeline stage 0. Their config is the LLM's (parallel sizes, dtype, fusions) with the
encoder's own shape and one pipeline stage, so their layers are built and numbered as a
one-stage model whatever the LLM's pipeline layout.

Written here (megatron-core has neither): the patch embedding with position-grid
interpolation for other image sizes, and the Whisper convolution stem with sinusoidal
positions.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import build_module
from megatron.core.transformer.transformer_block import TransformerBlock
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import init_method_normal

from megatron_mm.config import AudioConfig, VisionConfig
from megatron_mm.models.specs import cross_attention_spec, encoder_block_spec

# Settings an encoder takes from the LLM's config: parallelism, precision, fusions.
_INHERITED = (
    "tensor_model_parallel_size", "bf16", "params_dtype", "use_cpu_initialization",
    "gradient_accumulation_fusion", "masked_softmax_fusion", "bias_activation_fusion",
    "bias_dropout_fusion", "persist_layer_norm", "init_method_std", "layernorm_epsilon",
)


def encoder_config(llm: TransformerConfig, enc) -> TransformerConfig:
    return TransformerConfig(
        num_layers=enc.num_layers,
        hidden_size=enc.hidden_size,
        num_attention_heads=enc.num_attention_heads,
        ffn_hidden_size=enc.ffn_hidden_size,
        normalization="RMSNorm",
        gated_linear_unit=False,
        activation_func=F.gelu,
        add_bias_linear=True,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        pipeline_model_parallel_size=1,
        sequence_parallel=False,
        cuda_graph_scope=[],  # megatron-core's default "full" warns that it is deprecated (see gpt.py)
        **{name: getattr(llm, name) for name in _INHERITED},
    )


class MLPProjector(MegatronModule):
    """Linear → GELU → linear into the LLM hidden size (column- then row-parallel)."""

    def __init__(self, config: TransformerConfig, in_size: int, out_size: int):
        super().__init__(config)
        init = init_method_normal(config.init_method_std)
        self.linear_fc1 = ColumnParallelLinear(in_size, out_size, config=config, init_method=init,
                                               bias=True, gather_output=False)
        self.linear_fc2 = RowParallelLinear(out_size, out_size, config=config, init_method=init, bias=True,
                                            input_is_parallel=True, skip_bias_add=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden, _ = self.linear_fc1(x)
        out, _ = self.linear_fc2(F.gelu(hidden))
        return out


class Resampler(MegatronModule):
    """Perceiver-style: `num_queries` learned queries cross-attend to the encoder features,
    giving a fixed number of tokens whatever the input size."""

    def __init__(self, config: TransformerConfig, backend, num_queries: int):
        super().__init__(config)
        self.queries = torch.nn.Parameter(torch.empty(num_queries, config.hidden_size, dtype=config.params_dtype))
        torch.nn.init.normal_(self.queries, std=config.init_method_std)
        self.norm = build_module(backend.layer_norm(rms_norm=True), config=config,
                                 hidden_size=config.hidden_size, eps=config.layernorm_epsilon)
        self.attention = build_module(cross_attention_spec(backend), config=config, layer_number=1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:  # [t, n, h] -> [q, n, h]
        queries = self.queries.unsqueeze(1).expand(-1, features.shape[1], -1)
        out, bias = self.attention(queries, attention_mask=None, key_value_states=self.norm(features))
        return queries + (out if bias is None else out + bias)


class VisionEncoder(MegatronModule):
    """Patch embedding + learned positions → bidirectional TransformerBlock → projector.

    Input [n, 3, H, W] normalised images; H and W multiples of the patch size. Another
    size than `image_size` interpolates the position grid (bicubic)."""

    def __init__(self, vision: VisionConfig, llm: TransformerConfig, backend):
        config = encoder_config(llm, vision)
        super().__init__(config)
        self.patch_size, self.grid = vision.patch_size, vision.image_size // vision.patch_size
        self.patch_embedding = torch.nn.Conv2d(3, vision.hidden_size, vision.patch_size, vision.patch_size,
                                               dtype=config.params_dtype)
        self.position_embeddings = torch.nn.Parameter(
            torch.empty(self.grid * self.grid, vision.hidden_size, dtype=config.params_dtype))
        torch.nn.init.normal_(self.position_embeddings, std=config.init_method_std)
        self.transformer = TransformerBlock(config, encoder_block_spec(backend, vision.num_layers),
                                            pre_process=True, post_process=True)
        self.resampler = (Resampler(config, backend, vision.resampler_tokens) if vision.projector == "resampler"
                          else None)
        self.projector = MLPProjector(config, vision.hidden_size, llm.hidden_size)

    def positions(self, rows: int, cols: int) -> torch.Tensor:
        if (rows, cols) == (self.grid, self.grid):
            return self.position_embeddings
        grid = self.position_embeddings.reshape(1, self.grid, self.grid, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid.float(), size=(rows, cols), mode="bicubic", align_corners=False)
        return grid.to(self.position_embeddings.dtype).permute(0, 2, 3, 1).reshape(rows * cols, -1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[-1] % self.patch_size or images.shape[-2] % self.patch_size:
            raise ValueError(f"image size {tuple(images.shape[-2:])} is not a multiple of the patch size {self.patch_size}")
        patches = self.patch_embedding(images)  # [n, h, rows, cols]
        rows, cols = patches.shape[-2:]
        x = patches.flatten(2).transpose(1, 2) + self.positions(rows, cols)  # [n, t, h]
        x = self.transformer(x.transpose(0, 1).contiguous(), attention_mask=None)  # [t, n, h]
        if self.resampler is not None:
            x = self.resampler(x)
        return self.projector(x)


def sinusoids(length: int, channels: int) -> torch.Tensor:
    """Whisper's fixed positions: sin on the first half of the channels, cos on the second."""
    scales = torch.exp(-math.log(10000) / (channels // 2 - 1) * torch.arange(channels // 2))
    angles = torch.arange(length)[:, None] * scales[None, :]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


class AudioEncoder(MegatronModule):
    """Two 1-D convolutions (the second with stride 2) + sinusoidal positions →
    bidirectional TransformerBlock → average pooling by `pool` → projector.

    Input [n, num_mel_bins, max_frames] log-mel features; output [num_tokens, n, llm_hidden]."""

    def __init__(self, audio: AudioConfig, llm: TransformerConfig, backend):
        config = encoder_config(llm, audio)
        super().__init__(config)
        self.pool, self.max_frames = audio.pool, audio.max_frames
        h = audio.hidden_size
        self.conv1 = torch.nn.Conv1d(audio.num_mel_bins, h, 3, padding=1, dtype=config.params_dtype)
        self.conv2 = torch.nn.Conv1d(h, h, 3, stride=2, padding=1, dtype=config.params_dtype)
        self.register_buffer("positions", sinusoids(audio.num_frames, h).to(config.params_dtype), persistent=False)
        self.transformer = TransformerBlock(config, encoder_block_spec(backend, audio.num_layers),
                                            pre_process=True, post_process=True)
        self.projector = MLPProjector(config, h, llm.hidden_size)

    def forward(self, mels: torch.Tensor) -> torch.Tensor:
        if mels.shape[-1] != self.max_frames:
            raise ValueError(f"audio features have {mels.shape[-1]} frames; the encoder takes {self.max_frames}")
        x = F.gelu(self.conv2(F.gelu(self.conv1(mels))))  # [n, h, frames]
        x = x.transpose(1, 2) + self.positions  # [n, frames, h]
        x = self.transformer(x.transpose(0, 1).contiguous(), attention_mask=None)  # [frames, n, h]
        x = F.avg_pool1d(x.permute(1, 2, 0), self.pool, self.pool).permute(2, 0, 1)  # [tokens, n, h]
        return self.projector(x.contiguous())


def build_encoders(model_cfg, llm: TransformerConfig, backend) -> dict[str, torch.nn.Module]:
    encoders = {}
    if model_cfg.vision is not None:
        encoders["image"] = VisionEncoder(model_cfg.vision, llm, backend)
    if model_cfg.audio is not None:
        encoders["audio"] = AudioEncoder(model_cfg.audio, llm, backend)
    return encoders
