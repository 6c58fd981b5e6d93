"""Multimodal data: the demo generator, JSONL -> WebDataset shards, text formatting and packing."""

from __future__ import annotations

import glob
import hashlib
import importlib.util
import itertools
import json
import os
import shutil

import numpy as np
import pytest
import soundfile
import webdataset
from PIL import Image

from megatron_mm.data.multimodal import demo
from megatron_mm.data.multimodal.demo_media import (
    COLOURS, PITCHES, PLACEMENTS, SAMPLE_RATE, SHAPES, SOUNDS, VOLUMES,
)
from megatron_mm.data.multimodal.shards import build_shards
from megatron_mm.data.multimodal.text import (
    FormattedSample, SequencePacker, TextFormatter, media_runs, pack_samples, train_multimodal_tokenizer,
)
from megatron_mm.data.tokenizer import MULTIMODAL_SPECIAL_TOKENS, SentencePieceTokenizer, train_sentencepiece

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N_TRAIN, N_HELDOUT, SEED = 120, 40, 7
IMAGE_TOKENS, AUDIO_TOKENS = 5, 3


def load_tool(name: str):
    spec = importlib.util.spec_from_file_location(f"{name}_tool", os.path.join(REPO, "tools", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def read_jsonl(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


def folder_digest(folder: str) -> dict[str, str]:
    digests = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                digests[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
    return digests


def media_of(row: dict) -> list[str]:
    return [kind for kind in ("image", "audio") if kind in row]


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("demo") / "set")
    demo.make_demo_data(out, N_TRAIN, SEED, heldout=N_HELDOUT)
    return out


@pytest.fixture(scope="module")
def tokenizer(demo_dir, tmp_path_factory) -> SentencePieceTokenizer:
    rows = read_jsonl(os.path.join(demo_dir, "train.jsonl"))
    return SentencePieceTokenizer(train_multimodal_tokenizer(rows, str(tmp_path_factory.mktemp("tok") / "tok"), 512))


@pytest.fixture(scope="module")
def formatter(tokenizer) -> TextFormatter:
    return TextFormatter(tokenizer, IMAGE_TOKENS, AUDIO_TOKENS)


# --------------------------------------------------------------------------- demo generator


def test_demo_is_deterministic_and_covers_every_kind(demo_dir, tmp_path, capsys):
    tool = load_tool("make_demo_data")
    assert tool.main(["--out", str(tmp_path / "same"), "--n", str(N_TRAIN), "--seed", str(SEED),
                      "--heldout", str(N_HELDOUT)]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert folder_digest(str(tmp_path / "same")) == folder_digest(demo_dir)
    demo.make_demo_data(str(tmp_path / "other"), N_TRAIN, SEED + 1, heldout=N_HELDOUT)
    assert folder_digest(str(tmp_path / "other")) != folder_digest(demo_dir)

    train = summary["train"]
    assert train["rows"] == N_TRAIN and summary["heldout"]["rows"] == summary["novel"]["rows"] == N_HELDOUT
    assert min(train["image"], train["audio"], train["text_only"], train["instruction"]) > 0
    rows = read_jsonl(os.path.join(demo_dir, "train.jsonl"))
    extensions = {os.path.splitext(r[k])[1] for r in rows for k in media_of(r)}
    assert extensions == {".png", ".jpg", ".wav", ".flac"}
    assert any(r.get("image") and "<image>" not in r.get("text", "<image>") for r in rows)  # media-first captions
    # A folder that already holds a set is refused, not mixed into.
    assert tool.main(["--out", demo_dir, "--n", "3"]) == 2
    assert "already holds" in capsys.readouterr().err


def test_demo_media_match_their_labels(demo_dir):
    """Each image's shape pixels have the labelled colour; each tone peaks at the labelled pitch."""
    rows = read_jsonl(os.path.join(demo_dir, "train.jsonl")) + read_jsonl(os.path.join(demo_dir, "heldout.jsonl"))
    checked = {"image": 0, "audio": 0}
    for row in rows:
        label = row.get("label", {})
        if "text" in row and "image" in row:
            assert demo.describe_image(label) in row["text"]
        if "image" in row:
            pixels = np.asarray(Image.open(os.path.join(demo_dir, row["image"])).convert("RGB"), dtype=np.float64)
            bright = pixels[pixels.max(axis=2) > 120]  # the shape; the background is darker
            assert len(bright) > 10
            shape_rgb = np.median(bright, axis=0)  # the median ignores JPEG's blended edge pixels
            distances = {c: np.abs(shape_rgb - rgb).max() for c, rgb in COLOURS.items()}
            assert min(distances, key=distances.get) == label["colour"] and distances[label["colour"]] < 30
            checked["image"] += 1
        if "audio" in row and label["sound"] == "tone":
            wave, rate = soundfile.read(os.path.join(demo_dir, row["audio"]))
            assert rate == SAMPLE_RATE and wave.ndim == 1 and 0.6 * rate <= len(wave) <= rate
            peak = np.argmax(np.abs(np.fft.rfft(wave))) * rate / len(wave)
            assert abs(np.log2(peak / PITCHES[label["pitch"]])) < 0.05  # within a semitone
            checked["audio"] += 1
    assert min(checked.values()) > 5


def test_heldout_renders_are_new_and_novel_combinations_unseen(demo_dir):
    train = read_jsonl(os.path.join(demo_dir, "train.jsonl"))
    heldout = read_jsonl(os.path.join(demo_dir, "heldout.jsonl"))
    novel = read_jsonl(os.path.join(demo_dir, "novel.jsonl"))
    assert all("label" in r and media_of(r) for r in heldout + novel)

    def image_combo(r):
        return (r["label"]["shape"], r["label"]["colour"], r["label"]["position"]) if "image" in r else None

    def audio_combo(r):
        return (r["label"]["pitch"], r["label"]["sound"], r["label"]["volume"]) if "audio" in r else None

    for combo, is_novel in ((image_combo, demo.image_is_heldout), (audio_combo, demo.audio_is_heldout)):
        seen = {combo(r) for r in train} - {None}
        held = {combo(r) for r in heldout} - {None}
        new = {combo(r) for r in novel} - {None}
        assert held and seen and new and not new & seen
        assert not any(is_novel(*c) for c in seen | held) and all(is_novel(*c) for c in new)
    # The rules hold out one placement per shape-colour pair and at most one volume per
    # (pitch, sound), so every attribute and shape-colour pair is still trained on.
    for shape, colour in itertools.product(SHAPES, COLOURS):
        assert sum(demo.image_is_heldout(shape, colour, p) for p in PLACEMENTS) == 1
    for pitch, sound in itertools.product(PITCHES, SOUNDS):
        assert sum(demo.audio_is_heldout(pitch, sound, v) for v in VOLUMES) <= 1
    assert sum(demo.audio_is_heldout(*c) for c in itertools.product(PITCHES, SOUNDS, VOLUMES)) == 4
    digest = folder_digest(demo_dir)
    train_bytes = {digest[r[k]] for r in train for k in media_of(r)}
    held_bytes = {digest[r[k]] for r in heldout + novel for k in media_of(r)}
    assert not train_bytes & held_bytes


# --------------------------------------------------------------------------- shards


def read_shards(folder: str) -> dict[str, dict]:
    urls = sorted(glob.glob(os.path.join(folder, "shard-*.tar")))
    return {s["__key__"]: s for s in webdataset.WebDataset(urls, shardshuffle=False, empty_check=False)}


def test_build_shards_round_trip(demo_dir, tmp_path):
    summary = build_shards(os.path.join(demo_dir, "train.jsonl"), str(tmp_path / "a"), samples_per_shard=32)
    assert (summary["rows"], summary["written"], summary["bad"], summary["shards"]) == (N_TRAIN, N_TRAIN, 0, 4)
    samples = read_shards(str(tmp_path / "a"))
    assert len(samples) == N_TRAIN
    for number, row in enumerate(read_jsonl(os.path.join(demo_dir, "train.jsonl")), 1):
        sample = samples[f"{number:09d}"]
        assert json.loads(sample["json"]) == {k: v for k, v in row.items() if k not in ("image", "audio")}
        members = {k for k in sample if not k.startswith("__")} - {"json"}
        assert members == {os.path.splitext(row[k])[1][1:] for k in media_of(row)}
        for kind in media_of(row):
            with open(os.path.join(demo_dir, row[kind]), "rb") as f:
                assert sample[os.path.splitext(row[kind])[1][1:]] == f.read()
    # Same JSONL, same bytes; and a folder that already has shards is refused.
    build_shards(os.path.join(demo_dir, "train.jsonl"), str(tmp_path / "b"), samples_per_shard=32)
    assert folder_digest(str(tmp_path / "a")) == folder_digest(str(tmp_path / "b"))
    with pytest.raises(ValueError, match="already holds shard"):
        build_shards(os.path.join(demo_dir, "train.jsonl"), str(tmp_path / "b"))


def test_build_shards_reports_each_bad_row(demo_dir, tmp_path, capsys):
    media = tmp_path / "media"
    media.mkdir()
    demo_rows = read_jsonl(os.path.join(demo_dir, "train.jsonl"))
    png = os.path.join(demo_dir, next(r["image"] for r in demo_rows if r.get("image", "").endswith(".png")))
    shutil.copy(png, media / "good.png")
    data = open(png, "rb").read()
    (media / "truncated.png").write_bytes(data[: len(data) // 2])
    (media / "noise.jpg").write_bytes(b"not an image at all")
    Image.new("RGB", (8, 8)).save(media / "picture.bmp")
    soundfile.write(media / "tone.wav", np.zeros(1600, np.float32), SAMPLE_RATE)
    soundfile.write(media / "empty.wav", np.zeros(0, np.float32), SAMPLE_RATE)
    (media / "noise.flac").write_bytes(b"fLaC garbage")
    rows = [
        ('{"text": "<image> a picture.", "image": "media/good.png"}', None),
        ('{"text": "a caption", "image": "media/truncated.png"}', "row 2: image: does not decode"),
        ('{"text": "a caption", "image": "media/noise.jpg"}', "row 3: image: does not decode"),
        ('{"text": "a caption", "image": "media/picture.bmp"}', "row 4: image: format BMP not supported"),
        ('{"text": "<audio> a sound.", "audio": "media/missing.wav"}', "row 5: audio: file not found"),
        ('{"text": "a sound.", "audio": "media/empty.wav"}', "row 6: audio: has no audio frames"),
        ('{"text": "a sound.", "audio": "media/noise.flac"}', "row 7: audio: not a readable WAV/FLAC"),
        ('{"text": "   ", "image": "media/good.png"}', "row 8: text: empty"),
        ('{"text": "a caption"', "row 9: json: not valid JSON"),
        ('{"conversations": [{"from": "human", "value": "hi"}, {"from": "system", "value": "be brief"}, '
         '{"from": "gpt", "value": "a."}]}',
         "row 10: conversations[1].from: a system turn may only open the conversation"),
        ('{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": ""}]}',
         "row 11: conversations[1].value: empty"),
        ('{"text": "<image> with no image"}', "row 12: image: missing, but the text has <image>"),
        ('{"label": 1}', "row 13: text: missing"),
        ('{"conversations": [{"from": "human", "value": "<audio>\\nwhat?"}, {"from": "gpt", "value": "a tone."}],'
         ' "audio": "media/tone.wav", "label": {"pitch": "low"}}', None),
    ]
    jsonl = tmp_path / "rows.jsonl"
    jsonl.write_text("\n".join(line for line, _ in rows) + "\n\n")  # a trailing blank line is not a row
    tool = load_tool("build_shards")
    assert tool.main(["--jsonl", str(jsonl), "--out", str(tmp_path / "shards")]) == 0
    captured = capsys.readouterr()
    reported = [line for line in captured.err.splitlines() if line.startswith("row ")]
    expected = [reason for _, reason in rows if reason]
    assert len(reported) == len(expected)
    for line, reason in zip(reported, expected):
        assert line.startswith(reason), (line, reason)
    summary = json.loads(captured.out.strip().splitlines()[-1])
    assert (summary["rows"], summary["written"], summary["bad"]) == (len(rows), 2, len(expected))
    samples = read_shards(str(tmp_path / "shards"))
    assert sorted(samples) == ["000000001", "000000014"]
    assert samples["000000014"]["wav"] == (media / "tone.wav").read_bytes()
    assert json.loads(samples["000000014"]["json"])["label"] == {"pitch": "low"}

    # Nothing writable: exit 1, and no empty shard left behind.
    (tmp_path / "bad.jsonl").write_text(rows[8][0] + "\n")
    assert tool.main(["--jsonl", str(tmp_path / "bad.jsonl"), "--out", str(tmp_path / "none")]) == 1
    assert "none of the 1 rows" in capsys.readouterr().err
    assert not glob.glob(str(tmp_path / "none" / "*"))


# --------------------------------------------------------------------------- tokenizer and text


def test_special_tokens_are_single_pieces(tokenizer, tmp_path):
    ids = tokenizer.special_ids
    assert list(ids) == list(MULTIMODAL_SPECIAL_TOKENS) and sorted(ids.values()) == [4, 5, 6, 7, 8]
    assert tokenizer.vocab_size <= 512
    for piece, token_id in ids.items():
        assert token_id in tokenizer.tokenize(f"a{piece}b")
        assert tokenizer.detokenize([token_id]) == piece
    plain = SentencePieceTokenizer(train_sentencepiece(["a red circle"] * 20, str(tmp_path / "plain"), 40))
    with pytest.raises(ValueError, match="has no '<image>' piece"):
        TextFormatter(plain, IMAGE_TOKENS, AUDIO_TOKENS)


def decode(tokenizer, tokens, mask) -> tuple[str, str]:
    """(all tokens, learned tokens) as text."""
    return (tokenizer.detokenize(tokens.tolist()),
            tokenizer.detokenize([t for t, m in zip(tokens.tolist(), mask.tolist()) if m]))


def test_caption_formatting(formatter, tokenizer):
    image_id, audio_id = tokenizer.special_ids["<image>"], tokenizer.special_ids["<audio>"]
    ids = {"image": image_id, "audio": audio_id}
    s = formatter.format({"text": "a red circle. <audio> a high tone."}, ["image", "audio"])
    assert s.media == ["image", "audio"]  # the image had no placeholder: it goes first
    runs = media_runs(s.tokens, ids)
    assert runs == [("image", 0, IMAGE_TOKENS), ("audio", runs[1][1], AUDIO_TOKENS)]
    assert s.tokens[-1] == tokenizer.eod and s.loss_mask[-1] == 1
    placeholder = np.isin(s.tokens, [image_id, audio_id])
    assert placeholder.sum() == IMAGE_TOKENS + AUDIO_TOKENS
    assert (s.loss_mask[placeholder] == 0).all() and (s.loss_mask[~placeholder] == 1).all()
    _, learned = decode(tokenizer, s.tokens, s.loss_mask)
    assert learned == "a red circle. a high tone."

    text_only = formatter.format({"text": "two plus two is four."}, [])
    assert text_only.media == [] and text_only.loss_mask.all()
    with pytest.raises(ValueError, match="has <image> but the sample has no image"):
        formatter.format({"text": "<image> a circle."}, [])
    with pytest.raises(ValueError, match="more than one <audio>"):
        formatter.format({"text": "<audio> and <audio>"}, ["audio"])


def test_instruction_formatting_learns_only_answers(formatter, tokenizer):
    sample = {"conversations": [{"from": "human", "value": "<image>\nWhat shape is this?"},
                                {"from": "gpt", "value": "a circle."},
                                {"from": "human", "value": "What colour is it?"},
                                {"from": "gpt", "value": "red."}]}
    s = formatter.format(sample, ["image"])
    text, learned = decode(tokenizer, s.tokens, s.loss_mask)
    assert learned == "a circle.<|end|> red.<|end|>"
    assert text.startswith("<|user|>" + "<image>" * IMAGE_TOKENS + " What shape is this?<|end|><|assistant|>")
    assert s.tokens[-1] == tokenizer.eod and s.loss_mask[-1] == 0
    assert media_runs(s.tokens, {"image": tokenizer.special_ids["<image>"]}) == [("image", 1, IMAGE_TOKENS)]
    with pytest.raises(ValueError, match="unknown role 'bot'"):
        formatter.format({"conversations": [{"from": "bot", "value": "x"}]}, [])


def test_packing_keeps_samples_whole_and_media_in_order(formatter, tokenizer, demo_dir):
    rows = read_jsonl(os.path.join(demo_dir, "train.jsonl"))
    items = [(i, formatter.format(r, media_of(r))) for i, r in enumerate(rows)]
    too_long = FormattedSample(np.ones(40, np.int64), np.ones(40, np.float32), [])
    items.insert(10, ("long", too_long))
    seq_length = 32
    sequences, skipped = pack_samples(items, seq_length, tokenizer.pad)
    formatted = dict(items)
    assert ("long", 40) in skipped
    packed_refs = [ref for seq in sequences for ref in seq.samples]
    assert len(packed_refs) + len(skipped) == len(items)
    assert packed_refs == [ref for ref, s in items if len(s) <= seq_length + 1]
    ids = {kind: tokenizer.special_ids[f"<{kind}>"] for kind in ("image", "audio")}
    for seq in sequences:
        assert seq.tokens.shape == seq.loss_mask.shape == (seq_length + 1,)
        whole = np.concatenate([formatted[ref].tokens for ref in seq.samples])
        n = len(whole)
        assert (seq.tokens[:n] == whole).all()  # samples back to back, none split
        assert (seq.tokens[n:] == tokenizer.pad).all() and (seq.loss_mask[n:] == 0).all()
        assert (seq.loss_mask[:n] == np.concatenate([formatted[r].loss_mask for r in seq.samples])).all()
        runs = media_runs(seq.tokens, ids)
        assert [kind for kind, _, _ in runs] == [kind for _, kind in seq.media]
        assert all(length == {"image": IMAGE_TOKENS, "audio": AUDIO_TOKENS}[kind] for kind, _, length in runs)
        assert [ref for ref, _ in seq.media] == [r for r in seq.samples for _ in formatted[r].media]
        segments = np.concatenate([np.full(len(formatted[r]), i) for i, r in enumerate(seq.samples, 1)])
        assert seq.segment_ids.shape == (seq_length + 1,)
        assert (seq.segment_ids[:n] == segments).all() and (seq.segment_ids[n:] == 0).all()
    # Greedy: a sequence closes only when the next sample does not fit.
    for seq, following in zip(sequences, sequences[1:]):
        used = sum(len(formatted[r]) for r in seq.samples)
        assert used + len(formatted[following.samples[0]]) > seq_length + 1
    with pytest.raises(ValueError, match="pad_id=-1"):
        SequencePacker(seq_length, -1)

