"""Reading the pickled parts of a torch_dist checkpoint without running code from them.

A checkpoint folder may come from a stranger, and three of its parts are pickles:
`.metadata` (torch.distributed.checkpoint's `Metadata`, which DCP's `FileSystemReader`
reads with a plain `pickle.load`), `common.pt` (megatron-core's non-sharded state,
`torch.save`d) and the `ShardedObject`s inside the `.distcp` files (here the per-rank RNG
states, which DCP's `DefaultLoadPlanner.load_bytes` reads with `torch.load(weights_only=False)`).
Any of them could name `os.system` and run it on load.

`read_checkpoint_pickles(folder)` reads all three without executing anything a checkpoint does
not need: `.metadata` through `MetadataUnpickler` (an allow-list of DCP's metadata classes,
`torch.Size` and torch dtypes), `common.pt` and every object through `torch.load(weights_only=True)`
(plus `SAFE_GLOBALS`: none are needed by megatron-core 0.16.1's text/multimodal checkpoints,
measured). A folder that needs more is refused with one line (`PickleRefused`). Both the
converters (`conversion/dcp.py`) and the training loader (`checkpoint.py`) call it first;
megatron-core then re-reads bytes that passed, under `weights_only_torch_loads()`, which forces
torch's weights-only loader on its `torch.load` calls as well. No megatron-core import here.
"""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import warnings
from typing import Iterator

import torch
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata

METADATA = ".metadata"
COMMON = "common.pt"

# Everything megatron-core's torch_dist writer (and ours, conversion/dcp.py) puts into `.metadata`
# (torch 2.13): the classes below, torch.Size, dtypes (`torch.float32`) and layouts (by name).
_METADATA_CLASSES = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
        "TensorProperties", "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING",
    },
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo", "_StoragePrefix"},
    "torch.distributed.checkpoint.planner": {
        "SavePlan", "WriteItem", "WriteItemType", "TensorWriteData", "BytesIOWriteData",
    },
    "torch.serialization": {"_get_layout"},  # a torch.layout by its name (a dict lookup)
    "torch": {"Size"},
    "collections": {"OrderedDict"},
    "pathlib": {"PosixPath", "PurePosixPath"},  # StorageMeta.checkpoint_id may be a path
}

# Extra globals `common.pt` and the sharded objects may hold beyond torch's weights-only
# defaults (tensors, dicts, lists, numbers, strings). None are needed today.
SAFE_GLOBALS: list = []


class PickleRefused(ValueError):
    """A pickled part of a checkpoint that is corrupt or would build objects a checkpoint never
    holds; nothing in it was run. The message is one line naming the file and why."""


class MetadataUnpickler(pickle.Unpickler):
    """`pickle.Unpickler` that resolves only DCP's metadata classes (and torch dtypes); any other
    global (a function to call, a class to build) is refused before it is looked up."""

    def find_class(self, module: str, name: str):
        if name in _METADATA_CLASSES.get(module, ()):
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise PickleRefused(f"{METADATA} refers to {module}.{name}, which is not part of a checkpoint's "
                            "metadata: refused, nothing in it was run")

    def persistent_load(self, pid):
        raise PickleRefused(f"{METADATA} holds a persistent reference, which checkpoint metadata never does: "
                            "refused, nothing in it was run")


def read_dcp_metadata(folder: str) -> Metadata:
    """The `.metadata` of iteration folder `folder`, read through `MetadataUnpickler`."""
    path = os.path.join(folder, METADATA)
    if not os.path.exists(path):
        raise PickleRefused(f"{METADATA} missing (not a complete distributed checkpoint)")
    try:
        with open(path, "rb") as f:
            metadata = MetadataUnpickler(f).load()
    except PickleRefused:
        raise
    except Exception as err:  # truncated, not a pickle, a refused attribute of an allowed class
        raise PickleRefused(f"{METADATA} is corrupt ({_first_line(err)})") from None
    if not isinstance(metadata, Metadata) or not isinstance(metadata.storage_data, dict):
        raise PickleRefused(f"{METADATA} holds a {type(metadata).__name__}, not checkpoint metadata")
    for info in metadata.storage_data.values():  # DCP opens these names inside the folder
        name = getattr(info, "relative_path", None)
        if not isinstance(name, str) or name != os.path.basename(name) or name.startswith("."):
            raise PickleRefused(f"{METADATA} points outside its folder ({name!r}): refused")
    return metadata


def _torch_load(source, name: str):
    """torch.load(weights_only=True) of `source` (a path or bytes), refusals as PickleRefused."""
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's notice about legacy (non-zip) files
            return torch.load(source, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:  # the weights-only unpickler refused or could not parse it
        raise PickleRefused(f"{name} is corrupt or holds objects a checkpoint never needs "
                            f"(torch's weights-only loader: {_torch_reason(err)}): refused, nothing in it was run") from None
    except Exception as err:  # truncated zip, not a torch file at all
        raise PickleRefused(f"{name} is corrupt ({_first_line(err)})") from None


def load_common(folder: str) -> dict:
    """megatron-core's common state (`common.pt`) of `folder`, weights-only; {} when absent."""
    path = os.path.join(folder, COMMON)
    if not os.path.exists(path):
        return {}
    common = _torch_load(path, COMMON)
    if not isinstance(common, dict):
        raise PickleRefused(f"{COMMON} holds a {type(common).__name__}, not a checkpoint's common state")
    return common


def check_objects(folder: str, metadata: Metadata) -> None:
    """Every ShardedObject stored in the `.distcp` files loads weights-only (DCP's load planner,
    which megatron-core uses, unpickles them with `weights_only=False`)."""
    objects = {key for key, md in metadata.state_dict_metadata.items() if isinstance(md, BytesStorageMetadata)}
    for index, info in metadata.storage_data.items():
        if index.fqn in objects:
            key = index.fqn
            path = os.path.join(folder, info.relative_path)
            if not os.path.isfile(path) or os.path.getsize(path) < info.offset + info.length:
                continue  # a missing or short shard file: the completeness checks name it
            with open(path, "rb") as f:
                f.seek(info.offset)
                data = f.read(info.length)
            _torch_load(io.BytesIO(data), f"object {key} in {info.relative_path}")


def read_checkpoint_pickles(folder: str) -> tuple[Metadata, dict]:
    """(`.metadata`, `common.pt`) of iteration folder `folder`, after checking its objects too;
    raises PickleRefused (one line, without the folder) for anything that would need more."""
    common = load_common(folder)
    metadata = read_dcp_metadata(folder)
    check_objects(folder, metadata)
    return metadata, common


@contextlib.contextmanager
def weights_only_torch_loads() -> Iterator[None]:
    """Inside, every `torch.load` is weights-only (torch's TORCH_FORCE_WEIGHTS_ONLY_LOAD, read
    at each call), also where megatron-core or DCP pass `weights_only=False`."""
    previous = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            yield
    finally:
        if previous is None:
            del os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"]
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = previous


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _torch_reason(err: BaseException) -> str:
    """The informative line of torch's weights-only refusal (its message is a page long)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    for line in lines:
        if "GLOBAL" in line or "global" in line.split(":")[0] or line.startswith("Unsupported"):
            return line.rstrip(".")
    boilerplate = ("Weights only load failed", "Please file an issue", "Check the documentation")
    rest = [line for line in lines if not line.startswith(boilerplate)]
    return (rest[-1] if rest else _first_line(err)).rstrip(".")
