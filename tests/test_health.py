"""No poisoned commit, and rollback past an unhealthy step: the recipe with its debug hooks, and the public API."""

from __future__ import annotations

import math
import os
import random
import shutil
import statistics

import pytest
import torch
import torch.nn as nn

import ftrain
from ftrain import tags
from ftrain.checkpoint import layout
from ftrain.checkpoint.local import default_directory
from ftrain.checkpoint.reader import differing_tensors
from ftrain.health import EXIT_UNHEALTHY, HealthMonitor, HealthPolicy, UnhealthyError, spike_limit

from conftest import (
    REPO,
    Job,
    assert_same_tensors,
    check_ok,
    checkpoint_tensors,
    kill_job,
    run_train,
    scalars,
    snapshot_held,
    start_train,
    train_cmd,
    wait_for,
)
from ftrain.run_status import read_status
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


# A spike at step 13 (rank 0's loss x 100): with 10+ healthy losses in the window it is judged a spike and the run
# rolls back to step 10. Killed after step 12, a resumed run must judge it the same way.
SPIKE = ("train.spike_factor=3", "debug.spike_at_steps=[13]", "checkpoint.local_interval=1", "log.interval=1")
PAUSE_AT_12 = {"FTRAIN_FAULT": "after_local_snapshot@12", "FTRAIN_FAULT_SECONDS": "600"}
ROLLED_BACK = "rollback: step 13 was unhealthy (loss"
RESTORED = "restored step 10, skipped 4 batch(es)"
# An older ftrain: the progress state without the health window (the recipe run through this wrapper).
WITHOUT_WINDOW = """import runpy, sys
from ftrain.state import TrainProgress
save = TrainProgress.state_dict
TrainProgress.state_dict = lambda self: {k: v for k, v in save(self).items() if k != "health"}
sys.argv[0] = RECIPE
runpy.run_path(RECIPE, run_name="__main__")
"""


@pytest.fixture(scope="module")
def spike_reference(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("spike-reference")
    proc = run_train(run_dir, *SPIKE)
    check_ok(proc)
    assert proc.stderr.count(ROLLED_BACK) == 1 and RESTORED in proc.stderr, proc.stderr[-3000:]
    return run_dir


def _kill_after_step_12(run_dir, wrapper=None):
    """SIGKILL the job with step 12 done (its local snapshots complete), one step before the spike."""
    if wrapper is None:
        proc = start_train(run_dir, *SPIKE, env=PAUSE_AT_12)
    else:
        command = [str(wrapper) if arg.endswith("train.py") else arg for arg in train_cmd(run_dir, *SPIKE)]
        environment = {**os.environ, **PAUSE_AT_12}
        proc = Job(command, cwd=REPO, env=environment)
    try:
        wait_for(lambda: (read_status(run_dir) or 0) and read_status(run_dir).step >= 12, what="step 12", proc=proc)
        wait_for(lambda: _both_ranks_hold_snapshot(run_dir, 12), what="step 12's snapshots", proc=proc)
    finally:
        kill_job(proc)
    assert layout.latest_complete(run_dir / "checkpoints").step == 10


def _both_ranks_hold_snapshot(run_dir, step):
    ranks = sorted(default_directory(run_dir).glob("rank-*"))
    return len(ranks) == 2 and snapshot_held(ranks, step)


def _health_keys(run_dir, step):
    """The spike window's entries in a durable checkpoint (from DCP's metadata)."""
    from torch.distributed.checkpoint import FileSystemReader

    metadata = FileSystemReader(str(layout.step_dir(run_dir / "checkpoints", step))).read_metadata()
    return sorted(key for key in metadata.state_dict_metadata if key.startswith("train.health."))


def _final_tensors(run_dir):
    return checkpoint_tensors(run_dir / layout.step_dir("checkpoints", 20))


@pytest.mark.parametrize("tier", ["local", pytest.param("durable", marks=pytest.mark.soak)])
def test_a_job_killed_before_a_spike_rolls_back_as_the_uninterrupted_one(tier, spike_reference, tmp_path):
    """The spike detector's window is saved with the progress state: resumed from step 12's local snapshot, or
    from the durable step 10 (the snapshots gone), the run still judges step 13 a spike and rolls back to 10."""
    _kill_after_step_12(tmp_path)
    assert _health_keys(tmp_path, 10) == ["train.health.rank_0", "train.health.rank_1"]
    if tier == "durable":
        shutil.rmtree(default_directory(tmp_path))
    proc = run_train(tmp_path, *SPIKE)
    check_ok(proc)
    resumed = "resumed from the local snapshot of step 12" if tier == "local" else "step_00000010 (step 10)"
    assert resumed in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.count(ROLLED_BACK) == 1 and RESTORED in proc.stderr, proc.stderr[-3000:]
    assert scalars(tmp_path / "tb", tags.LOSS) == scalars(spike_reference / "tb", tags.LOSS)
    assert_same_tensors(_final_tensors(tmp_path), _final_tensors(spike_reference))


# The control of the test above (soak); that an old checkpoint without the window loads is
# test_train_progress_saves_and_restores_the_spike_window's, in CI.
@pytest.mark.soak
def test_control_a_checkpoint_without_the_window_misses_the_spike(spike_reference, tmp_path):
    """The same kill, but step 10 was saved without the window (as an older ftrain did): it still loads, the window
    starts empty, step 13 finds only 2 healthy losses before it, and the spike goes into the weights."""
    wrapper = tmp_path.parent / f"{tmp_path.name}-without-window.py"
    wrapper.write_text(WITHOUT_WINDOW.replace("RECIPE", repr(str(REPO / "recipes" / "train.py"))))
    _kill_after_step_12(tmp_path, wrapper)
    assert _health_keys(tmp_path, 10) == []
    shutil.rmtree(default_directory(tmp_path))
    proc = run_train(tmp_path, *SPIKE)
    check_ok(proc)
    assert "step_00000010 (step 10)" in proc.stderr and "debug.spike_at_steps" in proc.stderr, proc.stderr[-3000:]
    assert "rollback" not in proc.stderr
    assert differing_tensors(_final_tensors(tmp_path), _final_tensors(spike_reference))


# ------------------------------------------------------------------------------------------ the public API
def test_spike_detection_uses_the_median_of_recent_healthy_losses():
    monitor = HealthMonitor(HealthPolicy(spike_factor=3.0))
    for loss in [2.0] * 9:
        assert monitor.judge(loss, 1.0) == ""
        monitor.record(loss)
    assert monitor.judge(100.0, 1.0) == ""  # fewer than MIN_HISTORY losses: no verdict on spikes yet
    monitor.record(2.0)
    assert "above the median 2 of the last 10 healthy losses, more than max((3 - 1) x |median|, 6 robust std) = 4" in (
        monitor.judge(6.5, 1.0)
    )
    assert monitor.judge(5.9, 1.0) == ""
    assert "gradient norm is inf" in monitor.judge(2.0, float("inf"))
    assert "loss is nan" in monitor.judge(float("nan"), None)
    assert HealthPolicy().batches_to_skip(failed_step=30, restored_step=20) == 11
    assert HealthPolicy(rollback_skip_batches=4).batches_to_skip(30, 20) == 4


def _verdicts(losses, factor=3.0):
    """Judge each loss as a run would (healthy ones join the window); the indices of those flagged."""
    monitor = HealthMonitor(HealthPolicy(spike_factor=factor))
    flagged = []
    for index, loss in enumerate(losses):
        if monitor.judge(loss, None):
            flagged.append(index)
        else:
            monitor.record(loss)
    return flagged


def test_negative_losses_are_never_spikes_near_their_median_and_are_when_they_jump():
    """A log-likelihood objective: every healthy step used to be "above 3 x the recent median -2.045"."""
    rng = random.Random(0)
    healthy = [-2.0 + rng.gauss(0, 0.05) for _ in range(2000)]
    assert _verdicts(healthy) == []
    assert _verdicts([-2.045] * 10 + [-2.1, -1.9, 0.0, 2.0]) == []  # within (3 - 1) x |median| of the median
    assert _verdicts([-2.045] * 10 + [2.2]) == [10]
    assert _verdicts(healthy[:50] + [3.0]) == [50]
    monitor = HealthMonitor(HealthPolicy(spike_factor=3.0))
    for loss in [-2.0] * 10:
        monitor.record(loss)
    assert "5 is a spike: 7 above the median -2 of the last 10 healthy losses" in monitor.judge(5.0, None)


def test_losses_around_zero_are_judged_against_their_noise():
    rng = random.Random(1)
    noise = [rng.gauss(0, 0.01) for _ in range(5000)]
    assert _verdicts(noise) == []
    assert _verdicts([0.001 + x for x in noise[:3000]], factor=2.0) == []
    assert _verdicts([0.001 + x for x in noise[:3000]], factor=1.5) == []
    assert _verdicts(noise[:50] + [0.2]) == [50]  # 20 standard deviations up
    assert _verdicts(noise[:50] + [0.03]) == []  # 3 standard deviations: noise, not a spike
    median, limit = spike_limit(noise[:50], 3.0)
    assert 0.04 < limit < 0.08 and abs(median) < 0.005  # 6 robust std, not (3 - 1) x |median|


@pytest.mark.parametrize("seed", range(5))
def test_positive_losses_keep_the_documented_rule(seed):
    """Above factor x the median of the window, for positive losses whose level is well above their noise."""
    rng = random.Random(seed)
    for _ in range(200):
        level = rng.uniform(0.01, 50.0)
        window = [level * rng.uniform(0.95, 1.05) for _ in range(rng.randint(10, 50))]
        factor = rng.choice([1.5, 2.0, 3.0, 10.0])
        monitor = HealthMonitor(HealthPolicy(spike_factor=factor))
        for loss in window:
            monitor.record(loss)
        median = statistics.median(window)
        for loss in (factor * median * 0.999, factor * median * 1.001, rng.uniform(0, 3 * factor * level)):
            assert bool(monitor.judge(loss, None)) == (loss > factor * median), (window, factor, loss)


def test_a_noisy_positive_loss_is_not_flagged_by_its_noise():
    rng = random.Random(2)
    noisy = [abs(rng.gauss(1.0, 0.3)) for _ in range(3000)]
    assert _verdicts(noisy, factor=1.5) == []  # the old rule, loss > 1.5 x median, flagged 208 of them
    assert _verdicts(noisy[:50] + [4.0]) == [50]


def test_the_spike_window_is_state():
    policy = HealthPolicy(spike_factor=3.0, spike_window=5)
    monitor = HealthMonitor(policy)
    for loss in range(8):
        monitor.record(float(loss))
    assert monitor.state_dict() == {"losses": [3.0, 4.0, 5.0, 6.0, 7.0]}
    other = HealthMonitor(policy)
    other.load_state_dict({"losses": [float(x) for x in range(10)]})  # a longer window keeps its newest
    assert other.state_dict() == {"losses": [5.0, 6.0, 7.0, 8.0, 9.0]}
    other.clear()
    assert other.state_dict() == {"losses": []}


def _progress(monitor, world_size=1):
    from ftrain.state import TrainProgress

    return TrainProgress(None, None, 0, world_size, torch.device("cpu"), seed=0, health=monitor)


def _save_and_load(state, path, into):
    import torch.distributed.checkpoint as dcp

    from ftrain.checkpoint.safe_load import SafeLoadPlanner
    from ftrain.state import TrainProgress

    dcp.save({"train": state}, checkpoint_id=str(path), no_dist=True)
    planner = SafeLoadPlanner(TrainProgress.OPTIONAL_PREFIXES)
    dcp.load({"train": into.for_loading()}, checkpoint_id=str(path), no_dist=True, planner=planner)


def test_train_progress_saves_and_restores_the_spike_window(tmp_path):
    policy = HealthPolicy(spike_factor=3.0)
    saved = HealthMonitor(policy)
    for loss in [-2.5, -2.25, 0.125]:
        saved.record(loss)
    progress = _progress(saved)
    progress.step = 7
    loaded = HealthMonitor(policy)
    loaded.record(99.0)
    _save_and_load(progress, tmp_path / "new", into=_progress(loaded))
    assert loaded.state_dict() == {"losses": [-2.5, -2.25, 0.125]}

    # a checkpoint written before the window was saved still loads; the window starts empty
    old = progress.state_dict()
    del old["health"]
    loaded.record(99.0)
    restored = _progress(loaded)
    _save_and_load(old, tmp_path / "old", into=restored)
    assert restored.step == 7 and loaded.state_dict() == {"losses": []}

    # another world size: no entry for this rank's window, which starts empty too
    loaded.record(99.0)
    resharded = _progress(loaded, world_size=2)
    _save_and_load(progress, tmp_path / "new2", into=resharded)
    assert resharded.resharded_from == 1 and loaded.state_dict() == {"losses": []}


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
