"""Config validation: every bad request fails fast with one line naming key, value, rule;
the quickstart divides cleanly under 1, 2, 4 and 8 ranks."""

import subprocess
import sys

import pytest

from conftest import QUICKSTART, ROOT
from megatron_mm.config import ConfigError, Hardware, load_config, validate

CPU = Hardware(has_cuda=False, fp8_capable=False, has_transformer_engine=False, device_name="cpu")
A100 = Hardware(has_cuda=True, fp8_capable=False, has_transformer_engine=True, device_name="NVIDIA A100")

BAD = [  # (overrides, world size, hardware, key in the message, value in the message)
    (["parallel.tp=3"], 3, CPU, "model.num_attention_heads", "4"),
    (["parallel.ep=3"], 3, CPU, "model.num_experts", "4"),
    (["parallel.pp=2", "parallel.vpp=4"], 2, CPU, "model.num_layers", "4"),
    (["parallel.pp=2"], 3, CPU, "parallel.tp*parallel.pp", "2"),
    (["train.global_batch_size=6", "train.micro_batch_size=4"], 1, CPU, "train.global_batch_size", "6"),
    (["parallel.vpp=2"], 1, CPU, "parallel.vpp", "2"),
    (["model.moe_router_topk=5"], 1, CPU, "model.moe_router_topk", "5"),
    (["precision.fp8=delayed", "precision.dtype=bf16"], 1, CPU, "precision.fp8", "delayed"),
    (["precision.fp8=delayed", "precision.dtype=bf16"], 1, A100, "precision.fp8", "delayed"),
    (["precision.fp8=e5m2"], 1, CPU, "precision.fp8", "e5m2"),
    (["parallel.tp=2"], 2, CPU, "parallel.sequence_parallel", "False"),
    (["parallel.sequence_parallel=true"], 1, CPU, "parallel.sequence_parallel", "True"),
    (["parallel.etp=2"], 2, CPU, "parallel.etp", "2"),
    (["precision.dtype=fp16"], 1, CPU, "precision.dtype", "fp16"),
    (["data.source=indexed"], 1, CPU, "data.prefix", "None"),
    (["checkpoint.load=/nonexistent/ckpt"], 1, CPU, "checkpoint.load", "/nonexistent/ckpt"),
    (["train.optimizer.lr=-1"], 1, CPU, "train.optimizer.lr", "-1"),
    (["train.optimizer.min_lr=1.0"], 1, CPU, "train.optimizer.min_lr", "1.0"),
]


@pytest.mark.parametrize("overrides,world,hardware,key,value", BAD)
def test_bad_config_one_line(overrides, world, hardware, key, value):
    cfg = load_config(QUICKSTART, overrides)
    with pytest.raises(ConfigError) as err:
        validate(cfg, world, hardware)
    lines = [line for line in str(err.value).splitlines() if line.startswith(f"{key}={value}")]
    assert lines, str(err.value)
    assert ":" in lines[0] and len(lines[0]) < 200


def test_fp8_on_a100_names_the_gpu():
    cfg = load_config(QUICKSTART, ["precision.fp8=delayed", "precision.dtype=bf16"])
    with pytest.raises(ConfigError, match="NVIDIA A100"):
        validate(cfg, 1, A100)


@pytest.mark.parametrize("overrides,world", [
    ([], 1),
    (["parallel.tp=2", "parallel.sequence_parallel=true"], 2),
    (["parallel.pp=2"], 2), (["parallel.ep=2"], 2), (["parallel.pp=2", "parallel.vpp=2"], 2),
    (["parallel.tp=2", "parallel.pp=2", "parallel.sequence_parallel=true"], 4),
    (["parallel.tp=2", "parallel.pp=2", "parallel.ep=2", "parallel.sequence_parallel=true"], 8),
])
def test_quickstart_divides(overrides, world):
    validate(load_config(QUICKSTART, overrides), world, CPU)


def test_overrides_are_typed_and_unknown_keys_rejected():
    cfg = load_config(QUICKSTART, ["train.optimizer.lr=1e-3", "parallel.vpp=null", "logging.tensorboard=false"])
    assert cfg.train.optimizer.lr == 1e-3 and cfg.parallel.vpp is None and cfg.logging.tensorboard is False
    with pytest.raises(ConfigError, match="model.num_expert: unknown key"):
        load_config(QUICKSTART, ["model.num_expert=4"])
    with pytest.raises(ConfigError, match="expected int"):
        load_config(QUICKSTART, ["parallel.tp=two"])


def test_launcher_stops_before_any_process_group():
    proc = subprocess.run([sys.executable, "launch/pretrain.py", "--config", QUICKSTART, "--set", "parallel.tp=3"],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("config error:")]
    assert any("model.num_attention_heads=4: must be divisible by parallel.tp=3" in e for e in errors)
    assert "process group" not in proc.stderr.lower() and "Traceback" not in proc.stderr


@pytest.mark.parametrize("name,overrides,world", [
    # DeepSeek-V3 on 2048 GPUs with EP64 (its PP16 split of 61 layers needs uneven first/last
    # stages, which the config does not offer yet; the rule refuses it, see BAD-style check below).
    ("deepseek_v3_671b", ["parallel.ep=64", "precision.dtype=bf16", "train.micro_batch_size=1",
                          "train.global_batch_size=2048"], 2048),
    ("deepseek_v2_lite_16b", ["parallel.tp=2", "parallel.ep=8", "parallel.sequence_parallel=true",
                              "train.micro_batch_size=1", "train.global_batch_size=16", "precision.dtype=bf16"], 16),
])
def test_large_model_configs_validate(tmp_path, name, overrides, world):
    path = tmp_path / f"{name}.yaml"
    path.write_text(f"base: {ROOT}/configs/models/{name}.yaml\n")
    cfg = load_config(str(path), overrides)
    validate(cfg, world, Hardware(has_cuda=True, fp8_capable=True, has_transformer_engine=True, device_name="H800"))
    assert cfg.model.num_experts in (64, 256)


def test_v3_pp16_needs_an_uneven_split(tmp_path):
    path = tmp_path / "v3.yaml"
    path.write_text(f"base: {ROOT}/configs/models/deepseek_v3_671b.yaml\n")
    with pytest.raises(ConfigError, match=r"model.num_layers=61: must be divisible by parallel.pp\*parallel.vpp=16"):
        validate(load_config(str(path), ["parallel.pp=16", "parallel.ep=64"]), 2048, CPU)
