"""What a checkpoint holds, as ``Stateful`` objects that DCP can save and load.

* ``ModelState`` and ``OptimizerState``: through ``get_model_state_dict``/``get_optimizer_state_dict`` and their
  ``set_`` counterparts (sharded DTensors under FSDP2, plain names under DDP).
* ``TrainProgress``: step, LR scheduler, and per rank the RNG states, the data loader position and the spike
  detector's window of recent healthy losses.
* ``ModelOptimizerState``: model and optimizer under one name, as checkpoints of ``format_version`` 1 hold them.

Per-rank entries are keyed by rank (``rank_3``): DCP writes one copy of a non-tensor value per key, so a key
shared by all ranks would keep only one rank's value. Non-tensor values are stored as ``torch.save`` bytes and
read back with ``weights_only=True``, so loading them never runs code from the checkpoint.
"""

from __future__ import annotations

import io
import random
from array import array
from typing import Any, Callable

import torch
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
    set_state_dict,
)
from torch.distributed.checkpoint.stateful import Stateful

from ftrain.health import HealthMonitor


class ModelState(Stateful):
    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def state_dict(self) -> dict[str, Any]:
        return get_model_state_dict(self.model)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        set_model_state_dict(self.model, state_dict)


class OptimizerState(Stateful):
    """An optimizer through ``get_optimizer_state_dict``/``set_optimizer_state_dict``.

    An optimizer that has not stepped yet has no state; ``get_optimizer_state_dict`` makes one by a step with zero
    gradients and a zero LR (Adam's step count becomes 1), which would change every later update. So that state is
    dropped again once taken, and a checkpoint of it is loaded back as no state (``fresh``: the commit marker's
    ``OPTIMIZER_FRESH`` field)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, fresh: bool = False) -> None:
        self.model = model
        self.optimizer = optimizer
        self.fresh = fresh

    def state_dict(self) -> dict[str, Any]:
        fresh = not self.optimizer.state
        state = get_optimizer_state_dict(self.model, self.optimizer)
        if fresh:
            self.optimizer.state.clear()  # the saved dict keeps its tensors; the optimizer is as it was
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        set_optimizer_state_dict(self.model, self.optimizer, state_dict)
        if self.fresh:
            self.optimizer.state.clear()


# Commit marker field: the optimizer had no state when its step was saved (see ``OptimizerState``).
OPTIMIZER_FRESH = "optimizer_fresh"


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


def _as_is(value: Any) -> Any:
    return value


def capture_rng(device: torch.device) -> dict[str, Any]:
    """Every RNG the run draws from: Python's, torch's CPU generator and, on GPU, the device's."""
    version, internal, gauss = random.getstate()
    state: dict[str, Any] = {
        # through an int64 array, cheaper than torch.tensor(tuple) (this runs at every local snapshot)
        "python": {
            "version": version,
            "internal": torch.frombuffer(array("q", internal), dtype=torch.int64),
            "gauss": gauss,
        },
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


def seed_rank_rngs(seed: int, rank: int, step: int) -> None:
    """Seed Python's and torch's RNGs for one rank: each rank draws its own dropout masks."""
    value = (seed * 1_000_003 + step) * 1009 + rank + 1
    random.seed(value)
    torch.manual_seed(value)


class TrainProgress(Stateful):
    """The loop's own state: step, scheduler, the global data position, and this rank's RNG and loader state
    and the window of its ``health`` monitor (the losses a spike is judged against).

    ``scheduler``, ``dataloader`` and ``health`` are optional. A loader whose sampler keeps a global position
    (``advance`` and ``load_state_dict`` of ``{"epoch", "cursor"}``, as the recipe's does) can resume on another
    world size: a checkpoint from another world size has no per-rank entries for this rank, so the loader
    continues from the global data position (every sample of the epoch still read exactly once), the RNGs are
    re-seeded and the health window starts empty (as from a checkpoint saved before the window was).
    """

    OPTIONAL_PREFIXES = ("train.rng.", "train.data.", "train.health.")

    def __init__(
        self,
        scheduler: Any,
        dataloader: Any,
        rank: int,
        world_size: int,
        device: torch.device,
        seed: int,
        health: HealthMonitor | None = None,
    ) -> None:
        self.step = 0
        self.scheduler = scheduler
        self.dataloader = dataloader
        sampler = getattr(dataloader, "sampler", None)
        self.sampler = sampler if hasattr(sampler, "advance") and hasattr(sampler, "load_state_dict") else None
        self.data_position = {"epoch": 0, "cursor": 0}
        self.rank = rank
        self.world_size = world_size
        self.device = device
        self.seed = seed
        self.health = health
        self.resharded_from: int | None = None

    def advance(self) -> None:
        """Count one finished optimizer step."""
        self.step += 1
        if self.sampler is not None:
            self.data_position = self.sampler.advance(self.data_position)

    def skip_batches(self, count: int) -> None:
        """Batches read without a step (skipped after a rollback): the global data position moves on."""
        if self.sampler is not None:
            for _ in range(count):
                self.data_position = self.sampler.advance(self.data_position)

    def state_dict(self) -> dict[str, Any]:
        key = f"rank_{self.rank}"
        return {
            "step": self.step,
            "world_size": self.world_size,
            "data_position": dict(self.data_position),
            "scheduler": to_blob(self.scheduler.state_dict() if self.scheduler is not None else None),
            "rng": {key: to_blob(capture_rng(self.device))},
            "data": {key: to_blob(self.dataloader.state_dict() if self.dataloader is not None else None)},
            "health": {key: to_blob(self.health_state())},
        }

    def health_state(self) -> dict[str, Any] | None:
        """This rank's health window as plain data (None without a monitor), the ``health`` entry's content."""
        return self.health.state_dict() if self.health is not None else None

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Entries as ``state_dict()`` makes them (the durable format): scheduler, RNG, loader and health as
        ``torch.save`` blobs; an empty blob is a rank's entry the checkpoint does not have."""
        self._load(state_dict, from_blob, lambda entries, key: bool(entries.get(key)))

    def load_objects(self, state_dict: dict[str, Any]) -> None:
        """The same entries with the objects themselves in place of their blobs (a local snapshot's
        ``LocalProgressState``): no encoding round trip. A rank's entry is there when its key is."""
        self._load(state_dict, _as_is, lambda entries, key: key in entries)

    def _load(
        self, state_dict: dict[str, Any], decode: Callable[[Any], Any], held: Callable[[dict[str, Any], str], bool]
    ) -> None:
        key = f"rank_{self.rank}"
        self.step = int(state_dict["step"])
        self.data_position = {k: int(v) for k, v in state_dict["data_position"].items()}
        scheduler_state = decode(state_dict["scheduler"])
        if self.scheduler is not None and scheduler_state is not None:
            self.scheduler.load_state_dict(scheduler_state)
        saved_world_size = int(state_dict["world_size"])
        rng, data, health = state_dict["rng"], state_dict["data"], state_dict.get("health", {})
        if saved_world_size == self.world_size and held(rng, key) and held(data, key):
            data_state = decode(data[key])
            if self.dataloader is not None and data_state is not None:
                self.dataloader.load_state_dict(data_state)
            restore_rng(decode(rng[key]), self.device)
            self._restore_health(decode(health[key]) if held(health, key) else None)
            return
        # Another world size: per-rank states do not map onto these ranks; continue from the global position.
        self.resharded_from = saved_world_size
        self._restore_health(None)
        if self.sampler is not None:
            self.sampler.load_state_dict(self.data_position)
        seed_rank_rngs(self.seed, self.rank, self.step)

    def _restore_health(self, state: dict[str, Any] | None) -> None:
        """The saved window, or an empty one where none was saved for this rank (the restored timeline's window is
        unknown: no spike verdict until enough healthy losses again, as in a fresh run)."""
        if self.health is None:
            return
        if state is None:
            self.health.clear()
        else:
            self.health.load_state_dict(state)

    def for_loading(self) -> Stateful:
        """The object to hand to ``dcp.load``: its per-rank entries start empty, so an entry the checkpoint does
        not have (another world size) is seen as missing rather than silently keeping the current value."""
        return _ProgressLoader(self)


class _ProgressLoader(Stateful):
    def __init__(self, progress: TrainProgress) -> None:
        self.progress = progress

    def state_dict(self) -> dict[str, Any]:
        # Only the structure matters here. Building it must not call the loader's state_dict(): that would
        # create its iterator now, before the loaded position is applied.
        key = f"rank_{self.progress.rank}"
        return {
            "step": 0,
            "world_size": 0,
            "data_position": {"epoch": 0, "cursor": 0},
            "scheduler": b"",
            "rng": {key: b""},
            "data": {key: b""},
            "health": {key: b""},
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.progress.load_state_dict(state_dict)
