"""How many language-model layers each pipeline stage holds, and why.

megatron-core splits the decoder evenly over the pipeline stages unless
`num_layers_in_first_pipeline_stage` / `num_layers_in_last_pipeline_stage` are set; then
the other ("middle") stages share the rest evenly. Its rules (transformer_config.py
`__post_init__`, 0.16.1): each given value is at least 1 and, with VPP, a multiple of the
VPP size; the middle stages get a positive, equal number of layers (with VPP a multiple of
it); with no middle stage the given values add up to all layers. Our config keys
`parallel.first_stage_layers` / `parallel.last_stage_layers` are those two fields
(`validate` in config.py checks the same rules before any process group starts).

Which split (`plan`):
  * an explicit `parallel.first_stage_layers` wins, with `last_stage_layers` as given
    (null: the last stage is one of the evenly shared ones), as megatron-core reads them;
  * a multimodal model with pp > 1 and `first_stage_layers: null` is balanced ("auto"):
    the first stage also runs the encoders, so among all splits megatron-core accepts
    ([first, middle, ..., middle, last]; `last_stage_layers` fixed if given) the one with
    the smallest slowest-stage FLOPs is taken (then the smallest second-slowest, and so on;
    exact ties: the split closest to even);
  * otherwise (text-only, or pp = 1) the even split.

Stage cost (hand-written estimate, training FLOPs per sequence of `model.seq_length`
tokens, costs/flops.py): the stage's decoder layers (dense and MoE priced apart; 3 ×
forward, less for a frozen language model, one forward more with full recomputation); the
last stage adds the LM head and the MTP layers; the first adds the encoders and projectors.

ASSUMPTION for the encoders' share: a sequence is filled with samples that each carry one
image (if `model.vision` is set) and one audio clip (if `model.audio` is set) and no text,
so it holds `seq_length / (image tokens + audio tokens)` such samples (fractional: an
expected value). That is an upper bound on the media a packed sequence carries; real
data with captions carries less, so the estimate leans towards unloading stage 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from megatron_mm.config import Config
from megatron_mm.costs.flops import (
    encoder_training_flops,
    head_training_flops_per_token,
    layer_training_flops_per_token,
)


@dataclass(frozen=True)
class PipelineSplit:
    layers: list[int]  # decoder layers per pipeline stage (all virtual chunks of the stage)
    first: Optional[int]  # -> TransformerConfig.num_layers_in_first_pipeline_stage (None: even)
    last: Optional[int]  # -> TransformerConfig.num_layers_in_last_pipeline_stage
    source: str  # "even", "config" or "auto"
    stage_flops: list[float]  # training FLOPs per sequence, estimate, per stage
    encoder_flops: float  # the encoders' part of stage_flops[0]

    def describe(self) -> str:
        """The start-up line, e.g. `pipeline: layers per stage [1, 3] (auto: first stage also
        runs the encoders: 68.5 MFLOP/sequence est.; stage FLOPs est. [...])`."""
        stages = "[" + ", ".join(_flops(f) for f in self.stage_flops) + "]"
        why = {"even": "even split", "config": "parallel.first/last_stage_layers", "auto": "balanced (auto)"}
        encoders = (f"; first stage also runs the encoders: {_flops(self.encoder_flops)}/sequence est."
                    if self.encoder_flops else "")
        return f"pipeline: layers per stage {self.layers} ({why[self.source]}{encoders}; stage FLOPs est. {stages})"


def _flops(x: float) -> str:
    for unit, scale in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6), ("kFLOP", 1e3)):
        if x >= scale:
            return f"{x / scale:.1f} {unit}"
    return f"{x:.0f} FLOP"


def media_per_sequence(cfg: Config) -> float:
    """Samples (each one image and/or one clip, no text) a sequence holds: the ASSUMPTION above."""
    m = cfg.model
    tokens = sum(enc.num_tokens for enc in (m.vision, m.audio) if enc is not None)
    return m.seq_length / tokens if tokens else 0.0


def encoder_flops_per_sequence(cfg: Config) -> float:
    per_sample = sum(encoder_training_flops(cfg.model, cfg.train.freeze).values())
    return per_sample * media_per_sequence(cfg)


def candidate_splits(num_layers: int, pp: int, vpp: Optional[int], last: Optional[int] = None) -> list[list[int]]:
    """Every [first, middle × (pp-2), last] split megatron-core accepts (first, last and each
    middle stage at least one layer, multiples of `vpp`), with `last` fixed if given."""
    v = vpp or 1
    if pp < 2:
        return [[num_layers]]
    out = []
    for first in range(v, num_layers + 1, v):
        lasts = [last] if last is not None else range(v, num_layers - first + 1, v)
        for end in lasts:
            rest = num_layers - first - end
            if pp == 2:
                if rest == 0:
                    out.append([first, end])
            elif rest >= (pp - 2) * v and rest % ((pp - 2) * v) == 0:
                out.append([first] + [rest // (pp - 2)] * (pp - 2) + [end])
    return out


def stage_layer_indices(layers: list[int], vpp: Optional[int]) -> list[list[int]]:
    """Global decoder-layer indices each stage holds. With VPP, stage r's chunk c holds
    layers[r]/vpp consecutive layers at c·(L/vpp) + sum(layers[:r])/vpp (megatron-core's
    `get_transformer_layer_offset`); without, stage r holds a contiguous run."""
    v = vpp or 1
    per_chunk = [n // v for n in layers]
    chunk_total = sum(per_chunk)
    return [
        [c * chunk_total + sum(per_chunk[:r]) + i for c in range(v) for i in range(per_chunk[r])]
        for r in range(len(layers))
    ]


def stage_flops(cfg: Config, layers: list[int]) -> tuple[list[float], float]:
    """(training FLOPs per sequence for each stage, the encoders' part of stage 0)."""
    m = cfg.model
    recompute, frozen = cfg.parallel.recompute, cfg.train.freeze.language_model
    per_layer = layer_training_flops_per_token(m, recompute, frozen)
    vpp = cfg.parallel.vpp if cfg.parallel.pp > 1 else None
    costs = [m.seq_length * sum(per_layer[i] for i in idx) for idx in stage_layer_indices(layers, vpp)]
    costs[-1] += m.seq_length * head_training_flops_per_token(m, recompute, frozen)
    encoders = encoder_flops_per_sequence(cfg)
    costs[0] += encoders
    return costs, encoders


def balanced(cfg: Config, candidates: list[list[int]]) -> list[int]:
    """The candidate split whose slowest stage is fastest (then the next slowest, ...; then the
    one closest to even), by `stage_flops` under `cfg`'s parallel settings."""
    even = cfg.model.num_layers / len(candidates[0])

    def key(split):
        return sorted(stage_flops(cfg, split)[0], reverse=True), sum(abs(n - even) for n in split)

    return min(candidates, key=key)


def _megatron_reading(layers: list[int], num_layers: int, pp: int, first: Optional[int], last: Optional[int]):
    """`layers` as the two megatron-core fields: None/None for the even split."""
    if pp > 1 and num_layers % pp == 0 and all(n == num_layers // pp for n in layers):
        return None, None
    return first, last


def plan(cfg: Config) -> PipelineSplit:
    """The split for a config that passed `validate` (see the module docstring)."""
    m, p = cfg.model, cfg.parallel
    L, pp, vpp = m.num_layers, p.pp, (p.vpp if p.pp > 1 else None)
    multimodal = m.vision is not None or m.audio is not None
    if pp > 1 and p.first_stage_layers is None and multimodal:
        candidates = candidate_splits(L, pp, vpp, last=p.last_stage_layers)
        if not candidates:
            raise ValueError(f"no split of {L} layers over pp={pp} (vpp={vpp}); validate() should have said so")
        layers = balanced(cfg, candidates)
        first, last = _megatron_reading(layers, L, pp, layers[0], layers[-1])
        source = "auto"
    elif pp > 1 and (p.first_stage_layers is not None or p.last_stage_layers is not None):
        first, last = p.first_stage_layers, p.last_stage_layers
        middle = pp - (first is not None) - (last is not None)
        rest = L - (first or 0) - (last or 0)
        layers = [rest // middle if middle else 0] * pp
        if first is not None:
            layers[0] = first
        if last is not None:
            layers[-1] = last
        source = "config"
    else:
        layers, first, last, source = [L // pp] * pp, None, None, "even"
    costs, encoders = stage_flops(cfg, layers)
    return PipelineSplit(layers, first, last, source, costs, encoders)


def megatron_stage_layers(tc) -> list[int]:
    """Decoder layers per pipeline stage as megatron-core builds them from TransformerConfig
    `tc` (its own `get_num_layers_to_build`, summed over virtual stages): the check that
    `plan` is what runs."""
    from megatron.core.transformer.transformer_block import get_num_layers_to_build

    pp, vpp = tc.pipeline_model_parallel_size, tc.virtual_pipeline_model_parallel_size
    stages = [None] if vpp is None else range(vpp)
    return [sum(get_num_layers_to_build(tc, vp_stage=s, pp_rank=r) for s in stages) for r in range(pp)]
