"""Continuing a prompt with a checkpoint's model, in one process, whatever layout saved it.

The model is the one the checkpoint's stored config describes, built for one rank and loaded
by `one_process.load_model` (megatron-core reshards). Its tokenizer is the run's
(`data.run_tokenizer`: `data.tokenizer`, or the corpus/demo cache's). The prompt goes through
the training formatter (`stream.text_formatter`): a plain prompt is a caption's text (images or
clips without a `<image>`/`<audio>` placeholder go in front, as in training); `chat=True` makes
it a user turn and the answer starts after `<|assistant|>`, ending at `<|end|>`. Media files are
decoded as the PyTorch loader decodes a shard's members (`loader_torch.decode_image` /
`decode_audio`, with the model's `stream.media_spec`).

Decoding is written here (megatron-core 0.16.1's inference engines need CUDA and Transformer
Engine paths): each new token runs the whole sequence again (no KV cache: the tiny CPU models
this serves take milliseconds a step). Greedy at temperature 0; otherwise softmax(logits / T),
cut to the smallest set of tokens whose probability reaches `top_p` (nucleus sampling, as
transformers' `TopPLogitsWarper`), drawn with a `torch.Generator` seeded by `seed`. Padding rows
of the embedding (ids past the tokenizer's) are never chosen. Generation stops at the
end-of-document token (and in chat mode at `<|end|>`), or after `max_new_tokens`.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Optional

import torch

from megatron_mm.config import Config, ConfigError, ParallelConfig, config_from_tree
from megatron_mm.data import run_tokenizer
from megatron_mm.data.tokenizer import AUDIO_TOKEN, END_TOKEN, IMAGE_TOKEN, check_fits, open_tokenizer
from megatron_mm.models.attention_mask import document_attention_mode, one_sample_rows_mask
from megatron_mm.training import checkpoint
from megatron_mm.training.checkpoint_pickles import PickleRefused, load_common
from megatron_mm.training.loop import uses_transformer_engine
from megatron_mm.training.one_process import load_model, one_process


def stored_config(path: str, overrides: Optional[list[str]] = None) -> Config:
    """The config stored in checkpoint `path` (a checkpoints or `iter_*` folder), `overrides`
    applied, laid out for one rank and loading `path`."""
    folder, _ = checkpoint.resolve(path)
    try:
        stored = load_common(folder).get("config")
    except PickleRefused as err:
        raise checkpoint.CheckpointError(f"checkpoint {folder}: {err}") from None
    if not isinstance(stored, dict):
        raise checkpoint.CheckpointError(f"checkpoint {folder}: common.pt holds no config")
    cfg = config_from_tree(stored, overrides)
    return dataclasses.replace(cfg, parallel=ParallelConfig(),
                               checkpoint=dataclasses.replace(cfg.checkpoint, load=path))


def prompt_tokens(formatter, prompt: str, media: list[str], chat: bool) -> list[int]:
    """The prompt as training formats it, up to where the model continues."""
    if chat:
        sample = {"conversations": [{"from": "human", "value": prompt}, {"from": "gpt", "value": "."}]}
        tokens = formatter.format(sample, media).tokens.tolist()
        return tokens[:len(tokens) - 1 - tokens[::-1].index(formatter.assistant)]  # through <|assistant|>
    return formatter.format({"text": prompt}, media).tokens.tolist()[:-1]  # without the closing end of document


def next_token(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> int:
    """One token from `logits` [vocab] (float32): argmax at temperature 0, else nucleus sampling."""
    if temperature == 0:
        return int(logits.argmax())
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        before = sorted_probs.cumsum(0) - sorted_probs  # mass of the more likely tokens
        sorted_probs[before >= top_p] = 0.0  # keeps the smallest prefix whose mass reaches top_p
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))


def generate(cfg: Config, prompt: str, image: Optional[str] = None, audio: Optional[str] = None,
             max_new_tokens: int = 32, temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
             chat: bool = False) -> dict:
    """Continue `prompt`; {"prompt_ids", "ids" (new tokens), "text" (new text), "iteration"}."""
    from megatron_mm.data.multimodal.loader_torch import decode_audio, decode_image
    from megatron_mm.data.multimodal.stream import media_spec, text_formatter

    problems = []
    if temperature < 0:
        problems.append(f"--temperature {temperature}: must be >= 0 (0: greedy)")
    if not 0 < top_p <= 1:
        problems.append(f"--top-p {top_p}: must be in (0, 1]")
    if max_new_tokens < 1:
        problems.append(f"--max-new-tokens {max_new_tokens}: must be >= 1")
    for flag, path, part in (("--image", image, cfg.model.vision), ("--audio", audio, cfg.model.audio)):
        if path is not None and part is None:
            problems.append(f"{flag} {path}: the checkpoint's model has no {flag[2:]} encoder")
        elif path is not None and not os.path.isfile(path):
            problems.append(f"{flag} {path}: file not found")
    tokenizer_path = run_tokenizer(cfg)
    if not tokenizer_path or not os.path.exists(tokenizer_path):
        problems.append(f"data.tokenizer={tokenizer_path}: the run's tokenizer is not on this machine "
                        f"(--set data.tokenizer=PATH)")
    if problems:
        raise ConfigError(problems)
    tokenizer = open_tokenizer(tokenizer_path)
    check_fits(tokenizer, cfg.model.vocab_size)
    formatter = text_formatter(cfg, tokenizer)
    spec = media_spec(cfg)
    media, inputs = [], {"images": None, "mels": None}
    if image is not None:
        with open(image, "rb") as f:
            inputs["images"] = decode_image(f.read(), spec.image)[None]
        media.append("image")
    if audio is not None:
        with open(audio, "rb") as f:
            inputs["mels"] = decode_audio(f.read(), spec.mel_frames, spec.mel_bins)[None]
        media.append("audio")
    tokens = prompt_tokens(formatter, prompt, media, chat)
    stop = {tokenizer.eod} | ({tokenizer.special_token_id(END_TOKEN)} if chat else set())
    placeholders = {"image": tokenizer.special_token_id(IMAGE_TOKEN), "audio": tokenizer.special_token_id(AUDIO_TOKEN)}
    generator = torch.Generator().manual_seed(seed)
    new: list[int] = []
    with one_process(cfg) as (_, hardware, device):
        model, iteration = load_model(cfg, hardware, placeholders)
        documents = document_attention_mode(cfg, uses_transformer_engine(hardware))
        inputs = {k: v.to(device) for k, v in inputs.items() if v is not None}  # a text model takes none
        with torch.no_grad():
            for _ in range(max_new_tokens):
                ids = torch.tensor([tokens + new], dtype=torch.long, device=device)
                positions = torch.arange(ids.shape[1], device=device)[None]
                logits = model(ids, positions, one_sample_rows_mask(documents, ids), **inputs)
                token = next_token(logits[0, -1, :tokenizer.vocab_size].float().cpu(), temperature, top_p, generator)
                new.append(token)
                if token in stop:
                    break
    return {"iteration": iteration, "prompt_ids": tokens, "ids": new,
            "text": tokenizer.detokenize([t for t in new if t not in stop])}
