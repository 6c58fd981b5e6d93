"""The catalogue of a set of WebDataset shards: every sample's key and member offsets.

Both media loaders number samples from this catalogue, so they agree on the sample list,
its order, the data-parallel split and the resume position (`plan.py`); it is also what
DALI's `fn.readers.webdataset` needs as index files (`write_dali_index`).

Why not DALI's `wds2idx`: it stops at a truncated tar and cannot mark bad samples. Here
one pass with Python's `tarfile` records, per sample, its members and the first problem
that makes it unreadable, checked on the CPU before any decoder sees it:
  * a truncated tar (the sample that was being read when the archive ended),
  * no `json` member, or two members of one kind (`jpg` and `png`),
  * an image that does not start like a JPEG/PNG, audio that does not start like WAV/FLAC
    (a few header bytes: garbage with a `.jpg` name would otherwise fail a whole DALI batch).
Members are grouped into samples as DALI and `webdataset` do: consecutive files with the
same name up to the first dot of the base name. The scan of a tar is cached in
`cache_dir`, keyed by the tar's absolute path, size and modification time.
"""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
import tempfile
from dataclasses import dataclass, field
from typing import Optional

from megatron_mm.config import shard_files

INDEX_VERSION = 1  # bump when the cached scan's content changes
IMAGE_EXTS = ("jpg", "png")
AUDIO_EXTS = ("wav", "flac")
# First bytes of each accepted format (a .png holding a JPEG is fine: decoders sniff).
_IMAGE_MAGIC = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n")
_HEADER_BYTES = 12


@dataclass
class SampleEntry:
    """One sample of a shard: its members as {ext: (data offset, size)} and why it cannot be read."""

    shard: str
    key: str
    members: dict = field(default_factory=dict)
    problem: Optional[str] = None

    @property
    def image_ext(self) -> Optional[str]:
        return next((e for e in IMAGE_EXTS if e in self.members), None)

    @property
    def audio_ext(self) -> Optional[str]:
        return next((e for e in AUDIO_EXTS if e in self.members), None)


def resolve_shards(spec: str) -> list[str]:
    """The sorted `.tar` files of a folder or a glob; ValueError when there are none."""
    paths = shard_files(spec)
    if not paths:
        raise ValueError(f"data.shards={spec}: no .tar shards found")
    return paths


def split_name(name: str) -> tuple[str, str]:
    """(key, ext) of a member name: split at the first dot of its base name."""
    dot = name.find(".", name.rfind("/") + 1)
    return (name, "") if dot < 0 else (name[:dot], name[dot + 1:])


def _header_problem(ext: str, head: bytes) -> Optional[str]:
    if ext in IMAGE_EXTS and not head.startswith(_IMAGE_MAGIC):
        return f"{ext} member is not a JPEG or PNG (starts with {head[:8]!r})"
    if ext == "wav" and not (head[:4] == b"RIFF" and head[8:12] == b"WAVE"):
        return f"wav member is not a RIFF/WAVE file (starts with {head[:12]!r})"
    if ext == "flac" and not head.startswith(b"fLaC"):
        return f"flac member is not a FLAC file (starts with {head[:4]!r})"
    return None


def _finish(entry: SampleEntry) -> None:
    """Set the problems that are only known once all members of a sample are in."""
    if entry.problem is None and "json" not in entry.members:
        entry.problem = "no json member"


def scan_tar(path: str) -> list[SampleEntry]:
    """Every sample of one tar in stored order, each with its members and first problem."""
    entries: list[SampleEntry] = []
    size = os.path.getsize(path)
    with open(path, "rb") as raw, tarfile.open(fileobj=raw, mode="r:") as archive:
        try:
            for member in archive:
                if not member.isreg():
                    continue
                key, ext = split_name(member.name)
                if not key or key.startswith(".") or "/." in key:  # hidden: DALI skips these
                    continue
                if not entries or entries[-1].key != key:
                    if entries:
                        _finish(entries[-1])
                    entries.append(SampleEntry(path, key))
                entry = entries[-1]
                if entry.problem:
                    continue
                if member.offset_data + member.size > size:
                    entry.problem = f"truncated tar ({member.name} ends past the end of the file)"
                elif ext in entry.members:
                    entry.problem = f"duplicate member {member.name}"
                elif ext in IMAGE_EXTS and entry.image_ext or ext in AUDIO_EXTS and entry.audio_ext:
                    entry.problem = f"more than one {'image' if ext in IMAGE_EXTS else 'audio'} member"
                else:
                    raw.seek(member.offset_data)
                    entry.problem = _header_problem(ext, raw.read(min(member.size, _HEADER_BYTES)))
                    entry.members[ext] = (member.offset_data, member.size)
        except tarfile.ReadError as err:  # the archive ends inside a header
            if entries and entries[-1].problem is None:
                entries[-1].problem = f"truncated tar ({err})"
    if entries:
        _finish(entries[-1])
    return entries


def _cache_path(path: str, cache_dir: str) -> str:
    stat = os.stat(path)
    ident = json.dumps([INDEX_VERSION, path, stat.st_size, stat.st_mtime_ns])
    name = f"{os.path.basename(path)}-{hashlib.sha256(ident.encode()).hexdigest()[:16]}.json"
    return os.path.join(os.path.expanduser(cache_dir), "shard-index", name)


def load_catalogue(paths: list[str], cache_dir: str) -> list[list[SampleEntry]]:
    """`scan_tar` of each path, read from / written to the cache (atomically, safe across ranks)."""
    catalogue = []
    for path in paths:
        cached = _cache_path(path, cache_dir)
        if os.path.isfile(cached):
            with open(cached) as f:
                rows = json.load(f)
            entries = [SampleEntry(path, key, {e: tuple(v) for e, v in members.items()}, problem)
                       for key, members, problem in rows]
        else:
            entries = scan_tar(path)
            os.makedirs(os.path.dirname(cached), exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=os.path.dirname(cached), suffix=".tmp")
            with os.fdopen(fd, "w") as f:
                json.dump([[e.key, e.members, e.problem] for e in entries], f)
            os.replace(tmp, cached)
        catalogue.append(entries)
    return catalogue


def write_dali_index(entries: list[SampleEntry], path: str) -> None:
    """A `fn.readers.webdataset` index (format v1.2, as DALI's wds2idx writes) for `entries`,
    which must all come from one tar and have no problem."""
    with open(path, "w") as f:
        f.write(f"v1.2 {len(entries)}\n")
        for entry in entries:
            assert entry.problem is None, entry
            f.write(" ".join(f"{ext} {offset} {size} {entry.key}.{ext}"
                             for ext, (offset, size) in sorted(entry.members.items(), key=lambda m: m[1][0])))
            f.write("\n")
