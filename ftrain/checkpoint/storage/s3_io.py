"""The byte streams of ``S3Storage``: ranged reads, multipart uploads, and DCP's ``FileSystemBase`` over them."""

from __future__ import annotations

import io
import os
import re
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Generator

from ftrain import faults
from ftrain.checkpoint.byte_streams import SizedReader
from ftrain.checkpoint.storage.base import DCP_TEMPORARY_SUFFIX, StorageError

if TYPE_CHECKING:
    from ftrain.checkpoint.storage.s3 import S3Storage

PART_BYTES = 16 << 20  # multipart part size (S3's minimum is 5 MiB for all parts but the last)
UPLOADS_IN_FLIGHT = 2  # parts of one file uploading at once while the next part is filled
READ_AHEAD_BYTES = 16 << 20  # one ranged GET per this many bytes read in order
_STEP = re.compile(r"(?:^|/)step_(\d{8})/")  # the step of a file being written (for fault points)


def describe_s3_error(exc: Exception) -> str:
    """One line for a client error: the code and message the store gave, or the exception's text."""
    response = getattr(exc, "response", None)
    if response:
        error = response.get("Error", {})
        return f"{error.get('Code', '?')}: {error.get('Message', '') or str(exc)}".strip()
    return " ".join(str(exc).split())[:300]


class RangedReader(SizedReader):
    """A seekable read-only stream over one object. A read of ``READ_AHEAD_BYTES`` or more is one ranged GET
    straight into the caller's buffer (a tensor read into its target); smaller ones are served from a window of
    ``READ_AHEAD_BYTES`` fetched at once, so the many small reads of parsing an item (its archive's headers) cost
    one request per window, not one each. Loaders read a file in order, so windows are rarely fetched twice."""

    def __init__(self, storage: S3Storage, name: str) -> None:
        self.storage, self.name, self.position = storage, name, 0
        self.size = storage.file_size(name)
        self.window, self.window_start = b"", 0

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        wanted = min(len(view), self.size - self.position)
        if wanted <= 0:
            return 0
        if wanted >= READ_AHEAD_BYTES:
            return self._get_into(view, wanted)
        offset = self.position - self.window_start
        if not 0 <= offset < len(self.window):
            self.window_start, offset = self.position, 0
            self.window = bytearray(min(READ_AHEAD_BYTES, self.size - self.position))
            saved = self.position
            self._get_into(memoryview(self.window), len(self.window))
            self.position = saved
        got = min(wanted, len(self.window) - offset)
        view[:got] = self.window[offset : offset + got]
        self.position += got
        return got

    def _get_into(self, view: memoryview, wanted: int) -> int:
        """One ranged GET of ``wanted`` bytes at the position into ``view``."""
        end = self.position + wanted - 1
        try:
            response = self.storage.client.get_object(
                Bucket=self.storage.bucket, Key=self.storage.key(self.name), Range=f"bytes={self.position}-{end}"
            )
        except Exception as exc:
            raise StorageError(f"reading {self.storage.describe(self.name)}: {describe_s3_error(exc)}") from None
        body, got = response["Body"], 0
        while got < wanted:
            chunk = body.read(min(wanted - got, 8 << 20))
            if not chunk:
                break
            view[got : got + len(chunk)] = chunk
            got += len(chunk)
        self.position += got
        return got


class Upload(io.RawIOBase):
    """A write stream that becomes one object when closed: a single PUT when small, else a multipart upload whose
    parts (``PART_BYTES``) are sent in the background as they fill. ``abort`` (or a failed part) leaves nothing.

    Every byte written is copied once, into the buffer of its part, which is then sent as it is: the first part's
    buffer grows with what is written (a small file costs what it holds), the later ones are whole parts, reused
    once their part is on the store (at most ``UPLOADS_IN_FLIGHT`` + 1 buffers per upload)."""

    def __init__(self, storage: S3Storage, key: str, pool: ThreadPoolExecutor, step: int | None = None) -> None:
        self.storage, self.key, self.pool, self.step = storage, key, pool, step
        self.buffer = bytearray()  # the part being filled: ``filled`` bytes of it hold data
        self.filled = 0
        self.spare: list[bytearray] = []  # whole-part buffers whose part is on the store
        self.written = 0
        self.upload_id: str | None = None
        self.parts: list[Future] = []
        self.finished = False

    def writable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.written

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        total = len(view)
        self.written += total
        while view:
            room = PART_BYTES - self.filled
            take = view[:room]
            if len(self.buffer) >= PART_BYTES:  # a whole-part buffer: filled in place
                self.buffer[self.filled : self.filled + len(take)] = take
            else:  # the first part's: grows
                self.buffer += take
            self.filled += len(take)
            view = view[len(take):]
            if self.filled == PART_BYTES:
                self._send_part(self.buffer)
                self.buffer = self.spare.pop() if self.spare else bytearray(PART_BYTES)
                self.filled = 0
        return total

    def _send_part(self, data: bytearray) -> None:
        """Send ``data`` (a buffer not written to again until its part is on the store) as the next part."""
        client, bucket = self.storage.client, self.storage.bucket
        if self.upload_id is None:
            self.upload_id = client.create_multipart_upload(Bucket=bucket, Key=self.key)["UploadId"]
        number = len(self.parts) + 1
        while sum(not part.done() for part in self.parts) >= UPLOADS_IN_FLIGHT:
            next(part for part in self.parts if not part.done()).exception()  # wait for the oldest
        upload_id = self.upload_id

        def send() -> dict[str, Any]:
            etag = client.upload_part(Bucket=bucket, Key=self.key, UploadId=upload_id, PartNumber=number, Body=data)
            if len(data) == PART_BYTES:
                self.spare.append(data)  # (list.append is atomic) the part is on the store: its buffer is free
            return {"PartNumber": number, "ETag": etag["ETag"]}

        self.parts.append(self.pool.submit(send))
        if number == 1 and self.step is not None:
            self.parts[0].result()
            faults.pause_point(faults.WHILE_UPLOADING, self.step)

    def close(self) -> None:
        if self.finished or self.closed:
            super().close()
            return
        self.finished = True
        client, bucket = self.storage.client, self.storage.bucket
        try:
            if self.upload_id is None:  # never a whole part: the first part's buffer holds exactly the file
                client.put_object(Bucket=bucket, Key=self.key, Body=self.buffer)
            else:
                if self.filled:
                    whole = self.filled == len(self.buffer)
                    self._send_part(self.buffer if whole else self.buffer[: self.filled])
                parts = [part.result() for part in self.parts]
                client.complete_multipart_upload(
                    Bucket=bucket, Key=self.key, UploadId=self.upload_id, MultipartUpload={"Parts": parts}
                )
        except BaseException:
            self.abort()
            raise
        finally:
            self.buffer, self.spare = bytearray(), []
            super().close()

    def abort(self) -> None:
        """Give up: no object appears, and the parts sent are freed on the store."""
        self.finished = True
        self.buffer, self.spare = bytearray(), []
        if self.upload_id is not None:
            for part in self.parts:
                part.cancel()
            try:
                self.storage.client.abort_multipart_upload(
                    Bucket=self.storage.bucket, Key=self.key, UploadId=self.upload_id
                )
            except Exception:  # the store's lifecycle rules, or the next start's cleanup, get the rest
                pass
            self.upload_id = None


def upload_pool() -> ThreadPoolExecutor:
    """The pool that sends every upload's parts in this process, made at the first upload and kept: a file system
    object is made per save (and per writer process), and a pool of its own would start threads each time and
    leave them to the garbage collector."""
    global _upload_pool
    with _upload_pool_lock:
        if _upload_pool is None:
            _upload_pool = ThreadPoolExecutor(max_workers=UPLOADS_IN_FLIGHT * 4, thread_name_prefix="ftrain-s3-upload")
        return _upload_pool


_upload_pool: ThreadPoolExecutor | None = None
_upload_pool_lock = threading.Lock()


class S3FileSystem:
    """DCP's ``FileSystemBase`` over one ``S3Storage``: what ``FileSystemWriter``/``FileSystemReader`` write and
    read through. Paths are ``s3://bucket/key`` strings.

    DCP writes ``.metadata`` under a temporary name and renames it. Without rename that is an upload, a HEAD, a
    copy and a delete for an object that appears whole or not at all anyway; so a file written under a ``.tmp``
    name is held in memory and uploaded once, under its final name, when it is renamed. A writer that dies
    before the rename leaves nothing, as a temporary object left behind would be: no ``.metadata``."""

    def __init__(self, storage: S3Storage) -> None:
        self.storage = storage
        self._held: dict[str, bytes] = {}

    def _name(self, path: str | os.PathLike) -> str:
        """The storage name of an ``s3://`` path under this storage's prefix."""
        text = str(path)
        root = self.storage.url + "/"
        if not text.startswith(root):
            raise StorageError(f"{text} is not under {self.storage.url}")
        return text[len(root):]

    @contextmanager
    def create_stream(self, path: str | os.PathLike, mode: str) -> Generator[Any, None, None]:
        name = self._name(path)
        if mode == "rb":
            with self.storage.open_read(name) as stream:
                yield stream
            return
        if mode != "wb":
            raise ValueError(f"S3FileSystem streams are 'rb' or 'wb', not {mode!r}")
        if name.endswith(DCP_TEMPORARY_SUFFIX):
            held = io.BytesIO()
            yield held
            self._held[name] = held.getvalue()
            return
        step = _STEP.search(name)
        stream = Upload(self.storage, self.storage.key(name), upload_pool(), int(step.group(1)) if step else None)
        try:
            yield stream
            stream.close()
        except BaseException:
            stream.abort()
            raise

    def concat_path(self, path: str | os.PathLike, suffix: str) -> str:
        return f"{str(path).rstrip('/')}/{suffix}"

    def init_path(self, path: str | os.PathLike) -> str:
        return str(path).rstrip("/")

    def rename(self, path: str | os.PathLike, new_path: str | os.PathLike) -> None:
        """A held file: one upload under the new name. Any other object: copy, then delete."""
        storage = self.storage
        held = self._held.pop(self._name(path), None)
        if held is not None:
            storage.write_atomic(self._name(new_path), held)
            return
        source, target = storage.key(self._name(path)), storage.key(self._name(new_path))
        storage.client.copy({"Bucket": storage.bucket, "Key": source}, storage.bucket, target)
        storage.client.delete_object(Bucket=storage.bucket, Key=source)

    def mkdir(self, path: str | os.PathLike) -> None:
        """Nothing to do: prefixes need no creation."""

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike) -> bool:
        return str(checkpoint_id).startswith(SCHEME)

    def exists(self, path: str | os.PathLike) -> bool:
        name = self._name(path)
        if name in self._held:
            return True
        if name + DCP_TEMPORARY_SUFFIX in self._held:
            return False  # the target of a held file: its one upload replaces whatever is there, no need to look
        return self.storage.exists(name)

    def rm_file(self, path: str | os.PathLike) -> None:
        if self._held.pop(self._name(path), None) is not None:
            return
        self.storage.client.delete_object(Bucket=self.storage.bucket, Key=self.storage.key(self._name(path)))

    def ls(self, path: str | os.PathLike) -> list[str]:
        return [self.concat_path(path, info.name) for info in self.storage.files(self._name(path))]
