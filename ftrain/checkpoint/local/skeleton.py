"""A snapshot's skeleton (``slot-<n>.skel``): the state tree without its tensors, and the tensors' paths.

Written at every snapshot as a bare pickle (protocol 2, what ``torch.save`` writes inside its archive, without the
archive's cost); a skeleton that still holds a tensor (sparse, quantized: kept whole) needs ``torch.save``. Both
encodings are read by torch's weights_only unpickler, which builds containers and plain values only and never
runs code from the file.
"""

from __future__ import annotations

import io
import pickle
from typing import Any

import torch

from ftrain._torch_compat import weights_only_unpickle
from ftrain.checkpoint.local.marker import SKELETON_PICKLE, SKELETON_TORCH
from ftrain.state import from_blob, to_blob


class _HoldsTensor(Exception):
    """The skeleton holds a tensor: it needs torch.save."""


class _SkeletonPickler(pickle.Pickler):
    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, torch.Tensor):
            raise _HoldsTensor
        return NotImplemented


def encode(skeleton: dict[str, Any]) -> tuple[str, bytes]:
    """(encoding, bytes): a bare pickle, or torch.save's archive when a tensor is left in the tree."""
    buffer = io.BytesIO()
    try:
        _SkeletonPickler(buffer, protocol=2).dump(skeleton)
        return SKELETON_PICKLE, buffer.getvalue()
    except _HoldsTensor:
        return SKELETON_TORCH, to_blob(skeleton)


def decode(encoding: str, blob: bytes) -> Any:
    """The skeleton, read by torch's weights_only unpickler (``torch.load(weights_only=True)`` reads only
    torch.save's archive, so the bare pickle goes to the same unpickler directly). ValueError if it cannot be
    read, or holds anything but plain values and containers."""
    if encoding == SKELETON_TORCH:
        return from_blob(blob)
    try:
        return weights_only_unpickle(io.BytesIO(blob))
    except Exception as exc:  # its refusals are UnpicklingError; a truncated file can raise others
        raise ValueError(f"skeleton not readable: {exc}") from None
