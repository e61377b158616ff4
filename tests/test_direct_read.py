"""SafeFileSystemReader reads whole tensor items straight into their targets (ftrain.checkpoint.direct_read) and
leaves everything else to DCP's own path; both give the same tensors."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.distributed.checkpoint as dcp

from ftrain.checkpoint import direct_read, layout, safe_load, sums
from ftrain.checkpoint.errors import describe_error
from ftrain.checkpoint.safe_load import SafeFileSystemReader, SafeLoadPlanner

warnings.filterwarnings("ignore", message="torch.distributed is disabled")


def saved(tmp_path) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    state = {
        "f32": torch.randn(300, 7),
        "bf16": torch.randn(64).to(torch.bfloat16),
        "i64": torch.arange(-5, 50),
        "scalar": torch.tensor(3.25),
        "empty": torch.empty(0, 4),
        "flags": torch.tensor([True, False, True]),
    }
    dcp.save({"s": state}, checkpoint_id=str(tmp_path))
    return state


def load(tmp_path, target: dict[str, torch.Tensor]) -> None:
    dcp.load({"s": target}, storage_reader=SafeFileSystemReader(str(tmp_path)), planner=SafeLoadPlanner())


def test_whole_tensors_are_read_into_their_targets_bit_for_bit(tmp_path, monkeypatch):
    state = saved(tmp_path)
    calls = {"direct": 0, "dcp": 0}
    real_direct, real_dcp = direct_read.read_into_target, torch.distributed.checkpoint.FileSystemReader.read_data

    def counted_direct(*args):
        done = real_direct(*args)
        calls["direct"] += done
        return done

    def counted_dcp(self, plan, planner):
        calls["dcp"] += len(plan.items)
        return real_dcp(self, plan, planner)

    monkeypatch.setattr(direct_read, "read_into_target", counted_direct)
    monkeypatch.setattr(torch.distributed.checkpoint.FileSystemReader, "read_data", counted_dcp)
    target = {key: torch.full_like(value, 7) if value.numel() else torch.empty_like(value) for key, value in state.items()}
    pointers = {key: value.data_ptr() for key, value in target.items()}
    load(tmp_path, target)
    assert calls == {"direct": sum(1 for value in state.values() if value.numel()), "dcp": 0}  # an empty one has nothing to read
    for key, value in state.items():
        assert target[key].dtype == value.dtype and torch.equal(target[key], value), key
        assert target[key].data_ptr() == pointers[key]  # restored in place


def test_a_target_that_does_not_qualify_goes_through_dcps_path(tmp_path):
    state = saved(tmp_path)
    target = {key: torch.zeros_like(value) for key, value in state.items()}
    target["f32"] = torch.zeros(7, 300).t()  # same shape, not contiguous
    load(tmp_path, target)
    assert not target["f32"].is_contiguous()
    for key, value in state.items():
        assert torch.equal(target[key], value), key


def test_a_file_cut_short_is_an_error_not_a_partial_tensor(tmp_path):
    state = saved(tmp_path)
    data = next(tmp_path.glob("*.distcp"))
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    target = {key: torch.zeros_like(value) for key, value in state.items()}
    with pytest.raises(BaseException) as failure:  # DCP's CheckpointException derives from BaseException
        load(tmp_path, target)
    assert not isinstance(failure.value, (KeyboardInterrupt, SystemExit))


# ------------------------------------------------------------------------------ checksums while loading
def _sums(tmp_path, algorithm: str) -> dict[str, tuple[str, str]]:
    return {path.name: (algorithm, sums.file_sum(path, algorithm)) for path in tmp_path.glob("*.distcp")}


def _load_verified(tmp_path, target: dict, expected: dict) -> None:
    reader = SafeFileSystemReader(str(tmp_path), expected_sums=expected)
    dcp.load({"s": target}, storage_reader=reader, planner=SafeLoadPlanner())


def _flip(path, offset: int) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 0x10
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("algorithm", [layout.XXH3, layout.CRC32])
def test_data_files_are_summed_while_read_once(tmp_path, monkeypatch, algorithm):
    """Every byte of the file goes through the sum once, in the one pass that loads it (the empty tensor, which
    DCP does not read, included)."""
    state = saved(tmp_path)
    dcp.save({"s": {**state, "note": {"epoch": 3}}}, checkpoint_id=str(tmp_path))  # a bytes item among the tensors
    expected = _sums(tmp_path, algorithm)
    fed = []

    class Counting(sums.Summer):
        def update(self, data):
            fed.append(len(memoryview(data).cast("B")))
            super().update(data)

    monkeypatch.setattr(safe_load, "Summer", Counting)
    target = {**{key: torch.zeros_like(value) for key, value in state.items()}, "note": {"epoch": 0}}
    _load_verified(tmp_path, target, expected)
    assert sum(fed) == sum(path.stat().st_size for path in tmp_path.glob("*.distcp"))
    assert target["note"] == {"epoch": 3} and all(torch.equal(target[key], value) for key, value in state.items())


@pytest.mark.parametrize("where", ["tensor payload", "archive header", "bytes item"])
def test_a_changed_byte_fails_the_load_before_any_bytes_item_is_parsed(tmp_path, monkeypatch, where):
    state = saved(tmp_path)
    dcp.save({"s": {**state, "note": {"epoch": 3}}}, checkpoint_id=str(tmp_path))
    expected = _sums(tmp_path, layout.XXH3)
    reader = SafeFileSystemReader(str(tmp_path))
    infos = reader.read_metadata().storage_data
    f32 = next(info for index, info in infos.items() if index.fqn == "s.f32")
    note = next(info for index, info in infos.items() if index.fqn == "s.note.epoch")
    offset = {"tensor payload": f32.offset + f32.length - 100, "archive header": f32.offset + 40,
              "bytes item": note.offset + note.length // 2}[where]
    _flip(tmp_path / f32.relative_path, offset)
    parsed = []
    monkeypatch.setattr(SafeLoadPlanner, "load_bytes", lambda self, item, value: parsed.append(item))
    target = {**{key: torch.zeros_like(value) for key, value in state.items()}, "note": {"epoch": 0}}
    with pytest.raises(BaseException) as failure:  # DCP's CheckpointException derives from BaseException
        _load_verified(tmp_path, target, expected)
    assert "fails its checksum" in describe_error(failure.value), describe_error(failure.value)
    assert parsed == []


def test_a_file_read_in_part_is_summed_whole(tmp_path, monkeypatch):
    """Loading some of a file's items (another world size): the file is still verified, by a read of its own."""
    state = saved(tmp_path)
    expected = _sums(tmp_path, layout.XXH3)
    target = {"f32": torch.zeros_like(state["f32"])}
    _load_verified(tmp_path, target, expected)
    assert torch.equal(target["f32"], state["f32"])
    data = next(tmp_path.glob("*.distcp"))
    _flip(data, data.stat().st_size - 10)  # far from f32's bytes
    with pytest.raises(BaseException) as failure:
        _load_verified(tmp_path, {"f32": torch.zeros_like(state["f32"])}, expected)
    assert "fails its checksum" in describe_error(failure.value)
