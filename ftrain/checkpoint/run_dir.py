"""The run directory: every name under ``run.dir``, and the small files the checkpointer keeps at its top.

    {run.dir}/config.yaml    CONFIG_NAME      the resolved config of the latest start (the recipe writes it)
    {run.dir}/LOCK           LOCK_NAME        who is writing here (``lock.py``; ``.LOCK.takeover`` is DOOR_NAME)
    {run.dir}/STATUS         STATUS_NAME      rank 0's progress record (``ftrain.run_status``)
    {run.dir}/PREEMPTED      PREEMPTED_NAME   {"step", "signal", "time"} after a preemption save; the next start removes it
    {run.dir}/RUN_ID         RUN_ID_NAME      a random id made at the directory's first use
    {run.dir}/TIMELINE       TIMELINE_NAME    a random id made by every start that does not continue a local snapshot
    {run.dir}/tb/            TENSORBOARD_DIR  TensorBoard events, when the checkpointer opens its own writer
    {run.dir}/samples/       SAMPLES_DIR      the recipe's record of the samples each step read
    {run.dir}/exports/       EXPORTS_DIR      safetensors exports (``export.py``)
    {run.dir}/checkpoints/   CHECKPOINTS_DIR  the durable checkpoints (``layout.py``)

The README's "On-disk layout" is the contract. Importing this module does not import torch (tools read the names);
the collectives are imported on first use.
"""

from __future__ import annotations

import logging
import socket
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

from ftrain.checkpoint.layout import RUN_ID_NAME, TIMELINE_NAME
from ftrain.checkpoint.storage.posix import write_json_durably, write_text_durably
from ftrain.checkpoint.lock import DOOR_NAME, LOCK_NAME, LockedError, RunLock

if TYPE_CHECKING:
    from ftrain.checkpoint.collectives import DistContext
    from ftrain.checkpoint.storage import Storage

CHECKPOINTS_DIR = "checkpoints"
TENSORBOARD_DIR = "tb"
EXPORTS_DIR = "exports"
SAMPLES_DIR = "samples"
CONFIG_NAME = "config.yaml"
STATUS_NAME = "STATUS"
PREEMPTED_NAME = "PREEMPTED"

__all__ = [
    "CHECKPOINTS_DIR",
    "CONFIG_NAME",
    "DOOR_NAME",
    "EXPORTS_DIR",
    "LOCK_NAME",
    "PREEMPTED_NAME",
    "RUN_ID_NAME",
    "RunDirectory",
    "SAMPLES_DIR",
    "STATUS_NAME",
    "TENSORBOARD_DIR",
    "TIMELINE_NAME",
]

logger = logging.getLogger("ftrain")


class RunDirectory:
    """One run directory as the ranks of one job see it: its paths, its lock (held by rank 0), its identity
    (``RUN_ID``), the timeline the current attempt trains on, and the ``PREEMPTED`` marker."""

    def __init__(self, path: str | Path, ctx: DistContext) -> None:
        self.path = Path(path)
        self.ctx = ctx
        self.lock: RunLock | None = None
        self._run_id = ""  # rank 0's RUN_ID, shared with every rank by take_lock (nodes may not share run.dir)
        self._made_run_id = False  # rank 0: this start gave the run directory its RUN_ID

    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINTS_DIR

    @property
    def tensorboard(self) -> Path:
        return self.path / TENSORBOARD_DIR

    def take_lock(self) -> None:
        """Rank 0 takes the lock (and makes ``RUN_ID`` at the directory's first use); every rank learns whether
        it succeeded. Collective; raises ``LockedError`` on every rank when rank 0 could not."""
        from ftrain.checkpoint.collectives import max_over_ranks

        lock, problem = None, ""
        if self.ctx.is_main:
            lock = RunLock(self.path)
            try:
                lock.acquire()
                self._ensure_run_id()
            except (LockedError, OSError) as exc:
                problem = str(exc)
                if lock.path.exists() and isinstance(exc, OSError):
                    lock.release()
                lock = None
        if max_over_ranks([1.0 if problem else 0.0], self.ctx.device)[0]:
            raise LockedError(problem or "the run directory is in use by another job (see rank 0)")
        self.lock = lock
        self._run_id = self._from_rank_0(self._own_run_id())

    def _own_run_id(self) -> str:
        """The ``RUN_ID`` this rank's run directory holds ('' if none: a node that never held rank 0)."""
        try:
            return (self.path / RUN_ID_NAME).read_text().strip()
        except OSError:
            return ""

    def _from_rank_0(self, value: str) -> str:
        """Rank 0's ``value`` on every rank. Collective."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return value
        shared = [value if self.ctx.is_main else ""]
        dist.broadcast_object_list(shared, src=0, group=self.ctx.process_group)
        return shared[0]

    def open_checkpoints(self, location: str) -> "Storage":
        """The storage of the durable checkpoints: ``location`` (``checkpoint.dir``), or ``{run.dir}/checkpoints``.
        In object storage rank 0 checks access and makes this run the prefix's only writer (its ``OWNER``): a
        prefix owned by a run whose ``RUN_ID`` no rank's run directory holds is refused (on several nodes without
        a shared run directory, any node that held rank 0 before carries it). Every rank learns the outcome.
        Collective, after ``take_lock``; ``ResumeRefused`` (one line, nothing written there) on every rank when
        the store refuses or another run writes there."""
        from ftrain.checkpoint.collectives import max_over_ranks
        from ftrain.checkpoint.errors import ResumeRefused
        from ftrain.checkpoint.storage import StorageError, open_storage

        problem = ""
        try:
            storage = open_storage(location or self.checkpoints)
        except StorageError as exc:
            raise ResumeRefused(f"checkpoint.dir: {exc}") from None
        claim = getattr(storage, "claim", None)
        known = [i for i in self._run_ids_of_all_ranks() if i] if claim is not None else []
        if self.ctx.is_main and claim is not None:
            try:
                storage.check_access()  # type: ignore[attr-defined]
                owner = claim(self.run_id(), f"run dir {self.path.resolve()} on {socket.gethostname()}", known)
                current = storage.owner() if not owner and self._made_run_id else None  # type: ignore[attr-defined]
                if current is not None and current[0] != self.run_id():
                    # A new run directory (another node held rank 0 before): it continues the prefix's run.
                    write_text_durably(self.path / RUN_ID_NAME, current[0] + "\n")
                if owner:
                    problem = (
                        f"checkpoint.dir {storage.describe()} holds the checkpoints of another run ({owner}); give this "
                        "run its own checkpoint.dir, or resume that run with its run.dir"
                    )
            except (OSError, ImportError) as exc:
                problem = str(exc)
        if max_over_ranks([1.0 if problem else 0.0], self.ctx.device)[0]:
            raise ResumeRefused(problem or f"checkpoint.dir {storage.describe()} cannot be used (see rank 0)")
        if claim is not None:
            self._run_id = self._from_rank_0(self._own_run_id())
        return storage

    def _run_ids_of_all_ranks(self) -> list[str]:
        """The ``RUN_ID`` each rank's run directory holds ('' where none). Collective."""
        import torch.distributed as dist

        mine = self._own_run_id()
        if not (dist.is_available() and dist.is_initialized()):
            return [mine]
        ids: list[str] = [""] * self.ctx.world_size
        dist.all_gather_object(ids, mine, group=self.ctx.process_group)
        return ids

    def release_lock(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def _ensure_run_id(self) -> None:
        """Give the run directory an identity of its own, once: local snapshots of a run directory that was deleted
        and made again under the same path must never be taken for this run's."""
        path = self.path / RUN_ID_NAME
        self._made_run_id = not path.is_file()
        if not path.is_file():
            write_text_durably(path, uuid.uuid4().hex + "\n")

    def run_id(self) -> str:
        """The run's identity: rank 0's ``RUN_ID`` (after ``take_lock``, on every rank)."""
        return self._run_id or (self.path / RUN_ID_NAME).read_text().strip()

    def read_timeline(self) -> str:
        """The timeline recorded by the latest start ('' if none)."""
        try:
            return (self.path / TIMELINE_NAME).read_text().strip()
        except OSError:
            return ""

    def new_timeline(self) -> str:
        """Begin a new timeline: rank 0 makes its id and records it durably, every rank gets it. Collective."""
        import torch.distributed as dist

        timeline = [uuid.uuid4().hex if self.ctx.is_main else ""]
        if self.ctx.is_main:
            write_text_durably(self.path / TIMELINE_NAME, timeline[0] + "\n")
        if dist.is_available() and dist.is_initialized():
            dist.broadcast_object_list(timeline, src=0, group=self.ctx.process_group)
        return timeline[0]

    def mark_preempted(self, step: int, signal: str | None) -> None:
        """Rank 0 writes ``PREEMPTED`` once every rank's save of ``step`` is committed: what a scheduler checks to
        requeue (torchrun itself exits 1 when signalled). The next start removes it."""
        if not self.ctx.is_main:
            return
        path = self.path / PREEMPTED_NAME
        try:
            write_json_durably(path, {"step": step, "signal": signal, "time": time.time()})
        except OSError as exc:  # the checkpoint is committed; the marker is a courtesy to the scheduler
            logger.warning("could not write %s: %s", path, exc)

    def clear_preempted(self) -> None:
        """Rank 0, at a start that holds the lock: an earlier preemption is no longer the run's last word."""
        if self.ctx.is_main:
            (self.path / PREEMPTED_NAME).unlink(missing_ok=True)
