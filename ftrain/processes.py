"""The process tree of a job, through psutil: finding a launcher's workers and killing a job for real.

torchrun starts every worker in a session of its own, so a process-group kill of torchrun
leaves the workers running: killing "the job" means every descendant, by pid.
"""

from __future__ import annotations

import signal
import time

import psutil

from ftrain.warm import TRAINING_PROCESS_NAME


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (children, grandchildren, ...); empty if ``pid`` is gone."""
    try:
        return [child.pid for child in psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def send(pid: int, sig: int) -> None:
    """``os.kill`` that ignores a process already gone."""
    try:
        psutil.Process(pid).send_signal(sig)
    except psutil.NoSuchProcess:
        pass


def kill_tree(pid: int, timeout: float = 30.0) -> None:
    """SIGKILL ``pid`` and all its descendants: stop them all first so nothing forks or reacts in between."""
    for target in [pid, *descendants(pid)]:
        send(target, signal.SIGSTOP)
    pids = [pid, *descendants(pid)]
    for target in pids:
        send(target, signal.SIGKILL)
    deadline = time.time() + timeout
    while time.time() < deadline and any(alive(p) for p in pids if p != pid):
        time.sleep(0.005)  # the chaos tool times a restart from the kill: a coarse poll would be counted as one
    survivors = [p for p in pids if p != pid and alive(p)]
    if survivors:
        raise RuntimeError(f"processes survived SIGKILL: {survivors}")


def worker_pids(launcher_pid: int) -> dict[int, int]:
    """Rank -> pid of the training processes a launcher (torchrun) started: its direct children with a RANK."""
    found: dict[int, int] = {}
    try:
        children = psutil.Process(launcher_pid).children()
    except psutil.NoSuchProcess:
        return found
    for child in children:
        try:
            rank = child.environ().get("RANK")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if rank is not None:
            found[int(rank)] = child.pid
    return found


def training_pid(worker: int) -> int:
    """The process that trains for a launcher's worker: the worker's warm-restart child (``train.warm_restarts``)
    if it has one, else the worker itself."""
    try:
        for child in psutil.Process(worker).children():
            try:
                if child.name() == TRAINING_PROCESS_NAME:
                    return child.pid
            except psutil.NoSuchProcess:
                continue
    except psutil.NoSuchProcess:
        pass
    return worker


def nice(pid: int) -> int:
    """The scheduling niceness of ``pid``."""
    return psutil.Process(pid).nice()


def start_time(pid: int | None = None) -> float:
    """Wall time (``time.time()`` scale) at which ``pid`` (default: this process) started, to about 10 ms.

    psutil's ``create_time`` adds the process's start (in clock ticks since boot) to the boot time, which Linux
    gives in whole seconds: up to a second off. Measured from the boot clock instead, it is exact to a tick."""
    since_boot = psutil.Process(pid).create_time() - psutil.boot_time()
    if hasattr(time, "CLOCK_BOOTTIME"):
        return time.time() - time.clock_gettime(time.CLOCK_BOOTTIME) + since_boot
    return psutil.Process(pid).create_time()
