"""TensorBoard scalars written without importing TensorBoard.

Importing ``torch.utils.tensorboard`` (TensorBoard, its protobuf stubs) is slow, and rank 0 pays it again in every
restarted process while the other ranks wait for it at the first step: a large share of what a relaunch costs
beyond torchrun's own floor (docs/bench.md). ftrain writes scalars only, so it writes TensorBoard's event file
itself: TFRecord framing (length, masked CRC-32C, data, masked CRC-32C) around hand-encoded ``Event`` protos.
Reading stays with TensorBoard (``ftrain.events``), which checks every record it reads.

Same behaviour as ``SummaryWriter`` where ftrain relies on it: one new file per writer
(``events.out.tfevents.<time in ns>.<host>.<pid>.<n>``), ``purge_step`` (a session-start event that makes TensorBoard drop
what an earlier attempt logged at or after that step), wall time at ``add_scalar``. Records are buffered and
written by ``flush()`` (ftrain flushes before each checkpoint commits), or when ``FLUSH_BYTES`` or ``FLUSH_S`` is
reached; an I/O error is raised as ``OSError`` to the caller (``ftrain.metrics`` pauses logging on it).
"""

from __future__ import annotations

import itertools
import os
import socket
import struct
import time
from pathlib import Path

FILE_VERSION = b"brain.Event:2"
FLUSH_BYTES = 64 << 10
FLUSH_S = 30.0
_SESSION_START = 1  # tensorboard's SessionLog.START
_UIDS = itertools.count()


class ScalarWriter:
    """``add_scalar`` / ``flush`` / ``close`` of TensorBoard's ``SummaryWriter``, for scalars."""

    def __init__(self, log_dir: str | Path, purge_step: int | None = None) -> None:
        # Nanoseconds, not SummaryWriter's seconds: TensorBoard reads a directory's files in name order and applies a
        # purge to what it read before it, so a resumed writer's file must sort after the one it purges, also when
        # both are made within one second (a rollback reopens the writer in the same process).
        name = "events.out.tfevents.%019d.%s.%s.%s" % (time.time_ns(), socket.gethostname(), os.getpid(), next(_UIDS))
        Path(log_dir).mkdir(parents=True, exist_ok=True)
        self.path = Path(log_dir) / name
        self._file = open(self.path, "wb")
        self._pending = bytearray()
        self._written_at = time.monotonic()
        self._record(_event(wall_time=time.time(), file_version=FILE_VERSION))
        if purge_step is not None:
            self._record(_event(step=purge_step, file_version=FILE_VERSION))
            self._record(_event(step=purge_step, session_log=_field_varint(1, _SESSION_START)))
        self.flush()

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        value_proto = _field_bytes(1, tag.encode()) + b"\x15" + struct.pack("<f", float(value))
        self._record(_event(wall_time=time.time(), step=int(step), summary=_field_bytes(1, value_proto)))
        if len(self._pending) >= FLUSH_BYTES or time.monotonic() - self._written_at >= FLUSH_S:
            self.flush()

    def flush(self) -> None:
        if self._pending:
            self._file.write(self._pending)
            self._pending.clear()
        self._file.flush()
        self._written_at = time.monotonic()

    def close(self) -> None:
        if self._file.closed:
            return
        try:
            self.flush()
        finally:
            self._file.close()

    def _record(self, data: bytes) -> None:
        header = struct.pack("<Q", len(data))
        self._pending += header + struct.pack("<I", _masked_crc32c(header)) + data
        self._pending += struct.pack("<I", _masked_crc32c(data))


def _event(
    *, wall_time: float = 0.0, step: int = 0, file_version: bytes = b"", summary: bytes = b"", session_log: bytes = b""
) -> bytes:
    """An ``Event`` proto (tensorboard/compat/proto/event.proto): fields 1 wall_time, 2 step, 3 file_version,
    5 summary, 7 session_log; a field at its default is left out, as protobuf does."""
    out = bytearray()
    if wall_time:
        out += b"\x09" + struct.pack("<d", wall_time)
    if step:
        out += _field_varint(2, step)
    if file_version:
        out += _field_bytes(3, file_version)
    if summary:
        out += _field_bytes(5, summary)
    if session_log:
        out += _field_bytes(7, session_log)
    return bytes(out)


def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # int64 as protobuf encodes it (a negative step takes ten bytes)
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _field_varint(number: int, value: int) -> bytes:
    return _varint(number << 3) + _varint(value)


def _field_bytes(number: int, data: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(data)) + data


def _crc32c_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return table


_TABLE = _crc32c_table()


def _masked_crc32c(data: bytes) -> int:
    """TFRecord's checksum: CRC-32C (Castagnoli), rotated and offset."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    crc ^= 0xFFFFFFFF
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF
