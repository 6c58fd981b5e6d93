"""Hugging Face DeepseekV3 / DeepseekV2 folder → megatron-core dist checkpoint that
`launch/pretrain.py` resumes from under any layout (`checkpoint.load=OUT`).

The model shape comes from `config.json` (training settings HF has no place for from its
`megatron_mm` entry, when the folder was written by convert_to_hf; the encoders from
`megatron_mm.json` + `encoders.safetensors`), except the MTP depth, which is what the weights
hold (`resolve_mtp`): transformers writes no MTP tensors though its config says 1, and MTP
modules for training can be added freshly initialised. The checkpoint is written directly in megatron's
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
import sys
import zlib
from typing import Optional

import torch

from megatron_mm.config import Config, ConfigError, Hardware, ParallelConfig, _build, to_dict, validate
from megatron_mm.conversion import encoder_mapping, fp8, mapping
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


@dataclasses.dataclass(frozen=True)
class MtpPlan:
    """How many MTP modules the checkpoint gets and where they come from."""

    in_folder: int  # MTP layers the folder's weights hold
    layers: int  # MTP layers written: the folder's, or fresh ones when it has none
    fresh: bool  # initialised here (seeded), not read
    note: Optional[str]  # one line for the user, or None


def resolve_mtp(m, reader: HFFolderReader, requested: Optional[int]) -> MtpPlan:
    """The MTP depth is what the weights hold, whatever `num_nextn_predict_layers` says.
    `requested` (--mtp-layers): N fresh modules for a folder without MTP weights, its own
    depth to import them, or 0 to leave them out."""
    family = mapping.family_of(m)
    found = mapping.mtp_layers_in(reader.keys(), m.num_layers) if family.mtp else 0  # V2: stray layers are unknown keys
    declared = m.mtp_num_layers
    where = f"model.layers.{m.num_layers}.*"
    if requested is not None and requested < 0:
        raise ConversionError(f"--mtp-layers {requested}: must be >= 0")
    if requested is None:
        note = None
        if found == 0 and declared:
            note = (f"config.json declares num_nextn_predict_layers={declared} but the folder holds no MTP weights "
                    f"({where}): importing without MTP (--mtp-layers N adds N freshly initialised MTP modules)")
        elif found != declared:
            note = (f"config.json declares num_nextn_predict_layers={declared} but the weights hold {found} MTP "
                    f"layer(s): importing {found}")
        return MtpPlan(found, found, False, note)
    if found == 0:
        if requested and not family.mtp:
            raise ConversionError(f"--mtp-layers {requested}: {family.architecture} has no MTP layers (the "
                                  "checkpoint could not be converted back)")
        note = f"added {requested} freshly initialised MTP module(s)" if requested else None
        return MtpPlan(0, requested, requested > 0, note)
    if requested == 0:
        return MtpPlan(found, 0, False, f"left out the folder's {found} MTP layer(s) ({where})")
    if requested != found:
        raise ConversionError(f"--mtp-layers {requested}: the folder holds {found} MTP layer(s) ({where}); "
                              f"give --mtp-layers {found} to import them or 0 to leave them out")
    return MtpPlan(found, found, False, None)


def fresh_hf_tensor(m, name: str, shape: tuple, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """An initial value for an HF-named tensor of a module the folder lacks, as megatron-core
    initialises one: norms 1, expert bias 0, output projections (o_proj, down_proj)
    N(0, std / sqrt(2 num_layers)), other weights N(0, std), std = model.init_method_std.
    Drawn from a generator seeded by `seed` and the name alone: the same under any layout."""
    if name.endswith("norm.weight"):
        return torch.ones(shape, dtype=dtype)
    if name.endswith("e_score_correction_bias"):
        return torch.zeros(shape, dtype=torch.float32)
    std = m.init_method_std
    if name.endswith(("o_proj.weight", "down_proj.weight")):
        std /= math.sqrt(2.0 * m.num_layers)
    generator = torch.Generator().manual_seed(zlib.crc32(f"{seed}:{name}".encode()))
    return torch.empty(shape, dtype=torch.float32).normal_(0.0, std, generator=generator).to(dtype)


def check_hf_tensors(reader: HFFolderReader | fp8.DequantizingReader, m) -> None:
    expected = mapping.hf_shapes(m)
    optional = {layer.hf + k for layer in mapping.layers(m) if layer.mtp is not None
                for k in ("embed_tokens.weight", "shared_head.head.weight")}
    unknown = sorted(k for k in reader.keys() if k not in expected)
    if unknown:
        raise ConversionError(f"{reader.folder}: unknown key {unknown[0]} in {reader.file_of(unknown[0])} (and "
                              f"{len(unknown) - 1} more): not part of the {mapping.family_of(m).architecture} model "
                              "config.json describes")
    missing = sorted(k for k in expected if k not in reader.where and k not in optional)
    if missing:
        raise ConversionError(f"{reader.folder}: tensor {missing[0]} is missing (and {len(missing) - 1} more) "
                              "though config.json implies it")
    for key, shape in expected.items():
        if key in reader.where and tuple(reader.shape(key)) != tuple(shape):
            raise ConversionError(f"{reader.folder}: config does not match the checkpoint: {key} is "
                                  f"{tuple(reader.shape(key))} in {reader.file_of(key)}, config.json gives {tuple(shape)}")


def convert_from_hf(hf: str, out: str, parallel: Optional[ParallelConfig] = None, base: Optional[Config] = None,
                    dtype: Optional[torch.dtype] = None, iteration: int = 0, progress: bool = True,
                    mtp_layers: Optional[int] = None, seed: Optional[int] = None,
                    vision: Optional[str] = None, audio: Optional[str] = None,
                    encoder_overrides: Optional[list[str]] = None) -> dict:
    """Write `out/iter_{iteration}` + the tracker; `base` supplies the non-model sections of the
    stored config (and, if given, must agree with config.json on the model shape).
    `mtp_layers`: see `resolve_mtp`; fresh modules are drawn with `seed` (default: the stored
    config's train.seed). `vision` / `audio`: a SigLIP or CLIP folder / a Whisper folder whose
    encoder joins the language model (encoder_mapping.py); their projectors are drawn fresh with
    the same seed; the encoder's training choices (feature layer, projector, ...) come from
    `base`'s model.vision / model.audio when it has them, then `encoder_overrides`
    (`model.vision.KEY=VALUE` / `model.audio.KEY=VALUE`)."""
    m, ours = model_config(hf)
    imported = {}
    for kind, folder in (("vision", vision), ("audio", audio)):
        if folder is None:
            continue
        if getattr(m, kind) is not None:
            raise ConversionError(f"--{kind} {folder}: {hf} already holds a {kind} encoder ({OURS_FILE})")
        choices = getattr(base.model, kind) if base is not None else None
        read = encoder_mapping.vision_config_from_hf if kind == "vision" else encoder_mapping.audio_config_from_hf
        enc = read(folder, choices)
        mine = [o for o in encoder_overrides or [] if o.startswith(f"model.{kind}.")]
        enc = encoder_mapping.with_choices(kind, enc, mine, folder) if mine else enc
        m = dataclasses.replace(m, **{kind: enc})
        imported[kind] = encoder_mapping.EncoderFolder(folder, kind, enc, HFFolderReader(folder))
    reader = fp8.reader_for(HFFolderReader(hf), read_hf_config(hf)[0], dtype)  # FP8 weights read dequantized
    mtp = resolve_mtp(m, reader, mtp_layers)
    check_hf_tensors(reader, dataclasses.replace(m, mtp_num_layers=mtp.in_folder))
    m = dataclasses.replace(m, mtp_num_layers=mtp.layers)
    if base is not None:
        mapping.compare_model_configs(base.model, m, "the given --config", f"{hf}/config.json")
        m = dataclasses.replace(base.model, vision=m.vision, audio=m.audio) if (m.vision or m.audio) else base.model
    cfg = dataclasses.replace(base or Config(), model=m, parallel=parallel or ParallelConfig())
    if m.vision is not None or m.audio is not None:
        if cfg.data.source not in ("demo", "shards"):
            cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, source="demo"))
    world = _check_layout(cfg)
    fresh_seed = cfg.train.seed if seed is None else seed
    if mtp.note:
        print(f"from HF: {mtp.note}{f' (seed {fresh_seed})' if mtp.fresh else ''}", file=sys.stderr, flush=True)
    for source in imported.values():
        if source.note:
            print(f"from HF: {source.note}", file=sys.stderr, flush=True)
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
    fresh_projectors = set(imported)  # --vision / --audio; a folder of ours brings its projectors
    for kind, sub in (ours.get("encoder_folders") or {}).items():
        enc = getattr(m, kind)
        imported[kind] = encoder_mapping.EncoderFolder(os.path.join(hf, sub), kind, enc,
                                                       HFFolderReader(os.path.join(hf, sub)))

    layout = Layout(cfg.parallel, m.num_layers)
    unfinished = new_iteration_folder(out, iteration)
    writer = DistCheckpointWriter(unfinished)
    dtype_of = lambda t: t.dtype if dtype is None or not t.is_floating_point() else dtype  # noqa: E731
    shapes = mapping.megatron_shapes(m)
    kept_layers = m.num_layers + m.mtp_num_layers  # the MTP layers left out (--mtp-layers 0) are not read
    read_keys = [k for k in reader.keys() if not k.startswith("model.layers.") or int(k.split(".")[2]) < kept_layers]
    total = sum(nbytes(reader.shape(k), torch.float32) for k in read_keys)
    bar = Progress(total, "from HF", enabled=progress)
    counted: set = set()

    def get(name: str) -> torch.Tensor:
        tensor = reader.read(name)
        if name not in counted:
            counted.add(name)
            bar.update(nbytes(tensor.shape, torch.float32))
        return tensor

    embedding = "model.embed_tokens.weight"
    weights_dtype = reader.dtype(embedding)
    fresh_shapes = mapping.hf_shapes(m) if mtp.fresh else {}

    def fresh(name: str) -> torch.Tensor:
        return fresh_hf_tensor(m, name, fresh_shapes[name], weights_dtype, fresh_seed)

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
        source = fresh if mtp.fresh and layer.mtp is not None else get
        for key, expert, tensor in mapping.layer_from_hf(m, layer, source):
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
    for kind, source in imported.items():
        enc = getattr(m, kind)
        tensors = encoder_mapping.megatron_tensors(kind, enc, source)
        cast = (lambda t: t) if dtype is None else (lambda t: t.to(dtype))  # noqa: E731
        for key, tensor in encoder_mapping.stack_layers(tensors):
            put(key, None, cast(tensor), shape=tuple(tensor.shape))
        if kind not in fresh_projectors:
            continue
        for key, tensor in encoder_mapping.fresh_projector(kind, enc, m.hidden_size, m.init_method_std, fresh_seed,
                                                           weights_dtype if dtype is None else dtype):
            put(key, None, tensor, shape=tuple(tensor.shape))
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
            "files": len(writer.files), "layout": common["layout"], "family": mapping.family_of(m).architecture,
            "mtp_layers": m.mtp_num_layers, "mtp_initialised": mtp.fresh}
