"""Reading and writing megatron-core `torch_dist` checkpoints without a process group.

megatron-core's `dist_checkpointing` (torch_dist backend) stores a PyTorch Distributed
Checkpoint (DCP): `.metadata` (a pickled `torch.distributed.checkpoint.Metadata`: every key's
global shape, dtype and saved chunks, and where each chunk's bytes lie), `__R_I.distcp` files
(each chunk `torch.save`d at an offset), plus megatron's `metadata.json` (backend name) and
`common.pt` (the non-sharded state: iteration, config, layout). The pickled parts are read
through `training/checkpoint_pickles.py`, which runs no code from them.

Keys are global parameter names (`decoder.layers.3.mlp.router.weight`) with global shapes,
whatever TP/PP/EP/VPP layout saved them, so reading a key here gives the full tensor in any
layout. `DistCheckpointReader.read` asks DCP's own `FileSystemReader` for exactly the chunks
that overlap one tensor (or one expert of it), so memory stays at what one read needs.

`DistCheckpointWriter` writes the same format chunk by chunk (the caller splits tensors the
way the ranks of a layout would hold them, see `from_hf.Layout`), plus megatron's
`metadata.json` and `common.pt`, so megatron-core loads (and reshards) it like one it wrote.
"""

from __future__ import annotations

import io
import json
import os
import pickle
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import LoadPlan, LoadPlanner, ReadItem
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from megatron_mm.training.checkpoint_files import TRACKER, tracked_iteration
from megatron_mm.training.checkpoint_pickles import PickleRefused, read_checkpoint_pickles

MEGATRON_METADATA = {
    "sharded_backend": "torch_dist", "sharded_backend_version": 1,
    "common_backend": "torch", "common_backend_version": 1,
}


class ConversionError(RuntimeError):
    """A checkpoint or HF folder that cannot be converted; the message is one line."""


def is_model_key(key: str) -> bool:
    """Model weights, as opposed to optimizer state, RNG states and `_extra_state` objects."""
    return not (key.startswith("optimizer") or key.startswith("chained_") or key.startswith("rng_state")
                or "._extra_state" in key)


def resolve_iteration_folder(path: str) -> str:
    """`path` is an `iter_*` folder or a checkpoints folder (its latest iteration)."""
    def fail(reason: str) -> ConversionError:
        return ConversionError(f"checkpoint {path}: {reason}")

    tracked = tracked_iteration(path, fail)
    if tracked:
        return tracked[0]
    if os.path.exists(os.path.join(path, ".metadata")) or os.path.exists(os.path.join(path, "metadata.json")):
        return path
    raise fail(f"no checkpoint here (neither {TRACKER} nor an iteration folder)")


class _SliceLoadPlanner(LoadPlanner):
    """Loads the requested chunk of one tensor into `dest` (DCP resolves the overlap)."""

    def __init__(self, items: list[ReadItem], dest: torch.Tensor):
        self.items, self.dest = items, dest

    def set_up_planner(self, state_dict, metadata=None, is_coordinator=False):
        pass

    def create_local_plan(self) -> LoadPlan:
        return LoadPlan(self.items)

    def create_global_plan(self, plans):
        return plans

    def finish_plan(self, plan):
        return plan

    def load_bytes(self, read_item, value):
        raise AssertionError("only tensors are read this way")

    def resolve_tensor(self, read_item: ReadItem) -> torch.Tensor:
        out = self.dest
        for dim, (offset, length) in enumerate(zip(read_item.dest_offsets, read_item.lengths)):
            out = out.narrow(dim, offset, length)
        return out

    def commit_tensor(self, read_item, tensor):
        pass


class DistCheckpointReader:
    """One iteration of a megatron-core torch_dist checkpoint, read key by key."""

    def __init__(self, path: str):
        self.folder = resolve_iteration_folder(path)
        meta_json = os.path.join(self.folder, "metadata.json")
        if os.path.exists(meta_json):
            backend = json.load(open(meta_json)).get("sharded_backend")
            if backend != "torch_dist":
                raise ConversionError(f"checkpoint {self.folder}: sharded backend {backend!r}; only torch_dist is read")
        try:  # never DCP's own read_metadata: a plain pickle.load
            self.metadata, self.common = read_checkpoint_pickles(self.folder)
        except PickleRefused as err:
            raise ConversionError(f"checkpoint {self.folder}: {err}") from None
        self.reader = FileSystemReader(self.folder)
        self.reader.set_up_storage_reader(self.metadata, is_coordinator=True)
        self._check_files()

    def _check_files(self) -> None:
        """Every `.distcp` file the metadata points into exists and is long enough."""
        needed: dict[str, tuple[int, str]] = {}
        for index, info in self.metadata.storage_data.items():
            end = info.offset + info.length
            if end > needed.get(info.relative_path, (0, ""))[0]:
                needed[info.relative_path] = (end, index.fqn)
        for name, (end, example) in sorted(needed.items()):
            path = os.path.join(self.folder, name)
            if not os.path.exists(path):
                raise ConversionError(f"checkpoint {self.folder}: shard file {name} is missing (it holds e.g. {example})")
            if os.path.getsize(path) < end:
                raise ConversionError(f"checkpoint {self.folder}: shard file {name} is truncated "
                                      f"({os.path.getsize(path)} bytes, needs {end})")

    def tensor_keys(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Model tensor keys with their global shapes and dtypes."""
        out = {}
        for key, md in self.metadata.state_dict_metadata.items():
            if isinstance(md, TensorStorageMetadata) and is_model_key(key):
                out[key] = (tuple(md.size), md.properties.dtype)
        return out

    def read(self, key: str, index: Optional[int] = None) -> torch.Tensor:
        """The full global tensor `key`, or with `index` its `index`-th slice along dim 0
        (one expert of a `[E, out, in]` expert weight)."""
        md = self.metadata.state_dict_metadata.get(key)
        if not isinstance(md, TensorStorageMetadata):
            raise ConversionError(f"checkpoint {self.folder}: no tensor {key!r}")
        size = list(md.size)
        offsets = [0] * len(size)
        if index is not None:
            offsets[0], size[0] = index, 1
        dest = torch.empty(size, dtype=md.properties.dtype)
        chunk = ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=torch.Size(size))
        items = create_read_items_for_chunk_list(key, md, [chunk])
        covered = sum(torch.Size(item.lengths).numel() for item in items)
        if covered != dest.numel():
            raise ConversionError(f"checkpoint {self.folder}: saved chunks of {key} cover {covered} of {dest.numel()} elements")
        planner = _SliceLoadPlanner(items, dest)
        plan = self.reader.prepare_local_plan(LoadPlan(items))
        self.reader.read_data(plan, planner).wait()
        return dest[0] if index is not None else dest


@dataclass
class _Pending:
    path: str
    handle: io.BufferedWriter


class DistCheckpointWriter:
    """Writes a torch_dist checkpoint one chunk at a time (`add_chunk`, `add_object`);
    `finish(common)` writes `.metadata`, megatron's `metadata.json` and `common.pt`."""

    def __init__(self, folder: str):
        self.folder = folder
        os.makedirs(folder, exist_ok=True)
        self.files: dict[int, _Pending] = {}
        self.state_dict_metadata: dict = {}
        self.storage_data: dict = {}

    def _file(self, rank: int) -> _Pending:
        if rank not in self.files:
            name = f"__{rank}_0.distcp"
            self.files[rank] = _Pending(name, open(os.path.join(self.folder, name), "wb"))
        return self.files[rank]

    def add_chunk(self, key: str, shape: Sequence[int], dtype: torch.dtype, offsets: Sequence[int],
                  part: torch.Tensor, rank: int = 0) -> None:
        """Store `part`, the chunk of global tensor `key` (`shape`, `dtype`) at `offsets`, in
        the file of `rank` (`__{rank}_0.distcp`, as megatron's writer names them). A key's
        chunks may come in any order and from any number of calls; `finish` checks that
        they cover it exactly."""
        md = self.state_dict_metadata.get(key)
        if md is None:
            md = self.state_dict_metadata[key] = TensorStorageMetadata(
                properties=TensorProperties(dtype=dtype), size=torch.Size(shape), chunks=[])
        elif tuple(md.size) != tuple(shape) or md.properties.dtype != dtype:
            raise ConversionError(f"internal: {key} announced as {tuple(md.size)} {md.properties.dtype}, "
                                  f"now {tuple(shape)} {dtype}")
        pending = self._file(rank)
        start = pending.handle.tell()
        part = part.detach().to(dtype).contiguous()
        if part.untyped_storage().nbytes() != part.numel() * part.element_size():
            part = part.clone()  # a view: torch.save would write its whole storage
        torch.save(part, pending.handle)
        self.storage_data[MetadataIndex(key, offsets)] = _storage_info(pending.path, start, pending.handle.tell() - start)
        md.chunks.append(ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=torch.Size(part.shape)))

    def add_object(self, key: str, obj, rank: int = 0) -> None:
        """A megatron ShardedObject (`key` already carries its `/shard_i_n` suffix)."""
        buffer = io.BytesIO()
        torch.save([obj], buffer)
        pending = self._file(rank)
        start = pending.handle.tell()
        pending.handle.write(buffer.getbuffer())
        self.storage_data[MetadataIndex(key)] = _storage_info(pending.path, start, pending.handle.tell() - start)
        self.state_dict_metadata[key] = BytesStorageMetadata()

    def finish(self, common: dict) -> None:
        for key, md in self.state_dict_metadata.items():
            if isinstance(md, TensorStorageMetadata):
                covered = sum(torch.Size(c.sizes).numel() for c in md.chunks)
                if covered != md.size.numel():
                    raise ConversionError(f"internal: chunks of {key} cover {covered} of {md.size.numel()} elements")
        for pending in self.files.values():
            pending.handle.close()
        metadata = Metadata(state_dict_metadata=self.state_dict_metadata, storage_data=self.storage_data,
                            storage_meta=StorageMeta(), version="1.0.0")
        with open(os.path.join(self.folder, ".metadata"), "wb") as f:
            pickle.dump(metadata, f)
        with open(os.path.join(self.folder, "metadata.json"), "w") as f:
            json.dump(MEGATRON_METADATA, f)
        torch.save(common, os.path.join(self.folder, "common.pt"))


def _storage_info(path: str, offset: int, length: int):
    from torch.distributed.checkpoint.filesystem import _StorageInfo  # DCP's record of where bytes lie

    return _StorageInfo(relative_path=path, offset=offset, length=length)
