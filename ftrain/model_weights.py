"""The model's weights into and out of a run, for the Checkpointer: a warm start from ``checkpoint.initial_load``
when the run has no checkpoint of its own, and the safetensors exports of ``checkpoint.export`` (one in flight)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ftrain.checkpoint.collectives import DistContext
from ftrain.checkpoint.errors import CheckpointError, describe_error
from ftrain.checkpoint.manager import CheckpointManager
from ftrain.checkpoint.options import EXPORT_NONE, ON_FAILURE_ABORT, CheckpointOptions

logger = logging.getLogger("ftrain")


def warm_start(options: CheckpointOptions, model: nn.Module, optimizer: torch.optim.Optimizer, ctx: DistContext) -> None:
    """The run has no checkpoint of its own: start from ``initial_load``'s weights (collective)."""
    from ftrain.checkpoint.warm_start import load_initial

    line = load_initial(
        options.initial_load,  # a path or a URL: load_initial tells them apart
        model,
        exclude=list(options.exclude_from_loading),
        model_only=options.initial_load_model_only,
        optimizer=optimizer,
        process_group=ctx.process_group,
    )
    if ctx.is_main:
        logger.info(line)


class Exports:
    """The safetensors exports of a run: at its last step and at the steps retention keeps forever."""

    def __init__(self, options: CheckpointOptions, model: nn.Module, run_dir: Path, manager: CheckpointManager) -> None:
        self._options = options
        self._model = model
        self._run_dir = run_dir
        self._manager = manager  # counts a failed export as a failed save
        self._pending: Any = None  # the export in flight

    def after_step(self, step: int, last: bool) -> None:
        """Export ``step`` if ``checkpoint.export`` asks for it (collective)."""
        keep = self._options.keep_every
        if self._options.export != EXPORT_NONE and (last or (keep and step % keep == 0)):
            self.start(step)

    def start(self, step: int) -> None:
        """Write the model's weights as safetensors to ``{run_dir}/exports/step_N`` (collective: the gather
        happens now, rank 0 writes in the background; one export in flight)."""
        from ftrain.checkpoint import export

        self.finish()
        self._pending = export.export_model_async(
            self._model,
            export.export_dir(self._run_dir, step),
            export.parse_dtype(self._options.export_dtype),
            info={"step": step},
        )

    def finish(self) -> str:
        """Wait for the export in flight; returns why it failed ('' if it did not, or there was none)."""
        pending, self._pending = self._pending, None
        if pending is None:
            return ""
        try:
            path = pending.result(timeout=self._options.timeout_s)
        except Exception as exc:  # like a failed background save: logged, counted, on_failure decides
            self._manager.failures += 1
            logger.error("safetensors export failed: %s", describe_error(exc))
            if self._options.on_failure == ON_FAILURE_ABORT:
                raise CheckpointError(f"safetensors export failed: {describe_error(exc)}") from None
            return describe_error(exc)
        if path is not None:
            logger.info("exported the model's weights to %s", path)
        return ""
