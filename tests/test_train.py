"""The recipe end to end, as a user runs it: real torchrun, real TensorBoard files."""

import os
import subprocess
import sys
import psutil
import pytest

from conftest import (
    REPO, assert_same_tensors, check_ok, checkpoint_tensors, kill_job, run_train, scalars, start_train, wait_for,
    worker_pids,
)
from ftrain.processes import descendants, nice
from ftrain.checkpoint.manager import WRITER_START_DIR
from ftrain.checkpoint.writer import WRITER_PROCESS_NICE


def test_two_ranks_log_every_step(reference_run):
    losses = scalars(reference_run / "tb", "train/loss")
    assert sorted(losses) == list(range(1, 21))
    assert losses[20] < losses[1]
    for tag in ("train/lr", "train/step_time_s", "train/tokens_per_s"):
        assert sorted(scalars(reference_run / "tb", tag)) == list(range(1, 21))
    assert (reference_run / "config.yaml").read_text().count("max_steps: 20") == 1


def test_checkpoint_scalars_are_logged(reference_run):
    for tag in ("checkpoint/blocking_s", "checkpoint/staging_s", "checkpoint/save_s", "checkpoint/size_bytes",
                "checkpoint/write_GBps"):
        assert sorted(scalars(reference_run / "tb", tag)) == [5, 10, 15, 20], tag
    assert all(v > 1e6 for v in scalars(reference_run / "tb", "checkpoint/size_bytes").values())


@pytest.mark.soak  # in CI every kill/resume test compares a second run of the same config with reference_run
def test_same_config_gives_identical_losses_and_weights(reference_run, tmp_path):
    check_ok(run_train(tmp_path))
    assert scalars(tmp_path / "tb", "train/loss") == scalars(reference_run / "tb", "train/loss")
    assert_same_tensors(
        checkpoint_tensors(tmp_path / "checkpoints" / "step_00000020"),
        checkpoint_tensors(reference_run / "checkpoints" / "step_00000020"),
    )


def test_retention_keeps_the_last_three(reference_run):
    names = sorted(p.name for p in (reference_run / "checkpoints").iterdir())
    assert names == ["step_00000010", "step_00000015", "step_00000020"]


def test_plain_python_runs_one_rank(tmp_path):
    proc = run_train(tmp_path, "train.max_steps=6", "checkpoint.interval=3", nproc=0)
    check_ok(proc)
    assert sorted(scalars(tmp_path / "tb", "train/loss")) == list(range(1, 7))
    assert (tmp_path / "checkpoints" / "step_00000006" / "COMPLETE").is_file()


def test_bad_key_is_one_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(REPO / "recipes" / "train.py"), f"run.dir={tmp_path}", "train.max_stepz=3"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "train.max_stepz" in lines[0], proc.stderr


def test_missing_data_path_is_one_line(tmp_path):
    proc = run_train(tmp_path, f"data.path={tmp_path}/nope", nproc=0)
    assert proc.returncode == 2  # bad configuration, found before anything is written
    lines = [line for line in proc.stderr.strip().splitlines() if line.startswith("ftrain:")]
    assert len(lines) == 1 and "does not exist" in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_writer_process_runs_at_lower_priority_than_training(tmp_path):
    """async_process: DCP's writer process (started before the first save) takes what CPU training leaves; the
    ranks keep their priority: the niceness they inherit (from this process, through torchrun), 0 unless the tests
    themselves run under nice."""
    proc = start_train(tmp_path, "checkpoint.mode=async_process", "train.max_steps=200")
    try:
        wait_for(lambda: (tmp_path / "checkpoints" / "step_00000005" / "COMPLETE").is_file(), what="first commit",
                 proc=proc)
        ranks = worker_pids(proc)
        writers = [pid for rank_pid in ranks.values() for pid in descendants(rank_pid)
                   if "spawn_main" in " ".join(psutil.Process(pid).cmdline())]
        assert len(ranks) == 2 and writers, f"ranks {ranks}, writer processes {writers}"
        inherited = nice(os.getpid())
        assert all(nice(pid) == inherited for pid in ranks.values()), (inherited, [nice(p) for p in ranks.values()])
        assert all(nice(pid) >= max(WRITER_PROCESS_NICE, inherited) for pid in writers), [nice(p) for p in writers]
        assert not (tmp_path / "checkpoints" / WRITER_START_DIR).exists(), "the writer's start-up save was left behind"
    finally:
        kill_job(proc)


def test_async_process_run_with_nothing_left_to_do_leaves_no_writer_start(tmp_path):
    """... and the writer process is stopped when the run ends: left to find a closed pipe after the trainer's
    os._exit, it printed an EOFError traceback at the end of every async_process run."""
    options = ("checkpoint.mode=async_process", "train.max_steps=5")
    first = run_train(tmp_path, *options)
    check_ok(first)
    again = run_train(tmp_path, *options)  # resumes at the last step: no save, but the writer process was started
    check_ok(again)
    assert "nothing to do" in again.stderr
    assert not (tmp_path / "checkpoints" / WRITER_START_DIR).exists()
    for proc in (first, again):
        assert "Traceback" not in proc.stderr and "EOFError" not in proc.stderr, proc.stderr[-2000:]
