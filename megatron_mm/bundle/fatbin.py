"""Reduce the CUDA fat binaries of a shared library to the entries of chosen GPU architectures.

Hand-written because no library does it: NVIDIA's `nvprune` works on object files and static
libraries, not on a linked `.so`, and `cuobjdump` only lists and extracts. The format is
undocumented; the layout below is the one public fatbin readers use (and that `cuobjdump
--list-elf` agrees with on Transformer Engine's library, see results/te_bundle.md):

* The ELF section `.nv_fatbin` holds containers one after another (8-byte aligned, zero
  padding between). A container is a 16-byte header, `<I H H Q`: magic 0xBA55ED50, version 1,
  header size 16, then the byte size of the entries that follow it.
* An entry is a header of `header_size` bytes (64, or more on newer architectures), `<H H I Q`
  at its start: kind (1 PTX, 2 ELF cubin), a version, `header_size`, and the padded payload
  size; the SM architecture is the `uint32` at byte 28, and bit 20 of the `uint64` flags at
  byte 40 marks an architecture-specific build (sm_90a: arch 90 with that bit; cuobjdump
  names it so). The payload (often compressed)
  follows the header; the next entry starts at `header_size + payload size`.

The reduction keeps every container where it is: the host code registers each one by its
start address (`.nvFatBinSegment` holds pointers relocated to those addresses), so moving a
container would mean rewriting relocations. Instead, inside each container the wanted entries
are moved to the front, unchanged, the container's size field shrinks to them, and the bytes
freed behind them are zeroed. The library stays a valid ELF of the same layout; the zeros
compress away when the wheel is zipped again.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

MAGIC = 0xBA55ED50
CONTAINER = struct.Struct("<IHHQ")  # magic, version, header size, size of the entries
ENTRY = struct.Struct("<HHIQ")  # kind, version, header size, padded payload size
ARCH_OFFSET = 28  # uint32 SM architecture in the entry header (90 = sm_90 and sm_90a)
FLAGS_OFFSET = 40  # uint64 flags in the entry header
ARCH_SPECIFIC = 1 << 20  # the "a" of sm_90a
KINDS = {1: "ptx", 2: "elf"}


class FatbinError(ValueError):
    """The section does not hold the containers this module understands."""


@dataclass
class Entry:
    offset: int  # in the section, of the entry header
    length: int  # header + payload
    kind: str
    arch: int
    specific: bool  # sm_90a rather than sm_90

    @property
    def name(self) -> str:
        return f"sm_{self.arch}{'a' if self.specific else ''}"


@dataclass
class Container:
    offset: int  # in the section
    size: int  # 16-byte header + entries
    entries: list[Entry]


def elf_section(data: bytes | bytearray, name: str) -> tuple[int, int] | None:
    """(file offset, size) of the named section of a 64-bit little-endian ELF, or None."""
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise FatbinError("not a 64-bit little-endian ELF file")
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    headers = [struct.unpack_from("<IIQQQQ", data, shoff + i * shentsize) for i in range(shnum)]
    names_offset = headers[shstrndx][4]
    wanted = name.encode()
    for sh_name, sh_type, _flags, _addr, offset, size in headers:
        start = names_offset + sh_name
        if bytes(data[start:data.index(b"\0", start)]) == wanted:
            return (None if sh_type == 8 else offset), size  # SHT_NOBITS has no bytes in the file
    return None


def parse(section: bytes | bytearray) -> list[Container]:
    """Every container of a `.nv_fatbin` section, with its entries."""
    containers, pos = [], 0
    while pos < len(section):
        if pos + CONTAINER.size > len(section):
            break
        magic, _version, header_size, size = CONTAINER.unpack_from(section, pos)
        if magic != MAGIC:
            if any(section[pos:pos + 8]):
                raise FatbinError(f"offset {pos}: expected a fatbin container (magic {MAGIC:#x}), found {magic:#x}")
            pos += 8  # zero padding between containers
            continue
        end = pos + header_size + size
        if end > len(section):
            raise FatbinError(f"offset {pos}: container of {size} bytes runs past the section end")
        entries, at = [], pos + header_size
        while at < end:
            kind, _v, entry_header, payload = ENTRY.unpack_from(section, at)
            if entry_header < ENTRY.size or at + entry_header + payload > end:
                raise FatbinError(f"offset {at}: entry of header {entry_header} + {payload} bytes does not fit "
                                  "its container")
            arch, = struct.unpack_from("<I", section, at + ARCH_OFFSET)
            flags, = struct.unpack_from("<Q", section, at + FLAGS_OFFSET)
            entries.append(Entry(at, entry_header + payload, KINDS.get(kind, f"kind{kind}"), arch,
                                 bool(flags & ARCH_SPECIFIC)))
            at += entry_header + payload
        containers.append(Container(pos, end - pos, entries))
        pos = end
    return containers


def keep_only(section: bytearray, archs: set[int]) -> dict:
    """Reduce every container of `section` (in place) to its entries of `archs`; report counts.

    Refuses (FatbinError, section unchanged) when a container would be left with no entry:
    kernels of that container would then fail to load on every GPU."""
    containers = parse(section)
    empty = [c.offset for c in containers if not any(e.arch in archs for e in c.entries)]
    if empty:
        raise FatbinError(f"{len(empty)} of {len(containers)} containers hold no entry for sm_"
                          f"{'/'.join(map(str, sorted(archs)))} (first at section offset {empty[0]})")
    kept = dropped = 0
    for c in containers:
        header_size = CONTAINER.unpack_from(section, c.offset)[2]
        pieces = [bytes(section[e.offset:e.offset + e.length]) for e in c.entries if e.arch in archs]
        body = b"".join(pieces)
        start = c.offset + header_size
        section[start:c.offset + c.size] = body + bytes(c.size - header_size - len(body))
        struct.pack_into("<Q", section, c.offset + 8, len(body))
        kept += len(pieces)
        dropped += len(c.entries) - len(pieces)
    return {"containers": len(containers), "entries_kept": kept, "entries_dropped": dropped}


def listing(section: bytes | bytearray) -> dict[str, int]:
    """How many entries of each kind and architecture, e.g. {"elf sm_90": 89, "elf sm_90a": 1}."""
    counts: dict[str, int] = {}
    for c in parse(section):
        for e in c.entries:
            key = f"{e.kind} {e.name}"
            counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items()))


def reduce_library(path: str, archs: set[int]) -> dict:
    """Keep only `archs` in the `.nv_fatbin` of the shared library at `path` (rewritten in place)."""
    with open(path, "rb") as f:
        data = bytearray(f.read())
    found = elf_section(data, ".nv_fatbin")
    if found is None or found[0] is None:
        return {"containers": 0, "entries_kept": 0, "entries_dropped": 0}
    offset, size = found
    section = data[offset:offset + size]
    report = keep_only(section, archs)
    data[offset:offset + size] = section
    with open(path, "wb") as f:
        f.write(data)
    return report
