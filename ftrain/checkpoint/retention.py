"""Retention on rank 0: after each commit, a background thread removes the checkpoints that ``keep_last`` and
``keep_every`` no longer keep (only now that a newer checkpoint exists), never the one being saved."""

from __future__ import annotations

import logging
import queue
import threading
from typing import Callable

from ftrain.checkpoint import layout
from ftrain.checkpoint.options import CheckpointOptions
from ftrain.checkpoint.storage import CheckpointDir, Storage

logger = logging.getLogger("ftrain.checkpoint")


class RetentionThread:
    """``step_in_flight``: the step being saved (never removed), or None; ``removed(step)``: told of each removal."""

    def __init__(
        self,
        storage: Storage,
        options: CheckpointOptions,
        step_in_flight: Callable[[], int | None],
        removed: Callable[[int], None],
    ) -> None:
        self._storage = storage
        self._options = options
        self._step_in_flight = step_in_flight
        self._removed = removed
        self._queue: queue.Queue[CheckpointDir | None] = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="ftrain-purge", daemon=True)
        self._thread.start()

    def committed(self, checkpoint: CheckpointDir) -> None:
        """``checkpoint`` was just committed: time to apply retention."""
        self._queue.put(checkpoint)

    def stop(self, timeout_s: float) -> None:
        self._queue.put(None)
        self._thread.join(timeout=timeout_s)

    def _loop(self) -> None:
        while True:
            committed = self._queue.get()
            if committed is None:
                return
            try:
                in_flight = self._step_in_flight()
                keep_last, keep_every = self._options.keep_last, self._options.keep_every
                for doomed in layout.plan_purge(self._storage, keep_last, keep_every, in_flight=in_flight):
                    self._removed(layout.parse_step(doomed) or -1)
                    layout.remove_dir(doomed)
                    logger.debug("retention removed %s", doomed)
            except Exception as exc:  # must not kill this thread: the next commit retries
                logger.warning("retention could not clean %s: %s", self._storage.describe(), exc)
