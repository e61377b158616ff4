"""Checkpointing: the on-disk layout (``layout``) and the DCP save/load manager (``manager``)."""

from ftrain.checkpoint.manager import CheckpointError, CheckpointManager, LoadResult, SaveStats

__all__ = ["CheckpointError", "CheckpointManager", "LoadResult", "SaveStats"]
