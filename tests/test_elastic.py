"""Failures torchrun and users bring: elastic restarts, random kills, a changed world size, a stalled rank."""

import json
import os
import shutil
import signal
import time
from collections import defaultdict

import pytest

from conftest import FAST, REPO, TORCHRUN, Job, check_ok, run_train, wait_for, worker_pids
from ftrain.harness.chaos import compare_runs, run_chaos
from ftrain.data import GlobalOrderSampler, WindowDataset, load_tokens


def chaos_cmd(run_dir, *extra, max_restarts=0):
    return [
        *TORCHRUN, "--standalone", "--nproc_per_node=2", f"--max-restarts={max_restarts}",
        str(REPO / "recipes" / "train.py"), f"run.dir={run_dir}", *FAST, "log.interval=1", *extra,
    ]


@pytest.mark.soak  # random whole-job kills: their instants are CI tests of their own (test_resume, test_local_resume)
def test_random_sigkills_of_the_whole_job(tmp_path):
    """Issue #3's acceptance in short: SIGKILL at random moments, restart the same command, same result.

    60 steps, not the usual 20: three kills must all land while it trains, and a fast save path makes the short
    run end within a few of the drawn delays."""
    longer = ("train.max_steps=60",)
    reference = tmp_path / "reference"
    check_ok(run_train(reference, *longer))
    run_dir = tmp_path / "run"
    report = run_chaos(
        chaos_cmd(run_dir, *longer), run_dir, kills=3, kinds=("job",), seed=3, min_delay=0.2, max_delay=1.0
    )
    assert report.kills == 3 and len(report.recoveries) == 3
    assert (run_dir / "checkpoints" / "step_00000060" / "COMPLETE").is_file()
    same_weights, same_losses, diffs = compare_runs(run_dir, reference)
    assert same_weights and same_losses, diffs


def test_torchrun_restarts_after_one_rank_dies(reference_run, tmp_path):
    """SIGKILL of a single worker and SIGTERM of another: torchrun --max-restarts recovers on its own."""
    run_dir = tmp_path / "run"
    report = run_chaos(
        chaos_cmd(run_dir, max_restarts=5), run_dir, kills=2, kinds=("rank", "sigterm"), seed=5,
        min_delay=0.1, max_delay=0.4,  # the 20-step run is short: both failures must land while it trains
    )
    assert len(report.recoveries) == report.kills == 2, report
    assert all(r.recovery_s < 60 for r in report.recoveries), report.recoveries
    same_weights, same_losses, diffs = compare_runs(run_dir, reference_run)
    assert same_weights and same_losses, diffs


def consumed(run_dir):
    """Sequence indices consumed per step, keeping the latest attempt of each step (redone steps replace)."""
    latest = {}
    for path in sorted((run_dir / "samples").glob("rank_*.jsonl")):
        for line in path.read_text().splitlines():
            record = json.loads(line)
            key = (record["step"], record["rank"])
            if key not in latest or record["attempt"] >= latest[key]["attempt"]:
                latest[key] = record
    newest_attempt = defaultdict(float)
    for (step, _), record in latest.items():
        newest_attempt[step] = max(newest_attempt[step], record["attempt"])
    per_step = defaultdict(list)
    for (step, rank), record in sorted(latest.items()):
        if record["attempt"] == newest_attempt[step]:  # a rank that no longer exists left older records
            per_step[step].extend(record["indices"])
    return per_step


@pytest.mark.parametrize("first, second", [pytest.param(2, 1, marks=pytest.mark.soak), (1, 2)])  # CI: growing
def test_world_size_change_reads_every_sample_exactly_once(first, second, tmp_path):
    run_dir = tmp_path / "run"
    check_ok(run_train(run_dir, "data.record_samples=true", "train.max_steps=10", nproc=first))
    resumed = run_train(run_dir, "data.record_samples=true", "train.max_steps=20", nproc=second)
    check_ok(resumed)
    assert f"resharded from {first} to {second} ranks" in resumed.stderr
    per_step = consumed(run_dir)
    assert sorted(per_step) == list(range(1, 21))
    assert all(len(per_step[s]) == 4 * first for s in range(1, 11))  # FAST: 4 sequences per rank
    assert all(len(per_step[s]) == 4 * second for s in range(11, 21))
    everything = [i for s in sorted(per_step) for i in per_step[s]]
    assert len(everything) == len(set(everything)), "a sample was read twice"
    # ... and nothing was skipped: it is exactly the start of the epoch's global order
    num_samples = len(WindowDataset(load_tokens(""), 64))
    order = GlobalOrderSampler(num_samples, 4, 0, 1, seed=1234).order(0)
    assert sorted(everything) == sorted(order[: len(everything)].tolist())


def test_world_size_change_can_be_refused(reference_run, tmp_path):
    shutil.copytree(reference_run, tmp_path, dirs_exist_ok=True)  # saved with 2 ranks, at step 20
    proc = run_train(tmp_path, "train.max_steps=25", "checkpoint.on_world_size_change=refuse", nproc=1)
    assert proc.returncode != 0
    assert "saved with 2 ranks, this run has 1, and checkpoint.on_world_size_change=refuse" in proc.stderr


@pytest.mark.parametrize("wake", [True, pytest.param(False, marks=pytest.mark.soak)], ids=["woken", "left-stopped"])
def test_stalled_rank_becomes_an_error_torchrun_can_restart(reference_run, tmp_path, wake):
    """SIGSTOP one worker: the other's collective times out (train.timeout_s) with a clear error instead of
    hanging, torchrun stops the stalled one and restarts the group, and the run still ends bit for bit.

    torchrun (2.13) waits 30 s for a worker to honour its SIGTERM before it sends SIGKILL, and a stopped process
    honours nothing. In CI ("woken") the stalled worker gets SIGCONT once the other has given up, so that wait is
    cut short; the soak form leaves it stopped until torchrun kills it."""
    import psutil

    # torchrun's restart path (a stalled training process under warm restarts: tests/test_warm.py)
    proc = Job(chaos_cmd(tmp_path, "train.timeout_s=4", "train.warm_restarts=0", max_restarts=1))
    wait_for(lambda: (tmp_path / "checkpoints" / "step_00000005" / "COMPLETE").is_file(), proc=proc, what="step 5")
    workers = worker_pids(proc)
    os.kill(workers[1], signal.SIGSTOP)
    if wake:

        def gone(pid: int) -> bool:
            try:
                return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
            except psutil.NoSuchProcess:
                return True

        wait_for(lambda: gone(workers[0]), timeout=120, what="rank 0 to give up on the stalled rank")
        os.kill(workers[1], signal.SIGCONT)
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err[-3000:]
    assert "lost contact with another rank" in err and "Timed out" in err
    same_weights, same_losses, diffs = compare_runs(tmp_path, reference_run)
    assert same_weights and same_losses, diffs


@pytest.mark.soak
@pytest.mark.parametrize("seed", [11, 12])
def test_soak_many_random_failures(seed, tmp_path_factory):
    """Long form (not in CI): 10 failures of every kind on a longer run; bash scripts/test.sh -m soak.

    400 steps: with the local tier a failure redoes at most a step, so 80 steps ended after 2-3 of the 10 kills."""
    steps = "train.max_steps=400"
    reference = tmp_path_factory.mktemp("soak_reference")
    check_ok(run_train(reference, steps))
    run_dir = tmp_path_factory.mktemp("soak") / "run"
    report = run_chaos(
        chaos_cmd(run_dir, steps, max_restarts=30), run_dir, kills=10, kinds=("job", "rank", "sigterm"),
        seed=seed, min_delay=0.2, max_delay=3.0,
    )
    assert len(report.recoveries) == report.kills == 10
    same_weights, same_losses, diffs = compare_runs(run_dir, reference)
    assert same_weights and same_losses, diffs


def test_save_stuck_on_io_times_out(tmp_path, monkeypatch):
    """A commit that never finishes (frozen I/O) becomes an error after checkpoint.timeout_s, not a hang."""
    monkeypatch.setenv("FTRAIN_FAULT", "before_commit@5")  # rank 0's commit thread sleeps for 600 s
    started = time.time()
    proc = run_train(tmp_path, "checkpoint.timeout_s=3", "train.timeout_s=10", timeout=240)
    assert proc.returncode != 0
    assert "checkpoint step 5 did not finish within checkpoint.timeout_s=3.0s" in proc.stderr
    assert time.time() - started < 120
    assert not (tmp_path / "checkpoints" / "step_00000005" / "COMPLETE").exists()
