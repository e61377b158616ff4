"""TensorBoard scalars (rank 0) and the console progress line.

One run keeps one TensorBoard directory across restarts: a resumed run reopens it with ``purge_step`` so the
steps it is about to redo replace the ones logged after the checkpoint it resumed from.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from ftrain.tb_writer import ScalarWriter

logger = logging.getLogger("ftrain")


def setup_logging(rank: int, level: str | int | None = None) -> None:
    """Console logging for the commands: a handler on the ``ftrain`` logger (never the root logger).

    Rank 0 logs at ``level`` (``log.level``: debug, info, warning, error; default info); other ranks at warning
    or above. Called again (say, by the Trainer, without a level), it replaces its own handler and keeps the
    level chosen before. A program's own handlers on other loggers are left alone; ftrain's records do not
    propagate to the root logger once this handler is installed, so they are not printed twice.
    """
    global _chosen_level
    if level is not None:
        _chosen_level = logging.getLevelName(level.upper()) if isinstance(level, str) else level
    chosen = _chosen_level if _chosen_level is not None else logging.INFO
    ftrain_logger = logging.getLogger("ftrain")
    for handler in [h for h in ftrain_logger.handlers if getattr(h, "_ftrain_console", False)]:
        ftrain_logger.removeHandler(handler)
    handler = logging.StreamHandler()
    handler._ftrain_console = True  # type: ignore[attr-defined]
    handler.setFormatter(logging.Formatter(f"%(asctime)s [rank{rank}] %(message)s", datefmt="%H:%M:%S"))
    ftrain_logger.addHandler(handler)
    ftrain_logger.setLevel(chosen if rank == 0 else max(chosen, logging.WARNING))
    ftrain_logger.propagate = False
    # DCP's background writer process and planner are chatty at INFO.
    logging.getLogger("torch.distributed.checkpoint").setLevel(logging.WARNING)


_chosen_level: int | None = None


class Metrics:
    """Scalars to TensorBoard with the global step as x-axis; a no-op on ranks other than 0.

    A failing disk must not stop training: if writing events fails (disk full, say), logging pauses with a
    warning and is retried, in a new event file, at the next flush (each checkpoint).
    """

    def __init__(self, log_dir: Path, enabled: bool, start_step: int) -> None:
        self.log_dir = Path(log_dir)
        self.writer: ScalarWriter | None = None
        self.enabled = enabled
        self.broken = False
        self._last_step: dict[str, int] = {}  # tag -> the last step it was logged at (on every rank)
        if enabled:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            # purge_step drops events at or after it that an earlier, killed attempt of this run logged
            self.writer = _summary_writer(self.log_dir, purge_step=start_step + 1 if start_step else None)

    def log(self, scalars: dict[str, float], step: int) -> None:
        for name in scalars:
            self._last_step[name] = step
        if self.writer is None:
            return
        try:
            for name, value in scalars.items():
                self.writer.add_scalar(name, value, step)
        except OSError as exc:
            self._pause(exc)

    def logged(self, tag: str, step: int) -> bool:
        """Whether ``tag`` was logged for ``step`` already (e.g. by the training loop)."""
        return self._last_step.get(tag) == step

    def flush(self) -> None:
        if self.broken and self.enabled:
            self._reopen()
        if self.writer is None:
            return
        try:
            self.writer.flush()
        except OSError as exc:
            self._pause(exc)

    def restart_from(self, step: int) -> None:
        """Continue the curves from ``step`` (after a rollback): events logged after it are void, as on a resume."""
        if not self.enabled:
            return
        self.close()
        try:
            self.writer = _summary_writer(self.log_dir, purge_step=step + 1)
        except OSError as exc:
            logger.warning("TensorBoard logging paused (%s: %s); training goes on", self.log_dir, exc)
            self.broken = True

    def _pause(self, exc: OSError) -> None:
        logger.warning("TensorBoard logging paused (%s: %s); training goes on", self.log_dir, exc)
        self.broken = True
        writer, self.writer = self.writer, None
        try:
            writer.close()
        except Exception:  # the writer is already broken; nothing more to save from it
            pass

    def _reopen(self) -> None:
        try:
            self.writer = _summary_writer(self.log_dir)
            self.broken = False
            logger.info("TensorBoard logging resumed in %s", self.log_dir)
        except OSError:
            self.writer = None

    def close(self) -> None:
        if self.writer is not None:
            try:
                self.writer.close()
            except OSError as exc:
                logger.warning("TensorBoard events could not be flushed at exit: %s", exc)
            self.writer = None


class Progress:
    """The console line every ``interval`` steps: step, loss, speed and time left.

    Speed is the average over the steps since the last line (tokens over time, i.e. the harmonic mean of the
    per-step rates it is given every step), so one slow or fast step does not swing it.
    """

    def __init__(self, start_step: int, max_steps: int, interval: int) -> None:
        self.start_step = start_step
        self.max_steps = max_steps
        self.interval = interval
        self.started = time.perf_counter()
        self._steps = 0  # steps seen since the last line
        self._seconds_per_token = 0.0  # their sum of 1 / tokens_per_s

    def maybe_print(self, step: int, loss: float, lr: float, tokens_per_s: float) -> None:
        """Call at every step; prints at every ``interval``-th step and at the last."""
        if tokens_per_s > 0:
            self._steps += 1
            self._seconds_per_token += 1.0 / tokens_per_s
        if step % self.interval and step != self.max_steps:
            return
        average = self._steps / self._seconds_per_token if self._seconds_per_token > 0 else tokens_per_s
        self._steps, self._seconds_per_token = 0, 0.0
        elapsed = time.perf_counter() - self.started
        done = step - self.start_step
        eta = elapsed / done * (self.max_steps - step) if done else 0.0
        logger.info(
            "step %d/%d  loss %.4f  lr %.2e  %.0f tok/s  eta %s",
            step,
            self.max_steps,
            loss,
            lr,
            average,
            _duration(eta),
        )


def _summary_writer(log_dir: Path, **kwargs: Any) -> ScalarWriter:
    # Not torch.utils.tensorboard.SummaryWriter: every restarted rank 0 would pay its slow import (ftrain.tb_writer)
    return ScalarWriter(log_dir, **kwargs)


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"
