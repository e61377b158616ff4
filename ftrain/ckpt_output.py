"""``ftrain-ckpt convert``'s output: whether convert may write a path (an existing one only if it is an earlier
output of convert that lies in no checkpoint and no run directory), and writing it atomically."""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path
from typing import Any

from ftrain.checkpoint import layout
from ftrain.checkpoint.lock import DOOR_NAME, LOCK_NAME
from ftrain.checkpoint.run_dir import CHECKPOINTS_DIR, RUN_ID_NAME

RUN_MARKS = (LOCK_NAME, DOOR_NAME, RUN_ID_NAME)  # files only ftrain puts at the top of a run directory
MAX_SAFETENSORS_HEADER = 100 << 20  # the safetensors format's own limit on its JSON header


def is_checkpoint(path: Path) -> bool:
    return (path / layout.DCP_METADATA).is_file() or (path / layout.MARKER).is_file()


def output_problem(out: Path, overwrite: bool, kind: str = "torch") -> str:
    """Why convert may not write ``out`` ("" if it may): it lies under a file, or it exists, unless ``overwrite``
    and it is an earlier output of the same ``kind`` ("torch", "safetensors": a file; "export": a directory)."""
    parent = next((p for p in [out.parent, *out.parent.parents] if p.exists()), None)
    if parent is not None and not parent.is_dir():
        return f"{out}: {parent} is not a directory"
    if not (out.exists() or out.is_symlink()):
        return ""
    if kind != "export" and out.is_dir():
        return f"{out} is a directory; give the output file's name"
    if kind == "export" and not out.is_dir():
        return f"{out} is not a directory (a *.safetensors name writes one file)"
    problem = why_not_replaceable(out, kind)
    if problem:
        return (
            f"{out} already exists and {problem}; --overwrite replaces only an earlier output of convert "
            "(give another path)"
        )
    if not overwrite:
        return f"{out} already exists (--overwrite to replace it)"
    return ""


def why_not_replaceable(out: Path, kind: str) -> str:
    """Why the existing ``out`` is not an earlier output of this ``kind`` that convert may replace ("" if it is)."""
    from ftrain.checkpoint import export

    if out.is_symlink():
        return "is a symbolic link"
    owner = enclosing_run_or_checkpoint(out)
    if owner is not None:
        what, where = owner
        return f"is a {what}" if where == out.resolve() else f"lies in the {what} {where}"
    if kind == "torch" and not is_torch_file(out):
        return "is not a torch.save file"
    if kind == "safetensors" and not is_safetensors_file(out):
        return "is not a safetensors file"
    if kind == "export":
        return export.replace_problem(out)
    return ""


def enclosing_run_or_checkpoint(path: Path) -> tuple[str, Path] | None:
    """The nearest of ``path`` (resolved) and its parents that is a checkpoint, a run directory or a run's
    ``checkpoints/`` folder, as (what, where); ``None`` if there is none."""
    for candidate in [path.resolve(), *path.resolve().parents]:
        if is_checkpoint(candidate):
            return "checkpoint", candidate
        if any((candidate / name).exists() for name in RUN_MARKS) or layout.scan(candidate / CHECKPOINTS_DIR):
            return "run directory", candidate
        if layout.scan(candidate):
            return "checkpoints folder", candidate
    return None


def is_torch_file(path: Path) -> bool:
    """``path`` is a torch.save archive: a zip file whose entries sit under one folder holding ``data.pkl``."""
    try:
        with open(path, "rb") as handle:
            if handle.read(4) != b"PK\x03\x04":
                return False
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (OSError, zipfile.BadZipFile, ValueError):
        return False
    roots = {name.split("/", 1)[0] for name in names}
    return len(roots) == 1 and f"{roots.pop()}/data.pkl" in names


def is_safetensors_file(path: Path) -> bool:
    """``path`` starts as a safetensors file does: an 8-byte little-endian length, then that much JSON object."""
    try:
        with open(path, "rb") as handle:
            size = int.from_bytes(handle.read(8), "little")
            if not 2 <= size <= MAX_SAFETENSORS_HEADER or size + 8 > os.fstat(handle.fileno()).st_size:
                return False
            header = json.loads(handle.read(size))
    except (OSError, ValueError):
        return False
    return isinstance(header, dict)


def write_atomically(out: Path, write: Any) -> None:
    """``write(tmp)`` next to ``out``, then rename: a failed convert leaves no partial file behind."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
