"""A read-only, seekable raw stream of a known size: the part that a window into a file and a ranged reader of an
object share (``direct_read._Window``, ``storage.s3_io.RangedReader``). A subclass sets ``size`` and implements
``readinto`` from ``position``."""

from __future__ import annotations

import io


class SizedReader(io.RawIOBase):
    """``size`` bytes, read from ``position``; seeking clamps to ``[0, size]``."""

    size: int
    position: int = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.position, io.SEEK_END: self.size}[whence]
        self.position = max(0, min(self.size, base + offset))
        return self.position
