"""Reading a DCP tensor item straight into the tensor it restores.

DCP's ``FileSystemReader`` reads every tensor item with ``torch.load``, which allocates a fresh storage for it and
then copies it into the target. For a resume that fresh memory is the cost: most of ``dcp.load``'s time from a
warm page cache goes to filling storages touched for the first time (page faults), little to the copy
(docs/bench.md). The target tensors already exist (the model and optimizer being restored),
so when an item is a whole, contiguous CPU tensor of the target's dtype and shape, its bytes are read from the
file into the target's memory directly. Anything else (a narrowed read after a reshard, a strided or device
target, a transformed stream) is left to DCP's own path.

An item in a ``.distcp`` file is one ``torch.save`` archive: a zip whose ``data.pkl`` describes the tensor and
whose ``data/<key>`` record holds its bytes, uncompressed. ``data.pkl`` is read by torch's weights_only
unpickler with the storage replaced by a ``meta`` one, so describing the tensor allocates and runs nothing.
"""

from __future__ import annotations

import io
import sys
from typing import IO, Any

import torch
from torch.distributed.checkpoint.planner import LoadPlanner, ReadItem

from ftrain._torch_compat import torch_archive_reader, weights_only_unpickler
from ftrain.checkpoint.byte_streams import SizedReader

_SCRATCH = 8 << 20  # bytes read at a time for summing what is not read into a target


def read_into_target(
    stream: IO[bytes], offset: int, length: int, req: ReadItem, planner: LoadPlanner, summer: Any = None
) -> bool:
    """Read the item ``req`` (``length`` bytes at ``offset`` of ``stream``) into the planner's target tensor.
    Returns False, having changed nothing, when the item or the target does not qualify. ``summer`` (a
    ``sums.Summer``), if given, is fed the item's ``length`` bytes in order (only when True is returned)."""
    target = planner.resolve_tensor(req).detach()
    if target.device.type != "cpu" or not target.is_contiguous() or target.is_quantized or target.is_meta:
        return False
    described = _describe(stream, offset, length)
    if described is None:
        return False
    tensor, data_offset = described
    nbytes = tensor.numel() * tensor.element_size()
    whole = all(o == 0 for o in req.storage_offsets) and tuple(req.lengths) == tuple(tensor.shape)
    if (
        not whole
        or tensor.dtype != target.dtype
        or tuple(tensor.shape) != tuple(target.shape)
        or not tensor.is_contiguous()
        or tensor.storage_offset() != 0
        or data_offset + nbytes > length
    ):
        return False
    payload = target.view(-1).view(torch.uint8).numpy().data
    if summer is not None:  # the archive's own bytes around the payload are a few KB: read them for the sum
        sum_range(stream, summer, offset, offset + data_offset)
    if nbytes:
        _read_exactly(stream, offset + data_offset, payload)
    if summer is not None:
        summer.update(payload)
        sum_range(stream, summer, offset + data_offset + nbytes, offset + length)
    planner.commit_tensor(req, target)
    return True


def sum_range(stream: IO[bytes], summer: Any, start: int, end: int) -> None:
    """Feed bytes ``start`` to ``end`` of ``stream`` to ``summer``, through one reused buffer."""
    buffer = memoryview(bytearray(min(max(end - start, 0), _SCRATCH)))
    while start < end:
        view = buffer[: min(len(buffer), end - start)]
        _read_exactly(stream, start, view)
        summer.update(view)
        start += len(view)


def _describe(stream: IO[bytes], offset: int, length: int) -> tuple[torch.Tensor, int] | None:
    """(a meta tensor with the item's dtype, shape, strides and storage offset; where its bytes start in the
    item), or None when the item is not a single-storage torch.save archive."""
    item = _Window(stream, offset, length)
    try:
        archive = torch_archive_reader(item)
        pickled = archive.get_record("data.pkl")
        # torch.load byte-swaps an archive written on a machine of the other byte order; this path does not
        byteorder = bytes(archive.get_record("byteorder")).decode() if archive.has_record("byteorder") else None
    except Exception:  # not a zip archive of the expected kind: DCP's path decides
        return None
    if byteorder != sys.byteorder:
        return None
    storages: list[str] = []

    def persistent_load(saved_id: Any) -> Any:
        kind, storage_type, key, _location, numel = saved_id
        if kind != "storage" or storages:
            raise _NotPlain
        dtype = torch.uint8 if storage_type is torch.UntypedStorage else getattr(storage_type, "dtype", storage_type)
        if not isinstance(dtype, torch.dtype):
            raise _NotPlain
        storages.append(str(key))
        meta = torch.UntypedStorage(int(numel) * dtype.itemsize, device="meta")
        return torch.storage.TypedStorage(wrap_storage=meta, dtype=dtype, _internal=True)

    unpickler = weights_only_unpickler(io.BytesIO(pickled), persistent_load)
    try:
        tensor = unpickler.load()
        record = f"data/{storages[0]}"
        data_offset = archive.get_record_offset(record)
        stored = archive.get_record_size(record) if hasattr(archive, "get_record_size") else None
    except Exception:
        return None
    if not isinstance(tensor, torch.Tensor) or type(tensor) is not torch.Tensor or not storages:
        return None
    if stored is not None and stored != tensor.untyped_storage().nbytes():
        return None
    return tensor, int(data_offset)


class _NotPlain(Exception):
    """The archive holds more than one plain storage."""


class _Window(SizedReader):
    """``size`` bytes of ``stream`` from ``offset``, as a file of their own (what the zip reader needs)."""

    def __init__(self, stream: IO[bytes], offset: int, size: int) -> None:
        self.stream, self.start, self.size, self.position = stream, offset, size, 0

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        wanted = min(len(view), self.size - self.position)
        if wanted <= 0:
            return 0
        self.stream.seek(self.start + self.position)
        got = self.stream.readinto(view[:wanted]) or 0
        self.position += got
        return got


def _read_exactly(stream: IO[bytes], offset: int, buffer: memoryview) -> None:
    view = memoryview(buffer).cast("B")
    stream.seek(offset)
    done = 0
    while done < len(view):
        got = stream.readinto(view[done:])
        if not got:
            raise OSError(f"file ends {len(view) - done} bytes early (at offset {offset + done})")
        done += got
