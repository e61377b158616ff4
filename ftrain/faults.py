"""Named instants at which tests and ``tools/chaos.py`` can freeze a process to kill it exactly there.

``FTRAIN_FAULT=<point>@<step>`` makes the process sleep (``FTRAIN_FAULT_SECONDS``, default 600) when it
reaches ``point`` for checkpoint ``step``; several, separated by commas, each pause. ``FTRAIN_FAULT_ACTION=raise``
raises ``InjectedFault`` there instead (an exception on that rank); ``FTRAIN_FAULT_RANK=<r>`` limits it to one
rank. A fault fires in the first training process of a warm parent only (``train.warm_restarts``): the fork that
replaces it after the failure goes past the same step. Points:

    step_done       a training step is done: the top of ``Checkpointer.maybe_save`` (before the ranks agree)

    before_commit   every rank's data and DCP's metadata are durable; the COMPLETE marker is not yet written
    after_commit    the marker is written; retention has not yet run
    after_local_snapshot   the local snapshot of this step is copied and its sums and marker are under way in
                    the background (the training thread pauses; they finish); at a save step that only
                    dispatches (an async mode, no save in flight), once it is dispatched
    while_writing   a rank's writer (thread or process) has this step's staged data and has written none of it;
                    training goes on
    while_uploading object storage: the first part of a multipart upload of one of this step's files is on the
                    store, the rest is not (the upload is open)
"""

from __future__ import annotations

import logging
import os
import time

logger = logging.getLogger("ftrain.faults")

# The warm parent's generation of this training process (ftrain.warm sets it; named here so that faults stays a
# leaf module that anything may import).
GENERATION_ENV = "FTRAIN_WARM_GENERATION"

STEP_DONE = "step_done"
AFTER_LOCAL_SNAPSHOT = "after_local_snapshot"
WHILE_WRITING = "while_writing"
ACTION_RAISE = "raise"
WHILE_UPLOADING = "while_uploading"


class InjectedFault(RuntimeError):
    """The failure ``FTRAIN_FAULT_ACTION=raise`` asked for."""


def pause_point(point: str, step: int) -> None:
    spec = os.environ.get("FTRAIN_FAULT", "")
    if f"{point}@{step}" not in spec.split(","):
        return
    only_rank = os.environ.get("FTRAIN_FAULT_RANK", "")
    if only_rank and only_rank != os.environ.get("RANK", "0"):
        return
    if os.environ.get(GENERATION_ENV, "0") not in ("", "0"):
        return
    if os.environ.get("FTRAIN_FAULT_ACTION", "") == ACTION_RAISE:
        raise InjectedFault(f"FTRAIN_FAULT: failing at {point} of step {step}")
    seconds = float(os.environ.get("FTRAIN_FAULT_SECONDS", "600"))
    logger.warning("FTRAIN_FAULT: pausing at %s of step %d for %.0f s", point, step, seconds)
    time.sleep(seconds)
