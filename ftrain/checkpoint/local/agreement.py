"""Which local snapshot every rank resumes from: the newest step that all of them hold."""

from __future__ import annotations

from typing import Any

import torch.distributed as dist


def agree_on_step(local_steps: list[int], durable_step: int | None, process_group: Any = None) -> int | None:
    """The newest step that every rank holds complete locally and that is newer than ``durable_step``; None if
    there is none. Collective over ``process_group`` (use a gloo group) when ``torch.distributed`` is initialized."""
    mine = sorted({int(step) for step in local_steps})
    if dist.is_available() and dist.is_initialized():
        gathered: list[Any] = [None] * dist.get_world_size(process_group)
        dist.all_gather_object(gathered, mine, group=process_group)
    else:
        gathered = [mine]
    return common_step(gathered, durable_step)


def common_step(per_rank: list[list[int]], durable_step: int | None) -> int | None:
    """``agree_on_step``'s decision from every rank's list of complete steps."""
    common = set.intersection(*(set(steps) for steps in per_rank)) if per_rank else set()
    floor = -1 if durable_step is None else durable_step
    newer = [step for step in common if step > floor]
    return max(newer) if newer else None
