"""Every private torch symbol behind ``ftrain/_torch_compat.py`` still exists and does what ftrain relies on.

One test per function: after a torch upgrade, a failure here names the symbol that changed, instead of a local
snapshot or a staging copy going wrong somewhere downstream.
"""

from __future__ import annotations

import dataclasses
import inspect
import io
import os
import pickle

import pytest
import torch

from ftrain import _torch_compat as compat


def _broke(symbol: str, what: str) -> str:
    return f"torch {torch.__version__}: {symbol} {what}; update ftrain/_torch_compat.py"


def test_shared_fd_storage_maps_the_file_and_writes_through(tmp_path):
    assert hasattr(torch.UntypedStorage, "_new_shared_fd_cpu"), _broke("UntypedStorage._new_shared_fd_cpu", "is gone")
    path = tmp_path / "slot"
    path.write_bytes(bytes(64))
    fd = os.open(path, os.O_RDWR)
    try:
        storage = compat.shared_fd_storage(fd, 64)
    finally:
        os.close(fd)  # the mapping keeps its own descriptor
    tensor = torch.empty(0, dtype=torch.uint8).set_(storage)
    tensor[:4] = torch.tensor([1, 2, 3, 4], dtype=torch.uint8)
    assert path.read_bytes()[:4] == bytes([1, 2, 3, 4]), _broke("UntypedStorage._new_shared_fd_cpu", "no longer maps the file shared")


def test_pin_memory_utils_are_there():
    from torch.cuda import _pin_memory_utils

    for name in ("pin_memory", "unpin_memory"):
        assert callable(getattr(_pin_memory_utils, name, None)), _broke(f"torch.cuda._pin_memory_utils.{name}", "is gone")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="page-locking needs CUDA")
def test_pin_host_memory_page_locks_and_unlocks():
    buffer = torch.zeros(1 << 20, dtype=torch.uint8).share_memory_()
    compat.pin_host_memory(buffer.data_ptr(), buffer.nbytes)  # raises if torch can no longer register it
    try:
        device = torch.ones(1 << 20, dtype=torch.uint8, device="cuda")
        buffer.copy_(device, non_blocking=True)
        torch.cuda.synchronize()
        assert bool(buffer.all()), _broke("torch.cuda._pin_memory_utils.pin_memory", "broke copies into the memory")
    finally:
        compat.unpin_host_memory(buffer.data_ptr())


def test_foreach_copy_copies_every_tensor():
    assert hasattr(torch, "_foreach_copy_"), _broke("torch._foreach_copy_", "is gone")
    sources = [torch.arange(3.0), torch.ones(2, dtype=torch.int64)]
    targets = [torch.zeros(3), torch.zeros(2, dtype=torch.int64)]
    compat.foreach_copy(targets, sources)
    assert all(torch.equal(t, s) for t, s in zip(targets, sources)), _broke("torch._foreach_copy_", "no longer copies")


def test_weights_only_unpickle_reads_plain_values_and_refuses_code():
    value = {"a": [1, 2.5, "x", b"y", None, (True,)], "b": {"c": 3}}
    assert compat.weights_only_unpickle(io.BytesIO(pickle.dumps(value, protocol=2))) == value, _broke(
        "torch._weights_only_unpickler.Unpickler", "no longer reads a bare pickle"
    )
    evil = pickle.dumps(os.system, protocol=2)
    with pytest.raises(pickle.UnpicklingError):
        compat.weights_only_unpickle(io.BytesIO(evil))


def test_local_tensor_is_a_dtensors_shard():
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor import DTensor, Replicate

    import torch.distributed as dist

    started = not dist.is_initialized()
    if started:
        dist.init_process_group("gloo", init_method="tcp://127.0.0.1:0", rank=0, world_size=1)
    try:
        mesh = DeviceMesh("cpu", [0])
        local = torch.arange(4.0)
        dtensor = DTensor.from_local(local, mesh, [Replicate()], run_check=False)
        shard = compat.local_tensor(dtensor)
        assert type(shard) is torch.Tensor and torch.equal(shard, local), _broke("DTensor._local_tensor", "changed")
        assert compat.local_tensor_or_self(dtensor) is shard, _broke("DTensor._local_tensor", "changed")
        rebuilt = DTensor(shard, compat.dtensor_spec(dtensor), requires_grad=False)
        assert rebuilt.placements == dtensor.placements and torch.equal(rebuilt.full_tensor(), dtensor.full_tensor()), (
            _broke("DTensor._spec", "no longer rebuilds the DTensor with its local tensor")
        )
    finally:
        if started:
            dist.destroy_process_group()


def test_local_tensor_or_self_leaves_a_plain_tensor():
    tensor = torch.ones(2)
    assert compat.local_tensor_or_self(tensor) is tensor, _broke("torch.Tensor", "now has a _local_tensor")


def test_init_optimizer_state_gives_every_parameter_its_state():
    param = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.AdamW([param], lr=0.1)
    compat.init_optimizer_state(optimizer)
    assert set(optimizer.state[param]) >= {"exp_avg", "exp_avg_sq"}, _broke(
        "torch.distributed.checkpoint.state_dict._init_optim_state", "no longer initializes the state"
    )
    assert torch.equal(param.detach(), torch.ones(3)), _broke("_init_optim_state", "now changes the parameters")


class _Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(2, 2)
        self.register_buffer("kept", torch.ones(1))
        self.register_buffer("dropped", torch.ones(1), persistent=False)


def test_module_internals_give_what_state_dict_gives():
    net = _Net()
    collected = {}
    for name, module in net.named_modules():
        prefix = f"{name}." if name else ""
        for key, value in [*compat.own_parameters(module), *compat.own_persistent_buffers(module)]:
            collected[prefix + key] = value
    assert list(collected) == list(net.state_dict()), _broke(
        "nn.Module._parameters/_buffers/_non_persistent_buffers_set", "no longer match state_dict()"
    )
    assert compat.module_version(net) == net.state_dict()._metadata[""]["version"], _broke("nn.Module._version", "changed")


def test_state_dict_pre_hooks_are_the_registered_ones():
    net = _Net()
    seen = []
    net.register_state_dict_pre_hook(lambda module, prefix, keep_vars: seen.append(prefix))
    for hook in compat.state_dict_pre_hooks(net):
        hook(net, "", False)
    assert seen == [""], _broke("nn.Module._state_dict_pre_hooks", "no longer holds the registered hooks")


def test_saves_only_parameters_and_buffers_sees_every_way_to_change_the_state_dict():
    assert compat.saves_only_parameters_and_buffers(_Net()), _broke("nn.Module._save_to_state_dict", "changed")

    class Extra(_Net):
        def get_extra_state(self):
            return 1

    hooked = _Net()
    hooked.register_state_dict_post_hook(lambda *args: None)
    assert not compat.saves_only_parameters_and_buffers(Extra()), _broke("nn.Module.get_extra_state", "changed")
    assert not compat.saves_only_parameters_and_buffers(hooked), _broke(
        "nn.Module._state_dict_hooks", "no longer holds the state-dict post-hooks"
    )


def test_torch_archive_reader_finds_a_records_bytes(tmp_path):
    """torch.save's archive: the tensor's bytes lie uncompressed at the record's offset (direct reads rely on it);
    its data.pkl reads back through the weights-only unpickler with our own persistent_load."""
    tensor = torch.arange(10, dtype=torch.float32)
    buffer = io.BytesIO()
    torch.save(tensor, buffer)
    archive = compat.torch_archive_reader(io.BytesIO(buffer.getvalue()))
    keys: list[str] = []

    def persistent_load(saved_id):
        keys.append(str(saved_id[2]))
        return torch.storage.TypedStorage(
            wrap_storage=torch.UntypedStorage(int(saved_id[4]) * 4, device="meta"), dtype=torch.float32, _internal=True
        )

    meta = compat.weights_only_unpickler(io.BytesIO(archive.get_record("data.pkl")), persistent_load).load()
    assert meta.shape == tensor.shape and keys, _broke("torch._weights_only_unpickler.Unpickler", "persistent_load changed")
    offset = archive.get_record_offset(f"data/{keys[0]}")
    raw = buffer.getvalue()[offset : offset + 40]
    assert torch.equal(torch.frombuffer(bytearray(raw), dtype=torch.float32), tensor), _broke(
        "torch._C.PyTorchFileReader.get_record_offset", "no longer points at the record's bytes"
    )


# ------------------------------------------------------------------------------------------------ DCP internals


@pytest.fixture(scope="module")
def dcp_checkpoint(tmp_path_factory):
    """A small DCP checkpoint saved in this process: a tensor and a non-tensor entry, nested."""
    import warnings

    import torch.distributed.checkpoint as dcp

    path = tmp_path_factory.mktemp("dcp")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no process group: DCP saves as one process and says so
        dcp.save({"m": {"w": torch.arange(4.0)}, "n": {"x": [1, "s"]}}, checkpoint_id=path)
    return path


def test_dcp_storage_info_is_where_the_metadata_puts_an_entry(dcp_checkpoint):
    from torch.distributed.checkpoint import FileSystemReader

    storage_info = compat.dcp_storage_info_class()
    metadata = FileSystemReader(dcp_checkpoint).read_metadata()
    for info in metadata.storage_data.values():
        assert isinstance(info, storage_info), _broke(
            "torch.distributed.checkpoint.filesystem._StorageInfo", f"is no longer what DCP writes ({type(info)})"
        )
        fields = {field.name for field in dataclasses.fields(info)}
        assert {"relative_path", "offset", "length", "transform_descriptors"} <= fields, _broke(
            "_StorageInfo", "changed its fields"
        )


def test_dcp_memory_format_enum_is_what_tensor_properties_pickle(dcp_checkpoint):
    from torch.distributed.checkpoint import FileSystemReader

    properties = FileSystemReader(dcp_checkpoint).read_metadata().state_dict_metadata["m.w"].properties
    state = properties.__getstate__()
    assert len(state) == 5 and isinstance(state[3], compat.dcp_memory_format_enum()), _broke(
        "torch.distributed.checkpoint.metadata._MEM_FORMAT_ENCODING", "is no longer what TensorProperties pickles"
    )


def test_layout_from_name_is_what_a_layout_pickles_as():
    import pickletools

    get_layout = compat.layout_from_name()
    assert get_layout("torch.sparse_coo") is torch.sparse_coo, _broke("torch.serialization._get_layout", "changed")
    pickled = pickle.dumps(torch.sparse_coo, protocol=2)
    named = [arg for op, arg, _ in pickletools.genops(pickled) if op.name == "GLOBAL"]
    assert named == [f"{get_layout.__module__} {get_layout.__qualname__}"], _broke(
        "torch.serialization._get_layout", f"is no longer what a torch.layout pickles as ({named})"
    )


def test_set_state_dict_element_builds_the_nested_containers():
    root: dict = {}
    compat.set_state_dict_element(root, ("a", "b"), 1)
    compat.set_state_dict_element(root, ("c", 0), 2)
    assert root == {"a": {"b": 1}, "c": [2]}, _broke("torch.distributed.checkpoint._traverse.set_element", "changed")


def test_load_state_dict_in_place_with_the_empty_planner_reads_everything(dcp_checkpoint):
    from torch.distributed.checkpoint import FileSystemReader

    planner = compat.empty_state_dict_load_planner_class()()
    state: dict = {}
    compat.load_state_dict_in_place(state, FileSystemReader(dcp_checkpoint), planner)
    assert set(state) == {"m", "n"} and state["n"] == {"x": [1, "s"]}, _broke(
        "state_dict_loader._load_state_dict / default_planner._EmptyStateDictLoadPlanner", "no longer fill the dict"
    )
    assert torch.equal(state["m"]["w"], torch.arange(4.0)), _broke("_EmptyStateDictLoadPlanner", "changed the tensor")


def test_dcp_metadata_path_is_the_metadata_file(dcp_checkpoint):
    from torch.distributed.checkpoint import FileSystemReader

    path = compat.dcp_metadata_path(FileSystemReader(dcp_checkpoint), None)
    assert os.fspath(path) == os.fspath(dcp_checkpoint / ".metadata"), _broke(
        "FileSystemReader._get_metadata_path", f"now gives {path!r}"
    )


def test_dcp_writer_process_global(monkeypatch):
    from torch.distributed.checkpoint import _async_process_executor as executor

    assert hasattr(executor, "_CHECKPOINT_PROCESS"), _broke("_async_process_executor._CHECKPOINT_PROCESS", "is gone")
    handle = object()
    monkeypatch.setattr(executor, "_CHECKPOINT_PROCESS", handle)
    assert compat.dcp_writer_process() is handle, _broke("_async_process_executor._CHECKPOINT_PROCESS", "changed")
    compat.forget_dcp_writer_process()
    assert executor._CHECKPOINT_PROCESS is None and compat.dcp_writer_process() is None


def test_dcp_writer_process_handle_reads_its_os_process():
    """A handle's ``_save_process`` is what both ``__del__`` (closing) and ftrain (alive or not) look at."""
    from torch.distributed.checkpoint._async_process_executor import _AsyncCheckpointProcess

    class OsProcess:
        def __init__(self, alive: bool) -> None:
            self.alive = alive

        def is_alive(self) -> bool:
            return self.alive

        def join(self, timeout: float | None = None) -> None:  # multiprocessing.Process's, as closing uses it
            pass

        def kill(self) -> None:
            self.alive = False

    assert "self._save_process = " in inspect.getsource(_AsyncCheckpointProcess.__init__), _broke(
        "_AsyncCheckpointProcess._save_process", "is gone"
    )
    for alive in (True, False):
        handle = object.__new__(_AsyncCheckpointProcess)
        handle._save_process = OsProcess(alive)
        assert compat.dcp_writer_process_alive(handle) is alive, _broke("_AsyncCheckpointProcess._save_process", "changed")
        handle._save_process.alive = False  # what __del__ (here and at collection) finds: nothing left to stop
    try:
        compat.close_dcp_writer_process(handle)  # __del__ of a handle whose process has ended: nothing to do
    except AttributeError as exc:
        pytest.fail(_broke("_AsyncCheckpointProcess.__del__", f"no longer goes by _save_process ({exc})"))
    assert "__del__" in vars(_AsyncCheckpointProcess), _broke("_AsyncCheckpointProcess.__del__", "is gone")


# ------------------------------------------------------------------------------------------------ startup


def test_dynamo_is_there_to_preload():
    import importlib.util

    assert importlib.util.find_spec("torch._dynamo") is not None, _broke("torch._dynamo", "is gone")


# ------------------------------------------------------------------------------------------------ process groups


def test_fake_process_group_runs_collectives_without_peers():
    import torch.distributed as dist

    try:
        compat.init_fake_process_group(rank=1, world_size=4)
    except (ImportError, ValueError, RuntimeError) as exc:
        pytest.fail(_broke("torch.testing._internal.distributed.fake_pg", f"cannot make a 'fake' group ({exc})"))
    try:
        assert (dist.get_rank(), dist.get_world_size()) == (1, 4)
        dist.all_reduce(torch.ones(3))  # completes at once: no peer is there to wait for
    finally:
        dist.destroy_process_group()
    assert not dist.is_initialized()


def test_dcp_writer_planning_asks_metadata_exists(tmp_path):
    """``CheckpointWriter`` answers DCP's ``FileSystemWriter._metadata_exists`` itself (no request per rank per save
    on an object store): planning must still ask that hook, not the file system directly."""
    import warnings

    from torch.distributed.checkpoint.planner import SavePlan

    from ftrain.checkpoint.writer import CheckpointWriter

    (tmp_path / ".metadata").write_bytes(b"old")
    writer = CheckpointWriter(tmp_path)
    writer.set_up_storage_writer(True, rank=0, use_collectives=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        writer.prepare_local_plan(SavePlan([]))
    # the hook it overrides is the one DCP's own writer consults: without the override the warning comes
    plain = torch.distributed.checkpoint.FileSystemWriter(tmp_path)
    plain.set_up_storage_writer(True, rank=0, use_collectives=True)
    with pytest.warns(UserWarning, match="existing checkpoint"):
        plain.prepare_local_plan(SavePlan([]))
    assert hasattr(torch.distributed.checkpoint.FileSystemWriter, "_metadata_exists"), _broke(
        "FileSystemWriter._metadata_exists", "is gone"
    )
