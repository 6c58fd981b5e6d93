"""Streaming safetensors: write a shard tensor by tensor, read one tensor at a time.

The format (https://github.com/huggingface/safetensors): 8 bytes little-endian header length,
a JSON header `{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}`
padded with spaces to a multiple of 8, then the raw little-endian tensor bytes. Since the
header needs every shape before the first byte, `ShardWriter` takes the shard's plan (names,
shapes, dtypes) up front and then accepts the tensors in that order, writing each at once: a
shard never sits in memory. `ShardReader` reads one tensor with plain file reads (no mmap, so
the bytes read do not stay resident). Files written here load with `safetensors` and
`transformers`, and files they write read here.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Iterable, Optional

import torch

from megatron_mm.conversion.dcp import ConversionError

DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}
NAMES = {v: k for k, v in DTYPES.items()}
INDEX = "model.safetensors.index.json"


def nbytes(shape, dtype: torch.dtype) -> int:
    n = 1
    for s in shape:
        n *= s
    return n * torch.empty((), dtype=dtype).element_size()


class ShardWriter:
    """One `.safetensors` file whose tensors are announced in `plan` [(name, shape, dtype)]."""

    def __init__(self, path: str, plan: list[tuple[str, tuple, torch.dtype]], metadata: Optional[dict] = None):
        self.path, self.plan, self.next = path, plan, 0
        header: dict = {"__metadata__": {"format": "pt", **(metadata or {})}}
        offset = 0
        for name, shape, dtype in plan:
            size = nbytes(shape, dtype)
            header[name] = {"dtype": DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
            offset += size
        self.size = offset
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)
        self.handle = open(path, "wb")
        self.handle.write(struct.pack("<Q", len(text)))
        self.handle.write(text)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self.next >= len(self.plan):
            raise ConversionError(f"internal: {name} is not planned for {os.path.basename(self.path)}")
        want, shape, dtype = self.plan[self.next]
        if name != want or tuple(tensor.shape) != tuple(shape):
            raise ConversionError(f"internal: {os.path.basename(self.path)} expected {want} {tuple(shape)}, "
                                  f"got {name} {tuple(tensor.shape)}")
        data = tensor.detach().to(dtype).contiguous().cpu()
        if data.numel():
            self.handle.write(memoryview(data.view(-1).view(torch.uint8).numpy()))  # no copy
        self.next += 1

    def close(self) -> None:
        self.handle.close()
        if self.next != len(self.plan):
            raise ConversionError(f"internal: {os.path.basename(self.path)}: {len(self.plan) - self.next} "
                                  f"planned tensor(s) never written, e.g. {self.plan[self.next][0]}")


def write_index(folder: str, weight_map: dict[str, str], total_size: int) -> None:
    with open(os.path.join(folder, INDEX), "w") as f:
        json.dump({"metadata": {"total_size": total_size}, "weight_map": weight_map}, f, indent=2)


class ShardReader:
    """Header of one `.safetensors` file; `read(name)` loads one tensor."""

    def __init__(self, path: str):
        self.path = path
        try:
            with open(path, "rb") as f:
                (length,) = struct.unpack("<Q", f.read(8))
                if length > 100_000_000:
                    raise ValueError("header length out of range")
                self.header = json.loads(f.read(length))
        except (OSError, ValueError, struct.error) as err:
            raise ConversionError(f"{path}: not a readable safetensors file ({err})") from None
        self.data_start = 8 + length
        self.header.pop("__metadata__", None)
        size = os.path.getsize(path)
        for name, entry in self.header.items():
            if self.data_start + entry["data_offsets"][1] > size:
                raise ConversionError(f"{path}: truncated ({name} ends past the end of the file)")

    def keys(self) -> Iterable[str]:
        return self.header.keys()

    def shape(self, name: str) -> tuple:
        return tuple(self.header[name]["shape"])

    def dtype(self, name: str) -> torch.dtype:
        code = self.header[name]["dtype"]
        if code not in NAMES:
            raise ConversionError(f"{self.path}: {name} has dtype {code}, which the converter does not read")
        return NAMES[code]

    def read(self, name: str) -> torch.Tensor:
        entry = self.header[name]
        begin, end = entry["data_offsets"]
        out = torch.empty(entry["shape"], dtype=self.dtype(name))
        if end > begin:
            with open(self.path, "rb") as f:
                f.seek(self.data_start + begin)
                buffer = out.view(-1).view(torch.uint8).numpy()
                if f.readinto(memoryview(buffer)) != end - begin:
                    raise ConversionError(f"{self.path}: short read of {name}")
        return out


class HFFolderReader:
    """The tensors of a Hugging Face model folder (`model.safetensors` or an index + shards)."""

    def __init__(self, folder: str):
        self.folder = folder
        index = os.path.join(folder, INDEX)
        single = os.path.join(folder, "model.safetensors")
        if os.path.exists(index):
            weight_map = json.load(open(index))["weight_map"]
            files: dict[str, list[str]] = {}
            for name, file in weight_map.items():
                files.setdefault(file, []).append(name)
            for file, names in sorted(files.items()):
                if not os.path.exists(os.path.join(folder, file)):
                    raise ConversionError(f"{folder}: shard {file} is missing ({INDEX} names it for "
                                          f"{len(names)} tensor(s), e.g. {names[0]})")
        elif os.path.exists(single):
            files = {"model.safetensors": None}
        else:
            raise ConversionError(f"{folder}: no model.safetensors or {INDEX}")
        self.readers = {file: ShardReader(os.path.join(folder, file)) for file in files}
        self.where: dict[str, str] = {}
        for file, reader in self.readers.items():
            for name in reader.keys():
                self.where[name] = file
        if os.path.exists(index):
            for name, file in weight_map.items():
                if name not in self.readers[file].header:
                    raise ConversionError(f"{folder}: {INDEX} puts {name} in {file}, which does not hold it")

    def keys(self) -> list[str]:
        return list(self.where)

    def shape(self, name: str) -> tuple:
        return self.readers[self.where[name]].shape(name)

    def dtype(self, name: str) -> torch.dtype:
        return self.readers[self.where[name]].dtype(name)

    def file_of(self, name: str) -> str:
        return self.where[name]

    def read(self, name: str) -> torch.Tensor:
        if name not in self.where:
            raise ConversionError(f"{self.folder}: tensor {name} is missing")
        return self.readers[self.where[name]].read(name)
