"""Loading DCP checkpoints without running code from them.

DCP's ``.metadata`` is a pickle and its non-tensor entries are read with ``torch.load(weights_only=False)``:
a crafted checkpoint could run any command on load. Here the metadata goes through an unpickler that only
knows DCP's own metadata classes, and every non-tensor entry through ``torch.load(weights_only=True)``.
Anything else is refused with ``UnsafeCheckpointError``.
"""

from __future__ import annotations

import io
import pickle
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, _EmptyStateDictLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import ReadItem

_ALLOWED_GLOBALS = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata",
        "BytesStorageMetadata",
        "ChunkStorageMetadata",
        "MetadataIndex",
        "StorageMeta",
        "TensorProperties",
        "TensorStorageMetadata",
        "_MEM_FORMAT_ENCODING",
    },
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.distributed.checkpoint.planner": {"LoadItemType", "WriteItemType"},
    "torch": {"Size"},
    "torch._utils": {"_get_layout"},
    "torch.serialization": {"_get_layout"},
    "pathlib": {"PosixPath", "PurePosixPath"},
    "collections": {"OrderedDict"},
}


class UnsafeCheckpointError(ValueError):
    """The checkpoint holds something that loading would have to execute."""


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if name in _ALLOWED_GLOBALS.get(module, ()):
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise UnsafeCheckpointError(f"checkpoint metadata refers to {module}.{name}, which ftrain does not load")


def read_metadata_safely(stream: io.BufferedIOBase) -> Metadata:
    try:
        metadata = _MetadataUnpickler(stream).load()
    except UnsafeCheckpointError:
        raise
    except Exception as exc:
        raise ValueError(f"checkpoint metadata is unreadable: {type(exc).__name__}: {exc}") from None
    if not isinstance(metadata, Metadata):
        raise UnsafeCheckpointError(f"checkpoint metadata is a {type(metadata).__name__}, not DCP metadata")
    return metadata


class SafeFileSystemReader(FileSystemReader):
    """``FileSystemReader`` whose metadata is read by the restricted unpickler."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as stream:
            metadata = read_metadata_safely(stream)
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class _SafeBytes:
    """Non-tensor entries are read with ``weights_only=True``: plain data and tensors only, never code."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        try:
            obj = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as exc:
            raise UnsafeCheckpointError(
                f"checkpoint entry {read_item.dest_index.fqn} needs code execution to load: {str(exc).splitlines()[0]}"
            ) from None
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


class SafeLoadPlanner(_SafeBytes, DefaultLoadPlanner):
    """Loads into a given state dict. Keys under ``optional_prefixes`` may be absent from the checkpoint (they
    keep the value they had); every other key must be there."""

    def __init__(self, optional_prefixes: tuple[str, ...] = ()) -> None:
        super().__init__()
        self.optional_prefixes = optional_prefixes

    def set_up_planner(self, state_dict: Any, metadata: Metadata | None = None, is_coordinator: bool = False) -> None:
        super().set_up_planner(state_dict, metadata, is_coordinator)
        if metadata is not None and self.optional_prefixes:
            for fqn in list(self.state_dict):
                if fqn.startswith(self.optional_prefixes) and fqn not in metadata.state_dict_metadata:
                    del self.state_dict[fqn]


class SafeWholeLoadPlanner(_SafeBytes, _EmptyStateDictLoadPlanner):
    """Loads everything a checkpoint holds into an empty dict (for tools: no model needed)."""
