"""When to save (``SaveSchedule``) and when to snapshot locally (``LocalSchedule``): every N steps, or ``auto``: the fewest steps whose measured checkpoint cost fits a budget.

The cost of one checkpoint is what training pays for it: the time the loop was blocked (``blocking_s``) plus
the slowdown of the steps that ran while the background write did (their time above the median step time
without a save in flight). With cost ``C``, step time ``t`` and budget ``b`` (a share of training time), an
interval of ``N = ceil(C / (b * t))`` steps keeps checkpoints within the budget (CheckFreq, FAST'21, holds
overhead to a few percent the same way). ``C`` is the mean of the last few checkpoints' costs, and what was spent
beyond the budget so far (the first checkpoint comes before any cost is known) is added to it. ``max_interval_s``
caps ``N * t``, so a durable checkpoint is never older than that. The interval is re-evaluated after every
checkpoint whose cost is known.
"""

from __future__ import annotations

import math
import statistics
from collections import deque

AUTO = "auto"
FIRST_AUTO_INTERVAL = 10  # steps before the first checkpoint of an auto run: enough to know the step time
COSTS_AVERAGED = 5  # recent checkpoints whose mean cost sets an auto interval


class SaveSchedule:
    """Decides at each step whether a checkpoint is due; fixed or auto."""

    def __init__(self, interval: str | int, overhead_budget: float = 0.01, max_interval_s: float = 1800.0) -> None:
        self.auto = str(interval).strip() == AUTO
        self.interval = FIRST_AUTO_INTERVAL if self.auto else int(interval)
        self.budget = overhead_budget
        self.max_interval_s = max_interval_s
        self._last_saved_step = 0
        self._quiet_steps: deque[float] = deque(maxlen=200)  # step times with no save in flight
        self._busy_steps: list[float] = []  # step times while the current save was in flight
        self._costs: deque[float] = deque(maxlen=COSTS_AVERAGED)
        self._spent_s = 0.0  # every measured checkpoint cost of this process
        self._steps_seen = 0
        self.cost_s: float | None = None  # the mean measured cost of one checkpoint (recent ones)

    def start(self, step: int) -> None:
        """The run (re)starts at ``step``: count the next interval from here."""
        self._last_saved_step = step

    def due(self, step: int) -> bool:
        if self.auto:
            return step - self._last_saved_step >= self.interval
        return step % self.interval == 0

    def saved(self, step: int) -> None:
        self._last_saved_step = step

    def observe_step(self, seconds: float, save_in_flight: bool) -> None:
        """One training step's wall time, and whether a background save ran during it."""
        (self._busy_steps if save_in_flight else self._quiet_steps).append(seconds)
        self._steps_seen += 1

    def propose(self, blocking_s: float) -> int:
        """A checkpoint's stats are known: the interval this rank's measurements ask for. Ranks measure their
        own step times, so the caller agrees on one value (the maximum) and passes it to ``set``."""
        if not self.auto or len(self._quiet_steps) < 3:
            self._busy_steps = []
            return self.interval
        step_s = statistics.median(self._quiet_steps)
        slowdown = sum(max(t - step_s, 0.0) for t in self._busy_steps)
        self._busy_steps = []
        self._costs.append(blocking_s + slowdown)
        self._spent_s += blocking_s + slowdown
        self.cost_s = statistics.fmean(self._costs)  # the mean: one save slowed by outside load moves it less
        # The budget is an account: what was spent beyond it (the first checkpoint, FIRST_AUTO_INTERVAL steps in,
        # before any cost was known; a dearer save than foreseen) is paid back by a longer next interval.
        debt = max(0.0, self._spent_s - self.budget * self._steps_seen * step_s)
        wanted = math.ceil((self.cost_s + debt) / (self.budget * step_s)) if step_s > 0 else 1
        cap = max(1, int(self.max_interval_s / step_s)) if step_s > 0 else wanted
        return max(1, min(wanted, cap))

    def set(self, interval: int) -> bool:
        """Adopt the agreed interval; True if it changed."""
        changed = interval != self.interval
        self.interval = interval
        return changed


class LocalSchedule:
    """How often to take a local snapshot: every N steps, or ``auto``: the fewest steps whose measured cost fits
    the overhead budget. A snapshot's cost is the training thread's time in ``snapshot()`` (all of it for host
    state) plus, for device state, the CPU time of the background copy, checksum and marker (on a machine whose
    cores training fills, that CPU is taken from training). Ranks must snapshot the same steps (a restart needs a step every rank holds), so the interval is
    re-evaluated only at fixed steps and agreed by the caller (``propose`` then ``set``)."""

    REVIEW_EVERY = 50  # steps between re-evaluations of an auto interval (the same steps on every rank)
    # The first snapshots after a start fault in each slot's pages (one per slot): not what a snapshot costs.
    WARMUP_SNAPSHOTS = 2
    # The first review comes right after the first snapshot past the warm-up (an auto interval starts at 1), so a
    # large state is snapshotted at every step for no longer than it takes to measure one snapshot.
    FIRST_REVIEW_AFTER = WARMUP_SNAPSHOTS + 1
    MAX_AUTO_INTERVAL = 100
    # Until this many steps are measured since a start, the step time is the fastest of them: the first steps carry
    # one-time work (a model's first forward and backward, each slot's first pages), and a median of three would
    # be one of those; the fastest gives the longer interval, the safe side of the budget.
    STEADY_AFTER = 10

    def __init__(self, interval: str | int, overhead_budget: float = 0.01) -> None:
        self.auto = str(interval).strip() == AUTO
        self.interval = 1 if self.auto else int(interval)
        self.budget = overhead_budget
        self._costs: deque[float] = deque(maxlen=20)
        self._steps: deque[float] = deque(maxlen=200)
        self._since_start: list[float] = []  # step times since the last start (up to STEADY_AFTER)
        self._first_review: int | None = None
        self._warmup_left = self.WARMUP_SNAPSHOTS

    def start(self, step: int) -> None:
        """The run (re)starts at ``step`` (the same on every rank): the first review follows shortly."""
        self._first_review = step + self.FIRST_REVIEW_AFTER
        self._warmup_left = self.WARMUP_SNAPSHOTS
        self._since_start = []

    def due(self, step: int) -> bool:
        return self.interval > 0 and step % self.interval == 0

    def review_due(self, step: int) -> bool:
        return self.auto and (step % self.REVIEW_EVERY == 0 or step == self._first_review)

    def observe_step(self, seconds: float) -> None:
        self._steps.append(seconds)
        if len(self._since_start) < self.STEADY_AFTER:
            self._since_start.append(seconds)

    def observe_snapshot(self, cost_s: float) -> None:
        if self._warmup_left > 0:
            self._warmup_left -= 1
            return
        self._costs.append(cost_s)

    @property
    def cost_s(self) -> float | None:
        """The median cost of the recent snapshots (what ``propose`` weighs); None before any was measured."""
        return statistics.median(self._costs) if self._costs else None

    def propose(self, save_every: int = 0) -> int:
        """The interval this rank's measurements ask for. ``save_every``: the steps between durable saves (0: none);
        each save takes a snapshot whatever the interval (the save writes from it), and those are paid from the
        same budget, so the snapshots between saves get what they leave of it (none: ``MAX_AUTO_INTERVAL``)."""
        recent = self._since_start  # a start's first step is not fed here (``StepTimer``): one-off costs
        if not self._costs or (len(self._steps) < 3 and not recent):
            return self.interval
        step_s = min(recent) if 0 < len(recent) < self.STEADY_AFTER else statistics.median(self._steps)
        cost = self.cost_s
        if step_s <= 0 or cost is None:
            return self.interval
        left_per_step = self.budget * step_s - (cost / save_every if save_every > 0 else 0.0)
        if left_per_step <= 0:
            return self.MAX_AUTO_INTERVAL
        return max(1, min(self.MAX_AUTO_INTERVAL, math.ceil(cost / left_per_step)))

    def set(self, interval: int) -> bool:
        changed = interval != self.interval
        self.interval = interval
        return changed
