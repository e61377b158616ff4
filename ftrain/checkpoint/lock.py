"""One writer per run directory: a lock file that names its holder and proves it is alive.

``{run.dir}/LOCK`` holds JSON (host, pid, process start time, torchrun run id, start time) and is touched
every few seconds while the job runs. It is stale, and may be taken over, when
  * its holder belongs to the same torchrun job (an elastic restart of this very job), or
  * its holder ran on this host and that process is gone, or
  * it was not touched for ``stale_after_s`` seconds (a holder on another host that died).
Takeover renames the stale lock away first, then creates a new one with ``O_EXCL``: of two jobs racing
for the same stale lock, only one wins.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

LOCK_NAME = "LOCK"


class LockedError(ValueError):
    """Another live job holds the run directory."""


def _process_start(pid: int) -> str | None:
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _identity() -> dict[str, Any]:
    pid = os.getpid()
    return {
        "host": socket.gethostname(),
        "pid": pid,
        "process_start": _process_start(pid),
        "job": os.environ.get("TORCHELASTIC_RUN_ID", ""),
        "started_at": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


class RunLock:
    def __init__(self, run_dir: Path, stale_after_s: float = 60.0, heartbeat_s: float = 5.0) -> None:
        self.path = Path(run_dir) / LOCK_NAME
        self.stale_after_s = stale_after_s
        self.heartbeat_s = heartbeat_s
        self.me = _identity()
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    def acquire(self) -> None:
        """Take the lock or raise ``LockedError`` naming the holder."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            if self._create():
                self._beat = threading.Thread(target=self._heartbeat, name="ftrain-lock", daemon=True)
                self._beat.start()
                return
            holder, age = self._read()
            why_stale = self._stale_reason(holder, age)
            if why_stale is None:
                raise LockedError(
                    f"run directory {self.path.parent} is in use by pid {holder.get('pid')} on "
                    f"{holder.get('host')} (started {holder.get('started_at')}, alive {age:.0f} s ago); "
                    f"use another run.dir or stop that job"
                )
            stale = self.path.with_name(f"{LOCK_NAME}.stale-{time.time_ns()}")
            try:
                os.replace(self.path, stale)  # only one taker gets to move this exact file
                stale.unlink()
            except FileNotFoundError:
                pass  # someone else moved it: try again
        raise LockedError(f"could not take {self.path}: other jobs keep taking it")

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as handle:
            json.dump(self.me, handle)
            handle.flush()
            os.fsync(handle.fileno())
        return True

    def _read(self) -> tuple[dict[str, Any], float]:
        try:
            age = time.time() - self.path.stat().st_mtime
            return json.loads(self.path.read_text()), age
        except (OSError, ValueError):
            return {}, float("inf")  # vanished or half-written: treat as stale

    def _stale_reason(self, holder: dict[str, Any], age: float) -> str | None:
        if not holder:
            return "unreadable"
        if holder.get("job") and holder.get("job") == self.me["job"]:
            return "an earlier round of this torchrun job"
        if holder.get("host") == self.me["host"]:
            pid = int(holder.get("pid", -1))
            if _process_start(pid) != holder.get("process_start"):
                return "its process is gone"
            return None
        if age > self.stale_after_s:
            return f"not touched for {age:.0f} s"
        return None

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                os.utime(self.path)
            except OSError:
                pass

    def release(self) -> None:
        self._stop.set()
        holder, _ = self._read()
        if holder.get("pid") == self.me["pid"] and holder.get("host") == self.me["host"]:
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass
