"""Checkpointing: the on-disk layout (``layout``), the options (``options``) and the DCP save/load manager
(``manager``). The names below are imported on first use, so that ``ftrain.checkpoint.options`` (the config's
``checkpoint`` section) does not pay for torch."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ftrain.checkpoint.errors import CheckpointError
    from ftrain.checkpoint.loading import LoadResult
    from ftrain.checkpoint.manager import CheckpointManager
    from ftrain.checkpoint.options import CheckpointOptions
    from ftrain.checkpoint.pending import SaveStats

__all__ = ["CheckpointError", "CheckpointManager", "CheckpointOptions", "LoadResult", "SaveStats"]

_PUBLIC = {
    "CheckpointError": "ftrain.checkpoint.errors",
    "CheckpointManager": "ftrain.checkpoint.manager",
    "CheckpointOptions": "ftrain.checkpoint.options",
    "LoadResult": "ftrain.checkpoint.loading",
    "SaveStats": "ftrain.checkpoint.pending",
}


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        import importlib

        value = getattr(importlib.import_module(_PUBLIC[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'ftrain.checkpoint' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_PUBLIC])
