"""The local snapshot tier (ftrain/checkpoint/local/): round trip, A/B slots, kills, damage, foreign
snapshots, no room, and agreeing on a step across ranks."""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from ftrain.checkpoint import local
from ftrain.checkpoint.local import reading
from ftrain.checkpoint.local import (
    LocalModelState,
    LocalOptimizerState,
    LocalProgressState,
    LocalSnapshots,
    agree_on_step,
    common_step,
    default_directory,
)
from ftrain.checkpoint.sums import buffer_sum
from ftrain.state import ModelState, OptimizerState, TrainProgress

REPO = Path(__file__).resolve().parent.parent
SIGNATURE = {"model": {"state_sha256": "abc", "numel": 10}, "run_name": "t"}


class Blobby:
    """A scheduler-like Stateful: a counter, a float list and an opaque bytes blob."""

    def __init__(self) -> None:
        self.count, self.lrs, self.blob = 0, [0.1], b""

    def bump(self) -> None:
        self.count += 1
        self.lrs = [lr * 0.5 for lr in self.lrs]
        self.blob = os.urandom(16)

    def state_dict(self) -> dict:
        return {"count": self.count, "lrs": self.lrs, "blob": self.blob, "tags": ("a", 1)}

    def load_state_dict(self, state: dict) -> None:
        assert state["tags"] == ("a", 1)
        self.count, self.lrs, self.blob = state["count"], state["lrs"], state["blob"]


class Run:
    """A small model, AdamW, an LR scheduler, a Blobby, and the RNGs: everything a resume must restore."""

    def __init__(self, local_adapters: bool) -> None:
        self.model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16), torch.nn.Dropout(0.2), torch.nn.Linear(16, 4))
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=0.01)
        self.scheduler = torch.optim.lr_scheduler.StepLR(self.optimizer, step_size=2, gamma=0.5)
        self.progress = TrainProgress(self.scheduler, None, 0, 1, torch.device("cpu"), seed=0)
        self.blobby = Blobby()
        if local_adapters:
            self.states = {
                "model": LocalModelState(self.model),
                "optimizer": LocalOptimizerState(self.optimizer),
                "train": LocalProgressState(self.progress),
                "blobby": self.blobby,
            }
        else:
            self.states = {
                "model": ModelState(self.model),
                "optimizer": OptimizerState(self.model, self.optimizer),
                "train": self.progress,
                "blobby": self.blobby,
            }

    def step(self) -> float:
        loss = self.model(torch.randn(4, 8)).square().mean()
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad()
        self.scheduler.step()
        self.blobby.bump()
        self.progress.advance()
        return loss.item()

    def fingerprint(self) -> dict:
        """Every value a resume must bring back, as plain comparable objects."""
        optim = self.optimizer.state_dict()
        return {
            "model": {k: v.clone() for k, v in self.model.state_dict().items()},
            "optim": {i: {k: v.clone() for k, v in s.items()} for i, s in optim["state"].items()},
            "groups": optim["param_groups"],
            "sched": self.scheduler.state_dict(),
            "blobby": (self.blobby.count, self.blobby.lrs, self.blobby.blob),
            "step": self.progress.step,
            "rng": torch.get_rng_state().clone(),
        }


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        x, y = a[key], b[key]
        if isinstance(x, dict) and x and all(isinstance(v, (torch.Tensor, dict)) for v in x.values()):
            assert_same(x, y)
        elif isinstance(x, torch.Tensor):
            assert x.dtype == y.dtype and torch.equal(x, y), key
        else:
            assert x == y, key


def fill(value: float, size: int = 1000) -> dict:
    return {"t": {"w": torch.full((size,), float(value)), "n": int(value), "b": bytes([int(value) % 256])}}


class Filled:
    def __init__(self, value: float, size: int = 1000) -> None:
        self.state = fill(value, size)["t"]

    def state_dict(self) -> dict:
        return self.state

    def load_state_dict(self, state: dict) -> None:
        self.state = state


class Stateless:
    """Any state dict, given and taken back as is."""

    def __init__(self, state: dict) -> None:
        self.state = state

    def state_dict(self) -> dict:
        return self.state

    def load_state_dict(self, state: dict) -> None:
        self.state = state


def tier_at(directory: Path, **kwargs) -> LocalSnapshots:
    return LocalSnapshots(directory, kwargs.pop("rank", 0), kwargs.pop("world_size", 1), kwargs.pop("signature", SIGNATURE), **kwargs)


def take(tier: LocalSnapshots, step: int, value: float | None = None) -> None:
    tier.snapshot(step, {"t": Filled(step if value is None else value)})
    tier._finish()


# --------------------------------------------------------------------------------------------- round trip
@pytest.mark.parametrize("local_adapters", [True, False], ids=["local-adapters", "ftrain-state"])
def test_round_trip_is_bit_identical_into_fresh_objects(tmp_path, local_adapters):
    """In /dev/shm (the default directory): snapshot, train on, restore into fresh objects: every tensor, the
    scheduler, the bytes blob and the RNG come back exactly, and the next steps' losses match."""
    directory = default_directory(tmp_path)
    assert directory.parent == Path("/dev/shm") and directory == default_directory(tmp_path / ".." / tmp_path.name)
    torch.manual_seed(0)
    run = Run(local_adapters)
    for _ in range(3):
        run.step()
    tier = tier_at(directory)
    try:
        tier.snapshot(3, run.states)
        tier.wait()  # the copy is done: training may change the tensors now
        expected = run.fingerprint()
        expected_losses = [run.step() for _ in range(2)]
        tier._finish()
        assert tier.complete_steps() == [3]

        torch.manual_seed(123)  # a fresh process would start elsewhere
        fresh = Run(local_adapters)
        other = tier_at(directory)  # what a restarted process opens
        assert other.complete_steps() == [3]
        other.restore(3, fresh.states)
        assert_same(fresh.fingerprint(), expected)
        assert [fresh.step() for _ in range(2)] == expected_losses
        other.close()
        assert sorted(p.name for p in (directory / "rank-0").iterdir()) == [
            "OWNER", "slot-0.data", "slot-0.json", "slot-0.skel", "slot-1.data"  # both slots reserved up front
        ]
    finally:
        tier.remove()
        tier.close()
    assert not directory.exists()


def test_restore_needs_the_same_state_names_and_an_existing_step(tmp_path):
    tier = tier_at(tmp_path)
    take(tier, 1)
    with pytest.raises(ValueError, match="holds states"):
        tier.restore(1, {"other": Filled(0)})
    with pytest.raises(ValueError, match="no complete local snapshot of step 2"):
        tier.restore(2, {"t": Filled(0)})
    tier.close()


# ------------------------------------------------------------------------------------------------- slots
def hold_copies(monkeypatch) -> tuple[threading.Event, threading.Event]:
    """Make every snapshot's copy wait: ``copying`` is set when one starts, and it goes on once ``release`` is."""
    release, copying = threading.Event(), threading.Event()
    real_copy = LocalSnapshots._copy

    def held_copy(self, tensors, views, ready):
        copying.set()
        release.wait(10)
        real_copy(self, tensors, views, ready)

    monkeypatch.setattr(LocalSnapshots, "_copy", held_copy)
    return release, copying


def test_the_previous_snapshot_stays_complete_while_the_next_is_in_flight(tmp_path, monkeypatch):
    tier = tier_at(tmp_path)
    take(tier, 1)
    release, copying = hold_copies(monkeypatch)

    def in_flight(step: int) -> threading.Thread:  # host state is copied inside snapshot(): hold it in a thread
        thread = threading.Thread(target=tier.snapshot, args=(step, {"t": Filled(step)}))
        thread.start()
        return thread

    taking = in_flight(2)
    assert copying.wait(10)
    reader = tier_at(tmp_path)  # another process's view while step 2 is being copied
    assert reader.complete_steps() == [1]
    restored = Filled(0)
    reader.restore(1, {"t": restored})
    assert torch.equal(restored.state["w"], torch.full((1000,), 1.0)) and restored.state["b"] == b"\x01"
    release.set()
    taking.join(10)
    tier._finish()  # its marker is written in the background
    assert tier_at(tmp_path).complete_steps() == [1, 2]
    release.clear(), copying.clear()
    taking = in_flight(3)  # goes into the slot of step 1, never into that of step 2
    assert copying.wait(10)
    assert tier_at(tmp_path).complete_steps() == [2]  # step 1's marker went before its first byte changed
    release.set()
    taking.join(10)
    tier._finish()
    assert tier_at(tmp_path).complete_steps() == [2, 3]
    assert len(list((tmp_path / "rank-0").glob("*.data"))) == 2  # never more than two copies
    tier.close()


def test_a_background_snapshot_of_host_state_is_copied_off_the_training_thread_and_then_complete(tmp_path, monkeypatch):
    """background=True (the path device state takes, here with host state): snapshot() returns while the copy
    waits; wait() returns once it is done; the snapshot is then complete and its background CPU is known."""
    tier = tier_at(tmp_path)
    take(tier, 1)
    release, copying = hold_copies(monkeypatch)
    tier.snapshot(2, {"t": Filled(2)}, background=True)  # returns with the copy held
    assert copying.wait(10) and tier.background_cost() is None  # still running
    release.set()
    tier.wait()
    cost = tier.background_cost(block=True)
    assert cost is not None and cost > 0
    assert tier_at(tmp_path).complete_steps() == [1, 2]
    restored = Filled(0)
    tier_at(tmp_path).restore(2, {"t": restored})
    assert torch.equal(restored.state["w"], torch.full((1000,), 2.0))
    tier.close()


def test_host_state_is_copied_in_the_call_and_marked_in_the_background(tmp_path, monkeypatch):
    """Host state: snapshot() returns with the copy done (wait() has nothing to wait for, the state may change),
    while the sums and the marker are still being made in the background: until they are, the snapshot is not
    there for anyone, and the previous one stays the newest; then it is complete and its background CPU known."""
    tier = tier_at(tmp_path)
    take(tier, 1)
    release, summing = threading.Event(), threading.Event()
    real_sums = reading.chunk_sums

    def held_sums(*args, **kwargs):
        summing.set()
        release.wait(10)
        return real_sums(*args, **kwargs)

    monkeypatch.setattr(reading, "chunk_sums", held_sums)
    live = Filled(2)
    tier.snapshot(2, {"t": live})
    assert tier._copied.is_set()  # copied in the call
    tier.wait()
    live.state["w"].fill_(99.0)  # training goes on: the snapshot holds step 2's values
    assert summing.wait(10) and tier.background_cost() is None
    assert tier_at(tmp_path).complete_steps() == [1]  # not marked yet: step 1 is the newest snapshot
    release.set()
    cost = tier.background_cost(block=True)
    assert cost is not None and cost >= 0.0
    assert tier_at(tmp_path).complete_steps() == [1, 2]
    restored = Filled(0)
    tier_at(tmp_path).restore(2, {"t": restored})
    assert torch.equal(restored.state["w"], torch.full((1000,), 2.0))
    tier.close()


def test_mark_later_waits_for_start_marking_and_is_never_lost(tmp_path):
    """A save step's snapshot (mark_later): copied in the call, its sums and marker held back until the save is
    dispatched (start_marking); whatever waits for the snapshot (a resume's listing, the next snapshot, close)
    marks it first, so it is never lost."""
    tier = tier_at(tmp_path)
    tier.snapshot(1, {"t": Filled(1)}, mark_later=True)
    assert tier._copied.is_set() and tier.background_cost() is None
    assert tier_at(tmp_path).complete_steps() == []  # not marked yet
    tier.start_marking()
    assert tier.background_cost(block=True) is not None
    assert tier_at(tmp_path).complete_steps() == [1]
    tier.snapshot(2, {"t": Filled(2)}, mark_later=True)
    tier.snapshot(3, {"t": Filled(3)})  # marks step 2 before choosing a slot for step 3
    tier._finish()
    assert tier_at(tmp_path).complete_steps() == [2, 3]
    tier.snapshot(4, {"t": Filled(4)}, mark_later=True)
    tier.close()  # marks it too
    assert tier_at(tmp_path).complete_steps() == [3, 4]


def test_a_slot_lent_to_a_save_in_flight_is_kept_while_the_next_saves_snapshot_is_placed(tmp_path):
    """A save still writing from step 10's slot, and step 12's snapshot lent to the next save before its
    background copy (device state's path) has chosen a slot: step 12 must not go into step 10's slot (the older of
    the two, else the natural choice), and with both slots lent the next snapshot is skipped, the tier staying on."""
    tier = tier_at(tmp_path)
    writing = {10: True, 12: True}
    tier.snapshot(10, {"t": Filled(10)}, background=True)
    assert tier.lend(10, in_use=lambda: writing[10]) is not None
    tier._finish()
    slot_10 = _slot_of(tmp_path, 10)
    take(tier, 11)  # into the other slot: step 10's is lent
    hold = threading.Event()
    tier._executor.submit(hold.wait, 10)  # step 12's copy waits in line until its lend is recorded
    tier.snapshot(12, {"t": Filled(12)}, background=True)
    lent = tier.lend(12, in_use=lambda: writing[12])
    hold.set()
    assert lent is not None and lent.ready()
    tier._finish()
    assert _slot_of(tmp_path, 12) != slot_10, "step 12 overwrote the slot a save in flight was writing from"
    assert tier_at(tmp_path).complete_steps() == [10, 12]  # the save's source intact (its checksums verify)
    take(tier, 13)  # both slots lent: skipped, nothing overwritten
    assert tier.disabled is None and tier_at(tmp_path).complete_steps() == [10, 12]
    writing[10] = False  # step 10's save is done: its slot is free again
    take(tier, 14)
    assert tier_at(tmp_path).complete_steps() == [12, 14] and _slot_of(tmp_path, 14) == slot_10
    tier.close()


def test_restore_and_drop_after_remove_later_steps_of_the_old_timeline(tmp_path):
    tier = tier_at(tmp_path)
    take(tier, 1)
    take(tier, 2)
    again = tier_at(tmp_path)
    again.restore(1, {"t": Filled(0)})
    assert again.complete_steps() == [1]
    take(again, 2, value=22)  # the redone step 2 goes into the free slot; step 1 stays
    assert again.complete_steps() == [1, 2]
    again.drop_after(1)
    assert again.complete_steps() == [1]
    again.close()
    tier.close()


# ------------------------------------------------------------------------------------------------- kills
CHILD = r"""
import sys, time, torch
from pathlib import Path
from ftrain.checkpoint.local import LocalSnapshots
directory = Path(sys.argv[1])

def slow_copy(self, tensors, views, ready):  # a big state: the copy takes a while, tensor by tensor
    print("copying", int(tensors[0][1][0].item()), flush=True)
    for (_, tensor, _), view in zip(tensors, views):
        view.copy_(tensor)
        time.sleep(0.01)

LocalSnapshots._copy = slow_copy

class State:
    def __init__(self):
        self.parts = {f"p{i}": torch.zeros(50_000) for i in range(20)}
    def state_dict(self):
        return {"parts": self.parts, "step": self.step}
    def load_state_dict(self, state):
        raise AssertionError

tier = LocalSnapshots(directory, 0, 1, {"run": "kill"})
state = State()
for step in range(1, 10_000):
    tier.wait()  # as the optimizer pre-hook would
    for tensor in state.parts.values():
        tensor.fill_(step)
    state.step = step
    tier.snapshot(step, {"s": state})
"""


def test_sigkill_mid_snapshot_leaves_the_previous_one_loadable(tmp_path):
    """A real child snapshots in a loop with a slow copy; SIGKILL lands at a random moment of a copy: the
    snapshot being written is never counted, the one before it restores exactly."""
    rng, mid_copy = random.Random(), 0
    for attempt in range(2):
        directory = tmp_path / f"kill{attempt}"
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(directory)], stdout=subprocess.PIPE, text=True, cwd=REPO
        )
        try:
            wanted = rng.randint(3, 6)
            for line in child.stdout:  # type: ignore[union-attr]
                copying = int(line.split()[1])
                if copying >= wanted:
                    break
            time.sleep(rng.uniform(0.0, 0.15))  # the copy of one snapshot takes ~0.2 s
            child.send_signal(signal.SIGKILL)
            child.wait(10)
        finally:
            child.kill()
            child.wait()
        assert child.returncode == -signal.SIGKILL
        tier = tier_at(directory, signature={"run": "kill"})
        steps = tier.complete_steps()
        assert steps and steps[-1] >= copying - 1 and steps == list(range(steps[0], steps[-1] + 1)), (copying, steps)
        mid_copy += len(steps) == 1  # the slot being written lost its marker first: the kill came mid-copy
        got = {}

        class Into:
            def load_state_dict(self, state):
                got.update(state)

            def state_dict(self):
                return {}

        tier.restore(steps[-1], {"s": Into()})
        assert got["step"] == steps[-1]
        for tensor in got["parts"].values():
            assert torch.equal(tensor, torch.full((50_000,), float(steps[-1])))
        tier.close()
    assert mid_copy, "no kill landed during a copy"


# ----------------------------------------------------------------------------------------- what is never used
def _slot_of(directory: Path, step: int) -> int:
    for slot in (0, 1):
        marker = directory / "rank-0" / f"slot-{slot}.json"
        if marker.exists() and json.loads(marker.read_text())["step"] == step:
            return slot
    raise AssertionError(f"no marker of step {step}")


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def test_skeleton_is_a_bare_pickle_unless_it_holds_a_tensor(tmp_path):
    """The skeleton (everything but the strided tensors) is a protocol-2 pickle; a tensor that stays whole in it
    (here a sparse one) makes it torch.save's archive. Both restore exactly."""
    tier = tier_at(tmp_path)
    take(tier, 1)
    sparse = torch.sparse_coo_tensor([[0, 2]], [1.5, -2.0], (4,))
    tier.snapshot(2, {"t": Stateless({"w": torch.ones(3), "s": sparse, "n": 7})})
    tier.close()
    markers = {m["step"]: m for m in (json.loads(p.read_text()) for p in (tmp_path / "rank-0").glob("*.json"))}
    assert markers[1]["skeleton"]["encoding"] == "pickle" and markers[2]["skeleton"]["encoding"] == "torch"
    restored = Stateless({})
    tier_at(tmp_path).restore(2, {"t": restored})
    assert torch.equal(restored.state["w"], torch.ones(3)) and restored.state["n"] == 7
    assert torch.equal(restored.state["s"].to_dense(), sparse.to_dense())
    one = Filled(0)
    tier_at(tmp_path).restore(1, {"t": one})
    assert torch.equal(one.state["w"], torch.full((1000,), 1.0))


def test_tensor_paths_go_in_the_marker_when_json_keeps_them_else_in_the_skeleton(tmp_path):
    """Paths of str/int/bool keys are listed once in the marker's table; a key JSON would change (a tuple) keeps
    every path in the skeleton. A format-2 snapshot (paths always in the skeleton) is still read."""
    import pickle

    tier = tier_at(tmp_path)
    tier.snapshot(1, {"t": Stateless({"w": torch.ones(3), 7: [torch.zeros(2), True], False: torch.full((1,), 5.0)})})
    tier._finish()
    tier.snapshot(2, {"t": Stateless({("a", 1): torch.ones(2), "n": 3})})
    tier.close()
    markers = {m["step"]: m for m in (json.loads(p.read_text()) for p in (tmp_path / "rank-0").glob("*.json"))}
    assert [r["path"] for r in markers[1]["tensors"]] == [["t", "w"], ["t", 7, 0], ["t", False]]
    assert all("path" not in r for r in markers[2]["tensors"])
    restored = Stateless({})
    tier_at(tmp_path).restore(2, {"t": restored})
    assert torch.equal(restored.state[("a", 1)], torch.ones(2)) and restored.state["n"] == 3
    tier_at(tmp_path).restore(1, {"t": restored})  # (drops step 2)
    assert list(restored.state) == ["w", 7, False] and restored.state[7][1] is True
    assert torch.equal(restored.state[7][0], torch.zeros(2)) and torch.equal(restored.state[False], torch.full((1,), 5.0))

    # format 2: the paths in the skeleton, none in the marker
    tier = tier_at(tmp_path)
    take(tier, 3)
    tier.close()
    slot = _slot_of(tmp_path, 3)
    marker_path, skel_path = (tmp_path / "rank-0" / f"slot-{slot}.{ext}" for ext in ("json", "skel"))
    marker = json.loads(marker_path.read_text())
    skeleton = pickle.loads(skel_path.read_bytes())
    skeleton["paths"] = [tuple(r.pop("path")) for r in marker["tensors"]]
    blob = pickle.dumps(skeleton, protocol=2)
    skel_path.write_bytes(blob)
    marker["format"] = 2
    marker["skeleton"].update(size=len(blob), checksum=buffer_sum(blob, marker["checksum"]["algorithm"]))
    marker_path.write_text(json.dumps(marker))
    three = Filled(0)
    tier_at(tmp_path).restore(3, {"t": three})
    assert torch.equal(three.state["w"], torch.full((1000,), 3.0))


class _Boom:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_a_crafted_skeleton_with_a_valid_checksum_is_refused_without_running_it(tmp_path, monkeypatch):
    """Someone who can write the snapshot directory can also fix up the checksums: the skeleton is still read by
    an unpickler that builds plain values only, so the payload is refused, not run."""
    import pickle

    monkeypatch.chdir(tmp_path)
    tier = tier_at(tmp_path)
    take(tier, 1)
    tier.close()
    rank_dir, slot = tmp_path / "rank-0", _slot_of(tmp_path, 1)
    evil = pickle.dumps({"tree": {"t": _Boom()}, "paths": []}, protocol=2)
    (rank_dir / f"slot-{slot}.skel").write_bytes(evil)
    marker = json.loads((rank_dir / f"slot-{slot}.json").read_text())
    marker["skeleton"].update(size=len(evil), checksum=buffer_sum(evil, marker["checksum"]["algorithm"]))
    marker["tensors"] = []
    (rank_dir / f"slot-{slot}.json").write_text(json.dumps(marker))
    reader = tier_at(tmp_path)
    assert reader.complete_steps() == [1]  # checksums match: only reading can tell
    with pytest.raises(ValueError, match="skeleton not readable"):
        reader.restore(1, {"t": Filled(0)})
    assert not (tmp_path / "pwned").exists()


def _damage(directory: Path, step: int, damage: str) -> None:
    """Damage rank 0's snapshot of ``step`` in one of the ways a test names."""
    rank_dir, slot = directory / "rank-0", _slot_of(directory, step)
    if damage == "data byte":
        _flip(rank_dir / f"slot-{slot}.data", 1234)
    elif damage == "skeleton byte":
        _flip(rank_dir / f"slot-{slot}.skel", 40)
    elif damage == "data cut short":
        os.truncate(rank_dir / f"slot-{slot}.data", 100)
    elif damage == "marker malformed":
        marker = json.loads((rank_dir / f"slot-{slot}.json").read_text())
        marker["tensors"][0]["nbytes"] = 10**12  # a huge claim must not be believed
        (rank_dir / f"slot-{slot}.json").write_text(json.dumps(marker))
    else:
        assert damage == "marker missing", damage
        (rank_dir / f"slot-{slot}.json").unlink()


@pytest.mark.parametrize("damage", ["data byte", "skeleton byte", "data cut short", "marker malformed", "marker missing"])
def test_damaged_snapshot_is_excluded(tmp_path, caplog, damage):
    tier = tier_at(tmp_path)
    take(tier, 1)
    take(tier, 2)
    tier.close()
    _damage(tmp_path, 2, damage)
    caplog.set_level(logging.DEBUG, logger="ftrain.checkpoint")
    assert tier_at(tmp_path).complete_steps() == [1]
    if damage != "marker missing":
        assert "not used" in caplog.text


@pytest.mark.parametrize("damage", ["data byte", "skeleton byte", "data cut short"])
def test_a_resume_sums_only_the_snapshot_it_uses(tmp_path, monkeypatch, damage):
    """The resume path (complete_steps without data sums, then verify(step)) reads one slot's data through its
    checksums, not both slots'; damaged data is still caught before anything is restored."""
    tier = tier_at(tmp_path)
    take(tier, 1)
    take(tier, 2)
    tier.close()
    summed = []
    real_file_sums = reading.file_sums
    monkeypatch.setattr(reading, "file_sums", lambda path, *a: summed.append(path.name) or real_file_sums(path, *a))
    reader = tier_at(tmp_path)
    assert reader.complete_steps(verify_data=False) == [1, 2] and summed == []
    assert reader.verify(2) and summed == [f"slot-{_slot_of(tmp_path, 2)}.data"]
    restored = Filled(0)
    reader.restore(2, {"t": restored})
    assert len(summed) == 1  # restore found the snapshot verified already
    assert_same(restored.state, Filled(2).state)
    reader.close()

    _damage(tmp_path, 2, damage)
    again = tier_at(tmp_path)
    # a skeleton or size problem is seen without summing the data; a data byte only by its sum
    assert again.complete_steps(verify_data=False) == ([1, 2] if damage == "data byte" else [1])
    assert not again.verify(2) and again.verify(1)
    with pytest.raises(ValueError, match="no complete local snapshot of step 2"):
        again.restore(2, {"t": Filled(0)})
    again.close()


@pytest.mark.parametrize(
    "other", [{"signature": {"run": "another"}}, {"world_size": 4}, {"rank": 1}], ids=["signature", "world-size", "rank"]
)
def test_snapshot_of_another_run_world_size_or_rank_is_excluded(tmp_path, caplog, other):
    tier = tier_at(tmp_path, world_size=2)
    take(tier, 5)
    tier.close()
    if "rank" in other:  # a marker of rank 0 found where rank 1 looks
        (tmp_path / "rank-1").mkdir()
        for path in (tmp_path / "rank-0").iterdir():
            (tmp_path / "rank-1" / path.name).write_bytes(path.read_bytes())
    caplog.set_level(logging.DEBUG, logger="ftrain.checkpoint")
    kwargs = {"world_size": 2, **other}
    assert tier_at(tmp_path, **kwargs).complete_steps() == []
    assert "not used" in caplog.text
    assert tier_at(tmp_path, world_size=2).complete_steps() == [5]  # still good for its own run


def test_checksum_algorithm_not_installed_here_is_excluded(tmp_path, caplog):
    """A snapshot summed with an algorithm this process lacks (e.g. taken with xxhash, read without) is skipped."""
    tier = tier_at(tmp_path)
    take(tier, 1)
    tier.close()
    marker_path = tmp_path / "rank-0" / "slot-0.json"
    marker = json.loads(marker_path.read_text())
    assert marker["checksum"]["algorithm"] == local.ALGORITHM in ("xxh3_64", "crc32")
    marker["checksum"]["algorithm"] = "xxh128-not-here"
    marker_path.write_text(json.dumps(marker))
    caplog.set_level(logging.DEBUG, logger="ftrain.checkpoint")
    assert tier_at(tmp_path).complete_steps() == []
    assert "xxh128-not-here is not installed here" in caplog.text


# ------------------------------------------------------------------------------------------------ no room
def test_too_little_room_warns_once_and_turns_the_tier_off(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="ftrain.checkpoint")
    tier = tier_at(tmp_path, max_bytes=3000)  # one slot of 4000 floats would need 16 kB
    for step in (1, 2, 3):
        tier.snapshot(step, {"t": Filled(step, size=4000)})
        tier.wait()
    tier._finish()
    warnings = [r for r in caplog.records if r.name == "ftrain.checkpoint" and r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "local snapshots off" in warnings[0].getMessage()
    assert "\n" not in warnings[0].getMessage()
    assert tier.disabled and tier.complete_steps() == []
    assert not list((tmp_path / "rank-0").glob("*.json"))
    tier.close()
    roomy = tier_at(tmp_path, max_bytes=2 * 4000 * 4 + 2 * 256)
    take(roomy, 1)
    assert roomy.complete_steps() == [1] and not roomy.disabled
    roomy.close()


def test_a_directory_that_is_not_ours_turns_the_tier_off(tmp_path, caplog):
    (tmp_path / "rank-0").write_text("not a directory")
    caplog.set_level(logging.WARNING, logger="ftrain.checkpoint")
    tier = tier_at(tmp_path)
    take(tier, 1)
    assert tier.disabled and tier.complete_steps() == [] and "not a directory" in caplog.text
    tier.close()


# ----------------------------------------------------------------------------------------------- agreement
def test_common_step_is_the_newest_every_rank_holds_newer_than_the_durable_one():
    assert common_step([[4, 5], [4, 5]], 0) == 5
    assert common_step([[4, 5], [3, 4]], 0) == 4  # rank 1 died while writing 5
    assert common_step([[4, 5], [4, 5]], 5) is None  # the durable checkpoint is as new: take it
    assert common_step([[4, 5], [4, 5]], None) == 5
    assert common_step([[4, 5], []], 0) is None  # a rank has nothing (damaged, off, new node)
    assert common_step([[6, 7], [4, 5]], 0) is None
    assert common_step([[9]], 3) == 9
    assert agree_on_step([7, 8], 7) == 8  # no process group: this process's own steps


def _two_ranks(rank: int, port: int, directory: str, out: str) -> None:
    """One of two gloo ranks: FSDP2 model + AdamW; snapshots; agree; restore into fresh objects."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        def build() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
            torch.manual_seed(0)
            model = torch.nn.Sequential(torch.nn.Linear(6, 10), torch.nn.Linear(10, 3))
            fully_shard(model)
            return model, torch.optim.AdamW(model.parameters(), lr=0.01)

        def optimizer_tensors(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
            return {
                (i, k): v.full_tensor().clone() if k != "step" else v.clone()
                for i, p in enumerate(model.parameters())
                for k, v in optimizer.state[p].items()
            }

        def train(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
            model(torch.randn(4, 6)).sum().backward()
            optimizer.step()
            optimizer.zero_grad()

        model, optimizer = build()
        tier = LocalSnapshots(Path(directory), rank, 2, {"run": "gloo"})
        for step in (1, 2, 3):
            train(model, optimizer)
            if step < 3 or rank == 0:  # rank 1 "dies" before its snapshot of step 3
                tier.snapshot(step, {"model": ModelState(model), "optimizer": OptimizerState(model, optimizer)})
                tier._finish()
            if step == 2:
                expected = {k: v.full_tensor().clone() for k, v in model.state_dict().items()}
                expected_optim = optimizer_tensors(model, optimizer)
        agreed = agree_on_step(tier.complete_steps(), 1, None)
        none = agree_on_step(tier.complete_steps(), 2, None)
        fresh_model, fresh_optimizer = build()
        restorer = LocalSnapshots(Path(directory), rank, 2, {"run": "gloo"})
        restorer.restore(agreed, {"model": ModelState(fresh_model), "optimizer": OptimizerState(fresh_model, fresh_optimizer)})
        same = all(torch.equal(v.full_tensor(), expected[k]) for k, v in fresh_model.state_dict().items())
        got_optim = optimizer_tensors(fresh_model, fresh_optimizer)
        same_optim = got_optim.keys() == expected_optim.keys() and all(torch.equal(got_optim[k], expected_optim[k]) for k in got_optim)
        dtensor = all(type(v).__name__ == "DTensor" for v in fresh_model.state_dict().values())
        Path(out, f"rank{rank}.json").write_text(json.dumps([agreed, none, same, same_optim, dtensor, restorer.complete_steps()]))
        restorer.remove()
        tier.close()
    finally:
        dist.destroy_process_group()
    os._exit(0)  # no interpreter finalization: it can race gloo's run-loop threads (see ftrain.cli._train)


def test_two_gloo_ranks_agree_and_restore_fsdp2_shards(tmp_path):
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.start_processes(_two_ranks, args=(port, str(tmp_path / "shm"), str(tmp_path)), nprocs=2, start_method="spawn")
    for rank in (0, 1):
        agreed, none, same, same_optim, dtensor, left = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert (agreed, none) == (2, None)  # step 3 is only on rank 0; step 2 is not newer than a durable 2
        assert same and same_optim and dtensor, rank
        assert left == ([2] if rank == 0 else [1, 2])  # rank 0's step 3 was dropped by the restore of 2
    assert not (tmp_path / "shm").exists()  # both ranks removed theirs, then the directory went


class _Tied(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(10, 4)
        self.body = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 4, bias=False))
        self.head = torch.nn.Linear(4, 10, bias=False)
        self.head.weight = self.emb.weight  # tied: both names are in the state dict
        self.register_buffer("scale", torch.ones(1))
        self.register_buffer("cache", torch.zeros(3), persistent=False)
        self.shared = self.body[0]  # one module under two names


def test_the_model_state_of_a_plain_model_is_its_state_dict_collected_directly():
    model = _Tied()
    state = LocalModelState(model)
    assert local.direct(model)
    expected, got = model.state_dict(keep_vars=True), state.state_dict()
    assert list(got) == list(expected) and "cache" not in got and "head.weight" in got
    assert all(got[key] is expected[key] for key in expected)
    assert got._metadata == expected._metadata
    fresh = _Tied()
    fresh.load_state_dict(got)
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), expected.values()))
    model.late = torch.nn.Linear(2, 2)  # added (or wrapped) after the state was made: still collected
    assert list(state.state_dict()) == list(model.state_dict())


def test_a_model_that_changes_how_it_saves_takes_nn_modules_own_state_dict():
    class Extra(torch.nn.Linear):
        def get_extra_state(self):
            return {"note": 1}

        def set_extra_state(self, state):
            pass

    hooked = torch.nn.Sequential(torch.nn.Linear(2, 2))
    hooked.register_state_dict_post_hook(lambda module, state, prefix, local_metadata: state.update(extra=torch.ones(1)))
    for model in (torch.nn.Sequential(Extra(2, 2)), hooked):
        assert not local.direct(model)
        assert list(LocalModelState(model).state_dict()) == list(model.state_dict())


def test_an_owner_record_left_half_written_by_a_killed_process_is_ftrains_own(tmp_path, caplog):
    """A process killed while claiming its directory leaves OWNER.<pid>.tmp: the next one still uses the directory
    (it is not 'a file ftrain did not make') and a clean removal takes it too; a user's file is still refused."""
    tier = tier_at(tmp_path)
    take(tier, 1)
    tier.close()
    (tmp_path / "rank-0" / "OWNER.12345.tmp").write_text("{")
    again = tier_at(tmp_path)
    assert not again.disabled and again.complete_steps() == [1]
    again.remove()
    again.close()
    assert not (tmp_path / "rank-0").exists()
    (tmp_path / "rank-0").mkdir(mode=0o700)
    (tmp_path / "rank-0" / "OWNER.tmp.notes").write_text("the user's")
    caplog.set_level(logging.WARNING, logger="ftrain.checkpoint")
    refused = tier_at(tmp_path)
    assert refused.disabled and "files ftrain did not make" in caplog.text
    refused.close()
