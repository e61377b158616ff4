"""CUDA paths (NCCL, pinned-memory staging, FSDP2 on GPU). CI has no GPU: these skip there, and run where one is."""

import pytest
import torch

from conftest import check_ok, run_train, scalars

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def test_gpu_run_checkpoints_and_resumes(tmp_path):
    nproc = min(torch.cuda.device_count(), 2)
    check_ok(run_train(tmp_path, "train.device=cuda", "train.max_steps=10", nproc=nproc))
    assert (tmp_path / "checkpoints" / "step_00000010" / "COMPLETE").is_file()
    resumed = run_train(tmp_path, "train.device=cuda", "train.max_steps=20", nproc=nproc)
    check_ok(resumed)
    assert "(step 10)" in resumed.stderr
    assert sorted(scalars(tmp_path / "tb", "train/loss")) == list(range(1, 21))
