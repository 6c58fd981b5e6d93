"""Hugging Face SigLIP / CLIP vision towers and Whisper encoders ↔ our encoders
(models/encoders.py): the model shape from `config.json`, and every tensor both ways.

    megatron (vision.tower.* / audio.*)          SiglipVisionModel / CLIPVisionModel      WhisperEncoder
    conv1.weight, .bias (SigLIP)                 embeddings.patch_embedding               conv1, conv2
    class_token [1, 1, h] (CLIP)                 embeddings.class_embedding [h]
    position_embeddings(.weight)                 embeddings.position_embedding.weight     embed_positions.weight
    ln_pre (CLIP)                                pre_layrnorm
    ln_post                                      post_layernorm
    decoder.layers.{i}.input_layernorm           encoder.layers.{i}.layer_norm1           layers.{i}.self_attn_layer_norm
      self_attention.linear_qkv = per head       self_attn.q_proj, k_proj, v_proj         (k_proj has no bias: zeros)
        [q; k; v] rows (megatron's fused layout)
      self_attention.linear_proj                 self_attn.out_proj
      pre_mlp_layernorm                          layer_norm2                               final_layer_norm
      mlp.linear_fc1 / linear_fc2                mlp.fc1 / mlp.fc2                         fc1 / fc2
    decoder.final_layernorm (Whisper)                                                     layer_norm

Names here are the model's own (one per layer, `decoder.layers.{i}.…`); the dist checkpoint
stacks an encoder block's layers into one `[L, …]` tensor (`stack_layers` / `layer_of`).

A folder is read as written by transformers: a vision-only `SiglipVisionModel` /
`CLIPVisionModel`, or a dual-tower `SiglipModel` / `CLIPModel` (its vision tower is taken), a
Whisper model or encoder (its encoder is taken); the tensor-name prefix is found from the patch
/ convolution weight. SigLIP's attention-pooling head (`head.*`) is not part of the encoder
LLaVA uses: it is left out, and said so. Anything else that does not fit is refused in one line.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Callable, Iterable, Iterator, Optional

import torch

from megatron_mm.config import AudioConfig, ConfigError, VisionConfig, _build
from megatron_mm.conversion.dcp import ConversionError
from megatron_mm.conversion.hf_preprocessor import FILE as PREPROCESSOR_FILE
from megatron_mm.conversion.hf_preprocessor import audio_features_from_hf, image_preprocess_from_hf

VISION_TYPES = {"siglip_vision_model": "siglip", "siglip": "siglip", "clip_vision_model": "clip", "clip": "clip"}
AUDIO_TYPES = {"whisper": "whisper"}
HF_ACTIVATION = {"siglip": "gelu_pytorch_tanh", "clip": "quick_gelu", "whisper": "gelu"}
MEGATRON_PREFIX = {"vision": "vision.tower.", "audio": "audio."}
_LAYER = re.compile(r"^(.*\.decoder\.layers\.)(\d+)\.(.*)$")
_SHAPE_FIELDS = {"vision": ("arch", "image_size", "patch_size", "num_layers", "hidden_size", "num_attention_heads",
                            "ffn_hidden_size", "layer_norm_eps"),
                 "audio": ("arch", "num_mel_bins", "max_frames", "num_layers", "hidden_size", "num_attention_heads",
                           "ffn_hidden_size", "layer_norm_eps")}

Getter = Callable[[str], torch.Tensor]


# --------------------------------------------------------------------------- config.json


def _read_config(folder: str) -> dict:
    path = os.path.join(folder, "config.json")
    if not os.path.exists(path):
        raise ConversionError(f"{folder}: no config.json")
    try:
        return json.load(open(path))
    except json.JSONDecodeError as err:
        raise ConversionError(f"{path}: not valid JSON ({err})") from None


def _hf_config(folder: str, kind: str):
    """The transformers config object of the folder (defaults filled in) for `kind`."""
    raw = _read_config(folder)
    model_type = raw.get("model_type")
    known = VISION_TYPES if kind == "vision" else AUDIO_TYPES
    if model_type not in known:
        raise ConversionError(f"{folder}/config.json: model_type {model_type!r} is not a {kind} encoder we read "
                              f"({', '.join(sorted(known))})")
    import transformers

    cls = transformers.CONFIG_MAPPING[model_type]  # a JSON config class; no remote code
    config = cls(**{k: v for k, v in raw.items() if k not in ("model_type", "transformers_version")})
    if kind == "vision" and model_type in ("siglip", "clip"):
        config = config.vision_config  # the dual-tower folder's vision tower
    return known[model_type], config


def vision_config_from_hf(folder: str, base: Optional[VisionConfig] = None) -> VisionConfig:
    """The tower's shape from config.json; choices HF has no place for (feature layer, class
    token, projector, image statistics) from `base` (default: VisionConfig's)."""
    arch, c = _hf_config(folder, "vision")
    if c.num_channels != 3:
        raise ConversionError(f"{folder}/config.json: num_channels={c.num_channels}; the vision encoder takes RGB (3)")
    if c.image_size % c.patch_size:
        raise ConversionError(f"{folder}/config.json: image_size={c.image_size} is not a multiple of "
                              f"patch_size={c.patch_size}")
    _check_activation(folder, arch, c.hidden_act)
    shape = dict(arch=arch, image_size=c.image_size, patch_size=c.patch_size, num_layers=c.num_hidden_layers,
                 hidden_size=c.hidden_size, num_attention_heads=c.num_attention_heads,
                 ffn_hidden_size=c.intermediate_size, layer_norm_eps=float(c.layer_norm_eps),
                 preprocess=dataclasses.asdict(image_preprocess_from_hf(folder, c.image_size, arch)))
    return _with_shape(VisionConfig, base, shape, "model.vision")


def audio_config_from_hf(folder: str, base: Optional[AudioConfig] = None) -> AudioConfig:
    arch, c = _hf_config(folder, "audio")
    _check_activation(folder, arch, c.activation_function)
    if os.path.isfile(os.path.join(folder, PREPROCESSOR_FILE)):
        features = audio_features_from_hf(folder)
        if features.num_mel_bins != c.num_mel_bins:
            raise ConversionError(f"{folder}/{PREPROCESSOR_FILE}: feature_size={features.num_mel_bins}, but the "
                                  f"encoder takes num_mel_bins={c.num_mel_bins}")
    shape = dict(arch=arch, num_mel_bins=c.num_mel_bins, max_frames=2 * c.max_source_positions,
                 num_layers=c.encoder_layers, hidden_size=c.d_model, num_attention_heads=c.encoder_attention_heads,
                 ffn_hidden_size=c.encoder_ffn_dim, layer_norm_eps=1e-5)  # Whisper: torch's LayerNorm default
    return _with_shape(AudioConfig, base, shape, "model.audio")


def _check_activation(folder: str, arch: str, act: str) -> None:
    if act != HF_ACTIVATION[arch]:
        raise ConversionError(f"{folder}/config.json: activation {act!r}; {arch} uses {HF_ACTIVATION[arch]!r}")


def _with_shape(cls, base, shape: dict, key: str):
    values = dataclasses.asdict(base) if base is not None else {}
    values.update(shape)
    try:
        return _build(cls, values, key)
    except ConfigError as err:
        raise ConversionError(str(err)) from None


def hf_vision_config(v: VisionConfig) -> dict:
    """config.json of a `SiglipVisionModel` / `CLIPVisionModel` folder for the tower `v`."""
    model_type = {"siglip": "siglip_vision_model", "clip": "clip_vision_model"}[v.arch]
    config = dict(model_type=model_type, architectures=[{"siglip": "SiglipVisionModel", "clip": "CLIPVisionModel"}[v.arch]],
                  image_size=v.image_size, patch_size=v.patch_size, num_channels=3, num_hidden_layers=v.num_layers,
                  hidden_size=v.hidden_size, num_attention_heads=v.num_attention_heads,
                  intermediate_size=v.ffn_hidden_size, layer_norm_eps=v.layer_norm_eps, hidden_act=HF_ACTIVATION[v.arch])
    if v.arch == "siglip":
        config["vision_use_head"] = False  # the pooling head is not part of our encoder
    return config


def hf_audio_config(a: AudioConfig) -> dict:
    """config.json of a Whisper folder whose encoder is `a` (what `WhisperEncoder` reads)."""
    return dict(model_type="whisper", architectures=["WhisperEncoder"], num_mel_bins=a.num_mel_bins,
                max_source_positions=a.max_frames // 2, encoder_layers=a.num_layers, d_model=a.hidden_size,
                encoder_attention_heads=a.num_attention_heads, encoder_ffn_dim=a.ffn_hidden_size,
                activation_function="gelu")


def shape_fields(kind: str) -> tuple[str, ...]:
    """The encoder fields config.json decides (the rest are training choices)."""
    return _SHAPE_FIELDS[kind]


# --------------------------------------------------------------------------- tensors


def _layer_names(kind: str, arch: str) -> dict[str, str]:
    """megatron name within layer i → HF name within layer i (not the fused QKV)."""
    if kind == "vision":
        norm1, norm2, out, fc = "layer_norm1", "layer_norm2", "self_attn.out_proj", "mlp.fc"
    else:
        norm1, norm2, out, fc = "self_attn_layer_norm", "final_layer_norm", "self_attn.out_proj", "fc"
    names = {}
    for leaf in ("weight", "bias"):
        names[f"input_layernorm.{leaf}"] = f"{norm1}.{leaf}"
        names[f"pre_mlp_layernorm.{leaf}"] = f"{norm2}.{leaf}"
        names[f"self_attention.linear_proj.{leaf}"] = f"{out}.{leaf}"
        names[f"mlp.linear_fc1.{leaf}"] = f"{fc}1.{leaf}"
        names[f"mlp.linear_fc2.{leaf}"] = f"{fc}2.{leaf}"
    return names


def _top_names(kind: str, arch: str) -> dict[str, str]:
    """megatron name → HF name of the tensors outside the layers (class token: see below)."""
    if kind == "audio":
        return {"conv1.weight": "conv1.weight", "conv1.bias": "conv1.bias", "conv2.weight": "conv2.weight",
                "conv2.bias": "conv2.bias", "position_embeddings": "embed_positions.weight",
                "decoder.final_layernorm.weight": "layer_norm.weight", "decoder.final_layernorm.bias": "layer_norm.bias"}
    names = {"conv1.weight": "embeddings.patch_embedding.weight",
             "position_embeddings.weight": "embeddings.position_embedding.weight",
             "ln_post.weight": "post_layernorm.weight", "ln_post.bias": "post_layernorm.bias"}
    if arch == "siglip":
        names["conv1.bias"] = "embeddings.patch_embedding.bias"
    else:
        names.update({"ln_pre.weight": "pre_layrnorm.weight", "ln_pre.bias": "pre_layrnorm.bias"})
    return names


def _layers_prefix(kind: str) -> str:
    return "encoder.layers." if kind == "vision" else "layers."


def hf_names(kind: str, cfg) -> list[str]:
    """Every HF tensor name (without the folder's prefix) the encoder `cfg` reads or writes."""
    names = list(_top_names(kind, cfg.arch).values())
    if kind == "vision" and cfg.arch == "clip":
        names.append("embeddings.class_embedding")
    for i in range(cfg.num_layers):
        layer = f"{_layers_prefix(kind)}{i}."
        names += [layer + n for n in _layer_names(kind, cfg.arch).values()]
        names += [f"{layer}self_attn.{p}_proj.weight" for p in "qkv"]
        names += [f"{layer}self_attn.{p}_proj.bias" for p in ("qv" if kind == "audio" else "qkv")]
    return names


def to_megatron(kind: str, cfg, get: Getter) -> Iterator[tuple[str, torch.Tensor]]:
    """(megatron name, tensor) of the whole encoder from HF tensors `get(hf_name)`."""
    prefix = MEGATRON_PREFIX[kind]
    for ours, theirs in _top_names(kind, cfg.arch).items():
        yield prefix + ours, get(theirs)
    if kind == "vision" and cfg.arch == "clip":
        yield prefix + "class_token", get("embeddings.class_embedding").reshape(1, 1, -1)
    heads = cfg.num_attention_heads
    for i in range(cfg.num_layers):
        hf_layer, ours_layer = f"{_layers_prefix(kind)}{i}.", f"{prefix}decoder.layers.{i}."
        for ours, theirs in _layer_names(kind, cfg.arch).items():
            yield ours_layer + ours, get(hf_layer + theirs)
        q, k, v = (get(f"{hf_layer}self_attn.{p}_proj.weight") for p in "qkv")
        yield ours_layer + "self_attention.linear_qkv.weight", _fuse(heads, q, k, v)
        q, v = get(f"{hf_layer}self_attn.q_proj.bias"), get(f"{hf_layer}self_attn.v_proj.bias")
        k = torch.zeros_like(q) if kind == "audio" else get(f"{hf_layer}self_attn.k_proj.bias")
        yield ours_layer + "self_attention.linear_qkv.bias", _fuse(heads, q, k, v)


def to_hf(kind: str, cfg, get: Getter) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, tensor) of the whole encoder from megatron tensors `get(megatron_name)`."""
    prefix = MEGATRON_PREFIX[kind]
    for ours, theirs in _top_names(kind, cfg.arch).items():
        yield theirs, get(prefix + ours)
    if kind == "vision" and cfg.arch == "clip":
        yield "embeddings.class_embedding", get(prefix + "class_token").reshape(-1)
    heads = cfg.num_attention_heads
    for i in range(cfg.num_layers):
        hf_layer, ours_layer = f"{_layers_prefix(kind)}{i}.", f"{prefix}decoder.layers.{i}."
        for ours, theirs in _layer_names(kind, cfg.arch).items():
            yield hf_layer + theirs, get(ours_layer + ours)
        for leaf in ("weight", "bias"):
            q, k, v = _split(heads, get(ours_layer + f"self_attention.linear_qkv.{leaf}"))
            if kind == "audio" and leaf == "bias":
                if torch.count_nonzero(k):
                    raise ConversionError(f"{ours_layer}self_attention.linear_qkv.bias: the key part is not zero; "
                                          "Whisper's key projection has no bias")
                yield f"{hf_layer}self_attn.q_proj.bias", q
                yield f"{hf_layer}self_attn.v_proj.bias", v
                continue
            for p, t in zip("qkv", (q, k, v)):
                yield f"{hf_layer}self_attn.{p}_proj.{leaf}", t


def _fuse(heads: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """HF q, k, v ([h, ...] each) → megatron's fused rows, per head [q_h; k_h; v_h]."""
    parts = [t.reshape(heads, t.shape[0] // heads, *t.shape[1:]) for t in (q, k, v)]
    return torch.stack(parts, dim=1).reshape(3 * q.shape[0], *q.shape[1:]).contiguous()


def _split(heads: int, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    grouped = qkv.reshape(heads, 3, qkv.shape[0] // (3 * heads), *qkv.shape[1:])
    return tuple(grouped[:, j].reshape(qkv.shape[0] // 3, *qkv.shape[1:]).contiguous() for j in range(3))


# --------------------------------------------------------------------------- dist checkpoint layout


def stack_layers(items: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    """Per-layer names → the dist checkpoint's stacked `…decoder.layers.<name>` [L, …] tensors
    (other names pass through)."""
    layers: dict[str, list] = {}
    for name, tensor in items:
        match = _LAYER.match(name)
        if match is None:
            yield name, tensor
            continue
        stacked = match[1] + match[3]
        layers.setdefault(stacked, []).append((int(match[2]), tensor))
    for stacked, parts in layers.items():
        parts.sort(key=lambda p: p[0])
        yield stacked, torch.stack([t for _, t in parts])


def layer_of(name: str) -> tuple[str, Optional[int]]:
    """A per-layer name → (its stacked checkpoint key, layer index); other names → (name, None)."""
    match = _LAYER.match(name)
    return (name, None) if match is None else (match[1] + match[3], int(match[2]))


# --------------------------------------------------------------------------- folders


class EncoderFolder:
    """The encoder tensors of a transformers folder: finds the prefix of the tower (vision:
    `embeddings.patch_embedding.weight`; Whisper: `conv1.weight`), reads names relative to it,
    and checks every expected tensor and shape; keys outside the prefix (a text tower, a decoder)
    are not read."""

    ANCHOR = {"vision": "embeddings.patch_embedding.weight", "audio": "conv1.weight"}

    def __init__(self, folder: str, kind: str, cfg, reader):
        self.folder, self.kind, self.reader = folder, kind, reader
        anchor = self.ANCHOR[kind]
        found = sorted(k[: -len(anchor)] for k in reader.keys() if k.endswith(anchor)
                       and (k == anchor or k[: -len(anchor)].endswith(".")))
        if kind == "audio":
            found = [p for p in found if "decoder" not in p]
        if len(found) != 1:
            raise ConversionError(f"{folder}: {'no' if not found else 'more than one'} {kind} encoder "
                                  f"({anchor}) in the weights")
        self.prefix = found[0]
        expected = set(hf_names(kind, cfg))
        mine = [k[len(self.prefix):] for k in reader.keys() if k.startswith(self.prefix)]
        if kind == "audio" and self.prefix == "":
            mine = [k for k in mine if not k.startswith(("decoder.", "proj_out."))]
        self.left_out = sorted(k for k in mine if k.startswith("head.")) if kind == "vision" else []
        unknown = sorted(k for k in mine if k not in expected and k not in self.left_out)
        if unknown:
            raise ConversionError(f"{folder}: unknown key {self.prefix}{unknown[0]} (and {len(unknown) - 1} more): not "
                                  f"part of the {cfg.arch} encoder config.json describes")
        missing = sorted(expected - set(mine))
        if missing:
            raise ConversionError(f"{folder}: tensor {self.prefix}{missing[0]} is missing (and {len(missing) - 1} "
                                  "more) though config.json implies it")
        self.expected = expected

    def read(self, name: str) -> torch.Tensor:
        return self.reader.read(self.prefix + name)

    @property
    def note(self) -> Optional[str]:
        if not self.left_out:
            return None
        return (f"{self.folder}: left out SigLIP's attention-pooling head ({len(self.left_out)} tensors, "
                f"{self.prefix}head.*): LLaVA-style models use the patch features")


def megatron_tensors(kind: str, cfg, folder: EncoderFolder, shapes_check: bool = True
                     ) -> Iterator[tuple[str, torch.Tensor]]:
    """The folder's encoder as megatron tensors (per-layer names), shape-checked against `cfg`."""
    expected = expected_megatron_shapes(kind, cfg)
    for name, tensor in to_megatron(kind, cfg, folder.read):
        if tuple(tensor.shape) != expected[name]:
            raise ConversionError(f"{folder.folder}: config does not match the checkpoint: {name} built as "
                                  f"{tuple(tensor.shape)}, config.json gives {expected[name]}")
        yield name, tensor


def expected_megatron_shapes(kind: str, cfg) -> dict[str, tuple]:
    """Shapes of the encoder's megatron tensors (per-layer names), from the config alone."""
    h, f = cfg.hidden_size, cfg.ffn_hidden_size
    prefix = MEGATRON_PREFIX[kind]
    if kind == "vision":
        p = cfg.patch_size
        positions = cfg.num_patches + (1 if cfg.arch == "clip" else 0)
        shapes = {"conv1.weight": (h, 3, p, p), "position_embeddings.weight": (positions, h),
                  "ln_post.weight": (h,), "ln_post.bias": (h,)}
        if cfg.arch == "siglip":
            shapes["conv1.bias"] = (h,)
        else:
            shapes.update({"ln_pre.weight": (h,), "ln_pre.bias": (h,), "class_token": (1, 1, h)})
    else:
        shapes = {"conv1.weight": (h, cfg.num_mel_bins, 3), "conv1.bias": (h,), "conv2.weight": (h, h, 3),
                  "conv2.bias": (h,), "position_embeddings": (cfg.max_frames // 2, h),
                  "decoder.final_layernorm.weight": (h,), "decoder.final_layernorm.bias": (h,)}
    for i in range(cfg.num_layers):
        layer = f"decoder.layers.{i}."
        for norm in ("input_layernorm", "pre_mlp_layernorm"):
            shapes.update({f"{layer}{norm}.weight": (h,), f"{layer}{norm}.bias": (h,)})
        shapes.update({f"{layer}self_attention.linear_qkv.weight": (3 * h, h),
                       f"{layer}self_attention.linear_qkv.bias": (3 * h,),
                       f"{layer}self_attention.linear_proj.weight": (h, h), f"{layer}self_attention.linear_proj.bias": (h,),
                       f"{layer}mlp.linear_fc1.weight": (f, h), f"{layer}mlp.linear_fc1.bias": (f,),
                       f"{layer}mlp.linear_fc2.weight": (h, f), f"{layer}mlp.linear_fc2.bias": (h,)})
    return {prefix + k: v for k, v in shapes.items()}


# --------------------------------------------------------------------------- projectors


def projector_shapes(kind: str, cfg, llm_hidden: int) -> dict[str, tuple]:
    """The projector's (and resampler's) megatron tensors: none of them exists in a HF encoder."""
    h = cfg.hidden_size
    shapes = {"projector.linear_fc1.weight": (llm_hidden, h), "projector.linear_fc1.bias": (llm_hidden,),
              "projector.linear_fc2.weight": (llm_hidden, llm_hidden), "projector.linear_fc2.bias": (llm_hidden,)}
    if kind == "vision" and cfg.projector == "resampler":
        shapes.update({"resampler.queries": (cfg.resampler_tokens, h), "resampler.norm.weight": (h,),
                       "resampler.norm.bias": (h,),
                       "resampler.attention.linear_q.weight": (h, h), "resampler.attention.linear_q.bias": (h,),
                       "resampler.attention.linear_kv.weight": (2 * h, h), "resampler.attention.linear_kv.bias": (2 * h,),
                       "resampler.attention.linear_proj.weight": (h, h), "resampler.attention.linear_proj.bias": (h,)})
    return {f"{kind}.{k}": v for k, v in shapes.items()}


def fresh_projector(kind: str, cfg, llm_hidden: int, std: float, seed: int, dtype: torch.dtype
                    ) -> Iterator[tuple[str, torch.Tensor]]:
    """Freshly initialised projector tensors, as megatron-core initialises them (weights and
    queries N(0, std), biases 0, norm weights 1), each drawn from a generator seeded by `seed`
    and its name alone: the same under any layout."""
    import zlib

    for name, shape in projector_shapes(kind, cfg, llm_hidden).items():
        if name.endswith("bias"):
            tensor = torch.zeros(shape)
        elif name.endswith("norm.weight"):
            tensor = torch.ones(shape)
        else:
            generator = torch.Generator().manual_seed(zlib.crc32(f"{seed}:{name}".encode()))
            tensor = torch.empty(shape).normal_(0.0, std, generator=generator)
        yield name, tensor.to(dtype)


# --------------------------------------------------------------------------- export


FOLDERS = {"vision": "vision_encoder", "audio": "audio_encoder"}  # subfolders convert_to_hf writes


def stacked_reader(read: Getter) -> Getter:
    """`get(per-layer name)` over a reader of the dist checkpoint's stacked keys; keeps the
    stacked tensors it has read (one encoder's worth), as layers are asked for one by one."""
    cache: dict[str, torch.Tensor] = {}

    def get(name: str) -> torch.Tensor:
        key, index = layer_of(name)
        if index is None:
            return read(key)
        if key not in cache:
            cache[key] = read(key)
        return cache[key][index]

    return get


def write_hf_encoder(kind: str, cfg, get: Getter, folder: str, dtype: Optional[torch.dtype] = None) -> list[str]:
    """Write the encoder as a transformers folder (config.json + model.safetensors) that
    `SiglipVisionModel` / `CLIPVisionModel` / `WhisperEncoder.from_pretrained` loads; `get`
    reads megatron tensors by per-layer name. Returns the megatron keys it consumed."""
    from megatron_mm.conversion.safetensors_io import ShardWriter

    os.makedirs(folder, exist_ok=True)
    items = list(to_hf(kind, cfg, get))  # one encoder in memory (the stacked layers are read whole anyway)
    plan = [(name, tuple(t.shape), dtype or t.dtype) for name, t in items]
    writer = ShardWriter(os.path.join(folder, "model.safetensors"), plan, metadata={"format": "pt"})
    for name, tensor in items:
        writer.write(name, tensor if dtype is None else tensor.to(dtype))
    writer.close()
    config = hf_vision_config(cfg) if kind == "vision" else hf_audio_config(cfg)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    return sorted({layer_of(name)[0] for name in expected_megatron_shapes(kind, cfg)})


def with_choices(kind: str, enc, overrides: list[str], folder: str):
    """`enc` with `model.<kind>.KEY=VALUE` overrides of its training choices (feature layer,
    class token, projector, ...) applied; the shape is the folder's and cannot be overridden."""
    from megatron_mm.config import _set_dotted

    tree = dataclasses.asdict(enc)
    for item in overrides:
        key, _, raw = item.partition("=")
        field = key.strip()[len(f"model.{kind}."):]
        if field in _SHAPE_FIELDS[kind]:
            raise ConversionError(f"--set {key.strip()}: the {kind} encoder's {field} comes from {folder}/config.json")
        try:
            _set_dotted(tree, field, raw.strip())
        except ConfigError as err:
            raise ConversionError(str(err)) from None
    cls = VisionConfig if kind == "vision" else AudioConfig
    try:
        return _build(cls, tree, f"model.{kind}")
    except ConfigError as err:
        raise ConversionError(str(err)) from None
