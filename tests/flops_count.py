"""FLOPs that `torch.utils.flop_counter.FlopCounterMode` counts on the real model. Run as a
script (`python flops_count.py`), in one process, it builds each scenario's model as
training does (runtime, compat, transformer_config, build_model), runs one forward pass and
then one forward + backward pass on a fixed batch, and prints JSON {scenario: {"batch":
{tokens, images, clips}, "forward": {module: FLOPs}, "training": {module: FLOPs}}} for the
modules in PARTS ("Global": everything counted).

torch's fused CPU attention kernel (`_scaled_dot_product_flash_attention_for_cpu`, what SDPA
runs when query, key and value share a head size: the encoders) is missing from the
counter's formula table and would count 0. It is priced here as the counter prices SDPA's
math path (what MLA's SDPA runs, its query and value head sizes differing): the two forward
GEMMs (scores, values) and, in backward, the four gradient GEMMs; not the recomputation of
the scores a flash-style backward also does (torch's `sdpa_backward_flop_count` adds it),
which costs/flops.py does not count either. Both paths compute the whole score matrix:
causal attention is counted at every key.
The multimodal scenarios run the decoder's attention over the dense mask
(`model.document_attention=dense_mask`): the counter cannot run torch 2.13's eager
FlexAttention op (the fused path's CPU kernel raises "no implementation found for
'torch.ops.higher_order.flex_attention'" under FlopCounterMode), and costs/flops.py prices
either path as that whole score matrix.

The grouped expert GEMM (`aten._grouped_mm`, models/grouped_gemm.py; `model.moe_grouped_gemm`)
is missing from the table too: priced as the per-expert matmuls it replaces.
"""

import json
import math
import os
import re
import sys
import warnings

warnings.filterwarnings("ignore")
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

TEXT = os.path.join(ROOT, "configs", "quickstart_text.yaml")
MULTIMODAL = os.path.join(ROOT, "configs", "quickstart.yaml")
DENSE = "model.document_attention=dense_mask"  # see the docstring

# name: (config, overrides). Text: the tiny MoE + MLA model with one MTP layer; multimodal:
# the tiny model with its ViT and audio encoder, with what each freezing rule prices.
SCENARIOS = {
    "text": (TEXT, ["model.mtp_num_layers=1"]),
    "text_recompute": (TEXT, ["model.mtp_num_layers=1", "parallel.recompute=full"]),
    "multimodal": (MULTIMODAL, [DENSE]),
    "frozen_vision_and_projectors": (MULTIMODAL, [DENSE, "train.freeze.vision_encoder=true",
                                                  "train.freeze.projectors=true"]),
    "frozen_audio_encoder": (MULTIMODAL, [DENSE, "train.freeze.audio_encoder=true"]),
    "frozen_lm_recompute": (MULTIMODAL, [DENSE, "train.freeze.language_model=true", "parallel.recompute=full"]),
    "resampler": (MULTIMODAL, [DENSE, "model.vision.projector=resampler"]),
    "resampler_frozen": (MULTIMODAL, [DENSE, "model.vision.projector=resampler", "train.freeze.projectors=true"]),
}
BATCH, IMAGES, CLIPS = 2, 2, 1  # sequences; images and clips over the batch (multimodal)
PLACEHOLDERS = {"image": 510, "audio": 511}  # token ids the encoders' outputs replace

# Modules whose FLOPs are reported (names under the DDP wrapper's `module.`), as regexes.
PARTS = [
    r"decoder\.layers\.\d+\.(self_attention|mlp)",
    r"mtp\.layers\.\d+\.eh_proj", r"mtp\.layers\.\d+\.transformer_layer\.(self_attention|mlp)",
    r"output_layer",
    r"vision\.(tower|resampler|projector)",
    r"audio\.(conv1|conv2|decoder|projector)",
]


def _attention_formulas():
    import torch
    from torch.utils.flop_counter import sdpa_flop_count

    def forward(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
        return sdpa_flop_count(query_shape, key_shape, value_shape)  # Q·Kᵀ, P·V

    def backward(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
        return 2 * sdpa_flop_count(query_shape, key_shape, value_shape)  # dO·Vᵀ, Pᵀ·dO, dS·K, dSᵀ·Q

    def grouped_mm(a_shape, b_shape, *args, out_shape=None, **kwargs):
        # 2-D x 3-D (rows, k) x (groups, k, n) -> (rows, n): 2·rows·n·k. 2-D x 2-D (the weight
        # gradient) (p, rows) x (rows, q) -> (groups, p, q): each row in one group, 2·p·q·rows.
        groups = out_shape[0] if len(out_shape) == 3 else 1
        return 2 * math.prod(out_shape) // groups * a_shape[-1]

    aten = torch.ops.aten
    return {aten._scaled_dot_product_flash_attention_for_cpu: forward,
            aten._scaled_dot_product_flash_attention_for_cpu_backward: backward,
            aten._grouped_mm: grouped_mm}


def _batch(cfg):
    import torch

    m = cfg.model
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 500, (BATCH, m.seq_length), generator=generator)
    media = {}
    if m.vision is not None:  # one image in each sequence
        for b in range(IMAGES):
            ids[b, 1:1 + m.vision.num_tokens] = PLACEHOLDERS["image"]
        media["images"] = torch.randn(IMAGES, 3, m.vision.image_size, m.vision.image_size, generator=generator)
    if m.audio is not None:  # one clip, in the first sequence
        ids[0, 40:40 + m.audio.num_tokens] = PLACEHOLDERS["audio"]
        media["mels"] = torch.randn(CLIPS, m.audio.num_mel_bins, m.audio.max_frames, generator=generator)
    positions = torch.arange(m.seq_length).expand(BATCH, -1)
    return ids, positions, media


def _by_part(counter) -> dict:
    out = {}
    for name, ops in counter.get_flop_counts().items():
        short = name.removeprefix("DistributedDataParallel.module.")
        if short == "Global" or any(re.fullmatch(p, short) for p in PARTS):
            out[short] = sum(ops.values())
    return out


def count(name: str) -> dict:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from megatron_mm.config import load_config
    from megatron_mm.models.attention_mask import document_attention_mode, one_sample_rows_mask
    from megatron_mm.models.gpt import transformer_config
    from megatron_mm.runtime import compat
    from megatron_mm.runtime import distributed as runtime
    from megatron_mm.training.loop import build_model, uses_transformer_engine

    path, overrides = SCENARIOS[name]
    cfg = load_config(path, overrides)
    hardware = runtime.detect_hardware()
    if not torch.distributed.is_initialized():
        runtime.init_distributed(runtime.dist_env(), hardware)
        runtime.init_model_parallel(cfg.parallel)
        compat.apply(hardware)
    compat.seed_everything(cfg.train.seed)
    tc = transformer_config(cfg, compat.transformer_config_overrides(hardware))
    model = build_model(cfg, tc, hardware, PLACEHOLDERS)[0]
    ids, positions, media = _batch(cfg)
    mask = one_sample_rows_mask(document_attention_mode(cfg, uses_transformer_engine(hardware)), ids)
    result = {"batch": {"tokens": ids.numel(), "images": IMAGES if "images" in media else 0,
                        "clips": CLIPS if "mels" in media else 0}}
    with FlopCounterMode(display=False, custom_mapping=_attention_formulas()) as counter:
        model(ids, positions, mask, labels=ids, **media)
    result["forward"] = _by_part(counter)
    with FlopCounterMode(display=False, custom_mapping=_attention_formulas()) as counter:
        model(ids, positions, mask, labels=ids, **media).sum().backward()
    result["training"] = _by_part(counter)
    return result


if __name__ == "__main__":
    from megatron_mm.runtime import distributed as runtime

    try:
        print(json.dumps({name: count(name) for name in SCENARIOS}))
    finally:
        runtime.shutdown()
