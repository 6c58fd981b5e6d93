"""Our encoders are SigLIP, CLIP and Whisper: on the same inputs they give the features of
transformers' `SiglipVisionModel`, `CLIPVisionModel` (at the selected layer, class token kept or
dropped) and `WhisperEncoder` within 1e-5 relative (fp32, CPU) under TP1 and TP2; their
folders import with `tools/convert_from_hf.py --vision/--audio` and export back through
`convert_to_hf` tensor-identical; what a folder does not say is refused in one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

from conftest import ROOT, free_port, tool
from helpers.encoders_vs_hf import tiny_hf
from megatron_mm.config import ConfigError, Hardware, load_config, validate
from megatron_mm.conversion.dcp import DistCheckpointReader
from megatron_mm.conversion.to_hf import convert_to_hf

# fp32 on CPU; observed <= 2.5e-7 (TP2 sums the row-parallel halves in another order)
FEATURE_TOLERANCE = 1e-5


def _lm_folder(folder: str, weights: bool) -> None:
    """A tiny DeepseekV3 language model folder (config.json only, unless `weights`)."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    config = DeepseekV3Config(vocab_size=64, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1,
                              n_routed_experts=4, kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8,
                              v_head_dim=8, qk_nope_head_dim=8, n_group=1, topk_group=1, num_experts_per_tok=2,
                              first_k_dense_replace=1, max_position_embeddings=64)
    if weights:
        torch.manual_seed(0)
        DeepseekV3ForCausalLM(config).save_pretrained(folder)
    else:
        os.makedirs(folder, exist_ok=True)
        config.to_json_file(os.path.join(folder, "config.json"))


def _tensors(path: str) -> dict[str, torch.Tensor]:
    with safe_open(path, "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def test_features_equal_transformers_under_tp1_and_tp2(tmp_path):
    """One torchrun of 2 gloo ranks: TP1, then TP2, each encoder against transformers' on the
    same random inputs (tests/helpers/encoders_vs_hf.py)."""
    out = tmp_path / "diffs.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           os.path.join(ROOT, "tests", "helpers", "encoders_vs_hf.py"), str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    diffs = json.loads(out.read_text())
    cases = {"siglip", "siglip_penultimate", "clip", "clip_class_token", "whisper"}
    for tp in ("tp1", "tp2"):
        assert set(diffs[tp]) == cases
        assert all(d <= FEATURE_TOLERANCE for d in diffs[tp].values()), diffs
    assert diffs["control"] > 1e-2, diffs  # another layer's output is told apart


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_encoders")
    made = {}
    for kind in ("siglip", "clip_dual", "whisper"):
        tiny_hf(kind, str(root / kind), seed=3)
        made[kind] = str(root / kind)
    _lm_folder(str(root / "lm"), weights=True)
    made["lm"] = str(root / "lm")
    return made


@pytest.mark.parametrize("vision", ["siglip", "clip_dual"])
def test_round_trip_hf_megatron_hf_is_tensor_identical(folders, tmp_path, capsys, vision):
    """HF encoders → megatron checkpoint written as TP2 ranks → HF: every encoder tensor identical;
    the projectors are fresh (seeded); SigLIP's pooling head is left out with a note."""
    ckpt = tmp_path / "ckpt"
    code, out, err = tool("convert_from_hf", ["--hf", folders["lm"], "--vision", folders[vision], "--audio",
                                              folders["whisper"], "--out", str(ckpt), "--tp", "2", "--no-progress",
                                              "--set", "model.vision.feature_layer=-2"], capsys)
    assert code == 0, err
    assert ("left out SigLIP's attention-pooling head" in err) == (vision == "siglip")
    reader = DistCheckpointReader(str(ckpt))
    stored = reader.common["config"]["model"]
    assert stored["vision"]["arch"] == vision.split("_")[0] and stored["vision"]["feature_layer"] == -2
    assert stored["audio"]["max_frames"] == 24 and stored["vision"]["num_layers"] == 3
    projector = reader.read("vision.projector.linear_fc1.weight")
    assert projector.shape == (32, 32) and 0.01 < float(projector.std()) < 0.03  # N(0, init_method_std=0.02)

    hf = tmp_path / "hf"
    convert_to_hf(str(ckpt), str(hf), tokenizer="none", progress=False)
    source_vision = _tensors(os.path.join(folders[vision], "model.safetensors"))
    prefix = "vision_model." if vision == "clip_dual" else ""  # the dual tower's vision tower
    back = _tensors(str(hf / "vision_encoder" / "model.safetensors"))
    expected = {k[len(prefix):]: v for k, v in source_vision.items()
                if k.startswith(prefix) and not k[len(prefix):].startswith("head.")}
    assert set(back) == set(expected) and len(expected) == (7 if vision == "clip_dual" else 5) + 16 * 3
    assert all(torch.equal(back[k], expected[k]) for k in expected)
    source_audio = _tensors(os.path.join(folders["whisper"], "model.safetensors"))
    back = _tensors(str(hf / "audio_encoder" / "model.safetensors"))
    expected = {k[len("encoder."):]: v for k, v in source_audio.items() if k.startswith("encoder.")}
    assert set(back) == set(expected) and len(expected) == 7 + 15 * 2  # no key bias
    assert all(torch.equal(back[k], expected[k]) for k in expected)

    # transformers loads the exported folders as they are
    import transformers
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    cls = transformers.SiglipVisionModel if vision == "siglip" else transformers.CLIPVisionModel
    assert cls.from_pretrained(str(hf / "vision_encoder")).config.num_hidden_layers == 3
    assert WhisperEncoder.from_pretrained(str(hf / "audio_encoder")).config.max_source_positions == 12


# --------------------------------------------------------------------------- refusals: one line each


def _refusal(capsys, args: list[str]) -> str:
    code, _, err = tool("convert_from_hf", args + ["--no-progress"], capsys)
    lines = [line for line in err.splitlines() if line.startswith("conversion error:")]
    assert code == 2 and len(lines) == 1, err[-3000:]
    return lines[0]


def test_unknown_model_type_is_refused(tmp_path, capsys):
    _lm_folder(str(tmp_path / "lm"), weights=False)
    (tmp_path / "vit").mkdir()
    (tmp_path / "vit" / "config.json").write_text(json.dumps({"model_type": "vit", "image_size": 16}))
    line = _refusal(capsys, ["--hf", str(tmp_path / "lm"), "--vision", str(tmp_path / "vit"), "--out", str(tmp_path / "o")])
    assert line == (f"conversion error: {tmp_path / 'vit'}/config.json: model_type 'vit' is not a vision encoder we "
                    "read (clip, clip_vision_model, siglip, siglip_vision_model)")
    line = _refusal(capsys, ["--hf", str(tmp_path / "lm"), "--audio", str(tmp_path / "vit"), "--out", str(tmp_path / "o")])
    assert line.endswith("model_type 'vit' is not a audio encoder we read (whisper)")


def test_image_size_the_patch_size_does_not_divide_is_refused(tmp_path, capsys):
    from transformers import SiglipVisionConfig

    _lm_folder(str(tmp_path / "lm"), weights=False)
    SiglipVisionConfig(image_size=18, patch_size=4).to_json_file(str(tmp_path / "config.json"))
    os.makedirs(tmp_path / "siglip")
    os.replace(tmp_path / "config.json", tmp_path / "siglip" / "config.json")
    line = _refusal(capsys, ["--hf", str(tmp_path / "lm"), "--vision", str(tmp_path / "siglip"),
                             "--out", str(tmp_path / "o")])
    assert line == (f"conversion error: {tmp_path / 'siglip'}/config.json: image_size=18 is not a multiple of "
                    "patch_size=4")


def test_a_folder_without_the_tower_is_refused(folders, tmp_path, capsys):
    """A Whisper folder given as --vision is not read as one (its model_type), and a folder
    whose weights lack the tower says which tensor is missing."""
    line = _refusal(capsys, ["--hf", folders["lm"], "--vision", folders["whisper"], "--out", str(tmp_path / "o")])
    assert "model_type 'whisper' is not a vision encoder" in line
    broken = tmp_path / "clip"
    tiny_hf("clip", str(broken), num_hidden_layers=2)
    config = json.loads((broken / "config.json").read_text())
    config["num_hidden_layers"] = 3
    (broken / "config.json").write_text(json.dumps(config))
    line = _refusal(capsys, ["--hf", folders["lm"], "--vision", str(broken), "--out", str(tmp_path / "o")])
    assert line == (f"conversion error: {broken}: tensor encoder.layers.2.layer_norm1.bias is missing (and 15 more) "
                    "though config.json implies it")


@pytest.mark.parametrize("overrides,line", [
    (["model.vision.arch=vit"], "model.vision.arch=vit: must be siglip or clip"),
    (["model.vision.feature_layer=-3"],
     "model.vision.feature_layer=-3: must select a layer: 1..2 or -1..-2 (model.vision.num_layers=2)"),
    (["model.vision.feature_layer=-2", "model.vision.post_layernorm=true"],
     "model.vision.post_layernorm=True: needs the last layer's features (model.vision.feature_layer=-2)"),
    (["model.vision.keep_class_token=true"],
     "model.vision.keep_class_token=True: only CLIP has a class token (model.vision.arch=siglip)"),
    (["model.audio.max_frames=101"],
     "model.audio.max_frames=101: must be even (Whisper: twice the positions after the stride-2 convolution)"),
    (["model.audio.arch=conformer"], "model.audio.arch=conformer: must be whisper"),
])
def test_bad_encoder_config_is_refused_in_one_line(overrides, line):
    cfg = load_config(os.path.join(ROOT, "configs", "quickstart.yaml"), overrides)
    with pytest.raises(ConfigError) as err:
        validate(cfg, 1, Hardware())
    assert err.value.problems == [line]


def test_quickstart_clip_choices_count_tokens():
    """CLIP's class token is one more encoder output, kept only when asked."""
    cfg = load_config(os.path.join(ROOT, "configs", "quickstart.yaml"),
                      ["model.vision.arch=clip", "model.vision.keep_class_token=true"])
    validate(cfg, 1, Hardware())
    assert cfg.model.vision.num_tokens == 17
    cfg = load_config(os.path.join(ROOT, "configs", "quickstart.yaml"), ["model.vision.arch=clip"])
    assert cfg.model.vision.num_tokens == 16
