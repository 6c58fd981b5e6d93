"""megatron-core dist checkpoint (any TP/PP/EP/VPP layout) → Hugging Face folder.

The language model becomes a `DeepseekV3ForCausalLM` checkpoint, or `DeepseekV2ForCausalLM` for a
softmax router (safetensors shards + index, `config.json`; `mapping.family_of`); the vision tower
becomes a `SiglipVisionModel` / `CLIPVisionModel` folder `vision_encoder/` and the audio encoder a
`WhisperEncoder` folder `audio_encoder/` (encoder_mapping.py); the projectors (and resampler),
which have no transformers counterpart, go to `encoders.safetensors` under their megatron names; `megatron_mm.json`
holds our whole model config and the placeholder token ids; the tokenizer is copied as
`tokenizer.model` with a `tokenizer_config.json` that `AutoTokenizer` reads.

Streaming: the plan (every output tensor's name, shape, dtype and shard) is made from the
checkpoint's metadata alone; then tensors are read one at a time (experts one expert at a
time) and written straight into their shard, so memory holds about one tensor, never a
layer's worth of shards.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Optional

import torch

from megatron_mm.config import Config, ConfigError, _build, to_dict
from megatron_mm.conversion import encoder_mapping, fp8, mapping
from megatron_mm.conversion.dcp import ConversionError, DistCheckpointReader
from megatron_mm.conversion.progress import Progress
from megatron_mm.conversion.safetensors_io import ShardWriter, nbytes, write_index

ENCODERS_FILE = "encoders.safetensors"
OURS_FILE = "megatron_mm.json"
DEFAULT_SHARD_BYTES = 5 * 2**30


def config_of_checkpoint(reader: DistCheckpointReader) -> Config:
    stored = reader.common.get("config")
    if not isinstance(stored, dict):
        raise ConversionError(f"checkpoint {reader.folder}: common.pt holds no config; pass --config")
    try:
        return _build(Config, stored)
    except ConfigError as err:
        raise ConversionError(f"checkpoint {reader.folder}: stored config unreadable: {err}") from None


def find_tokenizer(cfg: Config) -> Optional[str]:
    """The sentencepiece model the run trained with, if it is on this machine."""
    d = cfg.data
    if d.source in ("indexed", "shards"):
        return d.tokenizer
    if d.source == "corpus":
        from megatron_mm.data import _corpus_dir

        return os.path.join(_corpus_dir(cfg), "tokenizer.model")
    if d.source == "demo":
        from megatron_mm.data.multimodal.prepare import demo_dir

        return os.path.join(demo_dir(cfg), "tokenizer.model")
    return None


def check_against_config(m, saved: dict, folder: str) -> None:
    """Unknown keys, missing keys and shape mismatches between a checkpoint and a model config,
    each as one clear line."""
    expected = mapping.megatron_shapes(m)
    encoders = tuple(p for p, enc in (("vision.", m.vision), ("audio.", m.audio)) if enc is not None)
    unknown = sorted(k for k in saved if k not in expected and not k.startswith(encoders))
    if unknown:
        raise ConversionError(f"checkpoint {folder}: unknown key {unknown[0]} (and {len(unknown) - 1} more) that no "
                              f"mapping to {mapping.family_of(m).architecture} covers; does model config match (e.g. model.q_lora_rank, "
                              f"model.num_experts, model.mtp_num_layers)?")
    missing = sorted(k for k in expected if k not in saved)
    if missing:
        raise ConversionError(f"checkpoint {folder}: config does not match the checkpoint: it lacks {missing[0]} "
                              f"(and {len(missing) - 1} more) that the model config needs")
    for key, shape in expected.items():
        if tuple(saved[key][0]) != tuple(shape):
            raise ConversionError(f"checkpoint {folder}: config does not match the checkpoint: {key} is "
                                  f"{tuple(saved[key][0])} in the checkpoint, the model config gives {tuple(shape)}")


def _plan_dtype(name: str, source: torch.dtype, dtype: Optional[torch.dtype]) -> torch.dtype:
    if name.endswith("e_score_correction_bias"):
        return torch.float32  # HF keeps the bias (and the router) in fp32
    if name.endswith("mlp.gate.weight"):
        return source if dtype is None else (torch.float32 if source == torch.float32 else dtype)
    return source if dtype is None else dtype


def _language_model_items(m, read):
    """(HF name, tensor) of the whole language model in file order; `read(key, index)` reads
    megatron tensors. Groups: embedding, each layer, final norm and head."""
    yield "model.embed_tokens.weight", read("embedding.word_embeddings.weight")
    for layer in mapping.layers(m):
        items = mapping.layer_to_hf(m, layer, read)
        yield from items
        if layer.mtp is not None:  # the HF format keeps the MTP module's copies of embedding and head
            yield layer.hf + "embed_tokens.weight", read("embedding.word_embeddings.weight")
            head = "embedding.word_embeddings.weight" if m.share_embeddings_and_output_weights else "output_layer.weight"
            yield layer.hf + "shared_head.head.weight", read(head)
    yield "model.norm.weight", read("decoder.final_layernorm.weight")
    if not m.share_embeddings_and_output_weights:
        yield "lm_head.weight", read("output_layer.weight")


def write_tokenizer(path: str, out: str, m, max_positions: int) -> dict:
    """Copy a sentencepiece model and describe it for `AutoTokenizer`; return special ids."""
    import sentencepiece as spm

    if not os.path.exists(path):
        raise ConversionError(f"tokenizer {path}: not found (pass --tokenizer PATH, or --tokenizer none)")
    sp = spm.SentencePieceProcessor(model_file=path)
    if sp.get_piece_size() > m.vocab_size:
        raise ConversionError(f"tokenizer {path}: {sp.get_piece_size()} pieces > model.vocab_size={m.vocab_size}")
    shutil.copyfile(path, os.path.join(out, "tokenizer.model"))
    piece = lambda i: sp.id_to_piece(i) if i >= 0 else None  # noqa: E731
    special = {"bos_token": piece(sp.bos_id()), "eos_token": piece(sp.eos_id()), "unk_token": piece(sp.unk_id()),
               "pad_token": piece(sp.pad_id())}
    config = {
        # transformers turns tokenizer.model into its fast tokenizer on load (Llama's sentencepiece
        # conventions); our data pipeline adds no BOS/EOS while encoding, so neither does this.
        "tokenizer_class": "LlamaTokenizer", "add_bos_token": False, "add_eos_token": False, "legacy": False,
        "model_max_length": max_positions, **{k: v for k, v in special.items() if v is not None},
    }
    with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    ids = {"bos": sp.bos_id(), "eos": sp.eos_id()}
    for kind, token in (("image", "<image>"), ("audio", "<audio>")):
        token_id = sp.piece_to_id(token)
        if token_id != sp.unk_id():
            ids[kind] = token_id
    return ids


def convert_to_hf(checkpoint: str, out: str, cfg: Optional[Config] = None, dtype: Optional[torch.dtype] = None,
                  tokenizer: Optional[str] = None, max_shard_bytes: int = DEFAULT_SHARD_BYTES,
                  progress: bool = True, fp8_blockwise: bool = False) -> dict:
    """Convert; returns a summary. `cfg` (default: the config stored in the checkpoint) gives
    the model shape; `tokenizer` a sentencepiece model path, "none", or None (find the run's);
    `fp8_blockwise` writes the weights DeepSeek-V3's release quantizes in its FP8 format (fp8.py)."""
    reader = DistCheckpointReader(checkpoint)
    stored = config_of_checkpoint(reader) if cfg is None or reader.common.get("config") else None
    if cfg is None:
        cfg = stored
    elif stored is not None:
        mapping.compare_model_configs(cfg.model, stored.model, "the given config", f"the config stored in {reader.folder}")
    m = cfg.model
    saved = reader.tensor_keys()
    check_against_config(m, saved, reader.folder)

    # Tokenizer first: it decides bos/eos ids of config.json and the placeholder ids.
    os.makedirs(out, exist_ok=True)
    token_path = find_tokenizer(cfg) if tokenizer is None else (None if tokenizer == "none" else tokenizer)
    if tokenizer is None and (token_path is None or not os.path.exists(token_path)):
        raise ConversionError(f"tokenizer: the run's tokenizer ({token_path or 'data.source=' + cfg.data.source}) is "
                              "not on this machine; pass --tokenizer PATH (a sentencepiece .model) or --tokenizer none")
    max_positions = mapping.hf_config(m, torch.float32)["max_position_embeddings"]  # (also: can the family express m?)
    ids = write_tokenizer(token_path, out, m, max_positions) if token_path else {}

    hf_cfg = mapping.hf_config(m, dtype or saved["embedding.word_embeddings.weight"][1], ids.get("bos"), ids.get("eos"))
    if fp8_blockwise:
        hf_cfg["quantization_config"] = dict(fp8.QUANTIZATION_CONFIG)

    # Plan from metadata alone: meta tensors stand in for the real ones.
    def meta_read(key, index=None):
        shape, source = saved[key]
        return torch.empty(shape[1:] if index is not None else shape, dtype=source, device="meta")

    plan = [(name, tuple(t.shape), _plan_dtype(name, t.dtype, dtype)) for name, t in _language_model_items(m, meta_read)]
    if fp8_blockwise:
        plan = fp8.plan_with_scales(plan)
    shards: list[list] = [[]]
    size = 0
    for entry in plan:
        entry_bytes = nbytes(entry[1], entry[2])
        if shards[-1] and size + entry_bytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += entry_bytes
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {entry[0]: names[i] for i, shard in enumerate(shards) for entry in shard}
    total = sum(nbytes(s, d) for _, s, d in plan)

    bar = Progress(total, "to HF", enabled=progress)
    items = _language_model_items(m, reader.read)
    if fp8_blockwise:
        items = fp8.quantize_items(items)
    for name, shard in zip(names, shards):
        writer = ShardWriter(os.path.join(out, name), shard)
        for planned in shard:
            key, tensor = next(items)
            writer.write(key, tensor)
            bar.update(nbytes(planned[1], planned[2]))
            del tensor
        writer.close()
    if next(items, None) is not None:
        raise ConversionError("internal: more tensors than planned")
    write_index(out, weight_map, total)

    encoder_keys = sorted(k for k in saved if k.startswith(("vision.", "audio.")))
    encoder_folders, hf_tensors = {}, 0
    for kind in ("vision", "audio"):
        enc = getattr(m, kind)
        if enc is None:
            continue
        needed = {encoder_mapping.layer_of(k)[0] for k in encoder_mapping.expected_megatron_shapes(kind, enc)}
        lacking = sorted(needed - set(saved))
        if lacking:
            raise ConversionError(f"checkpoint {reader.folder}: no {lacking[0]} (and {len(lacking) - 1} more) that the "
                                  f"model.{kind} ({enc.arch}) encoder needs")
        get = encoder_mapping.stacked_reader(reader.read)
        folder = encoder_mapping.FOLDERS[kind]
        written = encoder_mapping.write_hf_encoder(kind, enc, get, os.path.join(out, folder), dtype)
        encoder_folders[kind] = folder
        hf_tensors += len(encoder_mapping.hf_names(kind, enc))
        bar.update(sum(nbytes(saved[k][0], dtype or saved[k][1]) for k in written))
        encoder_keys = [k for k in encoder_keys if k not in written]
    if encoder_keys:  # projectors and resampler: no transformers counterpart
        enc_plan = [(k, saved[k][0], dtype or saved[k][1]) for k in encoder_keys]
        writer = ShardWriter(os.path.join(out, ENCODERS_FILE), enc_plan, metadata={"format": "megatron_mm"})
        for k in encoder_keys:
            writer.write(k, reader.read(k))
            bar.update(nbytes(saved[k][0], dtype or saved[k][1]))
        writer.close()
    bar.close()

    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(hf_cfg, f, indent=2)
    with open(os.path.join(out, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": ids.get("bos"), "eos_token_id": ids.get("eos"), "do_sample": False}, f, indent=2)
    placeholders = {k: ids[k] for k in ("image", "audio") if k in ids}
    if encoder_folders and token_path:  # (--tokenizer none: no placeholder ids to give)
        missing = [k for k, enc in (("image", m.vision), ("audio", m.audio)) if enc is not None and k not in ids]
        if missing:
            raise ConversionError(f"tokenizer {token_path}: no placeholder piece for {missing} (a multimodal "
                                  "model needs the tokenizer it trained with)")
    ours = {"format": 1, "model": to_dict(cfg)["model"], "placeholder_ids": placeholders,
            "encoders_file": ENCODERS_FILE if encoder_keys else None, "encoder_folders": encoder_folders,
            "source": {"checkpoint": reader.folder, "iteration": reader.common.get("iteration"),
                       "layout": reader.common.get("layout")}}
    with open(os.path.join(out, OURS_FILE), "w") as f:
        json.dump(ours, f, indent=2)
    return {"out": out, "tensors": len(plan) + len(encoder_keys) + hf_tensors, "bytes": total, "shards": len(names),
            "iteration": reader.common.get("iteration"), "layout": reader.common.get("layout")}
