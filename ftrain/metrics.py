"""TensorBoard scalars (rank 0) and the console progress line.

One run keeps one TensorBoard directory across restarts: a resumed run reopens it with ``purge_step`` so the
steps it is about to redo replace the ones logged after the checkpoint it resumed from.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from torch.utils.tensorboard import SummaryWriter

logger = logging.getLogger("ftrain")


def setup_logging(rank: int) -> None:
    """Console logging from rank 0; other ranks only say something when it is a warning or worse."""
    level = logging.INFO if rank == 0 else logging.WARNING
    logging.basicConfig(
        level=level,
        format=f"%(asctime)s [rank{rank}] %(message)s",
        datefmt="%H:%M:%S",
        force=True,
    )
    # DCP's background writer process and planner are chatty at INFO.
    logging.getLogger("torch.distributed.checkpoint").setLevel(logging.WARNING)


class Metrics:
    """Scalars to TensorBoard with the global step as x-axis; a no-op on ranks other than 0.

    A failing disk must not stop training: if writing events fails (disk full, say), logging pauses with a
    warning and is retried, in a new event file, at the next flush (each checkpoint).
    """

    def __init__(self, log_dir: Path, enabled: bool, start_step: int) -> None:
        self.log_dir = Path(log_dir)
        self.writer: SummaryWriter | None = None
        self.enabled = enabled
        self.broken = False
        if enabled:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            # purge_step drops events at or after it that an earlier, killed attempt of this run logged
            self.writer = SummaryWriter(str(self.log_dir), purge_step=start_step + 1 if start_step else None)

    def log(self, scalars: dict[str, float], step: int) -> None:
        if self.writer is None:
            return
        try:
            for name, value in scalars.items():
                self.writer.add_scalar(name, value, step)
        except OSError as exc:
            self._pause(exc)

    def flush(self) -> None:
        if self.broken and self.enabled:
            self._reopen()
        if self.writer is None:
            return
        try:
            self.writer.flush()
        except OSError as exc:
            self._pause(exc)

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
            self.writer = SummaryWriter(str(self.log_dir))
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
    """The console line every ``interval`` steps: step, loss, speed and time left."""

    def __init__(self, start_step: int, max_steps: int, interval: int) -> None:
        self.start_step = start_step
        self.max_steps = max_steps
        self.interval = interval
        self.started = time.perf_counter()

    def maybe_print(self, step: int, loss: float, lr: float, tokens_per_s: float) -> None:
        if step % self.interval and step != self.max_steps:
            return
        elapsed = time.perf_counter() - self.started
        done = step - self.start_step
        eta = elapsed / done * (self.max_steps - step) if done else 0.0
        logger.info(
            "step %d/%d  loss %.4f  lr %.2e  %.0f tok/s  eta %s",
            step,
            self.max_steps,
            loss,
            lr,
            tokens_per_s,
            _duration(eta),
        )


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"
