"""Named instants at which tests and ``tools/chaos.py`` can freeze a process to kill it exactly there.

``FTRAIN_FAULT=<point>@<step>`` makes the process sleep (``FTRAIN_FAULT_SECONDS``, default 600) when it
reaches ``point`` for checkpoint ``step``; several, separated by commas, each pause. Points:

    before_commit   every rank's data and DCP's metadata are durable; the COMPLETE marker is not yet written
    after_commit    the marker is written; retention has not yet run
    after_local_snapshot   the local snapshot of this step is handed to its background copy (the training
                    thread pauses; the copy and its marker finish)
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

WHILE_WRITING = "while_writing"
WHILE_UPLOADING = "while_uploading"


def pause_point(point: str, step: int) -> None:
    spec = os.environ.get("FTRAIN_FAULT", "")
    if f"{point}@{step}" not in spec.split(","):
        return
    seconds = float(os.environ.get("FTRAIN_FAULT_SECONDS", "600"))
    logger.warning("FTRAIN_FAULT: pausing at %s of step %d for %.0f s", point, step, seconds)
    time.sleep(seconds)
