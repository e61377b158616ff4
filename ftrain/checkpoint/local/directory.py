"""Claiming a rank's local snapshot directory for one run, without ever following a link or touching what is not
ftrain's.

A snapshot directory lives in node-local memory that every user of the node shares (``/dev/shm``), under a name
anyone can predict, and a user may point ``checkpoint.local_dir`` anywhere. So, at every level ftrain creates:

* a directory is created with mode 0700, or, if it exists, opened with ``O_NOFOLLOW`` and accepted only when it is
  a real directory of this user (the default top directory and every ``rank-N`` also with no access for others);
* a ``rank-N`` directory that holds anything but the files ftrain makes there is refused (it is not ours);
* ``rank-N/OWNER`` names the run that owns the directory (its ``RUN_ID`` and run directory). A directory owned by
  another run that still exists (its run directory holds that ``RUN_ID``) is refused: one run per local directory.
  A directory whose owner no longer exists (its run directory was deleted or made anew) is taken over;
* removal unlinks only the file names ftrain makes, relative to the directory descriptor opened here, and removes
  a directory only when it is then empty (the top directory only when ftrain created it, or named it: the
  default one).

Whatever is refused stays exactly as it was; the caller turns the tier off with one warning.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import stat
from dataclasses import asdict, dataclass
from pathlib import Path

from ftrain.checkpoint.layout import RUN_ID_NAME
from ftrain.checkpoint.local.marker import SLOTS, data_name, marker_name, skel_name

logger = logging.getLogger("ftrain.checkpoint")

OWNER_NAME = "OWNER"
MADE_NAME = ".ftrain-made"  # in a top directory ftrain created: only such a directory is ever removed
# Every name ftrain makes in a rank directory: nothing else is ever there, and nothing else is ever removed.
OWN_NAMES = frozenset(
    {name(slot) for slot in SLOTS for name in (data_name, skel_name, marker_name)}
    | {marker_name(slot) + ".tmp" for slot in SLOTS}
    | {OWNER_NAME}
)
# The owner record is written through "OWNER.<pid>.tmp": one left by a process killed in between is ftrain's too.
_OWNER_TEMP = re.compile(rf"^{OWNER_NAME}\.\d+\.tmp$")
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def default_directory(run_dir: Path) -> Path:
    """``/dev/shm/ftrain-<16 hex digits>``: node-local memory, one directory per (resolved) run directory."""
    digest = hashlib.sha256(str(Path(run_dir).resolve()).encode()).hexdigest()[:16]
    return Path("/dev/shm") / f"ftrain-{digest}"


def is_own(name: str) -> bool:
    """Whether ``name`` in a rank directory is a file ftrain makes there."""
    return name in OWN_NAMES or bool(_OWNER_TEMP.match(name))


class NotUsable(Exception):
    """The directory cannot be used by this run; the message says why (one line)."""


@dataclass(frozen=True)
class Owner:
    """The run a snapshot directory belongs to: its ``RUN_ID`` and resolved run directory ('' if unknown)."""

    run_id: str
    run_dir: str = ""

    def exists(self) -> bool:
        """Whether this run is still there: its run directory holds its ``RUN_ID``. Unknown (no run directory
        recorded) counts as existing: it is never taken over."""
        if not self.run_dir:
            return True
        try:
            return (Path(self.run_dir) / RUN_ID_NAME).read_text().strip() == self.run_id
        except OSError:
            return False

    def encode(self) -> bytes:
        return json.dumps(asdict(self)).encode()

    @classmethod
    def decode(cls, content: bytes) -> "Owner | None":
        try:
            record = json.loads(content)
            return cls(str(record["run_id"]), str(record.get("run_dir", "")))
        except (ValueError, KeyError, TypeError):
            return None


class RankDir:
    """``{directory}/rank-{rank}``, claimed for ``owner`` (raises ``NotUsable`` if it cannot be).

    ``default``: ``directory`` is the one ftrain named for the run (``/dev/shm/ftrain-<hash>``): it must be private
    too, and it is removed when it is left empty."""

    def __init__(self, directory: Path, rank: int, owner: Owner, *, default: bool) -> None:
        self.top = Path(directory)
        self.path = self.top / f"rank-{rank}"
        self.owner = owner
        self.default = default
        self._top_fd, created = _open_dir(self.top, private=default)
        try:
            if created:
                os.close(os.open(MADE_NAME, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=self._top_fd))
            self._fd, _ = _open_dir(self.path, private=False, parent_fd=self._top_fd)
            try:
                self._check_contents()  # first: "not ours" says more than a mode
                _check_private(self.path, os.fstat(self._fd))
                self._claim()
            except BaseException:
                os.close(self._fd)
                raise
        except BaseException:
            os.close(self._top_fd)
            raise

    def has_snapshots(self) -> bool:
        return any(name != OWNER_NAME and not _OWNER_TEMP.match(name) for name in os.listdir(self._fd))

    def remove(self) -> None:
        """Remove every file ftrain made here and the directories left empty; nothing else."""
        for name in os.listdir(self._fd):
            if is_own(name):
                try:
                    os.unlink(name, dir_fd=self._fd)
                except FileNotFoundError:
                    pass
        _rmdir_if_empty(self.path.name, self._top_fd)
        left = set(os.listdir(self._top_fd))
        if left == {MADE_NAME} or (self.default and left <= {MADE_NAME}):
            for name in left:
                try:
                    os.unlink(name, dir_fd=self._top_fd)
                except FileNotFoundError:  # another rank removing the same top directory got there first
                    pass
            _rmdir_if_empty(str(self.top), None)

    def remove_if_unused(self) -> None:
        """``remove()`` when no snapshot was ever written here (only the owner record)."""
        if not self.has_snapshots():
            self.remove()

    def close(self) -> None:
        for fd in (self._fd, self._top_fd):
            try:
                os.close(fd)
            except OSError:
                pass

    def _check_contents(self) -> None:
        names = sorted(os.listdir(self._fd))
        foreign = [name for name in names if not is_own(name)]
        if foreign:
            shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
            raise NotUsable(f"{self.path} holds files ftrain did not make ({shown})")
        for name in names:
            if not stat.S_ISREG(os.stat(name, dir_fd=self._fd, follow_symlinks=False).st_mode):
                raise NotUsable(f"{self.path / name} is not a regular file")

    def _claim(self) -> None:
        current = self._read_owner()
        if current == self.owner:
            return
        if current is None and OWNER_NAME in os.listdir(self._fd):
            raise NotUsable(f"{self.path / OWNER_NAME} is unreadable (another run may be claiming the directory)")
        if current is not None:
            if current.exists():
                raise NotUsable(
                    f"{self.path} holds the snapshots of another run ({current.run_dir or current.run_id}): one run "
                    "per local directory; give this run its own checkpoint.local_dir"
                )
            logger.info("local snapshots: taking over %s from a run that no longer exists (%s)", self.path, current.run_dir)
        self._write_owner(replace=current is not None)

    def _read_owner(self) -> Owner | None:
        try:
            fd = os.open(OWNER_NAME, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=self._fd)
        except FileNotFoundError:
            return None
        with os.fdopen(fd, "rb") as handle:
            return Owner.decode(handle.read(64 * 1024))

    def _write_owner(self, replace: bool) -> None:
        temp = f"{OWNER_NAME}.{os.getpid()}.tmp"
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=self._fd)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(self.owner.encode())
            if replace:
                os.replace(temp, OWNER_NAME, src_dir_fd=self._fd, dst_dir_fd=self._fd)
                return
            try:  # link fails if another run claimed the directory meanwhile: exactly one claim wins
                os.link(temp, OWNER_NAME, src_dir_fd=self._fd, dst_dir_fd=self._fd, follow_symlinks=False)
            except FileExistsError:
                if self._read_owner() != self.owner:
                    raise NotUsable(f"{self.path} was claimed by another run at the same time") from None
        finally:
            try:
                os.unlink(temp, dir_fd=self._fd)
            except FileNotFoundError:
                pass


def _open_dir(path: Path, *, private: bool, parent_fd: int | None = None) -> tuple[int, bool]:
    """Create ``path`` (0700) or open the existing one without following a link; check owner (and mode).
    Returns its descriptor and whether it was created here."""
    name = path.name if parent_fd is not None else str(path)
    created = False
    try:
        os.mkdir(name, 0o700, dir_fd=parent_fd)
        created = True
    except FileExistsError:
        pass
    except OSError as exc:
        raise NotUsable(f"cannot create {path}: {exc.strerror or exc}") from None
    try:
        fd = os.open(name, _DIR_FLAGS, dir_fd=parent_fd)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise NotUsable(f"{path} is not a directory (a symbolic link or a file): left as it is") from None
        raise NotUsable(f"cannot open {path}: {exc.strerror or exc}") from None
    info = os.fstat(fd)
    try:
        if info.st_uid != os.getuid():
            raise NotUsable(f"{path} belongs to another user")
        if private:
            _check_private(path, info)
    except NotUsable:
        os.close(fd)
        raise
    return fd, created


def _check_private(path: Path, info: os.stat_result) -> None:
    if info.st_mode & 0o077:
        raise NotUsable(f"{path} has mode {stat.S_IMODE(info.st_mode):04o}; ftrain makes it 0700 (others must not read it)")


def _rmdir_if_empty(name: str, parent_fd: int | None) -> None:
    try:
        os.rmdir(name, dir_fd=parent_fd)
    except OSError:
        pass  # not empty (another rank's snapshots, or files that are not ftrain's) or already gone
