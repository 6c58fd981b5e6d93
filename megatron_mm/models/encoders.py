"""Vision (SigLIP or CLIP) and audio (Whisper) encoders with their projectors into the LLM's
hidden size, built from megatron-core pieces: `CLIPViTModel` (its `siglip` and `clip`
subtypes) for the vision tower, a bidirectional `TransformerBlock` of our encoder spec for
Whisper, tensor-parallel linears, `CrossAttention` for the resampler.

Each encoder computes what its Hugging Face model computes (conversion/encoder_mapping.py maps
the tensors; tests/test_encoders_hf.py compares the features), then maps a media batch to
`[tokens, n, llm_hidden]` (megatron's sequence-first layout), which `MultimodalGPTModel` writes
over the placeholder tokens:

    SigLIP   Conv2d patches (bias) + learned positions → layers → [post-LayerNorm]
    CLIP     Conv2d patches (no bias), class token, learned positions → pre-LayerNorm → layers
             (its post-LayerNorm acts on the pooled class token only: kept, unused)
    Whisper  GELU(Conv1d) → GELU(Conv1d, stride 2) + fixed sinusoidal positions → layers →
             LayerNorm; the key projection has no bias

Layers are pre-LayerNorm with biased linears and each model's activation (`ACTIVATIONS`). The
vision features are transformers' `hidden_states[feature_layer]` (LLaVA's
`vision_feature_layer`): the layers after it, and a post-LayerNorm that is not applied, stay in
the model (so an imported tower exports whole) but are frozen and never run.

Encoders run with the LLM's tensor parallelism but never pipeline- or sequence-parallel: they
sit whole on pipeline stage 0. Their TransformerConfig is the LLM's (parallel sizes, dtype)
with the encoder's own shape, norm, activation and one pipeline stage.

Written here (megatron-core has neither): the Whisper convolution stem, and the zero key
bias (`_zero_key_bias`): megatron-core's fused QKV has one bias for q, k and v.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from megatron.core.activations import quick_gelu
from megatron.core.models.vision.clip_vit_model import CLIPViTModel
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import build_module
from megatron.core.transformer.transformer_block import TransformerBlock
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import init_method_normal

from megatron_mm.config import AudioConfig, VisionConfig
from megatron_mm.models.specs import cross_attention_spec, encoder_block_spec


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """transformers' `gelu_pytorch_tanh` (SigLIP)."""
    return F.gelu(x, approximate="tanh")


# Each architecture's MLP activation (transformers' hidden_act / activation_function).
ACTIVATIONS = {"siglip": gelu_tanh, "clip": quick_gelu, "whisper": F.gelu}

# Settings an encoder takes from the LLM's config: parallelism, precision, fusions.
_INHERITED = (
    "tensor_model_parallel_size", "bf16", "params_dtype", "use_cpu_initialization",
    "gradient_accumulation_fusion", "masked_softmax_fusion", "bias_dropout_fusion",
    "persist_layer_norm", "init_method_std",
)


def encoder_config(llm: TransformerConfig, enc) -> TransformerConfig:
    return TransformerConfig(
        num_layers=enc.num_layers,
        hidden_size=enc.hidden_size,
        num_attention_heads=enc.num_attention_heads,
        ffn_hidden_size=enc.ffn_hidden_size,
        normalization="LayerNorm",
        layernorm_epsilon=enc.layer_norm_eps,
        gated_linear_unit=False,
        activation_func=ACTIVATIONS[enc.arch],
        bias_activation_fusion=False,  # megatron's fused bias-GELU is the tanh approximation
        add_bias_linear=True,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        pipeline_model_parallel_size=1,
        sequence_parallel=False,
        cuda_graph_scope=[],  # megatron-core's default "full" warns that it is deprecated (see gpt.py)
        **{name: getattr(llm, name) for name in _INHERITED},
    )


def _freeze(module: torch.nn.Module) -> None:
    for param in module.parameters():
        param.requires_grad_(False)


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
        self.norm = build_module(backend.layer_norm(rms_norm=False), config=config,
                                 hidden_size=config.hidden_size, eps=config.layernorm_epsilon)
        self.attention = build_module(cross_attention_spec(backend), config=config, layer_number=1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:  # [t, n, h] -> [q, n, h]
        queries = self.queries.unsqueeze(1).expand(-1, features.shape[1], -1)
        out, bias = self.attention(queries, attention_mask=None, key_value_states=self.norm(features))
        return queries + (out if bias is None else out + bias)


def _run_layers(layers, x: torch.Tensor) -> torch.Tensor:
    for layer in layers:
        x, _ = layer(x, attention_mask=None)
    return x


class VisionTower(CLIPViTModel):
    """megatron-core's CLIPViTModel (`siglip` or `clip` subtype) run up to the selected layer.

    Its constructor builds the tower (patch convolution, class token, positions, pre/post
    LayerNorm, `decoder` block without a final norm); the forward here differs from its own in
    three ways: it stops at `feature_layer`, applies the post-LayerNorm only when asked, and adds
    the position table directly (its `position_ids` are made with `.cuda()`: the
    `cuda_devices_to_cpu` workaround in runtime/compat.py serves the constructor on a CPU).
    CLIP's post-LayerNorm (which megatron's `clip` subtype does not build) is added as `ln_post`
    so that an imported tower exports whole."""

    def __init__(self, vision: VisionConfig, config: TransformerConfig, backend):
        norm = backend.layer_norm(rms_norm=False)
        super().__init__(config, encoder_block_spec(backend, vision.num_layers),
                         ln_pre_impl=norm, ln_post_impl=norm, add_class_token=vision.arch == "clip",
                         class_token_len=1 if vision.arch == "clip" else 0, patch_dim=vision.patch_size,
                         img_h=vision.image_size, img_w=vision.image_size, model_subtype=vision.arch)
        if vision.arch == "clip":
            self.ln_post = build_module(norm, config=config, hidden_size=config.hidden_size,
                                        eps=config.layernorm_epsilon)
        # megatron-core draws positions and the class token from N(0, 1); HF-style small init
        std = config.init_method_std
        with torch.no_grad():
            self.position_embeddings.weight.normal_(0.0, std)
            if self.add_class_token:
                self.class_token.normal_(0.0, std)
        layers = len(self.decoder.layers)
        self.used_layers = vision.feature_layer % (layers + 1)
        self.apply_post_layernorm = vision.post_layernorm
        self.keep_class_token = vision.keep_class_token
        for layer in self.decoder.layers[self.used_layers:]:
            _freeze(layer)
        if not self.apply_post_layernorm:
            _freeze(self.ln_post)

    def forward(self, images: torch.Tensor) -> torch.Tensor:  # [n, 3, H, W] -> [t, n, h]
        if tuple(images.shape[-2:]) != (self.img_h, self.img_w):
            raise ValueError(f"image size {tuple(images.shape[-2:])}: the vision encoder takes "
                             f"{(self.img_h, self.img_w)}")
        x = self.conv1(images).flatten(2).transpose(1, 2)  # [n, patches, h]
        if self.add_class_token:
            x = torch.cat([self.class_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = x + self.position_embeddings.weight
        if self.ln_pre is not None:
            x = self.ln_pre(x)
        x = _run_layers(self.decoder.layers[: self.used_layers], x.transpose(0, 1).contiguous())  # [t, n, h]
        if self.apply_post_layernorm:
            x = self.ln_post(x)
        if self.add_class_token and not self.keep_class_token:
            x = x[self.class_token_len:]
        return x


class VisionEncoder(MegatronModule):
    """SigLIP / CLIP tower → optional resampler → projector. Input [n, 3, S, S] normalised
    images (S = image_size); output [tokens, n, llm_hidden]."""

    def __init__(self, vision: VisionConfig, llm: TransformerConfig, backend):
        config = encoder_config(llm, vision)
        super().__init__(config)
        self.tower = VisionTower(vision, config, backend)
        self.resampler = (Resampler(config, backend, vision.resampler_tokens) if vision.projector == "resampler"
                          else None)
        self.projector = MLPProjector(config, vision.hidden_size, llm.hidden_size)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.tower(images)
        if self.resampler is not None:
            x = self.resampler(x)
        return self.projector(x)


def sinusoids(length: int, channels: int) -> torch.Tensor:
    """Whisper's fixed positions: sin on the first half of the channels, cos on the second."""
    scales = torch.exp(-math.log(10000) / (channels // 2 - 1) * torch.arange(channels // 2))
    angles = torch.arange(length)[:, None] * scales[None, :]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


def _zero_key_bias(layer) -> None:
    """Whisper's key projection has no bias; megatron's fused QKV has one bias for all three
    (per head [q; k; v]). The key part is set to zero and its gradient zeroed, so it stays zero
    (softmax is shift-invariant: its true gradient is zero too, up to rounding)."""
    bias = layer.self_attention.linear_qkv.bias
    head_dim = layer.config.kv_channels

    def key_slots(t: torch.Tensor) -> torch.Tensor:
        return t.view(-1, 3, head_dim)[:, 1]

    with torch.no_grad():
        key_slots(bias).zero_()

    def zero_key_grad(grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        key_slots(grad).zero_()
        return grad

    bias.register_hook(zero_key_grad)


class AudioEncoder(MegatronModule):
    """Whisper encoder → average pooling by `pool` → projector.

    Input [n, num_mel_bins, max_frames] log-mel features; output [num_tokens, n, llm_hidden].
    `position_embeddings` is Whisper's `embed_positions`: a parameter (so an imported folder's
    table exports exactly) initialised with the sinusoids and frozen."""

    def __init__(self, audio: AudioConfig, llm: TransformerConfig, backend):
        config = encoder_config(llm, audio)
        super().__init__(config)
        self.pool, self.max_frames = audio.pool, audio.max_frames
        h = audio.hidden_size
        self.conv1 = torch.nn.Conv1d(audio.num_mel_bins, h, 3, padding=1, dtype=config.params_dtype)
        self.conv2 = torch.nn.Conv1d(h, h, 3, stride=2, padding=1, dtype=config.params_dtype)
        self.position_embeddings = torch.nn.Parameter(sinusoids(audio.num_frames, h).to(config.params_dtype),
                                                      requires_grad=False)
        self.decoder = TransformerBlock(config, encoder_block_spec(backend, audio.num_layers),
                                        pre_process=True, post_process=True)
        for layer in self.decoder.layers:
            _zero_key_bias(layer)
        self.projector = MLPProjector(config, h, llm.hidden_size)

    def features(self, mels: torch.Tensor) -> torch.Tensor:
        """WhisperEncoder's last_hidden_state, sequence-first: [frames, n, h]."""
        if mels.shape[-1] != self.max_frames:
            raise ValueError(f"audio features have {mels.shape[-1]} frames; the encoder takes {self.max_frames}")
        x = F.gelu(self.conv2(F.gelu(self.conv1(mels))))  # [n, h, frames]
        x = x.transpose(1, 2) + self.position_embeddings  # [n, frames, h]
        return self.decoder(x.transpose(0, 1).contiguous(), attention_mask=None)

    def forward(self, mels: torch.Tensor) -> torch.Tensor:
        x = self.features(mels)
        x = F.avg_pool1d(x.permute(1, 2, 0), self.pool, self.pool).permute(2, 0, 1)  # [tokens, n, h]
        return self.projector(x.contiguous())


def build_encoders(model_cfg, llm: TransformerConfig, backend) -> dict[str, torch.nn.Module]:
    encoders = {}
    if model_cfg.vision is not None:
        encoders["image"] = VisionEncoder(model_cfg.vision, llm, backend)
    if model_cfg.audio is not None:
        encoders["audio"] = AudioEncoder(model_cfg.audio, llm, backend)
    return encoders
