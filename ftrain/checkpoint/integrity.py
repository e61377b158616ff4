"""Checksums recorded at save time, and verifying a checkpoint against its commit marker.

Each rank checksums the files it just wrote (from the page cache, in DCP's background writer, off the
training loop) and sends the sums to the coordinator inside DCP's own gather of write results. The
coordinator writes them to ``CHECKSUMS.json`` before DCP's ``.metadata``; the commit marker then records, for
every file, its size and CRC-32 (zlib's: about 4 GB/s here, no extra dependency).
"""

from __future__ import annotations

import json
import os
import zlib
from pathlib import Path
from typing import Any

from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex
from torch.distributed.checkpoint.planner import SavePlan, SavePlanner
from torch.distributed.checkpoint.storage import WriteResult
from torch.futures import Future

from ftrain.checkpoint import layout

CHECKSUMS = "CHECKSUMS.json"
_SUMS_KEY = "__ftrain_checksums__"
_CHUNK = 8 << 20


def crc32_file(path: Path) -> str:
    crc = 0
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
    return f"{crc:08x}"


class ChecksummingWriter(FileSystemWriter):
    """``FileSystemWriter`` that also records a CRC-32 of every data file in ``CHECKSUMS.json``."""

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        results = super().write_data(plan, planner).wait()
        files = sorted({result.storage_data.relative_path for result in results})
        sums = {name: crc32_file(Path(self.path) / name) for name in files}
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
