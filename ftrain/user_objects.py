"""What the ``Checkpointer`` needs to know about, and do to, the objects a user hands it: the names they are
saved under, the model's device and state size, whether its forward changes saved state, a data loader that can
save its position and draws on a generator of its own, and moving that loader on past skipped batches."""

from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn as nn
from torch.distributed.checkpoint.stateful import Stateful

from ftrain._torch_compat import local_tensor_or_self
from ftrain.checkpoint import keys, safe_types
from ftrain.checkpoint.errors import CheckpointError
from ftrain.checkpoint.local import LocalModelState, LocalOptimizerState, LocalProgressState
from ftrain.state import OPTIMIZER_FRESH, ModelOptimizerState, ModelState, OptimizerState, TrainProgress

_RESERVED_NAMES = ("app", *keys.DEFAULT_STATE_KEYS.values())


def check_extra_names(extra: Mapping[str, Stateful]) -> None:
    for name in extra:
        if name in _RESERVED_NAMES or not name or "." in name:
            raise ValueError(f"extra state name {name!r} is reserved or not a plain name (no '.')")


class SavedStates:
    """The user's objects under the names they are saved as (``model``, ``optimizer``, ``train`` and the names of
    ``extra``): as the durable tier saves and loads them, and as the local tier snapshots them (``local``)."""

    def __init__(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, progress: TrainProgress, extra: dict[str, Stateful]
    ) -> None:
        self.model, self.optimizer, self.progress, self.extra = model, optimizer, progress, extra
        self.local = {
            keys.DEFAULT_STATE_KEYS[keys.MODEL]: LocalModelState(model),
            keys.DEFAULT_STATE_KEYS[keys.OPTIMIZER]: LocalOptimizerState(optimizer),
            keys.DEFAULT_STATE_KEYS[keys.PROGRESS]: LocalProgressState(progress),
            **extra,
        }

    def durable(self) -> dict[str, Any]:
        return {
            keys.DEFAULT_STATE_KEYS[keys.MODEL]: ModelState(self.model),
            keys.DEFAULT_STATE_KEYS[keys.OPTIMIZER]: OptimizerState(self.model, self.optimizer),
            keys.DEFAULT_STATE_KEYS[keys.PROGRESS]: self.progress,
            **self.extra,
        }

    def for_marker(self, marker: dict[str, Any]) -> dict[str, Any]:
        """What to load a checkpoint into: its marker says where the model and the optimizer are."""
        if keys.state_keys(marker) == keys.LEGACY_STATE_KEYS:  # format_version 1: one "app" state
            return {"app": ModelOptimizerState(self.model, self.optimizer), "train": self.progress.for_loading(), **self.extra}
        optimizer = OptimizerState(self.model, self.optimizer, fresh=bool(marker.get(OPTIMIZER_FRESH)))
        return {
            **self.durable(),
            keys.DEFAULT_STATE_KEYS[keys.OPTIMIZER]: optimizer,
            keys.DEFAULT_STATE_KEYS[keys.PROGRESS]: self.progress.for_loading(),
        }

    def check_extra(self) -> None:
        """Refuse ``extra`` state that no resume could load (the safe loader reads tensors, numbers, strings,
        bytes, None and containers of them; a numpy array or a datetime would need code to load)."""
        for name, state in self.extra.items():
            problem = safe_types.unloadable_entry(state.state_dict())
            if problem:
                raise CheckpointError(f"extra state {name!r}: {problem}")


def model_device(model: nn.Module) -> torch.device:
    for tensor in model.parameters():
        local = local_tensor_or_self(tensor)  # DTensor (FSDP2): the shard's device
        return local.device
    return torch.device("cpu")


def state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """This rank's bytes of model and optimizer state (an optimizer with no state yet: as much as Adam's)."""
    local = [local_tensor_or_self(t) for t in (*model.parameters(), *model.buffers())]
    size = sum(t.nbytes for t in local)
    optim = [local_tensor_or_self(v) for state in optimizer.state.values() for v in state.values()]
    tensors = [t for t in optim if isinstance(t, torch.Tensor)]
    return size + (sum(t.nbytes for t in tensors) if tensors else 2 * size)


def has_persistent_buffers(model: nn.Module) -> bool:
    """Whether the model's saved state includes buffers, which its forward may change (batch-norm statistics)."""
    buffers = {name for name, _ in model.named_buffers()}
    return bool(buffers & set(model.state_dict().keys()))


def require_stateful_loader(dataloader: Any) -> None:
    """A loader whose position cannot be saved would resume at its start: refuse it before anything is taken."""
    if dataloader is not None and not (hasattr(dataloader, "state_dict") and hasattr(dataloader, "load_state_dict")):
        raise ValueError(
            f"dataloader={type(dataloader).__name__} cannot save its position (no state_dict/load_state_dict): use "
            "torchdata.stateful_dataloader.StatefulDataLoader (a drop-in DataLoader), or save your own position "
            "with extra="
        )


def give_loader_a_generator(dataloader: Any) -> None:
    """Creating a ``DataLoader`` iterator draws its base seed from the loader's ``generator`` or, without one,
    from the global torch RNG, which a resume has just restored: that draw would shift every later random
    number (dropout masks) and the resumed run would differ from step one on. A generator of its own, seeded
    from the global seed, keeps the global stream untouched."""
    if dataloader is not None and hasattr(dataloader, "generator") and dataloader.generator is None:
        dataloader.generator = torch.Generator().manual_seed(torch.initial_seed())


def skip_batches(loader: Any, progress: Any, count: int) -> int:
    """Move ``loader`` (and ``progress``'s global data position) ``count`` batches on, fewer at the end of its
    data; returns how many."""
    if loader is None or count <= 0:
        return 0
    batches = iter(loader)
    skipped = 0
    for _ in range(count):
        try:
            next(batches)
        except StopIteration:
            break
        skipped += 1
    if hasattr(loader, "state_dict") and hasattr(loader, "load_state_dict"):
        loader.load_state_dict(loader.state_dict())  # the loop's next iter() starts after the skipped batches
    progress.skip_batches(skipped)
    return skipped
