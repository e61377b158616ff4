"""This machine while the benchmark runs: a rank's peak host memory, the CPU that other processes use, and what
the machine and ftrain's sources are."""

from __future__ import annotations

import gc
import hashlib
import os
import platform
import resource
import threading
import time
from typing import Any

import torch

from ftrain.processes import descendants

from .common import REPO


def _status_kb(pid: int | str, fields: tuple[str, ...]) -> int:
    """Sum of the given ``/proc/<pid>/status`` fields in kB; 0 if the process is gone."""
    total = 0
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                name, _, value = line.partition(":")
                if name in fields:
                    total += int(value.split()[0])
    except (OSError, ValueError):
        return 0
    return total


class MemorySampler:
    """Samples this rank's host memory every ``period_s`` in a thread and keeps the peak since ``reset()``.

    Memory = this process's RSS (anonymous, file and shared-memory pages it touched) + the private anonymous
    RSS of its descendants (DCP's writer process). A child's shared-memory and file pages are left out: they are
    the staging buffers and libraries this process already counts.
    """

    def __init__(self, period_s: float = 0.01, rescan_s: float = 0.5) -> None:
        self.period_s = period_s
        self.rescan_s = rescan_s
        self._pid = os.getpid()
        self._children: list[int] = []
        self._lock = threading.Lock()
        self._peak = (0, 0)  # (total, children) in bytes
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="bench-memory", daemon=True)

    def sample(self) -> tuple[int, int]:
        own = _status_kb(self._pid, ("VmRSS",))
        children = sum(_status_kb(pid, ("RssAnon",)) for pid in self._children)
        return (own + children) * 1024, children * 1024

    def start(self) -> None:
        self._children = descendants(self._pid)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def reset(self) -> tuple[int, int]:
        """Start a new peak from now; returns the current (baseline) sample."""
        gc.collect()
        self._children = descendants(self._pid)
        now = self.sample()
        with self._lock:
            self._peak = now
        return now

    def peak(self) -> tuple[int, int]:
        self._record(self.sample())
        with self._lock:
            return self._peak

    def _record(self, now: tuple[int, int]) -> None:
        with self._lock:
            if now[0] > self._peak[0]:
                self._peak = now

    def _loop(self) -> None:
        last_scan = time.monotonic()
        while not self._stop.wait(self.period_s):
            if time.monotonic() - last_scan > self.rescan_s:
                self._children = descendants(self._pid)
                last_scan = time.monotonic()
            self._record(self.sample())


class OtherLoad:
    """CPU time used by processes outside this benchmark while it ran (a busy machine disturbs every number),
    and the time the hypervisor stole from this machine's CPUs."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.busy, self.steal = _machine_cpu_s()
        self.own = _own_cpu_s()

    def shares(self) -> dict[str, float]:
        busy, steal = _machine_cpu_s()
        capacity = (time.monotonic() - self.started) * (os.cpu_count() or 1)
        other = busy - self.busy - (_own_cpu_s() - self.own)
        return {"other_cpu_share": max(other, 0.0) / capacity, "steal_share": (steal - self.steal) / capacity}


def _machine_cpu_s() -> tuple[float, float]:
    """(busy, stolen) CPU seconds of the whole machine since boot, from /proc/stat."""
    try:
        with open("/proc/stat") as handle:
            fields = [int(v) for v in handle.readline().split()[1:9]]
    except (OSError, ValueError):
        return 0.0, 0.0
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    tick = os.sysconf("SC_CLK_TCK")
    return (user + nice + system + irq + softirq) / tick, steal / tick


def wait_for_quiet(max_wait_s: float, threshold: float = 0.10) -> float:
    """Wait until the machine's CPUs are less than ``threshold`` busy for one second (this process is idle
    meanwhile, so that is other processes' load), or ``max_wait_s`` passed. Returns the seconds waited."""
    started = time.monotonic()
    while time.monotonic() - started < max_wait_s:
        before, _ = _machine_cpu_s()
        time.sleep(1.0)
        after, _ = _machine_cpu_s()
        if (after - before) / (os.cpu_count() or 1) < threshold:
            break
    return time.monotonic() - started


def _own_cpu_s() -> float:
    """CPU seconds of this process and of its finished (waited-for) descendants."""
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        usage = resource.getrusage(who)
        total += usage.ru_utime + usage.ru_stime
    return total


def source_fingerprint() -> str:
    """A short hash of ftrain's sources: which version of the library the numbers belong to."""
    digest = hashlib.sha256()
    for path in sorted((REPO / "ftrain").rglob("*.py")):
        digest.update(path.relative_to(REPO).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def environment() -> dict[str, Any]:
    try:
        memory_gb = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError):
        memory_gb = None
    return {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "memory_gb": memory_gb,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "ftrain_source": source_fingerprint(),
    }
