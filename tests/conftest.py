"""Shared helpers: launching the real recipe under torchrun, reading its outputs, killing it for real."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from ftrain import processes
from ftrain.processes import kill_tree
from ftrain.checkpoint.keys import DEFAULT_STATE_KEYS, MODEL, OPTIMIZER
from ftrain.checkpoint.reader import differing_tensors, read_tensors
from ftrain.events import read_scalars

REPO = Path(__file__).resolve().parent.parent
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]

# Small and quick: every run of the recipe in the tests uses these unless it overrides them.
FAST = ["train.max_steps=20", "checkpoint.interval=5", "log.interval=5", "model.seq_len=64", "train.batch_size=4"]


def train_cmd(run_dir: Path, *overrides: str, nproc: int = 2) -> list[str]:
    launcher = [*TORCHRUN, "--standalone", f"--nproc_per_node={nproc}"] if nproc else [sys.executable]
    return [*launcher, str(REPO / "recipes" / "train.py"), f"run.dir={run_dir}", *FAST, *overrides]


def run_train(run_dir: Path, *overrides: str, nproc: int = 2, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        train_cmd(run_dir, *overrides, nproc=nproc), capture_output=True, text=True, timeout=timeout, cwd=REPO
    )


def check_ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-5000:]}"


def scalars(tb_dir: Path, tag: str) -> dict[int, float]:
    """A TensorBoard scalar by step, as TensorBoard shows it (events purged by a resume are gone)."""
    return read_scalars(tb_dir, [tag]).get(tag, {})


def checkpoint_tensors(path: Path) -> dict[str, torch.Tensor]:
    tensors = read_tensors(path)
    model, optimizer = DEFAULT_STATE_KEYS[MODEL], DEFAULT_STATE_KEYS[OPTIMIZER]
    assert any(k.startswith(f"{model}.") for k in tensors) and any(k.startswith(f"{optimizer}.") for k in tensors)
    return tensors


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    different = differing_tensors(a, b)
    assert not different, f"tensors differ: {different[:5]}"


def kill_job(proc: subprocess.Popen) -> None:
    """SIGKILL torchrun and every process under it (workers run in sessions of their own)."""
    kill_tree(proc.pid)
    proc.wait(timeout=30)


@pytest.fixture(scope="session", autouse=True)
def _no_local_snapshots_left_behind():
    """Runs the tests kill keep their local snapshots in /dev/shm, as they should (a restart would use them); the
    runs' directories are temporary, so the snapshots are removed when the session ends."""
    shm = Path("/dev/shm")
    before = set(shm.glob("ftrain-*")) if shm.is_dir() else set()
    yield
    if shm.is_dir():
        for leftover in set(shm.glob("ftrain-*")) - before:
            shutil.rmtree(leftover, ignore_errors=True)


def worker_pids(proc: subprocess.Popen) -> dict[int, int]:
    return processes.worker_pids(proc.pid)


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One uninterrupted 2-rank run of the fast config; the yardstick for every resume test."""
    run_dir = tmp_path_factory.mktemp("reference")
    check_ok(run_train(run_dir))
    return run_dir



def wait_for(condition, timeout: float = 120, what: str = "condition", proc: subprocess.Popen | None = None) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return
        if proc is not None and proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"job exited ({proc.returncode}) before {what}\n{out[-2000:]}\n{err[-4000:]}")
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


class Job(subprocess.Popen):
    """A process left running in the background while the test waits on something else (a file, a step): threads
    read its stdout and stderr all along, since a pipe nobody reads fills (64 KiB) and blocks the job's next write.
    communicate() returns everything it wrote, as Popen's does."""

    def __init__(self, args, **kwargs) -> None:
        super().__init__(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)
        self._said: tuple[list[str], list[str]] = ([], [])
        self._readers = [threading.Thread(target=self._drain, args=(pipe, into), daemon=True)
                         for pipe, into in zip((self.stdout, self.stderr), self._said)]
        for reader in self._readers:
            reader.start()

    @staticmethod
    def _drain(pipe, into: list[str]) -> None:
        for line in pipe:
            into.append(line)

    def communicate(self, input=None, timeout: float | None = None) -> tuple[str, str]:
        assert input is None, "a Job takes no input"
        deadline = None if timeout is None else time.monotonic() + timeout
        self.wait(timeout)
        for reader in self._readers:  # the pipes end when the last process holding them (a worker too) is gone
            reader.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
            if reader.is_alive():
                raise subprocess.TimeoutExpired(self.args, timeout)
        return "".join(self._said[0]), "".join(self._said[1])


def start_train(run_dir: Path, *overrides: str, nproc: int = 2, env: dict | None = None) -> Job:
    return Job(train_cmd(run_dir, *overrides, nproc=nproc), cwd=REPO, env={**os.environ, **(env or {})})
