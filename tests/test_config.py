"""Typed config: the shipped model configs load through `base:` inheritance, `--set`
overrides are typed, every bad config (a bad file, a bad `--set`, a rule `validate` refuses)
is refused with exactly one line naming key, value and rule, the launcher stops on one
before any process group, the quickstart fits the CPU test layouts, the large models fit
production layouts, and the parameter arithmetic prices the shipped DeepSeek shapes at their
published sizes.

Fast: no process groups, no torch model is built (the launcher test starts one Python).
"""

import dataclasses
import json
import os
import subprocess
import sys

import pytest
import yaml

from conftest import QUICKSTART, ROOT
from megatron_mm.config import (
    Config, ConfigError, Hardware, LoggingConfig, ModelConfig, OptimizerConfig, load_config, schedule_steps,
    validate,
)
from megatron_mm.models.params import estimate_parameters

MODELS = os.path.join(ROOT, "configs", "models")
V3 = os.path.join(MODELS, "deepseek_v3_671b.yaml")
MULTIMODAL = os.path.join(ROOT, "configs", "quickstart.yaml")

CPU = Hardware(has_cuda=False, fp8_capable=False, has_transformer_engine=False, device_name="cpu")
A100 = Hardware(has_cuda=True, fp8_capable=False, has_transformer_engine=True, device_name="NVIDIA A100")
H100_NO_TE = Hardware(has_cuda=True, fp8_capable=True, has_transformer_engine=False, device_name="NVIDIA H100")
H100 = Hardware(has_cuda=True, fp8_capable=True, has_transformer_engine=True, device_name="NVIDIA H100")


def run_yaml(tmp_path, model: str, body: str = "", name: str = "run.yaml") -> str:
    """A run config in tmp_path whose `base:` is a shipped model file, by absolute path
    (os.path.join(dir, absolute) is the absolute path, so it need not sit next to it)."""
    base = os.path.join(MODELS, f"{model}.yaml")
    path = tmp_path / name
    path.write_text(f"base: {json.dumps(base)}\n{body}")  # JSON string: valid YAML, quoted
    return str(path)


TINY_RUN = """\
train: {micro_batch_size: 1, global_batch_size: 8, steps: 100}
run: {dir: runs/test}
"""


@pytest.fixture
def tiny(tmp_path):
    return run_yaml(tmp_path, "tiny", TINY_RUN)


# --------------------------------------------------------------------------- loading

EXPECTED = {
    "tiny": dict(
        num_layers=4, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4, q_lora_rank=32,
        kv_lora_rank=32, qk_head_dim=16, qk_pos_emb_head_dim=8, v_head_dim=16, num_experts=4,
        moe_ffn_hidden_size=32, moe_router_topk=2, num_shared_experts=1, first_k_dense_layers=1,
        router_score_function="sigmoid", router_expert_bias=True, vocab_size=512, seq_length=64,
    ),
    "deepseek_v2_lite_16b": dict(
        num_layers=27, hidden_size=2048, ffn_hidden_size=10944, num_attention_heads=16,
        q_lora_rank=None, kv_lora_rank=512, qk_head_dim=128, qk_pos_emb_head_dim=64, v_head_dim=128,
        num_experts=64, moe_ffn_hidden_size=1408, moe_router_topk=6, num_shared_experts=2,
        first_k_dense_layers=1, router_score_function="softmax", router_expert_bias=False,
        router_pre_softmax=True, vocab_size=102400, seq_length=4096, rope_type="yarn", rotary_base=10000.0,
        rotary_scaling_factor=40.0, original_max_position_embeddings=4096, beta_fast=32.0,
        beta_slow=1.0, mscale=0.707, mscale_all_dim=0.707, mtp_num_layers=0,
    ),
    "deepseek_v3_671b": dict(
        num_layers=61, hidden_size=7168, ffn_hidden_size=18432, num_attention_heads=128,
        q_lora_rank=1536, kv_lora_rank=512, qk_head_dim=128, qk_pos_emb_head_dim=64, v_head_dim=128,
        num_experts=256, moe_ffn_hidden_size=2048, moe_router_topk=8, num_shared_experts=1,
        first_k_dense_layers=3, router_score_function="sigmoid", router_expert_bias=True,
        router_bias_update_rate=1e-3, router_topk_scaling_factor=2.5, router_num_groups=8,
        router_group_topk=4, aux_loss_coeff=1e-4, mtp_num_layers=1, mtp_loss_scaling_factor=0.1,
        vocab_size=129280, seq_length=4096, rope_type="yarn", rotary_scaling_factor=40.0,
        original_max_position_embeddings=4096, beta_fast=32.0, beta_slow=1.0, mscale=1.0,
        mscale_all_dim=1.0, init_method_std=0.006,
    ),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_shipped_model_config_loads_through_base(tmp_path, monkeypatch, name):
    with open(os.path.join(MODELS, f"{name}.yaml")) as f:
        assert set(yaml.safe_load(f)) == {"model"}, "model files hold only the model section"
    monkeypatch.chdir(tmp_path)  # the absolute base resolves from anywhere
    cfg = load_config(run_yaml(tmp_path, name, TINY_RUN))
    assert isinstance(cfg, Config) and isinstance(cfg.model, ModelConfig)
    for key, value in EXPECTED[name].items():
        got = getattr(cfg.model, key)
        assert got == value and type(got) is type(value), f"model.{key}: {got!r} != {value!r}"
    assert cfg.train.micro_batch_size == 1 and cfg.run.dir == "runs/test"
    # The run file's other sections keep their defaults; the model is the base's.
    assert cfg.parallel.tp == 1 and cfg.model == load_config(os.path.join(MODELS, f"{name}.yaml")).model


def test_relative_chained_and_shared_bases_merge_deeply(tmp_path):
    (tmp_path / "models").mkdir()
    (tmp_path / "common.yaml").write_text("model: {vocab_size: 256}\nrun: {dir: runs/common}\n")
    (tmp_path / "models" / "m.yaml").write_text("base: ../common.yaml\nmodel: {num_layers: 8, hidden_size: 32}\n")
    (tmp_path / "par.yaml").write_text("base: common.yaml\nparallel: {tp: 2, sequence_parallel: true}\n")
    # mid reaches common.yaml twice (through m.yaml and par.yaml): shared, not a loop.
    (tmp_path / "mid.yaml").write_text("base: [models/m.yaml, par.yaml]\nmodel: {num_layers: 6}\n")
    (tmp_path / "run.yaml").write_text("base: mid.yaml\nparallel: {pp: 2}\n")
    cfg = load_config(str(tmp_path / "run.yaml"))
    assert (cfg.model.num_layers, cfg.model.hidden_size) == (6, 32)  # later file wins, key by key
    assert (cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.sequence_parallel) == (2, 2, True)
    assert (cfg.model.vocab_size, cfg.run.dir) == (256, "runs/common")
    assert cfg.model.seq_length == ModelConfig().seq_length  # untouched keys keep defaults


def test_set_overrides_are_typed(tiny):
    cfg = load_config(tiny, [
        "parallel.tp=2",                       # int
        "parallel.pp=2.0",                     # an integral float is an int
        "model.rotary_base=500000",            # int -> float
        "train.optimizer.lr=1e-3",             # YAML reads 1e-3 as a string; still a float
        "train.optimizer.adam_beta2=0.98",     # nested two deep
        "train.scheduler.decay_steps=50",      # Optional[int], nested
        "logging.tensorboard=false",           # bool
        "parallel.sequence_parallel=yes",      # bool, YAML spelling
        "parallel.vpp=null",                   # null into Optional
        "model.q_lora_rank=~",                 # null, YAML spelling
        "model.router_topk_scaling_factor=2.5",
        "train.micro_batch_size=2",            # overrides beat the YAML file
        "data.split=90,10,0",                  # str stays str
    ])
    assert cfg.parallel.tp == 2 and type(cfg.parallel.tp) is int
    assert cfg.parallel.pp == 2 and type(cfg.parallel.pp) is int
    assert cfg.model.rotary_base == 500000.0 and type(cfg.model.rotary_base) is float
    assert cfg.train.optimizer.lr == 1e-3 and type(cfg.train.optimizer.lr) is float
    assert cfg.train.optimizer.adam_beta2 == 0.98 and cfg.train.scheduler.decay_steps == 50
    assert cfg.logging.tensorboard is False and cfg.parallel.sequence_parallel is True
    assert cfg.parallel.vpp is None and cfg.model.q_lora_rank is None
    assert cfg.model.router_topk_scaling_factor == 2.5
    assert cfg.train.micro_batch_size == 2 and cfg.train.global_batch_size == 8
    assert cfg.data.split == "90,10,0"
    # Sections not mentioned by the override keep the file's values.
    assert cfg.train.steps == 100 and cfg.model.num_layers == 4


def test_set_mapping_value(tiny):
    cfg = load_config(tiny, ["parallel={tp: 2, ep: 2}"])
    assert (cfg.parallel.tp, cfg.parallel.ep, cfg.parallel.pp) == (2, 2, 1)


# --------------------------------------------------------------------------- bad configs


def known(cls) -> str:
    """The key list an unknown-key message offers for a config section."""
    return ", ".join(sorted(f.name for f in dataclasses.fields(cls)))


def bad(id, line, overrides=(), world=1, hardware=CPU, config="run.yaml", files=None):
    """A bad config: `config` (after writing `files`, paths relative to the working folder)
    with `overrides`, validated for `world` ranks on `hardware`, is refused with `line`."""
    return pytest.param(config, files or {}, list(overrides), world, hardware, line, id=id)


BAD = [
    # config files and their base chains
    bad("config missing", "config file nope.yaml: not found", config="nope.yaml"),
    bad("base missing", "config file missing.yaml: not found (named as base by m.yaml)",
        config="m.yaml", files={"m.yaml": "base: missing.yaml\n"}),
    bad("base missing two deep", "config file sub/missing.yaml: not found (named as base by sub/m.yaml)",
        config="top.yaml", files={"top.yaml": "base: [run.yaml, sub/m.yaml]\n", "sub/m.yaml": "base: missing.yaml\n"}),
    bad("base loops", "config file a.yaml: base chain loops: a.yaml -> b.yaml -> a.yaml",
        config="a.yaml", files={"a.yaml": "base: b.yaml\n", "b.yaml": "base: a.yaml\n"}),
    bad("base names itself", "config file self.yaml: base chain loops: self.yaml -> self.yaml",
        config="self.yaml", files={"self.yaml": "base: self.yaml\n"}),
    bad("base loops through a folder", "config file loop.yaml: base chain loops: loop.yaml -> sub/b.yaml -> loop.yaml",
        config="loop.yaml", files={"loop.yaml": "base: [run.yaml, sub/b.yaml]\n", "sub/b.yaml": "base: ../loop.yaml\n"}),
    bad("base not a name", "config file n.yaml: base=3: must be a file name or a list of file names",
        config="n.yaml", files={"n.yaml": "base: 3\n"}),
    bad("file not yaml", "config file y.yaml: not valid YAML at line 2, column 1: expected ',' or '}', but got '<stream end>'",
        config="y.yaml", files={"y.yaml": "model: {num_layers: 2\n"}),
    bad("file not a mapping", "config file l.yaml: top level must be a mapping", config="l.yaml", files={"l.yaml": "- 1\n"}),
    # --set values and keys
    bad("set without =", "--set 'parallel.tp': expected dotted.key=value", ["parallel.tp"]),
    bad("set not yaml", "parallel.tp='[1,': not valid YAML at line 1, column 4: expected the node content, "
        "but found '<stream end>'", ["parallel.tp=[1,"]),
    bad("set into a value", "run.dir.x: dir is not a section", ["run.dir.x=1"]),
    bad("int from a word", "parallel.tp='two': expected int", ["parallel.tp=two"]),
    bad("int from a fraction", "parallel.tp=2.5: expected an integer", ["parallel.tp=2.5"]),
    bad("int from inf", "parallel.tp=inf: expected int", ["parallel.tp=.inf"]),
    bad("int from a bool", "parallel.tp=True: expected a number", ["parallel.tp=true"]),
    bad("float from a word", "train.optimizer.lr='fast': expected float", ["train.optimizer.lr=fast"]),
    bad("bool from a word", "logging.tensorboard='maybe': expected true or false", ["logging.tensorboard=maybe"]),
    bad("section from a number", "train: expected a mapping, got 3", ["train=3"]),
    bad("string from nothing", "run.dir=None: expected a string", ["run.dir="]),
    bad("unknown model key", f"model.num_expert: unknown key (known: {known(ModelConfig)})", ["model.num_expert=4"]),
    bad("unknown nested key", f"train.optimizer.lrr: unknown key (known: {known(OptimizerConfig)})",
        ["train.optimizer.lrr=1"]),
    bad("unknown section", f"modle: unknown key (known: {known(Config)})", ["modle.num_layers=2"]),
    bad("unknown key in yaml", f"train.optimizer.betas: unknown key (known: {known(OptimizerConfig)})",
        config="b.yaml", files={"b.yaml": "base: run.yaml\ntrain:\n  optimizer: {lr: 1.0e-3, betas: [0.9, 0.95]}\n"}),
    bad("unknown key in yaml section", f"logging.every: unknown key (known: {known(LoggingConfig)})",
        config="b.yaml", files={"b.yaml": "base: run.yaml\nlogging: {every: 2}\n"}),
    # model against layout
    bad("heads % tp", "model.num_attention_heads=4: must be divisible by parallel.tp=8",
        ["parallel.tp=8", "parallel.sequence_parallel=true"], world=8),
    bad("vocab % tp", "model.vocab_size=511: must be divisible by parallel.tp=2",
        ["model.vocab_size=511", "parallel.tp=2", "parallel.sequence_parallel=true"], world=2),
    bad("experts % ep", "model.num_experts=6: must be divisible by parallel.ep=4",
        ["model.num_experts=6", "parallel.ep=4"], world=4),
    bad("kv down-projection % tp", "model.kv_lora_rank=31: plus model.qk_pos_emb_head_dim=8 (39) must be "
        "divisible by parallel.tp=2 (the key/value down-projection is column-parallel)",
        ["model.kv_lora_rank=31", "parallel.tp=2", "parallel.sequence_parallel=true"], world=2),
    bad("q down-projection % tp", "model.q_lora_rank=30: must be divisible by parallel.tp=4 "
        "(the query down-projection is column-parallel)",
        ["model.q_lora_rank=30", "parallel.tp=4", "parallel.sequence_parallel=true"], world=4),
    bad("layers % pp*vpp", "model.num_layers=4: must be divisible by parallel.pp*parallel.vpp=8",
        ["parallel.pp=2", "parallel.vpp=4"], world=2),
    bad("v3 over pp16", "model.num_layers=61: must be divisible by parallel.pp*parallel.vpp=16 "
        "(or set parallel.first_stage_layers / parallel.last_stage_layers)",
        ["parallel.pp=16", "parallel.ep=64", "train.micro_batch_size=1", "train.global_batch_size=2048"],
        world=2048, hardware=H100, config=V3),
    # pipeline split (megatron-core's num_layers_in_first/last_pipeline_stage rules)
    bad("first stage without pp", "parallel.first_stage_layers=1: needs parallel.pp > 1",
        ["parallel.first_stage_layers=1"]),
    bad("last stage empty", "parallel.last_stage_layers=0: must be at least 1 (megatron-core rule)",
        ["parallel.pp=2", "parallel.last_stage_layers=0"], world=2),
    bad("first stage % vpp", "parallel.first_stage_layers=1: must be divisible by parallel.vpp=2 (megatron-core rule)",
        ["parallel.pp=2", "parallel.vpp=2", "parallel.first_stage_layers=1"], world=2),
    bad("first+last != layers", "parallel.first_stage_layers+parallel.last_stage_layers=1+2: must add up to "
        "model.num_layers=4 (parallel.pp=2: no other stage)",
        ["parallel.pp=2", "parallel.first_stage_layers=1", "parallel.last_stage_layers=2"], world=2),
    bad("first leaves nothing", "parallel.first_stage_layers=4: leaves 0 of model.num_layers=4 for the other 1 "
        "stage(s): must be a positive multiple of 1 (megatron-core rule)",
        ["parallel.pp=2", "parallel.first_stage_layers=4"], world=2),
    bad("middle stages uneven", "parallel.first_stage_layers+parallel.last_stage_layers=1+2: leaves 5 of "
        "model.num_layers=8 for the other 2 stage(s): must be a positive multiple of 2 (megatron-core rule)",
        ["model.num_layers=8", "parallel.pp=4", "parallel.first_stage_layers=1", "parallel.last_stage_layers=2"],
        world=4),
    bad("middle stages % vpp", "parallel.first_stage_layers+parallel.last_stage_layers=2+4: leaves 6 of "
        "model.num_layers=12 for the other 2 stage(s): must be a positive multiple of 4 (2 stages*parallel.vpp=2) "
        "(megatron-core rule)",
        ["model.num_layers=12", "parallel.pp=4", "parallel.vpp=2", "parallel.first_stage_layers=2",
         "parallel.last_stage_layers=4"], world=4),
    bad("auto split impossible", "model.num_layers=4: cannot give each of parallel.pp=4 stages at least 2 layer(s), "
        "a multiple of parallel.vpp=2", ["parallel.pp=4", "parallel.vpp=2"], world=4, config=MULTIMODAL),
    bad("auto split with a full last stage", "parallel.last_stage_layers=4: leaves 0 of model.num_layers=4 for the "
        "other 1 stage(s): must be at least 1", ["parallel.pp=2", "parallel.last_stage_layers=4"], world=2,
        config=MULTIMODAL),
    bad("image resize not square", "model.vision.preprocess.resize=shortest_edge: needs "
        "model.vision.preprocess.center_crop=true (the encoder takes a square image)",
        ["model.vision.preprocess.resize=shortest_edge"], config=MULTIMODAL),
    bad("image crop larger than the resize", "model.vision.preprocess.size=24: must be at least "
        "model.vision.image_size=32 to crop that square from it",
        ["model.vision.preprocess.center_crop=true", "model.vision.preprocess.size=24"], config=MULTIMODAL),
    bad("image resize to another size", "model.vision.preprocess.size=40: must be null or model.vision.image_size=32 "
        "without center_crop", ["model.vision.preprocess.size=40"], config=MULTIMODAL),
    bad("image filter", "model.vision.preprocess.resample=box: must be one of nearest, bilinear, bicubic, lanczos",
        ["model.vision.preprocess.resample=box"], config=MULTIMODAL),
    bad("image std", "model.vision.preprocess.std=[0.5, 0.0, 0.5]: must be positive",
        ["model.vision.preprocess.std=[0.5,0,0.5]"], config=MULTIMODAL),
    bad("world % tp*pp", "parallel.tp*parallel.pp=2: must divide the world size 3", ["parallel.pp=2"], world=3),
    bad("gbs % mbs*dp", "train.global_batch_size=6: must be divisible by train.micro_batch_size*data_parallel=4*1=4",
        ["train.global_batch_size=6", "train.micro_batch_size=4"]),
    bad("interleaved microbatches", "train.global_batch_size=3: gives 3 micro-batches, which the interleaved "
        "schedule needs divisible by parallel.pp=2", ["parallel.pp=2", "parallel.vpp=2", "train.global_batch_size=3"],
        world=2),
    bad("vpp without pp", "parallel.vpp=2: needs parallel.pp > 1", ["parallel.vpp=2"]),
    bad("moe tp without sp", "parallel.sequence_parallel=False: must be true for an MoE model with parallel.tp=2 > 1 "
        "(megatron-core rule)", ["parallel.tp=2"], world=2),
    bad("sp with tp1", "parallel.sequence_parallel=True: needs parallel.tp > 1", ["parallel.sequence_parallel=true"]),
    bad("etp on cpu", "parallel.etp=2: must be 1 on gloo (CPU): gloo has no uneven all_gather, which expert TP needs",
        ["parallel.etp=2"], world=2),
    # model
    bad("topk > experts", "model.moe_router_topk=5: must be between 1 and model.num_experts=4",
        ["model.moe_router_topk=5"]),
    bad("group topk > groups", "model.router_group_topk=3: must be between 1 and model.router_num_groups=2",
        ["model.router_num_groups=2", "model.router_group_topk=3"]),
    bad("expert bias with softmax", "model.router_expert_bias=True: aux-loss-free expert bias needs "
        "model.router_score_function=sigmoid", ["model.router_score_function=softmax"]),
    bad("pre-softmax with sigmoid", "model.router_pre_softmax=True: needs model.router_score_function=softmax",
        ["model.router_pre_softmax=true"]),
    bad("zero ffn", "model.moe_ffn_hidden_size=0: must be at least 1", ["model.moe_ffn_hidden_size=0"]),
    # precision and hardware
    bad("bad dtype", "precision.dtype=fp16: must be fp32 or bf16", ["precision.dtype=fp16"]),
    bad("unknown fp8 recipe", "precision.fp8=e5m2: must be null, delayed, tensorwise or blockwise",
        ["precision.fp8=e5m2"]),
    bad("fp8 without TE", "precision.fp8=delayed: needs Transformer Engine, which is not installed",
        ["precision.fp8=delayed", "precision.dtype=bf16"], hardware=H100_NO_TE),
    bad("fp8 on A100", "precision.fp8=tensorwise: needs a GPU with FP8 (Hopper/Ada, compute capability >= 8.9); "
        "this is NVIDIA A100", ["precision.fp8=tensorwise", "precision.dtype=bf16"], hardware=A100),
    # optimizer, data, checkpoint (tok.model, corpus.bin and corpus.idx exist, see `workdir`)
    bad("negative lr", "train.optimizer.lr=-1.0: must be > 0", ["train.optimizer.lr=-1"]),
    bad("min_lr > lr", "train.optimizer.min_lr=1.0: must be between 0 and train.optimizer.lr=0.003",
        ["train.optimizer.min_lr=1.0"]),
    bad("negative warmup", "train.scheduler.warmup_steps=-1: must be >= 0", ["train.scheduler.warmup_steps=-1"]),
    bad("zero decay steps", "train.scheduler.decay_steps=0: must be >= 1 (or null: train.steps)",
        ["train.scheduler.decay_steps=0"]),
    bad("decay shorter than warmup in a long run", "train.scheduler.warmup_steps=30: must be 0 or smaller than "
        "train.scheduler.decay_steps (20)", ["train.scheduler.warmup_steps=30", "train.scheduler.decay_steps=20"]),
    bad("indexed without prefix", "data.prefix=None: is required when data.source=indexed",
        ["data.source=indexed", "data.tokenizer=tok.model"]),
    bad("indexed prefix without files", "data.prefix=/nonexistent/corpus: has no .bin/.idx pair "
        "(make one with tools/prepare_data.py)",
        ["data.source=indexed", "data.prefix=/nonexistent/corpus", "data.tokenizer=tok.model"]),
    bad("indexed without tokenizer", "data.tokenizer=None: must name an existing sentencepiece .model when "
        "data.source=indexed", ["data.source=indexed", "data.prefix=corpus"]),
    bad("load not a folder", "checkpoint.load=/nonexistent/ckpt: is not a folder", ["checkpoint.load=/nonexistent/ckpt"]),
    bad("keep no checkpoint", "checkpoint.keep_last=0: must be >= 1 (or null: keep every iteration)",
        ["checkpoint.keep_last=0"]),
]


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A working folder holding run.yaml (the tiny model, a valid run) and the files an
    indexed data source names; relative paths in BAD resolve here, so messages are exact."""
    monkeypatch.chdir(tmp_path)
    run_yaml(tmp_path, "tiny", TINY_RUN)
    for name in ("tok.model", "corpus.bin", "corpus.idx"):  # validation only checks they exist
        (tmp_path / name).write_bytes(b"")
    return tmp_path


@pytest.mark.parametrize("config,files,overrides,world,hardware,line", BAD)
def test_bad_config_is_refused_in_one_exact_line(workdir, config, files, overrides, world, hardware, line):
    for name, text in files.items():
        (workdir / name).parent.mkdir(parents=True, exist_ok=True)
        (workdir / name).write_text(text)
    with pytest.raises(ConfigError) as err:
        validate(load_config(config, overrides), world, hardware)
    assert err.value.problems == [line]


def test_several_violations_give_one_line_each(tiny):
    cfg = load_config(tiny, ["precision.dtype=fp16", "train.optimizer.lr=-1", "parallel.vpp=2"])
    with pytest.raises(ConfigError) as err:
        validate(cfg, 1, CPU)
    assert str(err.value).splitlines() == [
        "parallel.vpp=2: needs parallel.pp > 1",
        "precision.dtype=fp16: must be fp32 or bf16",
        "train.optimizer.lr=-1.0: must be > 0",
    ]
    # FP8 on a CPU breaks both hardware rules; the same config is fine where FP8 and TE exist.
    cfg = load_config(tiny, ["precision.fp8=blockwise", "precision.dtype=bf16"])
    with pytest.raises(ConfigError) as err:
        validate(cfg, 1, CPU)
    assert err.value.problems == [
        "precision.fp8=blockwise: needs Transformer Engine, which is not installed",
        "precision.fp8=blockwise: needs a GPU with FP8 (Hopper/Ada, compute capability >= 8.9); this is cpu",
    ]
    validate(cfg, 1, H100)


def test_launcher_stops_before_any_process_group():
    proc = subprocess.run([sys.executable, "launch/pretrain.py", "--config", QUICKSTART, "--set", "parallel.tp=3"],
                          capture_output=True, text=True, cwd=ROOT, timeout=120,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})  # megatron-core's import warnings
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.splitlines() == [  # one line a violation, nothing else (no traceback)
        "config error: model.vocab_size=512: must be divisible by parallel.tp=3",
        "config error: model.num_attention_heads=4: must be divisible by parallel.tp=3",
        "config error: model.q_lora_rank=32: must be divisible by parallel.tp=3 (the query down-projection is "
        "column-parallel)",
        "config error: model.kv_lora_rank=32: plus model.qk_pos_emb_head_dim=8 (40) must be divisible by "
        "parallel.tp=3 (the key/value down-projection is column-parallel)",
        "config error: model.ffn_hidden_size=128: must be divisible by parallel.tp=3",
        "config error: model.num_shared_experts*model.moe_ffn_hidden_size=32: must be divisible by parallel.tp=3 "
        "(the shared experts are tensor-parallel)",
        "config error: parallel.sequence_parallel=False: must be true for an MoE model with parallel.tp=3 > 1 "
        "(megatron-core rule)",
        "config error: parallel.tp*parallel.pp=3: must divide the world size 1",
    ]


# --------------------------------------------------------------------------- good configs

LAYOUTS = [  # (overrides, world size); the quickstart (tiny model) under the CPU test layouts
    ([], 1),
    (["parallel.tp=2", "parallel.sequence_parallel=true"], 2),
    (["parallel.pp=2"], 2),
    (["parallel.ep=2"], 2),
    (["parallel.pp=2", "parallel.vpp=2"], 2),
    (["parallel.pp=2", "parallel.first_stage_layers=1", "parallel.last_stage_layers=3"], 2),
    (["parallel.pp=4"], 4),
    (["parallel.ep=4"], 4),
    (["parallel.tp=2", "parallel.pp=2", "parallel.sequence_parallel=true"], 4),
    (["parallel.pp=2", "parallel.vpp=2", "parallel.ep=2"], 4),
    (["parallel.tp=2", "parallel.pp=2", "parallel.ep=2", "parallel.sequence_parallel=true"], 8),
    ([], 8),
]


@pytest.mark.parametrize("overrides,world", LAYOUTS, ids=[f"{'+'.join(o) or 'default'}@{w}" for o, w in LAYOUTS])
@pytest.mark.parametrize("config", ["quickstart.yaml", "quickstart_text.yaml"])
def test_quickstarts_fit_test_layouts(config, overrides, world):
    validate(load_config(os.path.join(ROOT, "configs", config), overrides), world, CPU)


PRODUCTION = [  # (model, overrides, world size) on H100s with TE
    ("deepseek_v3_671b", ["parallel.tp=8", "parallel.sequence_parallel=true", "parallel.ep=64",
                          "precision.dtype=bf16", "precision.fp8=blockwise",
                          "train.micro_batch_size=1", "train.global_batch_size=2048"], 512),
    ("deepseek_v3_671b", ["parallel.ep=64", "precision.dtype=bf16", "train.micro_batch_size=1",
                          "train.global_batch_size=2048"], 2048),
    # DeepSeek's PP16: 61 layers as [4, 4 x 14, 1], the split that balances the last stage's
    # LM head + MTP module by the FLOPs estimate (tests/test_pipeline_split.py).
    ("deepseek_v3_671b", ["parallel.pp=16", "parallel.first_stage_layers=4", "parallel.last_stage_layers=1",
                          "parallel.ep=64", "precision.dtype=bf16", "train.micro_batch_size=1",
                          "train.global_batch_size=2048"], 2048),
    ("deepseek_v2_lite_16b", ["parallel.ep=8", "precision.dtype=bf16", "train.micro_batch_size=1",
                              "train.global_batch_size=64"], 8),
    ("deepseek_v2_lite_16b", ["parallel.tp=2", "parallel.ep=8", "parallel.sequence_parallel=true",
                              "precision.dtype=bf16", "train.micro_batch_size=1", "train.global_batch_size=16"], 16),
]


@pytest.mark.parametrize("name,overrides,world", PRODUCTION)
def test_shipped_large_models_validate_under_production_layouts(tmp_path, name, overrides, world):
    validate(load_config(run_yaml(tmp_path, name), overrides), world, H100)


# --------------------------------------------------------------------------- parameter counts


def _model(name):
    return load_config(os.path.join(MODELS, f"{name}.yaml")).model


def test_v3_parameter_estimate():
    e = estimate_parameters(_model("deepseek_v3_671b"))
    # DeepSeek's README_WEIGHTS.md: the main model (embedding, 61 layers, head) is 671B with
    # 36.7B activated (the report's abstract: 37B); the MTP module adds 11.5B unique parameters.
    # The 685B of the Hugging Face checkpoint also counts the MTP module's stored copies of the
    # shared embedding and head (2 x 0.9B), which a built model does not hold. So `total`
    # (main model + MTP, shared weights once) should be 671 + 11.5 = 682.5B, and the main
    # model alone (total - mtp_total) 671B.
    main_total = e["total"] - e["mtp_total"]
    assert abs(main_total / 671e9 - 1) < 0.02, main_total
    assert abs(e["mtp_total"] / 11.5e9 - 1) < 0.05, e["mtp_total"]
    assert abs(e["total"] / 682.5e9 - 1) < 0.02, e["total"]
    assert abs(e["active"] / 37e9 - 1) < 0.05, e["active"]
    assert abs((e["active"] - e["mtp_active"]) / 36.7e9 - 1) < 0.05, e["active"] - e["mtp_active"]
    assert e["embedding"] == e["output_layer"] == 129280 * 7168


def test_v2_lite_parameter_estimate():
    e = estimate_parameters(_model("deepseek_v2_lite_16b"))
    # Model card: 15.7B total, 2.4B activated; no MTP.
    assert e["mtp_total"] == 0 and e["mtp_active"] == 0
    assert abs(e["total"] / 15.7e9 - 1) < 0.05, e["total"]
    assert abs(e["active"] / 2.4e9 - 1) < 0.05, e["active"]


def test_tiny_parameter_estimate():
    m = _model("tiny")
    # 247,360 is what count_parameters() of the tiny model built on one rank reports (checked
    # when this arithmetic was written, also for q_lora_rank=null, MTP, no shared experts,
    # a dense model and tied embeddings); recheck if the layer specs change.
    assert estimate_parameters(m)["total"] == 247_360
    m.share_embeddings_and_output_weights = True
    assert estimate_parameters(m)["total"] == 247_360 - 512 * 64
    m.num_experts = None  # dense: every layer gets the ffn_hidden_size MLP, total == active + embedding
    e = estimate_parameters(m)
    assert e["total"] == e["active"] + e["embedding"]


# --------------------------------------------------------------------------- short runs


@pytest.mark.parametrize("steps,warmup,decay,expected", [
    (100, 10, None, (10, 100, None)),   # fits: unchanged, nothing printed
    (5, 20, None, (2, 5, "train.scheduler.warmup_steps=20 scaled to this 5-step run: warmup_steps=2, decay_steps=5")),
    (2, 20, None, (1, 2, "train.scheduler.warmup_steps=20 scaled to this 2-step run: warmup_steps=1, decay_steps=2")),
    (1, 20, None, (0, 1, "train.scheduler.warmup_steps=20 scaled to this 1-step run: warmup_steps=0, decay_steps=1")),
    (20, 20, None, (10, 20, "train.scheduler.warmup_steps=20 scaled to this 20-step run: warmup_steps=10, "
                            "decay_steps=20")),
    (50, 10, 500, (10, 500, None)),     # a chunk of a longer schedule: kept
    (5, 100, 500, (2, 5, "train.scheduler.warmup_steps=100, decay_steps=500 scaled to this 5-step run: "
                         "warmup_steps=2, decay_steps=5")),
    (5, 0, None, (0, 5, None)),
    (0, 20, None, (20, 0, None)),       # steps=0 writes the initial weights: no schedule is used
    (1000, 30, 20, (30, 20, None)),     # not a short run: left for validate to refuse
])
def test_schedule_is_scaled_to_a_short_run(tiny, steps, warmup, decay, expected):
    overrides = [f"train.steps={steps}", f"train.scheduler.warmup_steps={warmup}"]
    overrides += [f"train.scheduler.decay_steps={decay}"] if decay else []
    cfg = load_config(tiny, overrides)
    fitted = schedule_steps(cfg.train)
    note = expected[2] and f"schedule: {expected[2]}"
    assert (fitted.warmup_steps, fitted.decay_steps, fitted.note) == (*expected[:2], note)
    if expected[0] < expected[1] or expected[0] == 0 or steps == 0:
        validate(cfg, 1, CPU)


def test_shipped_configs_accept_short_runs():
    """Every shipped run config validates for a 2-step run on its own layout (the quickstarts on
    one CPU rank; the cluster layouts on their world size on H100s)."""
    for name in ("quickstart.yaml", "quickstart_text.yaml"):
        cfg = load_config(os.path.join(ROOT, "configs", name), ["train.steps=2"])
        validate(cfg, 1, CPU)
        assert schedule_steps(cfg.train).note == ("schedule: train.scheduler.warmup_steps=20 scaled to this 2-step "
                                                  "run: warmup_steps=1, decay_steps=2")
