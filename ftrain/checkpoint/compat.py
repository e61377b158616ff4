"""What a checkpoint records about the run that wrote it, and what a run requires of a checkpoint it loads.

Every commit marker carries a ``RunSignature``; loading compares it with the loading run's (see
``loading.check``): a checkpoint of another model is refused with a one-line reason rather than half-loaded.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import torch.nn as nn

from ftrain._version import __version__
from ftrain.checkpoint import keys


@dataclass(frozen=True)
class RunSignature:
    """The marker's compatibility fields.

    ``model``: a description of the model (the recipe's model config, or ``model_fingerprint``); a checkpoint
    whose description differs is refused. ``None`` checks nothing. ``state_keys``: where each role's state lives.
    """

    model: dict[str, Any] | None
    state_keys: dict[str, str] = field(default_factory=lambda: dict(keys.DEFAULT_STATE_KEYS))
    run_name: str = ""

    def marker_fields(self) -> dict[str, Any]:
        return {
            "model": self.model,
            keys.MARKER_FIELD: dict(self.state_keys),
            "run_name": self.run_name,
            "ftrain_version": __version__,
        }


def model_fingerprint(model: nn.Module) -> dict[str, Any]:
    """A description of a model that changes when a parameter or buffer is added, removed, renamed, reshaped
    or retyped: the global shapes (DTensor-aware) and dtypes of its state, hashed."""
    digest = hashlib.sha256()
    count = 0
    for name, value in sorted(model.state_dict().items()):
        shape = tuple(getattr(value, "shape", ()))
        digest.update(f"{_plain_name(name)}:{tuple(shape)}:{getattr(value, 'dtype', type(value).__name__)};".encode())
        if hasattr(value, "numel"):
            count += value.numel()
    return {"state_sha256": digest.hexdigest()[:16], "numel": count}


def _plain_name(name: str) -> str:
    """Parameter names as the user wrote the model: without DDP's ``module.`` or compile's ``_orig_mod.``."""
    for prefix in ("module.", "_orig_mod."):
        name = name.replace(prefix, "")
    return name
