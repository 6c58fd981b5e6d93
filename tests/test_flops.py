"""costs/flops.py against `torch.utils.flop_counter.FlopCounterMode` on the real
megatron-core models (tests/flops_count.py counts them in one process; its SCENARIOS: the
tiny text MoE + MLA model with one MTP layer, with and without full recomputation; the tiny
multimodal model with the MLP projector or the resampler, and with frozen encoders,
projectors or language model).

Measured: equal to the FLOP (relative difference 0) in every scenario, forward and
training, in total and per part, once the one convention that differs is accounted for:
the counter prices causal attention at every key (the CPU kernels compute the whole score
matrix), flops.py at seq/2 keys a query (`full_attention_extra`). MoE experts are counted by
what ran, which is the top-k count exactly: every token goes to `moe_router_topk` experts.

Per part: forward by module (decoder attention, decoder MLP/MoE, MTP, LM head, each
encoder and projector). Training by module where the counter can attribute the backward
pass: it marks a module left when the gradients of the module's inputs are done, so a
module whose input needs no gradient (the patch embedding and first audio convolution read
the media, a projector behind a frozen encoder, the resampler's learned queries) keeps
collecting later backward work. Those parts are checked together as the rest of the
total. Test time: about 15 s (one subprocess builds 8 models)."""

import json
import os
import subprocess
import sys

import pytest

from megatron_mm.config import load_config
from megatron_mm.costs import flops

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from flops_count import SCENARIOS  # noqa: E402

EXACT = 1e-12  # relative; every count is an integer well below 2**53


@pytest.fixture(scope="module")
def counted():
    out = subprocess.run([sys.executable, os.path.join(HERE, "flops_count.py")], capture_output=True, text=True,
                         timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"})
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def full_attention_extra(m, tokens: int) -> float:
    """Forward FLOPs the counter adds to one causal MLA layer over `tokens` tokens: it prices
    every query against all seq keys, flops.py against seq/2 (Q·Kᵀ over the qk + RoPE dims,
    P·V over the value dims)."""
    return tokens * 2 * m.num_attention_heads * (m.qk_head_dim + m.qk_pos_emb_head_dim + m.v_head_dim) * m.seq_length / 2


def modules(counts: dict, prefix: str, suffixes=("",)) -> float:
    return sum(v for k, v in counts.items() if k.startswith(prefix) and k.endswith(suffixes))


def counted_parts(counts: dict) -> dict:
    """The counter's modules grouped as flops.step_training_flops_by_part's parts."""
    return {
        "decoder_attention": modules(counts, "decoder.", (".self_attention",)),
        "decoder_mlp": modules(counts, "decoder.", (".mlp",)),
        "decoder": modules(counts, "decoder."),
        "mtp": modules(counts, "mtp."),
        "lm_head": counts.get("output_layer", 0),
        "vision_encoder": modules(counts, "vision.", ("tower",)),
        "vision_projector": modules(counts, "vision.", ("resampler", "projector")),
        "audio_encoder": modules(counts, "audio.", ("conv1", "conv2", "decoder")),
        "audio_projector": counts.get("audio.projector", 0),
    }


def check(got: dict, want: dict, names, where: str) -> None:
    for name in names:
        assert got[name] == pytest.approx(want[name], rel=EXACT), (where, name, got[name], want[name])


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_forward_by_part(counted, scenario):
    path, overrides = SCENARIOS[scenario]
    m = load_config(path, overrides).model
    c = counted[scenario]
    tokens, images, clips = c["batch"]["tokens"], c["batch"]["images"], c["batch"]["clips"]
    extra = full_attention_extra(m, tokens)
    want = {
        "decoder_attention": m.num_layers * (tokens * flops.attention_forward_flops(m) + extra),
        "decoder_mlp": tokens * sum(flops.mlp_forward_flops(m, moe=m.is_moe and i >= m.first_k_dense_layers)
                                    for i in range(m.num_layers)),
        "mtp": m.mtp_num_layers * (tokens * flops.mtp_layer_forward_flops(m) + extra),
        "lm_head": tokens * (1 + m.mtp_num_layers) * flops.lm_head_forward_flops(m),
    }
    want["decoder"] = want["decoder_attention"] + want["decoder_mlp"]
    for name, encoder, forward, count in (("vision", m.vision, flops.vision_forward_flops, images),
                                          ("audio", m.audio, flops.audio_forward_flops, clips)):
        f = forward(encoder, m.hidden_size) if encoder is not None else {"encoder": 0, "projector": 0}
        want[f"{name}_encoder"], want[f"{name}_projector"] = count * f["encoder"], count * f["projector"]
    got = counted_parts(c["forward"])
    check(got, want, want, scenario)
    # The parts are everything counted, and flops.py's total per token agrees.
    parts = ("decoder", "mtp", "lm_head", "vision_encoder", "vision_projector", "audio_encoder", "audio_projector")
    assert sum(got[p] for p in parts) == c["forward"]["Global"]
    assert c["forward"]["Global"] == pytest.approx(
        tokens * flops.forward_flops_per_token(m) + (m.num_layers + m.mtp_num_layers) * extra
        + sum(want[p] for p in parts if p.startswith(("vision", "audio"))), rel=EXACT)


def unattributed_parts(cfg) -> set[str]:
    """Parts that run a backward pass although their input needs no gradient: the counter
    cannot tell where their backward work ends (see the module docstring)."""
    m, f = cfg.model, cfg.train.freeze
    blind = set()
    for name, encoder, encoder_frozen in (("vision", m.vision, f.vision_encoder), ("audio", m.audio, f.audio_encoder)):
        if encoder is None:
            continue
        if not encoder_frozen:  # the patch embedding / first convolution reads the media
            blind.add(f"{name}_encoder")
        learned_queries = getattr(encoder, "projector", "mlp") == "resampler"
        if learned_queries or (encoder_frozen and not f.projectors):
            blind.add(f"{name}_projector")
    return blind


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_training_by_part_and_total(counted, scenario):
    path, overrides = SCENARIOS[scenario]
    cfg = load_config(path, overrides)
    m = cfg.model
    c = counted[scenario]
    tokens, images, clips = c["batch"]["tokens"], c["batch"]["images"], c["batch"]["clips"]
    want = flops.step_training_flops_by_part(cfg, tokens, images, clips)
    # Attention scores train 3 x forward (4 x recomputed), frozen language model or not.
    factor = 4 if cfg.parallel.recompute == "full" else 3
    extra = factor * full_attention_extra(m, tokens)
    want["decoder"] += m.num_layers * extra
    want["mtp"] += m.mtp_num_layers * extra
    got = counted_parts(c["training"])
    blind = unattributed_parts(cfg)
    check(got, want, [p for p in want if p not in blind], scenario)
    total = c["training"]["Global"]
    assert total == pytest.approx(sum(want.values()), rel=EXACT), (scenario, total, sum(want.values()))
    rest = total - sum(got[p] for p in want if p not in blind)
    assert rest == pytest.approx(sum(want[p] for p in blind), rel=EXACT), (scenario, sorted(blind))
    assert total == pytest.approx(flops.step_training_flops(cfg, tokens, images, clips)
                                  + (m.num_layers + m.mtp_num_layers) * extra, rel=EXACT)


def test_recompute_adds_one_forward_of_the_decoder_and_mtp_layers(counted):
    """Counted: full recomputation adds exactly one forward pass of the decoder and MTP layers
    (not of the LM head); flops.py agrees."""
    path, overrides = SCENARIOS["text_recompute"]
    cfg = load_config(path, overrides)
    m = cfg.model
    plain, recomputed = counted["text"], counted["text_recompute"]
    layers = modules(plain["forward"], "decoder.") + modules(plain["forward"], "mtp.")
    assert recomputed["training"]["Global"] - plain["training"]["Global"] == layers
    tokens = plain["batch"]["tokens"]
    assert tokens * (flops.training_flops_per_token(m, recompute="full") - flops.training_flops_per_token(m)) == (
        pytest.approx(layers - (m.num_layers + m.mtp_num_layers) * full_attention_extra(m, tokens), rel=EXACT))


def test_defaults_and_refusals():
    cfg = load_config(SCENARIOS["text"][0], SCENARIOS["text"][1])
    m = cfg.model
    assert flops.training_flops_per_token(m) == 3 * flops.forward_flops_per_token(m)
    assert flops.step_training_flops(cfg, 1000) == pytest.approx(1000 * flops.training_flops_per_token(m))
    with pytest.raises(ValueError, match="recompute='selective'"):
        flops.training_flops_per_token(m, recompute="selective")
    # the step's recompute: the config's unless given (the loop's MFU passes "none")
    full = load_config(SCENARIOS["text"][0], SCENARIOS["text"][1] + ["parallel.recompute=full"])
    with_recompute = 1000 * flops.training_flops_per_token(m, recompute="full")
    assert flops.step_training_flops(full, 1000) == pytest.approx(with_recompute, rel=1e-12)
    assert flops.step_training_flops(full, 1000, recompute="none") == pytest.approx(1000 * flops.training_flops_per_token(m))
    assert flops.step_training_flops(cfg, 1000, recompute="full") == pytest.approx(with_recompute, rel=1e-12)
    assert with_recompute > 1.2 * flops.step_training_flops(cfg, 1000)
    with pytest.raises(ValueError, match="no vision encoder"):
        flops.step_training_flops(cfg, 1000, images=1)
