"""ftrain.Checkpointer as a user puts it under a loop of their own: in one process, and recipes/custom_loop.py
killed at random moments under python and torchrun, resumed bit for bit."""

from __future__ import annotations

import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn

import ftrain
from ftrain import faults, tags
from ftrain.checkpoint import integrity, layout
from ftrain.checkpoint.reader import read_tensors
from ftrain.checkpoint.local import LocalSnapshots
from ftrain.checkpoint.staging import BufferStager

from conftest import REPO, TORCHRUN, assert_same_tensors, kill_job, scalars


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 8))


def _train_step(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    loss = model(torch.randn(16, 32)).square().mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


def _snapshot(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    state = {f"model.{k}": v.clone() for k, v in model.state_dict().items()}
    for index, per_param in optimizer.state_dict()["state"].items():
        state.update({f"optim.{index}.{k}": v.clone() for k, v in per_param.items() if torch.is_tensor(v)})
    return state


def test_minimal_checkpointer_saves_and_loads_into_a_fresh_model(tmp_path):
    model = _model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    with ftrain.Checkpointer(tmp_path, model=model, optimizer=optimizer) as ckpt:
        assert ckpt.load() == 0
        for step in range(1, 4):
            _train_step(model, optimizer)
            ckpt.maybe_save(step, last=step == 3)
    expected = _snapshot(model, optimizer)
    assert layout.latest_complete(tmp_path / "checkpoints").step == 3
    assert not (tmp_path / "LOCK").exists()

    fresh = nn.Sequential(nn.Linear(32, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 8))
    fresh_optimizer = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
    with ftrain.Checkpointer(tmp_path, model=fresh, optimizer=fresh_optimizer) as ckpt:
        assert ckpt.load() == 3
    assert_same_tensors(expected, _snapshot(fresh, fresh_optimizer))


def test_a_checkpoint_of_another_model_is_refused_in_one_line(tmp_path):
    model = _model()
    optimizer = torch.optim.AdamW(model.parameters())
    with ftrain.Checkpointer(tmp_path, model=model, optimizer=optimizer) as ckpt:
        ckpt.load()
        ckpt.save(1)
    other = nn.Sequential(nn.Linear(32, 65), nn.ReLU(), nn.Linear(65, 8))
    ckpt = ftrain.Checkpointer(tmp_path, model=other, optimizer=torch.optim.AdamW(other.parameters()))
    with pytest.raises(ftrain.CheckpointError, match="different model") as info:
        ckpt.load()
    ckpt.abort()
    assert "\n" not in str(info.value) and not (tmp_path / "LOCK").exists()


def test_options_are_checked_like_the_config(tmp_path):
    model = _model()
    with pytest.raises(ValueError, match="checkpoint.mode"):
        ftrain.Checkpointer(tmp_path, model=model, optimizer=torch.optim.AdamW(model.parameters()), mode="sometimes")
    with pytest.raises(TypeError, match="intervall"):
        ftrain.Checkpointer(tmp_path, model=model, optimizer=torch.optim.AdamW(model.parameters()), intervall=5)
    # DCP's writer process joins the job's process group: without one it would fail deep inside DCP
    with pytest.raises(ValueError, match="^checkpoint.mode=async_process needs torch.distributed initialized") as info:
        ftrain.Checkpointer(tmp_path, model=model, optimizer=torch.optim.AdamW(model.parameters()), mode="async_process")
    assert "\n" not in str(info.value)
    assert not tmp_path.joinpath("LOCK").exists() and not tmp_path.joinpath("checkpoints").exists()


def _torn_weights(step_dir: Path, at_save: dict[str, torch.Tensor]) -> list[str]:
    """The model weights saved in ``step_dir`` that differ from ``at_save`` (the state at the save call)."""
    saved = read_tensors(step_dir)
    weights = {k: v for k, v in saved.items() if k.startswith("model.")}
    expected = {k: v for k, v in at_save.items() if k in weights}
    assert len(weights) == len(expected) > 0
    return [k for k in weights if not torch.equal(weights[k], expected[k])]


@pytest.mark.parametrize("hooks", [True, False], ids=["as shipped", "without the staging wait (control)"])
def test_no_staging_call_needed_the_next_step_never_tears_the_saved_state(tmp_path, monkeypatch, hooks):
    """The loop never calls anything between save and the next optimizer step. Staging is slowed to 0.5 s so the
    next step certainly runs while it copies; the saved state must still be the state at the save. The control
    run removes the checkpointer's hooks and must see a torn state: it proves this test can fail."""
    original = BufferStager._stage

    def slow_stage(self, *args, **kwargs):
        time.sleep(0.5)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(BufferStager, "_stage", slow_stage)
    model = _model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    ckpt = ftrain.Checkpointer(tmp_path, model=model, optimizer=optimizer, mode="async")
    try:
        ckpt.load()
        if not hooks:
            for hook in ckpt._hooks:
                hook.remove()
        _train_step(model, optimizer)
        ckpt.save(1)
        at_save = _snapshot(model, optimizer)
        for _ in range(3):  # the user's next steps, straight away
            _train_step(model, optimizer)
        ckpt.wait()
    finally:
        ckpt.close()
    torn = _torn_weights(layout.step_dir(tmp_path / "checkpoints", 1), at_save)
    if hooks:
        assert not torn, f"saved state changed after the save call: {torn}"
    else:
        assert torn, "the control run saw no torn state: the test cannot tell the hooks' effect"


@pytest.mark.parametrize("kept", [True, False], ids=["as shipped", "lent slot not kept (control)"])
@pytest.mark.parametrize("mode", ["async", "async_process"])
def test_a_save_writes_from_the_local_snapshot_whose_slot_is_kept_until_it_is_written(tmp_path, monkeypatch, kept, mode):
    """With the local tier on, a durable save stages nothing: it writes the snapshot of its step (the writer
    process of async_process maps the same pages). The writer waits 1 s before writing while the loop goes on
    snapshotting at every step; the saved state must still be the state at the save. The control lets later
    snapshots reuse the lent slot and must see a torn state."""
    monkeypatch.setenv("FTRAIN_FAULT", f"{faults.WHILE_WRITING}@5")  # the writer thread or process pauses there
    monkeypatch.setenv("FTRAIN_FAULT_SECONDS", "1")
    if not kept:
        monkeypatch.setattr(LocalSnapshots, "_lent_slots", lambda self: set())
    if mode == "async_process":  # DCP's writer process joins the job's process group: a one-rank one here
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        _write_from_the_snapshot_while_training_goes_on(tmp_path, mode, kept)
    finally:
        if mode == "async_process":
            dist.destroy_process_group()


def _write_from_the_snapshot_while_training_goes_on(tmp_path: Path, mode: str, kept: bool) -> None:
    model = _model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    ckpt = ftrain.Checkpointer(
        tmp_path / "run", model=model, optimizer=optimizer, mode=mode, interval=5, local_interval=1,
        local_dir=str(tmp_path / "local"),
    )
    try:
        ckpt.load()
        for step in range(1, 6):
            _train_step(model, optimizer)
            ckpt.maybe_save(step)
        at_save = _snapshot(model, optimizer)
        stager = ckpt.manager._stager
        assert stager.reused_bytes > 0 and stager.copied_bytes == 0, (stager.reused_bytes, stager.copied_bytes)
        assert stager.buffer_bytes == 0  # no staging buffers beside the tier's two slots
        for step in range(6, 9):  # snapshots while the save is still being written
            _train_step(model, optimizer)
            ckpt.maybe_save(step)
        ckpt.wait()
    finally:
        ckpt.close()
    torn = _torn_weights(layout.step_dir(tmp_path / "run" / "checkpoints", 5), at_save)
    if kept:
        assert not torn, f"the saved state is not the state at the save: {torn}"
    else:
        assert torn, "the control run saw no torn state: the test cannot tell whether the lent slot is kept"


@pytest.mark.parametrize("interval", ["4", "auto"])
def test_keep_every_steps_are_saved_and_kept_whatever_the_interval(tmp_path, interval):
    """keep_every=6 with saves every 4 steps (or wherever auto puts them): step 6 is saved and kept, not only the
    steps that happen to be multiples of both."""
    model = _model()
    optimizer = torch.optim.AdamW(model.parameters())
    with ftrain.Checkpointer(tmp_path, model=model, optimizer=optimizer, interval=interval, keep_last=1, keep_every=6) as ckpt:
        ckpt.load()
        for step in range(1, 15):
            _train_step(model, optimizer)
            ckpt.maybe_save(step, last=step == 14)
    kept = [d.step for d in layout.complete_steps(tmp_path / "checkpoints")]
    assert kept == [6, 12, 14], kept


# --------------------------------------------------------------------------------- recipes/custom_loop.py
STEPS, INTERVAL = 400, 10  # ~5 ms a step: the run must still be training when the kills land


def _loop_cmd(run_dir: Path, nproc: int) -> list[str]:
    launcher = [*TORCHRUN, "--standalone", f"--nproc_per_node={nproc}"] if nproc else [sys.executable]
    return [*launcher, str(REPO / "recipes" / "custom_loop.py"), "--run-dir", str(run_dir),
            "--steps", str(STEPS), "--interval", str(INTERVAL)]


def _run(run_dir: Path, nproc: int) -> subprocess.CompletedProcess:
    proc = subprocess.run(_loop_cmd(run_dir, nproc), capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _latest_step(run_dir: Path) -> int:
    latest = layout.latest_complete(run_dir / "checkpoints")
    return latest.step if latest else 0


def _kill_at_random(run_dir: Path, nproc: int, kills: int, rng: random.Random) -> None:
    """Start the loop, SIGKILL the whole job at a random moment after it has made progress, and again."""
    for _ in range(kills):
        before = _latest_step(run_dir)
        proc = subprocess.Popen(_loop_cmd(run_dir, nproc), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO)
        deadline = time.monotonic() + 120
        while _latest_step(run_dir) <= before and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 0.3))
        kill_job(proc)
        assert _latest_step(run_dir) < STEPS, "the run finished before it was killed: lengthen it"


@pytest.mark.parametrize(
    "nproc", [0, pytest.param(2, marks=pytest.mark.soak)], ids=["python, 1 rank", "torchrun, 2 ranks"]
)
def test_custom_loop_killed_at_random_resumes_bit_for_bit(tmp_path, nproc):
    reference, run_dir = tmp_path / "reference", tmp_path / "killed"
    _run(reference, nproc)
    _kill_at_random(run_dir, nproc, kills=2 if nproc == 0 else 1, rng=random.Random(nproc))
    _run(run_dir, nproc)

    final = layout.step_dir(Path("checkpoints"), STEPS)
    assert_same_tensors(read_tensors(reference / final), read_tensors(run_dir / final))
    expected, got = scalars(reference / "tb", tags.LOSS), scalars(run_dir / "tb", tags.LOSS)
    assert sorted(got) == list(range(1, STEPS + 1)) and got == expected
    if nproc == 0:
        _tools_work_on_any_state_naming(run_dir, tmp_path / "model.safetensors")


def _tools_work_on_any_state_naming(run_dir: Path, out: Path) -> None:
    """custom_loop's states are model/optimizer/train/epoch (no "app"): the tools find them through the marker."""
    from test_ckpt_cli import ckpt

    listed = ckpt("list", run_dir)
    assert listed.returncode == 0 and f"{STEPS}" in listed.stdout, listed.stderr
    shown = ckpt("show", run_dir)
    assert shown.returncode == 0 and "net.0.weight" in shown.stdout and "epoch" in shown.stdout, shown.stdout
    assert ckpt("verify", run_dir).returncode == 0
    converted = ckpt("convert", run_dir, out, "--model-only", "--format", "safetensors")
    assert converted.returncode == 0, converted.stderr
    from safetensors.torch import load_file

    weights = load_file(out)
    saved = read_tensors(layout.step_dir(run_dir / "checkpoints", STEPS))
    assert weights and all(torch.equal(weights[k], saved[f"model.{k}"]) for k in weights)


_GROUP_SCRIPT = """
import sys, torch, torch.distributed as dist
import ftrain
from ftrain.distributed import DistContext
dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
model = torch.nn.Linear(2, 2)
with ftrain.Checkpointer(sys.argv[1] + "/own", model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                         interval=1) as ckpt:
    ckpt.load()
    ckpt.maybe_save(1, last=True)
    group = ckpt.ctx.process_group
    assert dist.get_process_group_ranks(group) == [0]
try:
    dist.get_process_group_ranks(group)
    raise SystemExit("the checkpoint group it made outlived close()")
except KeyError:
    pass
given = DistContext.current(torch.device("cpu"))
with ftrain.Checkpointer(sys.argv[1] + "/given", model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                         interval=1, dist_context=given) as ckpt:
    ckpt.load()
assert dist.get_process_group_ranks(given.process_group) == [0]  # not ours to end
ckpt = ftrain.Checkpointer(sys.argv[1] + "/late", model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
ckpt.load()
dist.destroy_process_group()  # the user ends every group first: close() still works
ckpt.close()
print("ok")
"""


def test_close_ends_the_checkpoint_process_group_it_made(tmp_path):
    proc = subprocess.run([sys.executable, "-c", _GROUP_SCRIPT, str(tmp_path)], capture_output=True, text=True,
                          timeout=120, cwd=REPO)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]


def test_a_preemption_signal_saves_the_step_and_leaves_a_marker_for_the_scheduler(tmp_path):
    import json
    import os
    import signal

    model = _model()
    optimizer = torch.optim.AdamW(model.parameters())
    with ftrain.Checkpointer(tmp_path, model=model, optimizer=optimizer, interval=100) as ckpt:
        step = ckpt.load()
        while step < 50:
            _train_step(model, optimizer)
            step += 1
            if step == 7:
                os.kill(os.getpid(), signal.SIGTERM)  # the handler only notes it; the next maybe_save acts
            if ckpt.maybe_save(step):
                break
    assert step == 7 and ckpt.preempted == "SIGTERM"
    assert layout.latest_complete(tmp_path / "checkpoints").step == 7
    marker = json.loads((tmp_path / "PREEMPTED").read_text())
    assert marker["step"] == 7 and marker["signal"] == "SIGTERM"
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the checkpointer put the handler back
    again = ftrain.Checkpointer(tmp_path, model=model, optimizer=optimizer)
    assert again.load() == 7 and not (tmp_path / "PREEMPTED").exists()
    again.close()


@pytest.mark.parametrize("mode", ["sync", "async", "async_process"])
def test_the_marker_lists_only_the_files_the_save_wrote(tmp_path, mode, caplog):
    """A file in the step directory that the save did not write (here: a data file of another world size, as an
    earlier save at this step could leave) is neither vouched for by the marker nor deleted; the checkpoint
    verifies and loads without it. Whether the commit takes the writer's own record of its files (async, sync) or
    lists the directory (async_process)."""
    if mode == "async_process":  # DCP's writer process joins the job's process group: a one-rank one here
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        model = _model()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        with ftrain.Checkpointer(tmp_path, model=model, optimizer=optimizer, mode=mode) as ckpt:
            ckpt.load()
            _train_step(model, optimizer)
            step_dir = layout.step_dir(tmp_path / "checkpoints", 1)
            step_dir.mkdir(parents=True)
            (step_dir / "__7_0.distcp").write_bytes(b"not this save's bytes")
            with caplog.at_level("WARNING", logger="ftrain.checkpoint.integrity"):
                ckpt.save(1)
                ckpt.wait()
    finally:
        if mode == "async_process":
            dist.destroy_process_group()
    listed = {entry["name"] for entry in layout.read_marker(step_dir)["files"]}
    assert "__7_0.distcp" not in listed and (step_dir / "__7_0.distcp").exists()
    assert listed == {layout.DCP_METADATA, integrity.CHECKSUMS, *(p.name for p in step_dir.glob("__0_*.distcp"))}
    if mode == "async_process":  # the writer ran in another process: the commit lists the directory, and says so
        assert "left out of the checkpoint: __7_0.distcp" in caplog.text
    assert integrity.verify(step_dir) == []
    fresh = _model()
    fresh_optimizer = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
    with ftrain.Checkpointer(tmp_path, model=fresh, optimizer=fresh_optimizer) as ckpt:
        assert ckpt.load() == 1
    assert_same_tensors(_snapshot(model, optimizer), _snapshot(fresh, fresh_optimizer))


@pytest.mark.parametrize("removed", [integrity.CHECKSUMS, layout.DCP_METADATA, "__0_0.distcp"])
def test_a_save_missing_one_of_its_files_is_not_committed(tmp_path, removed):
    model = _model()
    optimizer = torch.optim.AdamW(model.parameters())
    with ftrain.Checkpointer(tmp_path, model=model, optimizer=optimizer, mode="sync") as ckpt:
        ckpt.load()
        ckpt.save(1)
    step_dir = layout.step_dir(tmp_path / "checkpoints", 1)
    (step_dir / layout.MARKER).unlink()
    (step_dir / removed).unlink()
    with pytest.raises(ftrain.CheckpointError, match=f"{removed}.* missing; not committed"):
        integrity.saved_entries(step_dir)
