"""Kill a training job at random moments, let it recover, and check the result against an uninterrupted run.

A failure is data: ``(kind, delay)``, drawn from a seeded RNG. Kinds:

    job       SIGKILL torchrun and every process under it (workers run in sessions of their own, so a
              process-group kill is not enough); the same command is started again
    rank      SIGKILL one worker; torchrun (``--max-restarts``) restarts the group on its own
    sigterm   SIGTERM to one worker: the ranks agree, save, and exit 75; torchrun or this tool restarts

Used by ``tools/chaos.py`` and by the tests.
"""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ftrain.checkpoint import layout
from ftrain.checkpoint.reader import differing_tensors, read_tensors
from ftrain.events import read_run_scalars

KINDS = ("job", "rank", "sigterm")
_RESUMED = re.compile(r"resumed from \S+ \(step (\d+)\)")
_FRESH = re.compile(r"starting fresh")
_STEP = re.compile(r"\] step (\d+)/(\d+)")


# ------------------------------------------------------------------------------------------- processes
def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (children, grandchildren, ...), from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def kill_tree(pid: int, timeout: float = 30.0) -> None:
    """SIGKILL ``pid`` and all its descendants: stop them all first so nothing forks or reacts in between."""
    pids = [pid, *descendants(pid)]
    for target in pids:
        _signal(target, signal.SIGSTOP)
    pids = [pid, *descendants(pid)]
    for target in pids:
        _signal(target, signal.SIGKILL)
    deadline = time.time() + timeout
    while time.time() < deadline and any(alive(p) for p in pids if p != pid):
        time.sleep(0.05)
    survivors = [p for p in pids if p != pid and alive(p)]
    if survivors:
        raise RuntimeError(f"processes survived SIGKILL: {survivors}")


def worker_pids(launcher_pid: int) -> dict[int, int]:
    """Rank -> pid of the training processes a launcher (torchrun) started: its direct children with a RANK."""
    found: dict[int, int] = {}
    for child in descendants(launcher_pid):
        if _ppid(child) != launcher_pid:
            continue
        try:
            environ = (Path("/proc") / str(child) / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        env = dict(item.split(b"=", 1) for item in environ if b"=" in item)
        if b"RANK" in env:
            found[int(env[b"RANK"])] = child
    return found


def _ppid(pid: int) -> int | None:
    try:
        return int((Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


# ---------------------------------------------------------------------------------------- the job
class Job:
    """One launch of the training command, its output followed line by line."""

    def __init__(self, cmd: list[str], log_path: Path) -> None:
        self.log = open(log_path, "a")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lock = threading.Lock()
        self.last_step = 0
        self.resumes: list[tuple[float, int]] = []  # (time, step resumed from; 0 = fresh)
        self.steps: list[tuple[float, int]] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.log.write(line)
            self.log.flush()
            now = time.time()
            with self.lock:
                if match := _RESUMED.search(line):
                    self.resumes.append((now, int(match.group(1))))
                elif _FRESH.search(line):
                    self.resumes.append((now, 0))
                elif match := _STEP.search(line):
                    self.last_step = int(match.group(1))
                    self.steps.append((now, self.last_step))
        self.log.flush()

    def training_since(self, since: float) -> float | None:
        """Time of the first step logged after a (re)start that happened after ``since``, if any yet."""
        with self.lock:
            starts = [t for t, _ in self.resumes if t >= since]
            if not starts:
                return None
            return next((t for t, _ in self.steps if t >= starts[0]), None)

    def resumed_step_after(self, since: float) -> int | None:
        with self.lock:
            return next((step for t, step in self.resumes if t >= since), None)

    def wait(self, timeout: float | None = None) -> int:
        code = self.proc.wait(timeout=timeout)
        self.reader.join(timeout=10)
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
    _signal(workers[rank], signal.SIGKILL if kind == "rank" else signal.SIGTERM)
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
    job = Job(cmd, log_path)
    since = started
    while report.kills < kills and time.time() - started < timeout:
        while job.training_since(since) is None:  # wait until it trains again
            if job.proc.poll() is not None:
                break
            time.sleep(0.05)
        if job.proc.poll() is not None:
            if job.wait() == 0:
                break
            job = Job(cmd, log_path)  # exited after a failure (e.g. 75): start it again
            continue
        kind = rng.choice(kinds)
        time.sleep(rng.uniform(min_delay, max_delay))
        killed_step = job.last_step
        killed_at = time.time()
        if not _inject(job, kind, rng):
            continue
        report.kills += 1
        if job.proc.poll() is not None:  # the whole job is gone: start it again
            job = Job(cmd, log_path)
        finished_at = None
        while job.training_since(killed_at) is None and time.time() - started < timeout:
            if job.proc.poll() is not None:
                if job.wait() == 0:  # resumed from the final checkpoint: nothing left to train
                    finished_at = time.time()
                    break
                job = Job(cmd, log_path)
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
        job = Job(cmd, log_path)
    latest = layout.latest_complete(Path(run_dir) / "checkpoints")
    report.final_step = latest.step if latest else 0
    report.wall_s = time.time() - started
    return report


def compare_runs(run_dir: Path, reference_dir: Path) -> tuple[bool, bool, list[str]]:
    """(same final weights, same loss curve, what differs) between a run and its uninterrupted reference."""
    latest, expected = layout.latest_complete(Path(run_dir) / "checkpoints"), layout.latest_complete(
        Path(reference_dir) / "checkpoints"
    )
    if latest is None or expected is None or latest.step != expected.step:
        got = latest.step if latest else None
        want = expected.step if expected else None
        return False, False, [f"final checkpoint step {got}, reference {want}"]
    differences = differing_tensors(read_tensors(latest.path), read_tensors(expected.path))
    losses = read_run_scalars(run_dir, ["train/loss"]).get("train/loss", {})
    reference_losses = read_run_scalars(reference_dir, ["train/loss"]).get("train/loss", {})
    loss_diffs = [f"loss at step {s}" for s in sorted(set(losses) | set(reference_losses)) if losses.get(s) != reference_losses.get(s)]
    return not differences, not loss_diffs, [*differences[:10], *loss_diffs[:10]]
