"""Hugging Face DeepseekV3 folder → megatron-core dist checkpoint that `launch/pretrain.py`
resumes from under any layout (`checkpoint.load=OUT`).

The model shape comes from `config.json` (training settings HF has no place for from its
`megatron_mm` entry, when the folder was written by convert_to_hf; the encoders from
`megatron_mm.json` + `encoders.safetensors`). The checkpoint is written directly in megatron's
torch_dist format (no model is built): every tensor under its megatron key with its global
shape, split into the chunks the ranks of the requested layout (`--tp/--pp/--ep/--vpp`) would
have saved, one `.distcp` file per rank, plus the `_extra_state` objects megatron-core keeps
beside each linear layer, and `common.pt` with iteration, config and layout. Tensors stream:
one HF tensor read, its chunks written, dropped; experts one at a time. An FP8 block-scaled
folder (DeepSeek-V3's release format) is read through `fp8.DequantizingReader`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Optional

import torch

from megatron_mm.config import Config, ConfigError, Hardware, ParallelConfig, _build, to_dict, validate
from megatron_mm.conversion import fp8, mapping
from megatron_mm.conversion.dcp import ConversionError, DistCheckpointWriter
from megatron_mm.conversion.progress import Progress
from megatron_mm.conversion.safetensors_io import HFFolderReader, ShardReader, nbytes
from megatron_mm.conversion.to_hf import OURS_FILE
from megatron_mm.training.checkpoint_files import layout_of, new_iteration_folder, publish


def read_hf_config(folder: str) -> tuple[dict, dict]:
    path = os.path.join(folder, "config.json")
    if not os.path.exists(path):
        raise ConversionError(f"{folder}: no config.json")
    try:
        config = json.load(open(path))
    except json.JSONDecodeError as err:
        raise ConversionError(f"{path}: not valid JSON ({err})") from None
    ours_path = os.path.join(folder, OURS_FILE)
    ours = json.load(open(ours_path)) if os.path.exists(ours_path) else {}
    return config, ours


def model_config(folder: str):
    config, ours = read_hf_config(folder)
    m = mapping.model_config_from_hf(config)
    model = (ours.get("model") or {})
    for kind in ("vision", "audio"):
        if model.get(kind):
            from megatron_mm.config import AudioConfig, VisionConfig

            cls = VisionConfig if kind == "vision" else AudioConfig
            m = dataclasses.replace(m, **{kind: _build(cls, model[kind], f"model.{kind}")})
    return m, ours


class Layout:
    """Which file rank holds which chunk, for TP x EP ranks on PP (x VPP) stages."""

    def __init__(self, p: ParallelConfig, num_layers: int):
        self.p, self.num_layers = p, num_layers
        self.chunks = p.pp * (p.vpp or 1)

    def stage_of(self, key: str) -> int:
        if key.startswith(("embedding.", "vision.", "audio.")):
            return 0
        if key.startswith("decoder.layers."):
            layer = int(key.split(".")[2])
            return (layer // (self.num_layers // self.chunks)) % self.p.pp
        return self.p.pp - 1  # final norm, output layer, MTP

    def rank(self, stage: int, tp_rank: int, ep_rank: int) -> int:
        return (stage * self.p.ep + ep_rank) * self.p.tp + tp_rank

    def chunks_of(self, key: str, shape: tuple, expert: Optional[int], part: torch.Tensor):
        """(offsets, tensor, file rank) pieces of `part` (the whole tensor, or expert `expert`'s row)."""
        stage = self.stage_of(key)
        if expert is not None:
            ep_rank = expert // (shape[0] // self.p.ep)
            return [((expert,) + (0,) * (len(shape) - 1), part.unsqueeze(0), self.rank(stage, 0, ep_rank))]
        dim = mapping.tensor_parallel_dim(key)
        tp = self.p.tp
        if dim is None or tp == 1 or shape[dim] % (2 * tp if mapping.glu_weight(key) else tp):
            return [((0,) * len(shape), part, self.rank(stage, 0, 0))]
        halves = 2 if mapping.glu_weight(key) else 1
        step = shape[dim] // halves // tp
        out = []
        for half in range(halves):
            for r in range(tp):
                offsets = [0] * len(shape)
                offsets[dim] = half * (shape[dim] // halves) + r * step
                out.append((tuple(offsets), part.narrow(dim, offsets[dim], step), self.rank(stage, r, 0)))
        return out


def _check_layout(cfg: Config) -> int:
    """Validate model x layout with the training rules; return the layout's world size."""
    p = cfg.parallel
    world = math.lcm(p.tp * p.pp, p.ep * p.etp * p.pp)
    try:
        validate(cfg, world, Hardware(has_cuda=p.etp > 1))
    except ConfigError as err:
        relevant = [line for line in err.problems if line.startswith(("model.", "parallel."))]
        if relevant:
            raise ConversionError("; ".join(relevant)) from None
    return world


def check_hf_tensors(reader: HFFolderReader | fp8.DequantizingReader, m) -> None:
    expected = mapping.hf_shapes(m)
    optional = {layer.hf + k for layer in mapping.layers(m) if layer.mtp is not None
                for k in ("embed_tokens.weight", "shared_head.head.weight")}
    unknown = sorted(k for k in reader.keys() if k not in expected)
    if unknown:
        raise ConversionError(f"{reader.folder}: unknown key {unknown[0]} in {reader.file_of(unknown[0])} (and "
                              f"{len(unknown) - 1} more): not part of the DeepseekV3 model config.json describes")
    missing = sorted(k for k in expected if k not in reader.where and k not in optional)
    if missing:
        raise ConversionError(f"{reader.folder}: tensor {missing[0]} is missing (and {len(missing) - 1} more) "
                              "though config.json implies it")
    for key, shape in expected.items():
        if key in reader.where and tuple(reader.shape(key)) != tuple(shape):
            raise ConversionError(f"{reader.folder}: config does not match the checkpoint: {key} is "
                                  f"{tuple(reader.shape(key))} in {reader.file_of(key)}, config.json gives {tuple(shape)}")


def convert_from_hf(hf: str, out: str, parallel: Optional[ParallelConfig] = None, base: Optional[Config] = None,
                    dtype: Optional[torch.dtype] = None, iteration: int = 0, progress: bool = True) -> dict:
    """Write `out/iter_{iteration}` + the tracker; `base` supplies the non-model sections of the
    stored config (and, if given, must agree with config.json on the model shape)."""
    m, ours = model_config(hf)
    if base is not None:
        mapping.compare_model_configs(base.model, m, "the given --config", f"{hf}/config.json")
        m = dataclasses.replace(base.model, vision=m.vision, audio=m.audio) if (m.vision or m.audio) else base.model
    cfg = dataclasses.replace(base or Config(), model=m, parallel=parallel or ParallelConfig())
    if m.vision is not None or m.audio is not None:
        if cfg.data.source not in ("demo", "shards"):
            cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, source="demo"))
    world = _check_layout(cfg)
    reader = fp8.reader_for(HFFolderReader(hf), read_hf_config(hf)[0], dtype)  # FP8 weights read dequantized
    check_hf_tensors(reader, m)
    encoders = None
    if ours.get("encoders_file"):
        path = os.path.join(hf, ours["encoders_file"])
        if not os.path.exists(path):
            raise ConversionError(f"{hf}: {ours['encoders_file']} is missing ({OURS_FILE} names it)")
        encoders = ShardReader(path)
        wanted = tuple(p for p, enc in (("vision.", m.vision), ("audio.", m.audio)) if enc is not None)
        stray = sorted(k for k in encoders.keys() if not k.startswith(wanted))
        if stray:
            raise ConversionError(f"{path}: unknown key {stray[0]} (no encoder of that kind in {OURS_FILE})")

    layout = Layout(cfg.parallel, m.num_layers)
    unfinished = new_iteration_folder(out, iteration)
    writer = DistCheckpointWriter(unfinished)
    dtype_of = lambda t: t.dtype if dtype is None or not t.is_floating_point() else dtype  # noqa: E731
    shapes = mapping.megatron_shapes(m)
    total = sum(nbytes(reader.shape(k), torch.float32) for k in reader.keys())
    bar = Progress(total, "from HF", enabled=progress)
    counted: set = set()

    def get(name: str) -> torch.Tensor:
        tensor = reader.read(name)
        if name not in counted:
            counted.add(name)
            bar.update(nbytes(tensor.shape, torch.float32))
        return tensor

    def put(key: str, expert: Optional[int], tensor: torch.Tensor, shape=None) -> None:
        shape = tuple(shape or shapes[key])
        want = shape[1:] if expert is not None else shape
        if tuple(tensor.shape) != want:
            raise ConversionError(f"internal: {key} built as {tuple(tensor.shape)}, megatron needs {want}")
        target = torch.float32 if key.endswith("expert_bias") else dtype_of(tensor)
        for offsets, part, rank in layout.chunks_of(key, shape, expert, tensor):
            writer.add_chunk(key, shape, target, offsets, part, rank)
        if expert in (None, 0):
            for obj_key in mapping.extra_state_keys(key, shape):
                stage = layout.stage_of(key)
                writer.add_object(obj_key, None, layout.rank(stage, 0, 0))

    put("embedding.word_embeddings.weight", None, get("model.embed_tokens.weight"))
    for layer in mapping.layers(m):
        for key, expert, tensor in mapping.layer_from_hf(m, layer, get):
            put(key, expert, tensor)
        for extra in ("embed_tokens.weight", "shared_head.head.weight"):  # the MTP module's copies
            if layer.mtp is not None and layer.hf + extra in reader.where:
                counted.add(layer.hf + extra)
                bar.update(nbytes(reader.shape(layer.hf + extra), torch.float32))
    put("decoder.final_layernorm.weight", None, get("model.norm.weight"))
    if not m.share_embeddings_and_output_weights:
        put("output_layer.weight", None, get("lm_head.weight"))
    if encoders is not None:
        for key in encoders.keys():
            put(key, None, encoders.read(key), shape=encoders.shape(key))
    bar.close()

    common = {
        "iteration": iteration, "has_optimizer": False, "has_rng_state": False,
        "scheduler": {}, "config": to_dict(cfg), "data_state": {},
        "layout": layout_of(cfg, world),
        "converted_from": os.path.abspath(hf),
    }
    writer.finish(common)
    final = publish(out, unfinished, iteration)
    return {"out": final, "iteration": iteration, "tensors": len(writer.state_dict_metadata),
            "files": len(writer.files), "layout": common["layout"]}
