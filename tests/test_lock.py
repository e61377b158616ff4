"""The run directory's LOCK under real races: concurrent launches, stale locks, torchrun launches, malformed files.

The racing jobs are real processes that load ``ftrain/checkpoint/lock.py`` alone (no torch import), wait for a
start file together, try ``RunLock.acquire()`` and report; the winner holds the lock until every report is in.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ftrain.checkpoint.lock import DOOR_NAME, LOCK_NAME, LockedError, RunLock, live_holder

LOCK_PY = Path(os.environ.get("FTRAIN_LOCK_PY", Path(__file__).resolve().parents[1] / "ftrain/checkpoint/lock.py"))

LOAD_LOCK = """
import importlib.util, sys
spec = importlib.util.spec_from_file_location("lock_under_test", sys.argv[1])
lock = importlib.util.module_from_spec(spec)
sys.modules["lock_under_test"] = lock
spec.loader.exec_module(lock)
"""

RACER = LOAD_LOCK + """
import os, time, traceback
from pathlib import Path
base, me, trials = Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])

def report(trial, text):
    tmp = base / f".r{trial}.{me}"
    tmp.write_text(text)
    os.rename(tmp, base / f"r{trial}.{me}")

for trial in range(trials):
    while not (base / f"go{trial}").exists():
        time.sleep(0.0005)
    held = None
    try:
        held = lock.RunLock(base / f"run{trial}")
        held.acquire()
        report(trial, f"won {os.getpid()}")
    except lock.LockedError as exc:
        held = None
        report(trial, f"locked {exc}")
    except BaseException:
        held = None
        report(trial, "error " + traceback.format_exc().replace(chr(10), " | "))
    while not (base / f"done{trial}").exists():
        time.sleep(0.002)
    if held is not None:
        held.release()
"""

TAKERS, TRIALS = 6, 20


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def wait_until(condition, what: str, timeout: float = 30.0) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


def prepare(run: Path, before: str) -> None:
    run.mkdir()
    lock = run / LOCK_NAME
    if before == "dead holder":
        lock.write_text(json.dumps({"host": socket.gethostname(), "pid": dead_pid(), "process_start": "1"}))
    elif before == "old unreadable":
        lock.write_text("")
        os.utime(lock, (time.time() - 600, time.time() - 600))


@pytest.mark.parametrize("before", ["no lock", "dead holder", "old unreadable"])
def test_exactly_one_of_many_concurrent_launches_wins(before, tmp_path):
    for trial in range(TRIALS):
        prepare(tmp_path / f"run{trial}", before)
    racers = [
        subprocess.Popen([sys.executable, "-c", RACER, str(LOCK_PY), str(tmp_path), str(i), str(TRIALS)])
        for i in range(TAKERS)
    ]
    outcomes = []
    try:
        for trial in range(TRIALS):
            (tmp_path / f"go{trial}").touch()
            reports = [tmp_path / f"r{trial}.{i}" for i in range(TAKERS)]
            wait_until(lambda: all(r.exists() for r in reports), f"trial {trial}'s reports")
            texts = [r.read_text() for r in reports]
            holder = json.loads((tmp_path / f"run{trial}" / LOCK_NAME).read_text())
            (tmp_path / f"done{trial}").touch()
            outcomes.append((trial, texts, holder))
        for racer in racers:
            assert racer.wait(timeout=30) == 0
    finally:
        for racer in racers:
            if racer.poll() is None:
                racer.kill()
                racer.wait()
    for trial, texts, holder in outcomes:
        winners = [t for t in texts if t.startswith("won")]
        assert not [t for t in texts if t.startswith("error")], texts
        assert len(winners) == 1, f"trial {trial} ({before}): {len(winners)} winners: {texts}"
        assert winners[0] == f"won {holder['pid']}", (winners, holder)
        assert all(f"in use by pid {holder['pid']}" in t for t in texts if t.startswith("locked")), texts
    leftovers = [p for p in tmp_path.glob(f"run*/.{LOCK_NAME}.*") if p.name != DOOR_NAME]
    assert not leftovers, "temporary or stale lock files were left behind"
    assert not list(tmp_path.glob(f"run*/{LOCK_NAME}")), "a winner's release left its LOCK behind"


# A stand-in for a torchrun agent: it starts "rounds" (children with TORCHELASTIC_RUN_ID=none) on request and
# keeps running between them, as torchrun does across restart rounds.
HOLDER = LOAD_LOCK + """
import os, time
from pathlib import Path
try:
    lock.RunLock(Path(sys.argv[2])).acquire()
    print(f"won {os.getpid()}", flush=True)
except lock.LockedError as exc:
    print(f"locked {exc}", flush=True)
    sys.exit(3)
time.sleep(120)
"""

AGENT = """
import os, subprocess, sys
holder, lock_py, run_dir, torchrun = sys.argv[1:5]
env = {**os.environ, "TORCHELASTIC_RUN_ID": "none", "TORCHELASTIC_RESTART_COUNT": "0"}
if torchrun != "torchrun":
    env = {k: v for k, v in os.environ.items() if not k.startswith("TORCHELASTIC_")}
rounds = []
for line in sys.stdin:
    if line.strip() == "round":
        rounds.append(subprocess.Popen([sys.executable, "-c", holder, lock_py, run_dir], env=env,
                                       stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True))
        print(rounds[-1].stdout.readline().strip(), flush=True)
    elif line.strip() == "kill":
        rounds[-1].kill()
        rounds[-1].wait()
        print("killed", flush=True)
for proc in rounds:
    proc.kill()
    proc.wait()
"""


class Agent:
    def __init__(self, run_dir: Path, kind: str = "torchrun") -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", AGENT, HOLDER, str(LOCK_PY), str(run_dir), kind],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def ask(self, command: str) -> str:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self.proc.stdout.readline().strip()

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


@pytest.fixture
def agents(tmp_path):
    started: list[Agent] = []

    def start(kind: str = "torchrun") -> Agent:
        started.append(Agent(tmp_path, kind))
        return started[-1]

    yield start
    for agent in started:
        agent.close()


def test_another_launch_with_the_same_run_id_cannot_take_a_live_lock(agents, tmp_path):
    first, second = agents(), agents()
    held = first.ask("round")
    assert held.startswith("won"), held
    refused = second.ask("round")
    assert refused.startswith("locked") and f"in use by pid {held.split()[1]}" in refused, refused
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == int(held.split()[1])


@pytest.mark.parametrize("previous_round", ["alive", "killed"])
def test_a_restart_round_of_the_same_launch_takes_its_own_lock(previous_round, agents, tmp_path):
    agent = agents()
    first = agent.ask("round")
    assert first.startswith("won"), first
    if previous_round == "killed":
        assert agent.ask("kill") == "killed"
    second = agent.ask("round")
    assert second.startswith("won"), second
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == int(second.split()[1])


def test_outside_torchrun_two_children_of_one_parent_are_two_jobs(agents):
    agent = agents("plain")
    assert agent.ask("round").startswith("won")
    refused = agent.ask("round")
    assert refused.startswith("locked") and "in use by pid" in refused, refused


HOST = socket.gethostname()
MALFORMED = {
    "empty": b"",
    "garbage": b"\x00garbage\xff\xfe",
    "truncated JSON": b'{"host": "' + HOST.encode() + b'", "pi',
    "null": b"null",
    "a list": b"[1, 2]",
    "a number": b"42",
    "pid null": b'{"pid": null}',
    "host and pid null": b'{"host": null, "pid": null}',
    "no pid": json.dumps({"host": HOST}).encode(),
    "no host": b'{"pid": 1}',
    "pid a string": json.dumps({"host": HOST, "pid": "123"}).encode(),
    "pid a boolean": json.dumps({"host": HOST, "pid": True}).encode(),
    "pid negative": json.dumps({"host": HOST, "pid": -4}).encode(),
    "pid a float": json.dumps({"host": HOST, "pid": 1.5}).encode(),
    "pid huge": json.dumps({"host": HOST, "pid": 10**30}).encode(),
    "host a list": json.dumps({"host": [HOST], "pid": 1}).encode(),
    "process_start a list": json.dumps({"host": HOST, "pid": 1, "process_start": [1]}).encode(),
    "agent_pid a string": json.dumps({"host": HOST, "pid": 1, "agent_pid": "7"}).encode(),
    "too large": b'{"host": "x", "pid": 1, "pad": "' + b"x" * 100_000 + b'"}',
}


@pytest.mark.parametrize("content", list(MALFORMED.values()), ids=list(MALFORMED))
def test_a_malformed_lock_is_held_while_fresh_and_stale_when_old(content, tmp_path):
    lock = tmp_path / LOCK_NAME
    lock.write_bytes(content)
    with pytest.raises(LockedError, match=fr"has a {LOCK_NAME} that .* \(touched 0 s ago\)") as refused:
        RunLock(tmp_path, stale_after_s=60).acquire()
    assert "\n" not in str(refused.value)
    assert lock.read_bytes() == content, "a refused acquire must leave the lock alone"
    assert live_holder(tmp_path) is not None

    os.utime(lock, (time.time() - 120, time.time() - 120))
    assert live_holder(tmp_path) is None
    mine = RunLock(tmp_path, stale_after_s=60)
    mine.acquire()
    assert json.loads(lock.read_text())["pid"] == os.getpid()
    mine.release()
    assert not lock.exists()


@pytest.mark.parametrize("kind", ["directory", "symlink"])
def test_a_lock_that_is_not_a_file_is_never_taken(kind, tmp_path):
    lock = tmp_path / LOCK_NAME
    if kind == "directory":
        lock.mkdir()
    else:
        (tmp_path / "elsewhere").write_text(json.dumps({"host": HOST, "pid": dead_pid()}))
        lock.symlink_to(tmp_path / "elsewhere")
    os.utime(lock, (time.time() - 600, time.time() - 600), follow_symlinks=False)
    with pytest.raises(LockedError, match="remove it by hand"):
        RunLock(tmp_path, stale_after_s=1).acquire()
    assert lock.is_dir() if kind == "directory" else lock.is_symlink()


def test_release_and_heartbeat_leave_a_lock_that_is_no_longer_ours_alone(tmp_path):
    lock = tmp_path / LOCK_NAME
    mine = RunLock(tmp_path, heartbeat_s=0.05)
    mine.acquire()
    # Another RunLock of this very process (same host and pid) replaced it, as a takeover would.
    other = dict(mine.me, token="someone-else")
    lock.unlink()
    lock.write_text(json.dumps(other))
    old = time.time() - 300
    os.utime(lock, (old, old))
    time.sleep(0.3)
    assert lock.stat().st_mtime == pytest.approx(old, abs=1), "the heartbeat touched a lock it does not hold"
    mine.release()
    assert json.loads(lock.read_text())["token"] == "someone-else", "release removed a lock it does not hold"


def test_heartbeat_keeps_a_held_lock_fresh(tmp_path):
    lock = tmp_path / LOCK_NAME
    mine = RunLock(tmp_path, heartbeat_s=0.05)
    mine.acquire()
    os.utime(lock, (time.time() - 300, time.time() - 300))
    wait_until(lambda: time.time() - lock.stat().st_mtime < 5, "a heartbeat", timeout=5)
    assert "in use by pid" in live_holder(tmp_path)
    mine.release()
    assert live_holder(tmp_path) is None


def test_an_unwritable_run_dir_is_one_clear_error(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root writes into read-only directories")
    tmp_path.chmod(0o500)
    try:
        with pytest.raises(LockedError, match=f"cannot create a lock in {tmp_path}: Permission denied"):
            RunLock(tmp_path).acquire()
    finally:
        tmp_path.chmod(0o700)


def test_a_run_dir_that_is_a_file_is_one_clear_error(tmp_path):
    (tmp_path / "run").write_text("not a directory")
    with pytest.raises(LockedError, match=f"cannot create a lock in {tmp_path / 'run'}: File exists"):
        RunLock(tmp_path / "run").acquire()
