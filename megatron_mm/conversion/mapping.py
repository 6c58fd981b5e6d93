"""Our model config ↔ Hugging Face `DeepseekV3Config` / `DeepseekV2Config`, and megatron-core
parameter names ↔ the DeepSeek-V3 / V2 Hugging Face checkpoint names, one decoder layer at a time.

What maps to what (megatron-core GPTModel built by `models/gpt.py`, our specs):

    embedding.word_embeddings.weight                 model.embed_tokens.weight
    decoder.layers.{i}.input_layernorm               model.layers.{i}.input_layernorm
      self_attention.linear_q_proj (no q LoRA)         self_attn.q_proj
      self_attention.linear_q_down_proj                self_attn.q_a_proj
      self_attention.q_layernorm                       self_attn.q_a_layernorm
      self_attention.linear_q_up_proj                  self_attn.q_b_proj
      self_attention.linear_kv_down_proj               self_attn.kv_a_proj_with_mqa
      self_attention.kv_layernorm                      self_attn.kv_a_layernorm
      self_attention.linear_kv_up_proj                 self_attn.kv_b_proj
      self_attention.linear_proj                       self_attn.o_proj
      pre_mlp_layernorm                                post_attention_layernorm
      mlp.linear_fc1 = [gate; up] (dense layer)        mlp.gate_proj, mlp.up_proj
      mlp.linear_fc2                                   mlp.down_proj
      mlp.router.weight / .expert_bias                 mlp.gate.weight / .e_score_correction_bias (V3 only)
      mlp.experts.experts.linear_fc1[e] = [gate; up]   mlp.experts.{e}.gate_proj, .up_proj
      mlp.experts.experts.linear_fc2[e]                mlp.experts.{e}.down_proj
      mlp.shared_experts.linear_fc1 / fc2              mlp.shared_experts.gate_proj, up_proj / down_proj
    decoder.final_layernorm                          model.norm
    output_layer.weight                              lm_head.weight
    mtp.layers.{k}.enorm / hnorm / eh_proj           model.layers.{L+k}.enorm / hnorm / eh_proj
    mtp.layers.{k}.transformer_layer.*               model.layers.{L+k}.* (as a decoder layer)
    mtp.layers.{k}.final_layernorm                   model.layers.{L+k}.shared_head.norm
    (the MTP module's embedding and head are the     model.layers.{L+k}.embed_tokens, .shared_head.head
     main model's; the HF format keeps copies)

Rotary dimensions need no permutation: megatron-core's MLA rotary (`multi_latent_attention=True`
in `rope_utils`) takes the rope part of q and k as interleaved pairs, de-interleaves them and
rotates halves, which is what `rope_interleave=True` does in transformers' DeepseekV3; both
then attend over the same [nope | rotated rope] layout. DeepseekV2 rotates the interleaved pairs
as complex numbers and leaves them interleaved: the same rotation with q and k permuted alike,
so every q·k, and the attention, is the same.

The two families (transformers 5.24's modeling_deepseek_v2.py / modeling_deepseek_v3.py):

    DeepSeek-V3 (DeepseekV3ForCausalLM)              DeepSeek-V2, V2-Lite (DeepseekV2ForCausalLM)
    sigmoid scores + e_score_correction_bias         softmax over all experts, no bias
      (bias for choosing only)                         (megatron: softmax, router_pre_softmax=true)
    groups ranked by the sum of their top-2 scores   topk_method greedy, or group_limited_greedy:
      (megatron: top moe_router_topk/group_topk)       groups ranked by their best score
    chosen scores renormalised when norm_topk_prob   never renormalised: transformers ignores
      (megatron: always, for top-k > 1)                norm_topk_prob (DeepSeek's own code would
                                                       renormalise instead of scaling), so true is refused
    x routed_scaling_factor                          x routed_scaling_factor
    MTP layers at model.layers.{L+k}                 no MTP
YaRN is the same in both: cos/sin scaled by the `attention_factor` (megatron's
mscale/mscale_all_dim ratio), the softmax scale by yarn_mscale(factor, mscale_all_dim)^2.

The MTP depth of a folder is what its weights hold (`mtp_layers_in`), not `num_nextn_predict_layers`:
transformers' `DeepseekV3Config` defaults that to 1 and writes no MTP tensors (so do fine-tunes).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Iterable, Iterator, Optional

import torch

from megatron_mm.config import ConfigError, ModelConfig, _build
from megatron_mm.conversion.dcp import ConversionError

# Fields of our ModelConfig that the HF config has no place for; kept in config.json under
# this key so that HF -> megatron gives back the same training settings.
OURS_KEY = "megatron_mm"


@dataclasses.dataclass(frozen=True)
class Family:
    """A Hugging Face model family the converters read and write."""

    model_type: str
    architecture: str
    router_bias: bool  # mlp.gate.e_score_correction_bias in every MoE layer
    mtp: bool  # can hold MTP layers


DEEPSEEK_V3 = Family("deepseek_v3", "DeepseekV3ForCausalLM", router_bias=True, mtp=True)
DEEPSEEK_V2 = Family("deepseek_v2", "DeepseekV2ForCausalLM", router_bias=False, mtp=False)
FAMILIES = (DEEPSEEK_V3, DEEPSEEK_V2)


def family_of(m: ModelConfig) -> Family:
    """The family a model converts to: softmax routing is DeepSeek-V2's; sigmoid routing and
    dense models are written as DeepSeek-V3."""
    return DEEPSEEK_V2 if m.is_moe and m.router_score_function == "softmax" else DEEPSEEK_V3


def family_of_hf(config: dict) -> Family:
    arch = (config.get("architectures") or [None])[0]
    for family in FAMILIES:
        if config.get("model_type") == family.model_type:
            return family
    for family in FAMILIES:
        if arch == family.architecture:
            return family
    raise ConversionError(f"config.json: model_type={config.get('model_type')!r}, architectures={arch!r}: only "
                          f"{' and '.join(f.architecture for f in FAMILIES)} checkpoints are converted")


# --------------------------------------------------------------------------- configs


def _yarn_mscale(scale: float, mscale: float) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _groups_matter(num_groups: Optional[int], group_topk: Optional[int]) -> bool:
    """Group-limited routing changes the choice only when fewer than all groups are kept."""
    return bool(num_groups and num_groups > 1 and group_topk and group_topk < num_groups)


def _inexpressible(m: ModelConfig, family: Family) -> list[str]:
    """What `family` cannot express of model `m`, one line each."""
    problems = []
    moe = m.is_moe
    group_size = m.moe_router_topk // (m.router_group_topk or 1)
    if family is DEEPSEEK_V3:
        if moe and m.router_num_groups and group_size != 2:
            problems.append(f"model.router_group_topk={m.router_group_topk}: DeepseekV3 scores a group by its top-2 "
                            f"experts, megatron by its top moe_router_topk/router_group_topk={group_size}")
        if m.mtp_num_layers and not moe:
            problems.append(f"model.mtp_num_layers={m.mtp_num_layers}: DeepseekV3's MTP layers are MoE layers; "
                            "this model is dense")
    else:
        if not m.router_pre_softmax:
            problems.append("model.router_pre_softmax=false: megatron takes the softmax of the chosen experts' "
                            "logits; DeepseekV2ForCausalLM weights each chosen expert by its softmax over all "
                            "experts (model.router_pre_softmax=true)")
        if _groups_matter(m.router_num_groups, m.router_group_topk) and group_size != 1:
            problems.append(f"model.router_group_topk={m.router_group_topk}: DeepseekV2's group_limited_greedy ranks "
                            f"a group by its best expert, megatron by the sum of its top "
                            f"moe_router_topk/router_group_topk={group_size}")
        if m.mtp_num_layers:
            problems.append(f"model.mtp_num_layers={m.mtp_num_layers}: DeepseekV2ForCausalLM has no MTP layers")
    if m.rope_type == "yarn" and m.rotary_scaling_factor <= 1:
        problems.append(f"model.rotary_scaling_factor={m.rotary_scaling_factor}: YaRN in transformers needs a factor > 1")
    return problems


def hf_config(m: ModelConfig, dtype: torch.dtype, bos_id: Optional[int] = None,
              eos_id: Optional[int] = None) -> dict:
    """The `config.json` of the converted language model (DeepseekV3, or DeepseekV2 for a
    softmax router). Raises ConversionError naming the setting when the family cannot express
    something of the model."""
    family = family_of(m)
    problems = _inexpressible(m, family)
    if problems:
        raise ConversionError("; ".join(problems))
    moe = m.is_moe
    num_experts = m.num_experts if moe else 1
    if m.rope_type == "yarn":
        rope = {
            "rope_type": "yarn", "rope_theta": float(m.rotary_base), "factor": float(m.rotary_scaling_factor),
            "original_max_position_embeddings": m.original_max_position_embeddings,
            "beta_fast": float(m.beta_fast), "beta_slow": float(m.beta_slow),
            "mscale": float(m.mscale), "mscale_all_dim": float(m.mscale_all_dim),
            # megatron's cos/sin scale, written out so transformers does not re-derive it
            "attention_factor": _yarn_mscale(m.rotary_scaling_factor, m.mscale)
            / _yarn_mscale(m.rotary_scaling_factor, m.mscale_all_dim),
        }
        max_positions = max(m.seq_length, int(m.original_max_position_embeddings * m.rotary_scaling_factor))
    else:
        rope = {"rope_type": "default", "rope_theta": float(m.rotary_base)}
        max_positions = m.seq_length
    ours = {f.name: getattr(m, f.name) for f in dataclasses.fields(m) if f.name not in ("vision", "audio")}
    grouped = moe and _groups_matter(m.router_num_groups, m.router_group_topk)
    if family is DEEPSEEK_V3:
        router = {
            "n_group": (m.router_num_groups or 1) if moe else 1,
            "topk_group": (m.router_group_topk or 1) if moe else 1,
            # megatron normalises the chosen sigmoid scores whenever more than one expert is chosen
            "norm_topk_prob": bool(moe and m.moe_router_topk > 1),
            "scoring_func": "sigmoid",
            "topk_method": "noaux_tc",
        }
        family_fields = {"rope_interleave": True, "num_nextn_predict_layers": m.mtp_num_layers}
    else:
        router = {
            "n_group": m.router_num_groups if grouped else 1,
            "topk_group": m.router_group_topk if grouped else 1,
            "norm_topk_prob": False,
            "scoring_func": "softmax",
            "topk_method": "group_limited_greedy" if grouped else "greedy",
        }
        family_fields = {"mlp_bias": False}
    return {
        "architectures": [family.architecture],
        "model_type": family.model_type,
        "vocab_size": m.vocab_size,
        "hidden_size": m.hidden_size,
        "intermediate_size": m.ffn_hidden_size,
        "moe_intermediate_size": m.moe_ffn_hidden_size,
        "num_hidden_layers": m.num_layers,
        "num_attention_heads": m.num_attention_heads,
        "num_key_value_heads": m.num_attention_heads,
        "n_shared_experts": m.num_shared_experts if moe else 0,
        "n_routed_experts": num_experts,
        "routed_scaling_factor": float(m.router_topk_scaling_factor or 1.0),
        "kv_lora_rank": m.kv_lora_rank,
        "q_lora_rank": m.q_lora_rank,
        "qk_rope_head_dim": m.qk_pos_emb_head_dim,
        "qk_nope_head_dim": m.qk_head_dim,
        "v_head_dim": m.v_head_dim,
        "num_experts_per_tok": m.moe_router_topk if moe else 1,
        "first_k_dense_replace": m.first_k_dense_layers if moe else m.num_layers,
        **router,
        "hidden_act": "silu",
        "max_position_embeddings": max_positions,
        "initializer_range": m.init_method_std,
        "rms_norm_eps": m.norm_epsilon,
        "tie_word_embeddings": m.share_embeddings_and_output_weights,
        "rope_parameters": rope,
        "attention_bias": False,
        "attention_dropout": 0.0,
        **family_fields,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "pad_token_id": None,
        "use_cache": True,
        "dtype": str(dtype).replace("torch.", ""),
        OURS_KEY: ours,
    }


def _v3_router_from_hf(config: dict, topk: int) -> dict:
    """Our router fields from a DeepseekV3 config: sigmoid scores, expert bias, top-2 group scores."""
    if config.get("scoring_func", "sigmoid") != "sigmoid":
        raise ConversionError(f"config.json: scoring_func={config['scoring_func']!r}: DeepseekV3 routes with sigmoid scores")
    if topk > 1 and not config.get("norm_topk_prob", True):
        raise ConversionError(f"config.json: norm_topk_prob=false with num_experts_per_tok={topk}: megatron "
                              "normalises the scores of the chosen experts")
    if topk == 1 and config.get("norm_topk_prob", False):
        raise ConversionError("config.json: norm_topk_prob=true with num_experts_per_tok=1: megatron does not "
                              "normalise a single expert's score")
    n_group, topk_group = config.get("n_group") or 1, config.get("topk_group") or 1
    if _groups_matter(n_group, topk_group) and topk // topk_group != 2:
        raise ConversionError(f"config.json: topk_group={topk_group} with num_experts_per_tok={topk}: DeepseekV3 "
                              f"ranks a group by its top-2 experts, megatron-core by its top "
                              f"num_experts_per_tok/topk_group={topk // topk_group}")
    return dict(router_score_function="sigmoid",
                router_num_groups=None if n_group == 1 else n_group,
                router_group_topk=None if n_group == 1 else topk_group)


def _v2_router_from_hf(config: dict, topk: int, num_experts: int) -> dict:
    """Our router fields from a DeepseekV2 config: the softmax over all experts, its top k
    (within the best groups for group_limited_greedy), not renormalised."""
    if config.get("scoring_func", "softmax") != "softmax":
        raise ConversionError(f"config.json: scoring_func={config['scoring_func']!r}: DeepseekV2 routes with softmax scores")
    method = config.get("topk_method", "greedy")
    if method not in ("greedy", "group_limited_greedy"):
        raise ConversionError(f"config.json: topk_method={method!r}: DeepseekV2ForCausalLM routes with greedy or "
                              "group_limited_greedy")
    if config.get("norm_topk_prob"):
        raise ConversionError("config.json: norm_topk_prob=true: transformers' DeepseekV2 ignores it (weights stay "
                              "the softmax over all experts) while DeepSeek's own code renormalises them, so the "
                              "folder does not say which model it is")
    n_group, topk_group = config.get("n_group") or 1, config.get("topk_group") or 1
    grouped = method == "group_limited_greedy" and _groups_matter(n_group, topk_group)
    if grouped and topk // topk_group != 1:
        raise ConversionError(f"config.json: topk_method='group_limited_greedy' with num_experts_per_tok={topk}, "
                              f"topk_group={topk_group}: DeepseekV2 ranks a group by its best expert, megatron-core "
                              f"by the sum of its top num_experts_per_tok/topk_group={topk // topk_group}")
    if grouped and topk > topk_group * (num_experts // n_group):
        raise ConversionError(f"config.json: num_experts_per_tok={topk} is more than the {topk_group} kept groups "
                              f"of {num_experts // n_group} experts hold")
    return dict(router_score_function="softmax", router_pre_softmax=True, router_expert_bias=False,
                router_num_groups=n_group if grouped else None, router_group_topk=topk_group if grouped else None)


def model_config_from_hf(config: dict) -> ModelConfig:
    """Our ModelConfig from a DeepseekV3 or DeepseekV2 `config.json` (shape from the HF fields;
    the training settings HF has no place for from our `megatron_mm` entry when present). The
    MTP depth is the config's `num_nextn_predict_layers`; the converter corrects it to what
    the folder's weights hold (`mtp_layers_in`)."""
    family = family_of_hf(config)
    need = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "kv_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim")
    missing = [k for k in need if k not in config]
    if missing:
        raise ConversionError(f"config.json: missing {', '.join(missing)}")
    if (config.get("num_key_value_heads") or config["num_attention_heads"]) != config["num_attention_heads"]:
        raise ConversionError(f"config.json: num_key_value_heads={config['num_key_value_heads']} differs from "
                              f"num_attention_heads={config['num_attention_heads']}; MLA has one key/value per head")
    if config.get("attention_bias"):
        raise ConversionError("config.json: attention_bias=true: our MLA has no attention biases")
    if config.get("mlp_bias"):
        raise ConversionError("config.json: mlp_bias=true: our MLPs have no biases")
    if config.get("hidden_act", "silu") != "silu":
        raise ConversionError(f"config.json: hidden_act={config['hidden_act']!r}: our MLPs are SwiGLU (silu)")
    if family is DEEPSEEK_V3 and not config.get("rope_interleave", True):
        raise ConversionError("config.json: rope_interleave=false: megatron's MLA rotary takes interleaved pairs")
    if config.get("moe_layer_freq", 1) != 1:
        raise ConversionError(f"config.json: moe_layer_freq={config['moe_layer_freq']}: megatron_mm makes every layer "
                              "after first_k_dense_replace an MoE layer")
    ours = dict(config.get(OURS_KEY) or {})
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    layers = config["num_hidden_layers"]
    first_dense = config.get("first_k_dense_replace") or 0
    dense = first_dense >= layers or not config.get("n_routed_experts")
    topk = config.get("num_experts_per_tok") or 1
    shape = dict(
        num_layers=layers,
        hidden_size=config["hidden_size"],
        ffn_hidden_size=config["intermediate_size"],
        num_attention_heads=config["num_attention_heads"],
        q_lora_rank=config.get("q_lora_rank"),
        kv_lora_rank=config["kv_lora_rank"],
        qk_head_dim=config["qk_nope_head_dim"],
        qk_pos_emb_head_dim=config["qk_rope_head_dim"],
        v_head_dim=config["v_head_dim"],
        num_experts=None if dense else config.get("n_routed_experts"),
        moe_ffn_hidden_size=config.get("moe_intermediate_size", ours.get("moe_ffn_hidden_size", 1)),
        moe_router_topk=topk,
        num_shared_experts=config.get("n_shared_experts") or 0,
        first_k_dense_layers=min(first_dense, layers) if not dense else 0,
        router_topk_scaling_factor=(None if config.get("routed_scaling_factor", 1.0) == 1.0
                                    else float(config["routed_scaling_factor"])),
        mtp_num_layers=(config.get("num_nextn_predict_layers", config.get("num_mtp_layers", 0)) or 0
                        if family.mtp else 0),
        vocab_size=config["vocab_size"],
        rotary_base=float(rope.get("rope_theta", config.get("rope_theta", 10000.0))),
        norm_epsilon=config.get("rms_norm_eps", 1e-6),
        init_method_std=config.get("initializer_range", 0.02),
        share_embeddings_and_output_weights=bool(config.get("tie_word_embeddings", False)),
    )
    if not dense:
        shape.update(_v3_router_from_hf(config, topk) if family is DEEPSEEK_V3
                     else _v2_router_from_hf(config, topk, config["n_routed_experts"]))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type == "yarn":
        factor = float(rope["factor"])
        shape.update(rope_type="yarn", rotary_scaling_factor=factor,
                     original_max_position_embeddings=int(rope["original_max_position_embeddings"]),
                     beta_fast=float(rope.get("beta_fast") or 32), beta_slow=float(rope.get("beta_slow") or 1),
                     mscale=float(rope.get("mscale") or 1.0), mscale_all_dim=float(rope.get("mscale_all_dim") or 0.0))
        if rope.get("truncate") is False:
            raise ConversionError("config.json: rope_parameters.truncate=false: megatron rounds YaRN's correction "
                                  "range to integers")
        # transformers' cos/sin scale: attention_factor if given, else mscale/mscale_all_dim only when
        # both are set (otherwise the plain YaRN 0.1 ln(factor) + 1); megatron always uses the ratio.
        given = rope.get("attention_factor")
        mscale_set, all_dim = rope.get("mscale"), rope.get("mscale_all_dim")
        hf_factor = given if given is not None else (
            _yarn_mscale(factor, mscale_set) / _yarn_mscale(factor, all_dim) if mscale_set and all_dim
            else _yarn_mscale(factor, 1.0))
        for candidate in (shape["mscale"], 1.0):
            if abs(_yarn_mscale(factor, candidate) / _yarn_mscale(factor, shape["mscale_all_dim"]) - hf_factor) < 1e-6:
                shape["mscale"] = candidate
                break
        else:
            raise ConversionError(f"config.json: YaRN attention factor {hf_factor:.6f} cannot be expressed as "
                                  f"megatron's mscale/mscale_all_dim ratio (mscale_all_dim={shape['mscale_all_dim']})")
    elif rope_type != "default":
        raise ConversionError(f"config.json: rope_parameters.rope_type={rope_type!r}: only default and yarn are converted")
    # The releases' sequence-level balance loss (aux_loss_alpha with seq_aux) is a training
    # setting: a default under our own entry.
    training = {}
    if config.get("aux_loss_alpha") is not None and config.get("seq_aux", True) and not dense:
        training["aux_loss_coeff"] = float(config["aux_loss_alpha"])
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    merged = {**training, **{k: v for k, v in ours.items() if k in known}, **shape}
    merged.setdefault("seq_length", min(config.get("max_position_embeddings", 4096), 4096))
    merged.pop("vision", None), merged.pop("audio", None)
    try:
        return _build(ModelConfig, merged, "model")
    except ConfigError as err:
        raise ConversionError(f"config.json: {err}") from None


def mtp_layers_in(names: Iterable[str], num_layers: int) -> int:
    """How many MTP modules a folder's tensor names hold: the consecutive layers
    `model.layers.{num_layers}`, `{num_layers + 1}`, ... that have any tensor."""
    indices = {name.split(".")[2] for name in names if name.startswith("model.layers.")}
    depth = 0
    while str(num_layers + depth) in indices:
        depth += 1
    return depth


def compare_model_configs(a: ModelConfig, b: ModelConfig, what_a: str, what_b: str) -> None:
    """Raise ConversionError listing the fields that decide weights or outputs in which two
    model configs differ (training-only settings such as seq_length may differ)."""
    shape_fields = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "q_lora_rank",
                    "kv_lora_rank", "qk_head_dim", "qk_pos_emb_head_dim", "v_head_dim", "num_experts",
                    "moe_ffn_hidden_size", "moe_router_topk", "num_shared_experts", "first_k_dense_layers",
                    "mtp_num_layers", "vocab_size", "share_embeddings_and_output_weights", "rope_type",
                    "router_topk_scaling_factor", "router_num_groups", "router_group_topk",
                    "router_score_function", "router_pre_softmax", "router_expert_bias", "rotary_base",
                    "norm_epsilon")
    if a.rope_type == "yarn" or b.rope_type == "yarn":
        shape_fields += ("rotary_scaling_factor", "original_max_position_embeddings", "beta_fast", "beta_slow",
                         "mscale", "mscale_all_dim")
    diffs = [f"model.{f}: {getattr(a, f)!r} vs {getattr(b, f)!r}" for f in shape_fields
             if getattr(a, f) != getattr(b, f)]
    if diffs:
        raise ConversionError(f"{what_a} does not match {what_b}: " + "; ".join(diffs))


# --------------------------------------------------------------------------- names and shapes


@dataclasses.dataclass(frozen=True)
class Layer:
    """One decoder layer in both namings."""

    megatron: str  # prefix, e.g. "decoder.layers.3." or "mtp.layers.0.transformer_layer."
    hf: str  # prefix, e.g. "model.layers.3."
    moe: bool
    mtp: Optional[int] = None  # MTP depth index, or None for a main-model layer


def layers(m: ModelConfig) -> list[Layer]:
    out = []
    for i in range(m.num_layers):
        out.append(Layer(f"decoder.layers.{i}.", f"model.layers.{i}.", m.is_moe and i >= m.first_k_dense_layers))
    for k in range(m.mtp_num_layers):
        out.append(Layer(f"mtp.layers.{k}.transformer_layer.", f"model.layers.{m.num_layers + k}.", m.is_moe, k))
    return out


def _attention_shapes(m: ModelConfig) -> list[tuple[str, str, tuple]]:
    """(megatron suffix, HF suffix, shape) of the attention block and the two layer norms."""
    h, n = m.hidden_size, m.num_attention_heads
    q_head = m.qk_head_dim + m.qk_pos_emb_head_dim
    rows = [("input_layernorm.weight", "input_layernorm.weight", (h,))]
    if m.q_lora_rank is None:
        rows.append(("self_attention.linear_q_proj.weight", "self_attn.q_proj.weight", (n * q_head, h)))
    else:
        rows += [
            ("self_attention.linear_q_down_proj.weight", "self_attn.q_a_proj.weight", (m.q_lora_rank, h)),
            ("self_attention.q_layernorm.weight", "self_attn.q_a_layernorm.weight", (m.q_lora_rank,)),
            ("self_attention.linear_q_up_proj.weight", "self_attn.q_b_proj.weight", (n * q_head, m.q_lora_rank)),
        ]
    rows += [
        ("self_attention.linear_kv_down_proj.weight", "self_attn.kv_a_proj_with_mqa.weight",
         (m.kv_lora_rank + m.qk_pos_emb_head_dim, h)),
        ("self_attention.kv_layernorm.weight", "self_attn.kv_a_layernorm.weight", (m.kv_lora_rank,)),
        ("self_attention.linear_kv_up_proj.weight", "self_attn.kv_b_proj.weight",
         (n * (m.qk_head_dim + m.v_head_dim), m.kv_lora_rank)),
        ("self_attention.linear_proj.weight", "self_attn.o_proj.weight", (h, n * m.v_head_dim)),
        ("pre_mlp_layernorm.weight", "post_attention_layernorm.weight", (h,)),
    ]
    return rows


def megatron_layer_shapes(m: ModelConfig, layer: Layer) -> dict[str, tuple]:
    """Megatron key (without the layer prefix) -> global shape, for one layer."""
    h = m.hidden_size
    out = {mg: shape for mg, _, shape in _attention_shapes(m)}
    if not layer.moe:
        out["mlp.linear_fc1.weight"] = (2 * m.ffn_hidden_size, h)
        out["mlp.linear_fc2.weight"] = (h, m.ffn_hidden_size)
        return out
    e, f = m.num_experts, m.moe_ffn_hidden_size
    out["mlp.router.weight"] = (e, h)
    if m.router_expert_bias:
        out["mlp.router.expert_bias"] = (e,)
    out["mlp.experts.experts.linear_fc1.weight"] = (e, 2 * f, h)
    out["mlp.experts.experts.linear_fc2.weight"] = (e, h, f)
    if m.num_shared_experts:
        s = m.num_shared_experts * f
        out["mlp.shared_experts.linear_fc1.weight"] = (2 * s, h)
        out["mlp.shared_experts.linear_fc2.weight"] = (h, s)
    return out


def hf_layer_shapes(m: ModelConfig, layer: Layer) -> dict[str, tuple]:
    """HF key (without the layer prefix) -> shape, for one layer (MTP extras included)."""
    h = m.hidden_size
    out = {hf: shape for _, hf, shape in _attention_shapes(m)}
    if not layer.moe:
        f = m.ffn_hidden_size
        out.update({"mlp.gate_proj.weight": (f, h), "mlp.up_proj.weight": (f, h), "mlp.down_proj.weight": (h, f)})
    else:
        e, f = m.num_experts, m.moe_ffn_hidden_size
        out["mlp.gate.weight"] = (e, h)
        if family_of(m).router_bias:
            out["mlp.gate.e_score_correction_bias"] = (e,)
        for i in range(e):
            out.update({f"mlp.experts.{i}.gate_proj.weight": (f, h), f"mlp.experts.{i}.up_proj.weight": (f, h),
                        f"mlp.experts.{i}.down_proj.weight": (h, f)})
        if m.num_shared_experts:
            s = m.num_shared_experts * f
            out.update({"mlp.shared_experts.gate_proj.weight": (s, h), "mlp.shared_experts.up_proj.weight": (s, h),
                        "mlp.shared_experts.down_proj.weight": (h, s)})
    if layer.mtp is not None:
        out.update({"enorm.weight": (h,), "hnorm.weight": (h,), "eh_proj.weight": (h, 2 * h),
                    "shared_head.norm.weight": (h,), "embed_tokens.weight": (m.vocab_size, h),
                    "shared_head.head.weight": (m.vocab_size, h)})
    return out


def mtp_extra_megatron(layer: Layer) -> dict[str, str]:
    """Megatron keys of an MTP module outside its transformer layer -> HF suffix."""
    base = f"mtp.layers.{layer.mtp}."
    return {base + "enorm.weight": "enorm.weight", base + "hnorm.weight": "hnorm.weight",
            base + "eh_proj.weight": "eh_proj.weight", base + "final_layernorm.weight": "shared_head.norm.weight"}


def megatron_shapes(m: ModelConfig) -> dict[str, tuple]:
    """Every megatron language-model key -> global shape (what a checkpoint must hold)."""
    h = m.hidden_size
    out = {"embedding.word_embeddings.weight": (m.vocab_size, h), "decoder.final_layernorm.weight": (h,)}
    if not m.share_embeddings_and_output_weights:
        out["output_layer.weight"] = (m.vocab_size, h)
    for layer in layers(m):
        out.update({layer.megatron + k: s for k, s in megatron_layer_shapes(m, layer).items()})
        if layer.mtp is not None:
            shapes = {"enorm.weight": (h,), "hnorm.weight": (h,), "eh_proj.weight": (h, 2 * h),
                      "final_layernorm.weight": (h,)}
            out.update({f"mtp.layers.{layer.mtp}.{k}": s for k, s in shapes.items()})
    return out


def hf_shapes(m: ModelConfig) -> dict[str, tuple]:
    h = m.hidden_size
    out = {"model.embed_tokens.weight": (m.vocab_size, h), "model.norm.weight": (h,)}
    if not m.share_embeddings_and_output_weights:
        out["lm_head.weight"] = (m.vocab_size, h)
    for layer in layers(m):
        out.update({layer.hf + k: s for k, s in hf_layer_shapes(m, layer).items()})
    return out


# --------------------------------------------------------------------------- tensors, one layer at a time

Getter = Callable[..., torch.Tensor]  # get(key, index=None) -> tensor (index: one expert)


def layer_to_hf(m: ModelConfig, layer: Layer, get: Getter) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, tensor) for one layer, reading megatron tensors through `get`; experts one by one."""
    p, q = layer.megatron, layer.hf
    for mg, hf, _ in _attention_shapes(m):
        yield q + hf, get(p + mg)
    if not layer.moe:
        gate, up = get(p + "mlp.linear_fc1.weight").chunk(2, dim=0)
        yield q + "mlp.gate_proj.weight", gate
        yield q + "mlp.up_proj.weight", up
        yield q + "mlp.down_proj.weight", get(p + "mlp.linear_fc2.weight")
    else:
        yield q + "mlp.gate.weight", get(p + "mlp.router.weight")
        if family_of(m).router_bias:
            bias = (get(p + "mlp.router.expert_bias") if m.router_expert_bias
                    else torch.zeros(m.num_experts, dtype=torch.float32))
            yield q + "mlp.gate.e_score_correction_bias", bias
        for e in range(m.num_experts):
            gate, up = get(p + "mlp.experts.experts.linear_fc1.weight", e).chunk(2, dim=0)
            yield q + f"mlp.experts.{e}.gate_proj.weight", gate
            yield q + f"mlp.experts.{e}.up_proj.weight", up
            yield q + f"mlp.experts.{e}.down_proj.weight", get(p + "mlp.experts.experts.linear_fc2.weight", e)
        if m.num_shared_experts:
            gate, up = get(p + "mlp.shared_experts.linear_fc1.weight").chunk(2, dim=0)
            yield q + "mlp.shared_experts.gate_proj.weight", gate
            yield q + "mlp.shared_experts.up_proj.weight", up
            yield q + "mlp.shared_experts.down_proj.weight", get(p + "mlp.shared_experts.linear_fc2.weight")
    if layer.mtp is not None:
        for mg, hf in mtp_extra_megatron(layer).items():
            yield q + hf, get(mg)


def layer_from_hf(m: ModelConfig, layer: Layer, get: Getter) -> Iterator[tuple[str, Optional[int], torch.Tensor]]:
    """(megatron key, expert index or None, tensor) for one layer, reading HF tensors through
    `get(hf_name)`. Megatron keys a layer's experts as one `[E, ...]` tensor; each expert
    comes separately (index e: row e of it), so a layer's experts are never stacked in memory."""
    p, q = layer.megatron, layer.hf
    for mg, hf, _ in _attention_shapes(m):
        yield p + mg, None, get(q + hf)
    if not layer.moe:
        yield p + "mlp.linear_fc1.weight", None, torch.cat([get(q + "mlp.gate_proj.weight"),
                                                             get(q + "mlp.up_proj.weight")])
        yield p + "mlp.linear_fc2.weight", None, get(q + "mlp.down_proj.weight")
    else:
        yield p + "mlp.router.weight", None, get(q + "mlp.gate.weight")
        if family_of(m).router_bias:
            bias = get(q + "mlp.gate.e_score_correction_bias")
            if m.router_expert_bias:
                yield p + "mlp.router.expert_bias", None, bias.float()
            elif bool(bias.abs().max() > 0):
                raise ConversionError(f"{q}mlp.gate.e_score_correction_bias is non-zero but "
                                      "model.router_expert_bias=false: the megatron model would route differently")
        for i in range(m.num_experts):
            yield p + "mlp.experts.experts.linear_fc1.weight", i, torch.cat(
                [get(q + f"mlp.experts.{i}.gate_proj.weight"), get(q + f"mlp.experts.{i}.up_proj.weight")])
            yield p + "mlp.experts.experts.linear_fc2.weight", i, get(q + f"mlp.experts.{i}.down_proj.weight")
        if m.num_shared_experts:
            yield p + "mlp.shared_experts.linear_fc1.weight", None, torch.cat(
                [get(q + "mlp.shared_experts.gate_proj.weight"), get(q + "mlp.shared_experts.up_proj.weight")])
            yield p + "mlp.shared_experts.linear_fc2.weight", None, get(q + "mlp.shared_experts.down_proj.weight")
    if layer.mtp is not None:
        for mg, hf in mtp_extra_megatron(layer).items():
            yield mg, None, get(q + hf)


# --------------------------------------------------------------------------- how megatron shards a key


def encoder_stacked(key: str) -> bool:
    """An encoder block's layers are one `[L, ...]` tensor in the dist checkpoint
    (`vision.tower.decoder.layers.<name>`, `audio.decoder.layers.<name>`)."""
    return key.startswith(("vision.", "audio.")) and ".decoder.layers." in key


def tensor_parallel_dim(key: str) -> Optional[int]:
    """The dimension tensor parallelism splits `key` along (None: replicated). A GLU fc1 weight
    ([gate; up]) splits each half along dim 0 (`glu_weight`); a stacked encoder layer's
    dimension is one further (its dim 0 is the layer)."""
    if key.startswith(("embedding.", "output_layer.")):
        return 0
    module, _, leaf = key.rpartition(".")
    name = module.rpartition(".")[2]
    dim = None
    if name in ("linear_proj", "linear_fc2"):
        dim = 1 if leaf == "weight" else None
    elif name in ("linear_q_proj", "linear_q_down_proj", "linear_q_up_proj", "linear_kv_down_proj",
                  "linear_kv_up_proj", "linear_fc1", "eh_proj", "linear_qkv", "linear_q", "linear_kv"):
        dim = 0
    return dim + 1 if dim is not None and encoder_stacked(key) else dim


def glu_weight(key: str) -> bool:
    """Decoder fc1 weights are [gate; up] (our decoder MLPs are SwiGLU; encoder MLPs are not)."""
    return key.endswith("mlp.linear_fc1.weight") and not key.startswith(("vision.", "audio."))


def extra_state_keys(key: str, shape: tuple) -> list[str]:
    """The `_extra_state` ShardedObject keys megatron-core saves beside a linear layer's weight
    (`[None]` for megatron's own linears, FP8 metadata for Transformer Engine's): one per
    expert of a `[E, ...]` expert weight, one per layer of an encoder's stacked `[L, ...]`
    layers, else one."""
    module, _, leaf = key.rpartition(".")
    name = module.rpartition(".")[2]
    if leaf != "weight" or not (name.startswith("linear_") or name == "eh_proj"):
        return []
    stacked = ".experts.experts." in key or encoder_stacked(key)
    n = shape[0] if stacked else 1
    return [f"{module}._extra_state/shard_{i}_{n}" for i in range(n)]
