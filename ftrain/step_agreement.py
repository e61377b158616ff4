"""What every rank agrees on after a training step, in one collective: whether a preemption signal arrived
anywhere, whether a background save failed anywhere, and whether the step was unhealthy anywhere.

One rank's view is never enough: a rank that saw a signal, a failed save or a NaN alone must not save (or skip)
a step the others skip (or save), or the checkpoint would mix steps."""

from __future__ import annotations

from dataclasses import dataclass

from ftrain.checkpoint.collectives import DistContext, sum_over_ranks
from ftrain.checkpoint.errors import CheckpointError
from ftrain.checkpoint.manager import CheckpointManager
from ftrain.checkpoint.options import ON_FAILURE_ABORT
from ftrain.health import HealthMonitor
from ftrain.preemption import PreemptionFlag


@dataclass(frozen=True)
class StepVerdict:
    """The agreed outcome of one step. ``problem``: this rank's own reason the step is unhealthy ('' if it saw
    none: ``unhealthy`` may still be True because of another rank)."""

    stop: bool
    save_failed: bool
    unhealthy: bool
    problem: str

    @property
    def reason(self) -> str:
        return self.problem or "on another rank"


class StepAgreement:
    """Judges a step on this rank and agrees the verdict with every other rank (collective)."""

    def __init__(
        self,
        preemption: PreemptionFlag,
        manager: CheckpointManager,
        monitor: HealthMonitor,
        on_failure: str,
        ctx: DistContext,
    ) -> None:
        self._preemption = preemption
        self._manager = manager
        self._monitor = monitor
        self._on_failure = on_failure
        self._ctx = ctx

    def agree(self, loss: float | None, grad_norm: float | None) -> StepVerdict:
        """The step's verdict on every rank. A background save that failed with ``on_failure=abort`` raises
        ``CheckpointError`` on every rank at once. A save that failed because a tensor held NaN or Inf makes the
        step unhealthy rather than counting as a failed save: the state itself went bad."""
        problem = self._monitor.judge(loss, grad_norm)
        poisoned = self._manager.nonfinite_pending()
        if poisoned and not problem:
            problem = f"a saved tensor held NaN or Inf ({self._manager.last_error})"
        stop, failed, unhealthy = sum_over_ranks(
            [
                float(self._preemption.requested is not None),
                float(self._manager.failed_pending() and not poisoned),
                float(bool(problem)),
            ],
            self._ctx.device,
        )
        if failed and self._on_failure == ON_FAILURE_ABORT:
            raise CheckpointError(
                f"stopping because checkpoint.on_failure=abort and a background save failed: "
                f"{self._manager.last_error or 'on another rank'}"
            )
        return StepVerdict(stop=bool(stop), save_failed=bool(failed), unhealthy=bool(unhealthy), problem=problem)
