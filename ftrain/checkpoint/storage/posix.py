"""Durable checkpoints on a local or shared POSIX file system (the default storage).

How the guarantees of ``base.Storage`` hold here:

* ``write_atomic``: write to a temporary name, fsync it, ``rename`` over the target (atomic on POSIX), fsync
  the directory so the rename itself survives a power loss.
* DCP's data files are fsynced as they are closed (``dcp_sync_files``), and ``sync_dir`` fsyncs the step
  directory before its marker is written, so the marker never names a file whose directory entry could vanish.
* ``remove_dir`` renames the directory out of the ``step_*`` namespace (atomic), fsyncs the parent, then deletes.
* A file that is a symbolic link is read only if it resolves to a file of the same directory.
"""

from __future__ import annotations

import json
import os
import shutil
from contextlib import AbstractContextManager
from pathlib import Path
from typing import IO, Any

from ftrain.checkpoint.storage.base import FileInfo, Storage, StorageError
from ftrain.checkpoint.sums import file_sum

TRASH_SUFFIX = ".deleting"  # a directory being removed (renamed out of the step_* namespace first)


class PosixStorage(Storage):
    is_local = True
    dcp_sync_files = True

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"PosixStorage({str(self.root)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PosixStorage) and other.root == self.root

    def __hash__(self) -> int:
        return hash(self.root)

    def describe(self, name: str = "") -> str:
        return str(self.local_path(name))

    def local_path(self, name: str = "") -> Path:
        return self.root / name if name else self.root

    def make_root(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)

    def dirs(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return [entry.name for entry in self.root.iterdir() if entry.is_dir()]

    def files(self, dir_name: str) -> list[FileInfo]:
        return [
            FileInfo(p.name, p.stat().st_size)
            for p in sorted(self.local_path(dir_name).iterdir())
            if p.is_file() and not p.is_symlink()
        ]

    def exists(self, name: str) -> bool:
        return self.local_path(name).is_file()

    def is_dir(self, name: str = "") -> bool:
        return self.local_path(name).is_dir()

    def file_size(self, name: str) -> int:
        path = self.local_path(name)
        if path.is_symlink():
            try:
                target = path.resolve(strict=True)
            except (OSError, RuntimeError):  # dangling, or a loop
                raise StorageError(f"{path.name} is a symbolic link to nothing readable") from None
            if target.parent != path.parent.resolve():
                raise StorageError(f"{path.name} is a symbolic link out of the checkpoint ({target})")
        if not path.is_file():
            raise FileNotFoundError(f"missing file {path.name}")
        return path.stat().st_size

    def read_bytes(self, name: str, limit: int | None = None) -> bytes:
        with open(self.local_path(name), "rb") as handle:
            return handle.read() if limit is None else handle.read(limit)

    def open_read(self, name: str) -> AbstractContextManager[IO[bytes]]:
        return open(self.local_path(name), "rb")

    def checksum(self, name: str, algorithm: str) -> str:
        return file_sum(self.local_path(name), algorithm)

    def write_atomic(self, name: str, data: bytes, tmp_name: str | None = None) -> None:
        path = self.local_path(name)
        write_bytes_durably(path, data, self.local_path(tmp_name) if tmp_name else None)

    def sync_dir(self, dir_name: str) -> None:
        fsync_dir(self.local_path(dir_name))

    def remove_dir(self, dir_name: str) -> None:
        path = self.local_path(dir_name)
        if path.name.endswith(TRASH_SUFFIX):  # leftover of an interrupted delete
            shutil.rmtree(path, ignore_errors=True)
            return
        trash = path.with_name(path.name + TRASH_SUFFIX)
        if trash.exists():
            shutil.rmtree(trash, ignore_errors=True)
        os.replace(path, trash)
        fsync_dir(path.parent)
        shutil.rmtree(trash, ignore_errors=True)

    def move_dir(self, dir_name: str, new_name: str) -> None:
        target = self.local_path(new_name)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(self.local_path(dir_name), target)
        fsync_dir(self.root)

    def dcp_path(self, dir_name: str) -> str:
        return str(self.local_path(dir_name))

    def dcp_filesystem(self) -> Any:
        from torch.distributed.checkpoint.filesystem import FileSystem

        return FileSystem()

    def free_space_note(self) -> str:
        """Torch's writer reports a full disk as 'unexpected pos ...': say how much room there is."""
        try:
            free = shutil.disk_usage(self.root).free
        except OSError:
            return ""
        return f" ({free / 1e6:.1f} MB free on the checkpoint filesystem)"


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_bytes_durably(path: Path, data: bytes, tmp: Path | None = None) -> None:
    """``path`` holds either its old content or all of ``data`` after any crash (tmp, fsync, rename, fsync dir)."""
    path = Path(path)
    tmp = Path(tmp) if tmp is not None else path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def write_text_durably(path: Path, text: str, tmp: Path | None = None) -> None:
    """``write_bytes_durably`` of ``text`` (UTF-8)."""
    write_bytes_durably(path, text.encode(), tmp)


def write_json_durably(path: Path, data: Any, tmp: Path | None = None, sort_keys: bool = False) -> None:
    """``write_bytes_durably`` of ``data`` as JSON."""
    write_text_durably(path, json.dumps(data, indent=1, sort_keys=sort_keys), tmp)
