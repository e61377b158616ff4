"""Preemption signals: handlers that only note the request; the loop acts on it at the next step boundary."""

from __future__ import annotations

import logging
import os
import signal
import threading
from typing import Any

logger = logging.getLogger("ftrain")

EXIT_PREEMPTED = 75  # EX_TEMPFAIL, "try again later": every rank saved the current step and exited for a signal


class PreemptionFlag:
    """Installs handlers for ``signal_names`` (e.g. ``["SIGTERM", "SIGUSR1"]``); ``requested`` names the first
    signal that arrived. ``close()`` puts the previous handlers back."""

    def __init__(self, signal_names: list[str] | tuple[str, ...]) -> None:
        self.requested: str | None = None
        self._owner = os.getpid()
        self._previous: dict[int, Any] = {}
        if threading.current_thread() is not threading.main_thread():
            if signal_names:
                logger.warning("preemption signals not handled: handlers can only be installed from the main thread")
            return
        for name in signal_names:
            signum = getattr(signal, name)
            self._previous[signum] = signal.signal(signum, self._handle)

    def _handle(self, signum: int, _frame: object) -> None:
        if os.getpid() != self._owner:  # a forked data worker: behave as if we were never installed
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.requested = signal.Signals(signum).name

    def close(self) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()
