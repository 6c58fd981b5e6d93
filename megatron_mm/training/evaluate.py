"""Held-out evaluation of a checkpoint on one process: loss, and for the multimodal demo set
whether the model names what it sees and hears.

Accuracy is scored by likelihood on the training set's single-attribute questions: for
each held-out image, "What shape is this?" and "What colour is the shape?"; for each
held-out clip, "Is this sound low, medium or high?" and "Is this a tone or a chord?". The
model scores every possible answer; a question counts as right when the true answer
scores highest. Chance is the mean of one over the number of answers. The demo set is
scored on two splits (see `data/multimodal/demo.py`): `heldout`, images and clips never
trained on (new renders of the trained attribute combinations), and `novel`, attribute
combinations no training sample has, where a model that memorised whole combinations scores
at or below chance. A `shards` source is scored as one split, its own `data.shards`.
"""

from __future__ import annotations

import numpy as np
import torch

from megatron_mm.config import ConfigError, Config, validate
from megatron_mm.data.multimodal.demo import (
    AUDIO_QUESTIONS, IMAGE_QUESTIONS, answer, describe_audio, describe_image,
)
from megatron_mm.data.multimodal.demo_media import COLOURS, PITCHES, SHAPES, SOUNDS
from megatron_mm.models.attention_mask import one_sample_rows_mask
from megatron_mm.models.gpt import transformer_config
from megatron_mm.planning.fit import check_fits
from megatron_mm.runtime import compat
from megatron_mm.runtime import distributed as runtime
from megatron_mm.training import checkpoint
from megatron_mm.training.loop import build_model
from megatron_mm.training.step_data import StepData


def evaluate(cfg: Config, max_samples: int = 400) -> dict:
    env = runtime.dist_env()
    hardware = runtime.detect_hardware()
    validate(cfg, env.world_size, hardware)
    check_fits(cfg, env.world_size, hardware)
    if env.world_size != 1:
        raise ConfigError([f"world size={env.world_size}: evaluation runs on one process"])
    if not cfg.checkpoint.load:
        raise ConfigError(["checkpoint.load=None: name the checkpoint to evaluate"])
    device = runtime.init_distributed(env, hardware)
    try:
        runtime.init_model_parallel(cfg.parallel)
        compat.apply(hardware)
        compat.seed_everything(cfg.train.seed)
        data = StepData(cfg, env, device)
        tc = transformer_config(cfg, compat.transformer_config_overrides(hardware))
        model = build_model(cfg, tc, hardware, data.placeholder_ids)
        iteration, _, _ = checkpoint.load(cfg.checkpoint.load, model, None, None, cfg)
        model = model[0].eval()
        with torch.no_grad():
            if not data.multimodal:
                raise ConfigError([f"data.source={cfg.data.source}: evaluation needs a multimodal source"])
            if cfg.data.source == "demo":
                from megatron_mm.data.multimodal.prepare import prepare_demo

                paths = prepare_demo(cfg)
                splits = {"heldout": paths["heldout"], "novel": paths["novel"]}
            else:
                splits = {"shards": cfg.data.shards}
            return {"iteration": iteration,
                    **{name: _multimodal(cfg, data, model, device, shards, max_samples)
                       for name, shards in splits.items()}}
    finally:
        runtime.shutdown()


def _sequence_logprobs(model, device, masks_documents: bool, batch: list, media: dict) -> torch.Tensor:
    """Summed log-probability of each formatted sample's learned tokens (one sample a row,
    padded at the end; `masks_documents`: the model wants the attention mask, here causal)."""
    length = max(len(s) for s in batch)
    tokens = np.zeros((len(batch), length), np.int64)
    mask = np.zeros((len(batch), length), np.float32)
    for i, s in enumerate(batch):
        tokens[i, :len(s)], mask[i, :len(s)] = s.tokens, s.loss_mask
    tokens, mask = torch.from_numpy(tokens).to(device), torch.from_numpy(mask).to(device)
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    positions = torch.arange(inputs.shape[1], device=device).expand_as(inputs)
    attention_mask = one_sample_rows_mask(masks_documents, inputs)
    losses = model(inputs, positions, attention_mask, labels=labels, **media)  # [b, s] per-token loss
    return -(losses.float() * mask[:, 1:]).sum(dim=1)


# (kind, question, label key, the key's values): single-attribute questions, as in training.
QUESTIONS = [
    ("image", question, key, values)
    for _, question, key in IMAGE_QUESTIONS for k, values in (("shape", SHAPES), ("colour", tuple(COLOURS)))
    if key == k
] + [
    ("audio", question, key, values)
    for _, question, key in AUDIO_QUESTIONS for k, values in (("pitch", tuple(PITCHES)), ("sound", SOUNDS))
    if key == k
]


def _candidates(kind: str, question: str, key: str, values, label: dict) -> tuple[list[dict], int]:
    """One conversation per possible answer, and the index of the true one."""
    describe = describe_image if kind == "image" else describe_audio
    placeholder = "<image>" if kind == "image" else "<audio>"
    conversations = [
        {"conversations": [{"from": "human", "value": f"{placeholder}\n{question}"},
                           {"from": "gpt", "value": answer(dict(label, **{key: value}), key, describe)}]}
        for value in values
    ]
    return conversations, list(values).index(label[key])


def _multimodal(cfg: Config, data: StepData, model, device, shards: str, max_samples: int) -> dict:
    from megatron_mm.data.multimodal.stream import open_stream

    stream = open_stream(cfg, shards, data.tokenizer, 0, 1, 0, None, log=lambda m: None)
    formatter, loader = stream.formatter, stream.loader
    right = {"image": 0, "audio": 0}
    asked = {"image": 0, "audio": 0}
    chance_sum = {"image": 0.0, "audio": 0.0}
    by_key: dict[str, int] = {}  # right answers per question (shape, colour, pitch, sound)
    loss_sum = tokens = 0.0
    for n, sample in enumerate(loader):
        if n >= max_samples or loader.position > loader.plan.samples_per_epoch:
            break
        present = {"image": sample.image, "audio": sample.mel}
        kinds = [k for k, v in present.items() if v is not None]
        media = {"images": None if sample.image is None else sample.image[None].to(device),
                 "mels": None if sample.mel is None else sample.mel[None].to(device)}
        own = formatter.format(sample.meta, kinds)
        loss_sum -= float(_sequence_logprobs(model, device, cfg.masks_documents, [own], media)[0])
        tokens += float(own.loss_mask[1:].sum())
        if len(kinds) != 1 or "label" not in sample.meta:
            continue
        kind = kinds[0]
        for question_kind, question, key, values in QUESTIONS:
            if question_kind != kind:
                continue
            candidates, truth = _candidates(kind, question, key, values, sample.meta["label"])
            batch = [formatter.format(c, [kind]) for c in candidates]
            repeated = {k: None if v is None else v.expand(len(batch), *v.shape[1:]) for k, v in media.items()}
            scores = _sequence_logprobs(model, device, cfg.masks_documents, batch, repeated)
            correct = int(int(scores.argmax()) == truth)
            right[kind] += correct
            by_key[key] = by_key.get(key, 0) + correct
            asked[kind] += 1
            chance_sum[kind] += 1.0 / len(values)
    result = {"loss": loss_sum / max(tokens, 1.0)}
    for kind in ("image", "audio"):
        result[f"{kind}_accuracy"] = right[kind] / asked[kind] if asked[kind] else None
        result[f"chance_{kind}"] = chance_sum[kind] / asked[kind] if asked[kind] else None
        result[f"{kind}_questions"] = asked[kind]
    for _, _, key, _ in QUESTIONS:
        kind = "image" if key in ("shape", "colour") else "audio"
        result[f"{key}_accuracy"] = by_key.get(key, 0) / (asked[kind] // 2) if asked[kind] else None
    return result
