"""A rank's two slots in memory: their files, the room reserved for them, their shared mappings, page-locking.

Each slot's data file is allocated once (``posix_fallocate``, so a full ``/dev/shm`` can never SIGBUS a write
into the mapping) and reused, written through a shared mapping that keeps its file descriptor (so a view of it
can be handed to another process by descriptor). Small files (skeleton, marker) are written with os-level calls:
this runs at every snapshot.
"""

from __future__ import annotations

import logging
import os
import shutil
import weakref
from pathlib import Path
from typing import Any

import torch

from ftrain._torch_compat import foreach_copy, pin_host_memory, shared_fd_storage, unpin_host_memory
from ftrain.checkpoint.local.marker import SLOTS, data_name, marker_name, skel_name
from ftrain.checkpoint.local.plan import Entry, Plan

logger = logging.getLogger("ftrain.checkpoint")


class Disabled(Exception):
    """The tier cannot run here (no room, no usable directory); the message says why."""


class SlotFiles:
    """A slot's file names as strings, made once: ``Path`` arithmetic costs microseconds at every snapshot."""

    def __init__(self, root: Path, slot: int) -> None:
        self.data = str(root / data_name(slot))
        self.skeleton = str(root / skel_name(slot))
        self.marker = str(root / marker_name(slot))
        self.marker_tmp = self.marker + ".tmp"


class Slots:
    """A rank's two slots: their file names, their data files mapped, and a view per tensor of the current plan."""

    def __init__(self, root: Path, rank: int, max_bytes: int | None) -> None:
        self.root = root
        self.rank = rank
        self.max_bytes = max_bytes
        self.files = {slot: SlotFiles(root, slot) for slot in SLOTS}
        self.buffers: dict[int, torch.Tensor] = {}  # slot -> its data file, mapped
        self._views: dict[int, tuple[Plan, list[torch.Tensor]]] = {}  # slot -> (its plan, a view per tensor)

    def reserve(self, size: int) -> None:
        """Make both data files ``size`` bytes (or more), with the room reserved, before any is mapped; a grown
        file's old mapping is dropped. Raises ``Disabled`` if the room is not there."""
        for slot in reserve(self.root, size, self.rank, self.max_bytes):
            self.buffers.pop(slot, None)
            self._views.pop(slot, None)

    def views(self, slot: int, plan: Plan, stream: Any = None) -> list[torch.Tensor]:
        """A view of ``slot``'s mapping per tensor of ``plan``; with a CUDA ``stream``, the mapping page-locked."""
        cached = self._views.get(slot)
        if cached is not None and cached[0] is plan:
            return cached[1]
        buffer = self.buffers.get(slot)
        size = file_size(self.files[slot].data)
        if buffer is None or buffer.numel() != size:
            buffer = map_file(self.files[slot].data, size)
            if stream is not None:
                with torch.cuda.device(stream.device):  # this thread's current device is 0 otherwise
                    page_lock(buffer, self.files[slot].data)
            self.buffers[slot] = buffer
        views = [view(buffer, entry) for entry in plan.entries]
        self._views[slot] = (plan, views)
        return views

    def unmap(self) -> None:
        self._views.clear()
        self.buffers.clear()


def copy_into(views: list[torch.Tensor], tensors: list[torch.Tensor], ready: Any = None, stream: Any = None) -> None:
    """Copy the live ``tensors`` into their slot ``views``. Host tensors: in one call. Device tensors: on the side
    ``stream``, after the ``ready`` event (every update the training stream had queued), asynchronously into the
    page-locked slot; returns when the copies are done."""
    with torch.no_grad():
        if ready is None:
            foreach_copy(views, tensors)  # one dispatch instead of one per tensor
            return
        with torch.cuda.device(stream.device), torch.cuda.stream(stream):
            stream.wait_event(ready)
            for tensor, target in zip(tensors, views):
                target.copy_(tensor, non_blocking=True)  # asynchronous into pinned memory (else synchronous)
            stream.synchronize()


def reserve(root: Path, size: int, rank: int, max_bytes: int | None) -> list[int]:
    """Make both slot files under ``root`` ``size`` bytes (or more), with the room reserved, before any is mapped.
    Returns the slots whose file grew (their old mappings are stale). Raises ``Disabled`` if the room is not
    there: the filesystem's free space, or ``max_bytes`` for both slots together."""
    current = {slot: file_size(root / data_name(slot)) for slot in SLOTS}
    needed = sum(max(0, size - have) for have in current.values())
    limit = shutil.disk_usage(root).free
    if max_bytes is not None:
        limit = min(limit, max_bytes - sum(current.values()))
    if needed > limit:
        raise Disabled(
            f"local snapshots off: rank {rank} needs {mb(2 * size)} for two snapshots in {root.parent}, "
            f"{mb(max(limit, 0))} more is available; training goes on with durable checkpoints only"
        )
    grown = []
    for slot in SLOTS:
        if current[slot] < size:
            grown.append(slot)
            fd = os.open(root / data_name(slot), os.O_RDWR | os.O_CREAT, 0o600)
            try:
                os.posix_fallocate(fd, 0, size)
            except OSError as exc:
                raise Disabled(f"local snapshots off: cannot reserve {mb(size)} in {root}: {exc}") from None
            finally:
                os.close(fd)
    return grown


def map_file(path: str, size: int) -> torch.Tensor:
    """The file's bytes as a uint8 tensor written through a shared mapping that keeps its file descriptor:
    torch's multiprocessing then hands views of it to another process by descriptor (``async_process``'s writer
    maps the same pages, no copy). With ``torch.from_file``, which closes its descriptor, torch would copy such a
    tensor into new shared memory instead (replacing this mapping in place)."""
    fd = os.open(path, os.O_RDWR)
    try:
        storage = shared_fd_storage(fd, size)  # maps a dup of fd, kept open with the map
    finally:
        os.close(fd)
    return torch.empty(0, dtype=torch.uint8).set_(storage)


def page_lock(buffer: torch.Tensor, name: str) -> None:
    """Page-lock a slot's mapping for the device-to-host copies (``cudaHostRegister``, as DCP's stager and ours pin
    shared buffers): asynchronous copies on the side stream, instead of synchronous ones through a pageable
    bounce buffer. Unlocked when the mapping's tensor goes. If it cannot be locked, the copies still work."""
    if not buffer.nbytes:
        return
    try:
        pin_host_memory(buffer.data_ptr(), buffer.nbytes)
    except RuntimeError as exc:
        logger.warning("local snapshots: cannot page-lock %s (%s); device copies go through pageable memory", name, exc)
        return
    weakref.finalize(buffer, unpin_host_memory, buffer.data_ptr())


def view(buffer: torch.Tensor, entry: Entry) -> torch.Tensor:
    """The part of a slot's mapping that holds ``entry``, as a tensor of its dtype and shape."""
    return buffer[entry.offset : entry.offset + entry.nbytes].view(entry.dtype).view(entry.shape)


def replace(path: str, content: bytes, tmp: str) -> None:
    """Write ``path`` atomically (``tmp`` + rename). No fsync: on tmpfs there is no disk, and the tier does not
    claim to survive the machine."""
    overwrite(tmp, content)
    os.replace(tmp, path)


def overwrite(path: str, content: bytes) -> None:
    """Write ``path`` in place: for a file only a marker written after it vouches for. os-level calls, as this
    runs at every snapshot (``open()``'s buffered file object costs more)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        remaining = memoryview(content)
        while remaining:
            remaining = remaining[os.write(fd, remaining) :]
    finally:
        os.close(fd)


def file_size(path: Path | str) -> int:
    """The file's size; 0 if it is not there."""
    try:
        return os.stat(path).st_size
    except FileNotFoundError:
        return 0


def mb(size: int) -> str:
    return f"{size / 1e6:.1f} MB"
