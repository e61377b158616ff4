"""One writer per run directory: a lock file that names its holder and proves it is alive.

``{run.dir}/LOCK`` holds JSON (host, pid, process start time, torchrun launch, start time) and is touched every
few seconds while the job runs. It appears atomically with its content: the holder is written to a temporary file,
fsynced, then hard-linked to ``LOCK`` (``link`` fails if ``LOCK`` exists, so exactly one creator wins and no reader
ever sees a half-written lock). A lock is stale, and may be taken over, when
  * its holder is an earlier round of this very torchrun launch (same host, and the same torchrun agent process:
    pid and start time; ``TORCHELASTIC_RUN_ID`` alone is not enough, it is ``none`` or a reused name across
    launches), or
  * its holder ran on this host and that process is gone, or
  * it was not touched for ``stale_after_s`` seconds (a holder on another host that died), or
  * it cannot be read (not JSON, missing or mistyped fields) and was not touched for ``stale_after_s`` seconds.
Takeovers (and releases) happen under an ``flock`` of ``.LOCK.takeover``, so two takers are served one after the
other and the second sees the first's fresh lock; inside, the stale lock is renamed to a unique name and checked
to be the very file that was judged before the new lock is linked in.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import secrets
import socket
import stat
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

LOCK_NAME = "LOCK"
DOOR_NAME = ".LOCK.takeover"  # flock'ed around every takeover and release; an empty file that stays
_MAX_LOCK_BYTES = 64 * 1024
_DOOR_WAIT_S = 30.0

logger = logging.getLogger("ftrain.checkpoint")


class LockedError(ValueError):
    """Another live job holds the run directory."""


def _proc_stat(pid: int) -> list[str] | None:
    """Fields of ``/proc/PID/stat`` after the command name (field 3 onwards), or None if there is no such process."""
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError, ValueError):
        return None


def _process_start(pid: int) -> str | None:
    fields = _proc_stat(pid)
    return fields[19] if fields and len(fields) > 19 else None


def _read_small(path: str) -> str | None:
    try:
        return Path(path).read_text().strip() or None
    except OSError:
        return None


def _launch() -> tuple[int | None, str | None]:
    """The torchrun agent that started this worker (its pid and start time), or (None, None) outside torchrun.

    torchrun starts each worker as its own child and keeps running across restart rounds, so the parent process
    identifies one launch: two launches never share it, and every round of one launch does.
    """
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return None, None
    agent = os.getppid()
    start = _process_start(agent)
    return (agent, start) if agent > 1 and start is not None else (None, None)


def _identity() -> dict[str, Any]:
    pid = os.getpid()
    agent_pid, agent_start = _launch()
    return {
        "host": socket.gethostname(),
        "boot_id": _read_small("/proc/sys/kernel/random/boot_id"),
        "pid_ns": _pid_namespace(),
        "pid": pid,
        "process_start": _process_start(pid),
        "job": os.environ.get("TORCHELASTIC_RUN_ID", ""),
        "agent_pid": agent_pid,
        "agent_start": agent_start,
        "started_at": time.strftime("%Y-%m-%d %H:%M:%S"),
        "token": secrets.token_hex(8),
    }


def _pid_namespace() -> str | None:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


# What a holder record may contain: field -> allowed types (None stands for JSON null). host and pid are required.
_SCHEMA: dict[str, tuple[type, ...]] = {
    "host": (str,),
    "pid": (int,),
    "boot_id": (str, type(None)),
    "pid_ns": (str, type(None)),
    "process_start": (str, type(None)),
    "job": (str, type(None)),
    "agent_pid": (int, type(None)),
    "agent_start": (str, type(None)),
    "started_at": (str, type(None)),
    "token": (str, type(None)),
}


def _malformed(holder: Any) -> str | None:
    """Why a parsed LOCK is not a holder record, or None if it is one."""
    if not isinstance(holder, dict):
        return f"holds a JSON {type(holder).__name__}, not a holder record"
    for key in ("host", "pid"):
        if key not in holder:
            return f"names no {key}"
    for key, kinds in _SCHEMA.items():
        value = holder.get(key)
        if key in holder and (not isinstance(value, kinds) or isinstance(value, bool)):
            return f"has {key}={json.dumps(value)[:40]}, not a {kinds[0].__name__}"
    if not 0 < holder["pid"] < 2**31:
        return f"has pid={holder['pid']}, not a process id"
    return None


@dataclass(frozen=True)
class _Seen:
    """One read of LOCK: the holder record (None if unreadable, with ``problem`` saying why), age, file identity."""

    holder: dict[str, Any] | None
    problem: str
    age_s: float
    file_id: tuple[int, int]
    raw: bytes
    judgeable: bool = True  # False: not a regular readable file, never taken over (a person must look)


def _read(path: Path) -> _Seen | None:
    """The current LOCK, or None if there is none."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return None
    except OSError as exc:  # a symlink (ELOOP), no permission, ...
        return _Seen(None, f"cannot be opened ({os.strerror(exc.errno or 0)})", 0.0, (0, 0), b"", False)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            return _Seen(None, "is not a regular file", 0.0, (info.st_dev, info.st_ino), b"", False)
        raw = os.read(fd, _MAX_LOCK_BYTES + 1)
    finally:
        os.close(fd)
    age = max(time.time() - info.st_mtime, 0.0)
    file_id = (info.st_dev, info.st_ino)
    try:
        holder = json.loads(raw.decode())
    except (UnicodeDecodeError, ValueError):
        problem = "is empty" if not raw.strip() else "is not JSON"
        return _Seen(None, problem, age, file_id, raw)
    problem = "is too large to be a holder record" if len(raw) > _MAX_LOCK_BYTES else _malformed(holder)
    return _Seen(None if problem else holder, problem or "", age, file_id, raw)


def _head(path: Path) -> bytes:
    with open(path, "rb") as handle:
        return handle.read(_MAX_LOCK_BYTES + 1)


def _file_id(path: Path) -> tuple[int, int] | None:
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return None
    return info.st_dev, info.st_ino


class RunLock:
    """``acquire()`` the run directory for this job or raise ``LockedError``; ``release()`` when done."""

    def __init__(self, run_dir: Path, stale_after_s: float = 60.0, heartbeat_s: float = 5.0) -> None:
        self.path = Path(run_dir) / LOCK_NAME
        self.stale_after_s = stale_after_s
        self.heartbeat_s = heartbeat_s
        self.me = _identity()
        self._mine: tuple[int, int] | None = None  # (st_dev, st_ino) of the LOCK this object created
        self._fd: int | None = None  # kept open to touch our own file, wherever it has gone
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    def acquire(self) -> None:
        """Take the lock or raise ``LockedError`` naming the holder."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            temp = self._write_temp()
        except OSError as exc:
            raise LockedError(f"cannot create a lock in {self.path.parent}: {exc.strerror or exc}") from None
        try:
            for _ in range(10):
                if self._link(temp) or self._take_over_if_stale(temp):
                    self._beat = threading.Thread(target=self._heartbeat, name="ftrain-lock", daemon=True)
                    self._beat.start()
                    return
        finally:
            temp.unlink(missing_ok=True)
        raise LockedError(f"could not take {self.path}: other jobs keep taking it")

    def release(self) -> None:
        """Stop the heartbeat and remove LOCK if it is still the one this object created."""
        self._stop.set()
        if self._beat is not None:
            self._beat.join(timeout=self.heartbeat_s + 1)
        if self._mine is None:
            return
        try:
            with self._door():
                self._unlink_if_mine()
        except LockedError:  # the directory went away or became unwritable: remove what is ours if we can
            self._unlink_if_mine()
        self._mine = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _unlink_if_mine(self) -> None:
        try:
            if _file_id(self.path) == self._mine:
                self.path.unlink()
        except OSError:
            pass

    # -- creating -------------------------------------------------------------------------------------------------

    def _write_temp(self) -> Path:
        temp = self.path.with_name(f".{LOCK_NAME}.{self.me['token']}.tmp")
        fd = os.open(temp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        with os.fdopen(fd, "w") as handle:
            json.dump(self.me, handle)
            handle.flush()
            os.fsync(handle.fileno())
        return temp

    def _link(self, temp: Path) -> bool:
        """Publish ``temp`` as LOCK if there is none (atomic and exclusive); True if this call created it."""
        try:
            os.link(temp, self.path)
        except FileExistsError:
            return False
        except OSError as exc:
            if exc.errno in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EXDEV):
                raise LockedError(
                    f"cannot create {self.path}: its filesystem does not support hard links ({exc.strerror})"
                ) from None
            raise
        self._fd = os.open(temp, os.O_RDONLY)
        info = os.fstat(self._fd)
        self._mine = (info.st_dev, info.st_ino)
        return True

    # -- taking over ----------------------------------------------------------------------------------------------

    def _take_over_if_stale(self, temp: Path) -> bool:
        """Under the takeover door: replace LOCK with ours if it is stale (True if done); LockedError if it is held."""
        with self._door():
            seen = _read(self.path)
            if seen is None:
                return False  # released meanwhile: try to create it again
            why = self._stale_reason(seen)
            if why is None:
                raise LockedError(self._describe(seen))
            aside = self.path.with_name(f".{LOCK_NAME}.stale.{self.me['token']}")
            try:
                os.rename(self.path, aside)
            except FileNotFoundError:
                return False
            if _file_id(aside) != seen.file_id or _head(aside) != seen.raw:
                # not the lock we judged (only a writer that ignores the door could have swapped it): put it back
                try:
                    os.link(aside, self.path)
                except FileExistsError:
                    logger.error("%s changed hands during a takeover; could not restore %s", self.path, aside)
                    return False
                aside.unlink()
                return False
            aside.unlink()
            if not self._link(temp):
                return False  # a new job created LOCK in between: it is live, the next round says so
            logger.warning("took over %s: %s (%s)", self.path, why, self._who(seen))
            return True

    def _stale_reason(self, seen: _Seen) -> str | None:
        """Why this LOCK may be taken over, or None if its holder may still be working."""
        if seen.holder is None:
            if seen.judgeable and seen.age_s > self.stale_after_s:
                return f"it {seen.problem} and was not touched for {seen.age_s:.0f} s"
            return None
        holder, me = seen.holder, self.me
        if self._same_machine(holder):
            if holder["pid"] == me["pid"] and holder.get("process_start") == me["process_start"]:
                return None  # this very process, through another RunLock
            if self._same_launch(holder):
                return "its holder is an earlier round of this torchrun launch"
            if _process_start(holder["pid"]) != holder.get("process_start"):
                return "its process is gone"
            return None
        if seen.age_s > self.stale_after_s:
            return f"not touched for {seen.age_s:.0f} s"
        return None

    def _same_machine(self, holder: dict[str, Any]) -> bool:
        if holder["host"] != self.me["host"]:
            return False
        return all(holder.get(key) in (None, self.me[key]) for key in ("boot_id", "pid_ns"))

    def _same_launch(self, holder: dict[str, Any]) -> bool:
        me = self.me
        return (
            me["agent_pid"] is not None
            and holder.get("agent_pid") == me["agent_pid"]
            and holder.get("agent_start") == me["agent_start"]
            and holder.get("job") == me["job"]
        )

    def _describe(self, seen: _Seen) -> str:
        run_dir = self.path.parent
        if seen.holder is None:
            if not seen.judgeable:
                return f"run directory {run_dir} is locked by {self.path}, which {seen.problem}; remove it by hand"
            wait = max(self.stale_after_s - seen.age_s, 0)
            return (
                f"run directory {run_dir} has a {LOCK_NAME} that {seen.problem} (touched {seen.age_s:.0f} s ago); "
                f"another job may be using it: if none is, delete {self.path}, or retry in {wait:.0f} s"
            )
        return (
            f"run directory {run_dir} is in use by {self._who(seen)} "
            f"(started {seen.holder.get('started_at')}, alive {seen.age_s:.0f} s ago); "
            f"use another run.dir or stop that job"
        )

    @staticmethod
    def _who(seen: _Seen) -> str:
        if seen.holder is None:
            return f"an unreadable {LOCK_NAME}"
        return f"pid {seen.holder['pid']} on {seen.holder['host']}"

    @contextmanager
    def _door(self) -> Iterator[None]:
        """Hold ``.LOCK.takeover`` exclusively (flock: released by the kernel if this process dies)."""
        try:
            fd = os.open(self.path.with_name(DOOR_NAME), os.O_CREAT | os.O_RDWR, 0o644)
        except OSError as exc:
            raise LockedError(f"cannot open {self.path.with_name(DOOR_NAME)}: {exc.strerror}") from None
        try:
            deadline = time.monotonic() + _DOOR_WAIT_S
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise LockedError(
                            f"another process has been taking over {self.path} for {_DOOR_WAIT_S:.0f} s; retry"
                        ) from None
                    time.sleep(0.005)
                except OSError:
                    break  # no flock on this filesystem: the rename-and-check above still guards the takeover
            yield
        finally:
            os.close(fd)

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                if self._fd is not None:
                    os.utime(self._fd)
                if _file_id(self.path) != self._mine:
                    logger.error("%s is no longer this job's lock: another job took it over", self.path)
                    return
            except OSError:
                pass


def live_holder(run_dir: Path, stale_after_s: float = 60.0) -> str | None:
    """A one-line description of the live job holding ``run_dir``'s LOCK, or None if it is free or stale.

    For tools (not jobs): an unreadable LOCK younger than ``stale_after_s`` counts as held.
    """
    probe = RunLock(run_dir, stale_after_s=stale_after_s)
    probe.me["agent_pid"] = None  # a tool is never a round of a torchrun launch
    seen = _read(probe.path)
    if seen is None or probe._stale_reason(seen) is not None:
        return None
    return probe._describe(seen)
