"""``{run.dir}/STATUS``: where a run is, for tools and for the run's own next attempt.

Rank 0 keeps one small JSON record up to date: the attempt (process start, the step it resumed from, when
its first step finished) and the latest finished step with its wall time. It is rewritten in place with one
``pwrite`` of a fixed-size record per step (no fsync: it is progress, not data), so a
reader may see a torn record while it is written; ``read_status`` then retries, and returns None if it
never reads a whole one.

The chaos tool reads it instead of parsing log lines; a resumed run reads the previous attempt's record to
measure what the failure cost (``ftrain.Checkpointer`` logs it under ``recovery/*``, see ``ftrain.tags``).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from ftrain.checkpoint.run_dir import STATUS_NAME

_RECORD_BYTES = 512  # fixed size: every write covers the whole record, so no stale tail survives


@dataclass
class RunStatus:
    attempt_started: float  # wall time this process started (time.time())
    resumed_from: int  # step loaded at start; 0 = fresh
    tier: str  # where the state came from: "fresh", "durable" or "local"
    ready_at: float  # wall time the attempt was ready to train (state loaded)
    step: int  # latest finished step
    step_at: float  # wall time it finished
    first_step_at: float = 0.0  # wall time the attempt's first step finished; 0 = none yet
    finished: bool = False  # the run reached its last step


class StatusWriter:
    """Rank 0's writer of ``STATUS``; a no-op elsewhere."""

    def __init__(self, run_dir: Path, enabled: bool, status: RunStatus) -> None:
        self.status = status
        self._fd: int | None = None
        if enabled:
            self._fd = os.open(Path(run_dir) / STATUS_NAME, os.O_RDWR | os.O_CREAT, 0o644)
            self._write()

    def step(self, step: int, finished: bool = False) -> None:
        if self._fd is None:
            return
        now = time.time()
        if not self.status.first_step_at:
            self.status.first_step_at = now
        self.status.step, self.status.step_at, self.status.finished = step, now, finished
        self._write()

    def _write(self) -> None:
        record = json.dumps(asdict(self.status)).encode()
        assert len(record) < _RECORD_BYTES
        os.pwrite(self._fd, record.ljust(_RECORD_BYTES - 1) + b"\n", 0)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def read_status(run_dir: Path, attempts: int = 5) -> RunStatus | None:
    """The run's latest status record, or None if there is none (or no whole one could be read)."""
    path = Path(run_dir) / STATUS_NAME
    for _ in range(attempts):
        try:
            data = json.loads(path.read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            time.sleep(0.001)  # torn by a concurrent write
            continue
        names = {f.name for f in fields(RunStatus)}
        if isinstance(data, dict) and names <= set(data):
            return RunStatus(**{k: data[k] for k in names})
        return None
    return None
