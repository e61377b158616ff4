"""What one save is while in flight (``PendingSave``, the manager's record of it) and what it cost when done
(``SaveStats``, reduced over ranks)."""

from __future__ import annotations

import threading
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch

from ftrain.checkpoint.collectives import max_over_ranks
from ftrain.checkpoint.storage import CheckpointDir
from ftrain.checkpoint.writer import CheckpointWriter


@dataclass
class SaveStats:
    """What one checkpoint cost; times are the maximum over ranks."""

    step: int
    blocking_s: float  # training loop stopped: waiting for the previous save, snapshot, dispatch, staging wait
    staging_s: float  # from dispatch until the state was copied off the live tensors
    save_s: float  # from the save call until the commit marker was written
    write_s: float  # from staging done until every rank's files were durable
    size_bytes: int  # all ranks' files together
    ok: bool
    error: str = ""

    @property
    def write_gbps(self) -> float:
        return self.size_bytes / self.write_s / 1e9 if self.write_s > 0 and self.ok else 0.0


@dataclass
class PendingSave:
    """One save while it is in flight: its instants, outcome and writer (the manager's own record)."""

    step: int
    dir: CheckpointDir
    started: float
    blocking_s: float = 0.0
    staging_future: Future | None = None
    upload_future: Future | None = None
    staged_at: float | None = None
    uploaded_at: float | None = None
    committed_at: float | None = None
    marker: dict[str, Any] | None = None
    marker_fields: dict[str, Any] = field(default_factory=dict)
    error: str = ""
    nonfinite: bool = False  # refused because a saved tensor held NaN or Inf
    finished_at: float | None = None  # when ``done`` was set
    done: threading.Event = field(default_factory=threading.Event)
    writer: CheckpointWriter | None = None  # its written_sums spare the commit reading files back


def reduce_stats(pending: PendingSave, device: torch.device) -> SaveStats:
    """The save's stats, each the maximum over ranks. Collective."""
    staged = pending.staged_at or pending.started
    uploaded = pending.uploaded_at or staged
    local = [
        pending.blocking_s,
        staged - pending.started,
        uploaded - staged,
        (pending.committed_at or uploaded) - pending.started,
        1.0 if pending.error else 0.0,
        float(pending.marker["total_bytes"]) if pending.marker else 0.0,
    ]
    blocking, staging, write, save, failed, size = max_over_ranks(local, device)
    return SaveStats(
        step=pending.step,
        blocking_s=blocking,
        staging_s=staging,
        save_s=save,
        write_s=write,
        size_bytes=int(size),
        ok=failed == 0.0,
        error=pending.error,
    )
