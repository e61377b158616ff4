"""Every private torch symbol behind ``ftrain/_torch_compat.py`` still exists and does what ftrain relies on.

One test per function: after a torch upgrade, a failure here names the symbol that changed, instead of a local
snapshot or a staging copy going wrong somewhere downstream.
"""

from __future__ import annotations

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
        rebuilt = DTensor(shard, compat.dtensor_spec(dtensor), requires_grad=False)
        assert rebuilt.placements == dtensor.placements and torch.equal(rebuilt.full_tensor(), dtensor.full_tensor()), (
            _broke("DTensor._spec", "no longer rebuilds the DTensor with its local tensor")
        )
    finally:
        if started:
            dist.destroy_process_group()


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
