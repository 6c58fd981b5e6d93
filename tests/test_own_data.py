"""Your own multimodal data, end to end: a JSONL written here (captions; conversations in the
three dialects, one opened by a system turn; images and audio made with PIL/soundfile; Chinese
rows; `metadata` fields; one bad row) -> tools/prepare_multimodal.py -> the printed training
command for 3 steps -> the printed evaluation command on the held-out shards.

The tool runs once for the module (in this process); training and evaluation run as the
printed commands in subprocesses. Measured on 2 cores shared with other jobs (load 5): 51 s
wall, 29 s CPU for the file, 36 s of it the 3-step run and the evaluation (mostly imports).
"""

import contextlib
import importlib.util
import io
import json
import math
import os
import shlex
import subprocess
import sys

import numpy as np
import pytest
import soundfile
from PIL import Image, ImageDraw

from conftest import ROOT

from megatron_mm.config import ConfigError, Hardware, load_config, validate
from megatron_mm.data.multimodal.text import TextFormatter
from megatron_mm.data.tokenizer import (
    MULTIMODAL_SPECIAL_TOKENS, SentencePieceTokenizer, extend_sentencepiece, train_sentencepiece,
)



def load_tool(name: str):
    spec = importlib.util.spec_from_file_location(f"{name}_tool", os.path.join(ROOT, "tools", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


evaluate_tool, prepare_multimodal = load_tool("evaluate"), load_tool("prepare_multimodal")

SAMPLE_RATE = 16000
CONFIG = os.path.join(ROOT, "configs", "quickstart.yaml")
COLOURS = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (50, 70, 230)}
BAD_ROW = '{"conversations": [{"role": "user", "content": "hi"}, {"role": "robot", "content": "beep"}]}'


def write_media(folder) -> dict:
    """A few PNG/JPEG squares and WAV/FLAC tones; name -> path relative to `folder`."""
    os.makedirs(folder / "media", exist_ok=True)
    paths = {}
    for i, (name, rgb) in enumerate(COLOURS.items()):
        image = Image.new("RGB", (32, 32), (10, 10, 10))
        ImageDraw.Draw(image).rectangle([8, 8, 24, 24], fill=rgb)
        ext = "png" if i % 2 == 0 else "jpg"
        image.save(folder / "media" / f"{name}.{ext}")
        paths[name] = f"media/{name}.{ext}"
    t = np.arange(int(0.5 * SAMPLE_RATE)) / SAMPLE_RATE
    for i, (name, hz) in enumerate((("low", 220.0), ("high", 880.0))):
        ext = "wav" if i == 0 else "flac"
        soundfile.write(folder / "media" / f"{name}.{ext}", 0.3 * np.sin(2 * np.pi * hz * t), SAMPLE_RATE)
        paths[name] = f"media/{name}.{ext}"
    return paths


def dialect_turns(dialect: str, question: str, answer: str, system: str = None) -> list:
    if dialect == "role":
        turns = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        return ([{"role": "system", "content": system}] if system else []) + turns
    user, assistant = ("human", "gpt") if dialect == "sharegpt" else ("user", "assistant")
    turns = [{"from": user, "value": question}, {"from": assistant, "value": answer}]
    return ([{"from": "system", "value": system}] if system else []) + turns


def train_rows(media: dict) -> list[str]:
    rows = []
    for colour in COLOURS:
        rows.append({"text": f"<image> a {colour} square in the middle.", "image": media[colour],
                     "metadata": {"source": "laion", "quality_score": 0.85}})
        rows.append({"text": f"a {colour} square.", "image": media[colour]})  # no placeholder: image first
    for pitch in ("low", "high"):
        rows.append({"text": f"<audio> a {pitch} tone.", "audio": media[pitch]})
        rows.append({"text": f"<image> a red square. <audio> a {pitch} tone.", "image": media["red"],
                     "audio": media[pitch]})
    for i in range(4):
        rows.append({"text": f"plain text number {i}: the quick brown fox jumps over the lazy dog."})
    for dialect in ("sharegpt", "user_assistant", "role"):
        for colour in COLOURS:
            rows.append({"conversations": dialect_turns(dialect, "<image>\nWhat colour is the square?",
                                                        f"{colour}.", system="Answer in one word."
                                                        if dialect == "role" else None),
                         "image": media[colour], "id": f"{dialect}-{colour}"})
        for pitch in ("low", "high"):
            rows.append({"conversations": dialect_turns(dialect, "<audio>\nIs this sound low or high?", f"{pitch}."),
                         "audio": media[pitch]})
    rows.append({"text": "<image> 图片中间有一个红色的正方形。", "image": media["red"],
                 "metadata": {"source": "wukong", "lang": "zh"}})
    rows.append({"conversations": [{"role": "system", "content": "你是一个乐于助人的助手。"},
                                   {"role": "user", "content": "<audio>\n这个声音是高还是低？"},
                                   {"role": "assistant", "content": "高。"}], "audio": media["high"]})
    lines = [json.dumps(row, ensure_ascii=False) for row in rows]
    lines.insert(7, BAD_ROW)  # row 8
    return lines


def heldout_rows(media: dict) -> list[str]:
    rows = [{"text": f"<image> a {colour} square in the middle.", "image": media[colour]} for colour in COLOURS]
    rows += [{"conversations": dialect_turns("role", "<audio>\nIs this sound low or high?", f"{pitch}."),
              "audio": media[pitch]} for pitch in ("low", "high")]
    return [json.dumps(row) for row in rows]


def run_tool(main, argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("own-data")
    media = write_media(root / "raw")
    (root / "raw" / "train.jsonl").write_text("\n".join(train_rows(media)) + "\n", encoding="utf-8")
    (root / "raw" / "held.jsonl").write_text("\n".join(heldout_rows(media)) + "\n", encoding="utf-8")
    code, out, err = run_tool(prepare_multimodal.main, [
        "--jsonl", str(root / "raw" / "train.jsonl"), "--heldout", str(root / "raw" / "held.jsonl"),
        "--out", str(root / "prepared"), "--run-dir", str(root / "run"),
        "--set", "data.loader=torch", "--set", f"data.cache_dir={root / 'cache'}"])
    assert code == 0, err
    return {"root": root, "out": out, "err": err, "summary": json.loads(out.strip().splitlines()[-1])}


def test_prepare_reports_the_bad_row_and_writes_shards_and_tokenizer(prepared):
    summary, err = prepared["summary"], prepared["err"]
    bad_lines = [line for line in err.splitlines() if ": row " in line]
    assert len(bad_lines) == 1 and bad_lines[0].endswith(
        "train.jsonl: row 8: conversations[1].role: unknown role 'robot' (human, user, gpt, assistant or system)")
    assert summary["train"]["bad"] == 1 and summary["train"]["written"] == summary["train"]["rows"] - 1 == 31
    assert summary["heldout"] == {**summary["heldout"], "written": 5, "bad": 0}
    assert summary["tokenizer_source"] == "trained" and summary["vocab_size"] <= 512
    tokenizer = SentencePieceTokenizer(summary["tokenizer"])
    assert list(tokenizer.special_ids) == list(MULTIMODAL_SPECIAL_TOKENS) and tokenizer.pad >= 0
    chinese = tokenizer.tokenize("图片中间有一个红色的正方形。")
    assert 0 not in chinese and tokenizer.detokenize(chinese) == "图片中间有一个红色的正方形。"
    # the commands are printed on their own lines too, and name the files
    assert f"  {summary['commands']['train']}" in prepared["out"].splitlines()
    assert f"data.tokenizer={summary['tokenizer']}" in summary["commands"]["train"]


def test_conversation_dialects_format_alike_and_system_turn_is_context(prepared):
    tokenizer = SentencePieceTokenizer(prepared["summary"]["tokenizer"])
    formatter = TextFormatter(tokenizer, 16, 12)
    question, answer = "<image>\nWhat colour is the square?", "red."
    formatted = [formatter.format({"conversations": dialect_turns(d, question, answer)}, ["image"])
                 for d in ("sharegpt", "user_assistant", "role")]
    for other in formatted[1:]:
        assert other.tokens.tolist() == formatted[0].tokens.tolist()
        assert other.loss_mask.tolist() == formatted[0].loss_mask.tolist()
    assert formatted[0].tokens[0] == tokenizer.special_token_id("<|user|>")  # human/gpt: as before
    system = formatter.format({"conversations": dialect_turns("role", question, answer, system="Be brief.")},
                              ["image"])
    head = tokenizer.tokenize("Be brief.") + [tokenizer.special_token_id("<|end|>")]
    assert system.tokens.tolist() == head + formatted[0].tokens.tolist()
    assert system.loss_mask.tolist() == [0.0] * len(head) + formatted[0].loss_mask.tolist()


def test_vocabulary_larger_than_the_model_is_refused_in_one_line(prepared, tmp_path):
    jsonl = prepared["root"] / "raw" / "train.jsonl"
    code, out, err = run_tool(prepare_multimodal.main, ["--jsonl", str(jsonl), "--out", str(tmp_path / "big"),
                                                        "--vocab-size", "1000"])
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1
    assert "--vocab-size=1000: must be between 1 and model.vocab_size=512" in err
    assert not (tmp_path / "big").exists()


def test_an_existing_tokenizer_is_extended_with_the_missing_pieces(prepared, tmp_path):
    plain = train_sentencepiece(["a red square and a low tone"] * 30, str(tmp_path / "plain"), 60)
    jsonl = prepared["root"] / "raw" / "held.jsonl"
    code, out, err = run_tool(prepare_multimodal.main, ["--jsonl", str(jsonl), "--out", str(tmp_path / "ext"),
                                                        "--tokenizer", plain])
    assert code == 0, err
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["tokenizer_source"] == "extended" and summary["added_pieces"] == list(MULTIMODAL_SPECIAL_TOKENS)
    old, new = SentencePieceTokenizer(plain), SentencePieceTokenizer(summary["tokenizer"])
    assert new.vocab_size == old.vocab_size + 5 and new.tokenize("a red square") == old.tokenize("a red square")
    assert extend_sentencepiece(summary["tokenizer"], str(tmp_path / "again.model")) == []
    # larger than the model: refused before any shard is written
    code, out, err = run_tool(prepare_multimodal.main, ["--jsonl", str(jsonl), "--out", str(tmp_path / "small"),
                                                        "--tokenizer", plain, "--set", "model.vocab_size=32"])
    assert code == 2 and "more than model.vocab_size=32" in err and not (tmp_path / "small" / "train").exists()


def test_eval_shards_are_validated(prepared):
    summary = prepared["summary"]
    base = ["data.source=shards", f"data.shards={summary['train']['out']}", f"data.tokenizer={summary['tokenizer']}"]
    validate(load_config(CONFIG, base + [f"data.eval_shards={summary['heldout']['out']}"]), 1, Hardware())
    with pytest.raises(ConfigError, match=r"data.eval_shards\[0\]=/nonexistent: has no .tar shards"):
        validate(load_config(CONFIG, base + ["data.eval_shards=/nonexistent"]), 1, Hardware())
    with pytest.raises(ConfigError, match="data.eval_shards=.*: is for data.source=shards"):
        validate(load_config(CONFIG, [f"data.eval_shards={summary['heldout']['out']}"]), 1, Hardware())


def run_printed(command: str, extra: list[str]) -> subprocess.CompletedProcess:
    argv = shlex.split(command)
    assert argv[0] == "python"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable] + argv[1:] + extra, capture_output=True, text=True, timeout=300,
                          cwd=ROOT, env=env)
    assert proc.returncode == 0, f"{command} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc


def test_three_step_run_and_evaluation_with_the_printed_commands(prepared):
    commands, root = prepared["summary"]["commands"], prepared["root"]
    run_printed(commands["train"], ["--set", "train.steps=3", "--set", "train.scheduler.warmup_steps=1",
                                    "--set", "train.global_batch_size=2", "--set", "logging.interval=1",
                                    "--set", "logging.tensorboard=false"])
    with open(root / "run" / "metrics.jsonl") as f:
        metrics = [json.loads(line) for line in f]
    assert [m["step"] for m in metrics] == [1, 2, 3] and all(math.isfinite(m["loss"]) for m in metrics)
    assert metrics[-1]["data_skipped"] == 0  # every dialect reads in training too

    proc = run_printed(commands["evaluate"], ["--max-samples", "20"])
    lines = proc.stdout.strip().splitlines()
    result = json.loads(lines[-1])
    assert result["iteration"] == 3 and list(result) == ["iteration", "heldout"]
    heldout = result["heldout"]
    assert heldout["samples"] == 5 and heldout["skipped"] == 0 and heldout["tokens"] > 0
    assert math.isfinite(heldout["loss"]) and 0 < heldout["loss"] < 20
    header = next(i for i, line in enumerate(lines) if line.startswith("split"))
    assert lines[header].split() == ["split", "samples", "tokens", "skipped", "loss"]
    assert lines[header + 1].split() == ["heldout", "5", str(heldout["tokens"]), "0", f"{heldout['loss']:.3f}"]


def test_evaluate_json_flag_prints_only_the_json_line(monkeypatch, capsys):
    from megatron_mm.training import evaluate as evaluation

    result = {"iteration": 7, "heldout": {"loss": 1.5, "samples": 4, "tokens": 40, "skipped": 0}}
    monkeypatch.setattr(evaluation, "evaluate", lambda cfg, max_samples: result)
    assert evaluate_tool.main(["--config", CONFIG, "--json"]) == 0
    assert capsys.readouterr().out.splitlines() == [json.dumps(result)]
    assert evaluate_tool.main(["--config", CONFIG]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1] == json.dumps(result) and lines[0] == "checkpoint iteration 7"
    assert lines[2].split() == ["heldout", "4", "40", "0", "1.500"]


def test_evaluation_table_for_the_demo_set():
    from megatron_mm.training.evaluate import evaluation_table

    split = {"loss": 0.0912, "samples": 400, "shape_accuracy": 0.875, "colour_accuracy": 1.0,
             "pitch_accuracy": None, "sound_accuracy": 1.0}
    lines = evaluation_table({"iteration": 1200, "heldout": split, "novel": dict(split, loss=0.45)}).splitlines()
    assert lines[0] == "checkpoint iteration 1200"
    assert lines[1].split("  ")[0] == "split" and lines[1].endswith("tone or chord   loss")
    assert lines[2].split() == ["heldout", "400", "0.88", "1.00", "-", "1.00", "0.091"]
    assert lines[4].split() == ["chance", "0.25", "0.25", "0.33", "0.50"]
    assert len({len(line) for line in lines[1:4]}) == 1  # aligned columns
