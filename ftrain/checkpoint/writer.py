"""The storage writer every save goes through: DCP's ``FileSystemWriter`` over the storage's DCP file system
(``storage.Storage.dcp_filesystem``), plus checksums and early writeback.

* Checksums: every buffer DCP writes passes through xxh3-64 (integrity.WRITE_SUM) on its way to the file (nothing
  is read back).
  Each rank sends its sums to the coordinator inside DCP's own gather of write results; the coordinator
  writes them to ``CHECKSUMS.json`` before DCP's ``.metadata``, and the commit marker records them.
* Early writeback (local files): after each large write the kernel is told to start writing those pages to disk,
  so the disk works while the writer checksums and copies the next tensors instead of all at the final fsync.
* Finite values: every floating-point tensor is checked for NaN/Inf as the writer resolves it (off the training
  thread: the writer works on the staged copy). Each rank sends the names it found to the coordinator with its
  checksums; if there are any, the coordinator refuses to finish the checkpoint, so a poisoned state never
  gets a ``.metadata`` and therefore never a commit marker.
* Priority: in the writer process (``async_process``) the whole process runs at a lower CPU priority, so that
  on a machine whose cores training keeps busy the save takes the cycles training leaves idle (and logs only
  warnings).
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Generator
from contextlib import contextmanager
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.filesystem import FileSystemBase
from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex
from torch.distributed.checkpoint.planner import SavePlan, SavePlanner
from torch.distributed.checkpoint.storage import WriteResult
from torch.futures import Future

from ftrain import faults
from ftrain.checkpoint import layout
from ftrain.checkpoint.integrity import CHECKSUMS
from ftrain.checkpoint.storage import checkpoint_at
from ftrain.checkpoint.storage.base import DCP_TEMPORARY_SUFFIX
from ftrain.checkpoint.sums import WRITE_SUM, Summer, buffer_sum

_SUMS_KEY = "__ftrain_checksums__"
_SIZES_KEY = "__ftrain_sizes__"
_NONFINITE_KEY = "__ftrain_nonfinite__"
EARLY_WRITEBACK_BYTES = 4 << 20
MAX_AUTO_WRITE_THREADS = 4
WRITER_PROCESS_NICE = 10  # added to the writer process's nice value (0 is the default, 19 the lowest priority)


class _ChecksummedFile:
    """A file opened for writing that keeps the checksum of everything written through it and has large writes
    start their way to disk at once."""

    def __init__(self, raw: Any) -> None:
        self.raw = raw
        self.summer = Summer()
        self.size = 0
        self._written_back = 0

    def write(self, data: Any) -> int:
        self.summer.update(data)  # releases the GIL on large buffers
        written = self.raw.write(data)
        self.size += memoryview(data).nbytes
        if written >= EARLY_WRITEBACK_BYTES:
            self._start_writeback()
        return written

    def _start_writeback(self) -> None:
        """On Linux, ``POSIX_FADV_DONTNEED`` starts writeback of the dirty pages without waiting for it, so the
        disk works during the save rather than all at the final fsync (faster saves: docs/bench.md). It is only a
        hint: a file system that ignores or refuses it changes only the speed."""
        if not hasattr(os, "posix_fadvise") or not hasattr(self.raw, "fileno"):
            return
        self.raw.flush()
        end = self.raw.tell()
        try:
            os.posix_fadvise(self.raw.fileno(), self._written_back, end - self._written_back, os.POSIX_FADV_DONTNEED)
        except OSError:
            return
        self._written_back = end

    def __getattr__(self, name: str) -> Any:  # tell, flush, fileno, close: the file's own
        return getattr(self.raw, name)


class _ChecksummingFileSystem(FileSystemBase):
    """A storage's DCP file system whose write streams record each file's checksum and size (by file name) when
    closed."""

    def __init__(self, inner: FileSystemBase) -> None:
        self.inner = inner
        self.sums: dict[str, str] = {}
        self.sizes: dict[str, int] = {}

    @contextmanager
    def create_stream(self, path: str | os.PathLike, mode: str) -> Generator[Any, None, None]:
        with self.inner.create_stream(path, mode) as stream:
            if mode != "wb":
                yield stream
                return
            tracked = _ChecksummedFile(stream)
            yield tracked
        name = str(path).replace("\\", "/").rsplit("/", 1)[-1]
        self.sums[name], self.sizes[name] = tracked.summer.hexdigest(), tracked.size

    def concat_path(self, path: str | os.PathLike, suffix: str) -> str | os.PathLike:
        return self.inner.concat_path(path, suffix)

    def init_path(self, path: str | os.PathLike) -> str | os.PathLike:
        return self.inner.init_path(path)

    def rename(self, path: str | os.PathLike, new_path: str | os.PathLike) -> None:
        self.inner.rename(path, new_path)

    def mkdir(self, path: str | os.PathLike) -> None:
        self.inner.mkdir(path)

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike) -> bool:
        return True

    def exists(self, path: str | os.PathLike) -> bool:
        return self.inner.exists(path)

    def rm_file(self, path: str | os.PathLike) -> None:
        self.inner.rm_file(path)


class CheckpointWriter(FileSystemWriter):
    """``FileSystemWriter`` into a checkpoint directory of a storage (a ``CheckpointDir``, or a local path) that
    records a checksum of every data file in ``CHECKSUMS.json`` and starts writeback early.
    ``in_writer_process``: this writer runs in DCP's writer process, which it moves to a lower priority."""

    def __init__(self, path: Any, *, in_writer_process: bool = False, **options: Any) -> None:
        self.checkpoint = checkpoint_at(path)
        storage = self.checkpoint.storage
        dcp_path = storage.dcp_path(self.checkpoint.name)
        options.setdefault("sync_files", storage.dcp_sync_files)
        super().__init__(dcp_path, **options)
        self.fs = _ChecksummingFileSystem(storage.dcp_filesystem())
        self.path = self.fs.init_path(dcp_path)
        self.in_writer_process = in_writer_process
        # Every file's checksum and size as written, once the coordinator has finished (data files, CHECKSUMS.json
        # and .metadata), for the commit marker without listing or reading them back. Empty where this object is
        # the training process's copy of a writer that ran in DCP's writer process.
        self.written_sums: dict[str, str] = {}
        self.written_sizes: dict[str, int] = {}

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        if self.in_writer_process:
            _lower_process_priority(WRITER_PROCESS_NICE)
            # DCP's writer process logs two INFO lines per save on the console: keep its warnings only.
            logging.getLogger().setLevel(logging.WARNING)
        super().set_up_storage_writer(is_coordinator, *args, **kwargs)

    def _metadata_exists(self) -> bool:
        """DCP asks on every rank, while planning (in the training thread), whether the directory already holds a
        ``.metadata``, only to warn that it overwrites it. ftrain never saves over a committed step, and the
        directory of a save that died is incomplete and is written over as DCP would: the answer changes nothing
        but costs a request per rank per save on an object store. (A private hook of ``FileSystemWriter``:
        tests/test_torch_compat.py checks that planning still asks it.)"""
        return False

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        step = layout.parse_step(self.checkpoint)
        if step is not None:
            faults.pause_point(faults.WHILE_WRITING, step)
        checked = _FiniteChecking(planner)
        results = super().write_data(plan, checked).wait()
        files = sorted({result.storage_data.relative_path for result in results})
        storage = self.checkpoint.storage
        sums = {name: self.fs.sums.get(name) or storage.checksum(self.checkpoint.file(name), WRITE_SUM) for name in files}
        sizes = {name: self.fs.sizes[name] for name in files if name in self.fs.sizes}
        done: Future[list[WriteResult]] = Future()
        done.set_result(
            [
                *results,
                WriteResult(index=MetadataIndex(_SUMS_KEY), size_in_bytes=0, storage_data=sums),
                WriteResult(index=MetadataIndex(_SIZES_KEY), size_in_bytes=0, storage_data=sizes),
                WriteResult(index=MetadataIndex(_NONFINITE_KEY), size_in_bytes=0, storage_data=sorted(checked.nonfinite)),
            ]
        )
        return done

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        sums: dict[str, str] = {}
        sizes: dict[str, int] = {}
        nonfinite: list[str] = []
        kept = []
        for rank_results in results:
            kept.append([r for r in rank_results if r.index.fqn not in (_SUMS_KEY, _SIZES_KEY, _NONFINITE_KEY)])
            for r in rank_results:
                if r.index.fqn == _SUMS_KEY:
                    sums.update(r.storage_data)
                elif r.index.fqn == _SIZES_KEY:
                    sizes.update(r.storage_data)
                elif r.index.fqn == _NONFINITE_KEY:
                    nonfinite.extend(r.storage_data)
        if nonfinite:
            shown = ", ".join(sorted(set(nonfinite))[:5])
            raise NonFiniteStateError(f"non-finite values (NaN/Inf) in {len(set(nonfinite))} tensor(s): {shown}")
        recorded = json.dumps(sums, indent=1, sort_keys=True).encode()
        self.checkpoint.storage.write_atomic(self.checkpoint.file(CHECKSUMS), recorded)
        super().finish(metadata, kept)
        self.written_sums = {**sums, CHECKSUMS: buffer_sum(recorded, WRITE_SUM)}
        self.written_sizes = {**sizes, CHECKSUMS: len(recorded)}
        metadata_tmp = layout.DCP_METADATA + DCP_TEMPORARY_SUFFIX
        if metadata_tmp in self.fs.sums:
            self.written_sums[layout.DCP_METADATA] = self.fs.sums[metadata_tmp]
            self.written_sizes[layout.DCP_METADATA] = self.fs.sizes[metadata_tmp]


class NonFiniteStateError(ValueError):
    """A state about to be committed holds NaN or Inf: the checkpoint is not finished."""


class _FiniteChecking:
    """The planner DCP writes through, noting every floating-point tensor it resolves that holds NaN or Inf."""

    def __init__(self, planner: SavePlanner) -> None:
        self._planner = planner
        self.nonfinite: list[str] = []

    def resolve_data(self, write_item: Any) -> Any:
        data = self._planner.resolve_data(write_item)
        if isinstance(data, torch.Tensor) and data.is_floating_point() and has_nonfinite(data):
            self.nonfinite.append(write_item.index.fqn)  # list.append is atomic: writer threads may share this
        return data

    def __getattr__(self, name: str) -> Any:
        return getattr(self._planner, name)


def has_nonfinite(tensor: torch.Tensor) -> bool:
    """True if a floating-point tensor holds NaN or Inf.

    A sum is one pass that allocates nothing, and it is finite only if every element is (NaN and Inf never leave a
    running sum); ``torch.isfinite(t).all()`` makes a bool tensor as large as ``t`` and reads it again, which
    costs a background save far more time and memory (docs/bench.md). Only a sum that overflows (finite values
    of huge magnitude) is checked again element by element. 16-bit types are summed in float32, which their
    values cannot overflow."""
    if tensor.numel() == 0:
        return False
    dtype = torch.float32 if tensor.element_size() < 4 else tensor.dtype
    if math.isfinite(float(tensor.sum(dtype=dtype))):
        return False
    return not bool(torch.isfinite(tensor).all())


def auto_write_threads() -> int:
    """Writer threads per rank when the config says 0: the cores this process may use, shared among the ranks
    on this machine, at most ``MAX_AUTO_WRITE_THREADS``. Each thread checksums and writes a file of its own; on
    a machine whose cores training already fills (2 ranks on 2 cores) this is 1."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(1, min(MAX_AUTO_WRITE_THREADS, cores // max(local_ranks, 1)))


def _lower_process_priority(increment: int) -> None:
    """Raise the nice value of every thread of this process to at least ``increment`` (Linux keeps it per
    thread; threads started later inherit it). Only ever lowers the priority, so repeating it is harmless."""
    tasks = os.listdir("/proc/self/task") if os.path.isdir("/proc/self/task") else [str(os.getpid())]
    for task in tasks:
        try:
            if os.getpriority(os.PRIO_PROCESS, int(task)) < increment:
                os.setpriority(os.PRIO_PROCESS, int(task), increment)
        except OSError:  # a thread that just ended, or a platform that refuses: only the speed changes
            pass
