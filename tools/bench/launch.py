"""Launching torchrun jobs with their output going to a log file."""

from __future__ import annotations

import resource
import subprocess
import sys
from pathlib import Path
from typing import Callable

from .common import REPO

TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]


def children_cpu_s() -> float:
    """CPU seconds of this process's ended children and their waited-for descendants: across one run, what the
    job used (torchrun, its workers, their threads and writer processes), whatever else ran on the machine."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def torchrun_cmd(nproc: int, script: Path, args: list[str]) -> list[str]:
    """``torchrun --standalone`` of ``script`` with ``nproc`` ranks on this machine."""
    return [*TORCHRUN, "--standalone", f"--nproc_per_node={nproc}", str(script), *args]


def run_logged(cmd: list[str], log_path: Path, env: dict[str, str], echo: Callable[[str], bool]) -> int:
    """Run ``cmd`` with its output going to ``log_path``; lines for which ``echo`` is true are also printed."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:
        log.write(" ".join(cmd) + "\n")
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO, env=env)
        assert proc.stdout is not None
        for line in proc.stdout:
            log.write(line)
            if echo(line):
                print(line.rstrip(), flush=True)
        return proc.wait()


def tail(path: Path, lines: int = 3) -> str:
    try:
        text = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    except OSError:
        return "(no log)"
    return " | ".join(text[-lines:])
