"""Typed run configuration: dataclasses, YAML loading, `--set` overrides, validation.

One place decides whether a config can run. `validate(cfg, world_size, hardware)` is
called before any process group starts and raises `ConfigError` whose message has one
line per violation, each naming the key, the value and the rule.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import typing
from dataclasses import dataclass, field
from typing import Any, Optional

import yaml


class ConfigError(ValueError):
    """A config that cannot run. `str(err)` is one line per violated rule."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


@dataclass
class ImagePreprocessConfig:
    """model.vision.preprocess: transformers' SiglipImageProcessor (resize: fixed) or
    CLIPImageProcessor (resize: shortest_edge, center_crop: true) with these settings, in both
    loaders (data/multimodal/image_spec.py). `conversion.hf_preprocessor` fills it from an encoder
    folder's preprocessor_config.json. Pixels x (0-255, RGB, transparency on white) become
    (x * rescale_factor - mean) / std. The default is SigLIP's normalisation with a bilinear resize."""

    resize: str = "fixed"  # fixed: size x size; shortest_edge: the shorter side to size, aspect kept
    size: Optional[int] = None  # the resize target; None: model.vision.image_size
    # crop the model.vision.image_size square from the centre after resizing (CLIP's crop_size is
    # the encoder's image size, so it is not a setting of its own)
    center_crop: bool = False
    resample: str = "bilinear"  # nearest, bilinear, bicubic or lanczos (Pillow's; SigLIP and CLIP: bicubic)
    rescale_factor: float = 1 / 255  # 1.0: mean/std on the 0-255 scale
    mean: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    std: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])


@dataclass
class VisionConfig:
    """A SigLIP or CLIP vision tower on pipeline stage 0 and its projector into the LLM hidden size."""

    arch: str = "siglip"  # siglip (SiglipVisionModel) | clip (CLIPVisionModel: class token, pre-LayerNorm)
    image_size: int = 32  # images are resized to image_size x image_size
    patch_size: int = 8
    num_layers: int = 2
    hidden_size: int = 64
    num_attention_heads: int = 4
    ffn_hidden_size: int = 128
    layer_norm_eps: float = 1e-6  # SigLIP 1e-6, CLIP 1e-5 (config.json's layer_norm_eps)
    # Which hidden state feeds the projector, counted as transformers' `hidden_states` (and
    # LLaVA's `vision_feature_layer`): -1 the last layer's output, -2 the penultimate (LLaVA
    # with CLIP); layers after it are kept (for export) but frozen and not run.
    feature_layer: int = -1
    post_layernorm: bool = False  # apply the tower's post-LayerNorm (SigLIP's last_hidden_state); needs feature_layer -1
    keep_class_token: bool = False  # CLIP: keep the class token among the features (LLaVA drops it)
    projector: str = "mlp"  # mlp: one LLM token per patch; resampler: `resampler_tokens` learned queries
    resampler_tokens: int = 8
    # How the loaders make an image file into the encoder's input (the published processors).
    preprocess: ImagePreprocessConfig = field(default_factory=ImagePreprocessConfig)

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def num_features(self) -> int:
        """Encoder outputs an image gives the projector (or the resampler)."""
        return self.num_patches + (1 if self.arch == "clip" and self.keep_class_token else 0)

    @property
    def num_tokens(self) -> int:
        """LLM positions one image occupies."""
        return self.resampler_tokens if self.projector == "resampler" else self.num_features


@dataclass
class AudioConfig:
    """A Whisper encoder over log-mel frames on pipeline stage 0, and its projector."""

    arch: str = "whisper"  # WhisperEncoder: two GELU convolutions, fixed sinusoidal positions, final LayerNorm
    num_mel_bins: int = 80  # Whisper's feature_size: 80, or 128 (large-v3)
    # The window every clip is zero-padded or cut to before its log-mel (WhisperFeatureExtractor's
    # max_length), in 10 ms frames: 100 = 1 s; Whisper's 30 s chunk is 3000 = max_source_positions * 2.
    max_frames: int = 100
    num_layers: int = 2
    hidden_size: int = 64
    num_attention_heads: int = 4
    ffn_hidden_size: int = 128
    pool: int = 4  # average-pool the encoder's frames by this factor before projecting
    layer_norm_eps: float = 1e-5  # Whisper's LayerNorm (torch's default)

    @property
    def num_frames(self) -> int:
        """Frames after the stride-2 convolution."""
        return (self.max_frames - 1) // 2 + 1

    @property
    def num_tokens(self) -> int:
        """LLM positions one clip occupies."""
        return self.num_frames // self.pool


@dataclass
class ModelConfig:
    """DeepSeek-V3-style decoder: MLA attention, MoE with shared experts, optional MTP."""

    num_layers: int = 4
    hidden_size: int = 64
    ffn_hidden_size: int = 128  # dense MLP of the first `first_k_dense_layers` layers
    num_attention_heads: int = 4
    # Multi-head latent attention.
    q_lora_rank: Optional[int] = 32  # None: queries are not compressed (DeepSeek-V2-Lite)
    kv_lora_rank: int = 32
    qk_head_dim: int = 16  # per-head query/key size without the rotary part
    qk_pos_emb_head_dim: int = 8  # per-head rotary part (decoupled RoPE)
    v_head_dim: int = 16
    # Mixture of experts. num_experts None or 0 makes every layer dense.
    num_experts: Optional[int] = 4
    moe_ffn_hidden_size: int = 32
    moe_router_topk: int = 2
    num_shared_experts: int = 1
    first_k_dense_layers: int = 1
    router_score_function: str = "sigmoid"  # sigmoid (DeepSeek-V3) or softmax
    # softmax only: true takes the softmax over all experts, then the top k, whose
    # probabilities stay as they are (DeepSeek-V2); false takes the top k logits, then their
    # softmax (the chosen experts' weights sum to 1)
    router_pre_softmax: bool = False
    router_expert_bias: bool = True  # aux-loss-free balancing through a per-expert bias
    router_bias_update_rate: float = 1e-3
    router_topk_scaling_factor: Optional[float] = None
    router_num_groups: Optional[int] = None  # node-limited (group) routing
    router_group_topk: Optional[int] = None
    aux_loss_coeff: float = 0.0  # sequence-level auxiliary loss (DeepSeek-V3 uses 1e-4)
    # Routed experts as one grouped GEMM per projection (models/grouped_experts.py; TE:
    # TEGroupedMLP); false: megatron-core's SequentialMLP. Same parameters and checkpoints, and on
    # the CPU the same numbers bit for bit, faster.
    moe_grouped_gemm: bool = True
    # Multi-token prediction.
    mtp_num_layers: int = 0
    mtp_loss_scaling_factor: float = 0.1
    # Tokens and positions.
    vocab_size: int = 512
    seq_length: int = 64
    rope_type: str = "rope"  # rope or yarn
    # How attention keeps packed samples apart (`data.document_mask`): "fused" (FlexAttention over a
    # block mask from the segment ids on the portable spec, TE's THD format on the TE spec: no
    # [b, 1, s, s] tensor), or "dense_mask" (the boolean mask; kept to benchmark against).
    document_attention: str = "fused"
    rotary_base: float = 10000.0
    rotary_scaling_factor: float = 1.0  # YaRN context extension factor
    original_max_position_embeddings: int = 4096  # YaRN
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 0.0
    norm_epsilon: float = 1e-6
    init_method_std: float = 0.02
    share_embeddings_and_output_weights: bool = False
    # Encoders (None: text only). They live on pipeline stage 0.
    vision: Optional[VisionConfig] = None
    audio: Optional[AudioConfig] = None

    @property
    def is_moe(self) -> bool:
        return bool(self.num_experts)


@dataclass
class ParallelConfig:
    tp: int = 1
    pp: int = 1
    ep: int = 1
    etp: int = 1
    vpp: Optional[int] = None  # model chunks per pipeline rank (interleaved schedule)
    sequence_parallel: bool = False
    # Decoder layers on the first / last pipeline stage (megatron-core's
    # num_layers_in_first/last_pipeline_stage); the other stages share the rest evenly.
    # first_stage_layers null on a multimodal model with pp > 1: chosen to balance the
    # encoders' cost on stage 0 (costs/pipeline_split.py); otherwise null is the even split.
    first_stage_layers: Optional[int] = None
    last_stage_layers: Optional[int] = None
    # Activation recomputation: none, or full (every decoder layer keeps only its input and
    # recomputes its forward during backward: megatron-core's recompute_granularity=full,
    # recompute_method=uniform, recompute_num_layers=1).
    recompute: str = "none"


@dataclass
class PrecisionConfig:
    dtype: str = "fp32"  # fp32 or bf16 (parameters and activations)
    fp8: Optional[str] = None  # None, delayed, tensorwise or blockwise (needs TE on Hopper+)


@dataclass
class OptimizerConfig:
    name: str = "adam"
    lr: float = 3e-3
    min_lr: float = 3e-4
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    use_distributed_optimizer: bool = True


@dataclass
class SchedulerConfig:
    warmup_steps: int = 10
    decay_style: str = "cosine"  # cosine, linear, constant, inverse-square-root
    decay_steps: Optional[int] = None  # None: train.steps


@dataclass(frozen=True)
class ScheduleSteps:
    """The learning-rate schedule a run uses (`schedule_steps`)."""

    warmup_steps: int
    decay_steps: int
    note: Optional[str]  # one line when the configured steps were scaled to fit the run


def schedule_steps(train: "TrainConfig") -> ScheduleSteps:
    """Fit the configured schedule to a run of `train.steps` steps.

    A short run of a config written for a long one (`--set train.steps=5`) would otherwise be
    refused. A warmup that does not end before the run does marks such a run: its decay steps
    are cut to the run and the warmup to half of them, and `note` names the values used. A
    run whose warmup fits keeps decay steps beyond its end (a long schedule trained in
    chunks, each resuming the last). What a short run does not explain (decay steps shorter
    than the warmup in a run longer than both) is left as it is, for `validate` to refuse."""
    s, steps = train.scheduler, train.steps
    warmup, decay = s.warmup_steps, s.decay_steps or steps
    if steps <= 0 or warmup < steps or decay <= 0:
        return ScheduleSteps(warmup, decay, None)
    decay = min(decay, steps)
    warmup = decay // 2
    configured = f"train.scheduler.warmup_steps={s.warmup_steps}" + (
        f", decay_steps={s.decay_steps}" if s.decay_steps else "")
    return ScheduleSteps(warmup, decay, f"schedule: {configured} scaled to this {steps}-step run: "
                                        f"warmup_steps={warmup}, decay_steps={decay}")


@dataclass
class FreezeConfig:
    """Parts left out of training (LLaVA-style stage 1: only the projectors learn)."""

    vision_encoder: bool = False
    audio_encoder: bool = False
    projectors: bool = False
    language_model: bool = False


@dataclass
class TrainConfig:
    micro_batch_size: int = 2
    global_batch_size: int = 8
    steps: int = 100
    seed: int = 1234
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    freeze: FreezeConfig = field(default_factory=FreezeConfig)


@dataclass
class DataConfig:
    # synthetic: random tokens (benchmarks); corpus: the built-in generated text corpus;
    # indexed: megatron .bin/.idx files at `prefix` made by tools/prepare_data.py;
    # demo: the built-in procedural image/audio caption set (multimodal quickstart);
    # shards: WebDataset shards at `shards` (tools/build_shards.py) with `tokenizer`.
    source: str = "corpus"
    prefix: Optional[str] = None  # indexed dataset path prefix (without .bin/.idx)
    tokenizer: Optional[str] = None  # sentencepiece .model or HF tokenizer folder (tokenizer.json)
    cache_dir: str = "~/.cache/megatron_mm"  # where the corpus source builds its data
    corpus_documents: int = 4000
    shards: Optional[str] = None  # folder or glob of .tar shards (source=shards)
    # held-out shards tools/evaluate.py scores for source=shards: folders or globs, each one
    # split named after its folder (the demo source has its own heldout/novel splits)
    eval_shards: list[str] = field(default_factory=list)
    loader: str = "dali"  # dali (GPU decode where there is a GPU) or torch (PyTorch + Pillow)
    loader_threads: int = 2
    demo_samples: int = 2000  # train samples of the demo set (held-out: a tenth)
    split: str = "98,2,0"  # train, valid, test
    # Multimodal sources pack several samples into a sequence: true gives each packed sample
    # attention to itself only (a block-causal mask); false lets it see the samples packed
    # before it. Text sources record no sample boundaries and attend across documents, as
    # megatron-core's GPTDataset does by default; the setting does not apply to them.
    document_mask: bool = True


@dataclass
class CheckpointConfig:
    dir: Optional[str] = None  # None: <run.dir>/checkpoints
    save_interval: int = 0  # 0: only at the end and on SIGTERM
    load: Optional[str] = None  # a checkpoints folder (latest iteration) or an iter_* folder
    # false: take only the weights and start a new run at step 0 (fresh optimizer, schedule and
    # data position), e.g. LLaVA stage 2 after a stage 1 that trained the projectors alone
    load_optimizer: bool = True
    save_on_sigterm: bool = True
    save_at_end: bool = True  # false for benchmarks: nothing is written after the last step
    keep_last: Optional[int] = None  # N: delete all but the newest N iterations once a newer one is saved


@dataclass
class LoggingConfig:
    interval: int = 1
    tensorboard: bool = True
    peak_tflops_per_gpu: Optional[float] = None  # for MFU; None: MFU is not reported


@dataclass
class RunConfig:
    dir: str = "runs/default"


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    run: RunConfig = field(default_factory=RunConfig)

    @property
    def checkpoint_dir(self) -> str:
        return self.checkpoint.dir or os.path.join(self.run.dir, "checkpoints")

    @property
    def masks_documents(self) -> bool:
        """Whether attention stays inside each packed sample (`data.document_mask`)."""
        return self.data.document_mask and self.data.source in MULTIMODAL_SOURCES


# --------------------------------------------------------------------------- loading


def _field_types(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(value: Any, typ: Any, key: str) -> Any:
    """Turn a YAML/CLI value into `typ`, or raise ConfigError naming the key."""
    origin = typing.get_origin(typ)
    if origin is typing.Union:  # Optional[X]
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("null", "none", "~")):
            return None
        return _coerce(value, args[0], key)
    if origin is list:  # YAML list, or "a,b,c" from --set
        if isinstance(value, str):
            value = [v.strip() for v in value.strip("[]").split(",") if v.strip()]
        if not isinstance(value, list):
            raise ConfigError([f"{key}={value!r}: expected a list"])
        (item,) = typing.get_args(typ)
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(typ):
        if not isinstance(value, dict):
            raise ConfigError([f"{key}: expected a mapping, got {value!r}"])
        return _build(typ, value, key)
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError([f"{key}={value!r}: expected true or false"])
    if typ in (int, float):
        if isinstance(value, bool):
            raise ConfigError([f"{key}={value!r}: expected a number"])
        try:
            number = float(value) if typ is float else int(value)
        except (TypeError, ValueError, OverflowError):  # OverflowError: int(.inf)
            raise ConfigError([f"{key}={value!r}: expected {typ.__name__}"]) from None
        if typ is int and isinstance(value, float) and not value.is_integer():
            raise ConfigError([f"{key}={value!r}: expected an integer"])
        return number
    if typ is str:
        if value is None or isinstance(value, (dict, list)):  # str(None) would be "None"
            raise ConfigError([f"{key}={value!r}: expected a string"])
        return str(value)
    return value


def _build(cls, data: dict, prefix: str = ""):
    types = _field_types(cls)
    unknown = sorted(set(data) - set(types))
    if unknown:
        path = ", ".join(f"{prefix}{k}" if not prefix else f"{prefix}.{k}" for k in unknown)
        raise ConfigError([f"{path}: unknown key (known: {', '.join(sorted(types))})"])
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        kwargs[name] = _coerce(value, types[name], key)
    return cls(**kwargs)


def _set_dotted(tree: dict, dotted: str, raw: str) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError([f"{dotted}: {part} is not a section"])
    node[parts[-1]] = _parse_yaml(raw, f"{dotted}={raw!r}") if raw != "" else None


def _parse_yaml(text: str, where: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:  # str(err) spans several lines; the config error is one
        mark = getattr(err, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or " ".join(str(err).split())
        raise ConfigError([f"{where}: not valid YAML{at}: {problem}"]) from None


def load_config(path: Optional[str] = None, overrides: Optional[list[str]] = None) -> Config:
    """Load a YAML file (which may name a `base:` file relative to itself) and apply
    `dotted.key=value` overrides, values parsed as YAML scalars."""
    return config_from_tree(_read_yaml_tree(path) if path else {}, overrides)


def config_from_tree(tree: dict, overrides: Optional[list[str]] = None) -> Config:
    """A Config from a nested dict (a YAML file's, or `to_dict` of a stored config) with
    `dotted.key=value` overrides applied (`tree` is changed)."""
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError([f"--set {item!r}: expected dotted.key=value"])
        key, raw = item.split("=", 1)
        _set_dotted(tree, key.strip(), raw.strip())
    return _build(Config, tree)


def _read_yaml_tree(path: str, chain: tuple[str, ...] = ()) -> dict:
    """The YAML mapping of `path` merged over its `base:` files (a name or a list, relative
    to the file naming them). `chain` is the files whose bases led here, for the messages
    about a base that loops back into its own chain or does not exist."""
    path = os.path.normpath(path)
    here = (*chain, path)
    if os.path.realpath(path) in map(os.path.realpath, chain):
        raise ConfigError([f"config file {here[0]}: base chain loops: {' -> '.join(here)}"])
    if not os.path.exists(path):
        named_by = f" (named as base by {chain[-1]})" if chain else ""
        raise ConfigError([f"config file {path}: not found{named_by}"])
    with open(path) as f:
        tree = _parse_yaml(f.read(), f"config file {path}") or {}
    if not isinstance(tree, dict):
        raise ConfigError([f"config file {path}: top level must be a mapping"])
    base = tree.pop("base", None)
    if base is None:
        return tree
    bases = base if isinstance(base, list) else [base]
    if not all(isinstance(b, str) and b for b in bases):
        raise ConfigError([f"config file {path}: base={base!r}: must be a file name or a list of file names"])
    merged: dict = {}
    for b in bases:
        _deep_merge(merged, _read_yaml_tree(os.path.join(os.path.dirname(path), b), here))
    _deep_merge(merged, tree)
    return merged


def _deep_merge(dst: dict, src: dict) -> None:
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            _deep_merge(dst[k], v)
        else:
            dst[k] = v


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def add_config_args(parser) -> None:
    """The `--config FILE --set k=v ...` arguments every tool taking a training config has."""
    parser.add_argument("--config", required=True, help="YAML config file")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config value, e.g. --set parallel.tp=2 (repeatable)",
    )


# --------------------------------------------------------------------------- validation


@dataclass
class Hardware:
    """What validation needs to know about the machine: filled in by the runtime for the
    machine it runs on, or from a cluster profile (`megatron_mm.planning.cluster`) by tools
    that plan a job for a cluster (`tools/make_sbatch.py`)."""

    has_cuda: bool = False
    fp8_capable: bool = False  # compute capability >= 8.9 (Ada/Hopper)
    has_transformer_engine: bool = False
    device_name: str = "cpu"
    gpus_per_node: Optional[int] = None  # known for a cluster profile: ranks per node
    gpu_memory_gib: Optional[float] = None  # memory of one GPU (planning.fit); None: not checked
    reserved_memory_gib: float = 0.0  # of gpu_memory_gib, kept for CUDA context, NCCL, allocator


def shard_files(spec: str) -> list[str]:
    """The sorted `.tar` files of a shard folder or glob (`data.shards`, `data.eval_shards`)."""
    pattern = os.path.join(spec, "*.tar") if os.path.isdir(spec) else spec
    return sorted(os.path.abspath(p) for p in glob.glob(os.path.expanduser(pattern)) if p.endswith(".tar"))


def eval_split_name(spec: str) -> str:
    """The split name of a `data.eval_shards` entry: its folder's name (for a glob, the
    folder the pattern is in)."""
    path = os.path.normpath(spec)
    return os.path.basename(path if os.path.isdir(path) or not glob.has_magic(path) else os.path.dirname(path))


RESIZE_MODES = ("fixed", "shortest_edge")
RESAMPLE_FILTERS = ("nearest", "bilinear", "bicubic", "lanczos")
FP8_RECIPES = (None, "delayed", "tensorwise", "blockwise")
DATA_SOURCES = ("synthetic", "corpus", "indexed", "demo", "shards")
MULTIMODAL_SOURCES = ("demo", "shards")


def validate(cfg: Config, world_size: int, hardware: Hardware) -> None:
    """Check every rule a run depends on; raise ConfigError listing each violation."""
    m, p, t = cfg.model, cfg.parallel, cfg.train
    problems: list[str] = []

    def rule(ok: bool, key: str, value: Any, text: str) -> None:
        if not ok:
            problems.append(f"{key}={value}: {text}")

    positive = {
        "model.num_layers": m.num_layers, "model.hidden_size": m.hidden_size,
        "model.num_attention_heads": m.num_attention_heads, "model.vocab_size": m.vocab_size,
        "model.seq_length": m.seq_length, "model.kv_lora_rank": m.kv_lora_rank,
        "model.qk_head_dim": m.qk_head_dim, "model.qk_pos_emb_head_dim": m.qk_pos_emb_head_dim,
        "model.v_head_dim": m.v_head_dim, "parallel.tp": p.tp, "parallel.pp": p.pp,
        "parallel.ep": p.ep, "parallel.etp": p.etp, "train.micro_batch_size": t.micro_batch_size,
        "train.global_batch_size": t.global_batch_size, "model.ffn_hidden_size": m.ffn_hidden_size,
    }
    if m.q_lora_rank is not None:
        positive["model.q_lora_rank"] = m.q_lora_rank
    if m.is_moe:
        positive["model.num_experts"] = m.num_experts
        positive["model.moe_ffn_hidden_size"] = m.moe_ffn_hidden_size
    for key, value in positive.items():
        rule(value >= 1, key, value, "must be at least 1")
    rule(t.steps >= 0, "train.steps", t.steps, "must be >= 0 (0: only write the initial checkpoint)")
    if problems:
        raise ConfigError(problems)

    rule(m.qk_pos_emb_head_dim % 2 == 0, "model.qk_pos_emb_head_dim", m.qk_pos_emb_head_dim,
         "must be even (rotary embedding pairs)")
    rule(m.vocab_size % p.tp == 0, "model.vocab_size", m.vocab_size,
         f"must be divisible by parallel.tp={p.tp}")
    rule(m.num_attention_heads % p.tp == 0, "model.num_attention_heads", m.num_attention_heads,
         f"must be divisible by parallel.tp={p.tp}")
    if m.q_lora_rank is not None and m.q_lora_rank >= 1:
        rule(m.q_lora_rank % p.tp == 0, "model.q_lora_rank", m.q_lora_rank,
             f"must be divisible by parallel.tp={p.tp} (the query down-projection is column-parallel)")
    kv_down = m.kv_lora_rank + m.qk_pos_emb_head_dim
    rule(kv_down % p.tp == 0, "model.kv_lora_rank", m.kv_lora_rank,
         f"plus model.qk_pos_emb_head_dim={m.qk_pos_emb_head_dim} ({kv_down}) must be divisible by "
         f"parallel.tp={p.tp} (the key/value down-projection is column-parallel)")
    rule(m.rope_type in ("rope", "yarn"), "model.rope_type", m.rope_type, "must be rope or yarn")
    rule(m.document_attention in ("fused", "dense_mask"), "model.document_attention", m.document_attention,
         "must be fused or dense_mask")
    rule(not (cfg.masks_documents and m.document_attention == "dense_mask" and m.mtp_num_layers),
         "model.document_attention", m.document_attention,
         f"cannot serve model.mtp_num_layers={m.mtp_num_layers} (megatron-core's MTP layer takes no arbitrary "
         "mask): use fused, or data.document_mask=false")
    rule(m.router_score_function in ("sigmoid", "softmax"), "model.router_score_function",
         m.router_score_function, "must be sigmoid or softmax")
    rule(0 <= m.first_k_dense_layers <= m.num_layers, "model.first_k_dense_layers",
         m.first_k_dense_layers, f"must be between 0 and model.num_layers={m.num_layers}")
    rule(m.mtp_num_layers >= 0, "model.mtp_num_layers", m.mtp_num_layers, "must be >= 0")
    dense_layers = m.first_k_dense_layers if m.is_moe else m.num_layers
    if dense_layers or (m.mtp_num_layers and not m.is_moe):
        rule(m.ffn_hidden_size % p.tp == 0, "model.ffn_hidden_size", m.ffn_hidden_size,
             f"must be divisible by parallel.tp={p.tp}")
    if m.is_moe:
        shared = m.num_shared_experts * m.moe_ffn_hidden_size
        rule(shared % p.tp == 0, "model.num_shared_experts*model.moe_ffn_hidden_size", shared,
             f"must be divisible by parallel.tp={p.tp} (the shared experts are tensor-parallel)")
        rule(m.moe_ffn_hidden_size % p.etp == 0, "model.moe_ffn_hidden_size", m.moe_ffn_hidden_size,
             f"must be divisible by parallel.etp={p.etp}")
        rule(m.num_experts % p.ep == 0, "model.num_experts", m.num_experts,
             f"must be divisible by parallel.ep={p.ep}")
        rule(1 <= m.moe_router_topk <= m.num_experts, "model.moe_router_topk", m.moe_router_topk,
             f"must be between 1 and model.num_experts={m.num_experts}")
        rule(m.first_k_dense_layers < m.num_layers, "model.first_k_dense_layers",
             m.first_k_dense_layers, "leaves no MoE layer; set model.num_experts: null for a dense model")
        rule(not (m.router_expert_bias and m.router_score_function != "sigmoid"),
             "model.router_expert_bias", m.router_expert_bias,
             "aux-loss-free expert bias needs model.router_score_function=sigmoid")
        rule(not (m.router_pre_softmax and m.router_score_function != "softmax"),
             "model.router_pre_softmax", m.router_pre_softmax, "needs model.router_score_function=softmax")
        if m.router_num_groups:
            rule(m.num_experts % m.router_num_groups == 0, "model.router_num_groups",
                 m.router_num_groups, f"must divide model.num_experts={m.num_experts}")
            rule(m.router_group_topk is not None and 1 <= m.router_group_topk <= m.router_num_groups,
                 "model.router_group_topk", m.router_group_topk,
                 f"must be between 1 and model.router_num_groups={m.router_num_groups}")
        rule(p.tp == 1 or p.sequence_parallel, "parallel.sequence_parallel", p.sequence_parallel,
             f"must be true for an MoE model with parallel.tp={p.tp} > 1 (megatron-core rule)")
    else:
        rule(p.ep == 1, "parallel.ep", p.ep, "must be 1 for a dense model (model.num_experts unset)")
    rule(not (p.sequence_parallel and p.tp == 1), "parallel.sequence_parallel",
         p.sequence_parallel, "needs parallel.tp > 1")

    # Encoders.
    encoders = {"model.vision": m.vision, "model.audio": m.audio}
    for prefix, enc in encoders.items():
        if enc is None:
            continue
        for name in ("num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size"):
            rule(getattr(enc, name) >= 1, f"{prefix}.{name}", getattr(enc, name), "must be at least 1")
        rule(enc.layer_norm_eps > 0, f"{prefix}.layer_norm_eps", enc.layer_norm_eps, "must be positive")
        if enc.num_attention_heads >= 1:
            rule(enc.hidden_size % enc.num_attention_heads == 0, f"{prefix}.hidden_size", enc.hidden_size,
                 f"must be divisible by {prefix}.num_attention_heads={enc.num_attention_heads}")
            rule(enc.num_attention_heads % p.tp == 0, f"{prefix}.num_attention_heads", enc.num_attention_heads,
                 f"must be divisible by parallel.tp={p.tp}")
        rule(enc.ffn_hidden_size % p.tp == 0, f"{prefix}.ffn_hidden_size", enc.ffn_hidden_size,
             f"must be divisible by parallel.tp={p.tp}")
    vis, aud = m.vision, m.audio
    if vis is not None:
        rule(vis.patch_size >= 1 and vis.image_size >= vis.patch_size and vis.image_size % vis.patch_size == 0,
             "model.vision.image_size", vis.image_size,
             f"must be a multiple of model.vision.patch_size={vis.patch_size}")
        rule(vis.projector in ("mlp", "resampler"), "model.vision.projector", vis.projector,
             "must be mlp or resampler")
        rule(vis.resampler_tokens >= 1, "model.vision.resampler_tokens", vis.resampler_tokens, "must be at least 1")
        pre, key = vis.preprocess, "model.vision.preprocess"
        rule(pre.resize in RESIZE_MODES, f"{key}.resize", pre.resize, f"must be {' or '.join(RESIZE_MODES)}")
        rule(pre.resample in RESAMPLE_FILTERS, f"{key}.resample", pre.resample,
             f"must be one of {', '.join(RESAMPLE_FILTERS)}")
        target = vis.image_size if pre.size is None else pre.size
        if pre.center_crop:
            rule(target >= vis.image_size, f"{key}.size", pre.size,
                 f"must be at least model.vision.image_size={vis.image_size} to crop that square from it")
        else:
            rule(pre.resize == "fixed", f"{key}.resize", pre.resize,
                 "needs model.vision.preprocess.center_crop=true (the encoder takes a square image)")
            rule(target == vis.image_size, f"{key}.size", pre.size,
                 f"must be null or model.vision.image_size={vis.image_size} without center_crop")
        rule(pre.rescale_factor > 0, f"{key}.rescale_factor", pre.rescale_factor, "must be > 0")
        for name, values in (("mean", pre.mean), ("std", pre.std)):
            rule(len(values) == 3, f"{key}.{name}", values, "must have 3 values (R, G, B)")
        rule(all(v > 0 for v in pre.std), f"{key}.std", pre.std, "must be positive")
        rule(vis.arch in ("siglip", "clip"), "model.vision.arch", vis.arch, "must be siglip or clip")
        rule(vis.num_layers < 1 or (-vis.num_layers <= vis.feature_layer <= vis.num_layers and vis.feature_layer != 0),
             "model.vision.feature_layer", vis.feature_layer,
             f"must select a layer: 1..{vis.num_layers} or -1..-{vis.num_layers} (model.vision.num_layers={vis.num_layers})")
        rule(not vis.post_layernorm or vis.feature_layer in (-1, vis.num_layers), "model.vision.post_layernorm",
             vis.post_layernorm, f"needs the last layer's features (model.vision.feature_layer={vis.feature_layer})")
        rule(not vis.keep_class_token or vis.arch == "clip", "model.vision.keep_class_token", vis.keep_class_token,
             f"only CLIP has a class token (model.vision.arch={vis.arch})")
    if aud is not None:
        rule(aud.num_mel_bins >= 1, "model.audio.num_mel_bins", aud.num_mel_bins, "must be at least 1")
        rule(aud.arch == "whisper", "model.audio.arch", aud.arch, "must be whisper")
        rule(aud.max_frames % 2 == 0, "model.audio.max_frames", aud.max_frames,
             "must be even (Whisper: twice the positions after the stride-2 convolution)")
        rule(aud.pool >= 1 and aud.max_frames >= 1 and aud.num_tokens >= 1, "model.audio.max_frames", aud.max_frames,
             f"leaves no audio token after the stride-2 convolution and pooling by model.audio.pool={aud.pool}")
    mm_source = cfg.data.source in MULTIMODAL_SOURCES
    rule(not mm_source or vis is not None or aud is not None, "data.source", cfg.data.source,
         "is multimodal: set model.vision and/or model.audio")
    rule(cfg.data.source != "demo" or (vis is not None and aud is not None), "data.source", cfg.data.source,
         "the demo set has images and audio: set both model.vision and model.audio")
    rule(mm_source or (vis is None and aud is None), "model.vision/model.audio", "set",
         f"need a multimodal data.source ({' or '.join(MULTIMODAL_SOURCES)}), not {cfg.data.source}")
    f = t.freeze
    rule(not (f.language_model and f.projectors and (vis is None or f.vision_encoder)
              and (aud is None or f.audio_encoder)), "train.freeze", "everything", "leaves nothing to train")

    # Layout against the world.
    model_parallel = p.tp * p.pp
    rule(world_size % model_parallel == 0, "parallel.tp*parallel.pp", model_parallel,
         f"must divide the world size {world_size}")
    if world_size % model_parallel == 0:
        dp = world_size // model_parallel
        expert_parallel = p.ep * p.etp * p.pp
        rule(world_size % expert_parallel == 0, "parallel.ep*parallel.etp*parallel.pp",
             expert_parallel, f"must divide the world size {world_size}")
        per_step = t.micro_batch_size * dp
        rule(t.global_batch_size % per_step == 0, "train.global_batch_size", t.global_batch_size,
             f"must be divisible by train.micro_batch_size*data_parallel="
             f"{t.micro_batch_size}*{dp}={per_step}")
        if p.vpp and p.pp > 1 and t.global_batch_size % per_step == 0:
            microbatches = t.global_batch_size // per_step
            rule(microbatches % p.pp == 0, "train.global_batch_size", t.global_batch_size,
                 f"gives {microbatches} micro-batches, which the interleaved schedule needs "
                 f"divisible by parallel.pp={p.pp}")
    # Pipeline split: the rules megatron-core's TransformerConfig applies to
    # num_layers_in_first/last_pipeline_stage (costs/pipeline_split.py has the split itself).
    L, v = m.num_layers, p.vpp if p.vpp and p.vpp >= 1 else 1
    chunks = p.pp * v
    uneven_fits = p.pp > 1 and L % v == 0 and L >= chunks  # some [first, middle..., last] split exists
    given = {key: n for key, n in (("parallel.first_stage_layers", p.first_stage_layers),
                                   ("parallel.last_stage_layers", p.last_stage_layers)) if n is not None}
    for key, n in given.items():
        rule(p.pp > 1, key, n, "needs parallel.pp > 1")
        rule(n >= 1, key, n, "must be at least 1 (megatron-core rule)")
        if p.vpp and n >= 1:
            rule(n % v == 0, key, n, f"must be divisible by parallel.vpp={p.vpp} (megatron-core rule)")
    auto = p.pp > 1 and p.first_stage_layers is None and (vis is not None or aud is not None)
    if given and p.pp > 1 and all(n >= 1 and n % v == 0 for n in given.values()):
        rest = L - sum(given.values())
        keys, values = "+".join(given), "+".join(map(str, given.values()))
        if auto:  # only the last stage is given; the first and the middle ones get >= vpp layers each
            rule(rest >= (p.pp - 1) * v and rest % v == 0, keys, values,
                 f"leaves {rest} of model.num_layers={L} for the other {p.pp - 1} stage(s): must be at least "
                 f"{(p.pp - 1) * v}" + (f" and a multiple of parallel.vpp={p.vpp}" if p.vpp else ""))
        elif len(given) == p.pp:  # pp=2, both given: no middle stage
            rule(rest == 0, keys, values, f"must add up to model.num_layers={L} (parallel.pp={p.pp}: no other stage)")
        else:
            others = p.pp - len(given)
            vpp_note = f" ({others} stages*parallel.vpp={p.vpp})" if p.vpp else ""
            rule(rest >= others * v and rest % (others * v) == 0, keys, values,
                 f"leaves {rest} of model.num_layers={L} for the other {others} stage(s): must be a positive "
                 f"multiple of {others * v}{vpp_note} (megatron-core rule)")
    elif not given and auto:
        rule(uneven_fits, "model.num_layers", L,
             f"cannot give each of parallel.pp={p.pp} stages at least {v} layer(s)"
             + (f", a multiple of parallel.vpp={p.vpp}" if p.vpp else ""))
    elif not given:
        rule(L % chunks == 0, "model.num_layers", L, f"must be divisible by parallel.pp*parallel.vpp={chunks}"
             + (" (or set parallel.first_stage_layers / parallel.last_stage_layers)" if uneven_fits else ""))
    if p.vpp is not None:
        rule(p.vpp >= 1, "parallel.vpp", p.vpp, "must be at least 1 (or null)")
        rule(p.vpp == 1 or p.pp > 1, "parallel.vpp", p.vpp, "needs parallel.pp > 1")
    rule(p.recompute in ("none", "full"), "parallel.recompute", p.recompute, "must be none or full")
    rule(p.etp == 1 or hardware.has_cuda, "parallel.etp", p.etp,
         "must be 1 on gloo (CPU): gloo has no uneven all_gather, which expert TP needs")
    if hardware.gpus_per_node:
        # Ranks fill nodes in order (srun block distribution) and tensor parallelism varies
        # fastest in megatron's rank order, so a TP group is `tp` consecutive ranks: it stays
        # inside one node exactly when tp divides the node's GPU count.
        n, where = hardware.gpus_per_node, f"{hardware.gpus_per_node} GPUs of a node ({hardware.device_name})"
        for key, size in (("parallel.tp", p.tp), ("parallel.etp", p.etp)):
            rule(size <= n, key, size, f"is larger than the {where}: a tensor-parallel group must stay inside one node")
            rule(size > n or n % size == 0, key, size,
                 f"must divide the {where}, or its tensor-parallel groups would straddle nodes")

    # Precision and hardware.
    rule(cfg.precision.dtype in ("fp32", "bf16"), "precision.dtype", cfg.precision.dtype,
         "must be fp32 or bf16")
    rule(cfg.precision.fp8 in FP8_RECIPES, "precision.fp8", cfg.precision.fp8,
         "must be null, delayed, tensorwise or blockwise")
    if cfg.precision.fp8 in FP8_RECIPES[1:]:
        rule(hardware.has_transformer_engine, "precision.fp8", cfg.precision.fp8,
             "needs Transformer Engine, which is not installed")
        rule(hardware.fp8_capable, "precision.fp8", cfg.precision.fp8,
             f"needs a GPU with FP8 (Hopper/Ada, compute capability >= 8.9); this is {hardware.device_name}")
        rule(cfg.precision.dtype == "bf16", "precision.dtype", cfg.precision.dtype,
             "must be bf16 when precision.fp8 is set")

    # Training.
    o, s = t.optimizer, t.scheduler
    rule(o.name in ("adam", "sgd"), "train.optimizer.name", o.name, "must be adam or sgd")
    rule(o.lr > 0, "train.optimizer.lr", o.lr, "must be > 0")
    # (a bad lr is reported once, by the rule above, not again through min_lr <= lr)
    rule(o.min_lr >= 0 and (o.lr <= 0 or o.min_lr <= o.lr), "train.optimizer.min_lr", o.min_lr,
         f"must be between 0 and train.optimizer.lr={o.lr}")
    rule(o.clip_grad >= 0, "train.optimizer.clip_grad", o.clip_grad, "must be >= 0 (0 disables)")
    rule(s.decay_style in ("cosine", "linear", "constant", "inverse-square-root"),
         "train.scheduler.decay_style", s.decay_style,
         "must be cosine, linear, constant or inverse-square-root")
    rule(s.warmup_steps >= 0, "train.scheduler.warmup_steps", s.warmup_steps, "must be >= 0")
    rule(s.decay_steps is None or s.decay_steps >= 1, "train.scheduler.decay_steps", s.decay_steps,
         "must be >= 1 (or null: train.steps)")
    fitted = schedule_steps(t)
    rule(t.steps == 0 or s.warmup_steps < 0 or fitted.warmup_steps == 0
         or fitted.warmup_steps < fitted.decay_steps, "train.scheduler.warmup_steps", s.warmup_steps,
         f"must be 0 or smaller than train.scheduler.decay_steps ({s.decay_steps})")

    # Data, checkpoints, logging.
    d = cfg.data
    rule(d.source in DATA_SOURCES, "data.source", d.source, f"must be one of {', '.join(DATA_SOURCES)}")
    rule(d.loader in ("dali", "torch"), "data.loader", d.loader, "must be dali or torch")
    if d.source == "shards":
        rule(bool(d.shards), "data.shards", d.shards, "is required when data.source=shards")
        rule(bool(d.tokenizer) and os.path.exists(d.tokenizer or ""), "data.tokenizer", d.tokenizer,
             "must name an existing sentencepiece .model with the multimodal pieces, or a Hugging Face tokenizer "
             "folder, when data.source=shards")
    rule(not d.eval_shards or d.source == "shards", "data.eval_shards", d.eval_shards,
         "is for data.source=shards (the demo source has its own held-out splits)")
    if d.source == "shards":
        for i, spec in enumerate(d.eval_shards):
            rule(bool(shard_files(spec)), f"data.eval_shards[{i}]", spec,
                 "has no .tar shards (a folder or glob; tools/prepare_multimodal.py --heldout makes one)")
        names = [eval_split_name(spec) for spec in d.eval_shards]
        rule(len(set(names)) == len(names), "data.eval_shards", d.eval_shards,
             f"split names {names} (each folder's name) must differ")
    if d.source == "demo":
        rule(d.demo_samples >= 10, "data.demo_samples", d.demo_samples, "must be at least 10")
    if d.source == "indexed":
        rule(bool(d.prefix), "data.prefix", d.prefix, "is required when data.source=indexed")
        if d.prefix:
            rule(os.path.exists(d.prefix + ".bin") and os.path.exists(d.prefix + ".idx"),
                 "data.prefix", d.prefix, "has no .bin/.idx pair (make one with tools/prepare_data.py)")
        rule(bool(d.tokenizer) and os.path.exists(d.tokenizer or ""), "data.tokenizer", d.tokenizer,
             "must name an existing sentencepiece .model or Hugging Face tokenizer folder when data.source=indexed")
    rule(cfg.checkpoint.save_interval >= 0, "checkpoint.save_interval",
         cfg.checkpoint.save_interval, "must be >= 0 (0: save only at the end)")
    rule(cfg.checkpoint.keep_last is None or cfg.checkpoint.keep_last >= 1, "checkpoint.keep_last",
         cfg.checkpoint.keep_last, "must be >= 1 (or null: keep every iteration)")
    if cfg.checkpoint.load:
        rule(os.path.isdir(cfg.checkpoint.load), "checkpoint.load", cfg.checkpoint.load,
             "is not a folder")
    rule(cfg.logging.interval >= 1, "logging.interval", cfg.logging.interval, "must be at least 1")

    if problems:
        raise ConfigError(problems)
