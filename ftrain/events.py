"""Reading a run's TensorBoard scalars back, the way TensorBoard shows them.

A resumed run reopens ``{run.dir}/tb`` with ``purge_step`` (see ``ftrain.metrics``): the events file of the
new attempt starts with a session-start marker, and every value an earlier attempt logged at or after that
step is void. TensorBoard's own ``EventAccumulator`` applies those purges, so reading through it gives one
value per step, the one the TensorBoard UI plots, and never a stale one from a killed attempt.

    from ftrain.events import read_run_scalars
    scalars = read_run_scalars("runs/default")      # {"train/loss": {1: 5.61, 2: 5.43, ...}, ...}
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ftrain.checkpoint.run_dir import TENSORBOARD_DIR

EVENTS_PATTERN = "events.out.tfevents.*"
RUN_MARKER_TAG = "train/step_time_s"  # every ftrain run logs it at every step


class NotARunError(ValueError):
    """The path is not an ftrain run directory (or its ``tb/``): no TensorBoard events of an ftrain run."""


def has_events(directory: Path) -> bool:
    """True if ``directory`` directly holds at least one TensorBoard events file."""
    return directory.is_dir() and any(path.is_file() for path in directory.glob(EVENTS_PATTERN))


def events_dir(run_dir: str | Path) -> Path:
    """The TensorBoard directory of a run: ``{run_dir}/tb``, or ``run_dir`` itself if it holds the events.

    Raises ``FileNotFoundError`` / ``NotADirectoryError`` for a wrong path and ``NotARunError`` for a
    directory without events.
    """
    path = Path(run_dir)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or directory")
    if not path.is_dir():
        raise NotADirectoryError(f"{path}: not a directory")
    for candidate in (path / TENSORBOARD_DIR, path):
        if has_events(candidate):
            return candidate
    raise NotARunError(f"{path}: no TensorBoard events here or in {path / TENSORBOARD_DIR}; not an ftrain run directory")


@contextmanager
def _quiet_tensorboard() -> Iterator[None]:
    """Silence TensorBoard's warning about each purge it applies (a resumed run is normal here)."""
    tb_logger = logging.getLogger("tensorboard")
    level = tb_logger.level
    tb_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        tb_logger.setLevel(level)


def _accumulator(log_dir: str | Path) -> Any:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})  # 0 = keep every event
    with _quiet_tensorboard():
        accumulator.Reload()
    return accumulator


def read_scalars(log_dir: str | Path, tags: Iterable[str] | None = None) -> dict[str, dict[int, float]]:
    """Every scalar (or only ``tags``) in one TensorBoard directory as ``{tag: {step: value}}``.

    Purged events are left out, as in TensorBoard. Nothing is subsampled.
    """
    return _scalars(_accumulator(log_dir), tags)


def _scalars(accumulator: Any, tags: Iterable[str] | None) -> dict[str, dict[int, float]]:
    available = accumulator.Tags()["scalars"]
    wanted = available if tags is None else [tag for tag in tags if tag in available]
    return {tag: {event.step: event.value for event in accumulator.Scalars(tag)} for tag in wanted}


def read_run_events(
    run_dir: str | Path, tags: Iterable[str] | None = None
) -> tuple[dict[str, dict[int, float]], dict[int, float]]:
    """An ftrain run's scalars (as ``read_run_scalars``) and ``{step: wall time}`` (seconds since the epoch) at
    which it logged each step's time, i.e. when the step ended, from one read of its events; purged events left
    out. ``NotARunError`` if the events are not an ftrain run's."""
    directory = events_dir(run_dir)
    accumulator = _accumulator(directory)
    if RUN_MARKER_TAG not in accumulator.Tags()["scalars"]:
        raise NotARunError(f"{directory}: TensorBoard events without {RUN_MARKER_TAG}; not an ftrain run")
    walls = {event.step: event.wall_time for event in accumulator.Scalars(RUN_MARKER_TAG)}
    return _scalars(accumulator, tags), walls


def read_run_scalars(run_dir: str | Path, tags: Iterable[str] | None = None) -> dict[str, dict[int, float]]:
    """The scalars of an ftrain run directory; ``NotARunError`` if its events are not an ftrain run's."""
    return read_run_events(run_dir, tags)[0]
