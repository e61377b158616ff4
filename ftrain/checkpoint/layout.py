"""The on-disk layout of checkpoints: step directories, the commit marker, discovery and retention.

    {run.dir}/checkpoints/step_{N:08d}/            DCP files of step N (``*.distcp``, ``.metadata``)
    {run.dir}/checkpoints/step_{N:08d}/COMPLETE    commit marker (JSON); the checkpoint counts only if it exists

A directory without ``COMPLETE`` is incomplete: ignored by discovery and removed by ``purge``. Deleting a
checkpoint first renames it out of the ``step_*`` namespace (atomic), so a crash in the middle of a delete
never leaves something that looks complete.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MARKER = "COMPLETE"
# Under the run directory (beside ``checkpoints/``): the run's identity, made at its first use, and the timeline the
# current attempt trains on (local snapshots of another timeline are never resumed).
RUN_ID_NAME = "RUN_ID"
TIMELINE_NAME = "TIMELINE"
MARKER_TMP = "COMPLETE.tmp"
DCP_METADATA = ".metadata"  # DCP's index of every stored item; the marker must list it
DATA_SUFFIX = ".distcp"  # DCP's data files (one or more per rank); the rest of a checkpoint is small
# A file entry's checksum key in the marker, and the hex digits of its value (integrity.py computes them)
CRC32, XXH3 = "crc32", "xxh3_64"
SUM_DIGITS = {XXH3: 16, CRC32: 8}
FORMAT_VERSION = 2  # 2: the marker records ``state_keys`` (see ``keys.py``)
SUPPORTED_FORMAT_VERSIONS = (1, 2)
MAX_MARKER_BYTES = 16 << 20  # a marker lists a few files per rank: anything larger is not one of ours
_STEP_DIR = re.compile(r"^step_(\d{8})$")
_TRASH_SUFFIX = ".deleting"


def step_dir(root: Path, step: int) -> Path:
    return Path(root) / f"step_{step:08d}"


def parse_step(path: Path) -> int | None:
    match = _STEP_DIR.match(Path(path).name)
    return int(match.group(1)) if match else None


@dataclass(frozen=True)
class StepDir:
    step: int
    path: Path
    complete: bool


def scan(root: Path) -> list[StepDir]:
    """Every ``step_*`` directory under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for entry in root.iterdir():
        step = parse_step(entry)
        if step is not None and entry.is_dir():
            found.append(StepDir(step, entry, (entry / MARKER).is_file()))
    return sorted(found, key=lambda d: d.step)


def complete_steps(root: Path) -> list[StepDir]:
    return [d for d in scan(root) if d.complete]


def latest_complete(root: Path) -> StepDir | None:
    done = complete_steps(root)
    return done[-1] if done else None


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def is_data_file(name: str) -> bool:
    return name.endswith(DATA_SUFFIX)


def list_files(path: Path) -> list[dict[str, Any]]:
    """The checkpoint's data files with their sizes (the marker itself excluded)."""
    return [
        {"name": p.name, "size": p.stat().st_size}
        for p in sorted(Path(path).iterdir())
        if p.is_file() and not p.is_symlink() and p.name not in (MARKER, MARKER_TMP)
    ]


def write_marker(path: Path, info: dict[str, Any], files: list[dict[str, Any]]) -> dict[str, Any]:
    """Commit the checkpoint in ``path``: every file it holds must already be durable.

    ``files`` lists them (name, size, checksum). The marker is written to a temporary name, fsynced, renamed
    into place and the directory fsynced, so it exists either whole or not at all. Returns its content.
    """
    path = Path(path)
    fsync_dir(path)  # the data files' directory entries (DCP renames .metadata into place) are durable first
    marker = {
        "format_version": FORMAT_VERSION,
        **info,
        "committed_at": time.time(),
        "total_bytes": sum(f["size"] for f in files),
        "files": files,
    }
    validate_marker(marker, f"the marker for {path}")  # never commit what a reader would call damaged
    write_json_durably(path / MARKER, marker, tmp=path / MARKER_TMP)
    return marker


def write_json_durably(path: Path, data: Any, tmp: Path | None = None, sort_keys: bool = False) -> None:
    """Write ``data`` as JSON so that ``path`` holds either its old content or all of the new, after any crash:
    to ``tmp`` (default ``path`` + ``.tmp``), fsync, rename over ``path``, fsync the directory."""
    write_text_durably(path, json.dumps(data, indent=1, sort_keys=sort_keys), tmp)


def write_text_durably(path: Path, text: str, tmp: Path | None = None) -> None:
    """``path`` holds either its old content or all of ``text`` after any crash (tmp, fsync, rename, fsync dir)."""
    path = Path(path)
    tmp = Path(tmp) if tmp is not None else path.with_name(path.name + ".tmp")
    with open(tmp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


class MarkerError(ValueError):
    """A commit marker that is missing, unreadable or malformed: the checkpoint counts as damaged."""


class NewerFormatError(MarkerError):
    """A commit marker written by a newer ftrain: this one cannot say whether the checkpoint is intact."""


def read_marker(path: Path) -> dict[str, Any]:
    """The commit marker of a checkpoint, checked by ``validate_marker``; ``MarkerError`` (a ``ValueError``)
    with a one-line reason if it is missing, unreadable or malformed."""
    marker_path = Path(path) / MARKER
    try:
        with open(marker_path, "rb") as handle:
            raw = handle.read(MAX_MARKER_BYTES + 1)
        if len(raw) > MAX_MARKER_BYTES:
            raise ValueError(f"larger than {MAX_MARKER_BYTES >> 20} MB")
        marker = json.loads(raw)
    except FileNotFoundError:
        raise MarkerError(f"{path} is not a complete checkpoint (no {MARKER} marker)") from None
    except (OSError, ValueError, RecursionError) as exc:
        raise MarkerError(f"{marker_path} is unreadable: {' '.join(str(exc).split())[:200]}") from None
    validate_marker(marker, str(marker_path))
    return marker


def validate_marker(marker: Any, where: str = MARKER) -> None:
    """Check the structure and types of every field a reader uses; ``MarkerError`` names the first problem.

    Required: ``format_version`` (one this ftrain reads), ``step``, ``world_size``, ``committed_at``,
    ``total_bytes`` (the sum of the sizes) and ``files``: a non-empty list of ``{"name", "size"[, "xxh3_64" or "crc32"]}``
    with plain, distinct file names that include DCP's ``.metadata``. Optional fields, if present, have the
    types the writers give them (``state_keys``: role -> key prefix).
    """
    if not isinstance(marker, dict):
        raise MarkerError(f"{where} is malformed: a JSON {type(marker).__name__}, not an object")
    version = marker.get("format_version")
    if not _is_int(version):
        raise MarkerError(f"{where} is malformed: format_version is {_shown(version)}, not an integer")
    if version > max(SUPPORTED_FORMAT_VERSIONS):
        raise NewerFormatError(
            f"{where} was written by a newer ftrain (format_version {version}); this one reads "
            f"{min(SUPPORTED_FORMAT_VERSIONS)}-{max(SUPPORTED_FORMAT_VERSIONS)}"
        )
    if version not in SUPPORTED_FORMAT_VERSIONS:
        raise MarkerError(f"{where} is malformed: unknown format_version {version}")
    problem = _field_problem(marker)
    if problem:
        raise MarkerError(f"{where} is malformed: {problem}")


def _field_problem(marker: dict[str, Any]) -> str:
    """The first problem in the marker's fields ('' if none)."""
    for name, minimum in (("step", 0), ("world_size", 1), ("total_bytes", 0)):
        value = marker.get(name)
        if name not in marker:
            return f"no {name} field"
        if not _is_int(value) or value < minimum:
            return f"{name} is {_shown(value)}, not an integer >= {minimum}"
    committed = marker.get("committed_at")
    if isinstance(committed, bool) or not isinstance(committed, (int, float)) or not math.isfinite(committed):
        return f"committed_at is {_shown(committed)}, not a time"
    files = marker.get("files")
    if not isinstance(files, list) or not files:
        return f"files is {_shown(files)}, not a non-empty list"
    seen: set[str] = set()
    for i, entry in enumerate(files):
        problem = _file_entry_problem(entry)
        if problem:
            return f"files[{i}] {problem}"
        if entry["name"] in seen:
            return f"files lists {entry['name']} twice"
        seen.add(entry["name"])
    if DCP_METADATA not in seen:
        return f"files does not list DCP's {DCP_METADATA}"
    if marker["total_bytes"] != sum(entry["size"] for entry in files):
        return f"total_bytes {marker['total_bytes']} is not the sum of the file sizes"
    for name in ("mode", "run_name", "ftrain_version"):
        if marker.get(name) is not None and not isinstance(marker[name], str):
            return f"{name} is {_shown(marker[name])}, not a string"
    if "model" in marker and not isinstance(marker["model"], (dict, type(None))):
        return f"model is {_shown(marker['model'])}, not an object"
    recorded = marker.get("state_keys")
    if "state_keys" in marker and not (
        isinstance(recorded, dict) and all(isinstance(k, str) and isinstance(v, str) and v for k, v in recorded.items())
    ):
        return f"state_keys is {_shown(recorded)}, not a map of role names to key prefixes"
    return ""


def _file_entry_problem(entry: Any) -> str:
    if not isinstance(entry, dict):
        return f"is {_shown(entry)}, not an object"
    name = entry.get("name")
    if not isinstance(name, str):
        return f"name is {_shown(name)}, not a string"
    if not is_plain_name(name):
        return f"name {name!r} is not a plain file name inside the checkpoint"
    if not _is_int(entry.get("size")) or entry["size"] < 0:
        return f"({name}) size is {_shown(entry.get('size'))}, not an integer >= 0"
    for key, digits in SUM_DIGITS.items():
        if key in entry and not (isinstance(entry[key], str) and re.fullmatch(f"[0-9a-f]{{{digits}}}", entry[key])):
            return f"({name}) {key} is {_shown(entry[key])}, not {digits} hex digits"
    return ""


def is_plain_name(name: str) -> bool:
    """A file name with no directory part: not empty, no separator, not ``.``/``..``, no NUL."""
    return bool(name) and name not in (".", "..") and "/" not in name and "\\" not in name and "\0" not in name


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _shown(value: Any) -> str:
    """A short rendering of a JSON value for an error message."""
    if value is None:
        return "missing (or null)"
    text = json.dumps(value) if not isinstance(value, float) or math.isfinite(value) else repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def remove_dir(path: Path) -> None:
    """Delete a step directory so that no crash leaves it looking complete: rename out of the way, then delete."""
    path = Path(path)
    if path.name.endswith(_TRASH_SUFFIX):  # leftover of an interrupted delete
        shutil.rmtree(path, ignore_errors=True)
        return
    trash = path.with_name(path.name + _TRASH_SUFFIX)
    if trash.exists():
        shutil.rmtree(trash, ignore_errors=True)
    os.replace(path, trash)
    fsync_dir(path.parent)
    shutil.rmtree(trash, ignore_errors=True)


def plan_purge(root: Path, keep_last: int, keep_every: int = 0, in_flight: int | None = None) -> list[Path]:
    """What retention deletes now: complete checkpoints beyond the newest ``keep_last`` (sparing every
    ``keep_every``-th step), incomplete directories older than the newest complete one, and leftovers of
    interrupted deletes. The directory of a save still in flight (``in_flight``) is never touched.
    """
    dirs = scan(root)
    complete = [d for d in dirs if d.complete]
    newest = complete[-1].step if complete else None
    doomed = [d.path for d in complete[: max(len(complete) - keep_last, 0)] if not (keep_every and d.step % keep_every == 0)]
    doomed += [
        d.path for d in dirs if not d.complete and newest is not None and d.step < newest and d.step != in_flight
    ]
    root = Path(root)
    if root.is_dir():
        doomed += [p for p in root.iterdir() if p.name.endswith(_TRASH_SUFFIX)]
    return sorted(doomed)


def remove_incomplete(root: Path) -> list[Path]:
    """At start-up, before any save: every incomplete directory is a crash's leftover. Returns what was removed."""
    removed = [d.path for d in scan(root) if not d.complete]
    root = Path(root)
    if root.is_dir():
        removed += [p for p in root.iterdir() if p.name.endswith(_TRASH_SUFFIX)]
    for path in removed:
        remove_dir(path)
    return removed


def set_aside_newer(root: Path, step: int) -> list[Path]:
    """Move complete checkpoints newer than ``step`` to ``{root}/superseded/``: a run that restarts from an older
    step would otherwise write into directories that already carry a commit marker. Returns the new paths."""
    moved = []
    for d in complete_steps(root):
        if d.step > step:
            target = Path(root) / "superseded" / f"{d.path.name}-{time.strftime('%Y%m%d-%H%M%S')}"
            target.parent.mkdir(exist_ok=True)
            os.replace(d.path, target)
            moved.append(target)
    if moved:
        fsync_dir(Path(root))
    return moved
