"""Checksums of a checkpoint's files, and verifying a checkpoint against its commit marker.

The sums of the data files are taken while they are written (``writer.CheckpointWriter``) and land in
``CHECKSUMS.json``; the commit marker then records, for every file, its size and CRC-32 (zlib's: about
4 GB/s here, no extra dependency).
"""

from __future__ import annotations

import json
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from ftrain.checkpoint import layout

CHECKSUMS = "CHECKSUMS.json"
_CHUNK = 8 << 20
VERIFY_THREADS = 4


def crc32_file(path: Path) -> str:
    crc = 0
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
    return f"{crc:08x}"


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
    ``checksums``, the recorded CRC-32. Files are checked ``VERIFY_THREADS`` at a time (reading and zlib's
    CRC-32 release the GIL), so a rank with several files reads them in parallel.
    """
    try:
        marker = layout.read_marker(path)
    except ValueError as exc:
        return [str(exc)]
    entries = [entry for entry in marker["files"] if files is None or entry["name"] in files]
    if not entries:
        return []
    with ThreadPoolExecutor(max_workers=min(VERIFY_THREADS, len(entries)), thread_name_prefix="ftrain-verify") as pool:
        found = list(pool.map(lambda entry: _check_file(Path(path), entry, checksums), entries))
    return [problem for problem in found if problem]


def _check_file(root: Path, entry: dict[str, Any], checksums: bool) -> str:
    file = root / entry["name"]
    if not file.is_file():
        return f"missing file {entry['name']}"
    size = file.stat().st_size
    if size != entry["size"]:
        return f"{entry['name']} is {size} bytes, the marker says {entry['size']}"
    if checksums and "crc32" in entry:
        actual = crc32_file(file)
        if actual != entry["crc32"]:
            return f"{entry['name']} fails its checksum (crc32 {actual}, marker {entry['crc32']})"
    return ""
