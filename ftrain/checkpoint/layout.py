"""The on-disk layout of checkpoints: step directories, the commit marker, discovery and retention.

    {run.dir}/checkpoints/step_{N:08d}/            DCP files of step N (``*.distcp``, ``.metadata``)
    {run.dir}/checkpoints/step_{N:08d}/COMPLETE    commit marker (JSON); the checkpoint counts only if it exists

A directory without ``COMPLETE`` is incomplete: ignored by discovery and removed by ``purge``. Deleting a
checkpoint first renames it out of the ``step_*`` namespace (atomic), so a crash in the middle of a delete
never leaves something that looks complete.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MARKER = "COMPLETE"
MARKER_TMP = "COMPLETE.tmp"
FORMAT_VERSION = 1
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


def list_files(path: Path) -> list[dict[str, Any]]:
    """The checkpoint's data files with their sizes (the marker itself excluded)."""
    return [
        {"name": p.name, "size": p.stat().st_size}
        for p in sorted(Path(path).iterdir())
        if p.is_file() and p.name not in (MARKER, MARKER_TMP)
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
    tmp = path / MARKER_TMP
    with open(tmp, "w") as handle:
        json.dump(marker, handle, indent=1)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path / MARKER)
    fsync_dir(path)
    return marker


def read_marker(path: Path) -> dict[str, Any]:
    """The commit marker of a checkpoint; ``ValueError`` if it is missing or unreadable."""
    marker_path = Path(path) / MARKER
    try:
        marker = json.loads(marker_path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{path} is not a complete checkpoint (no {MARKER} marker)") from None
    except (OSError, ValueError) as exc:
        raise ValueError(f"{marker_path} is unreadable: {exc}") from None
    if not isinstance(marker, dict) or "step" not in marker or "files" not in marker:
        raise ValueError(f"{marker_path} is not an ftrain commit marker")
    return marker


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
