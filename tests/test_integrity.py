"""Damaged, malicious and contested checkpoints, and a disk that fills up mid-save: real files, real processes."""

import json
import os
import pickle
import shutil
import subprocess
import sys
import time

import pytest

from conftest import check_ok, kill_job, run_train, start_train, train_cmd, wait_for
from ftrain.harness.chaos import Job, compare_runs
from ftrain.checkpoint import integrity, layout, sums
from ftrain.checkpoint.lock import LockedError, RunLock


def copy_run(reference_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(reference_run, run_dir)
    return run_dir


def step_path(run_dir, step):
    return run_dir / "checkpoints" / f"step_{step:08d}"


def recommit(path):
    """Rewrite the marker so sizes and checksums match the (tampered) files, as a careful attacker would."""
    marker = layout.read_marker(path)
    (path / layout.MARKER).unlink()
    info = {k: v for k, v in marker.items() if k not in ("files", "total_bytes", "committed_at", "format_version")}
    layout.write_marker(path, info, integrity.file_entries(path))


@pytest.mark.parametrize("damage", ["flip", pytest.param("truncate", marks=pytest.mark.soak)])
def test_damaged_latest_falls_back_to_the_previous(damage, reference_run, tmp_path):
    run_dir = copy_run(reference_run, tmp_path)
    victim = step_path(run_dir, 20) / "__1_0.distcp"
    data = bytearray(victim.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0x40
    else:
        data = data[: len(data) - 100]
    victim.write_bytes(bytes(data))

    proc = run_train(run_dir)
    check_ok(proc)
    why = "fails its checksum" if damage == "flip" else "is "
    assert f"step_00000020 is unusable (__1_0.distcp {why}" in proc.stderr, proc.stderr[-3000:]
    assert "resumed from" in proc.stderr and "step_00000015 (step 15)" in proc.stderr
    same_weights, same_losses, diffs = compare_runs(run_dir, reference_run)
    assert same_weights and same_losses, diffs


def test_malformed_newest_marker_falls_back_to_the_previous(reference_run, tmp_path):
    """The issue's case: "size" renamed in the newest marker crashed resume with KeyError and hid every
    checkpoint from ftrain-ckpt list. Now it is damage: the run resumes from the previous one, bit for bit."""
    run_dir = copy_run(reference_run, tmp_path)
    marker_path = step_path(run_dir, 20) / layout.MARKER
    marker = json.loads(marker_path.read_text())
    marker["files"][0]["sz"] = marker["files"][0].pop("size")
    marker_path.write_text(json.dumps(marker))

    listed = subprocess.run(
        [sys.executable, "-m", "ftrain.ckpt_cli", "list", str(run_dir)], capture_output=True, text=True, timeout=120
    )
    assert listed.returncode == 0 and "Traceback" not in listed.stderr, listed.stderr
    rows = [line.split() for line in listed.stdout.splitlines()[1:] if not line.lstrip().startswith("!")]
    statuses = {int(row[0]): row[1] for row in rows}
    assert statuses[20] == "damaged" and statuses[15] == "complete" and "size is missing" in listed.stdout
    proc = run_train(run_dir)
    check_ok(proc)
    assert "step_00000020 is unusable" in proc.stderr and "size is missing" in proc.stderr, proc.stderr[-3000:]
    assert "step_00000015 (step 15)" in proc.stderr
    same_weights, same_losses, diffs = compare_runs(run_dir, reference_run)
    assert same_weights and same_losses, diffs


def test_nothing_usable_stops_with_what_was_tried(reference_run, tmp_path):
    run_dir = copy_run(reference_run, tmp_path)
    for step in (10, 15, 20):
        (step_path(run_dir, step) / ".metadata").write_bytes(b"garbage")
    proc = run_train(run_dir)
    assert proc.returncode == 1
    error = [line for line in proc.stderr.splitlines() if line.startswith("ftrain: error:")][0]
    assert "no usable checkpoint; tried" in error
    assert all(f"step_000000{s}" in error for s in ("10", "15", "20"))
    assert "starting fresh" not in proc.stderr


class RunsACommand:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def test_crafted_metadata_is_refused_and_never_runs(reference_run, tmp_path):
    run_dir = copy_run(reference_run, tmp_path)
    pwned = tmp_path / "PWNED"
    latest = step_path(run_dir, 20)
    (latest / ".metadata").write_bytes(pickle.dumps(RunsACommand(pwned)))
    recommit(latest)  # every size and checksum matches: verification reads .metadata safely and refuses it
    assert any("posix.system" in problem for problem in integrity.verify(latest))

    proc = run_train(run_dir, "checkpoint.resume=20")
    assert proc.returncode == 1
    assert "refers to posix.system, which ftrain does not load" in proc.stderr
    assert not pwned.exists(), "loading the checkpoint ran the attacker's command"


def test_crafted_entry_is_refused_and_never_runs(reference_run, tmp_path):
    """A checkpoint whose metadata is honest but one of whose pickled entries runs a command."""
    import torch.distributed.checkpoint as dcp

    from ftrain.checkpoint.reader import read_state

    run_dir = copy_run(reference_run, tmp_path)
    pwned = tmp_path / "PWNED"
    source = step_path(run_dir, 20)
    state = read_state(source)
    state["train"]["scheduler"] = RunsACommand(pwned)
    crafted = step_path(run_dir, 25)
    dcp.save(state, checkpoint_id=str(crafted), no_dist=True)
    kept = ("world_size", "mode", "model", "run_name", "state_keys")
    info = {k: v for k, v in layout.read_marker(source).items() if k in kept}
    layout.write_marker(crafted, {"step": 25, **info}, integrity.file_entries(crafted))

    proc = run_train(run_dir, "checkpoint.resume=25")
    assert proc.returncode == 1
    assert "needs code execution to load" in proc.stderr, proc.stderr[-3000:]
    assert not pwned.exists(), "loading the checkpoint ran the attacker's command"


def test_second_job_on_the_same_run_dir_is_refused(tmp_path):
    first = start_train(tmp_path, "train.max_steps=100000", "checkpoint.interval=1000", nproc=0)
    try:
        wait_for(lambda: (tmp_path / "LOCK").is_file() and (tmp_path / "tb").is_dir(), proc=first, what="first job")
        holder = json.loads((tmp_path / "LOCK").read_text())
        second = run_train(tmp_path, nproc=2)
        assert second.returncode != 0
        assert f"is in use by pid {holder['pid']} on {holder['host']}" in second.stderr
        assert first.poll() is None, "the first job must be unharmed"
    finally:
        kill_job(first)
    # the killed job's lock is stale now: a new job takes over
    check_ok(run_train(tmp_path, "train.max_steps=3", nproc=0))
    assert not (tmp_path / "LOCK").exists()


def test_lock_staleness_rules(tmp_path):
    mine = RunLock(tmp_path)
    mine.acquire()
    with pytest.raises(LockedError, match=f"pid {os.getpid()}"):
        RunLock(tmp_path).acquire()  # same host, live process
    mine.release()

    dead = subprocess.Popen(["true"])
    dead.wait()
    (tmp_path / "LOCK").write_text(json.dumps({"host": mine.me["host"], "pid": dead.pid, "process_start": "1"}))
    RunLock(tmp_path).acquire()  # same host, process gone: taken over

    elsewhere = {"host": "another-node", "pid": 1, "process_start": "1", "job": ""}
    (tmp_path / "LOCK").write_text(json.dumps(elsewhere))
    with pytest.raises(LockedError, match="another-node"):
        RunLock(tmp_path, stale_after_s=60).acquire()  # fresh heartbeat on another host
    old = time.time() - 120
    os.utime(tmp_path / "LOCK", (old, old))
    RunLock(tmp_path, stale_after_s=60).acquire()  # its heartbeat stopped: taken over


@pytest.fixture
def small_disk(tmp_path):
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", str(mount_point)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a size-limited tmpfs here: {done.stderr.decode().strip()}")
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)], check=False)


def fill(disk, leave_bytes):
    stat = os.statvfs(disk)
    free = stat.f_bavail * stat.f_frsize
    with open(disk / "filler", "wb") as handle:
        handle.write(b"\0" * max(free - leave_bytes, 0))


@pytest.mark.parametrize("on_failure", ["continue", pytest.param("abort", marks=pytest.mark.soak)])
def test_full_disk_mid_run(on_failure, small_disk, reference_run, tmp_path, monkeypatch):
    """The disk fills up after step 5 is committed: step 10's save fails for real (ENOSPC)."""
    run_dir = small_disk / "run"
    log = tmp_path / "job.log"
    # Hold step 5's commit thread for 3 s, so step 10's save waits and the disk is full before it writes.
    monkeypatch.setenv("FTRAIN_FAULT", "after_commit@5")
    monkeypatch.setenv("FTRAIN_FAULT_SECONDS", "3")
    job = Job(train_cmd(run_dir, f"checkpoint.on_failure={on_failure}", "log.interval=1", nproc=2), log, run_dir)
    wait_for(lambda: (step_path(run_dir, 5) / "COMPLETE").is_file(), what="step 5", proc=job.proc)
    fill(small_disk, leave_bytes=1 << 20)  # 1 MB left: the next checkpoint (6 MB) cannot fit
    wait_for(lambda: "checkpoint step 10 FAILED" in log.read_text(), what="the failed save", proc=job.proc)
    (small_disk / "filler").unlink()
    code = job.wait(timeout=240)
    text = log.read_text()
    cause = text.split("checkpoint step 10 FAILED on rank 0")[1].splitlines()[0]
    # torch's stream writer sometimes turns ENOSPC into "unexpected pos": the free-space note tells the user
    assert str(run_dir) in cause and ("No space left on device" in cause or "unexpected pos" in cause), cause
    assert "MB free on the checkpoint filesystem" in cause
    assert not (step_path(run_dir, 10) / "COMPLETE").exists()
    assert integrity.verify(step_path(run_dir, 5)) == []  # the earlier checkpoint is untouched
    if on_failure == "continue":
        assert code == 0
        assert (step_path(run_dir, 20) / "COMPLETE").is_file()
        same_weights, same_losses, diffs = compare_runs(run_dir, reference_run)
        assert same_weights and same_losses, diffs
    else:
        assert code != 0 and "checkpoint.on_failure=abort" in text


def test_new_checkpoints_carry_xxh3_and_crc32_ones_still_verify(reference_run, tmp_path):
    """Checkpoints written now record xxh3-64 per file; one that carries CRC-32 (as written before) verifies the
    same way, and a changed byte fails either sum."""
    step_dir = layout.latest_complete(reference_run / "checkpoints").path
    entries = layout.read_marker(step_dir)["files"]
    assert all(layout.XXH3 in e and layout.CRC32 not in e for e in entries)
    copy = tmp_path / step_dir.name
    shutil.copytree(step_dir, copy)
    marker = json.loads((copy / layout.MARKER).read_text())
    for entry in marker["files"]:
        del entry[layout.XXH3]
        entry[layout.CRC32] = sums.file_sum(copy / entry["name"], layout.CRC32)
    (copy / layout.MARKER).write_text(json.dumps(marker))
    assert integrity.verify(copy) == []
    data = next(copy.glob("*.distcp"))
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 1
    data.write_bytes(bytes(raw))
    problems = integrity.verify(copy)
    assert len(problems) == 1 and "fails its checksum (crc32" in problems[0], problems
