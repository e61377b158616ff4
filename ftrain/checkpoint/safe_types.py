"""What saved state may hold so that a resume can load it without running code.

Non-tensor entries of a checkpoint are read back by torch's ``weights_only`` unpickler (DCP's bytes entries and
the local tier's skeleton alike): tensors, numbers, strings, bytes, None, torch dtypes/devices/sizes and lists,
tuples, dicts and OrderedDicts of them load; a numpy array, a datetime, a deque or a dataclass would need code
to load and are refused there. ``unloadable_entry`` finds such an entry before it is saved.
"""

from __future__ import annotations

import io
from collections import OrderedDict
from typing import Any

import torch

ALLOWED = "tensors, numbers, strings, bytes, None, and lists, tuples and dicts of them"
_LEAVES = (int, float, bool, complex, str, bytes, type(None), torch.dtype, torch.device, torch.Size)


def unloadable_entry(state: Any, path: str = "") -> str:
    """'' if ``state`` loads back through the safe unpickler, else one line naming the first entry that does not."""
    kind = type(state)
    if isinstance(state, torch.Tensor) or kind in _LEAVES:
        return ""
    if kind in (dict, OrderedDict):
        for key, value in state.items():
            if type(key) not in _LEAVES:
                return _problem(f"{path}[{key!r}]", key, "key")
            problem = unloadable_entry(value, f"{path}.{key}" if path else str(key))
            if problem:
                return problem
        return ""
    if kind in (list, tuple):
        for index, value in enumerate(state):
            problem = unloadable_entry(value, f"{path}[{index}]")
            if problem:
                return problem
        return ""
    if _loads_safely(state):  # something torch registered as safe to load
        return ""
    return _problem(path or "the state", state, "entry")


def _loads_safely(value: Any) -> bool:
    buffer = io.BytesIO()
    try:
        torch.save(value, buffer)
        buffer.seek(0)
        torch.load(buffer, weights_only=True)
    except Exception:
        return False
    return True


def _problem(where: str, value: Any, what: str) -> str:
    kind = type(value)
    return (
        f"{what} {where} is a {kind.__module__}.{kind.__qualname__}, which a resume cannot load without running "
        f"code; save only {ALLOWED} (e.g. torch.from_numpy(array), a timestamp as a float)"
    )
