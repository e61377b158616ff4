"""The wall time of each training step, measured between calls of ``Checkpointer.maybe_save``: logged for
``ftrain-report`` (unless the loop logs it itself) and fed to both interval schedules, which weigh a save's or a
snapshot's cost against it."""

from __future__ import annotations

import time

from ftrain import tags
from ftrain.checkpoint.manager import CheckpointManager
from ftrain.interval import LocalSchedule, SaveSchedule
from ftrain.telemetry import Telemetry


class StepTimer:
    def __init__(
        self, schedule: SaveSchedule, local_schedule: LocalSchedule, manager: CheckpointManager, telemetry: Telemetry
    ) -> None:
        self._schedule = schedule
        self._local_schedule = local_schedule
        self._manager = manager
        self._telemetry = telemetry
        self._started = time.perf_counter()
        self._last_call: float | None = None

    def start(self) -> None:
        """Training (re)starts now: the next step's time counts from here (its first step is not fed to the
        schedules: it holds the start-up's one-off costs)."""
        self._started = time.perf_counter()
        self._last_call = None

    def step_done(self, step: int, last: bool) -> None:
        now = time.perf_counter()
        metrics = self._telemetry.metrics
        if not metrics.logged(tags.STEP_TIME_S, step):  # the loop did not log it: ftrain-report needs it
            metrics.log({tags.STEP_TIME_S: now - (self._last_call or self._started)}, step)
        if self._last_call is not None:
            # a background write that ran during any part of this step slowed it, even if it has finished since
            self._schedule.observe_step(now - self._last_call, save_in_flight=self._manager.busy_since(self._last_call))
            self._local_schedule.observe_step(now - self._last_call)
        self._last_call = now
        self._telemetry.step_done(step, finished=last)
