"""What every part of the benchmark shares: where the repository is, the modes, its error, and its statistics."""

from __future__ import annotations

import shutil
import statistics
from pathlib import Path
from typing import Any

from ftrain.config import MODE_ASYNC, MODE_ASYNC_PROCESS, MODE_SYNC

REPO = Path(__file__).resolve().parents[2]
ASYNC_MODES = (MODE_ASYNC, MODE_ASYNC_PROCESS)
MANAGER_MODES = (MODE_SYNC, MODE_ASYNC, MODE_ASYNC_PROCESS)
S3_LOOP_MODES = ("off", "async", "async-s3")  # the s3 part's recipe runs: no checkpoints, to local disk, to the store


class BenchError(RuntimeError):
    """A benchmark step failed; the message is one line that says which and where to look."""


def summarize(samples: list[float]) -> dict[str, Any]:
    """Median and spread of one measurement's repetitions."""
    return {
        "median": statistics.median(samples),
        "min": min(samples),
        "max": max(samples),
        "n": len(samples),
        "samples": samples,
    }


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b not in (None, 0) else None


def remove(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
