"""FP8 block-scaled Hugging Face folders (DeepSeek-V3's release format): `convert_to_hf.py
--fp8-blockwise` writes the tensors the release quantizes as float8_e4m3fn + float32
`weight_scale_inv` per 128x128 block, under the release's names and `quantization_config`
(tests/fixtures/deepseek_v3_fp8_names.json); `convert_from_hf.py` reads such a folder back
within e4m3's error bound (kernels/fp8_blockwise.py states it); transformers' fine-grained FP8
loader, where it can read the folder, computes the logits our import does; bad FP8 input stops
with one `conversion error:` line.

The model: random weights (normal and Student-t) of a tiny MLA + MoE shape used nowhere else,
mostly not multiples of 128 (edge blocks), with q LoRA, a dense first layer, shared experts
and an MTP layer; written as a HF folder, converted HF -> megatron -> FP8 HF -> megatron -> HF.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, tool
from megatron_mm.config import load_config
from megatron_mm.conversion import fp8, mapping
from megatron_mm.conversion.dcp import ConversionError, DistCheckpointReader
from megatron_mm.conversion.from_hf import convert_from_hf
from megatron_mm.conversion.safetensors_io import INDEX, DTYPES, HFFolderReader, ShardReader, ShardWriter, write_index
from megatron_mm.conversion.to_hf import convert_to_hf

FIXTURE = os.path.join(ROOT, "tests", "fixtures", "deepseek_v3_fp8_names.json")
SHAPE = ["model.num_layers=3", "model.hidden_size=200", "model.ffn_hidden_size=136", "model.num_attention_heads=3",
         "model.q_lora_rank=150", "model.kv_lora_rank=40", "model.qk_head_dim=24", "model.qk_pos_emb_head_dim=8",
         "model.v_head_dim=20", "model.num_experts=4", "model.moe_ffn_hidden_size=72", "model.first_k_dense_layers=1",
         "model.mtp_num_layers=1", "model.vocab_size=320"]
NORMAL_RELATIVE, SUBNORMAL_ABSOLUTE = 2.0 ** -4, 2.0 ** -10  # the bound: |w' - w| <= 2^-4 |w| + 2^-10 s
ZERO_BLOCK_WEIGHT = "model.layers.1.mlp.experts.2.down_proj.weight"  # its first 128x128 block is all zeros


def write_hf_folder(folder: str, m, seed: int = 0) -> None:
    """A DeepseekV3 folder of shape `m` (fp32): norms near 1, projections alternately normal and
    Student-t (df 2: heavy tails), expert biases small, one zero block."""
    os.makedirs(folder)
    generator = torch.Generator().manual_seed(seed)
    shapes = mapping.hf_shapes(m)
    writer = ShardWriter(os.path.join(folder, "model.safetensors"),
                         [(name, tuple(shape), torch.float32) for name, shape in shapes.items()])
    for i, (name, shape) in enumerate(shapes.items()):
        if name.endswith("norm.weight"):
            tensor = 1 + 0.1 * torch.randn(shape, generator=generator)
        elif name.endswith("e_score_correction_bias"):
            tensor = 0.01 * torch.randn(shape, generator=generator)
        elif i % 2:
            tensor = 0.02 * torch.randn(shape, generator=generator)
        else:  # Student-t with 2 degrees of freedom
            chi2 = torch.randn(shape, generator=generator) ** 2 + torch.randn(shape, generator=generator) ** 2
            tensor = 0.02 * torch.randn(shape, generator=generator) / torch.sqrt(chi2 / 2)
        if name == ZERO_BLOCK_WEIGHT:
            tensor[:128, :128] = 0
        writer.write(name, tensor)
    writer.close()
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(mapping.hf_config(m, torch.float32), f)


@pytest.fixture(scope="module")
def model():
    return load_config(os.path.join(ROOT, "configs", "quickstart_text.yaml"), SHAPE).model


@pytest.fixture(scope="module")
def folders(tmp_path_factory, model) -> dict:
    """original HF (fp32) -> megatron -> FP8 HF (bf16 for the unquantized tensors) -> megatron (fp32) -> HF."""
    root = tmp_path_factory.mktemp("fp8")
    paths = {k: str(root / k) for k in ("hf", "megatron", "fp8", "megatron_back", "back")}
    write_hf_folder(paths["hf"], model)
    convert_from_hf(paths["hf"], paths["megatron"], progress=False)
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "convert_to_hf.py"), "--checkpoint",
                           paths["megatron"], "--out", paths["fp8"], "--tokenizer", "none", "--dtype", "bf16",
                           "--fp8-blockwise", "--no-progress"], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    paths["export_summary"] = json.loads(proc.stdout.strip().splitlines()[-1])
    convert_from_hf(paths["fp8"], paths["megatron_back"], dtype=torch.float32, progress=False)
    convert_to_hf(paths["megatron_back"], paths["back"], tokenizer="none", progress=False)
    return paths


def test_export_has_the_release_names_dtypes_and_quantization_config(folders, model):
    release = json.load(open(FIXTURE))
    config = json.load(open(os.path.join(folders["fp8"], "config.json")))
    assert config["quantization_config"] == release["quantization_config"]
    expected = dict(release["outside_layers"])
    for layer in mapping.layers(model):
        kind = "moe_layer" if layer.moe else "dense_layer"
        names = dict(release[kind])
        if layer.moe:
            for e in range(model.num_experts):
                names.update({k.replace("{E}", str(e)): v for k, v in release["moe_expert"].items()})
        if layer.mtp is not None:
            names.update(release["mtp_extras"])
        expected.update({layer.hf + k: v for k, v in names.items()})
    reader = HFFolderReader(folders["fp8"])
    written = {name: DTYPES[reader.dtype(name)] for name in reader.keys()}
    assert sorted(written) == sorted(expected)
    for name, dtype in expected.items():
        if dtype in ("F8_E4M3",) or name.endswith("_scale_inv"):
            assert written[name] == dtype, name
        else:  # unquantized: --dtype bf16 (the router and its bias stay fp32 from an fp32 checkpoint)
            assert written[name] in ("BF16", "F32") and written[name] != "F8_E4M3", name
        if name.endswith("_scale_inv"):
            weight = name[: -len("_scale_inv")]
            rows, cols = reader.shape(weight)
            assert reader.shape(name) == (-(-rows // 128), -(-cols // 128)), name
    index = json.load(open(os.path.join(folders["fp8"], INDEX)))
    assert set(index["weight_map"]) == set(expected)
    assert reader.read(ZERO_BLOCK_WEIGHT + "_scale_inv")[0, 0].item() == 1.0  # a block of zeros: scale 1
    print(f"\nFP8 export of a {len(mapping.layers(model))}-layer model: {len(written)} tensors, "
          f"{sum(n.endswith('_scale_inv') for n in written)} of them scales")


def test_fp8_export_imports_back_within_the_e4m3_bound(folders):
    """HF (fp32) -> megatron -> FP8 -> megatron (--dtype fp32) -> HF: each quantized weight within
    |w' - w| <= 2^-4 |w| + 2^-10 s of the original (s its block's scale in the FP8 folder); the
    unquantized tensors are the bf16 copies the FP8 folder holds."""
    original, back, quantized = (HFFolderReader(folders[k]) for k in ("hf", "back", "fp8"))
    assert sorted(original.keys()) == sorted(back.keys())
    worst = {"normal": 0.0, "subnormal": 0.0}
    checked = 0
    for name in original.keys():
        w, w_back = original.read(name), back.read(name)
        if not fp8.quantized_in_release(name):
            assert torch.equal(w_back, quantized.read(name).float()), name
            continue
        s = quantized.read(name + "_scale_inv").repeat_interleave(128, 0).repeat_interleave(128, 1)
        s = s[: w.shape[0], : w.shape[1]]
        error = (w_back - w).abs()
        assert bool((error <= NORMAL_RELATIVE * w.abs() + SUBNORMAL_ABSOLUTE * s).all()), name
        normal = w.abs() >= s * 2.0 ** -6
        worst["normal"] = max(worst["normal"], (error[normal] / w[normal].abs()).max().item())
        if (~normal).any():
            worst["subnormal"] = max(worst["subnormal"], (error[~normal] / s[~normal]).max().item())
        checked += 1
    assert checked == sum(fp8.quantized_in_release(k) for k in original.keys()) > 40
    print(f"\n{checked} FP8 weights: worst relative error of normals {worst['normal']:.5f} (bound 2^-4 = 0.0625), "
          f"worst subnormal error {worst['subnormal']:.6f} s (bound 2^-10 = 0.000977)")
    assert worst["normal"] > 0.9 * NORMAL_RELATIVE and worst["subnormal"] > 0.9 * SUBNORMAL_ABSOLUTE


def test_import_dequantizes_to_the_unquantized_dtype_by_default(folders, tmp_path):
    """Without --dtype the FP8 weights take the dtype of the folder's unquantized weights (bf16
    here, as in the release); the expert rows arrive one expert at a time."""
    convert_from_hf(folders["fp8"], str(tmp_path / "megatron"), progress=False)
    saved = DistCheckpointReader(str(tmp_path / "megatron")).tensor_keys()
    assert saved["decoder.layers.0.self_attention.linear_q_down_proj.weight"][1] == torch.bfloat16
    assert saved["decoder.layers.1.mlp.experts.experts.linear_fc1.weight"][1] == torch.bfloat16
    assert saved["decoder.layers.1.mlp.router.expert_bias"][1] == torch.float32


# --------------------------------------------------------------------------- transformers' FP8 loader


def test_transformers_fp8_loader_gives_our_logits(tmp_path):
    """transformers 5.24 loads an FP8 folder on CPU by dequantizing (quantizers/
    quantizer_finegrained_fp8.py; needs accelerate). Its dequantization takes the block size as
    rows // scale_rows, which is wrong for edge blocks (a (150, 200) weight with 2 x 2 scales is
    read as 75 x 100 blocks; DeepSeek-V3's own 576-row kv_a_proj_with_mqa raises), so this model
    has only multiples of 128 in its FP8 weights: there, transformers' logits from the FP8 folder
    equal its logits from our dequantized import, to the bit."""
    pytest.importorskip("accelerate", reason="transformers' FP8 loader needs accelerate (pip install accelerate)")
    from transformers import AutoModelForCausalLM, DeepseekV3Config, DeepseekV3ForCausalLM

    config = DeepseekV3Config(
        vocab_size=256, hidden_size=128, intermediate_size=256, moe_intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=1, num_key_value_heads=1, n_shared_experts=1, n_routed_experts=4, kv_lora_rank=128,
        q_lora_rank=128, qk_rope_head_dim=128, qk_nope_head_dim=128, v_head_dim=128, n_group=1, topk_group=1,
        num_experts_per_tok=2, first_k_dense_replace=1, norm_topk_prob=True, max_position_embeddings=32,
        initializer_range=0.05, num_nextn_predict_layers=0, rope_parameters={"rope_type": "default", "rope_theta": 1e4})
    torch.manual_seed(1)
    DeepseekV3ForCausalLM(config).save_pretrained(str(tmp_path / "hf"))
    convert_from_hf(str(tmp_path / "hf"), str(tmp_path / "megatron"), progress=False)
    convert_to_hf(str(tmp_path / "megatron"), str(tmp_path / "fp8"), tokenizer="none", progress=False,
                  fp8_blockwise=True)
    convert_from_hf(str(tmp_path / "fp8"), str(tmp_path / "megatron_back"), dtype=torch.float32, progress=False)
    convert_to_hf(str(tmp_path / "megatron_back"), str(tmp_path / "ours"), tokenizer="none", progress=False)
    tokens = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    logits = {}
    for name in ("hf", "fp8", "ours"):
        lm = AutoModelForCausalLM.from_pretrained(str(tmp_path / name), dtype=torch.float32).eval()
        with torch.no_grad():
            logits[name] = lm(tokens).logits
    assert torch.equal(logits["fp8"], logits["ours"])
    print(f"\ntransformers FP8 load vs our import: identical logits; vs the unquantized model: max abs diff "
          f"{(logits['fp8'] - logits['hf']).abs().max():.3f} (max |logit| {logits['hf'].abs().max():.2f})")


# --------------------------------------------------------------------------- bad input: one line each


def rewrite(folder: str, drop: tuple[str, ...] = (), replace: dict | None = None, config: dict | None = None) -> None:
    """Rewrite a one-shard folder without `drop`, with `replace` {name: tensor}, or with a new config.json."""
    path = os.path.join(folder, "model-00001-of-00001.safetensors")
    reader = ShardReader(path)
    tensors = {name: (replace or {}).get(name, reader.read(name)) for name in reader.keys() if name not in drop}
    os.remove(path)
    writer = ShardWriter(path, [(name, tuple(t.shape), t.dtype) for name, t in tensors.items()])
    for name, tensor in tensors.items():
        writer.write(name, tensor)
    writer.close()
    write_index(folder, {name: os.path.basename(path) for name in tensors}, 0)
    if config is not None:
        with open(os.path.join(folder, "config.json"), "w") as f:
            json.dump(config, f)


def one_error_line(result: tuple[int, str, str]) -> str:
    code, _, err = result
    lines = [line for line in err.splitlines() if line.startswith("conversion error:")]
    assert code == 2 and len(lines) == 1, err[-3000:]
    return lines[0]


@pytest.fixture
def broken(folders, tmp_path) -> str:
    copy = str(tmp_path / "fp8")
    shutil.copytree(folders["fp8"], copy)
    return copy


def test_a_missing_scale_is_named(broken, capsys):
    weight = "model.layers.0.self_attn.q_a_proj.weight"
    rewrite(broken, drop=(weight + "_scale_inv",))
    line = one_error_line(tool("convert_from_hf", ["--hf", broken, "--out", broken + "-out", "--no-progress"], capsys))
    assert (f"{weight} is float8_e4m3fn in model-00001-of-00001.safetensors but its scale {weight}_scale_inv "
            "is missing") in line


def test_a_scale_of_the_wrong_shape_or_dtype_is_named(broken, tmp_path):
    scale = "model.layers.1.mlp.experts.3.up_proj.weight_scale_inv"
    rewrite(broken, replace={scale: torch.ones(1, 1)})
    with pytest.raises(ConversionError, match=re.escape(f"{scale} is float32 (1, 1) in model-00001-of-00001."
                                                        "safetensors; the (72, 200) weight needs float32 (1, 2)")):
        convert_from_hf(broken, str(tmp_path / "a"), progress=False)
    rewrite(broken, replace={scale: torch.ones(1, 2, dtype=torch.bfloat16)})
    with pytest.raises(ConversionError, match=re.escape(f"{scale} is bfloat16 (1, 2)")):
        convert_from_hf(broken, str(tmp_path / "b"), progress=False)


def test_an_unsupported_quantization_config_is_named(broken, tmp_path, capsys):
    config = json.load(open(os.path.join(broken, "config.json")))
    cases = {"weight_block_size": ([64, 64], "quantization_config.weight_block_size=[64, 64] is not converted"),
             "activation_scheme": ("static", "quantization_config.activation_scheme='static' is not converted"),
             "quant_method": ("awq", "quantization_config.quant_method='awq' is not converted")}
    for key, (value, message) in cases.items():
        quantization = {**config["quantization_config"], key: value}
        rewrite(broken, config={**config, "quantization_config": quantization})
        line = one_error_line(tool("convert_from_hf", ["--hf", broken, "--out", str(tmp_path / key),
                                                       "--no-progress"], capsys))
        assert message in line, line
    # scales in a folder whose config.json does not say it is quantized
    rewrite(broken, config={k: v for k, v in config.items() if k != "quantization_config"})
    with pytest.raises(ConversionError, match=r"model\.layers\.\d+\.\S+_scale_inv in model-00001-of-00001.safetensors "
                                              "is an FP8 block scale, but config.json has no quantization_config"):
        convert_from_hf(broken, str(tmp_path / "plain"), progress=False)


def test_only_the_release_tensors_are_quantized():
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.7.self_attn.kv_a_proj_with_mqa.weight",
                 "model.layers.3.mlp.experts.255.down_proj.weight", "model.layers.3.mlp.shared_experts.up_proj.weight",
                 "model.layers.0.mlp.gate_proj.weight", "model.layers.61.self_attn.o_proj.weight"):
        assert fp8.quantized_in_release(name), name
    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight", "model.layers.3.mlp.gate.weight",
                 "model.layers.3.mlp.gate.e_score_correction_bias", "model.layers.0.input_layernorm.weight",
                 "model.layers.0.self_attn.q_a_layernorm.weight", "model.layers.61.eh_proj.weight",
                 "model.layers.61.shared_head.head.weight", "model.layers.61.embed_tokens.weight"):
        assert not fp8.quantized_in_release(name), name
