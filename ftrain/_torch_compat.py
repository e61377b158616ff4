"""Every private torch symbol ftrain relies on, each behind one small function.

torch may change or remove a private name in any release. Keeping them here makes an upgrade one place to look,
and ``tests/test_torch_compat.py`` has a test per function that names the symbol that broke. A flat list of small
functions: add one (with its docstring and its test) rather than reaching into torch elsewhere.
"""

from __future__ import annotations

import operator
from typing import IO, Any, Callable, Iterator

import torch

# ------------------------------------------------------------------------------------------------ storage and memory


def shared_fd_storage(fd: int, size: int) -> torch.UntypedStorage:
    """``UntypedStorage._new_shared_fd_cpu``: ``size`` bytes of the file ``fd`` as a CPU storage through a shared
    mapping that keeps a duplicate of ``fd`` open. torch's multiprocessing then sends views of it to another
    process by descriptor (no copy); ``torch.from_file`` closes its descriptor, and torch would copy such a tensor
    into new shared memory instead."""
    return torch.UntypedStorage._new_shared_fd_cpu(fd, size)


def pin_host_memory(pointer: int, nbytes: int) -> None:
    """``torch.cuda._pin_memory_utils.pin_memory``: page-lock existing host memory (``cudaHostRegister``) in place,
    as DCP's own stager pins shared buffers. Raises ``RuntimeError`` if it cannot."""
    from torch.cuda import _pin_memory_utils

    _pin_memory_utils.pin_memory(pointer, nbytes)


def unpin_host_memory(pointer: int) -> None:
    """``torch.cuda._pin_memory_utils.unpin_memory``: undo ``pin_host_memory`` (``cudaHostUnregister``)."""
    from torch.cuda import _pin_memory_utils

    _pin_memory_utils.unpin_memory(pointer)


def foreach_copy(destinations: list[torch.Tensor], sources: list[torch.Tensor]) -> None:
    """``torch._foreach_copy_``: copy each source into its destination in one call (one dispatch for all tensors
    instead of one per tensor)."""
    torch._foreach_copy_(destinations, sources)


# ------------------------------------------------------------------------------------------------ unpickling


def weights_only_unpickle(stream: IO[bytes]) -> Any:
    """``torch._weights_only_unpickler.Unpickler``: read a bare pickle (not torch.save's archive) with the
    unpickler behind ``torch.load(weights_only=True)``, which builds containers, plain values and tensors only
    and never runs code from the data. Its refusals raise ``pickle.UnpicklingError``."""
    return weights_only_unpickler(stream).load()


def weights_only_unpickler(stream: IO[bytes], persistent_load: Callable[[Any], Any] | None = None) -> Any:
    """``torch._weights_only_unpickler.Unpickler`` over ``stream``, not yet run: ``load()`` reads it.
    ``persistent_load`` answers the pickle's persistent ids (torch.save's storages) in place of torch's."""
    from torch import _weights_only_unpickler

    unpickler = _weights_only_unpickler.Unpickler(stream)
    if persistent_load is not None:
        unpickler.persistent_load = persistent_load
    return unpickler


def torch_archive_reader(stream: IO[bytes]) -> Any:
    """``torch._C.PyTorchFileReader``: the records of a ``torch.save`` archive read from ``stream`` (``get_record``,
    ``has_record``, ``get_record_offset``: where a record's bytes start in the stream, uncompressed)."""
    return torch._C.PyTorchFileReader(stream)


# ------------------------------------------------------------------------------------------------ DTensor

#: ``DTensor._local_tensor``: this rank's shard of a DTensor as the plain tensor it wraps (no autograd function,
#: unlike ``to_local()``, and no copy). An ``operator.attrgetter``: it runs at every snapshot for every DTensor.
local_tensor: Callable[[Any], torch.Tensor] = operator.attrgetter("_local_tensor")

#: ``DTensor._spec``: how a DTensor is laid out (mesh, placements, global shape); with its local tensor, what
#: ``DTensor(local, spec, requires_grad=...)`` rebuilds it from without a collective.
dtensor_spec: Callable[[Any], Any] = operator.attrgetter("_spec")


def local_tensor_or_self(tensor: Any) -> Any:
    """``DTensor._local_tensor`` of a DTensor (this rank's shard), or ``tensor`` itself when it is no DTensor."""
    return getattr(tensor, "_local_tensor", tensor)


# ------------------------------------------------------------------------------------------------ optimizers


def init_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """``torch.distributed.checkpoint.state_dict._init_optim_state``: give an optimizer that has not stepped yet
    its per-parameter state (without changing the parameters), so that its ``state_dict()`` shows every entry's
    layout."""
    from torch.distributed.checkpoint.state_dict import _init_optim_state

    _init_optim_state(optimizer)


# ------------------------------------------------------------------------------------------------ nn.Module internals


def saves_only_parameters_and_buffers(module: torch.nn.Module) -> bool:
    """Whether ``module.state_dict()`` is exactly its own parameters and persistent buffers: no ``state_dict``,
    ``_save_to_state_dict`` or ``get_extra_state`` of its own class, and no state-dict post-hooks
    (``_state_dict_hooks``)."""
    base = torch.nn.Module
    kind = type(module)
    return (
        kind.state_dict is base.state_dict
        and kind._save_to_state_dict is base._save_to_state_dict
        and kind.get_extra_state is base.get_extra_state
        and not module._state_dict_hooks
    )


def state_dict_pre_hooks(module: torch.nn.Module) -> Iterator[Callable[..., Any]]:
    """``module._state_dict_pre_hooks``: the hooks ``state_dict()`` runs first, called as
    ``hook(module, prefix, keep_vars)`` (FSDP2's make sure the parameters are the sharded ones)."""
    return iter(module._state_dict_pre_hooks.values())


def own_parameters(module: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Parameter]]:
    """``module._parameters``: the module's own parameters (not its children's) in registration order, None
    entries left out."""
    return ((name, param) for name, param in module._parameters.items() if param is not None)


def own_persistent_buffers(module: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """``module._buffers`` less ``module._non_persistent_buffers_set``: the module's own buffers that
    ``state_dict()`` saves, in registration order, None entries left out."""
    skip = module._non_persistent_buffers_set
    return ((name, buffer) for name, buffer in module._buffers.items() if buffer is not None and name not in skip)


def module_version(module: torch.nn.Module) -> int:
    """``module._version``: what ``state_dict()`` records in ``_metadata`` for the module."""
    return module._version


# ------------------------------------------------------------------------------------------------ DCP internals


def dcp_storage_info_class() -> type:
    """``torch.distributed.checkpoint.filesystem._StorageInfo``: the record DCP's metadata holds for where an entry
    lies (``relative_path``, ``offset``, ``length``, ``transform_descriptors``)."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo

    return _StorageInfo


def dcp_memory_format_enum() -> type:
    """``torch.distributed.checkpoint.metadata._MEM_FORMAT_ENCODING``: the enum DCP's ``TensorProperties`` pickles
    a tensor's memory format as."""
    from torch.distributed.checkpoint.metadata import _MEM_FORMAT_ENCODING

    return _MEM_FORMAT_ENCODING


def layout_from_name() -> Callable[[str], torch.layout]:
    """``torch.serialization._get_layout``: the function torch pickles a ``torch.layout`` as (the layout from its
    name). The function itself, not called: a pickle names it (the safe unpickler matches it)."""
    return torch.serialization._get_layout


def empty_state_dict_load_planner_class() -> type:
    """``torch.distributed.checkpoint.default_planner._EmptyStateDictLoadPlanner``: the load planner that fills an
    empty dict with everything a checkpoint holds (nested as saved), needing no model."""
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner

    return _EmptyStateDictLoadPlanner


def set_state_dict_element(root: dict[str, Any], path: Any, value: Any) -> None:
    """``torch.distributed.checkpoint._traverse.set_element``: put ``value`` in the nested ``root`` at the object
    path (keys and list indices) a flattened key stands for, making the containers on the way."""
    from torch.distributed.checkpoint._traverse import set_element

    set_element(root, path, value)


def load_state_dict_in_place(state_dict: dict[str, Any], storage_reader: Any, planner: Any) -> None:
    """``torch.distributed.checkpoint.state_dict_loader._load_state_dict`` with ``no_dist=True``: DCP's load, in one
    process, into ``state_dict`` itself. (``dcp.load`` loads into a copy and keeps only the keys that were there:
    what an empty-dict planner builds would be dropped.)"""
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    _load_state_dict(state_dict, storage_reader=storage_reader, planner=planner, no_dist=True)


def dcp_metadata_path(reader: Any, rank: int | None) -> Any:
    """``FileSystemReader._get_metadata_path(rank)``: where a file-system reader finds DCP's ``.metadata`` (a
    rank's own file when every rank wrote one, else the one shared file when ``rank`` is None)."""
    return reader._get_metadata_path(rank)


def dcp_writer_process() -> Any:
    """``torch.distributed.checkpoint._async_process_executor._CHECKPOINT_PROCESS``: this process's handle on
    DCP's writer process (``async_process`` saves), None when none was started. DCP keeps it in that module
    global for the life of the interpreter."""
    from torch.distributed.checkpoint import _async_process_executor as executor

    return getattr(executor, "_CHECKPOINT_PROCESS", None)


def forget_dcp_writer_process() -> None:
    """Set ``_async_process_executor._CHECKPOINT_PROCESS`` to None: the next ``async_process`` save starts a new
    writer process."""
    from torch.distributed.checkpoint import _async_process_executor as executor

    executor._CHECKPOINT_PROCESS = None


def dcp_writer_process_alive(process: Any) -> bool:
    """``_AsyncCheckpointProcess._save_process.is_alive()``: whether the OS process behind a handle from
    ``dcp_writer_process`` still runs."""
    return process._save_process.is_alive()


def close_dcp_writer_process(process: Any) -> None:
    """``_AsyncCheckpointProcess.__del__``: what DCP does at garbage collection: send the writer process TERMINATE
    and join it (SIGTERM after 5 s). Then it is joined until it is gone (SIGKILL after 5 more seconds): DCP does
    not join after its SIGTERM, and a writer still alive when the handle is collected would make DCP's second
    ``__del__`` send into a closed pipe (a BrokenPipeError traceback at the end of a finished run)."""
    process.__del__()
    save_process = process._save_process
    save_process.join(timeout=5)
    if save_process.is_alive():
        save_process.kill()
        save_process.join(timeout=5)


# ------------------------------------------------------------------------------------------------ startup


def import_dynamo() -> None:
    """``import torch._dynamo``: the compiler stack an optimizer's first use imports (about half of a fresh
    process's start); a warm parent imports it once for all its forks."""
    import torch._dynamo  # noqa: F401


# ------------------------------------------------------------------------------------------------ process groups


def init_fake_process_group(rank: int, world_size: int) -> None:
    """``torch.testing._internal.distributed.fake_pg``: make the default process group one of torch's ``fake``
    backend (registered by importing that module), which completes every collective at once without sending
    anything and starts no thread. Destroy it with ``dist.destroy_process_group()``."""
    import torch.distributed as dist
    import torch.testing._internal.distributed.fake_pg  # noqa: F401 - registers the backend

    dist.init_process_group("fake", store=dist.HashStore(), rank=rank, world_size=world_size)
