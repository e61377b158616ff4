"""The Checkpointer's use of the local snapshot tier (``ftrain/checkpoint/local/``): a snapshot at the steps due,
``local_interval=auto`` steered by their cost, resuming from the newest one, its timeline, lending it to a durable
save, and removing the snapshots at a clean close once they are redundant. Every method is a no-op without the tier
(``local_interval=0``, or checkpoints off)."""

from __future__ import annotations

import time

from ftrain import faults
from ftrain.checkpoint import layout
from ftrain.checkpoint.collectives import DistContext, max_over_ranks
from ftrain.checkpoint.local import LentSnapshot, LocalSnapshots, resume_newest
from ftrain.checkpoint.manager import CheckpointManager
from ftrain.checkpoint.options import AUTO
from ftrain.checkpoint.run_dir import RunDirectory
from ftrain.interval import LocalSchedule, SaveSchedule
from ftrain.telemetry import Telemetry
from ftrain.user_objects import SavedStates


class LocalSnapshotting:
    """``local``: the run's snapshots, or None without the tier; ``schedule``: when they are due;
    ``save_schedule``: the durable saves', each of which takes a snapshot too."""

    def __init__(
        self,
        local: LocalSnapshots | None,
        schedule: LocalSchedule,
        save_schedule: SaveSchedule,
        states: SavedStates,
        manager: CheckpointManager,
        run: RunDirectory,
        ctx: DistContext,
        telemetry: Telemetry,
    ) -> None:
        self.local = local
        self.schedule = schedule
        self._save_schedule = save_schedule
        self._states = states
        self._manager = manager
        self._run = run
        self._ctx = ctx
        self._telemetry = telemetry
        self._extra_checked = False
        self._call_s = 0.0  # the training thread's share of the latest snapshot
        self._unmeasured = False  # the latest snapshot's cost is not yet with the schedule
        self._marking_later = False  # the latest snapshot's sums and marker wait for after_save

    def after_healthy_step(self, step: int, save_due: bool) -> bool:
        """A snapshot of ``step`` when one is due, and always with a durable save: the save writes from the
        snapshot's copy, so the step costs one copy, not two. Then, at its steps, the ``local_interval=auto``
        review. True if a snapshot of ``step`` was taken. Collective."""
        if self.local is None:
            return False
        snapshotted = False
        if self.schedule.due(step) or save_due:
            snapshotted = self._take(step, save_due)
        if self.schedule.review_due(step):
            # a review with no measured snapshot yet (the first, right after the warm-up) waits for this one's
            self._measure(block=self.schedule.cost_s is None)
            self._review_interval(step)
        return snapshotted

    def _take(self, step: int, save_due: bool) -> bool:
        """A local snapshot of ``step``; with ``local_interval=auto``, its cost steers the interval. True if taken.
        With ``save_due``, when the save will only dispatch, its sums and marker wait for ``after_save`` (they
        would compete with the dispatch); a save that first waits for another would hold them back too long."""
        assert self.local is not None
        if self.local.disabled:
            return False
        if not self._extra_checked:  # before the first snapshot, as before the first save
            self._states.check_extra()
            self._extra_checked = True
        self._measure(block=False)
        called = time.perf_counter()
        # A resume may start right after this step: the curve up to it must be out of this process (a syscall).
        self._telemetry.metrics.flush()
        self._marking_later = save_due and self._manager.dispatches_at_once
        self.local.snapshot(step, self._states.local, mark_later=self._marking_later)
        self._call_s = time.perf_counter() - called
        self._unmeasured = True
        if not self._marking_later:
            faults.pause_point(faults.AFTER_LOCAL_SNAPSHOT, step)
        return True

    def after_save(self, step: int, snapshotted: bool) -> None:
        """The durable save of ``step`` is dispatched: the sums and marker of its snapshot may start."""
        if self.local is None or not snapshotted or not self._marking_later:
            return
        self._marking_later = False
        self.local.start_marking()
        faults.pause_point(faults.AFTER_LOCAL_SNAPSHOT, step)

    def _measure(self, block: bool) -> None:
        """Hand the latest snapshot's cost (the call plus its background CPU) to the schedule once it is known;
        with ``block``, wait for its background work."""
        if not self._unmeasured or self.local is None:
            return
        background = self.local.background_cost(block)
        if background is not None:
            self.schedule.observe_snapshot(self._call_s + background)
            self._unmeasured = False

    def _review_interval(self, step: int) -> None:
        """``local_interval=auto``: every rank re-evaluates at the same steps and they take the largest proposal."""
        save_every = self._save_schedule.interval if self._manager.enabled else 0
        agreed = int(max_over_ranks([float(self.schedule.propose(save_every))], self._ctx.device)[0])
        changed = self.schedule.set(agreed)
        self._telemetry.local_interval(agreed, changed, self.schedule.cost_s, step)

    def resume(self, resume: str) -> bool:
        """Resume from the local tier when every rank holds a snapshot newer than the latest durable checkpoint
        (``resume=auto`` only). False: the durable path. Collective."""
        if self.local is None or resume != AUTO:
            return False
        latest = layout.latest_complete(self._manager.root)
        return resume_newest(self.local, latest.step if latest else 0, self._states.local, self._ctx)

    def start_timeline(self) -> None:
        """This attempt does not continue the local snapshots' timeline (a durable resume, a rewind, a fresh start):
        a new timeline begins, recorded in the run directory before anything else changes, so that no snapshot of
        the old one is ever resumed, whatever the local tier setting of this attempt. Collective."""
        if not self._manager.enabled:
            return
        timeline = self._run.new_timeline()
        if self.local is not None:
            self.local.set_signature({**self.local.signature, "timeline": timeline})

    def lend(self, step: int) -> LentSnapshot | None:
        """The snapshot of ``step``, just taken with no change to the state since, as the staging copy of its
        durable save (when the save's mode takes one)."""
        if self.local is None or not self._manager.takes_prestaged:
            return None
        return self.local.lend(step, in_use=lambda: self._manager.in_flight(step))

    def drop_after(self, step: int) -> None:
        """Snapshots newer than ``step`` belong to a timeline left behind (or hold steps that went bad)."""
        if self.local is not None:
            self.local.drop_after(step)

    def wait(self) -> None:
        """Until the latest snapshot's copy of the state is done (before the state changes)."""
        if self.local is not None:
            self.local.wait()

    def remove_if_redundant(self, step: int, finished: bool, preempted: str | None) -> None:
        """At a clean close: the snapshots go once nothing would resume from them."""
        if self.local is not None and self._redundant(step, finished, preempted):
            self.local.remove()

    def _redundant(self, step: int, finished: bool, preempted: str | None) -> bool:
        """The run finished, or (not preempted: those keep them, to resume from memory) its latest committed
        checkpoint is of the current step, e.g. a run started again after its final commit, which has nothing to do."""
        if finished:
            return True
        latest = layout.latest_complete(self._manager.root) if self._manager.enabled else None
        return preempted is None and latest is not None and latest.step >= step

    def close(self) -> None:
        if self.local is not None:
            self.local.close()
