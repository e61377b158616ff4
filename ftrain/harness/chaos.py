"""Kill a training job at random moments, let it recover, and check the result against an uninterrupted run.

A failure is data: ``(kind, delay)``, drawn from a seeded RNG. Kinds:

    job       SIGKILL torchrun and every process under it (workers run in sessions of their own, so a
              process-group kill is not enough); the same command is started again
    rank      SIGKILL one worker (the process torchrun started, with warm restarts the warm parent); torchrun
              (``--max-restarts``) restarts the group on its own
    process   SIGKILL one rank's training process: with warm restarts (``train.warm_restarts``) the warm
              parent's child, which the parents replace in the same torchrun round; without, the worker
    sigterm   SIGTERM to one worker: the ranks agree, save, and exit 75; torchrun or this tool restarts

Used by ``tools/chaos.py`` and by the tests.
"""

from __future__ import annotations

import random
import signal
import statistics
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ftrain import tags
from ftrain.checkpoint import layout
from ftrain.checkpoint.reader import differing_tensors, read_tensors
from ftrain.checkpoint.run_dir import CHECKPOINTS_DIR
from ftrain.events import read_run_scalars
from ftrain.processes import kill_tree, send, training_pid, worker_pids
from ftrain.run_status import RunStatus, read_status

KINDS = ("job", "rank", "process", "sigterm")


# ---------------------------------------------------------------------------------------- the job
class Job:
    """One launch of the training command. Its output goes to a log file; its progress is read from the run's
    ``STATUS`` record (``ftrain.run_status``), never from log lines."""

    def __init__(self, cmd: list[str], log_path: Path, run_dir: Path) -> None:
        self.log = open(log_path, "a")
        self.run_dir = Path(run_dir)
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT)

    @property
    def last_step(self) -> int:
        status = read_status(self.run_dir)
        return status.step if status else 0

    def _attempt_since(self, since: float) -> RunStatus | None:
        status = read_status(self.run_dir)
        return status if status is not None and status.attempt_started >= since else None

    def training_since(self, since: float) -> float | None:
        """Wall time of the first step of an attempt that started after ``since``, if any yet."""
        status = self._attempt_since(since)
        return status.first_step_at or None if status else None

    def resumed_step_after(self, since: float) -> int | None:
        status = self._attempt_since(since)
        return status.resumed_from if status else None

    def wait(self, timeout: float | None = None) -> int:
        code = self.proc.wait(timeout=timeout)
        self.log.flush()
        return code


@dataclass
class Recovery:
    kind: str
    killed_at_step: int
    resumed_from_step: int
    steps_redone: int
    recovery_s: float  # from the kill until training steps were logged again


@dataclass
class ChaosReport:
    kills: int = 0
    missed: int = 0  # failures delivered after the run had finished
    recoveries: list[Recovery] = field(default_factory=list)
    final_step: int = 0
    identical_weights: bool | None = None
    identical_losses: bool | None = None
    differences: list[str] = field(default_factory=list)
    wall_s: float = 0.0
    training_wall_s: float = 0.0  # from the first step's end to the last step's end, failures included
    ettr: float | None = None  # effective training time ratio: 1 - (cost of the failures) / training_wall_s
    cost_per_failure_s: list[float] = field(default_factory=list)  # time to training again + steps redone

    @property
    def ok(self) -> bool:
        return bool(self.identical_weights and self.identical_losses and len(self.recoveries) == self.kills)

    def to_dict(self) -> dict:
        return {**asdict(self), "ok": self.ok}


def _inject(job: Job, kind: str, rng: random.Random) -> bool:
    """Deliver one failure; False if the job had already finished."""
    if job.proc.poll() is not None:
        return False
    if kind == "job":
        kill_tree(job.proc.pid)
        job.wait(timeout=60)
        return True
    workers = worker_pids(job.proc.pid)
    if not workers:
        return False
    rank = rng.choice(sorted(workers))
    if kind == "process":
        send(training_pid(workers[rank]), signal.SIGKILL)
    else:
        send(workers[rank], signal.SIGKILL if kind == "rank" else signal.SIGTERM)
    return True


def run_chaos(
    cmd: list[str],
    run_dir: Path,
    *,
    kills: int,
    kinds: tuple[str, ...] = ("job",),
    seed: int = 0,
    min_delay: float = 0.5,
    max_delay: float = 4.0,
    timeout: float = 1800.0,
    say=print,
) -> ChaosReport:
    """Run ``cmd`` (which must write into ``run_dir``) with ``kills`` failures, restarting it until it finishes."""
    rng = random.Random(seed)
    report = ChaosReport()
    started = time.time()
    log_path = Path(run_dir).parent / f"{Path(run_dir).name}.chaos.log"
    job = Job(cmd, log_path, run_dir)
    # The first attempt starts within a clock tick of ``started``; process start times are exact to a tick only.
    since = started - 1.0
    first_step_at: float | None = None
    while report.kills < kills and time.time() - started < timeout:
        while job.training_since(since) is None:  # wait until it trains again
            if job.proc.poll() is not None:
                break
            time.sleep(0.05)
        if job.proc.poll() is not None:
            if job.wait() == 0:
                break
            job = Job(cmd, log_path, run_dir)  # exited after a failure (e.g. 75): start it again
            continue
        if first_step_at is None:
            first_step_at = job.training_since(since)
        kind = rng.choice(kinds)
        time.sleep(rng.uniform(min_delay, max_delay))
        killed_step = job.last_step
        killed_at = time.time()
        if not _inject(job, kind, rng):
            continue
        report.kills += 1
        if job.proc.poll() is not None:  # the whole job is gone: start it again
            job = Job(cmd, log_path, run_dir)
        finished_at = None
        while job.training_since(killed_at) is None and time.time() - started < timeout:
            if job.proc.poll() is not None:
                if job.wait() == 0:  # resumed from the final checkpoint: nothing left to train
                    finished_at = time.time()
                    break
                job = Job(cmd, log_path, run_dir)
            time.sleep(0.05)
        trained = job.training_since(killed_at) or finished_at
        resumed = job.resumed_step_after(killed_at)
        if trained is not None and resumed is not None:
            recovery = Recovery(kind, killed_step, resumed, max(killed_step - resumed, 0), trained - killed_at)
            report.recoveries.append(recovery)
            say(
                f"kill {report.kills}/{kills}: {kind} at step {killed_step}, resumed from step {resumed}, "
                f"training again after {recovery.recovery_s:.1f} s"
            )
        elif job.proc.poll() == 0 and resumed is None:
            # The signal reached a job that was already finishing and it exited 0 without a restart: nothing
            # was disrupted, so it is not a kill (nor a missing recovery).
            report.kills -= 1
            report.missed += 1
            say(f"a {kind} failure at step {killed_step} came too late: the run had already finished")
            break
        since = killed_at
    while True:  # let it finish; a preempted or failed launch is started again
        code = job.wait(timeout=max(timeout - (time.time() - started), 1))
        if code == 0:
            break
        if time.time() - started > timeout:
            raise RuntimeError(f"job did not finish within {timeout} s (last exit code {code})")
        job = Job(cmd, log_path, run_dir)
    latest = layout.latest_complete(Path(run_dir) / CHECKPOINTS_DIR)
    report.final_step = latest.step if latest else 0
    report.wall_s = time.time() - started
    status = read_status(Path(run_dir))
    if status is not None and first_step_at is not None:
        report.training_wall_s = status.step_at - first_step_at
    return report


def measure_goodput(report: ChaosReport, run_dir: Path) -> None:
    """Fill ``report``'s cost per failure and ETTR from the run's own step times: a failure costs its time to
    training again plus its redone steps at the median step time; ETTR is the share of the training wall time
    (first step to last) that was not spent on failures."""
    step_times = read_run_scalars(run_dir, [tags.STEP_TIME_S]).get(tags.STEP_TIME_S, {})
    if not step_times:
        return
    median = statistics.median(step_times.values())
    report.cost_per_failure_s = [r.recovery_s + r.steps_redone * median for r in report.recoveries]
    if report.training_wall_s > 0:
        report.ettr = max(0.0, 1.0 - sum(report.cost_per_failure_s) / report.training_wall_s)


def compare_runs(run_dir: Path, reference_dir: Path) -> tuple[bool, bool, list[str]]:
    """(same final weights, same loss curve, what differs) between a run and its uninterrupted reference."""
    latest, expected = layout.latest_complete(Path(run_dir) / CHECKPOINTS_DIR), layout.latest_complete(
        Path(reference_dir) / CHECKPOINTS_DIR
    )
    if latest is None or expected is None or latest.step != expected.step:
        got = latest.step if latest else None
        want = expected.step if expected else None
        return False, False, [f"final checkpoint step {got}, reference {want}"]
    differences = differing_tensors(read_tensors(latest.path), read_tensors(expected.path))
    losses = read_run_scalars(run_dir, [tags.LOSS]).get(tags.LOSS, {})
    reference_losses = read_run_scalars(reference_dir, [tags.LOSS]).get(tags.LOSS, {})
    loss_diffs = [f"loss at step {s}" for s in sorted(set(losses) | set(reference_losses)) if losses.get(s) != reference_losses.get(s)]
    return not differences, not loss_diffs, [*differences[:10], *loss_diffs[:10]]
