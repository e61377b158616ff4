"""The local tier of one run: its snapshots opened for the run directory, and a resume from the newest snapshot
that every rank holds."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping

from ftrain.checkpoint.collectives import DistContext, max_over_ranks
from ftrain.checkpoint.compat import RunSignature
from ftrain.checkpoint.local.agreement import agree_on_step
from ftrain.checkpoint.local.directory import Owner, default_directory
from ftrain.checkpoint.local.snapshots import LocalSnapshots
from ftrain.checkpoint.options import LOCAL_OFF, CheckpointOptions
from ftrain.checkpoint.run_dir import RunDirectory

logger = logging.getLogger("ftrain")


def open_for_run(
    run: RunDirectory, options: CheckpointOptions, ctx: DistContext, signature: RunSignature, states: list[str]
) -> LocalSnapshots | None:
    """The run's local snapshots (None with ``local_interval=0``): in ``local_dir`` or the default directory,
    owned by this run directory's ``RUN_ID``, on the timeline of the latest start; ``states`` are the names saved."""
    if str(options.local_interval).strip() == LOCAL_OFF:
        return None
    directory = Path(options.local_dir) if options.local_dir else default_directory(run.path)
    run_id = run.run_id()  # a deleted and re-made run is another run
    fields = {**signature.marker_fields(), "run_id": run_id, "timeline": run.read_timeline(), "states": sorted(states)}
    owner = Owner(run_id, str(run.path.resolve()))
    return LocalSnapshots(directory, ctx.rank, ctx.world_size, fields, owner=owner, default=not options.local_dir)


def resume_newest(local: LocalSnapshots, durable_step: int, states: Mapping[str, Any], ctx: DistContext) -> bool:
    """Restore ``states`` from the newest snapshot that every rank holds and that is newer than ``durable_step``.
    False when there is none, or when it proves unusable on any rank (the durable tier takes over). Collective."""
    candidates = local.complete_steps(verify_data=False)
    while True:  # at most once per slot
        step = agree_on_step(candidates, durable_step, ctx.process_group)
        if step is None:
            return False
        # Only the snapshot about to be used has its data summed: if it fails on any rank, every rank drops
        # that step and they agree again (on the other slot's step, or on the durable path).
        if not max_over_ranks([0.0 if local.verify(step) else 1.0], ctx.device)[0]:
            break
        candidates = [candidate for candidate in candidates if candidate != step]
    problem = ""
    try:
        local.restore(step, states)
    except Exception as exc:  # e.g. damaged between the check and the read: the durable tier takes over
        problem = f"{type(exc).__name__}: {exc}"
    if max_over_ranks([1.0 if problem else 0.0], ctx.device)[0]:
        logger.warning("local snapshot of step %d unusable (%s); loading the durable checkpoint", step, problem or "on another rank")
        return False
    if ctx.is_main:
        logger.info("resumed from the local snapshot of step %d (%s)", step, local.root.parent)
    return True
