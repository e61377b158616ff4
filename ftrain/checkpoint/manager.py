"""Save and load checkpoints with DCP: asynchronous saves, one in flight, committed only when durable everywhere.

A save goes through these instants; a crash at any of them leaves either the previous complete checkpoints or
the new one complete, never a directory that looks complete and is not:

1. ``save()``: wait for the previous save's commit; snapshot the state (``state_dict()`` calls) and hand it to
   ``dcp.async_save``, which stages (copies) tensors in the background.
2. ``wait_for_staging()``: called before the optimizer next mutates parameters; the copy must be finished.
3. Background: DCP writes and fsyncs every rank's files, then the coordinator writes ``.metadata``. Only
   when that succeeded on all ranks does rank 0 write the ``COMPLETE`` marker (tmp, fsync, rename, fsync dir).
4. Background (rank 0): retention deletes what is no longer kept, once a newer checkpoint exists (``retention.py``).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import warnings
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType, AsyncSaveResponse

from ftrain import faults
from ftrain.checkpoint import integrity, layout, loading, writer_process
from ftrain.checkpoint.collectives import DistContext
from ftrain.checkpoint.compat import RunSignature
from ftrain.checkpoint.errors import CheckpointError, describe_error
from ftrain.checkpoint.loading import LoadResult, StatesFor
from ftrain.checkpoint.options import MODE_ASYNC, MODE_ASYNC_PROCESS, MODE_OFF, MODE_SYNC, CheckpointOptions
from ftrain.checkpoint.pending import PendingSave, SaveStats, reduce_stats
from ftrain.checkpoint.retention import RetentionThread
from ftrain.checkpoint.save_planner import CachedPlanSavePlanner, new_cache_key
from ftrain.checkpoint.staging import BufferStager, Prestaged
from ftrain.checkpoint.storage import CheckpointDir, Storage, open_storage
from ftrain.checkpoint.writer import CheckpointWriter, NonFiniteStateError, auto_write_threads

logger = logging.getLogger("ftrain.checkpoint")

# One process without a process group is a supported setup (ftrain.Checkpointer under plain python), not a mistake.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")

WRITER_START_DIR = ".writer-start"  # under the checkpoint root: what start_writer() saves, removed once written


class CheckpointManager:
    """Owns the durable checkpoints in one storage (``{run.dir}/checkpoints`` by default): saving, committing,
    retention and loading.

    ``options`` is the ``checkpoint`` config section; ``ctx`` says which rank this is, where the state lives and
    which group carries checkpoint collectives; ``signature`` goes into every commit marker and is checked on
    load. Saved states map names to ``Stateful`` objects (or plain state dicts): the manager knows nothing of
    models, data or the trainer.
    """

    def __init__(
        self, root: Storage | Path, options: CheckpointOptions, ctx: DistContext, signature: RunSignature
    ) -> None:
        self.storage = open_storage(root)
        self.options = options
        self.mode = options.mode
        self.ctx = ctx
        self.rank = ctx.rank
        self.world_size = ctx.world_size
        self.device = ctx.device
        self.process_group = ctx.process_group
        self.signature = signature
        self.timeout_s = options.timeout_s
        self.write_threads = options.write_threads or auto_write_threads()
        self.failures = 0
        self.writer_restarts = 0  # async_process: writer processes replaced after one was lost or a save failed
        self._pending: PendingSave | None = None
        self._stager: BufferStager | None = None
        self._plan_cache_key = new_cache_key()
        self._commit_queue: queue.Queue[PendingSave | None] = queue.Queue()
        self._committer: threading.Thread | None = None
        self._retention: RetentionThread | None = None
        self._writer_start: Future | None = None
        self._committed: set[int] = set()  # rank 0: complete checkpoints in the storage (find_committed, commits)
        if self.rank == 0 and self.enabled:
            self.storage.make_root()
            self._retention = RetentionThread(self.storage, options, self._step_in_flight, self._forget_committed)

    @property
    def root(self) -> Storage:
        """Where the checkpoints are (what the ``layout`` functions take)."""
        return self.storage

    @property
    def enabled(self) -> bool:
        return self.mode != MODE_OFF

    # ----------------------------------------------------------------------------------------------- saving
    def start_writer(self) -> None:
        """``async_process``: start DCP's writer process now, in the background, rather than at the first save
        (spawning it and joining its process group takes seconds, which the first save would otherwise wait for).

        Collective: every rank calls it at the same point, before any save. It saves a one-element state into
        ``{root}/.writer-start``, which no step directory scan sees and which is removed once written.
        """
        if self.mode != MODE_ASYNC_PROCESS or self._writer_start is not None:
            return
        self._writer_start = dcp.async_save(
            {"ftrain_writer_start": torch.zeros(1)},
            storage_writer=CheckpointWriter(CheckpointDir(self.storage, WRITER_START_DIR), in_writer_process=True),
            process_group=self.process_group,
            async_checkpointer_type=AsyncCheckpointerType.PROCESS,
        )

    def _wait_for_writer_start(self) -> None:
        if self._writer_start is None:
            return
        try:
            self._writer_start.result(timeout=self.timeout_s)
        except BaseException as exc:  # the first real save will fail too, with its own message
            if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                raise
            logger.warning("starting the checkpoint writer process failed: %s", describe_error(exc))
        self._writer_start = None
        if self.rank == 0 and self.storage.is_dir(WRITER_START_DIR):
            try:
                self.storage.remove_dir(WRITER_START_DIR)
            except OSError as exc:  # harmless: no scan sees it, and the next start writes it again
                logger.debug("could not remove %s: %s", WRITER_START_DIR, exc)

    @property
    def takes_prestaged(self) -> bool:
        """Whether ``save`` can write from copies made elsewhere: the writer thread of ``async`` reads them in
        this process; the writer process of ``async_process`` maps the same pages (the local tier's slots are
        shared file mappings it receives by descriptor)."""
        return self.mode in (MODE_ASYNC, MODE_ASYNC_PROCESS)

    @property
    def dispatches_at_once(self) -> bool:
        """Whether a ``save`` now would only hand the state to the background writer: an async mode, no save in
        flight to wait for, the writer process (``async_process``) started."""
        idle, starting = self._pending is None or self._pending.done.is_set(), self._writer_start
        return self.takes_prestaged and idle and (starting is None or starting.done())

    def find_committed(self) -> None:
        """Rank 0, at a start: note the steps complete in the storage (one writer per storage: from now on only
        this manager's commits and retention change them)."""
        self._committed = {d.step for d in layout.complete_steps(self.storage)}

    def is_committed(self, step: int) -> bool:
        """Rank 0: whether ``step`` has a complete checkpoint (as found at the start, or committed since)."""
        return step in self._committed

    def in_flight(self, step: int) -> bool:
        """True while the save of ``step`` has not finished (its data may still be read)."""
        return (pending := self._pending) is not None and pending.step == step and not pending.done.is_set()

    def save(
        self,
        step: int,
        states: dict[str, Any],
        marker_fields: dict[str, Any] | None = None,
        prestaged: Prestaged | None = None,
        staging_bytes: int = 0,
    ) -> SaveStats | None:
        """Start checkpointing ``states`` as step ``step``; returns the previous save's stats, if any.
        ``marker_fields`` go into this checkpoint's commit marker. ``prestaged`` (with ``takes_prestaged``): copies
        of the live tensors made at this step, written instead of staging them again; they must stay unchanged
        while ``in_flight(step)``. ``staging_bytes``: what staging this save would need in shared memory without
        ``prestaged`` (``async_process`` checks there is room)."""
        if not self.enabled:
            return None
        called = time.perf_counter()
        self._wait_for_writer_start()
        previous = self._finish_pending(charge_wait=False)  # this wait is charged to the new save instead
        if self.mode == MODE_ASYNC_PROCESS:
            self._check_writer_process(previous, 0 if prestaged is not None else staging_bytes)
        started = time.perf_counter()
        pending = PendingSave(
            step=step,
            dir=CheckpointDir(self.storage, layout.step_name(step)),
            started=started,
            marker_fields=dict(marker_fields or {}),
        )
        self._pending = pending
        if self.mode == MODE_SYNC:
            self._save_sync(pending, states)
        else:
            self._save_async(pending, states, prestaged if self.takes_prestaged else None)
        pending.blocking_s += time.perf_counter() - called
        return previous

    def _check_writer_process(self, previous: SaveStats | None, staging_bytes: int) -> None:
        """``async_process``, before each save: the ranks agree (``writer_process.check_before_save``) to go on,
        to save with the writer thread from now on, or to start new writer processes. Collective."""
        action = writer_process.check_before_save(previous, staging_bytes, self.device, self.rank)
        if action == writer_process.USE_THREAD:
            self.mode = MODE_ASYNC
            if self._stager is not None:  # its buffers were meant to be shared with the writer process
                self._stager.close()
                self._stager = None
            writer_process.stop()
        elif action == writer_process.RESTART:
            self.writer_restarts += 1
            writer_process.stop()

    def _save_sync(self, pending: PendingSave, states: dict[str, Any]) -> None:
        try:
            pending.writer = CheckpointWriter(pending.dir, thread_count=self.write_threads)
            dcp.save(
                states,
                storage_writer=pending.writer,
                planner=CachedPlanSavePlanner(self._plan_cache_key),
                process_group=self.process_group,
            )
            pending.staged_at = pending.uploaded_at = time.perf_counter()
            if self.rank == 0:
                self._commit(pending)
        except BaseException as exc:  # DCP's CheckpointException derives from BaseException
            if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                raise
            self._record_failure(pending, exc)
        pending.finished_at = time.perf_counter()
        pending.done.set()

    def _save_async(self, pending: PendingSave, states: dict[str, Any], prestaged: Prestaged | None) -> None:
        kind = AsyncCheckpointerType.PROCESS if self.mode == MODE_ASYNC_PROCESS else AsyncCheckpointerType.THREAD
        self._get_stager().prestaged_next = prestaged
        try:
            pending.writer = CheckpointWriter(
                pending.dir, thread_count=self.write_threads, in_writer_process=self.mode == MODE_ASYNC_PROCESS
            )
            response = dcp.async_save(
                states,
                storage_writer=pending.writer,
                planner=CachedPlanSavePlanner(self._plan_cache_key),
                process_group=self.process_group,
                async_checkpointer_type=kind,
                async_stager=self._get_stager(),
            )
        except BaseException as exc:
            if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                raise
            self._record_failure(pending, exc)
            pending.finished_at = time.perf_counter()
            pending.done.set()
            return
        if isinstance(response, AsyncSaveResponse):
            pending.staging_future = response.staging_completion
            pending.upload_future = response.upload_completion
            pending.staging_future.add_done_callback(lambda _: setattr(pending, "staged_at", time.perf_counter()))
        else:  # staged synchronously inside async_save
            pending.staged_at = time.perf_counter()
            pending.upload_future = response
        if self._committer is None:  # one thread for the manager's life: starting one per save costs GIL time
            self._committer = threading.Thread(target=self._commit_loop, name="ftrain-commit", daemon=True)
            self._committer.start()
        self._commit_queue.put(pending)

    def _get_stager(self) -> BufferStager:
        if self._stager is None:
            self._stager = BufferStager(
                pin_memory=self.device.type == "cuda",  # pinned host memory needs an accelerator
                share_memory=self.mode == MODE_ASYNC_PROCESS,  # hands tensors to the writer process without a copy
            )
        return self._stager

    def _commit_loop(self) -> None:
        while (pending := self._commit_queue.get()) is not None:
            self._finish(pending)

    def _finish(self, pending: PendingSave) -> None:
        """Background: wait for every rank's data to be durable, then commit (rank 0)."""
        try:
            assert pending.upload_future is not None
            pending.upload_future.result()
            pending.uploaded_at = time.perf_counter()
            if pending.staged_at is None:
                pending.staged_at = pending.uploaded_at
            if self.rank == 0:
                self._commit(pending)
        except BaseException as exc:  # noqa: BLE001 - report every failure, CheckpointException included
            self._record_failure(pending, exc)
        finally:
            pending.finished_at = time.perf_counter()
            pending.done.set()

    def _commit(self, pending: PendingSave) -> None:
        faults.pause_point("before_commit", pending.step)
        info = {
            "step": pending.step,
            "world_size": self.world_size,
            "mode": self.mode,
            **self.signature.marker_fields(),
            **pending.marker_fields,
        }
        writer = pending.writer
        written = (writer.written_sums, writer.written_sizes) if writer is not None else (None, None)
        pending.marker = layout.write_marker(pending.dir, info, integrity.saved_entries(pending.dir, *written))
        pending.committed_at = time.perf_counter()
        self._committed.add(pending.step)
        logger.info(
            "checkpoint step %d committed: %.1f MB in %.2f s (%s)",
            pending.step,
            pending.marker["total_bytes"] / 1e6,
            pending.committed_at - pending.started,
            pending.dir,
        )
        faults.pause_point("after_commit", pending.step)
        if self._retention is not None:
            self._retention.committed(pending.dir)

    def _record_failure(self, pending: PendingSave, exc: BaseException) -> None:
        cause = describe_error(exc)
        # DCP wraps the writer's exception (in a CheckpointException, maybe from another process): match by name
        pending.nonfinite = NonFiniteStateError.__name__ in cause
        space = "" if pending.nonfinite else self.storage.free_space_note()
        pending.error = f"writing {pending.dir}: {cause}{space}"
        self.failures += 1
        logger.error(
            "checkpoint step %d FAILED on rank %d, it will not be marked complete: %s",
            pending.step,
            self.rank,
            pending.error,
        )

    @property
    def last_error(self) -> str:
        """The cause of the in-flight save's failure on this rank, or ''."""
        return self._pending.error if self._pending else ""

    def failed_pending(self) -> bool:
        """True if the save in flight has already failed on this rank (cheap; for a per-step check)."""
        return self._pending is not None and bool(self._pending.error)

    def busy_since(self, since: float) -> bool:
        """True if a save of this manager was in flight at any moment after ``since`` (``time.perf_counter``):
        still running, or finished (committed or failed) after it."""
        pending = self._pending
        if pending is None:
            return False
        return not pending.done.is_set() or (pending.finished_at or 0.0) > since

    def nonfinite_pending(self) -> bool:
        """True if the save in flight was refused because the state held NaN or Inf (a health problem)."""
        return self._pending is not None and self._pending.nonfinite

    def wait_for_staging(self) -> None:
        """Block until the in-flight save has copied the state; call before mutating parameters."""
        pending = self._pending
        if pending is None or pending.staging_future is None or pending.staging_future.done():
            return
        waited = time.perf_counter()
        try:
            pending.staging_future.result(timeout=self.timeout_s)
        except TimeoutError:
            raise CheckpointError(
                f"staging of checkpoint step {pending.step} did not finish within checkpoint.timeout_s={self.timeout_s}"
            ) from None
        except BaseException as exc:
            if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                raise
            # the upload future carries the same failure; _finish reports it
        pending.blocking_s += time.perf_counter() - waited

    def wait(self) -> SaveStats | None:
        """Finish the save in flight (commit included) and return its stats, reduced over ranks.

        Every rank must call this at the same point: the stats are combined with a collective.
        """
        return self._finish_pending(charge_wait=True)

    def _finish_pending(self, charge_wait: bool) -> SaveStats | None:
        pending = self._pending
        if pending is None:
            return None
        waited = time.perf_counter()
        if not pending.done.wait(timeout=self.timeout_s):
            raise CheckpointError(
                f"checkpoint step {pending.step} did not finish within checkpoint.timeout_s={self.timeout_s}s "
                f"(stuck I/O or a rank that stopped answering)"
            )
        if charge_wait:
            pending.blocking_s += time.perf_counter() - waited
        self._pending = None
        return reduce_stats(pending, self.device)

    def _forget_committed(self, step: int) -> None:
        self._committed.discard(step)  # find_committed replaces the set: look it up at each call

    def _step_in_flight(self) -> int | None:
        """The step being saved (retention never removes it)."""
        pending = self._pending
        return pending.step if pending else None

    # --------------------------------------------------------------------------------------------- loading
    def load(
        self,
        states: StatesFor,
        optional_prefixes: tuple[str, ...] = (),
        candidates: list[layout.StepDir] | None = None,
    ) -> LoadResult | None:
        """Load the best usable checkpoint into ``states`` (see ``loading.load_best``): of ``candidates`` (best
        first), by default those of ``checkpoint.resume``. ``states`` may be a function of the candidate's
        marker (old checkpoints name their states differently). None: start fresh."""
        resume = self.options.resume
        return loading.load_best(
            states,
            loading.find_candidates(self.storage, resume) if candidates is None else candidates,
            resume=resume,
            expect=loading.Expectations(
                self.signature.model, self.world_size, self.options.on_world_size_change != "refuse"
            ),
            rank=self.rank,
            world_size=self.world_size,
            device=self.device,
            process_group=self.process_group,
            verify_checksums=self.options.verify == "checksums",
            optional_prefixes=optional_prefixes,
            root=self.storage,
        )

    # ---------------------------------------------------------------------------------------------- closing
    def close(self) -> SaveStats | None:
        """Wait for the last save to commit, stop the background threads, and release staging buffers."""
        self._wait_for_writer_start()
        stats = self.wait()
        if self._committer is not None:
            self._commit_queue.put(None)
            self._committer.join(timeout=self.timeout_s)
            self._committer = None
        if self._retention is not None:
            self._retention.stop(self.timeout_s)
            self._retention = None
        if self._stager is not None:
            self._stager.close()
            self._stager = None
        if self.mode == MODE_ASYNC_PROCESS:
            writer_process.stop()
        return stats
