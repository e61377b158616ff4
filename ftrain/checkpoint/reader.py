"""Reading a checkpoint outside training, in one process: for tools, tests and comparisons."""

from __future__ import annotations

from typing import Any

import torch

from ftrain._torch_compat import load_state_dict_in_place
from ftrain.checkpoint import integrity, layout
from ftrain.checkpoint.safe_load import SafeFileSystemReader, SafeWholeLoadPlanner, read_metadata_safely
from ftrain.checkpoint.storage import checkpoint_at


def check_before_reading(path: layout.Where) -> None:
    """``ValueError`` unless DCP's metadata is sane: every location inside a file of the checkpoint (those its
    marker lists, or without a usable marker the regular files in it), every declared tensor backed by as
    many stored bytes. Reading a whole checkpoint allocates every tensor it declares: this runs first."""
    checkpoint = checkpoint_at(path)
    try:
        sizes = {entry["name"]: entry["size"] for entry in layout.read_marker(checkpoint)["files"]}
    except ValueError:
        sizes = {info.name: info.size for info in checkpoint.storage.files(checkpoint.name)}
    with checkpoint.storage.open_read(checkpoint.file(layout.DCP_METADATA)) as stream:
        metadata = read_metadata_safely(stream)
    problems = integrity.check_metadata(metadata, sizes)
    if problems:
        raise ValueError(f"{checkpoint} cannot be read: {'; '.join(problems)}")


def read_state(path: layout.Where) -> dict[str, Any]:
    """Everything the checkpoint holds, unsharded, as nested dicts (tensors and plain data only).
    The metadata is checked first (``check_before_reading``)."""
    checkpoint = checkpoint_at(path)
    check_before_reading(checkpoint)
    state: dict[str, Any] = {}
    # dcp.load would copy into a fresh dict and drop what the empty-dict planner builds: go one level down.
    reader = SafeFileSystemReader(checkpoint)
    load_state_dict_in_place(state, reader, SafeWholeLoadPlanner())
    return state


def flatten(state: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": x}}`` -> ``{"a.b": x}``."""
    flat: dict[str, Any] = {}
    for key, value in state.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def select(flat: dict[str, Any], prefix: str) -> dict[str, Any]:
    """The entries under a DCP key prefix (``"app.model"``), with the prefix taken off."""
    start = prefix + "."
    return {key[len(start):]: value for key, value in flat.items() if key.startswith(start)}


def read_tensors(path: layout.Where) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint, unsharded, by flattened key (``app.model.blocks.0.qkv.weight``, ...)."""
    return {k: v for k, v in flatten(read_state(path)).items() if isinstance(v, torch.Tensor)}


def differing_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> list[str]:
    """Keys whose tensors are not bit-identical (or exist on one side only)."""
    keys = sorted(set(a) | set(b))
    return [k for k in keys if k not in a or k not in b or not torch.equal(a[k], b[k])]
