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
from typing import Any, Iterable

ROLLBACK, STOP, IGNORE = "rollback", "stop", "ignore"  # train.on_unhealthy / HealthPolicy.on_unhealthy
ON_UNHEALTHY = (ROLLBACK, STOP, IGNORE)
EXIT_UNHEALTHY = 65  # EX_DATAERR: stopped because a step's loss or gradients went bad (train.on_unhealthy=stop)


class UnhealthyError(RuntimeError):
    """Training stopped on an unhealthy step (``on_unhealthy="stop"``, or more rollbacks than allowed)."""


@dataclass(frozen=True)
class HealthPolicy:
    """What counts as unhealthy and what to do about it (the recipe's ``train.*`` keys of the same names).

    ``spike_factor``: a loss more than ``max((spike_factor - 1) x |median|, 6 robust std)`` above the median of
    the last ``spike_window`` healthy losses is a spike (0 = off); for an ordinary positive loss, one above
    ``spike_factor`` times the median (``spike_limit`` says why). ``rollback_skip_batches``: batches skipped
    after a rollback; -1 = those consumed since the restored checkpoint plus 10% (at least one more).
    """

    on_unhealthy: str = ROLLBACK
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


ROBUST_STD = 1.4826  # the median absolute deviation times this estimates the standard deviation (normal noise)
NOISE_FLOOR = 6.0  # a spike rises more than this many robust standard deviations above the median, at any factor


def spike_limit(losses: Iterable[float], factor: float) -> tuple[float, float]:
    """(median, limit) of a window of healthy losses: a loss more than ``limit`` above the median is a spike.

    ``limit = max((factor - 1) x |median|, NOISE_FLOOR x robust std)``, the robust std being ``ROBUST_STD x`` the
    median absolute deviation of the window from its median. Why this rule:

    * for a positive loss it is the documented "above ``factor`` times the median" wherever that limit already lay
      6 robust standard deviations out (an ordinary loss: a level well above its noise);
    * it measures how far the loss rose above the median, so it holds for any sign: a negative loss (a
      log-likelihood objective) must rise ``(factor - 1) x |median|`` above it. The plain test, ``loss > factor x
      median``, would flag every step there, as ``factor x median`` lies below a negative median;
    * near 0, ``|median|`` is no yardstick and would flag the noise; the noise floor decides instead. 6 robust
      standard deviations are reached by healthy normal noise about once in 10^9 steps (more often with heavier
      tails or a spread misjudged from 50 losses, still rarely). A floor that scaled with the factor would not
      hold: at factor 2, ``(factor - 1) x 3`` robust std flags healthy normal noise often (docs/bench.md). The floor
      also keeps a positive loss that is noisy next to its level from being flagged by its noise.

    Median and MAD ignore the window's own outliers. A window of one repeated value has no noise: the level alone
    sets the limit (after a window of zeros any loss above 0 is a spike).
    """
    window = list(losses)
    median = statistics.median(window)
    spread = ROBUST_STD * statistics.median(abs(x - median) for x in window)
    return median, max((factor - 1) * abs(median), NOISE_FLOOR * spread)


class HealthMonitor:
    """Judges each step from the values a rank reports; remembers recent healthy losses for spike detection.

    The window is state: ``state_dict``/``load_state_dict`` save it with the checkpoint (``TrainProgress``), so a
    resumed or rolled back run judges its next steps as the uninterrupted run did."""

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
            return self._spike(loss)
        return ""

    def _spike(self, loss: float) -> str:
        factor = self.policy.spike_factor
        median, limit = spike_limit(self._losses, factor)
        if loss - median <= limit:
            return ""
        return (
            f"loss {loss:.4g} is a spike: {loss - median:.4g} above the median {median:.4g} of the last "
            f"{len(self._losses)} healthy losses, more than max(({factor:g} - 1) x |median|, "
            f"{NOISE_FLOOR:g} robust std) = {limit:.4g}"
        )

    def record(self, loss: float | None) -> None:
        """Count ``loss`` into the spike history (healthy steps only)."""
        if loss is not None:
            self._losses.append(loss)

    def state_dict(self) -> dict[str, Any]:
        """The window of recent healthy losses, oldest first (plain floats)."""
        return {"losses": list(self._losses)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a window; one longer than ``spike_window`` keeps its newest losses."""
        self._losses = deque((float(x) for x in state_dict["losses"]), maxlen=self.policy.spike_window)

    def clear(self) -> None:
        """Forget the window (no spike verdict until ``MIN_HISTORY`` healthy losses again)."""
        self._losses.clear()
