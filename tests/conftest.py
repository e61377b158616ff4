"""Shared helpers: launching the real recipe under torchrun, reading its outputs, killing it for real.

Also the ``scenario`` marker: every test that starts real processes (the recipe under torchrun or python, a CLI, a
tool, spawned ranks, a server) gets it here, at collection, so that ``bash scripts/test.sh -m "not scenario"`` runs
the quick in-process tests alone, in seconds."""

from __future__ import annotations

import fcntl
import inspect
import os
import shutil
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import pytest
import torch

from ftrain import processes
from ftrain.processes import kill_tree
from ftrain.checkpoint.keys import DEFAULT_STATE_KEYS, MODEL, OPTIMIZER
from ftrain.checkpoint.reader import differing_tensors, read_tensors
from ftrain.events import read_scalars

REPO = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent
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


# The local snapshots of the runs the tests kill stay in /dev/shm, as they should (a restart would use them); the
# runs' directories are temporary, so their snapshots are removed when the session ends. With pytest-xdist that is
# done by the controller, after every worker has finished (a worker that ended first would otherwise remove the
# snapshots of runs another worker still has going), and only for runs under this session's temporary directory (not
# another test session's, or a user's, made on the same machine meanwhile).
_SHM = Path("/dev/shm")
_SNAPSHOTS_BEFORE = pytest.StashKey[set]()


def _snapshot_dirs() -> set[Path]:
    return set(_SHM.glob("ftrain-*")) if _SHM.is_dir() else set()


def _run_dir_of(snapshots: Path) -> Path | None:
    from ftrain.checkpoint.local.directory import OWNER_NAME, Owner

    for owner in snapshots.glob(f"rank-*/{OWNER_NAME}"):
        try:
            found = Owner.decode(owner.read_bytes())
        except OSError:
            continue
        if found is not None and found.run_dir:
            return Path(found.run_dir)
    return None


def pytest_sessionstart(session: pytest.Session) -> None:
    if not hasattr(session.config, "workerinput"):  # the controller, or a run without xdist
        session.config.stash[_SNAPSHOTS_BEFORE] = _snapshot_dirs()


def pytest_sessionfinish(session: pytest.Session) -> None:
    config = session.config
    if hasattr(config, "workerinput") or _SNAPSHOTS_BEFORE not in config.stash:
        return
    ours = config._tmp_path_factory.getbasetemp().resolve()  # the workers' directories are under it
    for leftover in _snapshot_dirs() - config.stash[_SNAPSHOTS_BEFORE]:
        run_dir = _run_dir_of(leftover)
        if run_dir is not None and ours in run_dir.resolve().parents:
            shutil.rmtree(leftover, ignore_errors=True)


def worker_pids(proc: subprocess.Popen) -> dict[int, int]:
    return processes.worker_pids(proc.pid)


def shared_run(tmp_path_factory: pytest.TempPathFactory, name: str, make) -> Path:
    """A directory that ``make(path)`` fills once per test session, for session fixtures that tests only read.
    Under pytest-xdist each worker has a session of its own: the first worker that needs it makes it in the
    directory all workers share (under a lock); the others wait for it and read the same one."""
    if "PYTEST_XDIST_WORKER" not in os.environ:
        path = tmp_path_factory.mktemp(name)
        make(path)
        return path
    root = tmp_path_factory.getbasetemp().parent  # the controller's: every worker's own is under it
    path, done = root / name, root / f"{name}.done"
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes (also if this worker dies)
        if not done.exists():
            shutil.rmtree(path, ignore_errors=True)  # a worker that failed to make it may have left a part
            path.mkdir()
            make(path)
            done.touch()
    return path


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One uninterrupted 2-rank run of the fast config; the yardstick for every resume test."""
    return shared_run(tmp_path_factory, "reference", lambda run_dir: check_ok(run_train(run_dir)))



# The local tier's yardstick: 30 steps, a durable checkpoint every 10, a local snapshot every step (the kills wait
# for a given step's snapshot). test_local_resume and test_hardening's poisoned-snapshot test compare with it
# (train.on_unhealthy=stop there changes nothing in a healthy run: same losses, same weights).
LOCAL_OPTIONS = ("train.max_steps=30", "checkpoint.interval=10", "log.interval=1", "checkpoint.local_interval=1")


@pytest.fixture(scope="session")
def local_reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return shared_run(tmp_path_factory, "local-reference", lambda run_dir: check_ok(run_train(run_dir, *LOCAL_OPTIONS)))


def snapshot_held(rank_dirs, step: int) -> bool:
    """Whether every rank's local directory holds a snapshot marker of ``step``. Read while training goes on: a
    slot's marker is removed before the slot is written again, so one listed may be gone by the time it is read."""

    def holds(rank_dir) -> bool:
        for marker in rank_dir.glob("slot-*.json"):
            try:
                if f'"step": {step}' in marker.read_text():
                    return True
            except FileNotFoundError:
                continue
        return False

    return all(holds(d) for d in rank_dirs)


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

    def said(self, text: str) -> bool:
        """Whether the job has written ``text`` to its stdout or stderr so far."""
        return text in "".join(self._said[1]) or text in "".join(self._said[0])

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


# ---------------------------------------------------------------------------------------- the scenario marker
# A test is a scenario when its code, the fixtures it uses and the helpers of the tests they call (followed through
# other helpers, also those imported from conftest inside a function) both start a process and name a program worth
# starting: the Python interpreter (sys.executable, TORCHRUN) or a multiprocessing start. A Popen(["true"]) for a
# dead pid or a mount does not count. The names are read from the compiled code (co_names), so a new test that calls
# run_train, start_train, a helper around subprocess.run([sys.executable, ...]) or a fixture that does is marked
# without a list to keep up to date. One thing the code does not show: an in-process Checkpointer in
# mode=async_process spawns DCP's writer process, so a test parametrized with that mode is a scenario too.
_STARTS = {"Popen", "check_output", "check_call", "start_processes", "spawn"}
_STARTS_WITH_SUBPROCESS = {"run", "call"}
_PROGRAMS = {"executable", "TORCHRUN", "start_processes", "spawn"}
_PARAMETERS_THAT_START_PROCESSES = {"async_process"}


def _code_names(code: types.CodeType) -> set[str]:
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _code_names(const)
    return names


def _functions_of(obj) -> list[types.FunctionType]:
    """The Python functions behind a test, fixture or helper (a class: its methods)."""
    obj = inspect.unwrap(getattr(obj, "__func__", obj))
    if isinstance(obj, types.FunctionType):
        return [obj]
    if isinstance(obj, type):
        found = []
        for member in vars(obj).values():
            if isinstance(member, property):
                member = member.fget
            found += _functions_of(member) if member is not None else []
        return found
    return []


def _ours(obj) -> bool:
    """Defined in a file under tests/ (helpers are followed there, never into ftrain or libraries)."""
    try:
        return TESTS in Path(inspect.getfile(inspect.unwrap(obj))).resolve().parents
    except (TypeError, OSError):
        return False


def _launch_traits(obj, seen: dict) -> tuple[bool, bool]:
    """(starts a process, names a program) for obj and every helper of the tests it refers to, transitively."""
    key = id(obj)
    if key in seen:
        return seen[key]
    seen[key] = (False, False)  # a recursion ends here
    starts = program = isinstance(obj, type) and issubclass(obj, subprocess.Popen)  # Job
    for function in _functions_of(obj):
        names = _code_names(function.__code__)
        starts |= bool(names & _STARTS) or ("subprocess" in names and bool(names & _STARTS_WITH_SUBPROCESS))
        program |= bool(names & _PROGRAMS)
        for name in names:
            helper = function.__globals__.get(name, globals().get(name))  # `from conftest import ...` in a body
            if helper is not None and (inspect.isfunction(helper) or inspect.isclass(helper)) and _ours(helper):
                more = _launch_traits(helper, seen)
                starts, program = starts or more[0], program or more[1]
    seen[key] = (starts, program)
    return seen[key]


def _code_strings(code: types.CodeType) -> set[str]:
    found = {c for c in code.co_consts if isinstance(c, str)}
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            found |= _code_strings(const)
    return found


def _fixture_functions(item: pytest.Item) -> list:
    """The functions of the fixtures the item uses: those it names and those a fixture asks for by name
    (request.getfixturevalue("s3_env") is a string in its code)."""
    manager = item.session._fixturemanager
    definitions = dict(item._fixtureinfo.name2fixturedefs)
    wanted = list(getattr(item, "fixturenames", ()))
    functions, done = [], set()
    while wanted:
        name = wanted.pop()
        if name in done:
            continue
        done.add(name)
        defs = definitions.get(name)
        if defs is None:
            try:
                defs = manager.getfixturedefs(name, item)
            except Exception:  # not a fixture name, or pytest's internals changed: nothing to follow
                defs = None
        if not defs:
            continue
        function = defs[-1].func
        functions.append(function)
        wanted += list(defs[-1].argnames)
        if _ours(function):
            wanted += [s for s in _code_strings(inspect.unwrap(function).__code__) if s.isidentifier()]
    return functions


def starts_processes(item: pytest.Item, seen: dict | None = None) -> bool:
    seen = {} if seen is None else seen
    parts = [getattr(item, "function", None)]
    if hasattr(item, "_fixtureinfo"):
        parts += _fixture_functions(item)
    traits = [_launch_traits(part, seen) for part in parts if part is not None and _ours(part)]
    if any(t[0] for t in traits) and any(t[1] for t in traits):
        return True
    parameters = getattr(getattr(item, "callspec", None), "params", {})
    return any(isinstance(v, str) and v in _PARAMETERS_THAT_START_PROCESSES for v in parameters.values())


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "scenario: starts real processes (torchrun, the recipe, a CLI, spawned ranks); set in tests/conftest.py. "
        'The quick loop: bash scripts/test.sh -m "not scenario"',
    )


# ------------------------------------------------------------------------------- pytest-xdist: what stays together
# scripts/test.sh runs the suite on several workers with --dist loadgroup: a test goes to whichever worker is free,
# except those of one xdist_group, which go to one worker. A module- or class-scoped fixture (a reference run that
# several tests of a file compare with) is made once per worker that needs it, so the tests of a file that use such
# a fixture form one group: it is made once, as without xdist. Session fixtures that tests only read are
# shared otherwise (shared_run above).
_SHARED_SCOPES = {"module", "class", "package"}


def _uses_shared_fixture(item: pytest.Item) -> bool:
    for definitions in getattr(getattr(item, "_fixtureinfo", None), "name2fixturedefs", {}).values():
        if definitions and definitions[-1].scope in _SHARED_SCOPES and _ours(definitions[-1].func):
            return True
    return False


# tryfirst: on a worker, xdist reads the xdist_group marks in a hook of its own, registered after this file's and
# so called before it; the marks must be on the items by then.
@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    seen: dict = {}
    for item in items:
        if starts_processes(item, seen):
            item.add_marker(pytest.mark.scenario)
        if _uses_shared_fixture(item) and item.get_closest_marker("xdist_group") is None:
            item.add_marker(pytest.mark.xdist_group(item.nodeid.split("::")[0]))
