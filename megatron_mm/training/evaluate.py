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
at or below chance. A `shards` source (the user's own data) is scored on each of
`data.eval_shards`, a split named after its folder: the loss over the learned tokens (as in
training: caption tokens, answers) of its samples; the demo questions are not asked.

`evaluation_table` renders a result as the aligned table `tools/evaluate.py` prints.
"""

from __future__ import annotations

import numpy as np
import torch

from megatron_mm.config import ConfigError, Config, eval_split_name, validate
from megatron_mm.data.multimodal.demo import (
    AUDIO_QUESTIONS, IMAGE_QUESTIONS, answer, describe_audio, describe_image,
)
from megatron_mm.data.multimodal.demo_media import COLOURS, PITCHES, SHAPES, SOUNDS
from megatron_mm.models.attention_mask import document_attention_mode, one_sample_rows_mask
from megatron_mm.models.gpt import transformer_config
from megatron_mm.planning.fit import check_fits
from megatron_mm.runtime import compat
from megatron_mm.runtime import distributed as runtime
from megatron_mm.training import checkpoint
from megatron_mm.training.loop import build_model, uses_transformer_engine
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
    if cfg.data.source == "shards" and not cfg.data.eval_shards:
        raise ConfigError(["data.eval_shards=[]: name the held-out shards to evaluate on (folders or globs; "
                           "tools/prepare_multimodal.py --heldout makes them)"])
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
        documents = document_attention_mode(cfg, uses_transformer_engine(hardware))
        with torch.no_grad():
            if not data.multimodal:
                raise ConfigError([f"data.source={cfg.data.source}: evaluation needs a multimodal source"])
            if cfg.data.source == "demo":
                from megatron_mm.data.multimodal.prepare import prepare_demo

                paths = prepare_demo(cfg)
                splits = {"heldout": paths["heldout"], "novel": paths["novel"]}
            else:
                splits = {eval_split_name(spec): spec for spec in cfg.data.eval_shards}
            questions = cfg.data.source == "demo"  # the demo set's labels; own data has its own
            return {"iteration": iteration,
                    **{name: _multimodal(cfg, data, model, device, documents, shards, max_samples, questions)
                       for name, shards in splits.items()}}
    finally:
        runtime.shutdown()


def _sequence_logprobs(model, device, documents, batch: list, media: dict) -> torch.Tensor:
    """Summed log-probability of each formatted sample's learned tokens (one sample a row,
    padded at the end; `documents`: the model's attention_mask.document_attention_mode)."""
    length = max(len(s) for s in batch)
    tokens = np.zeros((len(batch), length), np.int64)
    mask = np.zeros((len(batch), length), np.float32)
    for i, s in enumerate(batch):
        tokens[i, :len(s)], mask[i, :len(s)] = s.tokens, s.loss_mask
    tokens, mask = torch.from_numpy(tokens).to(device), torch.from_numpy(mask).to(device)
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    positions = torch.arange(inputs.shape[1], device=device).expand_as(inputs)
    attention_mask = one_sample_rows_mask(documents, inputs)
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


def _multimodal(cfg: Config, data: StepData, model, device, documents, shards: str, max_samples: int,
                questions: bool) -> dict:
    """One split's loss (and with `questions`, the demo set's answer accuracies): samples
    scored, learned tokens, samples skipped (unreadable, or too long for a sequence, as in
    training)."""
    from megatron_mm.data.multimodal.stream import open_stream

    stream = open_stream(cfg, shards, data.tokenizer, 0, 1, 0, None, log=lambda m: None)
    formatter, loader = stream.formatter, stream.loader
    right = {"image": 0, "audio": 0}
    asked = {"image": 0, "audio": 0}
    chance_sum = {"image": 0.0, "audio": 0.0}
    by_key: dict[str, int] = {}  # right answers per question (shape, colour, pitch, sound)
    loss_sum = tokens = 0.0
    scored = unusable = 0
    for sample in loader:
        if scored >= max_samples or loader.position > loader.plan.samples_per_epoch:
            break
        present = {"image": sample.image, "audio": sample.mel}
        kinds = [k for k, v in present.items() if v is not None]
        media = {"images": None if sample.image is None else sample.image[None].to(device),
                 "mels": None if sample.mel is None else sample.mel[None].to(device)}
        try:
            own = formatter.format(sample.meta, kinds)
        except ValueError:  # training skips such a sample too (stream.py)
            unusable += 1
            continue
        if len(own) > cfg.model.seq_length + 1:
            unusable += 1
            continue
        scored += 1
        loss_sum -= float(_sequence_logprobs(model, device, documents, [own], media)[0])
        tokens += float(own.loss_mask[1:].sum())
        if not questions or len(kinds) != 1 or "label" not in sample.meta:
            continue
        kind = kinds[0]
        for question_kind, question, key, values in QUESTIONS:
            if question_kind != kind:
                continue
            candidates, truth = _candidates(kind, question, key, values, sample.meta["label"])
            batch = [formatter.format(c, [kind]) for c in candidates]
            repeated = {k: None if v is None else v.expand(len(batch), *v.shape[1:]) for k, v in media.items()}
            scores = _sequence_logprobs(model, device, documents, batch, repeated)
            correct = int(int(scores.argmax()) == truth)
            right[kind] += correct
            by_key[key] = by_key.get(key, 0) + correct
            asked[kind] += 1
            chance_sum[kind] += 1.0 / len(values)
    result = {"loss": loss_sum / tokens if tokens else None, "samples": scored, "tokens": int(tokens),
              "skipped": loader.skipped + unusable}
    if not questions:
        return result
    for kind in ("image", "audio"):
        result[f"{kind}_accuracy"] = right[kind] / asked[kind] if asked[kind] else None
        result[f"chance_{kind}"] = chance_sum[kind] / asked[kind] if asked[kind] else None
        result[f"{kind}_questions"] = asked[kind]
    for _, _, key, _ in QUESTIONS:
        kind = "image" if key in ("shape", "colour") else "audio"
        result[f"{key}_accuracy"] = by_key.get(key, 0) / (asked[kind] // 2) if asked[kind] else None
    return result


# (result key, column title) of the demo set's accuracies, in the README table's order
ACCURACY_COLUMNS = [("shape_accuracy", "shape"), ("colour_accuracy", "colour"), ("pitch_accuracy", "pitch"),
                    ("sound_accuracy", "tone or chord")]


def _chance(key: str) -> float:
    values = next(values for _, _, k, values in QUESTIONS if f"{k}_accuracy" == key)
    return 1.0 / len(values)


def _cell(value, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def evaluation_table(result: dict) -> str:
    """`evaluate`'s result as an aligned text table: a row per split (samples, the demo
    accuracies when there are any, loss), and for the demo set a chance row."""
    splits = {name: split for name, split in result.items() if isinstance(split, dict)}
    demo = any("shape_accuracy" in split for split in splits.values())
    header = ["split", "samples"] + ([title for _, title in ACCURACY_COLUMNS] if demo else ["tokens", "skipped"]) \
        + ["loss"]
    rows = []
    for name, split in splits.items():
        cells = [name, _cell(split.get("samples"))]
        cells += ([_cell(split.get(key)) for key, _ in ACCURACY_COLUMNS] if demo
                  else [_cell(split.get("tokens")), _cell(split.get("skipped"))])
        rows.append(cells + [_cell(split.get("loss"), 3)])
    if demo:
        rows.append(["chance", ""] + [_cell(_chance(key)) for key, _ in ACCURACY_COLUMNS] + [""])
    widths = [max(len(row[i]) for row in [header] + rows) for i in range(len(header))]
    lines = [f"checkpoint iteration {result.get('iteration')}"]
    for row in [header] + rows:
        lines.append("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w)
                               for i, (cell, w) in enumerate(zip(row, widths))).rstrip())
    return "\n".join(lines)
