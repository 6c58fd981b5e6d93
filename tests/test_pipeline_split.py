"""Layers per pipeline stage (costs/pipeline_split.py) and the encoder FLOPs behind the
automatic split (costs/flops.py): hand-computed FLOPs, text-only stays even, heavy
encoders take layers off stage 0, explicit values win, impossible splits are refused, and
what megatron-core builds from our TransformerConfig is the planned split, layer for layer.

Fast: no process groups; megatron-core is only asked for its per-stage layer arithmetic.
(The PP2 loss curve with an uneven split is `pp2_uneven` in tests/test_training.py.)
"""

import os

import pytest

from conftest import ROOT
from megatron_mm.config import ConfigError, FreezeConfig, Hardware, load_config, validate
from megatron_mm.costs import pipeline_split as ps
from megatron_mm.costs.flops import (
    audio_forward_flops, encoder_training_flops, head_forward_flops_per_token, layer_forward_flops_per_token,
    vision_forward_flops,
)

MULTIMODAL = os.path.join(ROOT, "configs", "quickstart.yaml")  # tiny LLM (4 layers) + ViT + audio encoder
TEXT = os.path.join(ROOT, "configs", "quickstart_text.yaml")
V3 = os.path.join(ROOT, "configs", "models", "deepseek_v3_671b.yaml")
CPU = Hardware()


def cfg_of(path, *overrides, world=None):
    cfg = load_config(path, list(overrides))
    p = cfg.parallel
    validate(cfg, world or p.tp * p.pp, CPU)
    return cfg


# --------------------------------------------------------------------------- encoder FLOPs


def test_encoder_flops_by_hand():
    m = load_config(MULTIMODAL).model
    # ViT: 32x32 image, 8x8 patches -> 16 tokens of 64; 2 layers, ffn 128; projector 64 -> 64 -> 64.
    patch = 2 * 16 * (3 * 8 * 8 * 64)
    per_token = 4 * 64 * 64 + 2 * 64 * 128 + 2 * 16 * 64  # qkv + proj, fc1 + fc2, scores + values
    assert vision_forward_flops(m.vision, 64) == {
        "encoder": patch + 2 * 2 * 16 * per_token, "projector": 2 * 16 * (64 * 64 + 64 * 64)}
    # Audio: 100 frames of 80 mels, conv1 (k3) -> 100 x 64, conv2 (k3, stride 2) -> 50 x 64;
    # 2 layers over 50 tokens; pooled by 4 -> 12 tokens through the projector.
    convs = 2 * (100 * 80 * 3 * 64 + 50 * 64 * 3 * 64)
    per_token = 4 * 64 * 64 + 2 * 64 * 128 + 2 * 50 * 64
    assert audio_forward_flops(m.audio, 64) == {
        "encoder": convs + 2 * 2 * 50 * per_token, "projector": 2 * 12 * (64 * 64 + 64 * 64)}
    # Resampler: 8 queries cross-attend to the 16 patches (q, kv, scores + values, proj); the
    # projector then sees 8 tokens instead of 16.
    m.vision.projector = "resampler"
    cross = 2 * (8 * 64 * 64 + 16 * 2 * 64 * 64 + 2 * 8 * 16 * 64 + 8 * 64 * 64)
    assert vision_forward_flops(m.vision, 64)["projector"] == cross + 2 * 8 * (64 * 64 + 64 * 64)


def test_encoder_training_flops_follow_freezing():
    m = load_config(MULTIMODAL).model
    v, a = vision_forward_flops(m.vision, 64), audio_forward_flops(m.audio, 64)
    # The convolution that reads the media computes no input gradient: 2 x, the rest 3 x.
    patch, conv1 = 2 * 16 * (3 * 8 * 8 * 64), 2 * 100 * 80 * 3 * 64
    assert encoder_training_flops(m, FreezeConfig()) == {
        "image": 3 * (v["encoder"] + v["projector"]) - patch, "audio": 3 * (a["encoder"] + a["projector"]) - conv1}
    # A frozen encoder runs forward only; a frozen projector behind a trained encoder still
    # back-propagates its input gradient.
    got = encoder_training_flops(m, FreezeConfig(vision_encoder=True, projectors=True))
    assert got == {"image": v["encoder"] + v["projector"], "audio": 3 * a["encoder"] - conv1 + 2 * a["projector"]}


def test_media_per_sequence_assumption():
    # 128 tokens filled with samples of one image (16 tokens) and one clip (12 tokens), no text.
    cfg = load_config(MULTIMODAL)
    assert ps.media_per_sequence(cfg) == 128 / 28
    assert ps.encoder_flops_per_sequence(cfg) == pytest.approx(
        sum(encoder_training_flops(cfg.model, cfg.train.freeze).values()) * 128 / 28)
    assert ps.media_per_sequence(load_config(TEXT)) == 0


# --------------------------------------------------------------------------- the split


def test_text_only_keeps_the_even_split():
    split = ps.plan(cfg_of(TEXT, "parallel.pp=2"))
    assert (split.layers, split.first, split.last, split.source, split.encoder_flops) == ([2, 2], None, None, "even", 0)
    assert ps.plan(cfg_of(TEXT)).layers == [4]


def test_heavy_encoders_take_layers_off_the_first_stage():
    """The multimodal quickstart under PP2: the encoders cost about 5 dense LLM layers' worth
    per sequence, so stage 0 keeps one layer: [1, 3], passed to megatron-core as first=1, last=3."""
    cfg = cfg_of(MULTIMODAL, "parallel.pp=2")
    split = ps.plan(cfg)
    assert (split.layers, split.first, split.last, split.source) == ([1, 3], 1, 3, "auto")
    # The stage costs by hand: 3 x forward x 128 tokens of the stage's layers; the head on the
    # last stage; the encoders on the first.
    layer, head, seq = layer_forward_flops_per_token(cfg.model), head_forward_flops_per_token(cfg.model), 128
    encoders = ps.encoder_flops_per_sequence(cfg)
    assert split.encoder_flops == encoders
    assert split.stage_flops == pytest.approx([3 * seq * layer[0] + encoders, 3 * seq * (sum(layer[1:]) + head)])
    even = ps.stage_flops(cfg, [2, 2])[0]
    assert max(split.stage_flops) < max(even)
    line = split.describe()
    assert line.startswith("pipeline: layers per stage [1, 3] (balanced (auto); first stage also runs the "
                           "encoders: 192.8 MFLOP/sequence est.; stage FLOPs est. [231.7 MFLOP, 128.4 MFLOP])"), line


def test_light_encoders_keep_the_even_split():
    small = [f"model.{kind}.{key}={n}" for kind in ("vision", "audio")
             for key, n in (("num_layers", 1), ("hidden_size", 8), ("num_attention_heads", 1), ("ffn_hidden_size", 8))]
    cfg = cfg_of(MULTIMODAL, "parallel.pp=2", "model.audio.num_mel_bins=8", *small)
    split = ps.plan(cfg)
    assert split.layers == [2, 2] and (split.first, split.last) == (None, None) and split.source == "auto"


def test_auto_balances_the_other_stages_too():
    """8 layers over PP4 with very heavy encoders: stage 0 keeps one layer whatever follows; of
    [1,2,2,3] and [1,3,3,1] the second wins (the last stage also carries the LM head)."""
    cfg = cfg_of(MULTIMODAL, "parallel.pp=4", "model.num_layers=8", "model.vision.num_layers=24")
    assert sorted(ps.candidate_splits(8, 4, None)) == [
        [1, 1, 1, 5], [1, 2, 2, 3], [1, 3, 3, 1], [2, 1, 1, 4], [2, 2, 2, 2], [3, 1, 1, 3], [3, 2, 2, 1],
        [4, 1, 1, 2], [5, 1, 1, 1]]
    assert ps.plan(cfg).layers == [1, 3, 3, 1]
    # A given last stage stays; only the first (and so the middle) is chosen.
    assert ps.plan(cfg_of(MULTIMODAL, "parallel.pp=4", "model.num_layers=8", "model.vision.num_layers=24",
                          "parallel.last_stage_layers=3")).layers == [1, 2, 2, 3]


def test_explicit_values_win():
    split = ps.plan(cfg_of(MULTIMODAL, "parallel.pp=2", "parallel.first_stage_layers=3", "parallel.last_stage_layers=1"))
    assert (split.layers, split.first, split.last, split.source) == ([3, 1], 3, 1, "config")
    split = ps.plan(cfg_of(MULTIMODAL, "parallel.pp=2", "parallel.first_stage_layers=2"))
    assert (split.layers, split.first, split.last) == ([2, 2], 2, None)  # megatron-core: the rest evenly
    split = ps.plan(cfg_of(TEXT, "parallel.pp=2", "parallel.first_stage_layers=1", "parallel.last_stage_layers=3"))
    assert (split.layers, split.first, split.last, split.source) == ([1, 3], 1, 3, "config")
    split = ps.plan(cfg_of(TEXT, "model.num_layers=10", "parallel.pp=3", "parallel.last_stage_layers=2"))
    assert (split.layers, split.first, split.last) == ([4, 4, 2], None, 2)


def test_vpp_splits_in_multiples_of_vpp():
    assert ps.candidate_splits(4, 2, 2) == [[2, 2]]
    assert sorted(ps.candidate_splits(12, 3, 2)) == [
        [2, 2, 8], [2, 4, 6], [2, 6, 4], [2, 8, 2], [4, 2, 6], [4, 4, 4], [4, 6, 2], [6, 2, 4], [6, 4, 2], [8, 2, 2]]
    assert ps.plan(cfg_of(MULTIMODAL, "parallel.pp=2", "parallel.vpp=2")).layers == [2, 2]


def test_impossible_splits_are_refused():
    assert ps.candidate_splits(4, 4, 2) == [] and ps.candidate_splits(3, 4, None) == []
    cfg = load_config(MULTIMODAL, ["parallel.pp=4", "parallel.vpp=2"])
    with pytest.raises(ConfigError) as err:
        validate(cfg, 4, CPU)
    assert err.value.problems == [
        "model.num_layers=4: cannot give each of parallel.pp=4 stages at least 2 layer(s), a multiple of parallel.vpp=2"]
    with pytest.raises(ValueError):
        ps.plan(cfg)


def test_deepseek_v3_pp16_split():
    """61 layers over PP16 cannot split evenly; by the FLOPs estimate the last stage's LM head and
    MTP module (two head passes + one MoE layer) are worth about three layers, so [4, 4 x 14, 1]
    balances best; it is the shipped production layout in tests/test_config.py."""
    cfg = load_config(V3, ["parallel.pp=16"])
    best = min(ps.candidate_splits(61, 16, None), key=lambda s: max(ps.stage_flops(cfg, s)[0]))
    assert best == [4] + [4] * 14 + [1]
    cfg = load_config(V3, ["parallel.pp=16", "parallel.first_stage_layers=4", "parallel.last_stage_layers=1",
                           "parallel.ep=64", "precision.dtype=bf16", "train.micro_batch_size=1",
                           "train.global_batch_size=2048"])
    validate(cfg, 2048, Hardware(has_cuda=True, fp8_capable=True, has_transformer_engine=True))
    assert ps.plan(cfg).layers == best


# --------------------------------------------------------------------------- what megatron-core builds


@pytest.mark.parametrize("path,overrides", [
    (MULTIMODAL, ["parallel.pp=2"]),
    (MULTIMODAL, ["parallel.pp=4", "model.num_layers=8", "model.vision.num_layers=24"]),
    (MULTIMODAL, ["parallel.pp=3", "parallel.vpp=2", "model.num_layers=12", "train.global_batch_size=12"]),
    (TEXT, ["parallel.pp=4", "parallel.vpp=2", "model.num_layers=12", "parallel.first_stage_layers=2",
            "parallel.last_stage_layers=2"]),
    (TEXT, ["parallel.pp=3", "model.num_layers=10", "parallel.last_stage_layers=2"]),
    (TEXT, ["parallel.pp=2", "parallel.vpp=2"]),
], ids=["mm-pp2", "mm-pp4", "mm-pp3-vpp2", "text-pp4-vpp2-2+2", "text-pp3-last2", "text-pp2-vpp2"])
def test_megatron_builds_the_planned_split(path, overrides):
    from megatron.core.transformer.transformer_block import get_num_layers_to_build
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    from megatron_mm.models.gpt import transformer_config
    from megatron_mm.runtime import compat

    cfg = cfg_of(path, *overrides)
    split = ps.plan(cfg)
    tc = transformer_config(cfg, compat.transformer_config_overrides(CPU))
    assert ps.megatron_stage_layers(tc) == split.layers
    vpp = tc.virtual_pipeline_model_parallel_size
    built = []
    for rank in range(cfg.parallel.pp):
        indices = []
        for stage in [None] if vpp is None else range(vpp):
            offset = get_transformer_layer_offset(tc, vp_stage=stage, pp_rank=rank)
            indices += range(offset, offset + get_num_layers_to_build(tc, vp_stage=stage, pp_rank=rank))
        built.append(indices)
    assert built == ps.stage_layer_indices(split.layers, vpp)  # the layers the FLOPs estimate priced
