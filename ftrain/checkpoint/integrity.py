"""Checksums recorded at save time, and verifying a checkpoint against its commit marker.

Each rank checksums its data files as DCP's background writer writes them (every buffer passed to ``write``
goes through CRC-32 first, so nothing is read back) and sends the sums to the coordinator inside DCP's own
gather of write results. The
coordinator writes them to ``CHECKSUMS.json`` before DCP's ``.metadata``; the commit marker then records, for
every file, its size and CRC-32 (zlib's: about 4 GB/s here, no extra dependency).
"""

from __future__ import annotations

import json
import os
import zlib
from collections.abc import Generator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.filesystem import FileSystem
from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex
from torch.distributed.checkpoint.planner import SavePlan, SavePlanner
from torch.distributed.checkpoint.storage import WriteResult
from torch.futures import Future

from ftrain.checkpoint import layout

CHECKSUMS = "CHECKSUMS.json"
_SUMS_KEY = "__ftrain_checksums__"
_CHUNK = 8 << 20
_EARLY_WRITEBACK_BYTES = 4 << 20


def crc32_file(path: Path) -> str:
    crc = 0
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
    return f"{crc:08x}"


class _Crc32Stream:
    """A file opened for writing that keeps the CRC-32 of everything written through it, and has large writes
    start their way to disk at once."""

    def __init__(self, raw: Any) -> None:
        self.raw = raw
        self.crc = 0
        self._written_back = 0

    def write(self, data: Any) -> int:
        self.crc = zlib.crc32(data, self.crc)  # releases the GIL on large buffers
        written = self.raw.write(data)
        if written >= _EARLY_WRITEBACK_BYTES:
            self._start_writeback()
        return written

    def _start_writeback(self) -> None:
        """Have the kernel start writing what we wrote so far to disk now rather than at the final fsync, so
        that the disk works while we checksum and copy the next tensors (1.4x faster saves here). On Linux,
        DONTNEED starts writeback of dirty pages without waiting for it; it is only a hint, so a file system
        that ignores or refuses it changes nothing but the speed."""
        if not hasattr(os, "posix_fadvise"):
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


class _ChecksummingFileSystem(FileSystem):
    """DCP's local file system whose write streams record each file's CRC-32 (by file name) when closed."""

    def __init__(self) -> None:
        super().__init__()
        self.sums: dict[str, str] = {}

    @contextmanager
    def create_stream(self, path: str | os.PathLike, mode: str) -> Generator[Any, None, None]:
        with super().create_stream(path, mode) as stream:
            if mode != "wb":
                yield stream
                return
            tracked = _Crc32Stream(stream)
            yield tracked
        self.sums[Path(path).name] = f"{tracked.crc:08x}"


class ChecksummingWriter(FileSystemWriter):
    """``FileSystemWriter`` that also records a CRC-32 of every data file in ``CHECKSUMS.json``."""

    def __init__(self, path: str | os.PathLike, **options: Any) -> None:
        super().__init__(path, **options)
        self.fs = _ChecksummingFileSystem()

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        results = super().write_data(plan, planner).wait()
        files = sorted({result.storage_data.relative_path for result in results})
        sums = {name: self.fs.sums.get(name) or crc32_file(Path(self.path) / name) for name in files}
        done: Future[list[WriteResult]] = Future()
        done.set_result([*results, WriteResult(index=MetadataIndex(_SUMS_KEY), size_in_bytes=0, storage_data=sums)])
        return done

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        sums: dict[str, str] = {}
        kept = []
        for rank_results in results:
            kept.append([r for r in rank_results if r.index.fqn != _SUMS_KEY])
            for r in rank_results:
                if r.index.fqn == _SUMS_KEY:
                    sums.update(r.storage_data)
        _write_json_durably(Path(self.path) / CHECKSUMS, sums)
        super().finish(metadata, kept)


def _write_json_durably(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as handle:
        json.dump(data, handle, indent=1, sort_keys=True)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def file_entries(path: Path) -> list[dict[str, Any]]:
    """Name, size and CRC-32 of every file of the checkpoint in ``path``, for its commit marker.

    Data files take the sums their writers recorded; the few the coordinator wrote last (``.metadata``,
    ``CHECKSUMS.json``) are small and summed here.
    """
    recorded: dict[str, str] = {}
    sums_file = Path(path) / CHECKSUMS
    if sums_file.is_file():
        recorded = json.loads(sums_file.read_text())
    entries = layout.list_files(path)
    for entry in entries:
        entry["crc32"] = recorded.get(entry["name"]) or crc32_file(Path(path) / entry["name"])
    return entries


def verify(path: Path, checksums: bool = True, files: list[str] | None = None) -> list[str]:
    """Problems found in the checkpoint at ``path`` (empty list: it is intact).

    Checks the marker, then every file it lists (or only ``files``): present, the recorded size and, with
    ``checksums``, the recorded CRC-32.
    """
    try:
        marker = layout.read_marker(path)
    except ValueError as exc:
        return [str(exc)]
    problems = []
    for entry in marker["files"]:
        if files is not None and entry["name"] not in files:
            continue
        file = Path(path) / entry["name"]
        if not file.is_file():
            problems.append(f"missing file {entry['name']}")
            continue
        size = file.stat().st_size
        if size != entry["size"]:
            problems.append(f"{entry['name']} is {size} bytes, the marker says {entry['size']}")
        elif checksums and "crc32" in entry and crc32_file(file) != entry["crc32"]:
            problems.append(f"{entry['name']} fails its checksum (crc32 {crc32_file(file)}, marker {entry['crc32']})")
    return problems
