"""Where this process stands in the job, and the small collectives the checkpoint code agrees through.

``ftrain.distributed`` (the recipe's process-group setup) re-exports these; the checkpoint package imports them
from here, so that it depends on nothing above it.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistContext:
    """Where this process stands in the job, as checkpointing needs it: rank, world size, the device its state
    lives on, and the gloo group that carries checkpoint collectives (``None`` when there is no process group).
    """

    rank: int
    world_size: int
    device: torch.device
    process_group: dist.ProcessGroup | None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def current(cls, device: torch.device, timeout_s: float = 600.0) -> "DistContext":
        """Found from ``torch.distributed``: one rank without a process group, else this rank of the default group
        and a new gloo group of all ranks for checkpoint collectives (a collective call: every rank makes it)."""
        if not (dist.is_available() and dist.is_initialized()):
            return cls(0, 1, device, None)
        group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout_s))
        return cls(dist.get_rank(), dist.get_world_size(), device, group)


def _reduce(values: list[float], device: torch.device, op: dist.ReduceOp) -> list[float]:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [float(v) for v in values]
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=op)
    return tensor.tolist()


def max_over_ranks(values: list[float], device: torch.device) -> list[float]:
    """Element-wise maximum over all ranks, on the default group (the main thread's collectives); as is with
    one rank or no process group. ``device``: where the default group's backend takes tensors."""
    return _reduce(values, device, dist.ReduceOp.MAX)


def sum_over_ranks(values: list[float], device: torch.device) -> list[float]:
    """Element-wise sum over all ranks, as ``max_over_ranks``."""
    return _reduce(values, device, dist.ReduceOp.SUM)
