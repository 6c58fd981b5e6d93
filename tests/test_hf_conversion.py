"""Hugging Face conversion: megatron checkpoints saved under TP1, TP2, PP2, EP2 and
TP2xPP2xEP2 (and PP2xVPP2 for one of them) of two structurally different tiny models, after
a few training steps so that weights and expert biases have moved, convert to
DeepseekV3ForCausalLM folders whose transformers logits equal the megatron model's; HF -> megatron -> HF is lossless; the converted checkpoint resumes
training under another layout; bad inputs stop with one clear line."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, TEXT_STEPS, losses, pretrain, tool
from megatron_mm.config import ParallelConfig, load_config
from megatron_mm.conversion import mapping
from megatron_mm.conversion.dcp import ConversionError, DistCheckpointReader
from megatron_mm.conversion.from_hf import convert_from_hf
from megatron_mm.conversion.safetensors_io import HFFolderReader
from megatron_mm.conversion.to_hf import check_against_config, convert_to_hf

CONFIGS = {
    "tiny": os.path.join(ROOT, "configs", "quickstart_text.yaml"),  # q LoRA, 1 dense layer, top-2, 1 shared
    "tiny_alt": os.path.join(ROOT, "tests", "configs", "text_tiny_alt.yaml"),  # no q LoRA, 2 dense, groups, MTP, YaRN
}
LAYOUTS = {
    "tp1": (1, []),
    "tp2": (2, ["parallel.tp=2", "parallel.sequence_parallel=true"]),
    "pp2": (2, ["parallel.pp=2"]),
    "ep2": (2, ["parallel.ep=2"]),
    # tiny_alt on 4 ranks: EP2 runs inside the TP2 x DP1 ranks of each stage (the checkpoint is the
    # same as 8 ranks' with DP2 would write); tiny takes test_training's run of it
    "tp2_pp2_ep2": (4, ["parallel.tp=2", "parallel.pp=2", "parallel.ep=2", "parallel.sequence_parallel=true"]),
}
EXTRA_LAYOUTS = {"tiny": {"pp2_vpp2": (2, ["parallel.pp=2", "parallel.vpp=2"])}}  # interleaved: layers 0,2 | 1,3
# tiny trains every layout anyway (tests/test_training.py); tiny_alt one rank and the layout
# that slices along TP, PP and EP at once
LAYOUTS_OF = {"tiny": {**LAYOUTS, **EXTRA_LAYOUTS["tiny"]},
              "tiny_alt": {k: LAYOUTS[k] for k in ("tp1", "tp2_pp2_ep2")}}
CASES = [(name, layout) for name in CONFIGS for layout in LAYOUTS_OF[name]]
TRAIN = ["train.steps=2", "train.scheduler.warmup_steps=0", "train.global_batch_size=8", "train.micro_batch_size=1",
         "logging.tensorboard=false", "logging.interval=1", "checkpoint.save_interval=0"]
# fp32 on CPU: the two implementations sum in different orders. Observed <= 3e-6.
def tolerance(max_abs_logit: float) -> float:
    return 1e-5 * max(1.0, max_abs_logit)


def run_tool(args: list[str], check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
           "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable] + args, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return proc


def verify(pairs: list[tuple[str, str]]) -> list[dict]:
    args = [os.path.join(ROOT, "tools", "verify_hf.py")]
    for checkpoint, hf in pairs:
        args += ["--checkpoint", checkpoint, "--hf", hf]
    return json.loads(run_tool(args).stdout.strip().splitlines()[-1])["results"]


@pytest.fixture(scope="module")
def converted(tmp_path_factory, data_cache, text_layout_runs):
    """Per config and layout: a trained checkpoint, its HF conversion, and the logit comparison.
    `tiny` (the text quickstart) takes the layout-equivalence runs of tests/test_training.py
    (10 steps, conftest.TextLayoutRuns); `tiny_alt` trains 2 steps per layout here."""
    root = tmp_path_factory.mktemp("hf-conversion")
    out = {}
    for name, config in CONFIGS.items():
        pairs = []
        for layout, (nproc, sets) in LAYOUTS_OF[name].items():
            if name == "tiny":
                run = text_layout_runs("single" if layout == "tp1" else layout)
            else:
                run = root / f"{name}-{layout}"
                # tiny_alt on one rank: 3 steps, saving at 2 too (the resume test starts from 2)
                extra = ["train.steps=3", "checkpoint.save_interval=2"] if layout == "tp1" else []
                pretrain(nproc, TRAIN + sets + extra + [f"data.cache_dir={data_cache}", f"run.dir={run}"],
                         config=config)
            run = pathlib.Path(run)
            checkpoint, hf = str(run / "checkpoints"), str(root / f"{name}-{layout}-hf")
            convert_to_hf(checkpoint, hf, progress=False)
            out[(name, layout)] = {"checkpoint": checkpoint, "hf": hf, "run": str(run)}
            pairs.append((checkpoint, hf))
        if name == "tiny":  # a control: the right weights with the rope pairs read the other way
            bad = str(root / "tiny-tp1-hf-rope-halves")
            shutil.copytree(out[(name, "tp1")]["hf"], bad)
            config_path = os.path.join(bad, "config.json")
            hf_config = json.load(open(config_path))
            json.dump({**hf_config, "rope_interleave": False}, open(config_path, "w"))
            pairs.append((out[(name, "tp1")]["checkpoint"], bad))
        for row in verify(pairs):
            key = next((k for k, v in out.items() if v["hf"] == row["hf"]), ("control", row["hf"]))
            out.setdefault(key, {}).update(row)
    out["root"] = root
    return out


@pytest.mark.parametrize("name,layout", CASES, ids=[f"{n}-{lay}" for n, lay in CASES])
def test_transformers_logits_equal_megatron(converted, name, layout):
    row = converted[(name, layout)]
    tol = tolerance(row["logits_max_abs"])
    assert row["logits_max_abs_diff"] <= tol, row
    if name == "tiny_alt":  # one MTP layer: its logits through transformers' MtpModel
        assert row["mtp_1_max_abs_diff"] <= tol, row
    mtp = f", MTP {row['mtp_1_max_abs_diff']:.2e}" if "mtp_1_max_abs_diff" in row else ""
    print(f"{name} {layout}: max |logit diff| {row['logits_max_abs_diff']:.2e}{mtp} (max |logit| "
          f"{row['logits_max_abs']:.2f}, tolerance {tol:.0e})")


def test_tolerance_tells_a_wrong_rope_layout(converted):
    """The tolerance is tight enough to catch rope dims read as halves instead of pairs."""
    control = next(v for k, v in converted.items() if k[0] == "control")
    assert control["logits_max_abs_diff"] > 100 * tolerance(control["logits_max_abs"]), control


def test_every_layout_gives_the_same_kind_of_folder(converted):
    """Index, config, tokenizer; expert biases moved from zero; transformers loads it."""
    from transformers import AutoTokenizer

    hf = converted[("tiny", "tp2_pp2_ep2")]["hf"]
    for name in ("config.json", "model.safetensors.index.json", "tokenizer.model", "tokenizer_config.json",
                 "megatron_mm.json"):
        assert os.path.exists(os.path.join(hf, name)), name
    reader = HFFolderReader(hf)
    bias = reader.read("model.layers.1.mlp.gate.e_score_correction_bias")
    assert bias.dtype == torch.float32 and bias.abs().max() > 0
    config = json.load(open(os.path.join(hf, "config.json")))
    assert config["architectures"] == ["DeepseekV3ForCausalLM"] and config["first_k_dense_replace"] == 1
    # the HF tokenizer gives the ids the run trained on (the generated corpus)
    import sentencepiece as spm
    from megatron_mm.data.corpus import generate_corpus

    sp = spm.SentencePieceProcessor(model_file=os.path.join(hf, "tokenizer.model"))
    tokenizer = AutoTokenizer.from_pretrained(hf)
    for text in generate_corpus(50, 1234):
        assert tokenizer(text)["input_ids"] == sp.encode(text)


def _random_hf_model(folder: str) -> None:
    """A DeepseekV3 model made by transformers (not by us), tiny_alt-shaped, with large random
    weights and expert biases so that routing decides the output, saved with save_pretrained."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    config = DeepseekV3Config(
        vocab_size=512, hidden_size=64, intermediate_size=96, moe_intermediate_size=16, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=4, n_shared_experts=2, n_routed_experts=8,
        routed_scaling_factor=2.5, kv_lora_rank=24, q_lora_rank=None, qk_rope_head_dim=8, v_head_dim=12,
        qk_nope_head_dim=16, n_group=4, topk_group=2, num_experts_per_tok=4, first_k_dense_replace=2,
        norm_topk_prob=True, max_position_embeddings=64, initializer_range=0.1, num_mtp_layers=0,
        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                         "original_max_position_embeddings": 16, "beta_fast": 32.0, "beta_slow": 1.0,
                         "mscale": 1.0, "mscale_all_dim": 0.8})
    torch.manual_seed(0)
    model = DeepseekV3ForCausalLM(config)
    with torch.no_grad():
        for layer in model.model.layers[config.first_k_dense_replace:]:
            layer.mlp.gate.e_score_correction_bias.normal_(0, 0.05)
    model.save_pretrained(folder)


def test_round_trip_hf_megatron_hf_is_lossless(tmp_path):
    """transformers' own save -> megatron (written as TP2xPP2xEP2 ranks) -> HF: identical tensors;
    the megatron model computes the transformers model's logits."""
    _random_hf_model(str(tmp_path / "hf"))
    summary = convert_from_hf(str(tmp_path / "hf"), str(tmp_path / "megatron"),
                              ParallelConfig(tp=2, pp=2, ep=2, sequence_parallel=True), progress=False)
    assert summary["files"] > 1
    convert_to_hf(str(tmp_path / "megatron"), str(tmp_path / "back"), tokenizer="none", progress=False)
    original, back = HFFolderReader(str(tmp_path / "hf")), HFFolderReader(str(tmp_path / "back"))
    assert sorted(original.keys()) == sorted(back.keys())
    for key in original.keys():
        a, b = original.read(key), back.read(key)
        assert a.dtype == b.dtype and torch.equal(a, b), key
    (row,) = verify([(str(tmp_path / "megatron"), str(tmp_path / "hf"))])
    assert row["logits_max_abs_diff"] <= tolerance(row["logits_max_abs"]), row
    assert row["logits_max_abs"] > 1.0  # large weights: the routing and the logits are far from uniform


def test_converted_checkpoint_matches_megatron_keys_and_resumes(converted, tmp_path, data_cache):
    """HF -> megatron writes exactly the keys and shapes megatron saves; launch/pretrain.py
    resumes from it under another layout (PP2; written as TP2 ranks' chunks) with the loss
    the uninterrupted run had."""
    source = converted[("tiny_alt", "tp1")]
    iteration2 = os.path.join(source["checkpoint"], "iter_0000002")
    convert_to_hf(iteration2, str(tmp_path / "hf"), progress=False)
    from_hf = tmp_path / "from_hf"
    proc = run_tool([os.path.join(ROOT, "tools", "convert_from_hf.py"), "--hf", str(tmp_path / "hf"),
                     "--out", str(from_hf), "--tp", "2", "--iteration", "2", "--no-progress"])
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["iteration"] == 2 and summary["files"] == 2 and summary["peak_rss_gib"] > 0
    ours, theirs = DistCheckpointReader(str(from_hf)), DistCheckpointReader(iteration2)
    model_keys = {k for k in theirs.metadata.state_dict_metadata
                  if not k.startswith(("optimizer", "chained_", "rng_state"))}
    assert set(ours.metadata.state_dict_metadata) == model_keys
    assert ours.tensor_keys() == theirs.tensor_keys()

    pretrain(2, TRAIN[1:] + ["train.steps=3", f"data.cache_dir={data_cache}", "parallel.pp=2",
                             f"checkpoint.load={from_hf}", f"run.dir={tmp_path}/resumed"], config=CONFIGS["tiny_alt"])
    resumed, uninterrupted = losses(f"{tmp_path}/resumed"), losses(source["run"])
    assert list(resumed) == [3]
    # step 3's loss is computed from the weights after step 2 (before the converted run's
    # Adam, which starts without state, makes its first update)
    assert resumed[3] == pytest.approx(uninterrupted[3], rel=2e-4)


def test_multimodal_checkpoint_converts_with_its_encoders(tmp_path, data_cache):
    """The multimodal model: DeepseekV3 language model + our encoders; one call loads the whole,
    whose logits on tokens with image and audio placeholders equal megatron's. (The resampler
    projector: its path runs the MLP projector's too.)"""
    run = tmp_path / "mm"
    pretrain(1, ["train.steps=0", f"data.cache_dir={data_cache}", "data.demo_samples=40", "data.loader=torch",
                 "model.vision.projector=resampler", "logging.tensorboard=false", f"run.dir={run}"],
             config=os.path.join(ROOT, "configs", "quickstart.yaml"))
    hf = str(tmp_path / "hf")
    convert_to_hf(str(run / "checkpoints"), hf, progress=False)
    assert os.path.exists(os.path.join(hf, "encoders.safetensors"))
    (row,) = verify([(str(run / "checkpoints"), hf)])
    for key in ("logits", "vision", "audio"):
        assert row[f"{key}_max_abs_diff"] <= 1e-5 * max(1.0, row[f"{key}_max_abs"]), row
    ours = json.load(open(os.path.join(hf, "megatron_mm.json")))
    assert set(ours["placeholder_ids"]) == {"image", "audio"}


# --------------------------------------------------------------------------- errors: one clear line each


def _last_error(result: tuple[int, str, str]) -> str:
    code, _, err = result
    lines = [line for line in err.splitlines() if line.startswith("conversion error:")]
    assert code == 2 and len(lines) == 1, err[-3000:]
    return lines[0]


def test_missing_shards_are_named(converted, tmp_path, capsys):
    checkpoint = tmp_path / "ckpt"
    shutil.copytree(converted[("tiny", "ep2")]["checkpoint"], checkpoint)
    iteration = checkpoint / f"iter_{TEXT_STEPS:07d}"  # the latest, which the converter reads
    victim = sorted(iteration.glob("*.distcp"))[-1]
    victim.unlink()
    line = _last_error(tool("convert_to_hf", ["--checkpoint", str(checkpoint),
                                 "--out", str(tmp_path / "out"), "--no-progress"], capsys))
    assert f"shard file {victim.name} is missing" in line

    hf = tmp_path / "hf"
    convert_to_hf(converted[("tiny", "tp1")]["checkpoint"], str(hf), max_shard_bytes=200_000, progress=False)
    shards = sorted(hf.glob("model-*.safetensors"))
    assert len(shards) > 2
    shards[1].unlink()
    line = _last_error(tool("convert_from_hf", ["--hf", str(hf),
                                 "--out", str(tmp_path / "back"), "--no-progress"], capsys))
    assert f"shard {shards[1].name} is missing" in line


def test_unknown_keys_and_shape_mismatches_are_named(converted, tmp_path, capsys):
    from megatron_mm.conversion.safetensors_io import INDEX, ShardWriter

    hf = tmp_path / "hf"
    shutil.copytree(converted[("tiny", "tp1")]["hf"], hf)
    # an extra tensor the DeepseekV3 model has no place for
    extra = ShardWriter(str(hf / "extra.safetensors"), [("model.layers.0.mystery.weight", (2, 2), torch.float32)])
    extra.write("model.layers.0.mystery.weight", torch.zeros(2, 2))
    extra.close()
    index = json.load(open(hf / INDEX))
    index["weight_map"]["model.layers.0.mystery.weight"] = "extra.safetensors"
    json.dump(index, open(hf / INDEX, "w"))
    with pytest.raises(ConversionError, match="unknown key model.layers.0.mystery.weight in extra.safetensors"):
        convert_from_hf(str(hf), str(tmp_path / "a"), progress=False)
    del index["weight_map"]["model.layers.0.mystery.weight"]
    json.dump(index, open(hf / INDEX, "w"))
    # config.json that does not describe the tensors
    config = json.load(open(hf / "config.json"))
    json.dump({**config, "kv_lora_rank": 16, "megatron_mm": {**config["megatron_mm"], "kv_lora_rank": 16}},
              open(hf / "config.json", "w"))
    line = _last_error(tool("convert_from_hf", ["--hf", str(hf),
                                 "--out", str(tmp_path / "b"), "--no-progress"], capsys))
    assert "config does not match the checkpoint: model.layers.0.self_attn.kv_a_proj_with_mqa.weight is (40, 64)" in line
    assert "config.json gives (24, 64)" in line

    # megatron side: a key no mapping covers, a shape the config does not give
    checkpoint = converted[("tiny", "tp1")]["checkpoint"]
    reader = DistCheckpointReader(checkpoint)
    cfg = load_config(CONFIGS["tiny"])
    saved = dict(reader.tensor_keys())
    saved["decoder.layers.0.mystery.weight"] = ((2, 2), torch.float32)
    with pytest.raises(ConversionError, match="unknown key decoder.layers.0.mystery.weight"):
        check_against_config(cfg.model, saved, checkpoint)
    wrong = load_config(CONFIGS["tiny"], ["model.kv_lora_rank=16"])
    with pytest.raises(ConversionError, match=r"linear_kv_down_proj.weight is \(40, 64\) in the checkpoint, "
                                              r"the model config gives \(24, 64\)"):
        check_against_config(wrong.model, reader.tensor_keys(), checkpoint)


def test_config_mismatches_are_named(converted, tmp_path, capsys):
    # to_hf: a --set that contradicts the stored config
    line = _last_error(tool("convert_to_hf", ["--checkpoint",
                                 converted[("tiny", "tp1")]["checkpoint"], "--out", str(tmp_path / "a"),
                                 "--set", "model.num_experts=8", "--no-progress"], capsys))
    assert "does not match the config stored in" in line and "model.num_experts: 8 vs 4" in line
    # from_hf: a training config for another model than config.json's
    line = _last_error(tool("convert_from_hf", ["--hf",
                                 converted[("tiny_alt", "tp1")]["hf"], "--out", str(tmp_path / "b"),
                                 "--config", CONFIGS["tiny"], "--no-progress"], capsys))
    assert "the given --config does not match" in line and "model.q_lora_rank: 32 vs None" in line
    # from_hf: a layout the model cannot divide into
    line = _last_error(tool("convert_from_hf", ["--hf",
                                 converted[("tiny_alt", "tp1")]["hf"], "--out", str(tmp_path / "c"), "--ep", "3",
                                 "--no-progress"], capsys))
    assert "model.num_experts=8: must be divisible by parallel.ep=3" in line
    # what the family cannot express: a softmax router is DeepSeek-V2's, which weights the chosen
    # experts by their softmax over all experts (tests/test_hf_import_families.py has the rest)
    cfg = load_config(CONFIGS["tiny"], ["model.router_score_function=softmax", "model.router_expert_bias=false"])
    with pytest.raises(ConversionError, match="router_pre_softmax=false: megatron takes the softmax of the chosen"):
        mapping.hf_config(cfg.model, torch.float32)


def test_progress_bar_and_summary(converted, tmp_path, capsys):
    code, out, err = tool("convert_to_hf", ["--checkpoint", converted[("tiny", "pp2")]["checkpoint"],
                                            "--out", str(tmp_path / "hf")], capsys)
    assert code == 0 and "to HF" in err and "100%" in err
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["iteration"] == TEXT_STEPS and summary["layout"]["pp"] == 2 and summary["shards"] == 1
