"""Where durable checkpoints live: the ``Storage`` seam (``base.py``) and its implementations.

``open_storage`` turns a location (a path, or a URL such as ``s3://bucket/prefix``) into a storage;
``checkpoint_at`` does the same for one checkpoint directory.
"""

from __future__ import annotations

import os
from pathlib import Path

from ftrain.checkpoint.storage.base import CheckpointDir, FileInfo, Storage, StorageError
from ftrain.checkpoint.storage.posix import PosixStorage

__all__ = ["CheckpointDir", "FileInfo", "PosixStorage", "Storage", "StorageError", "checkpoint_at", "open_storage", "is_url"]


def is_url(location: object) -> bool:
    return isinstance(location, str) and "://" in location


def open_storage(location: Storage | str | os.PathLike[str]) -> Storage:
    """The storage at ``location``: a ``Storage`` as is, a local path, or an ``s3://`` URL."""
    if isinstance(location, Storage):
        return location
    if is_url(location):
        scheme = str(location).split("://", 1)[0].lower()
        if scheme == "s3":
            from ftrain.checkpoint.storage.s3 import S3Storage

            try:
                return S3Storage(str(location))
            except ValueError as exc:
                raise StorageError(str(exc)) from None
        raise StorageError(f"{location}: unsupported storage scheme {scheme}:// (a local path or s3://bucket/prefix)")
    return PosixStorage(Path(location).expanduser())


def checkpoint_at(location: CheckpointDir | str | os.PathLike[str]) -> CheckpointDir:
    """One checkpoint directory: as is, or from its path or URL (the storage is its parent)."""
    if isinstance(location, CheckpointDir):
        return location
    text = str(location).rstrip("/")
    if is_url(text):
        parent, _, name = text.rpartition("/")
        return CheckpointDir(open_storage(parent), name)
    path = Path(location).expanduser()
    return CheckpointDir(PosixStorage(path.parent), path.name)
