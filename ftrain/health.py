"""Is a training step healthy? Finite loss and gradient norm, and (optionally) no loss spike.

The verdict of each rank travels with the per-step collective of ``ftrain.Checkpointer.maybe_save``, so every
rank agrees. An unhealthy step is never saved; what happens next is ``on_unhealthy``:

    rollback   restore the newest checkpoint in-process, skip the batches that led here, and go on
    stop       stop with ``EXIT_UNHEALTHY`` and a one-line reason; the newest checkpoint stays the latest
    ignore     log it and go on (saves still refuse tensors that hold NaN or Inf)
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from dataclasses import dataclass

ON_UNHEALTHY = ("rollback", "stop", "ignore")
EXIT_UNHEALTHY = 65  # EX_DATAERR: stopped because a step's loss or gradients went bad (train.on_unhealthy=stop)


class UnhealthyError(RuntimeError):
    """Training stopped on an unhealthy step (``on_unhealthy="stop"``, or more rollbacks than allowed)."""


@dataclass(frozen=True)
class HealthPolicy:
    """What counts as unhealthy and what to do about it (the recipe's ``train.*`` keys of the same names).

    ``spike_factor``: a loss above this many times the median of the last ``spike_window`` healthy losses is a
    spike (0 = off). ``rollback_skip_batches``: batches skipped after a rollback; -1 = those consumed since the
    restored checkpoint plus 10% (at least one more).
    """

    on_unhealthy: str = "rollback"
    spike_factor: float = 0.0
    spike_window: int = 50
    max_rollbacks: int = 3
    rollback_skip_batches: int = -1

    def __post_init__(self) -> None:
        if self.on_unhealthy not in ON_UNHEALTHY:
            raise ValueError(f"on_unhealthy={self.on_unhealthy!r}: must be one of {', '.join(ON_UNHEALTHY)}")
        if not (self.spike_factor == 0 or self.spike_factor > 1) or not math.isfinite(self.spike_factor):
            raise ValueError(f"spike_factor={self.spike_factor}: must be 0 (off) or a finite factor above 1")
        if self.max_rollbacks < 0 or self.spike_window < 1 or self.rollback_skip_batches < -1:
            raise ValueError("max_rollbacks and rollback_skip_batches must be >= 0 (-1: auto), spike_window >= 1")

    def batches_to_skip(self, failed_step: int, restored_step: int) -> int:
        if self.rollback_skip_batches >= 0:
            return self.rollback_skip_batches
        consumed = max(failed_step - restored_step, 0)
        return consumed + max(1, math.ceil(consumed / 10))


class HealthMonitor:
    """Judges each step from the values a rank reports; remembers recent healthy losses for spike detection."""

    MIN_HISTORY = 10  # no spike verdict before this many healthy losses

    def __init__(self, policy: HealthPolicy) -> None:
        self.policy = policy
        self._losses: deque[float] = deque(maxlen=policy.spike_window)

    def judge(self, loss: float | None, grad_norm: float | None) -> str:
        """'' if healthy, else a short reason."""
        if loss is not None and not math.isfinite(loss):
            return f"loss is {loss}"
        if grad_norm is not None and not math.isfinite(grad_norm):
            return f"gradient norm is {grad_norm}"
        if loss is not None and self.policy.spike_factor and len(self._losses) >= self.MIN_HISTORY:
            median = statistics.median(self._losses)
            if loss > self.policy.spike_factor * median:
                return f"loss {loss:.4g} is above {self.policy.spike_factor:g} x the recent median {median:.4g}"
        return ""

    def record(self, loss: float | None) -> None:
        """Count ``loss`` into the spike history (healthy steps only)."""
        if loss is not None:
            self._losses.append(loss)
