"""The layout of durable checkpoints in a storage: step directories, the commit marker, discovery, retention.

    {checkpoint dir}/step_{N:08d}/            DCP files of step N (``*.distcp``, ``.metadata``, ``CHECKSUMS.json``)
    {checkpoint dir}/step_{N:08d}/COMPLETE    commit marker (JSON); the checkpoint counts only if it exists

The checkpoint dir is ``{run.dir}/checkpoints`` by default; every operation here goes through a
``storage.Storage`` (a path given instead is a local one). A directory without ``COMPLETE`` is incomplete:
ignored by discovery and removed by ``purge``. Deleting a checkpoint never leaves something that looks
complete (``Storage.remove_dir``).
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

from ftrain.checkpoint.storage import CheckpointDir, Storage, checkpoint_at, open_storage
from ftrain.checkpoint.storage.base import MARKER_NAME
from ftrain.checkpoint.storage.posix import TRASH_SUFFIX
from ftrain.checkpoint.sums import CRC32, XXH3

# What the functions below accept for a root (a storage, or a local path) and for one checkpoint directory.
Root = Union[Storage, str, "os.PathLike[str]"]
Where = Union[CheckpointDir, str, "os.PathLike[str]"]

MARKER = MARKER_NAME
# Under the run directory (beside ``checkpoints/``): the run's identity, made at its first use, and the timeline the
# current attempt trains on (local snapshots of another timeline are never resumed).
RUN_ID_NAME = "RUN_ID"
TIMELINE_NAME = "TIMELINE"
MARKER_TMP = "COMPLETE.tmp"
DCP_METADATA = ".metadata"  # DCP's index of every stored item; the marker must list it
DATA_SUFFIX = ".distcp"  # DCP's data files (one or more per rank); the rest of a checkpoint is small
# A file entry's checksum key in the marker, and the hex digits of its value (integrity.py computes them)
SUM_DIGITS = {XXH3: 16, CRC32: 8}
FORMAT_VERSION = 2  # 2: the marker records ``state_keys`` (see ``keys.py``)
SUPPORTED_FORMAT_VERSIONS = (1, 2)
MAX_MARKER_BYTES = 16 << 20  # a marker lists a few files per rank: anything larger is not one of ours
_STEP_DIR = re.compile(r"^step_(\d{8})$")


def step_name(step: int) -> str:
    return f"step_{step:08d}"


def step_dir(root: str | os.PathLike[str], step: int) -> Path:
    """The local path of step ``step``'s directory under a local checkpoint dir."""
    return Path(root) / step_name(step)


def parse_step(where: str | os.PathLike[str] | CheckpointDir) -> int | None:
    name = where.name if isinstance(where, CheckpointDir) else Path(where).name
    match = _STEP_DIR.match(name.rsplit("/", 1)[-1])
    return int(match.group(1)) if match else None


@dataclass(frozen=True)
class StepDir:
    step: int
    dir: CheckpointDir
    complete: bool

    @property
    def path(self) -> Path:
        """The local path (a local storage only)."""
        return self.dir.path


def scan(root: Root) -> list[StepDir]:
    """Every ``step_*`` directory under ``root``, oldest first."""
    storage = open_storage(root)
    return _step_dirs(storage, storage.dirs_holding(MARKER))


def _step_dirs(storage: Storage, listing: dict[str, bool]) -> list[StepDir]:
    """The ``step_*`` directories of a ``dirs_holding(MARKER)`` listing, oldest first."""
    found = []
    for name, marked in listing.items():
        step = parse_step(name)
        if step is not None:
            found.append(StepDir(step, CheckpointDir(storage, name), marked))
    return sorted(found, key=lambda d: d.step)


def complete_steps(root: Root) -> list[StepDir]:
    return [d for d in scan(root) if d.complete]


def latest_complete(root: Root) -> StepDir | None:
    done = complete_steps(root)
    return done[-1] if done else None


def has_marker(where: Where) -> bool:
    """Whether the checkpoint directory holds a commit marker (not whether the marker is valid)."""
    checkpoint = checkpoint_at(where)
    return checkpoint.storage.exists(checkpoint.file(MARKER))


def is_data_file(name: str) -> bool:
    return name.endswith(DATA_SUFFIX)


def list_files(where: Where) -> list[dict[str, Any]]:
    """The checkpoint's data files with their sizes (the marker itself excluded)."""
    checkpoint = checkpoint_at(where)
    return [
        {"name": info.name, "size": info.size}
        for info in checkpoint.storage.files(checkpoint.name)
        if info.name not in (MARKER, MARKER_TMP)
    ]


def write_marker(where: Where, info: dict[str, Any], files: list[dict[str, Any]]) -> dict[str, Any]:
    """Commit the checkpoint in ``where``: every file it holds must already be durable.

    ``files`` lists them (name, size, checksum). The marker is written with ``Storage.write_atomic``, so it
    exists either whole or not at all. Returns its content.
    """
    checkpoint = checkpoint_at(where)
    path = str(checkpoint)
    checkpoint.storage.sync_dir(checkpoint.name)  # the data files' entries (DCP renames .metadata) are durable first
    marker = {
        "format_version": FORMAT_VERSION,
        **info,
        "committed_at": time.time(),
        "total_bytes": sum(f["size"] for f in files),
        "files": files,
    }
    validate_marker(marker, f"the marker for {path}")  # never commit what a reader would call damaged
    checkpoint.storage.write_atomic(
        checkpoint.file(MARKER), json.dumps(marker, indent=1).encode(), tmp_name=checkpoint.file(MARKER_TMP)
    )
    return marker


class MarkerError(ValueError):
    """A commit marker that is missing, unreadable or malformed: the checkpoint counts as damaged."""


class NewerFormatError(MarkerError):
    """A commit marker written by a newer ftrain: this one cannot say whether the checkpoint is intact."""


def read_marker(where: Where) -> dict[str, Any]:
    """The commit marker of a checkpoint, checked by ``validate_marker``; ``MarkerError`` (a ``ValueError``)
    with a one-line reason if it is missing, unreadable or malformed."""
    checkpoint = checkpoint_at(where)
    marker_path = checkpoint.storage.describe(checkpoint.file(MARKER))
    try:
        raw = checkpoint.storage.read_bytes(checkpoint.file(MARKER), limit=MAX_MARKER_BYTES + 1)
        if len(raw) > MAX_MARKER_BYTES:
            raise ValueError(f"larger than {MAX_MARKER_BYTES >> 20} MB")
        marker = json.loads(raw)
    except FileNotFoundError:
        raise MarkerError(f"{checkpoint} is not a complete checkpoint (no {MARKER} marker)") from None
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


def remove_dir(where: Where) -> None:
    """Delete a step directory so that no instant of the removal leaves it looking complete."""
    checkpoint = checkpoint_at(where)
    checkpoint.storage.remove_dir(checkpoint.name)


def _leftovers(storage: Storage, names: list[str]) -> list[CheckpointDir]:
    """Of the directory ``names`` under the storage, those an interrupted removal left behind (``step_N`` renamed
    out of the ``step_*`` namespace); any other name is not ftrain's and is never touched."""
    return [
        CheckpointDir(storage, name)
        for name in names
        if name.endswith(TRASH_SUFFIX) and _STEP_DIR.match(name[: -len(TRASH_SUFFIX)])
    ]


def plan_purge(root: Root, keep_last: int, keep_every: int = 0, in_flight: int | None = None) -> list[CheckpointDir]:
    """What retention deletes now: complete checkpoints beyond the newest ``keep_last`` (sparing every
    ``keep_every``-th step), incomplete directories older than the newest complete one, and leftovers of
    interrupted deletes. The directory of a save still in flight (``in_flight``) is never touched.
    """
    storage = open_storage(root)
    listing = storage.dirs_holding(MARKER)  # one listing for both (on an object store, a request per 1000 keys)
    dirs = _step_dirs(storage, listing)
    complete = [d for d in dirs if d.complete]
    newest = complete[-1].step if complete else None
    doomed = [d.dir for d in complete[: max(len(complete) - keep_last, 0)] if not (keep_every and d.step % keep_every == 0)]
    doomed += [
        d.dir for d in dirs if not d.complete and newest is not None and d.step < newest and d.step != in_flight
    ]
    doomed += _leftovers(storage, list(listing))
    return sorted(doomed, key=lambda d: d.name)


def remove_incomplete(root: Root) -> list[CheckpointDir]:
    """At start-up, before any save: every incomplete directory is a crash's leftover. Returns what was removed."""
    storage = open_storage(root)
    listing = storage.dirs_holding(MARKER)
    removed = [d.dir for d in _step_dirs(storage, listing) if not d.complete] + _leftovers(storage, list(listing))
    for checkpoint in removed:
        remove_dir(checkpoint)
    storage.abort_unfinished_writes()
    return removed


SUPERSEDED_DIR = "superseded"


def set_aside_newer(root: Root, step: int) -> list[CheckpointDir]:
    """Move complete checkpoints newer than ``step`` to ``{root}/superseded/``: a run that restarts from an older
    step would otherwise write into directories that already carry a commit marker. Returns where they went."""
    storage = open_storage(root)
    moved = []
    for d in complete_steps(storage):
        if d.step > step:
            target = f"{SUPERSEDED_DIR}/{d.dir.name}-{time.strftime('%Y%m%d-%H%M%S')}"
            storage.move_dir(d.dir.name, target)
            moved.append(CheckpointDir(storage, target))
    return moved
