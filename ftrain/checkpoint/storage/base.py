"""The seam every byte of the durable tier goes through: ``Storage`` and the checkpoint directories in it.

A storage is a root holding step directories of files (``layout.py`` names them). Everything ftrain does to
durable checkpoints is one of the operations below; DCP's own reads and writes of the data files go through
``dcp_filesystem()``, DCP's ``FileSystemBase`` seam, so the writer and reader classes are DCP's and are not
wrapped twice.

What every implementation guarantees (``posix.py`` and ``s3.py`` say how):

* ``write_atomic``: after it returns the file holds all of the new bytes, durably; after a crash at any instant
  it holds its old content (or does not exist) or all of the new. The commit marker is written with it.
* A data file DCP writes through ``dcp_filesystem()`` is durable once its stream is closed with
  ``dcp_sync_files`` honoured; DCP writes ``.metadata`` only after every rank's files are closed.
* ``remove_dir``: no instant of a removal leaves a directory whose marker is present while a file it lists is
  gone (the directory leaves the ``step_*`` namespace first, or its marker goes first).
* Listings may lag behind writes on some stores; nothing decides completeness from a listing alone: a
  checkpoint is complete only if its marker can be read, and the marker lists the files.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any


# The commit marker's name is part of the seam: a store without atomic rename deletes it first (``remove_dir``).
MARKER_NAME = "COMPLETE"
DCP_TEMPORARY_SUFFIX = ".tmp"  # DCP writes .metadata under its name + this, then renames it


class StorageError(OSError):
    """A file that exists but is not a regular file of the checkpoint (e.g. a link out of it), or a store that
    refused an operation; the message is one line."""


@dataclass(frozen=True)
class FileInfo:
    name: str
    size: int


class Storage(ABC):
    """Durable checkpoints under one root. ``name`` arguments are relative to the root: a directory name, or
    ``"dir/file"``."""

    #: Whether ``local_path`` names a file on this machine's file system.
    is_local: bool = False

    @abstractmethod
    def describe(self, name: str = "") -> str:
        """The root, or ``name`` under it, as a user would write it (a path or a URL)."""

    def local_path(self, name: str = "") -> Path:
        raise StorageError(f"{self.describe(name)} is not on a local file system")

    def make_root(self) -> None:
        """Create the root if this store needs it to exist before anything is written under it."""

    # listing
    @abstractmethod
    def dirs(self) -> list[str]:
        """Names of the directories directly under the root (none when the root does not exist)."""

    def dirs_holding(self, file_name: str) -> dict[str, bool]:
        """Every directory under the root, and whether it holds ``file_name`` (discovery: which step directories
        carry a marker). A store may answer this from one listing."""
        return {name: self.exists(f"{name}/{file_name}") for name in self.dirs()}

    @abstractmethod
    def files(self, dir_name: str) -> list[FileInfo]:
        """The regular files directly in ``dir_name``, sorted by name."""

    @abstractmethod
    def exists(self, name: str) -> bool:
        """Whether ``name`` is a file."""

    @abstractmethod
    def is_dir(self, name: str = "") -> bool:
        """Whether ``name`` (default: the root) is a directory holding anything (on object stores: a prefix)."""

    @abstractmethod
    def file_size(self, name: str) -> int:
        """The size of file ``name``: ``FileNotFoundError`` if missing, ``StorageError`` if it is not a regular
        file of its directory."""

    # reading
    @abstractmethod
    def read_bytes(self, name: str, limit: int | None = None) -> bytes:
        """The content of ``name`` (at most ``limit`` bytes); ``FileNotFoundError`` if missing."""

    @abstractmethod
    def open_read(self, name: str) -> AbstractContextManager[IO[bytes]]:
        """A seekable binary stream over ``name``."""

    @abstractmethod
    def checksum(self, name: str, algorithm: str) -> str:
        """The checksum (``sums.py`` algorithm) of the whole of ``name``."""

    # writing
    @abstractmethod
    def write_atomic(self, name: str, data: bytes, tmp_name: str | None = None) -> None:
        """Write ``name`` whole or not at all, durably (see the module docstring). ``tmp_name``: where a store
        that needs one stages the bytes first (default ``name + ".tmp"``)."""

    @abstractmethod
    def sync_dir(self, dir_name: str) -> None:
        """Make the entries of ``dir_name`` (files created or renamed into it) durable."""

    @abstractmethod
    def remove_dir(self, dir_name: str) -> None:
        """Delete a directory and everything in it, so that no instant of it looks like a complete checkpoint."""

    @abstractmethod
    def move_dir(self, dir_name: str, new_name: str) -> None:
        """Move a directory to ``new_name`` (parents made), its marker arriving last where that is not atomic."""

    # DCP
    @abstractmethod
    def dcp_path(self, dir_name: str) -> str:
        """The checkpoint id DCP's writer and reader get for ``dir_name`` (paths are made by ``dcp_filesystem``)."""

    @abstractmethod
    def dcp_filesystem(self) -> Any:
        """A fresh ``torch.distributed.checkpoint.filesystem.FileSystemBase`` for this storage."""

    #: Whether DCP should fsync each file it writes (a local disk); object stores are durable when an upload ends.
    dcp_sync_files: bool = True

    def abort_unfinished_writes(self) -> int:
        """Free what writes killed half way left outside any directory (object stores: open multipart uploads).
        Returns how many; called at a start, before any save."""
        return 0

    def free_space_note(self) -> str:
        """A short note on free space, for an error message of a failed write ('' when unknown)."""
        return ""


@dataclass(frozen=True)
class CheckpointDir:
    """One checkpoint's directory in a storage."""

    storage: Storage
    name: str

    def file(self, file_name: str) -> str:
        """The storage name of a file in this directory."""
        return f"{self.name}/{file_name}"

    @property
    def path(self) -> Path:
        """The local path (POSIX storage only)."""
        return self.storage.local_path(self.name)

    def __str__(self) -> str:
        return self.storage.describe(self.name)
