"""Where a snapshot's tensors go in a slot's data file, and a snapshot in flight that a durable save may borrow."""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from typing import Any

import torch

from ftrain.checkpoint.local.marker import ALIGN, TensorRecord, numel

_JSON_EXACT = frozenset((str, int, bool, type(None)))  # what a JSON round trip gives back as it was

# (path in the state tree, dtype, shape, whether a DTensor's shard, device): a tensor's place in the layout
LayoutKey = tuple[tuple[Any, ...], torch.dtype, torch.Size, bool, torch.device]


@dataclass(frozen=True)
class Entry:
    """One tensor of a snapshot: where it is in the state tree and in the slot's data file."""

    path: tuple[Any, ...]
    dtype: torch.dtype
    shape: tuple[int, ...]
    dtensor: bool
    device: str
    offset: int
    nbytes: int

    def record(self, with_path: bool) -> TensorRecord:
        return TensorRecord(
            key=".".join(str(part) for part in self.path),
            dtype=str(self.dtype).removeprefix("torch."),
            shape=list(self.shape),
            offset=self.offset,
            nbytes=self.nbytes,
            dtensor=self.dtensor,
            device=self.device,
            path=list(self.path) if with_path else None,
        )


class Plan:
    """Where each tensor of a snapshot goes in a slot file. It stays the same from step to step while the state
    keeps its layout (same paths, dtypes, shapes, devices), so the marker's table of tensors is encoded once."""

    def __init__(self, key: list[LayoutKey]) -> None:
        self.key = key
        self.entries: list[Entry] = []
        offset = 0
        for path, dtype, shape, is_d, device in key:
            nbytes = numel(shape) * dtype.itemsize
            self.entries.append(Entry(path, dtype, tuple(shape), is_d, str(device), offset, nbytes))
            offset += -(-nbytes // ALIGN) * ALIGN
        self.size = offset
        # JSON keeps str, int, bool and None apart, so paths made of those go into the marker's table (encoded
        # once per layout) instead of into the skeleton (pickled at every snapshot).
        self.paths_in_marker = all(type(part) in _JSON_EXACT for entry in self.entries for part in entry.path)
        self.records_json = json.dumps([entry.record(self.paths_in_marker).to_json() for entry in self.entries])

    def matches(self, tensors: list[tuple[tuple[Any, ...], torch.Tensor, bool]]) -> bool:
        """Whether ``tensors`` have this plan's layout (compared in place: no key is built at every step)."""
        if len(tensors) != len(self.key):
            return False
        for (path, tensor, is_d), (k_path, dtype, shape, k_is_d, device) in zip(tensors, self.key):
            if tensor.dtype is not dtype or tensor.shape != shape or path != k_path or is_d is not k_is_d:
                return False
            if tensor.device != device:
                return False
        return True


class Taking:
    """A snapshot being taken: its live tensors and, once copied, the slot and the views that hold the copies."""

    def __init__(self, step: int, tensors: list[torch.Tensor], copied: threading.Event) -> None:
        self.step = step
        self.tensors = tensors
        self.copied = copied
        self.slot: int | None = None
        self.views: list[torch.Tensor] | None = None  # set only when every copy succeeded


class LentSnapshot:
    """A snapshot's copies of the live tensors, lent to a durable save of the same step (a ``staging.Prestaged``)."""

    def __init__(self, taking: Taking) -> None:
        self._taking = taking
        self._copies: dict[tuple[Any, ...], torch.Tensor] | None = None

    def ready(self) -> bool:
        self._taking.copied.wait()
        return self._taking.views is not None

    def copy_of(self, tensor: torch.Tensor) -> torch.Tensor | None:
        if self._copies is None:
            if self._taking.views is None:
                raise RuntimeError("LentSnapshot.copy_of before ready() returned True")
            self._copies = {_identity(live): view for live, view in zip(self._taking.tensors, self._taking.views)}
        return self._copies.get(_identity(tensor))


def _identity(tensor: torch.Tensor) -> tuple[Any, ...]:
    """Which memory a tensor reads, as what it reads it: two tensors with equal identities hold equal values."""
    return (
        tensor.untyped_storage().data_ptr(),
        tensor.storage_offset(),
        tuple(tensor.shape),
        tensor.stride(),
        tensor.dtype,
        tensor.device,
    )
