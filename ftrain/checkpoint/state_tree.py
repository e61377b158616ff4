"""Walking a state tree (what ``state_dict()`` returns): its tensors taken out, and put back.

``IMMUTABLE`` is the set of leaf types that are kept as they are (never copied): both the local tier's walker here
and ``staging.py``'s copy use it.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from typing import Any

import torch
from torch.distributed.tensor import DTensor

from ftrain._torch_compat import local_tensor

IMMUTABLE = (int, float, bool, complex, str, bytes, type(None), torch.dtype, torch.device, torch.Size)
_IMMUTABLE_TYPES = frozenset(IMMUTABLE)  # for the exact-type test on the hot path

# (path in the tree, the tensor, whether it is a DTensor's local shard)
Found = list[tuple[tuple[Any, ...], torch.Tensor, bool]]


def split(value: Any, path: tuple[Any, ...], tensors: Found) -> Any:
    """A copy of the tree with every strided tensor taken out (appended to ``tensors``, a None in its place).

    Containers are rebuilt and other mutable leaves deep-copied, so nothing in the copy aliases what training
    may change. This runs at every snapshot over every entry of the state: a dict's plain values and DTensors are
    handled in its own loop, without a call or a path per entry."""
    kind = type(value)
    if kind is dict or kind is OrderedDict:
        tree = kind()
        for key, item in value.items():
            item_kind = type(item)
            if item_kind in _IMMUTABLE_TYPES:
                tree[key] = item
            elif item_kind is DTensor:  # FSDP2's parameters and their optimizer state
                tensors.append(((*path, key), local_tensor(item), True))
                tree[key] = None
            elif item_kind is torch.Tensor and strided(item):  # e.g. an optimizer's step
                tensors.append(((*path, key), item, False))
                tree[key] = None
            else:
                tree[key] = split(item, (*path, key), tensors)
        if kind is OrderedDict and hasattr(value, "_metadata"):  # nn.Module.state_dict()'s per-module versions
            tree._metadata = value._metadata  # type: ignore[union-attr]
        return tree
    if kind is torch.Tensor or kind is torch.nn.Parameter:
        if strided(value):
            tensors.append((path, value, False))
            return None
        return value.detach().clone()  # rare (sparse, quantized): kept whole in the tree
    if kind is list or kind is tuple:
        items = [
            item if type(item) in _IMMUTABLE_TYPES else split(item, (*path, index), tensors)
            for index, item in enumerate(value)
        ]
        return items if kind is list else tuple(items)
    if kind in _IMMUTABLE_TYPES:
        return value
    if isinstance(value, DTensor):
        tensors.append((path, local_tensor(value), True))
        return None
    if isinstance(value, torch.Tensor):
        return split(value.as_subclass(torch.Tensor), path, tensors)
    if isinstance(value, dict):  # a subclass: kept as the plain container it extends
        ordered = isinstance(value, OrderedDict)
        tree = split(OrderedDict(value) if ordered else dict(value), path, tensors)
        if ordered and hasattr(value, "_metadata"):
            tree._metadata = value._metadata
        return tree
    if isinstance(value, (list, tuple)):
        items = [split(item, (*path, index), tensors) for index, item in enumerate(value)]
        return items if isinstance(value, list) else tuple(items)
    if isinstance(value, IMMUTABLE):
        return value
    return copy.deepcopy(value)  # never alias what training may change before the snapshot is written


def strided(tensor: torch.Tensor) -> bool:
    """Whether a tensor's elements can be stored as raw bytes as they are (else it stays whole in the tree)."""
    return tensor.layout is torch.strided and not tensor.is_quantized and not tensor.is_meta


def join(tree: Any, path: tuple[Any, ...], values: dict[tuple[Any, ...], torch.Tensor]) -> Any:
    """``split`` undone: the tensors put back at their paths."""
    if path in values:
        return values[path]
    if isinstance(tree, dict):
        joined = OrderedDict() if isinstance(tree, OrderedDict) else {}
        for key, item in tree.items():
            joined[key] = join(item, (*path, key), values)
        if hasattr(tree, "_metadata"):
            joined._metadata = tree._metadata  # type: ignore[union-attr]
        return joined
    if isinstance(tree, (list, tuple)):
        items = [join(item, (*path, index), values) for index, item in enumerate(tree)]
        return items if isinstance(tree, list) else tuple(items)
    return tree


def at(tree: Any, path: tuple[Any, ...]) -> Any:
    """The entry at ``path`` in ``tree``; None if there is none."""
    for key in path:
        try:
            tree = tree[key]
        except (KeyError, IndexError, TypeError):
            return None
    return tree
