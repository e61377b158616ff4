"""Checkpointing: the on-disk layout (``layout``) and the DCP save/load manager (``manager``)."""

from ftrain.checkpoint.errors import CheckpointError
from ftrain.checkpoint.loading import LoadResult
from ftrain.checkpoint.manager import CheckpointManager, SaveStats

__all__ = ["CheckpointError", "CheckpointManager", "LoadResult", "SaveStats"]
