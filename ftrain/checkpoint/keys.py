"""Where each part of the training state lives inside a checkpoint: the names shared by every reader.

A checkpoint is a DCP state dict whose top-level names are chosen by whoever saved it. The commit marker
records which name holds which role (``state_keys``), so tools find the model and the optimizer under any
naming. Markers written before the field existed (``format_version`` 1) used the recipe's fixed names.
"""

from __future__ import annotations

from typing import Any

MARKER_FIELD = "state_keys"  # in the COMPLETE marker: {role: DCP key prefix}

MODEL = "model"  # role: the model's weights (get_model_state_dict)
OPTIMIZER = "optimizer"  # role: the optimizer state (get_optimizer_state_dict)
PROGRESS = "progress"  # role: step, scheduler, per-rank RNG and data-loader state

# What ftrain.Checkpointer writes (format_version 2 and later).
DEFAULT_STATE_KEYS = {MODEL: "model", OPTIMIZER: "optimizer", PROGRESS: "train"}
# What the recipe wrote before the marker recorded names (format_version 1).
LEGACY_STATE_KEYS = {MODEL: "app.model", OPTIMIZER: "app.optim", PROGRESS: "train"}


def state_keys(marker: dict[str, Any]) -> dict[str, str]:
    """The role -> key-prefix map of a checkpoint, from its marker (legacy names for old markers)."""
    recorded = marker.get(MARKER_FIELD)
    if isinstance(recorded, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in recorded.items()):
        return {**LEGACY_STATE_KEYS, **recorded}
    return dict(LEGACY_STATE_KEYS)
