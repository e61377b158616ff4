"""The promises of the durable tier kept by every other surface (issue #28): each attack that once worked, run
with real processes, shown not to work, next to the harmless case that must still work."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from ftrain import tags
from ftrain.checkpoint import layout
from ftrain.checkpoint.local import default_directory
from ftrain.run_status import read_status

from conftest import (
    LOCAL_OPTIONS,
    REPO,
    assert_same_tensors,
    check_ok,
    checkpoint_tensors,
    kill_job,
    run_train,
    scalars,
    snapshot_held,
    start_train,
    wait_for,
)

# local_interval=1: the kills below wait for the snapshot of a given step (auto would pick its own steps)
OPTIONS = ("train.max_steps=20", "checkpoint.interval=10", "log.interval=1", "checkpoint.local_interval=1")
PAUSE_13 = {"FTRAIN_FAULT": "after_local_snapshot@13", "FTRAIN_FAULT_SECONDS": "600"}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("hardening-reference")
    check_ok(run_train(run_dir, *OPTIONS))
    return run_dir


def _same_as(run_dir: Path, reference: Path) -> None:
    assert scalars(run_dir / "tb", tags.LOSS) == scalars(reference / "tb", tags.LOSS)
    final = layout.step_dir("checkpoints", 20)
    assert_same_tensors(checkpoint_tensors(run_dir / final), checkpoint_tensors(reference / final))


def _tree(path: Path) -> dict[str, str]:
    """Every file under ``path`` (links not followed) with a digest of its bytes: 'exactly as it was'."""
    found = {}
    for root, dirs, files in os.walk(path, followlinks=False):
        for name in dirs + files:
            full = Path(root, name)
            rel = str(full.relative_to(path))
            if full.is_symlink():
                found[rel] = "link -> " + os.readlink(full)
            elif full.is_file():
                found[rel] = hashlib.sha256(full.read_bytes()).hexdigest()
            else:
                found[rel] = "dir"
    return found


def _kill_at_13(run_dir: Path, *overrides: str, local: Path | None = None) -> list[Path]:
    """SIGKILL the job with step 13's snapshot complete on both ranks (newest durable checkpoint: step 10)."""
    proc = start_train(run_dir, *OPTIONS, *overrides, env=PAUSE_13)
    wait_for(lambda: (read_status(run_dir) or 0) and read_status(run_dir).step >= 13, what="step 13", proc=proc)
    directory = local or default_directory(run_dir)
    rank_dirs = [directory / f"rank-{rank}" for rank in (0, 1)]
    wait_for(lambda: snapshot_held(rank_dirs, 13),
             what="step 13's snapshot markers", proc=proc)
    kill_job(proc)
    return rank_dirs


# ------------------------------------------------------------------------- 1: one run per local directory
def test_a_second_run_on_the_same_local_dir_leaves_the_first_runs_snapshots_alone(reference, tmp_path):
    """Run A is killed with its snapshots in a shared local_dir; run B (another run directory, same local_dir)
    must not use or touch them: it trains without the tier (one warning), and A still resumes from its own
    snapshot of step 13 and ends bit for bit as the uninterrupted run."""
    local = tmp_path / "local"
    run_a, run_b = tmp_path / "a", tmp_path / "b"
    _kill_at_13(run_a, f"checkpoint.local_dir={local}", local=local)
    before = _tree(local)
    other = run_train(run_b, *OPTIONS, f"checkpoint.local_dir={local}")
    check_ok(other)
    assert other.stderr.count("holds the snapshots of another run") == 2, other.stderr[-3000:]  # one per rank
    after = _tree(local)
    assert after == before, {k: (before.get(k), after.get(k)) for k in set(before) | set(after) if before.get(k) != after.get(k)}
    _same_as(run_b, reference)
    resumed = run_train(run_a, *OPTIONS, f"checkpoint.local_dir={local}")
    check_ok(resumed)
    assert "resumed from the local snapshot of step 13" in resumed.stderr, resumed.stderr[-3000:]
    _same_as(run_a, reference)
    assert not local.exists()  # made by ftrain for run A, removed once A finished
    verify = subprocess.run([sys.executable, "-m", "ftrain.ckpt_cli", "verify", str(run_a)], capture_output=True,
                            text=True, timeout=120, cwd=REPO)
    assert verify.returncode == 0, verify.stderr


# ---------------------------------------------------------------- 3, 14: never delete or follow what is not ours
def test_a_local_dir_holding_the_users_files_is_not_used_and_stays_as_it_was(reference, tmp_path):
    local = tmp_path / "mine"
    (local / "rank-0").mkdir(parents=True)
    (local / "rank-0" / "notes.txt").write_text("the user's own file\n")
    (local / "keep.bin").write_bytes(b"\0" * 100)
    before = _tree(local)
    proc = run_train(tmp_path / "run", *OPTIONS, f"checkpoint.local_dir={local}")
    check_ok(proc)
    assert "files ftrain did not make (notes.txt)" in proc.stderr, proc.stderr[-3000:]
    assert _tree(local) == before
    _same_as(tmp_path / "run", reference)


def test_an_existing_empty_local_dir_of_the_user_is_used_and_kept(tmp_path):
    local = tmp_path / "empty"
    local.mkdir()
    proc = run_train(tmp_path / "run", *OPTIONS, f"checkpoint.local_dir={local}", "log.level=debug")
    check_ok(proc)
    assert "local snapshots off" not in proc.stderr
    assert local.is_dir() and not any(local.iterdir())  # ftrain's files gone, the user's directory kept


def test_a_symlink_planted_at_the_default_local_dir_is_never_followed(reference, tmp_path):
    """Another user (or anyone) plants /dev/shm/ftrain-<hash> as a link to a victim directory that even looks
    like snapshots: ftrain neither writes nor deletes through it, warns once, and trains without the tier."""
    run_dir = tmp_path / "run"
    victim = tmp_path / "victim"
    (victim / "rank-0").mkdir(parents=True)
    for name in ("slot-0.data", "slot-0.json", "slot-0.skel", "precious.txt"):
        (victim / "rank-0" / name).write_text(name)
    planted = default_directory(run_dir)
    planted.symlink_to(victim)
    try:
        before = _tree(victim)
        proc = run_train(run_dir, *OPTIONS)
        check_ok(proc)
        assert proc.stderr.count("is not a directory (a symbolic link or a file)") == 2, proc.stderr[-3000:]  # per rank
        assert _tree(victim) == before
        assert planted.is_symlink()
        _same_as(run_dir, reference)
    finally:
        planted.unlink()


# ---------------------------------------------------------------------------------- 15: no snapshot leaks
def test_a_finished_run_started_again_frees_the_snapshots_it_left(tmp_path):
    """Killed right after its final commit (snapshots still there), started again: 'nothing to do', and the
    snapshots are freed."""
    run_dir = tmp_path / "run"
    proc = start_train(run_dir, *OPTIONS, env={"FTRAIN_FAULT": "after_commit@20", "FTRAIN_FAULT_SECONDS": "600"})
    wait_for(lambda: layout.latest_complete(run_dir / "checkpoints") is not None
             and layout.latest_complete(run_dir / "checkpoints").step == 20, what="step 20 committed", proc=proc)
    kill_job(proc)
    assert any(default_directory(run_dir).glob("rank-*/slot-*.json"))
    again = run_train(run_dir, *OPTIONS)
    check_ok(again)
    assert "nothing to do" in again.stderr
    assert not default_directory(run_dir).exists()


# --------------------------------------------------------------------------------- 7: no poisoned snapshot
def test_a_poisoned_snapshot_is_never_resumed(local_reference, tmp_path):
    """A NaN written into a parameter after step 13's update, with the loss still finite: steps 13-20 are
    snapshotted with it, the durable save of step 20 refuses it and the run stops (65). The rerun must not resume
    those snapshots: it resumes the healthy durable checkpoint of step 10 and ends as the uninterrupted run."""
    options = (*LOCAL_OPTIONS, "train.on_unhealthy=stop")
    reference = local_reference  # the same run without on_unhealthy=stop, which changes nothing in a healthy run
    run_dir = tmp_path / "run"
    poisoned = run_train(run_dir, *options, "debug.poison_param_at_steps=[13]")
    assert poisoned.returncode != 0 and "exitcode: 65" in poisoned.stderr, poisoned.stderr[-3000:]  # torchrun says 1
    steps = [json.loads(p.read_text())["step"] for p in default_directory(run_dir).glob("rank-0/slot-*.json")]
    assert max(steps) > 13  # the control: poisoned snapshots are there to be (not) used
    rerun = run_train(run_dir, *options)
    check_ok(rerun)
    assert "holds NaN or Inf" in rerun.stderr and "resumed from the local snapshot" not in rerun.stderr
    assert "step_00000010 (step 10)" in rerun.stderr, rerun.stderr[-3000:]
    assert scalars(run_dir / "tb", tags.LOSS) == scalars(reference / "tb", tags.LOSS)
    final = layout.step_dir("checkpoints", 30)
    assert_same_tensors(checkpoint_tensors(run_dir / final), checkpoint_tensors(reference / final))


# ------------------------------------------------------------------------- 13: a rewind stays a rewind
def test_snapshots_of_a_timeline_left_by_an_explicit_rewind_are_never_resumed(reference, tmp_path):
    """Killed with snapshots of step 13; restarted on purpose from step 10 with the tier off (checkpoint.resume=10,
    local_interval=0) and killed again before its step 20 commits; the next plain restart (tier on) must not
    resume the abandoned timeline's snapshot of step 13 but the durable step 10."""
    run_dir = tmp_path / "run"
    _kill_at_13(run_dir)
    rewind = start_train(run_dir, *OPTIONS, "checkpoint.resume=10", "checkpoint.local_interval=0",
                         env={"FTRAIN_FAULT": "before_commit@20", "FTRAIN_FAULT_SECONDS": "600"})
    wait_for(lambda: (read_status(run_dir) or 0) and read_status(run_dir).step >= 20, what="step 20", proc=rewind)
    kill_job(rewind)
    assert any('"step": 13' in p.read_text() for p in default_directory(run_dir).glob("rank-0/slot-*.json"))
    again = run_train(run_dir, *OPTIONS)
    check_ok(again)
    assert "resumed from the local snapshot" not in again.stderr, again.stderr[-3000:]
    assert "step_00000010 (step 10)" in again.stderr
    _same_as(run_dir, reference)


# ------------------------------------------------------------------ 4, 5, 6, 10: the Checkpointer API misused
LOOP = textwrap.dedent(
    """
    import sys, torch, torch.nn as nn
    import ftrain
    from ftrain.checkpoint.errors import CheckpointError

    def build():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
        return model, torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)

    def step(model, optimizer):
        loss = model(torch.randn(8, 16)).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    def attempt(what, call):
        try:
            call()
        except CheckpointError as exc:
            assert "\\n" not in str(exc), str(exc)
            print(f"{what}: refused: {exc}")
        else:
            print(f"{what}: done")
    """
)


def _run_loop(tmp_path: Path, body: str) -> subprocess.CompletedProcess:
    script = tmp_path / "loop.py"
    script.write_text(LOOP + textwrap.dedent(body))
    return subprocess.run([sys.executable, str(script), str(tmp_path / "run")], capture_output=True, text=True,
                          timeout=300, cwd=REPO)


def test_a_committed_checkpoint_is_never_rewritten_and_a_closed_checkpointer_never_saves(tmp_path):
    proc = _run_loop(tmp_path, """
        import os
        from pathlib import Path
        from ftrain.checkpoint.lock import RunLock
        run = Path(sys.argv[1])
        model, optimizer = build()
        ckpt = ftrain.Checkpointer(run, model=model, optimizer=optimizer, interval=100)
        ckpt.load()
        for n in range(1, 6):
            step(model, optimizer)
        ckpt.save(5)
        ckpt.wait()
        marker = run / "checkpoints" / "step_00000005" / "COMPLETE"
        before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in marker.parent.iterdir()}
        step(model, optimizer)
        attempt("save 5 again", lambda: ckpt.save(5))
        attempt("maybe_save 5 last", lambda: ckpt.maybe_save(5, last=True))
        ckpt.wait()
        after = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in marker.parent.iterdir()}
        print("step 5 unchanged:", before == after)
        ckpt.close()
        other = RunLock(run)
        other.acquire()  # another job takes the run directory
        attempt("maybe_save after close", lambda: ckpt.maybe_save(10, last=True))
        attempt("save after close", lambda: ckpt.save(11))
        attempt("wait after close", lambda: ckpt.wait())
        attempt("load after close", lambda: ckpt.load())
        print("steps:", sorted(int(p.name[5:]) for p in (run / "checkpoints").glob("step_*")))
        other.release()
        """)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "save 5 again: refused: step 5 is already saved" in out
    assert "maybe_save 5 last: refused" not in out  # an already saved last step is simply not saved again
    assert "step 5 unchanged: True" in out
    for what in ("maybe_save", "save", "wait", "load"):
        assert f"{what} after close: refused: Checkpointer.{what}() after close()" in out, out
    assert "steps: [5]" in out


def test_extra_state_that_no_resume_could_load_is_refused_before_anything_is_saved(tmp_path):
    proc = _run_loop(tmp_path, """
        import datetime, numpy
        from pathlib import Path

        class Extra:
            def __init__(self, value):
                self.value = value
            def state_dict(self):
                return {"count": 3, "nested": {"history": [1.0, 2.0], "what": self.value}}
            def load_state_dict(self, state):
                self.value = state["nested"]["what"]

        run = Path(sys.argv[1])
        for name, value in [("array", numpy.zeros(3)), ("when", datetime.datetime(2026, 1, 1)), ("plain", "ok")]:
            model, optimizer = build()
            with ftrain.Checkpointer(run / name, model=model, optimizer=optimizer, interval=1,
                                     extra={"ema": Extra(value)}) as ckpt:
                ckpt.load()
                step(model, optimizer)
                attempt(name, lambda: ckpt.maybe_save(1, last=True))
            print(name, "checkpoints:", sorted(p.name for p in (run / name / "checkpoints").glob("step_*")))
        """)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "array: refused: extra state 'ema': entry nested.what is a numpy.ndarray" in out, out
    assert "when: refused: extra state 'ema': entry nested.what is a datetime.datetime" in out, out
    assert "array checkpoints: []" in out and "when checkpoints: []" in out
    assert "plain: done" in out and "plain checkpoints: ['step_00000001']" in out


def test_saving_before_the_first_optimizer_step_changes_nothing_training_computes(tmp_path):
    """A save (and a local snapshot) of step 0, before the optimizer has any state, and a resume from it: the
    final weights equal those of the same loop without ftrain, bit for bit."""
    proc = _run_loop(tmp_path, """
        from pathlib import Path
        run = Path(sys.argv[1])

        def train(steps, model, optimizer):
            torch.manual_seed(1)
            for _ in range(steps):
                step(model, optimizer)
            return [p.detach().clone() for p in model.parameters()]

        plain = train(5, *build())
        model, optimizer = build()
        with ftrain.Checkpointer(run, model=model, optimizer=optimizer, interval=100, local_interval=1) as ckpt:
            ckpt.load()
            ckpt.save(0)
            ckpt.wait()
            with_save = train(5, model, optimizer)
        model, optimizer = build()
        with ftrain.Checkpointer(run, model=model, optimizer=optimizer, interval=100, local_interval=0,
                                 resume=0) as ckpt:
            print("resumed at", ckpt.load(), "state:", len(optimizer.state))
            resumed = train(5, model, optimizer)
        print("same with a save:", all(torch.equal(a, b) for a, b in zip(plain, with_save)))
        print("same after a resume:", all(torch.equal(a, b) for a, b in zip(plain, resumed)))
        """)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed at 0 state: 0" in proc.stdout
    assert "same with a save: True" in proc.stdout and "same after a resume: True" in proc.stdout, proc.stdout


# ----------------------------------------------------------------------- 18: a promised export that failed
def test_a_failed_final_export_fails_the_run(tmp_path):
    """checkpoint.export=safetensors that cannot write its export: the final checkpoint still commits, the
    failure is said in one line, and the run exits 1 (torchrun: the worker's exit code), as for a failed final
    save. The control exports fine and exits 0."""
    good = run_train(tmp_path / "good", *OPTIONS, "checkpoint.export=safetensors")
    check_ok(good)
    assert (tmp_path / "good" / "exports" / "step_00000020" / "model.safetensors").is_file()
    run_dir = tmp_path / "bad"
    run_dir.mkdir()
    (run_dir / "exports").write_text("a file where the exports directory goes")
    bad = run_train(run_dir, *OPTIONS, "checkpoint.export=safetensors")
    assert bad.returncode != 0 and "exitcode: 1" in bad.stderr, bad.stderr[-3000:]
    assert "ftrain: error: safetensors export failed" in bad.stderr, bad.stderr[-3000:]
    assert layout.latest_complete(run_dir / "checkpoints").step == 20


# ---------------------------------------------------------------- 8, 9: async_process keeps checkpointing
def _writer_processes(job: subprocess.Popen) -> list:
    import psutil

    found = []
    for child in psutil.Process(job.pid).children(recursive=True):
        try:
            if "spawn_main" in " ".join(child.cmdline()):
                found.append(child)
        except psutil.NoSuchProcess:
            pass
    return found


def test_a_killed_async_process_writer_is_replaced_and_saves_go_on(reference, tmp_path):
    """SIGKILL every rank's DCP writer process while training pauses at step 12: the next saves start new ones
    (one warning) and commit; the run ends as the uninterrupted one."""
    import psutil

    run_dir = tmp_path / "run"
    job = start_train(run_dir, *OPTIONS, "checkpoint.mode=async_process",
                      env={"FTRAIN_FAULT": "after_local_snapshot@12", "FTRAIN_FAULT_SECONDS": "10"})
    wait_for(lambda: (read_status(run_dir) or 0) and read_status(run_dir).step >= 12, what="step 12", proc=job)
    writers = _writer_processes(job)
    assert len(writers) == 2, writers  # the control: one writer process per rank, there to be killed
    for writer in writers:
        writer.kill()
    psutil.wait_procs(writers, timeout=30)
    out, err = job.communicate(timeout=300)
    assert job.returncode == 0, err[-3000:]
    assert "starting a new checkpoint writer process on every rank: a writer process is gone" in err
    assert [d.step for d in layout.complete_steps(run_dir / "checkpoints")][-1] == 20
    _same_as(run_dir, reference)


def test_async_process_without_room_in_dev_shm_saves_with_the_thread_writer(reference, tmp_path):
    """/dev/shm with 4 MB (a mount namespace of its own): the local tier turns itself off, and async_process,
    which would stage 6 MB per rank there, saves with the writer thread instead, with one warning."""
    if subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode != 0:
        pytest.skip("no mount namespaces here (needs root)")
    from conftest import train_cmd

    run_dir = tmp_path / "run"
    command = " ".join(f"'{part}'" for part in train_cmd(run_dir, *OPTIONS, "checkpoint.mode=async_process"))
    proc = subprocess.run(["unshare", "-m", "sh", "-c", f"mount -t tmpfs -o size=4m tmpfs /dev/shm && exec {command}"],
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    check_ok(proc)
    assert "local snapshots off" in proc.stderr
    assert proc.stderr.count("saving with the writer thread (checkpoint.mode=async) from now on") == 1, proc.stderr[-3000:]
    assert [d.step for d in layout.complete_steps(run_dir / "checkpoints")] == [10, 20]
    _same_as(run_dir, reference)
