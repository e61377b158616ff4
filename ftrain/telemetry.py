"""What the ``Checkpointer`` records about a run: the ``checkpoint/*`` scalars (into the user's ``SummaryWriter``
or its own under ``{run.dir}/tb``), the ``STATUS`` record, what a failure cost (the recovery record) and the lines
that say how the intervals were chosen. Every rank makes the same calls; STATUS and the lines are rank 0's, and the
scalars go to the user's writer wherever one was given, else to rank 0's own."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ftrain import processes, tags, warm
from ftrain.checkpoint.run_dir import TENSORBOARD_DIR
from ftrain.run_status import RunStatus, StatusWriter, read_status

if TYPE_CHECKING:
    from ftrain.checkpoint.pending import SaveStats
    from ftrain.interval import SaveSchedule
    from ftrain.state import TrainProgress

logger = logging.getLogger("ftrain")


class Telemetry:
    """Rank 0's scalars, ``STATUS`` and recovery record for one run directory (a no-op writer elsewhere)."""

    def __init__(self, run_dir: Path, is_main: bool, overhead_budget: float, writer: Any = None) -> None:
        self.run_dir = run_dir
        self.is_main = is_main
        self.overhead_budget = overhead_budget
        self.writer = writer  # the user's SummaryWriter, or None: the checkpointer opens its own under tb/
        self.metrics: Any = None  # after open()
        self.status = StatusWriter(run_dir, False, _blank_status())
        self._recovery: dict[str, float] | None = None

    def open(self, step: int) -> Any:
        """Open the scalar writer at the step the run continues from."""
        if self.writer is not None:
            self.metrics = _WriterAdapter(self.writer)
        else:
            from ftrain.metrics import Metrics  # TensorBoard is imported only by the process that writes events

            self.metrics = Metrics(self.run_dir / TENSORBOARD_DIR, self.is_main, step)
        return self.metrics

    def start_status(self, step: int, load_s: float, tier: str) -> None:
        """Rank 0: read what the previous attempt left in STATUS (what the failure cost), then start ours."""
        if not self.is_main:
            return
        previous = read_status(self.run_dir)
        now = time.time()
        started = processes.start_time()
        if previous is not None and step and not previous.finished and previous.step >= step:
            self._recovery = {
                "previous_step_at": previous.step_at,
                tags.RECOVERY_STEPS_REDONE: float(previous.step - step),
                tags.RECOVERY_STARTUP_S: now - started,
                tags.RECOVERY_LOAD_S: load_s,
            }
        self.status = StatusWriter(self.run_dir, True, RunStatus(started, step, tier, now, step, now))

    def step_done(self, step: int, finished: bool) -> None:
        """``step`` finished: into STATUS, and after a resume's first step, what the failure cost."""
        self.status.step(step, finished=finished)
        if self._recovery is not None:
            self._log_recovery(step)

    def _log_recovery(self, step: int) -> None:
        recovery, self._recovery = self._recovery, None
        assert recovery is not None
        lost = self.status.status.first_step_at - recovery.pop("previous_step_at")
        self.metrics.log({tags.RECOVERY_TIME_LOST_S: lost, **recovery}, step)
        generation = warm.generation()
        rehearsed = ", which had rehearsed a step" if warm.rehearsed() else ""
        how = f"a fork of the warm parent{rehearsed} (generation {generation})" if generation else "a new process"
        logger.info(
            "recovered: %.2f s lost (start-up %.2f s, of which loading %.2f s), %d step(s) redone, from the %s "
            "tier's step %d, in %s",
            lost,
            recovery[tags.RECOVERY_STARTUP_S],
            recovery[tags.RECOVERY_LOAD_S],
            recovery[tags.RECOVERY_STEPS_REDONE],
            self.status.status.tier,
            self.status.status.resumed_from,
            how,
        )

    def log_save(self, stats: SaveStats, failures: int) -> None:
        """A save's cost scalars (its write figures only when it committed)."""
        scalars = {
            tags.CKPT_BLOCKING_S: stats.blocking_s,
            tags.CKPT_STAGING_S: stats.staging_s,
            tags.CKPT_FAILURES: float(failures),
        }
        if stats.ok:
            scalars.update(
                {
                    tags.CKPT_SAVE_S: stats.save_s,
                    tags.CKPT_WRITE_S: stats.write_s,
                    tags.CKPT_SIZE_BYTES: float(stats.size_bytes),
                    tags.CKPT_WRITE_GBPS: stats.write_gbps,
                }
            )
        self.metrics.log(scalars, stats.step)

    def announce_interval(self, when: str, schedule: SaveSchedule, step: int) -> None:
        """``interval=auto``: the line and the scalar that say which interval was chosen."""
        cost = f", measured cost {schedule.cost_s:.3f} s per checkpoint" if schedule.cost_s is not None else ""
        if self.is_main:
            logger.info(
                "checkpoint.interval=auto %s %d steps (budget %.1f%% of training time%s)",
                when,
                schedule.interval,
                100 * self.overhead_budget,
                cost,
            )
        if self.metrics is not None:
            self.metrics.log({tags.CKPT_INTERVAL: float(schedule.interval)}, step)

    def local_interval(self, agreed: int, changed: bool, cost_s: float | None, step: int) -> None:
        """``local_interval=auto`` after a review: a line when the interval changed, and the scalars."""
        if changed and self.is_main:
            logger.info(
                "checkpoint.local_interval=auto now %d step(s) (budget %.1f%% of training time)",
                agreed,
                100 * self.overhead_budget,
            )
        if self.metrics is not None:
            measured = {tags.LOCAL_INTERVAL: float(agreed)}
            if cost_s is not None:
                measured[tags.LOCAL_SNAPSHOT_S] = cost_s
            self.metrics.log(measured, step)

    def warn_if_resharded(self, progress: TrainProgress, world_size: int) -> None:
        """Rank 0, after a resume on another world size: what the data and the RNGs do now."""
        source = progress.resharded_from
        if source is None or not self.is_main:
            return
        if progress.sampler is None:
            logger.warning(
                "resumed a checkpoint of %d ranks on %d: the data loader has no global position, so its per-rank "
                "positions are lost and it starts over; RNGs re-seeded",
                source,
                world_size,
            )
            return
        logger.warning(
            "resharded from %d to %d ranks: data continues at epoch %d, sequence %d of its order; "
            "RNGs re-seeded, so this run is not bit-identical to one on %d ranks",
            source,
            world_size,
            progress.data_position["epoch"],
            progress.data_position["cursor"],
            source,
        )

    def close(self) -> None:
        """Close STATUS; flush the scalars (and close the writer the checkpointer opened, never the user's)."""
        self.status.close()
        if self.metrics is not None:
            self.metrics.flush()
            if self.writer is None:
                self.metrics.close()


class _WriterAdapter:
    """A user's ``SummaryWriter`` behind the interface of ``ftrain.metrics.Metrics``."""

    def __init__(self, writer: Any) -> None:
        self.writer = writer
        self._last_step: dict[str, int] = {}

    def log(self, scalars: dict[str, float], step: int) -> None:
        for name, value in scalars.items():
            self.writer.add_scalar(name, value, step)
            self._last_step[name] = step

    def logged(self, tag: str, step: int) -> bool:
        return self._last_step.get(tag) == step

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.flush()


def _blank_status() -> RunStatus:
    return RunStatus(attempt_started=0.0, resumed_from=0, tier="fresh", ready_at=0.0, step=0, step_at=0.0)


def show_ftrain_logs(is_main: bool) -> None:
    """Make the library's own lines ("resumed from ...", "checkpoint step N committed ...") visible in a loop
    that configured no logging (Python shows only warnings then): a handler on the ``ftrain`` logger, INFO on
    rank 0 and warnings elsewhere. A program that configured logging itself keeps its own setup."""
    library = logging.getLogger("ftrain")
    if library.handlers or logging.getLogger().handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s [ftrain] %(message)s", "%H:%M:%S"))
    library.addHandler(handler)
    if library.level == logging.NOTSET:
        library.setLevel(logging.INFO if is_main else logging.WARNING)
