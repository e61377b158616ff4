"""Kill the real job (SIGKILL of every process) during a checkpoint, restart it, and demand bit-identical results."""

import os
import shutil
import signal

import pytest

from conftest import (
    assert_same_tensors,
    check_ok,
    checkpoint_tensors,
    kill_job,
    run_train,
    scalars,
    start_train,
    wait_for,
    worker_pids,
)


def assert_matches_reference(run_dir, reference_run):
    assert scalars(run_dir / "tb", "train/loss") == scalars(reference_run / "tb", "train/loss")
    assert_same_tensors(
        checkpoint_tensors(run_dir / "checkpoints" / "step_00000020"),
        checkpoint_tensors(reference_run / "checkpoints" / "step_00000020"),
    )


@pytest.mark.parametrize(
    "mode, threads",
    [  # every mode commits through the same path: CI kills the default one, the other modes and threads soak
        ("async", 1),
        pytest.param("sync", 1, marks=pytest.mark.soak),
        pytest.param("async_process", 1, marks=pytest.mark.soak),
        pytest.param("async", 3, marks=pytest.mark.soak),
    ],
    ids=lambda v: str(v),
)
def test_sigkill_after_data_is_durable_but_before_commit(mode, threads, reference_run, tmp_path):
    """The worst instant: every file of step 10 is on disk, only the marker is missing. (The local tier is off:
    this is about the durable path; tests/test_local_resume.py covers resuming from memory.)"""
    options = (f"checkpoint.mode={mode}", f"checkpoint.write_threads={threads}", "checkpoint.local_interval=0")
    step10 = tmp_path / "checkpoints" / "step_00000010"
    proc = start_train(tmp_path, *options, env={"FTRAIN_FAULT": "before_commit@10"})
    try:
        wait_for(lambda: (step10 / ".metadata").is_file(), what="step 10's data", proc=proc)
    finally:
        kill_job(proc)
    assert not (step10 / "COMPLETE").exists()
    step5 = tmp_path / "checkpoints" / "step_00000005"
    assert (step5 / "COMPLETE").is_file()
    assert len(list(step5.glob("*.distcp"))) == 2 * threads  # each rank writes one file per writer thread

    resumed = run_train(tmp_path, *options)
    check_ok(resumed)
    assert "step_00000005 (step 5)" in resumed.stderr
    assert_matches_reference(tmp_path, reference_run)
    # DCP's writer process announces its start (4 lines a rank), then stays quiet however many saves follow
    assert (resumed.stdout + resumed.stderr).count(" - root - INFO - ") <= 8


def test_sigkill_mid_write_with_data_workers(reference_run, tmp_path):
    """Kill as soon as step 15's directory appears (DCP is writing), with 2 data-loader workers per rank. The
    yardstick is the uninterrupted run without workers: they change neither the batches nor their order."""
    step15 = tmp_path / "checkpoints" / "step_00000015"
    proc = start_train(tmp_path, "data.num_workers=2")
    try:
        wait_for(step15.exists, what="step 15's directory", proc=proc)
    finally:
        kill_job(proc)
    resumed = run_train(tmp_path, "data.num_workers=2")
    check_ok(resumed)
    assert "resumed from" in resumed.stderr
    assert not any(p.name.endswith(".deleting") for p in (tmp_path / "checkpoints").iterdir())
    assert_matches_reference(tmp_path, reference_run)


def test_sigterm_saves_and_exits_then_resumes(reference_run, tmp_path):
    """Preemption: SIGTERM to one rank only; both agree, save the current step, exit 75; a rerun finishes."""
    proc = start_train(tmp_path, env={"FTRAIN_FAULT": "after_commit@5", "FTRAIN_FAULT_SECONDS": "3"})
    wait_for(lambda: (tmp_path / "checkpoints" / "step_00000005" / "COMPLETE").is_file(), proc=proc,
             what="step 5's commit")
    os.kill(worker_pids(proc)[1], signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert "exitcode  : 75" in err, err[-3000:]
    assert "stop requested (SIGTERM)" in err
    complete = sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if (p / "COMPLETE").is_file())
    stopped_at = int(complete[-1][5:])
    assert 5 < stopped_at < 20
    resumed = run_train(tmp_path)
    check_ok(resumed)
    assert f"(step {stopped_at})" in resumed.stderr
    assert_matches_reference(tmp_path, reference_run)


def test_sigterm_single_process_exit_code(tmp_path):
    proc = start_train(tmp_path, "train.max_steps=400", "checkpoint.interval=3", nproc=0)
    wait_for(lambda: (tmp_path / "checkpoints" / "step_00000003" / "COMPLETE").is_file(), proc=proc,
             what="the first commit")
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err[-3000:]
    latest = sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if (p / "COMPLETE").is_file())[-1]
    assert f"saving step {int(latest[5:])} and exiting" in err


@pytest.mark.parametrize("on_failure", ["continue", "abort"])
def test_failed_background_save_is_never_committed(on_failure, tmp_path):
    """A real I/O failure: a file sits where step 10's directory must go, so every rank's write fails."""
    (tmp_path / "checkpoints").mkdir(parents=True)
    (tmp_path / "checkpoints" / "step_00000010").write_text("in the way")
    proc = run_train(tmp_path, f"checkpoint.on_failure={on_failure}")
    assert "checkpoint step 10 FAILED on rank 0" in proc.stderr
    assert "step_00000010" in proc.stderr.split("FAILED on rank 0")[1].splitlines()[0]  # the cause names the path
    assert not (tmp_path / "checkpoints" / "step_00000010").is_dir()
    complete = sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if (p / "COMPLETE").is_file())
    if on_failure == "continue":
        check_ok(proc)
        assert complete == ["step_00000005", "step_00000015", "step_00000020"]
        assert scalars(tmp_path / "tb", "checkpoint/failures")[20] == 1.0
    else:
        assert proc.returncode != 0
        assert "checkpoint.on_failure=abort and a background save failed: writing" in proc.stderr
        assert complete == ["step_00000005"]


def test_resume_refuses_a_different_model_in_one_line(reference_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(reference_run, run_dir)
    proc = run_train(run_dir, "model.n_layer=3", nproc=1)
    assert proc.returncode != 0 and "(exitcode: 2)" in proc.stderr  # a config error; torchrun itself exits 1
    errors = [line for line in proc.stderr.splitlines() if line.startswith("ftrain: config error:")]
    assert len(errors) == 1 and "different model (n_layer: checkpoint 2, now 3)" in errors[0]


@pytest.mark.parametrize("resume, message", [("/nonexistent/step_00000005", "no such checkpoint directory"),
                                             ("7", "no complete checkpoint")])
def test_resume_from_a_missing_checkpoint_is_one_line(resume, message, tmp_path):
    proc = run_train(tmp_path, f"checkpoint.resume={resume}", nproc=0)
    assert proc.returncode == 2  # a config error
    errors = [line for line in proc.stderr.splitlines() if line.startswith("ftrain: config error:")]
    assert len(errors) == 1 and message in errors[0] and "Traceback" not in proc.stderr
