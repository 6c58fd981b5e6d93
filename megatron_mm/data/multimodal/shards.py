"""Seed JSONL -> WebDataset shards, one validated row at a time.

A row is pretraining `{"text", "image"?, "audio"?}` or instruction
`{"conversations": [turn, ...], "image"?, "audio"?}`, a turn in any dialect of
`conversations.py` (`{"from": "human"|"gpt"|"user"|"assistant", "value"}` or
`{"role": "user"|"assistant", "content"}`, optionally opened by a system turn); media
paths are relative to the JSONL file's folder, or absolute; other fields (e.g. "label",
"task", "metadata") are kept, and the turns are stored in the row's own dialect. Each good row becomes one sample written with `webdataset.ShardWriter`:
`__key__` (the row's line number, zero-padded to 9 digits, so a sample the loader skips
points back at its line), `json` (the row without its media paths) and the media file's
bytes unchanged as `jpg`/`png` and `wav`/`flac` (the extension follows the decoded format,
not the file name). Shards are `shard-000000.tar`, ... with mtime 0, so the same JSONL
gives byte-identical shards.

A bad row is reported as `row N: field: reason` and not written: JSON that does not
parse, no or empty text, an unknown role or a conversation `conversation_turns` refuses, a placeholder without its media (or more than
one of a kind), a media file that is missing or does not decode (PIL open + verify + load
for images, soundfile reading every frame for audio), or that has no audio frames.
"""

from __future__ import annotations

import glob
import io
import json
import os
import time
from typing import Callable, Iterator, Optional

import soundfile
import webdataset
from PIL import Image

from megatron_mm.data.multimodal.conversations import TurnError, conversation_turns
from megatron_mm.data.tokenizer import AUDIO_TOKEN, IMAGE_TOKEN

IMAGE_FORMATS = {"JPEG": "jpg", "PNG": "png"}  # PIL format -> member extension
AUDIO_FORMATS = {"WAV": "wav", "FLAC": "flac"}  # soundfile format -> member extension
SHARD_PATTERN = "shard-%06d.tar"
MEDIA_FIELDS = ("image", "audio")


class RowError(ValueError):
    """One row that cannot become a sample: the field at fault and why."""

    def __init__(self, field: str, reason: str):
        self.field, self.reason = field, reason
        super().__init__(f"{field}: {reason}")


def _nonempty_string(value, field: str) -> str:
    if not isinstance(value, str):
        raise RowError(field, f"must be a string, got {type(value).__name__}")
    if not value.strip():
        raise RowError(field, "empty")
    return value


def _texts(row: dict) -> tuple[str, list[str]]:
    """(field name for placeholder errors, every text of the row), after checking them."""
    if "text" in row and "conversations" in row:
        raise RowError("text", 'the row has both "text" and "conversations" (one or the other)')
    if "text" in row:
        return "text", [_nonempty_string(row["text"], "text")]
    if "conversations" not in row:
        raise RowError("text", 'missing (a row needs "text" or "conversations")')
    try:
        turns = conversation_turns(row["conversations"])
    except TurnError as err:
        raise RowError(err.field, err.reason) from None
    values = [text for _, text in turns]
    return "conversations", values


def _check_placeholders(row: dict, field: str, texts: list[str]) -> None:
    for token, media in ((IMAGE_TOKEN, "image"), (AUDIO_TOKEN, "audio")):
        count = sum(text.count(token) for text in texts)
        if count > 1:
            raise RowError(field, f"{count} {token} placeholders (at most one a sample)")
        if count and media not in row:
            raise RowError(media, f"missing, but the text has {token}")


def _read_media(row: dict, field: str, folder: str) -> bytes:
    path = _nonempty_string(row[field], field)
    path = path if os.path.isabs(path) else os.path.join(folder, path)
    if not os.path.isfile(path):
        raise RowError(field, f"file not found: {path}")
    with open(path, "rb") as f:
        return f.read()


def image_extension(data: bytes) -> str:
    """`jpg` or `png` for bytes that decode as such an image; RowError otherwise."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.verify()  # checks structure/checksums; the image cannot be used after it
        with Image.open(io.BytesIO(data)) as image:
            image.load()  # decodes the pixels, which catches truncated data verify() misses
            image_format = image.format
    except Exception as err:  # PIL raises many types (OSError, SyntaxError, ValueError...)
        raise RowError("image", f"does not decode as an image ({type(err).__name__}: {err})") from None
    if image_format not in IMAGE_FORMATS:
        raise RowError("image", f"format {image_format} not supported (JPEG or PNG)")
    return IMAGE_FORMATS[image_format]


def audio_extension(data: bytes) -> str:
    """`wav` or `flac` for bytes that decode as audio with at least one frame; RowError otherwise."""
    try:
        with soundfile.SoundFile(io.BytesIO(data)) as audio:
            audio_format, frames = audio.format, audio.frames
            decoded = len(audio.read(dtype="int16"))
    except RuntimeError as err:  # soundfile.LibsndfileError is one
        raise RowError("audio", f"not a readable WAV/FLAC file ({err})") from None
    if audio_format not in AUDIO_FORMATS:
        raise RowError("audio", f"format {audio_format} not supported (WAV or FLAC)")
    if frames == 0 or decoded == 0:
        raise RowError("audio", "has no audio frames")
    return AUDIO_FORMATS[audio_format]


def row_to_sample(line: str, row_number: int, folder: str) -> dict:
    """The WebDataset sample for one JSONL line, or RowError."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        raise RowError("json", f"not valid JSON ({err.msg} at column {err.colno})") from None
    if not isinstance(row, dict):
        raise RowError("json", f"expected an object, got {type(row).__name__}")
    field, texts = _texts(row)
    _check_placeholders(row, field, texts)
    sample = {"__key__": f"{row_number:09d}"}
    if "image" in row:
        data = _read_media(row, "image", folder)
        sample[image_extension(data)] = data
    if "audio" in row:
        data = _read_media(row, "audio", folder)
        sample[audio_extension(data)] = data
    meta = {k: v for k, v in row.items() if k not in MEDIA_FIELDS}
    sample["json"] = json.dumps(meta, ensure_ascii=False).encode("utf-8")
    return sample


def _numbered_lines(path: str) -> Iterator[tuple[int, str]]:
    """(line number, line) for the non-blank lines of a text file."""
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                yield number, line


def build_shards(jsonl: str, out: str, samples_per_shard: int = 1000,
                 report: Callable[[str], None] = print,
                 log: Callable[[str], None] = lambda message: None,
                 on_written: Optional[Callable[[dict], None]] = None) -> dict:
    """Validate every row of `jsonl` and write the good ones as shards into `out`.

    `report` gets one `row N: field: reason` line per bad row; `on_written`, if given, each
    written row (as stored: without its media paths). Returns the summary:
    rows (non-blank lines), written, bad, shards, out, seconds. `out` must hold no shards.
    """
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard={samples_per_shard}: must be at least 1")
    if not os.path.isfile(jsonl):
        raise ValueError(f"jsonl={jsonl}: file not found")
    if glob.glob(os.path.join(out, "shard-*.tar")):
        raise ValueError(f"out={out}: already holds shard-*.tar files; pick an empty folder")
    os.makedirs(out, exist_ok=True)
    start = time.perf_counter()
    folder = os.path.dirname(os.path.abspath(jsonl))
    writer: Optional[webdataset.ShardWriter] = None  # opened at the first good row: no empty shard
    rows = bad = shards = 0
    try:
        for number, line in _numbered_lines(jsonl):
            rows += 1
            try:
                sample = row_to_sample(line, number, folder)
            except RowError as err:
                bad += 1
                report(f"row {number}: {err}")
                continue
            if writer is None:
                writer = webdataset.ShardWriter(os.path.join(out, SHARD_PATTERN), maxcount=samples_per_shard,
                                                verbose=0, encoder=False, mtime=0)
            writer.write(sample)
            if on_written is not None:
                on_written(json.loads(sample["json"]))
            if rows % 1000 == 0:
                log(f"{rows} rows, {rows - bad} written, {bad} bad")
    finally:
        if writer is not None:
            shards = writer.shard  # shards opened so far (numbered from 0)
            writer.close()
    written = rows - bad
    return {"rows": rows, "written": written, "bad": bad, "shards": shards, "out": out,
            "seconds": round(time.perf_counter() - start, 3)}
