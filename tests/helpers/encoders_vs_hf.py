"""Our SigLIP, CLIP and Whisper encoders against transformers' on the same inputs (fp32, CPU).

`tiny_hf(kind, folder)` saves a tiny random transformers encoder; `features_vs_hf()` builds ours
under the current tensor-parallel state, loads the HF weights through conversion/encoder_mapping
(each rank its slice), runs both and returns the relative max difference of each. Run by
torchrun (`python -m torch.distributed.run --nproc_per_node=2 tests/helpers/encoders_vs_hf.py OUT`)
it compares under TP1 and then TP = the world size, and rank 0 writes {"tp1": {case: diff},
"tp2": ..., "control": diff} as JSON to OUT. (One process group for both: compat.apply changes
the process for good, so it does not run inside pytest's.) `control` is the difference between
two different layers' outputs, which the comparison must be able to tell apart.
"""

from __future__ import annotations

import json
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

SHAPE = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4)
# (which encoder, our config's choices, what of the HF output to compare against)
CASES = {
    "siglip": ({"feature_layer": -1, "post_layernorm": True}, "last_hidden_state"),
    "siglip_penultimate": ({"feature_layer": -2}, "hidden_states[-2]"),
    "clip": ({"feature_layer": -2, "keep_class_token": False}, "hidden_states[-2][:, 1:]"),
    "clip_class_token": ({"feature_layer": -1, "keep_class_token": True}, "hidden_states[-1]"),
    "whisper": ({}, "last_hidden_state"),
}


def tiny_hf(kind: str, folder: str, seed: int = 0, **overrides) -> None:
    """A tiny random transformers encoder folder: siglip (vision-only, with its pooling head),
    siglip_dual / clip_dual (SiglipModel / CLIPModel), clip, whisper (a full WhisperModel).
    Weights (LayerNorms and biases included) drawn large enough that every part matters."""
    import transformers as T

    torch.manual_seed(seed)
    vision = dict(SHAPE, image_size=16, patch_size=4, **overrides)
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, vocab_size=64)
    if kind == "siglip":
        model = T.SiglipVisionModel(T.SiglipVisionConfig(**vision))
    elif kind == "clip":
        model = T.CLIPVisionModel(T.CLIPVisionConfig(**vision))
    elif kind == "siglip_dual":
        model = T.SiglipModel(T.SiglipConfig(vision_config=vision, text_config=text))
    elif kind == "clip_dual":
        model = T.CLIPModel(T.CLIPConfig(vision_config=vision, text_config=text, projection_dim=16))
    elif kind == "whisper":
        config = T.WhisperConfig(d_model=32, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=64,
                                 decoder_layers=1, decoder_attention_heads=4, decoder_ffn_dim=64, num_mel_bins=16,
                                 max_source_positions=12, max_target_positions=16, vocab_size=64, pad_token_id=0,
                                 bos_token_id=1, eos_token_id=2, decoder_start_token_id=1, **overrides)
        model = T.WhisperModel(config)
    else:
        raise ValueError(kind)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("embed_positions.weight"):
                continue  # Whisper's fixed sinusoids
            if name.endswith("bias") or "norm" in name:
                param.add_(torch.randn_like(param) * 0.1)
            else:
                param.normal_(0.0, 0.1 if param.dim() > 1 else 0.3)
    model.save_pretrained(folder)


def hf_reference(kind: str, folder: str, inputs: torch.Tensor, target: str) -> torch.Tensor:
    import transformers as T

    if kind == "whisper":
        model = T.WhisperModel.from_pretrained(folder).encoder
    else:
        model = {"siglip": T.SiglipVisionModel, "clip": T.CLIPVisionModel}[kind].from_pretrained(folder)
    with torch.no_grad():
        out = model.eval()(inputs, output_hidden_states=True)
    names = {"hidden_states": out.hidden_states, "last_hidden_state": out.last_hidden_state}
    return eval(target, {}, names)  # one of CASES' expressions


def load_hf_weights(module: torch.nn.Module, full: dict[str, torch.Tensor], prefix: str) -> None:
    """Copy megatron-named full tensors into `module`, each rank its tensor-parallel slice
    (the dimension where the local shape is smaller)."""
    from megatron.core import parallel_state as ps

    rank, tp = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()
    state = module.state_dict()
    loaded = set()
    with torch.no_grad():
        for name, param in state.items():
            if name.endswith("_extra_state") or (prefix + name) not in full:
                continue
            tensor = full[prefix + name]
            for dim, (mine, whole) in enumerate(zip(param.shape, tensor.shape)):
                if mine != whole:
                    assert whole == mine * tp, (name, param.shape, tensor.shape)
                    tensor = tensor.narrow(dim, rank * mine, mine)
            param.copy_(tensor)
            loaded.add(prefix + name)
    missing = sorted(set(full) - loaded)
    assert not missing, missing


def features_vs_hf(tmp: str) -> dict[str, float]:
    """Relative max difference of each case of CASES under the current TP state."""
    from megatron.core import parallel_state as ps
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_mm.conversion import encoder_mapping as em
    from megatron_mm.conversion.safetensors_io import HFFolderReader
    from megatron_mm.models.encoders import AudioEncoder, VisionEncoder
    from megatron_mm.models.specs import PortableSpecs

    tp = ps.get_tensor_model_parallel_world_size()
    llm = TransformerConfig(num_layers=1, hidden_size=32, num_attention_heads=4, tensor_model_parallel_size=tp,
                            use_cpu_initialization=True, gradient_accumulation_fusion=False,
                            masked_softmax_fusion=False, bias_activation_fusion=False, bias_dropout_fusion=False,
                            persist_layer_norm=False)
    g = torch.Generator().manual_seed(1)
    diffs = {}
    for case, (choices, target) in CASES.items():
        kind = case.split("_")[0]
        folder = os.path.join(tmp, kind)
        if torch.distributed.get_rank() == 0 and not os.path.exists(folder):
            tiny_hf(kind, folder)
        torch.distributed.barrier()
        part = "audio" if kind == "whisper" else "vision"
        if part == "vision":
            cfg = em.vision_config_from_hf(folder, None)
            import dataclasses

            cfg = dataclasses.replace(cfg, **choices)
            ours = VisionEncoder(cfg, llm, PortableSpecs()).eval()
            inputs = torch.randn(2, 3, cfg.image_size, cfg.image_size, generator=g)
            run = ours.tower
        else:
            cfg = em.audio_config_from_hf(folder, None)
            ours = AudioEncoder(cfg, llm, PortableSpecs()).eval()
            inputs = torch.randn(2, cfg.num_mel_bins, cfg.max_frames, generator=g)
            run = ours.features
        source = em.EncoderFolder(folder, part, cfg, HFFolderReader(folder))
        full = dict(em.megatron_tensors(part, cfg, source))
        load_hf_weights(ours, full, part + ".")
        with torch.no_grad():
            got = run(inputs).transpose(0, 1)  # [n, t, h]
        want = hf_reference(kind, folder, inputs, target)
        assert got.shape == want.shape, (case, got.shape, want.shape)
        diffs[case] = float((got - want).abs().max() / want.abs().max())
        if case == "siglip_penultimate":
            last = hf_reference(kind, folder, inputs, "hidden_states[-1]")
            diffs["control"] = float((got - last).abs().max() / last.abs().max())
    return diffs


def main() -> None:
    from megatron.core import parallel_state

    from megatron_mm.config import ParallelConfig
    from megatron_mm.runtime import compat
    from megatron_mm.runtime import distributed as runtime

    compat.before_megatron_import()
    env = runtime.dist_env()
    hardware = runtime.detect_hardware()
    runtime.init_distributed(env, hardware)
    compat.apply(hardware)
    out = sys.argv[1]
    results = {}
    for tp in sorted({1, env.world_size}):
        runtime.init_model_parallel(ParallelConfig(tp=tp))
        compat.seed_everything(0)
        diffs = features_vs_hf(os.path.dirname(out))
        results["control"] = diffs.pop("control")
        results[f"tp{tp}"] = diffs
        parallel_state.destroy_model_parallel()
    if env.rank == 0:
        with open(out, "w") as f:
            json.dump(results, f)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
