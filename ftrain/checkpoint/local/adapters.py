"""The states the local tier snapshots: model, optimizer and progress through their own objects' methods.

A local snapshot is restored into the same model and optimizer on the same rank, so it needs neither DCP's
``get_model_state_dict``/``get_optimizer_state_dict`` (which rebuild fully qualified names and are far slower on
the hot path) nor ``TrainProgress``'s ``torch.save`` blobs. ``tools/bench_local_tier.py`` compares both.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch
from torch.distributed.checkpoint.stateful import Stateful

from ftrain._torch_compat import (
    init_optimizer_state,
    module_version,
    own_parameters,
    own_persistent_buffers,
    saves_only_parameters_and_buffers,
    state_dict_pre_hooks,
)
from ftrain.state import capture_rng


class LocalModelState(Stateful):
    """A model through its own ``state_dict``/``load_state_dict``.

    When no module changes how it is saved (``direct(model)``: no ``state_dict``, ``_save_to_state_dict`` or
    ``get_extra_state`` of its own, no post-hooks), ``state_dict()`` collects the same entries straight from the
    modules' parameters and persistent buffers, after running their pre-hooks (FSDP2's make sure the parameters
    are the sharded ones): the same entries in the same order with the same ``_metadata`` as
    ``state_dict(keep_vars=True)`` gives them, without a ``detach()`` per tensor (the snapshot only reads them)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model

    def state_dict(self) -> dict[str, Any]:
        # The modules are listed at every call: a module added or wrapped after construction counts.
        modules = list(self.model.named_modules(remove_duplicate=False))
        if not _plain(modules):
            return self.model.state_dict()
        state: OrderedDict[str, Any] = OrderedDict()
        for name, module in modules:
            for hook in state_dict_pre_hooks(module):
                hook(module, f"{name}." if name else "", False)
        for name, module in modules:
            prefix = f"{name}." if name else ""
            for key, param in own_parameters(module):
                state[prefix + key] = param
            for key, buffer in own_persistent_buffers(module):
                state[prefix + key] = buffer
        state._metadata = OrderedDict((name, {"version": module_version(module)}) for name, module in modules)  # type: ignore[attr-defined]
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.model.load_state_dict(state_dict)


class LocalOptimizerState(Stateful):
    """An optimizer through its own ``state_dict``/``load_state_dict``. An optimizer with no state yet is
    snapshotted as such (initializing it would change its next update); a restore initializes the fresh
    optimizer first (``layout_state_dict``), so that it finds the DTensor layout of every entry."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer

    def state_dict(self) -> dict[str, Any]:
        return self.optimizer.state_dict()

    def layout_state_dict(self) -> dict[str, Any]:
        if not self.optimizer.state:
            init_optimizer_state(self.optimizer)
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state_dict)


class LocalProgressState(Stateful):
    """``ftrain.state.TrainProgress`` without its ``torch.save`` blobs: the same entries, but the RNG, scheduler,
    loader and health states stay objects (their tensors go into the slot, the rest into the skeleton), and a
    restore hands them back as objects (``TrainProgress.load_objects``)."""

    def __init__(self, progress: Any) -> None:
        self.progress = progress

    def state_dict(self) -> dict[str, Any]:
        progress, key = self.progress, f"rank_{self.progress.rank}"
        return {
            "step": progress.step,
            "world_size": progress.world_size,
            "data_position": dict(progress.data_position),
            "scheduler": progress.scheduler.state_dict() if progress.scheduler is not None else None,
            "rng": {key: capture_rng(progress.device)},
            "data": {key: progress.dataloader.state_dict() if progress.dataloader is not None else None},
            "health": {key: progress.health_state()},
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.progress.load_objects(state_dict)  # snapshots older than the "health" entry lack it: an empty window


def direct(model: torch.nn.Module) -> bool:
    """Whether ``LocalModelState`` collects ``model``'s state directly (else through ``model.state_dict()``)."""
    return _plain(list(model.named_modules(remove_duplicate=False)))


def _plain(modules: list[tuple[str, torch.nn.Module]]) -> bool:
    return all(saves_only_parameters_and_buffers(module) for _, module in modules)
