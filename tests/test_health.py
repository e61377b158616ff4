"""No poisoned commit, and rollback past an unhealthy step: the recipe with its debug hooks, and the public API."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

import ftrain
from ftrain import tags
from ftrain.checkpoint import layout
from ftrain.health import EXIT_UNHEALTHY, HealthMonitor, HealthPolicy, UnhealthyError

from conftest import assert_same_tensors, check_ok, checkpoint_tensors, run_train, scalars
from test_ckpt_cli import ckpt


def _committed_steps(run_dir):
    return [d.step for d in layout.complete_steps(run_dir / "checkpoints")]


def _assert_every_committed_tensor_finite(run_dir):
    for step in _committed_steps(run_dir):
        verdict = ckpt("verify", layout.step_dir(run_dir / "checkpoints", step), "--values")
        assert verdict.returncode == 0 and "every value finite" in verdict.stdout, verdict.stdout


def test_nan_loss_rolls_back_and_two_runs_end_bit_identical(tmp_path):
    runs = []
    for name in ("first", "second"):
        proc = run_train(tmp_path / name, "debug.nan_at_steps=[12]", "log.interval=1")
        check_ok(proc)
        assert proc.stderr.count("rollback: step 12 was unhealthy") == 1, proc.stderr[-3000:]
        assert "restored step 10, skipped 3 batch(es)" in proc.stderr
        runs.append(tmp_path / name)
    for run_dir in runs:
        assert _committed_steps(run_dir)[-1] == 20
        _assert_every_committed_tensor_finite(run_dir)
        assert scalars(run_dir / "tb", tags.HEALTH_ROLLBACKS) == {10: 1.0}
        losses = scalars(run_dir / "tb", tags.LOSS)
        assert sorted(losses) == list(range(1, 21)) and all(math.isfinite(v) for v in losses.values())
    final = layout.step_dir("checkpoints", 20)
    assert_same_tensors(checkpoint_tensors(runs[0] / final), checkpoint_tensors(runs[1] / final))
    assert scalars(runs[0] / "tb", tags.LOSS) == scalars(runs[1] / "tb", tags.LOSS)


def test_a_poisoned_parameter_never_reaches_a_committed_checkpoint(tmp_path):
    """The NaN goes into a parameter after step 10's update, where the loss of step 10 was fine: step 10's save
    is refused by the writer, the refusal counts as unhealthy, and the run rolls back to step 5."""
    proc = run_train(tmp_path, "debug.poison_param_at_steps=[10]", nproc=0)
    check_ok(proc)
    assert "NonFiniteStateError" in proc.stderr and "restored step 5" in proc.stderr, proc.stderr[-3000:]
    assert _committed_steps(tmp_path)[-1] == 20
    _assert_every_committed_tensor_finite(tmp_path)


def test_on_unhealthy_stop_exits_with_its_code_and_keeps_the_last_healthy_checkpoint(tmp_path):
    proc = run_train(tmp_path, "debug.nan_at_steps=[12]", "train.on_unhealthy=stop", nproc=0)
    assert proc.returncode == EXIT_UNHEALTHY, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("ftrain:")]
    assert len(lines) == 1 and "step 12 unhealthy" in lines[0] and "Traceback" not in proc.stderr
    assert _committed_steps(tmp_path)[-1] == 10
    assert not (tmp_path / "LOCK").exists()


def test_verify_values_finds_a_nan_that_checksums_accept(tmp_path):
    model = nn.Linear(4, 4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with ftrain.Checkpointer(tmp_path, model=model, optimizer=optimizer, mode="sync") as checkpointer:
        checkpointer.load()
        checkpointer.save(1)
    step1 = layout.step_dir(tmp_path / "checkpoints", 1)
    assert ckpt("verify", step1, "--values").returncode == 0
    # a NaN written by something other than ftrain, with the checksum fixed up to match: only --values sees it
    import torch.distributed.checkpoint as dcp

    state = {"model": {k: v.clone() for k, v in model.state_dict().items()}}
    state["model"]["weight"][0, 0] = float("nan")
    dcp.save(state, checkpoint_id=str(tmp_path / "nan"), no_dist=True)
    from ftrain.checkpoint import integrity

    layout.write_marker(tmp_path / "nan", {"step": 1, "world_size": 1}, integrity.file_entries(tmp_path / "nan"))
    assert ckpt("verify", tmp_path / "nan").returncode == 0
    verdict = ckpt("verify", tmp_path / "nan", "--values")
    assert verdict.returncode == 1 and "model.weight" in verdict.stdout, verdict.stdout


# ------------------------------------------------------------------------------------------ the public API
def test_spike_detection_uses_the_median_of_recent_healthy_losses():
    monitor = HealthMonitor(HealthPolicy(spike_factor=3.0))
    for loss in [2.0] * 9:
        assert monitor.judge(loss, 1.0) == ""
        monitor.record(loss)
    assert monitor.judge(100.0, 1.0) == ""  # fewer than MIN_HISTORY losses: no verdict on spikes yet
    monitor.record(2.0)
    assert "above 3 x the recent median 2" in monitor.judge(6.5, 1.0)
    assert monitor.judge(5.9, 1.0) == ""
    assert "gradient norm is inf" in monitor.judge(2.0, float("inf"))
    assert "loss is nan" in monitor.judge(float("nan"), None)
    assert HealthPolicy().batches_to_skip(failed_step=30, restored_step=20) == 11
    assert HealthPolicy(rollback_skip_batches=4).batches_to_skip(30, 20) == 4


def test_user_loop_rolls_back_with_the_checkpointer(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    data = torch.randn(64, 8)
    checkpointer = ftrain.Checkpointer(tmp_path, model=model, optimizer=optimizer, interval=5, mode="sync")
    step = checkpointer.load()
    saved_at_5 = None
    poisoned = False
    while step < 12:
        loss = model(data).square().mean()
        if step + 1 == 8 and not poisoned:  # a bad batch: the loss blows up
            loss, poisoned = loss * float("inf"), True
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        step += 1
        checkpointer.maybe_save(step, loss=loss.item())
        if step == 5:
            saved_at_5 = {k: v.clone() for k, v in model.state_dict().items()}
        if not checkpointer.healthy:
            assert step == 8 and 8 not in _committed_steps(tmp_path)
            step = checkpointer.rollback()
            assert step == 5 and all(torch.equal(v, saved_at_5[k]) for k, v in model.state_dict().items())
    checkpointer.close()
    assert checkpointer.rollbacks == 1 and _committed_steps(tmp_path) == [5, 10]


def test_rollbacks_are_bounded(tmp_path):
    model = nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    checkpointer = ftrain.Checkpointer(
        tmp_path, model=model, optimizer=optimizer, interval=1, mode="sync", health=HealthPolicy(max_rollbacks=1)
    )
    checkpointer.load()
    checkpointer.maybe_save(1, loss=1.0)
    checkpointer.maybe_save(2, loss=float("nan"))
    assert checkpointer.rollback() == 1
    checkpointer.maybe_save(2, loss=float("nan"))
    with pytest.raises(UnhealthyError, match="after 1 rollback"):
        checkpointer.rollback()
    checkpointer.abort()


@pytest.mark.parametrize(
    "values, dtype, expected",
    [
        ([1.0, -2.0, 3.5], torch.float32, False),
        ([1.0, float("nan")], torch.float32, True),
        ([1.0, float("inf")], torch.float32, True),
        ([float("-inf"), float("inf")], torch.float32, True),
        ([3e38] * 10, torch.float32, False),  # the sum overflows, every value is finite
        ([60000.0] * 1000, torch.float16, False),  # float16's own sum would overflow
        ([1.0, float("inf")], torch.float16, True),
        ([float("nan")], torch.bfloat16, True),
        ([1e308] * 4, torch.float64, False),
        ([], torch.float32, False),
    ],
)
def test_the_writers_nonfinite_check(values, dtype, expected):
    """What the writer refuses to commit: NaN or Inf anywhere, never a finite tensor whose sum overflows."""
    from ftrain.checkpoint.writer import has_nonfinite

    tensor = torch.tensor(values, dtype=dtype)
    assert has_nonfinite(tensor) is expected
    assert has_nonfinite(tensor.reshape(-1, 1).t()) is expected  # not contiguous
