"""The local snapshot tier under the real recipe: a failure redoes at most a step, bit for bit; a damaged,
missing or foreign snapshot is never used."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from ftrain import tags
from ftrain.checkpoint import layout
from ftrain.checkpoint.local import default_directory

from conftest import (
    LOCAL_OPTIONS,
    REPO,
    assert_same_tensors,
    check_ok,
    checkpoint_tensors,
    kill_job,
    run_train,
    scalars,
    snapshot_held,
    start_train,
    wait_for,
)
from ftrain.run_status import read_status

# local_interval=1: the kills below wait for the snapshot of a given step (auto would pick its own steps)
OPTIONS = LOCAL_OPTIONS
PAUSE = {"FTRAIN_FAULT": "after_local_snapshot@13", "FTRAIN_FAULT_SECONDS": "600"}


@pytest.fixture(scope="module")
def reference(local_reference):
    assert not default_directory(local_reference).exists(), "a finished run keeps no local snapshots"
    return local_reference


def _kill_at_step_13(run_dir):
    """SIGKILL the whole job with step 13's local snapshot complete; the newest durable checkpoint is step 10."""
    proc = start_train(run_dir, *OPTIONS, env=PAUSE)
    wait_for(lambda: (read_status(run_dir) or 0) and read_status(run_dir).step >= 13, what="step 13", proc=proc)
    rank_dirs = sorted(default_directory(run_dir).glob("rank-*"))
    wait_for(lambda: snapshot_held(rank_dirs, 13),
             what="step 13's snapshot markers", proc=proc)
    kill_job(proc)
    assert layout.latest_complete(run_dir / "checkpoints").step == 10
    return rank_dirs


def _assert_same_as(run_dir, reference):
    assert scalars(run_dir / "tb", tags.LOSS) == scalars(reference / "tb", tags.LOSS)
    final = layout.step_dir("checkpoints", 30)
    assert_same_tensors(checkpoint_tensors(run_dir / final), checkpoint_tensors(reference / final))


def test_a_killed_job_resumes_from_the_local_snapshot_bit_for_bit(reference, tmp_path):
    _kill_at_step_13(tmp_path)
    proc = run_train(tmp_path, *OPTIONS)
    check_ok(proc)
    assert "resumed from the local snapshot of step 13" in proc.stderr, proc.stderr[-3000:]
    assert "0 step(s) redone" in proc.stderr
    assert scalars(tmp_path / "tb", tags.RECOVERY_STEPS_REDONE) == {14: 0.0}  # logged at the first step after
    _assert_same_as(tmp_path, reference)
    assert not default_directory(tmp_path).exists()
    # ftrain-report's goodput section reads the same records: one failure, its cost, the run's ETTR
    shown = subprocess.run([sys.executable, str(REPO / "tools" / "overhead_report.py"), str(tmp_path), "--json",
                            "--no-plot"], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert shown.returncode == 0, shown.stderr
    good = json.loads(shown.stdout)["goodput"]
    assert good["failures"] == 1 and good["at_steps"] == [14] and good["steps_redone"]["total"] == 0
    lost = scalars(tmp_path / "tb", tags.RECOVERY_TIME_LOST_S)[14]
    assert good["cost_per_failure_s"]["total"] == pytest.approx(lost)
    assert good["training_wall_s"] > lost and 0 < good["ettr"] < 1


def test_a_damaged_newest_snapshot_on_one_rank_makes_every_rank_take_the_one_before(reference, tmp_path):
    """Rank 1's snapshot of step 13 fails its checksum; both ranks still hold step 12 in their other slot."""
    rank_dirs = _kill_at_step_13(tmp_path)
    marker = next(p for p in rank_dirs[1].glob("slot-*.json") if '"step": 13' in p.read_text())
    data = marker.with_suffix(".data")
    content = bytearray(data.read_bytes())
    content[len(content) // 2] ^= 0xFF
    data.write_bytes(bytes(content))
    proc = run_train(tmp_path, *OPTIONS)
    check_ok(proc)
    assert "resumed from the local snapshot of step 12" in proc.stderr, proc.stderr[-3000:]
    _assert_same_as(tmp_path, reference)


def test_a_rank_without_snapshots_sends_every_rank_to_the_durable_checkpoint(reference, tmp_path):
    rank_dirs = _kill_at_step_13(tmp_path)
    shutil.rmtree(rank_dirs[1])  # e.g. rank 1 now runs on a node that never held its snapshots
    proc = run_train(tmp_path, *OPTIONS)
    check_ok(proc)
    assert "resumed from the local snapshot" not in proc.stderr
    assert "step_00000010 (step 10)" in proc.stderr, proc.stderr[-3000:]
    _assert_same_as(tmp_path, reference)


def test_a_snapshot_of_a_deleted_run_under_the_same_path_is_never_loaded(reference, tmp_path):
    _kill_at_step_13(tmp_path)
    kept = tmp_path.parent / "kept-snapshots"
    shutil.copytree(default_directory(tmp_path), kept)
    shutil.rmtree(tmp_path)  # the user deletes the run and starts it again from scratch
    shutil.copytree(kept, default_directory(tmp_path), dirs_exist_ok=True)
    proc = run_train(tmp_path, *OPTIONS)
    check_ok(proc)
    assert "resumed from the local snapshot" not in proc.stderr and "starting fresh" in proc.stderr
    _assert_same_as(tmp_path, reference)


def test_async_process_killed_while_its_writer_reads_the_lent_snapshot_resumes_bit_for_bit(reference, tmp_path):
    """async_process writes step 10 from the snapshot it lends the writer process (the same pages, by descriptor);
    that writer is held before its first byte while training goes on: snapshots 11-20 all go to the other slot,
    and the save of step 20 waits for step 10's. SIGKILL the whole job there: no durable checkpoint is complete,
    both slots are, and the run resumes from step 20 and ends bit for bit as the uninterrupted one."""
    options = (*OPTIONS, "checkpoint.mode=async_process")
    proc = start_train(tmp_path, *options, env={"FTRAIN_FAULT": "while_writing@10", "FTRAIN_FAULT_SECONDS": "600"})
    rank_dirs = [default_directory(tmp_path) / f"rank-{rank}" for rank in (0, 1)]
    wait_for(lambda: snapshot_held(rank_dirs, 20),
             what="step 20's snapshot markers", proc=proc)
    for rank_dir in rank_dirs:  # the lent slot still holds step 10
        assert sorted(json.loads(p.read_text())["step"] for p in rank_dir.glob("slot-*.json")) == [10, 20]
    kill_job(proc)
    assert layout.latest_complete(tmp_path / "checkpoints") is None
    resumed = run_train(tmp_path, *options)
    check_ok(resumed)
    assert "resumed from the local snapshot of step 20" in resumed.stderr, resumed.stderr[-3000:]
    assert "Traceback" not in resumed.stderr
    _assert_same_as(tmp_path, reference)
