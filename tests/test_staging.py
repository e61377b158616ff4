"""The save path's parts on their own: the staging copy, checksums taken while writing, the plan cache."""

import json
import os
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed.checkpoint as dcp

from ftrain.checkpoint import integrity, layout, sums, writer
from ftrain.checkpoint.storage import posix
from ftrain.checkpoint.compat import RunSignature
from ftrain.checkpoint.manager import CheckpointManager
from ftrain.config import CheckpointConfig
from ftrain.distributed import DistContext
from ftrain.checkpoint.staging import BufferStager


def test_staged_copy_is_a_snapshot_in_reused_buffers():
    stager = BufferStager()
    weight = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    state = {"w": weight, "t": weight.t(), "nested": {"items": [torch.ones(2), 7, b"blob"], "name": "x"}}
    try:
        first = stager.stage(state).result()
        assert torch.equal(first["w"], weight) and torch.equal(first["t"], weight.t())
        assert first["nested"]["items"][1:] == [7, b"blob"] and first["nested"]["name"] == "x"
        weight.add_(100)  # training goes on: the staged copy must not change
        assert first["w"][0, 0].item() == 0.0
        second = stager.stage(state).result()
        assert second["w"].data_ptr() == first["w"].data_ptr(), "the buffer was not reused"
        assert second["w"][0, 0].item() == 100.0
        state["w"] = torch.zeros(5)  # another shape at the same place: a new buffer
        assert stager.stage(state).result()["w"].shape == (5,)
        assert stager.buffer_bytes == (5 + 12 + 2) * 4
        del state["t"]  # an entry the state no longer has: its buffer goes
        stager.stage(state).result()
        assert stager.buffer_bytes == (5 + 2) * 4
    finally:
        stager.close()


def test_staging_lets_the_training_thread_run():
    """DCP's stager holds the GIL for each storage's whole copy; this one must not (Tensor.copy_ releases it)."""
    big = {"w": torch.ones(128 << 20)}  # 512 MB: the copy takes tens of ms
    stager = BufferStager()
    try:
        stager.stage(big).result()  # allocate (and fault in) the buffers first
        largest_gap, started = 0.0, time.perf_counter()
        future = stager.stage(big)
        last = time.perf_counter()
        while not future.done():
            now = time.perf_counter()
            largest_gap, last = max(largest_gap, now - last), now
        took = time.perf_counter() - started
    finally:
        stager.close()
    assert took > 0.02, f"copy too quick ({took * 1e3:.1f} ms) to tell anything"
    assert largest_gap < took / 2, f"training thread stalled {largest_gap * 1e3:.1f} ms of a {took * 1e3:.1f} ms copy"


_DTENSOR_SCRIPT = """
import torch, torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard, distribute_tensor
from ftrain.checkpoint.staging import BufferStager
dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
source = distribute_tensor(torch.randn(6, 4), init_device_mesh("cpu", (1,)), [Shard(0)])
staged = BufferStager().stage({"p": source}).result()["p"]
assert isinstance(staged, DTensor) and staged.placements == source.placements, staged
assert torch.equal(staged.to_local(), source.to_local())
assert staged.to_local().data_ptr() != source.to_local().data_ptr()
print("ok")
"""


def test_dtensors_stay_dtensors():
    proc = subprocess.run([sys.executable, "-c", _DTENSOR_SCRIPT], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]


@pytest.mark.parametrize("threads", [1, 3])
def test_checksums_are_taken_while_writing(threads, tmp_path, monkeypatch):
    read_back, hinted = [], []
    monkeypatch.setattr(posix, "file_sum", lambda path, algorithm=None: read_back.append(path) or "0" * 16)
    fadvise = os.posix_fadvise
    monkeypatch.setattr(os, "posix_fadvise", lambda *args: hinted.append(args) or fadvise(*args))
    state = {"a": torch.randn(1000), "big": torch.randn(3 << 20), "b": torch.arange(10), "blob": b"x" * 100}
    dcp.save(state, storage_writer=writer.CheckpointWriter(str(tmp_path), thread_count=threads), no_dist=True)
    monkeypatch.undo()
    assert not read_back, f"data files were read back: {read_back}"
    assert hinted, "the large tensor's write did not start early writeback"
    recorded = json.loads((tmp_path / integrity.CHECKSUMS).read_text())
    data_files = sorted(p.name for p in tmp_path.glob("*.distcp"))
    assert sorted(recorded) == data_files and len(data_files) == threads
    for name in data_files:
        assert recorded[name] == sums.file_sum(tmp_path / name, layout.XXH3)
    loaded = {"a": torch.zeros(1000), "big": torch.zeros(3 << 20), "b": torch.zeros(10, dtype=torch.long), "blob": b""}
    dcp.load(loaded, checkpoint_id=str(tmp_path), no_dist=True)
    assert all(torch.equal(loaded[k], state[k]) for k in ("a", "big", "b")) and loaded["blob"] == state["blob"]


def test_each_manager_has_its_own_plan_cache(tmp_path):
    """With plans cached, two managers saving different states in one process each load back what they saved."""

    def manager(name):
        ctx = DistContext(0, 1, torch.device("cpu"), None)
        return CheckpointManager(
            tmp_path / name, CheckpointConfig(mode="sync", keep_last=5, resume="3"), ctx, RunSignature(model=None)
        )

    small, large = manager("small"), manager("large")
    try:
        for step in (1, 2, 3):
            small.save(step, {"s": {"x": torch.full((3,), float(step))}})
            large.save(step, {"s": {"x": torch.full((5,), -float(step)), "y": torch.zeros(2)}})
            assert small.wait().ok and large.wait().ok
        target_small, target_large = {"s": {"x": torch.zeros(3)}}, {"s": {"x": torch.zeros(5), "y": torch.ones(2)}}
        small.load(target_small)
        large.load(target_large)
    finally:
        small.close()
        large.close()
    assert torch.equal(target_small["s"]["x"], torch.full((3,), 3.0))
    assert torch.equal(target_large["s"]["x"], torch.full((5,), -3.0)) and not target_large["s"]["y"].any()


def test_auto_write_threads_share_the_cores_among_local_ranks(monkeypatch):
    cores = len(os.sched_getaffinity(0))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(cores))
    assert writer.auto_write_threads() == 1  # training fills every core: one writer per rank
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert writer.auto_write_threads() == max(1, min(writer.MAX_AUTO_WRITE_THREADS, cores))


_SEND_DTENSOR = r"""
import os, sys, torch, torch.distributed as dist, torch.multiprocessing as mp
from torch.distributed.tensor import DTensor, DeviceMesh, Shard
from ftrain.checkpoint.staging import send_dtensors_by_local_tensor

def child(queue, answers):
    tensor = queue.get()
    answers.put((type(tensor).__name__, tensor.to_local().tolist(), str(tensor.placements), tensor.shape))
    tensor.to_local()[0] = 42.0  # the same pages: the sender sees it

if __name__ == "__main__":
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    if sys.argv[1] == "registered":
        send_dtensors_by_local_tensor()
    base = torch.zeros(64).share_memory_()
    local = base[16:20]  # a view at an offset, like the local tier's slot views
    local.copy_(torch.arange(4.0))
    tensor = DTensor.from_local(local, DeviceMesh("cpu", [0]), [Shard(0)], run_check=False)
    from multiprocessing.reduction import ForkingPickler
    ForkingPickler.dumps(tensor)  # what a queue does before sending (without the reducer: an error or a segfault)
    context = mp.get_context("spawn")
    queue, answers = context.Queue(), context.Queue()
    process = context.Process(target=child, args=(queue, answers))
    process.start()
    queue.put(tensor)
    print(answers.get(timeout=60), flush=True)
    process.join()
    print("sender sees", base[16].item(), flush=True)
    os._exit(0)
"""


def test_a_dtensor_over_an_offset_view_goes_to_another_process_by_its_local_tensor(tmp_path):
    """async_process hands the writer process DTensors whose local tensors are views into the local tier's slot
    at an offset; torch's own pickling of such a DTensor fails (or segfaults). With ftrain's reducer the other
    process gets the same DTensor over the same shared pages. The control, without it, must fail."""
    script = tmp_path / "send_dtensor.py"
    script.write_text(_SEND_DTENSOR)
    done = subprocess.run([sys.executable, str(script), "registered"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "('DTensor', [0.0, 1.0, 2.0, 3.0], '(Shard(dim=0),)', torch.Size([4]))" in done.stdout, done.stdout
    assert "sender sees 42.0" in done.stdout
    control = subprocess.run([sys.executable, str(script), "torch's own"], capture_output=True, text=True, timeout=120)
    assert control.returncode != 0, "torch pickles such a DTensor itself now: the reducer may no longer be needed"
