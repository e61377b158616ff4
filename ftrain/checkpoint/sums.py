"""The running checksums of checkpoint files: xxHash's xxh3-64 for new checkpoints, zlib's CRC-32 for older ones."""

from __future__ import annotations

import zlib
from pathlib import Path
from typing import Any

import xxhash

# A file entry's checksum key in a commit marker (the algorithm's name)
CRC32, XXH3 = "crc32", "xxh3_64"
_CHUNK = 8 << 20
SUM_KEYS = (XXH3, CRC32)  # what verification accepts, preferred first
WRITE_SUM = XXH3  # what new checkpoints record


class Summer:
    """A running checksum of one algorithm (both release the GIL on large buffers)."""

    def __init__(self, algorithm: str = WRITE_SUM) -> None:
        self._crc = 0
        self._xxh = xxhash.xxh3_64() if algorithm == XXH3 else None

    def update(self, data: Any) -> None:
        if self._xxh is not None:
            self._xxh.update(data)
        else:
            self._crc = zlib.crc32(data, self._crc)

    def hexdigest(self) -> str:
        return self._xxh.hexdigest() if self._xxh is not None else f"{self._crc:08x}"


def buffer_sum(data: Any, algorithm: str = WRITE_SUM) -> str:
    """The checksum of one buffer (bytes, a memoryview, a mapping's view), as ``Summer`` gives it for the same
    bytes; ValueError for an algorithm not in ``SUM_KEYS``."""
    if algorithm == XXH3:
        return f"{xxhash.xxh3_64_intdigest(data):016x}"
    if algorithm == CRC32:
        return f"{zlib.crc32(data):08x}"
    raise ValueError(f"unknown checksum algorithm {algorithm!r}")


def file_sum(path: Path, algorithm: str = WRITE_SUM) -> str:
    summer = Summer(algorithm)
    buffer = bytearray(_CHUNK)  # one buffer, refilled: a fresh 8 MB bytes per read would fault in new pages each time
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as handle:
        while got := handle.readinto(buffer):
            summer.update(view[:got])
    return summer.hexdigest()
