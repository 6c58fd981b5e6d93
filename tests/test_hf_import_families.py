"""Hugging Face folders of the families users bring, imported: a DeepseekV3 saved by transformers
(its config says num_nextn_predict_layers=1, its weights hold no MTP layer), the same with a
release-style MTP layer added, and DeepSeek-V2 (q LoRA, group-limited greedy routing, routed
scaling 3) and V2-Lite (no q LoRA, greedy routing, the release's balance-loss fields) shaped
folders, all tiny with random weights large enough that routing decides the output.

After import, megatron's logits equal transformers' under TP1, TP2, PP2 and EP2 (one 2-rank
torchrun of tools/verify_hf.py computes every layout of every family); HF -> megatron -> HF is
tensor-identical; a V2-Lite-shaped checkpoint trains under PP2xEP2 and a DeepseekV3 import with
`--mtp-layers 1` trains with MTP, each step-1 loss (and MTP loss) equal to transformers' on the
same batch; the fresh MTP modules are the same for a seed under any layout; what megatron-core
cannot express is refused in one line."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
import yaml

from conftest import QUICKSTART, ROOT, free_port, pretrain
from megatron_mm.config import ParallelConfig, load_config
from megatron_mm.conversion import mapping
from megatron_mm.conversion.dcp import ConversionError, DistCheckpointReader
from megatron_mm.conversion.from_hf import convert_from_hf
from megatron_mm.conversion.safetensors_io import HFFolderReader
from megatron_mm.conversion.to_hf import convert_to_hf
from test_hf_conversion import _last_error, tolerance, tool

FAMILIES = ("v3", "v3_mtp", "v2", "v2_lite")
LAYOUTS = {
    "tp1": ParallelConfig(),
    "tp2": ParallelConfig(tp=2, sequence_parallel=True),
    "pp2": ParallelConfig(pp=2),
    "ep2": ParallelConfig(ep=2),
}
CASES = [(family, layout) for family in FAMILIES for layout in LAYOUTS]
TRAIN = ["data.source=synthetic", "train.steps=3", "train.scheduler.warmup_steps=0", "train.global_batch_size=8",
         "train.micro_batch_size=1", "logging.tensorboard=false", "logging.interval=1", "checkpoint.save_interval=0"]
MTP_SEED = 5
YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 16,
        "beta_fast": 32.0, "beta_slow": 1.0}


# --------------------------------------------------------------------------- the folders


def _v3_config(num_layers: int = 4):
    """hidden 48, 6 experts top-2 within 1 of 2 groups (by their top-2 sum), q LoRA, plain rope."""
    from transformers import DeepseekV3Config

    return DeepseekV3Config(
        vocab_size=448, hidden_size=48, intermediate_size=80, moe_intermediate_size=24, num_hidden_layers=num_layers,
        num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1, n_routed_experts=6,
        routed_scaling_factor=1.5, kv_lora_rank=20, q_lora_rank=24, qk_rope_head_dim=8, v_head_dim=10,
        qk_nope_head_dim=12, n_group=2, topk_group=1, num_experts_per_tok=2, first_k_dense_replace=1,
        norm_topk_prob=True, max_position_embeddings=64, initializer_range=0.1,
        rope_parameters={"rope_type": "default", "rope_theta": 5000.0})


def save_v3(folder: str) -> None:
    from transformers import DeepseekV3ForCausalLM

    torch.manual_seed(1)
    model = DeepseekV3ForCausalLM(_v3_config())
    with torch.no_grad():
        for layer in model.model.layers[1:]:
            layer.mlp.gate.e_score_correction_bias.normal_(0, 0.05)
    model.save_pretrained(folder)


def add_mtp_layer(source: str, folder: str) -> None:
    """`source` plus one MTP module at model.layers.4, laid out as DeepSeek-V3's release: a decoder
    layer (taken from a 5-layer transformers model) with enorm, hnorm, eh_proj, shared_head.norm
    and copies of the embedding and head."""
    from safetensors.torch import load_file, save_file
    from transformers import DeepseekV3ForCausalLM

    shutil.copytree(source, folder)
    torch.manual_seed(2)
    donor = DeepseekV3ForCausalLM(_v3_config(num_layers=5))
    with torch.no_grad():
        donor.model.layers[4].mlp.gate.e_score_correction_bias.normal_(0, 0.05)
    donor.save_pretrained(folder + "-donor")
    layer = {k: v for k, v in load_file(os.path.join(folder + "-donor", "model.safetensors")).items()
             if k.startswith("model.layers.4.")}
    shutil.rmtree(folder + "-donor")
    tensors = load_file(os.path.join(folder, "model.safetensors"))
    g, h = torch.Generator().manual_seed(3), 48
    layer.update({
        "model.layers.4.enorm.weight": 1 + 0.1 * torch.randn(h, generator=g),
        "model.layers.4.hnorm.weight": 1 + 0.1 * torch.randn(h, generator=g),
        "model.layers.4.eh_proj.weight": 0.1 * torch.randn(h, 2 * h, generator=g),
        "model.layers.4.shared_head.norm.weight": 1 + 0.1 * torch.randn(h, generator=g),
        "model.layers.4.embed_tokens.weight": tensors["model.embed_tokens.weight"].clone(),
        "model.layers.4.shared_head.head.weight": tensors["lm_head.weight"].clone(),
    })
    save_file({**tensors, **layer}, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})


def save_v2(folder: str, lite: bool) -> None:
    """V2: q LoRA, 8 experts top-3 within the 2 best of 4 groups (by their best expert), scaling 3,
    YaRN with mscale 1 / mscale_all_dim 0.8. V2-Lite: no q LoRA, greedy top-3, scaling 1, YaRN
    0.707 / 0.707, and the release's scoring_func, moe_layer_freq, aux_loss_alpha, seq_aux."""
    from transformers import DeepseekV2Config, DeepseekV2ForCausalLM

    if lite:
        config = DeepseekV2Config(
            vocab_size=384, hidden_size=56, intermediate_size=72, moe_intermediate_size=12, num_hidden_layers=4,
            num_attention_heads=4, n_shared_experts=2, n_routed_experts=8, routed_scaling_factor=1.0,
            kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8, v_head_dim=8, qk_nope_head_dim=12, n_group=1,
            topk_group=1, topk_method="greedy", num_experts_per_tok=3, first_k_dense_replace=1, norm_topk_prob=False,
            max_position_embeddings=64, initializer_range=0.1,
            rope_parameters={**YARN, "mscale": 0.707, "mscale_all_dim": 0.707})
    else:
        config = DeepseekV2Config(
            vocab_size=320, hidden_size=40, intermediate_size=60, moe_intermediate_size=10, num_hidden_layers=4,
            num_attention_heads=4, n_shared_experts=2, n_routed_experts=8, routed_scaling_factor=3.0,
            kv_lora_rank=14, q_lora_rank=18, qk_rope_head_dim=8, v_head_dim=6, qk_nope_head_dim=10, n_group=4,
            topk_group=2, topk_method="group_limited_greedy", num_experts_per_tok=3, first_k_dense_replace=1,
            norm_topk_prob=False, max_position_embeddings=64, initializer_range=0.1,
            rope_parameters={**YARN, "mscale": 1.0, "mscale_all_dim": 0.8})
    torch.manual_seed(4 if lite else 5)
    DeepseekV2ForCausalLM(config).save_pretrained(folder)
    if lite:
        edit_config(folder, scoring_func="softmax", moe_layer_freq=1, aux_loss_alpha=0.001, seq_aux=True)


def edit_config(folder: str, **fields) -> None:
    path = os.path.join(folder, "config.json")
    config = json.load(open(path))
    json.dump({**config, **fields}, open(path, "w"), indent=2)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """The four HF folders, each imported under every layout and exported back; a V3 import
    with one fresh MTP module (twice with MTP_SEED under different layouts, once with another
    seed) and its export."""
    root = tmp_path_factory.mktemp("hf-families")
    hf = {family: str(root / family) for family in FAMILIES}
    save_v3(hf["v3"])
    add_mtp_layer(hf["v3"], hf["v3_mtp"])
    save_v2(hf["v2"], lite=False)
    save_v2(hf["v2_lite"], lite=True)
    imported = {}
    for family in FAMILIES:
        for layout, parallel in LAYOUTS.items():
            imported[family, layout] = str(root / f"{family}-{layout}")
            convert_from_hf(hf[family], imported[family, layout], parallel, progress=False)
    back = {}
    for family in FAMILIES:  # exported from the PP2 chunks
        back[family] = str(root / f"{family}-back")
        convert_to_hf(imported[family, "pp2"], back[family], tokenizer="none", progress=False)
    fresh = {name: str(root / f"v3-fresh-{name}") for name in ("ep2", "tp1", "other_seed")}
    convert_from_hf(hf["v3"], fresh["ep2"], LAYOUTS["ep2"], progress=False, mtp_layers=1, seed=MTP_SEED)
    convert_from_hf(hf["v3"], fresh["tp1"], progress=False, mtp_layers=1, seed=MTP_SEED)
    convert_from_hf(hf["v3"], fresh["other_seed"], progress=False, mtp_layers=1, seed=MTP_SEED + 1)
    fresh_hf = str(root / "v3-fresh-hf")
    convert_to_hf(fresh["tp1"], fresh_hf, tokenizer="none", progress=False)
    return {"root": root, "hf": hf, "imported": imported, "back": back, "fresh": fresh, "fresh_hf": fresh_hf}


# --------------------------------------------------------------------------- runs


def training_config(root, checkpoint: str) -> str:
    """The text quickstart's training settings around the model stored in `checkpoint`."""
    model = DistCheckpointReader(checkpoint).common["config"]["model"]
    path = os.path.join(str(root), os.path.basename(checkpoint) + ".yaml")
    with open(path, "w") as f:
        yaml.safe_dump({"base": QUICKSTART, "model": model}, f)
    return path


def metrics(run_dir: str) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def trained(work):
    """3 steps from the V2-Lite import under PP2xEP2 (4 ranks; written as PP2 chunks), then its
    export; 3 steps on one rank from the V3 import with a fresh MTP module."""
    root = work["root"]
    v2_run, v3_run = str(root / "run-v2-lite"), str(root / "run-v3-mtp")
    checkpoint = work["imported"]["v2_lite", "pp2"]
    pretrain(4, TRAIN + ["parallel.pp=2", "parallel.ep=2", f"checkpoint.load={checkpoint}", f"run.dir={v2_run}"],
             config=training_config(root, checkpoint))
    trained_hf = str(root / "v2-lite-trained-hf")
    convert_to_hf(os.path.join(v2_run, "checkpoints"), trained_hf, tokenizer="none", progress=False)
    pretrain(1, TRAIN + [f"checkpoint.load={work['fresh']['ep2']}", f"run.dir={v3_run}"],
             config=training_config(root, work["fresh"]["ep2"]))
    return {"v2_lite": v2_run, "v3_mtp": v3_run, "v2_lite_hf": trained_hf}


@pytest.fixture(scope="module")
def verified(work, trained):
    """One torchrun of tools/verify_hf.py on 2 ranks: every family's import under every layout
    against its folder; the fresh-MTP import and the trained V2-Lite against their exports; and
    a control, the V2 import against its folder read as greedy (no group limit)."""
    greedy = str(work["root"] / "v2-read-greedy")
    shutil.copytree(work["hf"]["v2"], greedy)
    edit_config(greedy, topk_method="greedy")
    triples = [(work["imported"][case], work["hf"][case[0]], case[1]) for case in CASES]
    triples += [(work["fresh"]["tp1"], work["fresh_hf"], "tp2"),
                (os.path.join(trained["v2_lite"], "checkpoints"), trained["v2_lite_hf"], "ep2"),
                (work["imported"]["v2", "tp1"], greedy, "tp1")]
    args = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
            os.path.join(ROOT, "tools", "verify_hf.py")]
    for checkpoint, hf, layout in triples:
        args += ["--checkpoint", checkpoint, "--hf", hf, "--layout", layout]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(args, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, f"{proc.stdout[-2000:]}\n{proc.stderr[-5000:]}"
    rows = json.loads(proc.stdout.strip().splitlines()[-1])["results"]
    assert len(rows) == len(triples)
    return {(row["checkpoint"], row["hf"], row["layout"]): row for row in rows}


def _within_tolerance(row: dict) -> None:
    tol = tolerance(row["logits_max_abs"])
    for key, value in row.items():
        if key.endswith("_max_abs_diff"):
            assert value <= tol, row


# --------------------------------------------------------------------------- logits


@pytest.mark.parametrize("family,layout", CASES, ids=[f"{f}-{lay}" for f, lay in CASES])
def test_imported_logits_equal_transformers(work, verified, family, layout):
    row = verified[work["imported"][family, layout], work["hf"][family], layout]
    _within_tolerance(row)
    assert ("mtp_1_max_abs_diff" in row) == (family == "v3_mtp"), row  # the MTP layer when the weights hold one
    assert row["logits_max_abs"] > 1.0  # large weights: routing and logits far from uniform
    mtp = f", MTP {row['mtp_1_max_abs_diff']:.2e}" if "mtp_1_max_abs_diff" in row else ""
    print(f"{family} {layout}: max |logit diff| {row['logits_max_abs_diff']:.2e}{mtp} "
          f"(relative {row['logits_max_abs_diff'] / row['logits_max_abs']:.1e}, max |logit| {row['logits_max_abs']:.2f})")


def test_tolerance_tells_group_limited_routing(work, verified):
    """Reading the V2 folder's routing as plain greedy changes the logits far beyond the tolerance:
    the group limit is what the comparison checks, not a no-op."""
    row = verified[work["imported"]["v2", "tp1"], str(work["root"] / "v2-read-greedy"), "tp1"]
    assert row["logits_max_abs_diff"] > 100 * tolerance(row["logits_max_abs"]), row
    print(f"V2 read as greedy: max |logit diff| {row['logits_max_abs_diff']:.2e}")


def test_round_trip_is_tensor_identical(work):
    """HF -> megatron (PP2 chunks) -> HF: the same tensors (names, dtypes, values), the same
    family, and transformers computes the same logits from both folders."""
    from transformers import AutoModelForCausalLM

    tokens = torch.randint(0, 320, (2, 24), generator=torch.Generator().manual_seed(0))
    for family in FAMILIES:
        original, back = HFFolderReader(work["hf"][family]), HFFolderReader(work["back"][family])
        assert sorted(original.keys()) == sorted(back.keys()), family
        for key in original.keys():
            a, b = original.read(key), back.read(key)
            assert a.dtype == b.dtype and torch.equal(a, b), (family, key)
        models = [AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, experts_implementation="eager")
                  for folder in (work["hf"][family], work["back"][family])]
        expected = "DeepseekV2ForCausalLM" if family.startswith("v2") else "DeepseekV3ForCausalLM"
        assert [type(model).__name__ for model in models] == [expected] * 2
        with torch.no_grad():
            a, b = (model(tokens).logits for model in models)
        assert torch.allclose(a, b, rtol=0, atol=1e-6), (family, float((a - b).abs().max()))


# --------------------------------------------------------------------------- MTP from the weights


def test_no_mtp_weights_import_without_mtp_in_one_line(work, tmp_path, capsys):
    code, out, err = tool("convert_from_hf", ["--hf", work["hf"]["v3"], "--out", str(tmp_path / "a"),
                                              "--no-progress"], capsys)
    assert code == 0, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines == ["from HF: config.json declares num_nextn_predict_layers=1 but the folder holds no MTP "
                     "weights (model.layers.4.*): importing without MTP (--mtp-layers N adds N freshly "
                     "initialised MTP modules)"], err
    assert json.loads(out.strip().splitlines()[-1])["mtp_layers"] == 0
    # a folder with MTP weights imports them, saying nothing
    code, out, err = tool("convert_from_hf", ["--hf", work["hf"]["v3_mtp"], "--out", str(tmp_path / "b"),
                                              "--no-progress"], capsys)
    assert code == 0 and not err.strip(), err
    assert json.loads(out.strip().splitlines()[-1])["mtp_layers"] == 1
    assert DistCheckpointReader(str(tmp_path / "b")).common["config"]["model"]["mtp_num_layers"] == 1


def test_fresh_mtp_is_seeded_and_layout_independent(work):
    """--mtp-layers 1: the same seed gives the same MTP tensors whatever layout the checkpoint is
    written as; another seed other MTP tensors; the main model is the folder's either way."""
    same, first, other = (DistCheckpointReader(work["fresh"][name]) for name in ("tp1", "ep2", "other_seed"))
    keys = same.tensor_keys()
    assert keys == first.tensor_keys() == other.tensor_keys()
    mtp_keys = [k for k in keys if k.startswith("mtp.")]
    assert len(mtp_keys) > 10 and "mtp.layers.0.eh_proj.weight" in mtp_keys
    for key in keys:
        assert torch.equal(same.read(key), first.read(key)), key
        differs = not torch.equal(same.read(key), other.read(key))
        trivially_equal = key.endswith(("norm.weight", "layernorm.weight", "expert_bias"))
        assert differs == (key.startswith("mtp.") and not trivially_equal), key


def _step1_losses(hf_folder: str, config_path: str) -> tuple[float, float]:
    """transformers' mean cross-entropy (main head, first MTP depth) on step 1's global batch of
    the synthetic data the training run read."""
    from megatron_mm.conversion.hf_model import load_pretrained
    from megatron_mm.data.synthetic import SyntheticDataset

    cfg = load_config(config_path, TRAIN)
    t = cfg.train
    data = SyntheticDataset(t.steps * t.global_batch_size, cfg.model.seq_length, cfg.model.vocab_size, t.seed)
    samples = [data[i] for i in range(t.global_batch_size)]
    tokens, labels = (torch.stack([s[k] for s in samples]) for k in ("tokens", "labels"))
    model = load_pretrained(hf_folder, attn_implementation="eager", experts_implementation="eager")
    with torch.no_grad():
        logits = model(tokens).logits
        main = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())
        depths = model.mtp_logits(tokens)  # depth 1 at t predicts token t+2 = labels[t+1]
        mtp = (torch.nn.functional.cross_entropy(depths[0].flatten(0, 1), labels[:, 1:].flatten())
               if depths else torch.tensor(math.nan))
    return float(main), float(mtp)


def test_fresh_mtp_trains(work, trained, verified):
    """The V3 import with a fresh MTP module trains with its MTP loss logged every step; step 1's
    loss and MTP loss equal transformers' on the same batch (the export of the same checkpoint,
    whose MTP logits equal megatron's under TP2)."""
    steps = metrics(trained["v3_mtp"])
    assert [s["step"] for s in steps] == [1, 2, 3]
    assert all(math.isfinite(s["mtp_1_loss"]) and s["mtp_1_loss"] > 0 for s in steps), steps
    _within_tolerance(verified[work["fresh"]["tp1"], work["fresh_hf"], "tp2"])
    main, mtp = _step1_losses(work["fresh_hf"], str(work["root"] / "v3-fresh-ep2.yaml"))
    assert steps[0]["lm_loss"] == pytest.approx(main, rel=1e-5)
    assert steps[0]["mtp_1_loss"] == pytest.approx(mtp, rel=1e-5)
    print(f"fresh MTP: step-1 loss {steps[0]['lm_loss']:.6f} (transformers {main:.6f}), "
          f"MTP loss {steps[0]['mtp_1_loss']:.6f} (transformers {mtp:.6f})")


# --------------------------------------------------------------------------- DeepSeek-V2-Lite


def test_v2_lite_import_trains_under_pp2_ep2(work, trained, verified):
    """The V2-Lite-shaped import trains 3 steps under PP2xEP2 with its balance loss; step 1's loss
    equals transformers' on the same batch; after training, its export still computes megatron's
    logits (megatron under EP2)."""
    steps = metrics(trained["v2_lite"])
    assert [s["step"] for s in steps] == [1, 2, 3]
    assert all(math.isfinite(s["loss"]) for s in steps)
    main, _ = _step1_losses(work["hf"]["v2_lite"], str(work["root"] / "v2_lite-pp2.yaml"))
    assert steps[0]["lm_loss"] == pytest.approx(main, rel=1e-5)
    stored = DistCheckpointReader(os.path.join(trained["v2_lite"], "checkpoints")).common["config"]["model"]
    assert stored["aux_loss_coeff"] == 0.001 and stored["router_pre_softmax"] is True  # from aux_loss_alpha
    row = verified[os.path.join(trained["v2_lite"], "checkpoints"), trained["v2_lite_hf"], "ep2"]
    _within_tolerance(row)
    print(f"V2-Lite PP2xEP2: step-1 loss {steps[0]['lm_loss']:.6f} (transformers {main:.6f}); after 3 steps, "
          f"export vs megatron EP2 {row['logits_max_abs_diff']:.2e}")


V2_LITE_RELEASE = {  # deepseek-ai/DeepSeek-V2-Lite config.json (the numbers configs/models/deepseek_v2_lite_16b.yaml names)
    "architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2", "attention_bias": False,
    "aux_loss_alpha": 0.001, "bos_token_id": 100000, "eos_token_id": 100001, "first_k_dense_replace": 1,
    "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 10944,
    "kv_lora_rank": 512, "max_position_embeddings": 163840, "moe_intermediate_size": 1408, "moe_layer_freq": 1,
    "n_group": 1, "n_routed_experts": 64, "n_shared_experts": 2, "norm_topk_prob": False, "num_attention_heads": 16,
    "num_experts_per_tok": 6, "num_hidden_layers": 27, "num_key_value_heads": 16, "q_lora_rank": None,
    "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "rms_norm_eps": 1e-06,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 0.707, "mscale_all_dim": 0.707,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
    "rope_theta": 10000, "routed_scaling_factor": 1.0, "scoring_func": "softmax", "seq_aux": True,
    "tie_word_embeddings": False, "topk_group": 1, "topk_method": "greedy", "v_head_dim": 128, "vocab_size": 102400,
}


def test_v2_lite_release_config_is_the_shipped_model_config():
    """The release's config.json reads as configs/models/deepseek_v2_lite_16b.yaml, and that
    config writes back a DeepseekV2 config.json with the release's routing."""
    shipped = load_config(os.path.join(ROOT, "configs", "models", "deepseek_v2_lite_16b.yaml")).model
    imported = mapping.model_config_from_hf(V2_LITE_RELEASE)
    mapping.compare_model_configs(imported, shipped, "the DeepSeek-V2-Lite release", "deepseek_v2_lite_16b.yaml")
    assert imported.aux_loss_coeff == shipped.aux_loss_coeff == 0.001
    written = mapping.hf_config(shipped, torch.bfloat16)
    for key in ("architectures", "model_type", "topk_method", "norm_topk_prob", "scoring_func", "n_group",
                "topk_group", "routed_scaling_factor", "num_experts_per_tok", "first_k_dense_replace", "q_lora_rank"):
        assert written[key] == V2_LITE_RELEASE[key], key


# --------------------------------------------------------------------------- refused, one line each


def test_what_megatron_cannot_express_is_refused_in_one_line(work, tmp_path, capsys):
    def refused(family: str, args: list[str] = (), **fields) -> str:
        folder = tmp_path / f"case{len(list(tmp_path.iterdir()))}"
        shutil.copytree(work["hf"][family], folder)
        edit_config(str(folder), **fields)
        return _last_error(tool("convert_from_hf", ["--hf", str(folder), "--out", str(folder) + "-out",
                                                    "--no-progress", *args], capsys))

    # DeepSeek-V2 itself: top-6 within 3 of 8 groups ranks groups by their best expert; megatron-core
    # by the sum of their top 6/3 = 2
    assert ("topk_method='group_limited_greedy' with num_experts_per_tok=6, topk_group=3: DeepseekV2 ranks a group "
            "by its best expert, megatron-core by the sum of its top num_experts_per_tok/topk_group=2") in refused(
        "v2", num_experts_per_tok=6, topk_group=3, n_group=4)
    assert "topk_method='noaux_tc': DeepseekV2ForCausalLM routes with greedy or group_limited_greedy" in refused(
        "v2", topk_method="noaux_tc")
    assert "norm_topk_prob=true: transformers' DeepseekV2 ignores it" in refused("v2_lite", norm_topk_prob=True)
    assert "scoring_func='sigmoid': DeepseekV2 routes with softmax scores" in refused("v2_lite", scoring_func="sigmoid")
    assert "moe_layer_freq=2" in refused("v2_lite", moe_layer_freq=2)
    assert ("topk_group=1 with num_experts_per_tok=3: DeepseekV3 ranks a group by its top-2 experts, megatron-core "
            "by its top num_experts_per_tok/topk_group=3") in refused("v3", num_experts_per_tok=3)
    assert "--mtp-layers 1: DeepseekV2ForCausalLM has no MTP layers" in refused("v2", ["--mtp-layers", "1"])
    assert ("--mtp-layers 2: the folder holds 1 MTP layer(s) (model.layers.4.*); give --mtp-layers 1 to import "
            "them or 0 to leave them out") in refused("v3_mtp", ["--mtp-layers", "2"])
    # megatron -> HF: a softmax router DeepseekV2 cannot express
    cfg = load_config(os.path.join(ROOT, "configs", "models", "deepseek_v2_lite_16b.yaml"),
                      ["model.router_pre_softmax=false", "model.mtp_num_layers=1"])
    with pytest.raises(ConversionError, match=r"model.router_pre_softmax=false: megatron takes the softmax of the "
                                              r"chosen experts' logits.*; model.mtp_num_layers=1: "
                                              r"DeepseekV2ForCausalLM has no MTP layers"):
        mapping.hf_config(cfg.model, torch.float32)
