"""Loading DCP checkpoints without running code from them, and without letting them change the process.

DCP's ``.metadata`` is a pickle and its non-tensor entries are read with ``torch.load(weights_only=False)``:
a crafted checkpoint could run any command on load. Here every non-tensor entry goes through
``torch.load(weights_only=True)``, and the metadata through ``_MetadataUnpickler``, which can build DCP's
metadata records and nothing else:
  * a global is one of an explicit list of constructors (each with a check of its arguments), DCP's record
    classes, or a torch dtype/layout value; nothing else is even imported;
  * ``NEWOBJ`` makes a fresh instance of a record class only, and ``BUILD`` (pickle's "set the state") is
    allowed only on such a fresh instance, with that record's own field names: a crafted file cannot set an
    attribute on a class, an enum member, or anything else the process shares;
  * the opcodes DCP never writes (``INST``, ``OBJ``, ``NEWOBJ_EX``, extension codes, persistent ids) are refused,
    and items are only added to lists, dicts and sets the unpickler made itself.
Anything else is refused with ``UnsafeCheckpointError`` before it acts, so a refused file leaves nothing behind.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import pathlib
import pickle
from typing import Any, Callable

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint import metadata as _dcp_meta
from torch.distributed.checkpoint import planner as _dcp_planner
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, LoadPlanner, ReadItem
from torch.futures import Future

from ftrain._torch_compat import (
    dcp_memory_format_enum,
    dcp_metadata_path,
    dcp_storage_info_class,
    empty_state_dict_load_planner_class,
    layout_from_name,
    set_state_dict_element,
)
from ftrain.checkpoint.sums import Summer


class UnsafeCheckpointError(ValueError):
    """The checkpoint holds something that loading would have to execute, or that would change the process."""


# The records DCP's metadata is made of: the only objects a pickle may create with NEWOBJ and fill with BUILD.
_RECORDS: dict[type, frozenset[str]] = {
    cls: frozenset(f.name for f in dataclasses.fields(cls))
    for cls in (
        _dcp_meta.Metadata,
        _dcp_meta.TensorStorageMetadata,
        _dcp_meta.BytesStorageMetadata,
        _dcp_meta.ChunkStorageMetadata,
        _dcp_meta.MetadataIndex,
        _dcp_meta.TensorProperties,
        _dcp_meta.StorageMeta,
        dcp_storage_info_class(),
    )
}
_MEM_FORMAT_ENCODING = dcp_memory_format_enum()
_ENUMS = (_MEM_FORMAT_ENCODING, _dcp_planner.LoadItemType, _dcp_planner.WriteItemType)
_LAYOUTS = {str(v): v for v in vars(torch).values() if isinstance(v, torch.layout)}
_TORCH_VALUES = (torch.dtype, torch.layout, torch.memory_format)


def _refuse(what: str) -> UnsafeCheckpointError:
    return UnsafeCheckpointError(f"checkpoint metadata {what}, which ftrain does not load")


def _ints(args: tuple) -> bool:
    return len(args) == 1 and isinstance(args[0], (tuple, list)) and all(type(i) is int for i in args[0])


def _strs(args: tuple) -> bool:
    return all(type(a) is str for a in args)


def _pairs(args: tuple) -> bool:
    return not args or (len(args) == 1 and type(args[0]) is list and all(
        type(p) in (tuple, list) and len(p) == 2 for p in args[0]))


def _one_scalar(args: tuple) -> bool:
    return len(args) == 1 and type(args[0]) in (int, str)


def _get_layout(name: str) -> torch.layout:
    """torch.serialization._get_layout, without calling it: a name of a torch layout, nothing else."""
    if name not in _LAYOUTS:
        raise _refuse(f"names layout {name!r}")
    return _LAYOUTS[name]


# Callables a REDUCE may call: each with a check of its arguments and what it calls instead (all return new
# immutable values, fresh containers, or enum members, which BUILD will not touch).
_CONSTRUCTORS: dict[Any, tuple[Callable[[tuple], bool], Callable[..., Any]]] = {
    torch.Size: (_ints, torch.Size),
    collections.OrderedDict: (_pairs, collections.OrderedDict),
    pathlib.PosixPath: (_strs, pathlib.PosixPath),
    pathlib.PurePosixPath: (_strs, pathlib.PurePosixPath),
    layout_from_name(): (lambda a: len(a) == 1 and type(a[0]) is str, _get_layout),
    **{cls: (_one_scalar, cls) for cls in _ENUMS},
}
_GLOBALS: dict[tuple[str, str], Any] = {
    (obj.__module__, obj.__qualname__): obj for obj in (*_RECORDS, *_CONSTRUCTORS)
}
_GLOBALS[("torch._utils", "_get_layout")] = layout_from_name()  # older torch pickled it from here
_CONTAINERS = {
    pickle.APPEND[0]: (list,),
    pickle.APPENDS[0]: (list,),
    pickle.SETITEM[0]: (dict, collections.OrderedDict),
    pickle.SETITEMS[0]: (dict, collections.OrderedDict),
    pickle.ADDITEMS[0]: (set,),
}
_NEVER = {
    pickle.INST[0]: "INST",
    pickle.OBJ[0]: "OBJ",
    pickle.NEWOBJ_EX[0]: "NEWOBJ_EX",
    pickle.EXT1[0]: "EXT1",
    pickle.EXT2[0]: "EXT2",
    pickle.EXT4[0]: "EXT4",
    pickle.PERSID[0]: "PERSID",
    pickle.BINPERSID[0]: "BINPERSID",
}


class _MetadataUnpickler(pickle._Unpickler):  # type: ignore[name-defined]
    """The pure-Python unpickler (the C one cannot hook BUILD) with a checked dispatch table.

    Slower than the unrestricted C unpickler, but not by much: most of either's time is building ``torch.Size``
    and record objects (docs/bench.md). The metadata is read once per candidate checkpoint, before any tensor.
    """

    dispatch = dict(pickle._Unpickler.dispatch)  # type: ignore[attr-defined]

    def __init__(self, stream: io.BufferedIOBase) -> None:
        super().__init__(stream)
        self._fresh: dict[int, Any] = {}  # id -> record made by NEWOBJ here (kept alive so ids stay unique)

    def find_class(self, module: str, name: str) -> Any:
        obj = _GLOBALS.get((module, name))
        if obj is not None:
            return obj
        if module == "torch" and isinstance(getattr(torch, name, None), _TORCH_VALUES):
            return getattr(torch, name)
        raise UnsafeCheckpointError(f"checkpoint metadata refers to {module}.{name}, which ftrain does not load")

    def _load_newobj(self) -> None:
        args = self.stack.pop()
        cls = self.stack.pop()
        if cls not in _RECORDS or args != ():
            raise _refuse(f"creates {_name(cls)} with NEWOBJ")
        obj = object.__new__(cls)
        self._fresh[id(obj)] = obj
        self.append(obj)

    def _load_reduce(self) -> None:
        args = self.stack.pop()
        func = self.stack[-1]
        check, call = _CONSTRUCTORS.get(func, (None, None)) if _hashable(func) else (None, None)
        if check is None or type(args) is not tuple:
            raise _refuse(f"calls {_name(func)}")
        if not check(args):
            raise _refuse(f"calls {_name(func)} with arguments of types {[type(a).__name__ for a in args]}")
        self.stack[-1] = call(*args)

    def _load_build(self) -> None:
        state = self.stack.pop()
        inst = self.stack[-1]
        fields = _RECORDS.get(type(inst))
        if fields is None or self._fresh.get(id(inst)) is not inst:
            raise _refuse(f"sets the state of {_name(inst)} (BUILD on anything but a record it just created)")
        if type(inst) is _dcp_meta.TensorProperties:
            _build_tensor_properties(inst, state)
            return
        slots = None
        if type(state) is tuple and len(state) == 2:
            state, slots = state
        for part in (state, slots):
            if part is None:
                continue
            if type(part) is not dict or not set(part) <= fields:
                raise _refuse(f"sets fields {_keys(part)} of {type(inst).__name__} (it has {sorted(fields)})")
            for key, value in part.items():
                object.__setattr__(inst, key, value)

    dispatch[pickle.NEWOBJ[0]] = _load_newobj
    dispatch[pickle.REDUCE[0]] = _load_reduce
    dispatch[pickle.BUILD[0]] = _load_build


def _target(unpickler: _MetadataUnpickler, opcode: int) -> Any:
    """The object an APPEND/SETITEM (on the stack) or APPENDS/SETITEMS/ADDITEMS (below the mark) adds to."""
    if opcode == pickle.APPEND[0]:
        return unpickler.stack[-2]
    if opcode == pickle.SETITEM[0]:
        return unpickler.stack[-3]
    return unpickler.metastack[-1][-1]


def _guard_container(opcode: int) -> Callable[[Any], None]:
    load, allowed = _MetadataUnpickler.dispatch[opcode], _CONTAINERS[opcode]

    def checked(self: _MetadataUnpickler) -> None:
        target = _target(self, opcode)
        if type(target) not in allowed:
            raise _refuse(f"adds items to {_name(target)}")
        load(self)

    return checked


def _never(name: str) -> Callable[[Any], None]:
    def refused(self: _MetadataUnpickler) -> None:
        raise _refuse(f"uses pickle opcode {name}")

    return refused


for _op in _CONTAINERS:
    _MetadataUnpickler.dispatch[_op] = _guard_container(_op)
for _op, _opname in _NEVER.items():
    _MetadataUnpickler.dispatch[_op] = _never(_opname)


def _build_tensor_properties(inst: Any, state: Any) -> None:
    """TensorProperties pickles a 5-tuple; its own ``__setstate__`` applies it to this fresh instance."""
    kinds = (torch.dtype, torch.layout, bool, _MEM_FORMAT_ENCODING, bool)
    if type(state) is not tuple or len(state) != 5 or not all(isinstance(v, k) for v, k in zip(state, kinds)):
        raise _refuse("sets TensorProperties to something other than (dtype, layout, bool, memory format, bool)")
    _dcp_meta.TensorProperties.__setstate__(inst, state)


def _hashable(obj: Any) -> bool:
    try:
        hash(obj)
    except TypeError:
        return False
    return True


def _keys(part: Any) -> str:
    return str(sorted(map(str, part))) if type(part) is dict else f"from a {type(part).__name__}"


def _name(obj: Any) -> str:
    if isinstance(obj, type):
        return f"the class {obj.__module__}.{obj.__qualname__}"
    return f"a {type(obj).__module__}.{type(obj).__qualname__}"


def read_metadata_safely(stream: io.BufferedIOBase) -> Metadata:
    """DCP metadata from ``stream``, or ``UnsafeCheckpointError``/``ValueError`` with a one-line reason."""
    try:
        metadata = _MetadataUnpickler(stream).load()
    except UnsafeCheckpointError:
        raise
    except Exception as exc:
        reason = str(exc).splitlines()[0] if str(exc) else ""
        raise ValueError(f"checkpoint metadata is unreadable: {type(exc).__name__}: {reason}") from None
    if not isinstance(metadata, Metadata):
        raise UnsafeCheckpointError(f"checkpoint metadata is a {type(metadata).__name__}, not DCP metadata")
    return metadata


class SafeFileSystemReader(FileSystemReader):
    """``FileSystemReader`` whose metadata is read by the restricted unpickler, and whose whole-tensor items are
    read straight into their targets (``direct_read``); the rest goes through DCP's own path.

    ``expected_sums`` (file name -> (algorithm, digest)): data files verified while they are read, so a cold
    resume reads each byte once. Each file this rank reads from is read from its first byte to its last, in
    order, through the sum: the items this rank loads into their targets, every other byte (items of other
    ranks, empty tensors DCP skips) into a scratch buffer. A mismatch raises ``ChecksumMismatch`` before any
    item other than a whole tensor read into its target is parsed; ``dcp.load`` then fails on every rank, and
    the caller falls back to an older checkpoint, whose load overwrites those targets.
    """

    def __init__(self, path: Any, expected_sums: dict[str, tuple[str, str]] | None = None, **kwargs: Any) -> None:
        from ftrain.checkpoint.storage import checkpoint_at

        checkpoint = checkpoint_at(path)  # a CheckpointDir, or a local path
        dcp_path = checkpoint.storage.dcp_path(checkpoint.name)
        super().__init__(dcp_path, **kwargs)
        self.fs = checkpoint.storage.dcp_filesystem()
        self.path = self.fs.init_path(dcp_path)
        self.expected_sums = dict(expected_sums or {})

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        from ftrain.checkpoint.direct_read import read_into_target, sum_range

        per_file: dict[str, list[ReadItem]] = {}
        for item in plan.items:
            per_file.setdefault(self.storage_data[item.storage_index].relative_path, []).append(item)
        done: set[int] = set()
        problems = []
        for relative_path, items in per_file.items():
            items.sort(key=lambda i: self.storage_data[i.storage_index].offset)
            expected = self.expected_sums.get(relative_path)
            summer = Summer(expected[0]) if expected else None
            summed = 0  # bytes of the file fed to the sum so far
            with self.fs.create_stream(self.fs.concat_path(self.path, relative_path), "rb") as stream:
                for item in items:
                    info = self.storage_data[item.storage_index]
                    feed = summer if summer is not None and info.offset >= summed else None  # not twice
                    if feed is not None:
                        sum_range(stream, feed, summed, info.offset)
                    direct = item.type == LoadItemType.TENSOR and not info.transform_descriptors
                    if direct and read_into_target(stream, info.offset, info.length, item, planner, feed):
                        done.add(id(item))
                    elif feed is not None:  # DCP's path reads it below, from the page cache
                        sum_range(stream, feed, info.offset, info.offset + info.length)
                    summed = max(summed, info.offset + info.length)
                if summer is not None and expected is not None:
                    sum_range(stream, summer, summed, stream.seek(0, io.SEEK_END))
                    if summer.hexdigest() != expected[1]:
                        problems.append(
                            f"{relative_path} fails its checksum ({expected[0]} {summer.hexdigest()}, marker {expected[1]})"
                        )
        if problems:
            raise ChecksumMismatch("; ".join(problems))
        rest = [item for item in plan.items if id(item) not in done]
        if rest:
            return super().read_data(dataclasses.replace(plan, items=rest), planner)
        future: Future[None] = Future()
        future.set_result(None)
        return future

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = dcp_metadata_path(self, kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as stream:
            metadata = read_metadata_safely(stream)
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class ChecksumMismatch(Exception):
    """A data file read during a load does not match its commit marker's checksum."""


class _SafeBytes:
    """Non-tensor entries are read with ``weights_only=True``: plain data and tensors only, never code."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        try:
            obj = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as exc:
            raise UnsafeCheckpointError(
                f"checkpoint entry {read_item.dest_index.fqn} needs code execution to load: {str(exc).splitlines()[0]}"
            ) from None
        if self.flatten_state_dict:
            set_state_dict_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


class SafeLoadPlanner(_SafeBytes, DefaultLoadPlanner):
    """Loads into a given state dict. Keys under ``optional_prefixes`` may be absent from the checkpoint (they
    keep the value they had); every other key must be there."""

    def __init__(self, optional_prefixes: tuple[str, ...] = ()) -> None:
        super().__init__()
        self.optional_prefixes = optional_prefixes

    def set_up_planner(self, state_dict: Any, metadata: Metadata | None = None, is_coordinator: bool = False) -> None:
        super().set_up_planner(state_dict, metadata, is_coordinator)
        if metadata is not None and self.optional_prefixes:
            for fqn in list(self.state_dict):
                if fqn.startswith(self.optional_prefixes) and fqn not in metadata.state_dict_metadata:
                    del self.state_dict[fqn]


class SafeWholeLoadPlanner(_SafeBytes, empty_state_dict_load_planner_class()):  # type: ignore[misc]
    """Loads everything a checkpoint holds into an empty dict (for tools: no model needed)."""
