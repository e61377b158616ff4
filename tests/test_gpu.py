"""CUDA paths (NCCL, pinned-memory staging, FSDP2 on GPU). CI has no GPU: these skip there, and run where one is."""

import signal

import psutil
import pytest
import torch

from conftest import check_ok, run_train, scalars, start_train, wait_for, worker_pids
from ftrain.run_status import read_status

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


def test_pinned_staging_waits_for_queued_work_and_reuses_buffers():
    """The side-stream copy must see what the training stream queued before ``stage`` (here: a fill that
    only runs after a long GPU spin), land in pinned buffers, and reuse them at the next save."""
    from ftrain.checkpoint.staging import BufferStager

    stager = BufferStager(pin_memory=True)
    weight = torch.zeros(16 << 20, device="cuda")
    try:
        torch.cuda._sleep(200_000_000)  # keeps the training stream busy for a while
        weight.fill_(3.0)
        first = stager.stage({"w": weight}).result()["w"]
        assert first.is_pinned() and first.device.type == "cpu"
        assert bool((first == 3.0).all()), "staging copied before the queued work had run"
        weight.fill_(4.0)
        second = stager.stage({"w": weight}).result()["w"]
        assert second.data_ptr() == first.data_ptr() and bool((second == 4.0).all())
    finally:
        stager.close()


def test_local_snapshot_of_device_state_is_pinned_waits_for_queued_work_and_restores(tmp_path):
    """The tier copies device state on a side stream of the state's own device into page-locked slots, after
    the work the training stream had queued (a fill behind a long GPU spin), and restores it bit for bit."""
    from ftrain.checkpoint.local import LocalSnapshots

    class State:
        def __init__(self, tensor):
            self.tensor = tensor

        def state_dict(self):
            return {"w": self.tensor}

        def load_state_dict(self, state):
            self.tensor = state["w"]

    device = torch.device("cuda", torch.cuda.device_count() - 1)  # not necessarily the first GPU
    with torch.cuda.device(device):
        weight = torch.zeros(16 << 20, device=device)
        tier = LocalSnapshots(tmp_path, 0, 1, {"run": "gpu"})
        try:
            torch.cuda._sleep(200_000_000)
            weight.fill_(3.0)
            tier.snapshot(1, {"t": State(weight)})
            tier.wait()
            tier._finish()
            assert tier.disabled is None, tier.disabled
            buffers = list(tier._slots.buffers.values())
            assert buffers and all(buffer.is_pinned() for buffer in buffers)
            assert tier._stream.device == device
            restored = State(None)
            tier.restore(1, {"t": restored})
            assert restored.tensor.device == device and bool((restored.tensor == 3.0).all())
        finally:
            tier.close()


def test_warm_restart_on_cuda_forks_a_training_process_that_uses_the_gpu(tmp_path):
    """The warm parent never touches CUDA (no rehearsal on CUDA, no device query before the fork), so the training
    process it forks after one is SIGKILLed initialises CUDA itself and trains on in the same torchrun round."""
    nproc = min(torch.cuda.device_count(), 2)
    options = ("train.device=cuda", "train.max_steps=60", "checkpoint.interval=20", "checkpoint.local_interval=1")
    proc = start_train(tmp_path, *options, nproc=nproc)
    wait_for(lambda: (read_status(tmp_path) or 0) and read_status(tmp_path).step >= 10, what="step 10", proc=proc)
    victim = psutil.Process(worker_pids(proc)[0]).children()[0]
    assert victim.name() == "ftrain-train"
    victim.send_signal(signal.SIGKILL)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-4000:]
    assert "rank 0: training process ended (signal SIGKILL)" in err and "(generation 1)" in err, err[-4000:]
    assert "Restarting" not in err  # torchrun never started a new round
    assert (tmp_path / "checkpoints" / "step_00000060" / "COMPLETE").is_file()
    assert sorted(set(scalars(tmp_path / "tb", "train/loss"))) == list(range(1, 61))
