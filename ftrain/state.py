"""What a checkpoint holds, as ``Stateful`` objects that DCP can save and load.

* ``ModelOptimizerState``: model and optimizer through ``get_state_dict``/``set_state_dict`` (sharded DTensors).
* ``TrainProgress``: step, LR scheduler, and per rank the RNG states and the data loader position.

Per-rank entries are keyed by rank (``rank_3``): DCP writes one copy of a non-tensor value per key, so a key
shared by all ranks would keep only one rank's value. Non-tensor values are stored as ``torch.save`` bytes and
read back with ``weights_only=True``, so loading them never runs code from the checkpoint.
"""

from __future__ import annotations

import io
import random
from typing import Any

import torch
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.checkpoint.stateful import Stateful


class ModelOptimizerState(Stateful):
    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model = model
        self.optimizer = optimizer

    def state_dict(self) -> dict[str, Any]:
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        return {"model": model_sd, "optim": optim_sd}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        set_state_dict(
            self.model, self.optimizer, model_state_dict=state_dict["model"], optim_state_dict=state_dict["optim"]
        )


def to_blob(obj: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def from_blob(blob: bytes) -> Any:
    return torch.load(io.BytesIO(blob), weights_only=True)


def capture_rng(device: torch.device) -> dict[str, Any]:
    """Every RNG the run draws from: Python's, torch's CPU generator and, on GPU, the device's."""
    version, internal, gauss = random.getstate()
    state: dict[str, Any] = {
        "python": {"version": version, "internal": torch.tensor(internal, dtype=torch.int64), "gauss": gauss},
        "torch": torch.get_rng_state(),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng(state: dict[str, Any], device: torch.device) -> None:
    python = state["python"]
    random.setstate((python["version"], tuple(python["internal"].tolist()), python["gauss"]))
    torch.set_rng_state(state["torch"])
    if device.type == "cuda":
        if "cuda" not in state:
            raise ValueError("checkpoint has no CUDA RNG state (saved on CPU); cannot resume bit for bit on GPU")
        torch.cuda.set_rng_state(state["cuda"], device)


class TrainProgress(Stateful):
    """The loop's own state: step, scheduler, and this rank's RNG and data position."""

    def __init__(self, scheduler: Any, dataloader: Any, rank: int, device: torch.device) -> None:
        self.step = 0
        self.scheduler = scheduler
        self.dataloader = dataloader
        self.rank = rank
        self.device = device

    def state_dict(self) -> dict[str, Any]:
        key = f"rank_{self.rank}"
        return {
            "step": self.step,
            "scheduler": to_blob(self.scheduler.state_dict()),
            "rng": {key: to_blob(capture_rng(self.device))},
            "data": {key: to_blob(self.dataloader.state_dict())},
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        key = f"rank_{self.rank}"
        self.step = int(state_dict["step"])
        self.scheduler.load_state_dict(from_blob(state_dict["scheduler"]))
        self.dataloader.load_state_dict(from_blob(state_dict["data"][key]))
        restore_rng(from_blob(state_dict["rng"][key]), self.device)
