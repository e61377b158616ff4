"""SafeFileSystemReader reads whole tensor items straight into their targets (ftrain.checkpoint.direct_read) and
leaves everything else to DCP's own path; both give the same tensors."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.distributed.checkpoint as dcp

from ftrain.checkpoint import direct_read
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
