"""ftrain: fault-tolerant training for PyTorch.

Put it under your own model, optimizer, data and loop::

    import ftrain

    ckpt = ftrain.Checkpointer("runs/exp1", model=model, optimizer=optimizer, scheduler=scheduler,
                               dataloader=loader, interval=100)
    step = ckpt.load()                    # the latest usable checkpoint restored; 0 = fresh start
    while step < max_steps:
        step += 1
        ...                               # forward, backward, optimizer.step()
        if ckpt.maybe_save(step, last=step == max_steps):
            break                         # a preemption signal was saved: stop now
    ckpt.close()                          # waits for the last commit

Checkpoints are asynchronous DCP saves of the model, optimizer, LR scheduler, step, every rank's RNGs and
data position, committed atomically (a ``COMPLETE`` marker written only when every rank's files are durable)
and resumed bit for bit. ``help(ftrain.Checkpointer)`` lists every option. The recipe
(``torchrun recipes/train.py``) runs on the same class.

Public names:
    Checkpointer       checkpoints a run and resumes it
    CheckpointOptions  every checkpoint option (interval, mode, keep_last, ...) with its default and meaning
    CheckpointError    a checkpoint could not be saved or no usable one could be loaded
    LockedError        another live job holds the run directory
    EXIT_PREEMPTED     the exit code (75) for "saved after a preemption signal; run again to resume"
    run_with_warm_restarts  runs a script's main so that under torchrun a dead training process is replaced by
                       a fork of a warm parent, in the same torchrun round
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ftrain._version import __version__

if TYPE_CHECKING:
    from ftrain.checkpoint.errors import CheckpointError
    from ftrain.checkpoint.lock import LockedError
    from ftrain.checkpoint.options import CheckpointOptions
    from ftrain.checkpointer import Checkpointer
    from ftrain.preemption import EXIT_PREEMPTED
    from ftrain.warm import run_with_warm_restarts

__all__ = [
    "Checkpointer", "CheckpointError", "CheckpointOptions", "EXIT_PREEMPTED", "LockedError", "run_with_warm_restarts",
    "__version__",
]

# Imported on first use, so that ``import ftrain.config`` (a command's --help) does not pay for torch.
_PUBLIC = {
    "Checkpointer": "ftrain.checkpointer",
    "CheckpointError": "ftrain.checkpoint.errors",
    "CheckpointOptions": "ftrain.checkpoint.options",
    "LockedError": "ftrain.checkpoint.lock",
    "EXIT_PREEMPTED": "ftrain.preemption",
    "run_with_warm_restarts": "ftrain.warm",
}


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        import importlib

        value = getattr(importlib.import_module(_PUBLIC[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'ftrain' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_PUBLIC])
