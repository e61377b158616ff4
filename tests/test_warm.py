"""Warm restarts (train.warm_restarts): a SIGKILLed training process is replaced by a fork of its rank's warm
parent, not by a new torchrun round, and the run stays bit-identical to an uninterrupted one."""

from __future__ import annotations

import contextlib

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from conftest import (
    FAST,
    Job,
    REPO,
    TORCHRUN,
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

from ftrain.run_status import read_status

WARM = ("train.max_steps=60", "checkpoint.interval=20", "checkpoint.local_interval=1", "train.warm_restarts=2")


@pytest.fixture(scope="module")
def warm_reference(tmp_path_factory: pytest.TempPathFactory):
    """An uninterrupted run of WARM: the yardstick of every test here."""
    run_dir = tmp_path_factory.mktemp("warm-reference")
    check_ok(run_train(run_dir, *WARM))
    return run_dir


def assert_same_as(run_dir, reference) -> None:
    assert scalars(run_dir / "tb", "train/loss") == scalars(reference / "tb", "train/loss")
    assert_same_tensors(
        checkpoint_tensors(run_dir / "checkpoints" / "step_00000060"),
        checkpoint_tensors(reference / "checkpoints" / "step_00000060"),
    )


def test_killed_training_processes_are_forked_again_in_the_same_round(tmp_path, warm_reference):
    reference = warm_reference
    run_dir = tmp_path / "run"
    proc = start_train(run_dir, *WARM)
    wait_for(lambda: read_status(run_dir) is not None and read_status(run_dir).step >= 10, what="step 10", proc=proc)
    parents = worker_pids(proc)
    assert sorted(parents) == [0, 1]
    victim = psutil.Process(parents[1]).children()[0]  # rank 1's training process, forked by its warm parent
    victim.send_signal(signal.SIGKILL)
    killed_at = time.time()
    # then rank 0's, once the first replacement trains: a second failure takes generation 2
    wait_for(lambda: read_status(run_dir).step >= 25 and read_status(run_dir).resumed_from > 0, what="step 25", proc=proc)
    psutil.Process(parents[0]).children()[0].send_signal(signal.SIGKILL)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-4000:]
    assert "rank 1: training process ended (signal SIGKILL); forking a new one from the warm parent" in err
    assert "rank 0: training process ended (signal SIGKILL); forking a new one from the warm parent" in err
    assert "(generation 1)" in err
    # by the second failure rank 0's parent has rehearsed a step (after its first training process's first step)
    assert "in a fork of the warm parent, which had rehearsed a step (generation 2)" in err
    assert worker_pids(proc) == {} and "Restarting" not in err  # torchrun never started a new round
    assert all(psutil.pid_exists(pid) is False for pid in parents.values())
    assert scalars(run_dir / "tb", "train/loss") == scalars(reference / "tb", "train/loss")
    assert_same_tensors(
        checkpoint_tensors(run_dir / "checkpoints" / "step_00000060"),
        checkpoint_tensors(reference / "checkpoints" / "step_00000060"),
    )
    lost = scalars(run_dir / "tb", "recovery/time_lost_s")
    assert lost and min(lost.values()) < time.time() - killed_at + 60


def test_a_killed_warm_parent_takes_its_training_process_with_it(tmp_path):
    """The parent is what torchrun watches: SIGKILLing it (here with torchrun gone too, so nothing cleans up after
    it) must not leave its training process running."""
    proc = start_train(tmp_path, *WARM, "train.max_steps=400")
    parents: dict[int, int] = {}
    try:
        wait_for(lambda: (read_status(tmp_path) is not None and read_status(tmp_path).step >= 5), what="step 5", proc=proc)
        parents = worker_pids(proc)
        child = psutil.Process(parents[1]).children()[0]
        os.kill(proc.pid, signal.SIGKILL)  # torchrun first: nothing is left to clean up after the parent
        os.kill(parents[1], signal.SIGKILL)
        wait_for(lambda: not child.is_running() or child.status() == psutil.STATUS_ZOMBIE, timeout=10, what="the child's end")
    finally:
        for pid in [*parents.values(), *(c.pid for p in parents.values() if psutil.pid_exists(p) for c in psutil.Process(p).children())]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        kill_job(proc)


@pytest.mark.parametrize("action", ["raise", "stall"])
def test_an_exception_or_a_stall_on_one_rank_is_recovered_in_the_same_round(tmp_path, warm_reference, action):
    """An exception in rank 1's training process at step 15, or rank 1 stalling there past train.timeout_s (rank 0
    waits for it in a collective and fails): both ranks' training processes are forked again from their warm
    parents and the run ends as if nothing happened."""
    env = {"FTRAIN_FAULT": "step_done@15", "FTRAIN_FAULT_RANK": "1"}
    env["FTRAIN_FAULT_ACTION" if action == "raise" else "FTRAIN_FAULT_SECONDS"] = "raise" if action == "raise" else "600"
    proc = start_train(tmp_path, *WARM, "train.timeout_s=8", env=env)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-4000:]
    assert "in a fork of the warm parent, which had rehearsed a step (generation 1)" in err and "Restarting" not in err
    if action == "raise":
        assert "FTRAIN_FAULT: failing at step_done of step 15" in err
    else:  # rank 0 gave up on rank 1 after the timeout; rank 1's parent ended the stalled process
        assert "rank 0: training process ended (exit 1); forking a new one from the warm parent" in err
    assert_same_as(tmp_path, warm_reference)
    assert read_status(tmp_path).resumed_from == 14  # the newest snapshot both ranks held


@pytest.mark.parametrize(
    "point, step, rank",
    [("after_local_snapshot", 12, 1), ("while_writing", 20, 1), ("before_commit", 20, 0)],
    ids=["mid-snapshot", "durable-save-in-flight", "mid-commit"],
)
def test_a_training_process_killed_at_an_instant_of_the_save_path_is_recovered(tmp_path, warm_reference, point, step, rank):
    """One rank's training process held at an instant of the save path and SIGKILLed there: right after its local
    snapshot of step 12 was handed to the background copy; while its writer holds step 20's staged data and has
    written none (a durable save in flight, training going on); rank 0 with every rank's data of step 20 durable
    and the COMPLETE marker not yet written. The warm parents recover in the same round, step 20 is never marked
    complete by the killed attempt, and the run ends bit-identical."""
    env = {"FTRAIN_FAULT": f"{point}@{step}", "FTRAIN_FAULT_RANK": str(rank)}
    proc = start_train(tmp_path, *WARM, env=env)
    wait_for(lambda: proc.said(f"pausing at {point} of step {step}"), what=f"the pause at {point}", proc=proc)
    victim = psutil.Process(worker_pids(proc)[rank]).children()[0]
    assert victim.name() == "ftrain-train"
    victim.send_signal(signal.SIGKILL)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-4000:]
    lines = [line for line in err.splitlines() if "training process ended" in line or "recovered:" in line]
    assert f"rank {rank}: training process ended (signal SIGKILL)" in err, lines
    assert "(generation 1)" in err, lines
    assert "Restarting" not in err  # torchrun never started a new round
    assert_same_as(tmp_path, warm_reference)


def test_a_failure_during_recovery_is_recovered_too(tmp_path, warm_reference):
    """Rank 1's training process is SIGKILLed, then its replacement as soon as it exists (while it starts and
    loads): a third generation finishes the run, bit-identical."""
    proc = start_train(tmp_path, *WARM)
    wait_for(lambda: read_status(tmp_path) is not None and read_status(tmp_path).step >= 10, what="step 10", proc=proc)
    parent = psutil.Process(worker_pids(proc)[1])
    first = parent.children()[0]
    first.send_signal(signal.SIGKILL)

    def replacement():
        kids = [c for c in parent.children() if c.pid != first.pid]
        return kids[0] if kids else None

    deadline = time.time() + 60
    while (second := replacement()) is None and time.time() < deadline and proc.poll() is None:
        time.sleep(0.002)
    assert second is not None, "no replacement was forked"
    second.send_signal(signal.SIGKILL)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-4000:]
    assert "(generation 2)" in err and "Restarting" not in err
    assert_same_as(tmp_path, warm_reference)


def test_ftrain_chaos_aims_at_training_processes(tmp_path, warm_reference):
    """`ftrain-chaos --kinds process` SIGKILLs rank's training processes (the warm parents' children, named
    ftrain-train), never the parents: every failure is recovered in the same torchrun round (--max-restarts=0), and
    the report gives the time lost per failure."""
    cmd = [*TORCHRUN, "--standalone", "--nproc_per_node=2", "--max-restarts=0", str(REPO / "recipes" / "train.py"), *FAST, *WARM]
    done = subprocess.run(
        [str(Path(sys.executable).parent / "ftrain-chaos"), "--workdir", str(tmp_path), "--kills", "2", "--kinds", "process",
         "--seed", "1", "--min-delay", "0.5", "--max-delay", "1.5", "--reference", str(warm_reference), "--json", "--", *cmd],
        capture_output=True, text=True, timeout=600, cwd=REPO,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads(done.stdout)
    assert report["kills"] == 2 and len(report["recoveries"]) == 2 and report["ok"], report
    assert all(r["kind"] == "process" for r in report["recoveries"])
    assert len(report["cost_per_failure_s"]) == 2 and report["ettr"] is not None
    log = (tmp_path / "chaos.chaos.log").read_text()
    assert log.count("forking a new one from the warm parent") >= 2 and "Restarting" not in log


def test_an_own_loop_under_run_with_warm_restarts_recovers_a_killed_training_process(tmp_path):
    """recipes/custom_loop.py (DDP, a plain dist.init_process_group()) runs its main through
    ftrain.run_with_warm_restarts: rank 1's training process SIGKILLed mid-run is replaced by a fork of its warm
    parent in the same torchrun round, and the run ends bit-identical to an uninterrupted one."""
    from ftrain import tags
    from ftrain.checkpoint.reader import read_tensors

    def cmd(run_dir):
        return [*TORCHRUN, "--standalone", "--nproc_per_node=2", "--max-restarts=0", str(REPO / "recipes" / "custom_loop.py"),
                "--run-dir", str(run_dir), "--steps", "600", "--interval", "50"]

    reference = tmp_path / "reference"
    check_ok(subprocess.run(cmd(reference), capture_output=True, text=True, timeout=300, cwd=REPO))
    run_dir = tmp_path / "run"
    proc = Job(cmd(run_dir), cwd=REPO)
    wait_for(lambda: (run_dir / "checkpoints" / "step_00000100" / "COMPLETE").is_file(), what="step 100", proc=proc)
    victim = psutil.Process(worker_pids(proc)[1]).children()[0]
    assert victim.name() == "ftrain-train"
    victim.send_signal(signal.SIGKILL)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-4000:]
    assert "forking a new one from the warm parent" in err and "(generation 1)" in err and "Restarting" not in err
    assert "which had rehearsed a step" in err  # custom_loop.py passes rehearse=
    final = Path("checkpoints") / "step_00000600"
    assert_same_tensors(read_tensors(reference / final), read_tensors(run_dir / final))
    assert scalars(run_dir / "tb", tags.LOSS) == scalars(reference / "tb", tags.LOSS)


def test_a_warm_parent_rehearses_only_small_models_on_cpu():
    """The rehearsal holds a model's training state once more for a moment and must never touch CUDA in the parent:
    the default recipe is rehearsed, a model whose state exceeds REHEARSAL_MAX_BYTES or a CUDA run is not."""
    from ftrain.config import load_config
    from ftrain.trainer import can_rehearse

    assert can_rehearse(load_config([]))
    assert not can_rehearse(load_config(["model.d_model=4096", "model.n_layer=8"]))  # ~1.6 G parameters
    assert not can_rehearse(load_config(["train.device=cuda"]))


def test_a_rehearsal_leaves_no_process_group_thread_count_or_rng_change_behind():
    """warm.rehearsal(), what the recipe's and an own loop's rehearsals run in: inside, a fake process group of
    this rank and world size and one intra-op thread; afterwards, also after an exception, none of it, and torch's
    RNG where it was (the forks inherit the parent's)."""
    import torch
    import torch.distributed as dist

    from ftrain import warm

    torch.manual_seed(5)
    before, threads = torch.get_rng_state(), torch.get_num_threads()
    for fails in (False, True):
        with pytest.raises(ValueError) if fails else contextlib.nullcontext():
            with warm.rehearsal():
                assert dist.is_initialized() and dist.get_backend() == "fake" and torch.get_num_threads() == 1
                torch.randn(100)
                if fails:
                    raise ValueError("a rehearsal that fails")
        assert not dist.is_initialized() and torch.get_num_threads() == threads
        assert torch.equal(torch.get_rng_state(), before)


def test_a_rehearsal_that_fails_leaves_the_parent_as_it_was(monkeypatch):
    """A failed rehearsal (here the fake process group cannot be made) is only logged by the parent: it must not
    leave the one intra-op thread it rehearses with, nor a process group, to the training processes it forks."""
    import torch
    import torch.distributed as dist

    import ftrain._torch_compat as compat
    from ftrain.config import load_config
    from ftrain.trainer import rehearse_step

    def cannot(rank: int, world_size: int) -> None:
        raise RuntimeError("no fake backend here")

    monkeypatch.setattr(compat, "init_fake_process_group", cannot)
    threads = torch.get_num_threads()
    with pytest.raises(RuntimeError, match="no fake backend"):
        rehearse_step(load_config([]))
    assert torch.get_num_threads() == threads and not dist.is_initialized()
