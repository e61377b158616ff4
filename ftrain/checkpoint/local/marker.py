"""A local snapshot's marker (``slot-<n>.json``): the typed record, its JSON and its one validation.

The marker is written last, after the slot's data and skeleton: a slot counts only while its marker is there and
valid. It holds the step, what identifies the run (signature, world size, rank), the state names, where the
data and skeleton are with their checksums, and a table of the tensors: each one's key, dtype, shape, offset and
size in the data file and, when the tree's keys survive JSON, its path in the state tree (else the skeleton holds
the paths).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import torch

# 2: the skeleton's encoding is in the marker; 3: the tensors' paths may be in the marker instead of the skeleton.
# Format 2 is still read; a snapshot of format 1 is not used (the run redoes a few steps).
FORMAT = 3
FORMATS_READ = (2, 3)
SKELETON_PICKLE, SKELETON_TORCH = "pickle", "torch"
SKELETON_ENCODINGS = (SKELETON_PICKLE, SKELETON_TORCH)
SLOTS = (0, 1)
ALIGN = 64  # every tensor starts at a multiple of this in the data file
CHUNK = 64 << 20  # bytes per checksum of the data file


def data_name(slot: int) -> str:
    return f"slot-{slot}.data"


def skel_name(slot: int) -> str:
    return f"slot-{slot}.skel"


def marker_name(slot: int) -> str:
    return f"slot-{slot}.json"


@dataclass
class TensorRecord:
    """One tensor of the marker's table: where its bytes are in the data file and what they are."""

    key: str  # its path joined with dots, for messages
    dtype: str  # torch's name without "torch."
    shape: list[int]
    offset: int
    nbytes: int
    dtensor: bool  # a DTensor's local shard: restored as a DTensor on the live mesh and placements
    device: str  # where it was, and is restored to
    path: list[Any] | None = None  # its path in the state tree; None: the skeleton lists the paths

    def to_json(self) -> dict[str, Any]:
        record = {
            "key": self.key,
            "dtype": self.dtype,
            "shape": self.shape,
            "offset": self.offset,
            "nbytes": self.nbytes,
            "dtensor": self.dtensor,
            "device": self.device,
        }
        if self.path is not None:
            record["path"] = self.path
        return record

    @classmethod
    def from_json(cls, record: Any, index: int) -> TensorRecord:
        where = f"tensors[{index}]"
        if not isinstance(record, dict):
            raise ValueError(f"marker field {where} is not an object")
        values = {name: _field(record, name, f"{where}.{name}") for name in _RECORD_FIELDS}
        return cls(**values, path=record.get("path"))


_RECORD_FIELDS = ("key", "dtype", "shape", "offset", "nbytes", "dtensor", "device")  # and "path", optional


@dataclass
class SnapshotMarker:
    """The marker of one slot's snapshot (see the module docstring); ``to_json``/``from_json`` keep its keys."""

    format: int
    step: int
    rank: int
    world_size: int
    signature: Any
    states: list[str]
    data_file: str
    data_size: int
    skeleton_file: str
    skeleton_encoding: str
    skeleton_size: int
    skeleton_checksum: str
    algorithm: str
    chunk: int
    data_sums: list[str]
    tensors: list[TensorRecord]

    def to_json(self, tensors_json: str | None = None) -> str:
        """The marker's JSON text. ``tensors_json``: the tensor table already encoded (it changes only with the
        state's layout, so the writer encodes it once per layout rather than at every snapshot)."""
        head = {
            "format": self.format,
            "step": self.step,
            "rank": self.rank,
            "world_size": self.world_size,
            "signature": self.signature,
            "states": self.states,
            "data": {"file": self.data_file, "size": self.data_size},
            "skeleton": {
                "file": self.skeleton_file,
                "encoding": self.skeleton_encoding,
                "size": self.skeleton_size,
                "checksum": self.skeleton_checksum,
            },
            "checksum": {"algorithm": self.algorithm, "chunk": self.chunk, "data": self.data_sums},
        }
        if tensors_json is None:
            tensors_json = json.dumps([record.to_json() for record in self.tensors])
        return f'{json.dumps(head)[:-1]}, "tensors": {tensors_json}}}'

    @classmethod
    def from_json(cls, text: bytes | str) -> SnapshotMarker:
        """The marker in ``text``; ValueError naming what is wrong if it is not JSON, of a format not read, or
        lacks a field. ``validate`` checks the values."""
        record = json.loads(text)
        if not isinstance(record, dict) or record.get("format") not in FORMATS_READ:
            raise ValueError(f"unknown format {record.get('format') if isinstance(record, dict) else record!r}")
        tensors = _field(record, "tensors", "tensors")
        if not isinstance(tensors, list):
            raise ValueError("marker field tensors is not a list")
        return cls(
            format=record["format"],
            step=_field(record, "step"),
            rank=_field(record, "rank"),
            world_size=_field(record, "world_size"),
            signature=_field(record, "signature"),
            states=_field(record, "states"),
            data_file=_field(record, "data.file"),
            data_size=_field(record, "data.size"),
            skeleton_file=_field(record, "skeleton.file"),
            skeleton_encoding=_field(record, "skeleton.encoding"),
            skeleton_size=_field(record, "skeleton.size"),
            skeleton_checksum=_field(record, "skeleton.checksum"),
            algorithm=_field(record, "checksum.algorithm"),
            chunk=_field(record, "checksum.chunk"),
            data_sums=_field(record, "checksum.data"),
            tensors=[TensorRecord.from_json(item, index) for index, item in enumerate(tensors)],
        )

    def validate(self, slot: int) -> None:
        """Raise ValueError naming the first field that is wrong for a marker of ``slot``: its files, types,
        sizes, and every tensor inside the data the marker vouches for (a huge claim is never believed)."""
        for name in ("step", "rank", "world_size", "data_size", "skeleton_size", "chunk"):
            _check(isinstance(getattr(self, name), int), name, "is not an integer")
        _check(isinstance(self.states, list), "states", "is not a list")
        _check(self.data_file == data_name(slot), "data.file", f"is not {data_name(slot)}")
        _check(self.skeleton_file == skel_name(slot), "skeleton.file", f"is not {skel_name(slot)}")
        _check(self.skeleton_encoding in SKELETON_ENCODINGS, "skeleton.encoding", "is not one of " + str(SKELETON_ENCODINGS))
        _check(isinstance(self.algorithm, str), "checksum.algorithm", "is not a string")
        _check(self.data_size >= 0, "data.size", "is negative")
        _check(self.chunk == CHUNK, "checksum.chunk", f"is not {CHUNK}")
        _check(isinstance(self.data_sums, list), "checksum.data", "is not a list")
        _check(len(self.data_sums) == -(-self.data_size // CHUNK), "checksum.data", "has the wrong number of sums")
        for index, record in enumerate(self.tensors):
            where = f"tensors[{index}]"
            for name in ("offset", "nbytes"):
                _check(isinstance(getattr(record, name), int), f"{where}.{name}", "is not an integer")
            _check(isinstance(record.dtensor, bool), f"{where}.dtensor", "is not a boolean")
            _check(isinstance(record.device, str), f"{where}.device", "is not a string")
            _check(isinstance(record.shape, list), f"{where}.shape", "is not a list")
            try:
                expected = numel(record.shape) * dtype_named(record.dtype).itemsize
            except ValueError as exc:
                raise ValueError(f"marker field {where}: {exc}") from None
            _check(record.nbytes == expected, f"{where}.nbytes", "does not match its shape and dtype")
            _check(0 <= record.offset and record.offset + record.nbytes <= self.data_size, f"{where}.offset",
                   "puts the tensor outside the data")
            _check(record.path is None or isinstance(record.path, list), f"{where}.path", "is not a list")


def _field(record: dict[str, Any], dotted: str, name: str | None = None) -> Any:
    value: Any = record
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            raise ValueError(f"marker field {name or dotted} is missing")
        value = value[part]
    return value


def _check(ok: bool, field: str, problem: str) -> None:
    if not ok:
        raise ValueError(f"marker field {field} {problem}")


def dtype_named(name: str) -> torch.dtype:
    """The torch dtype a marker names (``float32``); ValueError for anything else."""
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return dtype


def numel(shape: Any) -> int:
    """The number of elements of ``shape``; ValueError unless it is a sequence of non-negative ints."""
    count = 1
    for dim in shape:
        if not isinstance(dim, int) or dim < 0:
            raise ValueError(f"bad shape {shape!r}")
        count *= dim
    return count
