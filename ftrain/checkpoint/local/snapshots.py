"""Per-rank snapshots of the full training state in node-local memory: ``LocalSnapshots``.

    tier = LocalSnapshots(default_directory(run_dir), rank, world_size, signature)
    step = agree_on_step(tier.complete_steps(verify_data=False), durable_step, group)   # at load, every rank
    # ... then every rank tier.verify(step)s; if one fails, all agree again without that step
    if step is not None:
        tier.restore(step, states)            # bit-identical to loading a durable checkpoint of that step
    else:
        tier.drop_after(durable_step)         # snapshots of steps the run will now redo belong to another timeline
    ...
    tier.snapshot(step, states)               # after the optimizer step (host state: copied in the call;
                                              # device state: copied to the host in the background)
    tier.wait()                               # before the next optimizer step changes what is being copied
    ...
    tier.remove(); tier.close()               # the run finished cleanly

Each rank uses ``{directory}/rank-{rank}/`` (claimed by ``directory.py``): two slots, each a data file (the
tensors, ``memory.py``), a skeleton (the rest of the state, ``skeleton.py``) and a marker written last
(``marker.py``). The slots alternate: the marker of the slot about to be written is removed before its first byte
changes, so the other slot's snapshot stays complete while the new one is in flight. A snapshot counts only when
its marker is valid, matches this run (signature, world size, rank) and its checksums verify; anything else is
skipped (``complete_steps`` logs why at debug level). The files live in tmpfs: they survive anything that kills
processes (SIGKILL, the OOM killer, a torchrun restart round, a relaunched job) but not a reboot or the loss of
the node.

The durable tier writes from the tier: a durable save comes with a snapshot of its step, and ``lend`` hands that
snapshot's copies to the save (``staging.Prestaged``) instead of a second staging copy. A lent slot is not
written again until its save is done; snapshots meanwhile all go to the other slot (with both slots lent, a
snapshot is skipped).

Memory per rank: 2 x the per-rank tensor bytes plus 2 x the skeleton (a few KB), in /dev/shm. If the tier cannot
get that room, or a snapshot fails, it says so once (a warning on ``ftrain.checkpoint``) and turns itself off:
``snapshot`` does nothing, ``complete_steps`` is empty. The tier never stops training.

Checksums: ``sums.py``'s xxh3-64 per 64 MiB chunk (the marker names the algorithm; CRC-32 markers are still read).

Hot path: ``snapshot`` calls each state's ``state_dict()`` and walks the result (``state_tree.split``: tensors
out, the rest into a new tree). Host state is then copied right there, in the training thread: a background copy
would compete with training for the cores and the GIL, and training has to wait for the copy before the next
optimizer step anyway (also for the snapshot a durable save writes from: copied in the background there, it cost
the save step more, not less; ``docs/bench.md``). Summing the copy and writing the marker only read the slot: a
background thread does that (xxhash releases the GIL while it sums). Device state is copied device-to-host on a
side stream by the background thread too, and ``wait`` waits for that copy only. A snapshot counts once its
marker is written; until then the other slot's older snapshot is the newest. What each part costs:
``tools/bench_local_tier.py`` and ``docs/bench.md``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch.distributed.checkpoint.stateful import Stateful

from ftrain.checkpoint import state_tree
from ftrain.checkpoint.local import memory, reading
from ftrain.checkpoint.local.directory import NotUsable, Owner, RankDir
from ftrain.checkpoint.local.marker import CHUNK, FORMAT, SLOTS, SnapshotMarker, data_name, marker_name, skel_name
from ftrain.checkpoint.local.memory import Disabled, Slots
from ftrain.checkpoint.local.plan import LentSnapshot, Plan, Taking
from ftrain.checkpoint.local.skeleton import decode as decode_skeleton
from ftrain.checkpoint.local.skeleton import encode as encode_skeleton
from ftrain.checkpoint.sums import WRITE_SUM, buffer_sum

logger = logging.getLogger("ftrain.checkpoint")

ALGORITHM = WRITE_SUM  # what new snapshots are summed with


@dataclass(frozen=True)
class _Copied:
    """A snapshot copied into its slot, not yet summed and marked."""

    step: int
    slot: int
    plan: Plan
    states: list[str]
    encoding: str
    skeleton: bytes


class LocalSnapshots:
    """Per-rank snapshots of the full training state in node-local memory (a directory on /dev/shm).

    Args:
        directory: the run's snapshot directory (``default_directory(run_dir)``); this rank uses ``rank-{rank}/``.
        rank, world_size: this process's place in the job; a snapshot of another rank or world size is never used.
        signature: what identifies the run and its model (JSON-serializable, e.g. the durable marker's signature
            fields); a snapshot with another signature is never used.
        max_bytes: the most this rank's two slots may take (default: whatever the directory's filesystem has free).
        owner: the run the directory is claimed for (``directory.Owner``); default: one derived from ``signature``
            (never taken over). A directory of another run that still exists turns the tier off.
        default: ``directory`` is the run's default one (``default_directory``): it must be private, and it is
            removed once empty.
    """

    def __init__(
        self,
        directory: Path,
        rank: int,
        world_size: int,
        signature: dict[str, Any],
        max_bytes: int | None = None,
        owner: Owner | None = None,
        default: bool = False,
    ) -> None:
        try:
            self.signature = json.loads(json.dumps(signature))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"the local snapshot signature must be JSON-serializable: {exc}") from None
        self.root = Path(directory) / f"rank-{rank}"
        self.rank = rank
        self.world_size = world_size
        self.max_bytes = max_bytes
        self._slots = Slots(self.root, rank, max_bytes)
        self.disabled: str | None = None  # why the tier is off
        # CPU time of the last snapshot's work in the background thread (its sums and marker; for device state
        # its copy too); None while that work runs
        self.background_cpu_s: float | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ftrain-local")
        self._job: Future[None] | None = None
        self._unmarked: tuple[int, Callable[[], None]] | None = None  # a snapshot copied with mark_later
        self._copied: threading.Event | None = None
        self._plan: Plan | None = None
        self._held: dict[int, int] | None = None  # slot -> step of its complete snapshot, known to this process
        self._taking: Taking | None = None  # the snapshot taken since the last wait(), which lend() can offer
        # snapshots durable saves write from, while in use (a list: a save still in flight keeps its slot while the
        # next save's snapshot, lent before its background copy has chosen a slot, waits to be placed)
        self._lent: list[tuple[Taking, Callable[[], bool]]] = []
        self._verified: dict[int, tuple[Any, ...]] = {}  # slot -> file identity of the last snapshot verified
        self._stream = None
        if owner is None:  # no run directory to tell whether the owner still exists: never taken over
            owner = Owner(hashlib.sha256(json.dumps(self.signature, sort_keys=True).encode()).hexdigest()[:32])
        self._dir: RankDir | None = None
        try:
            self._dir = RankDir(Path(directory), rank, owner, default=default)
        except NotUsable as exc:
            self._disable(f"local snapshots off, {directory} not used: {exc}")
        except OSError as exc:
            self._disable(f"local snapshots off, cannot use {self.root}: {exc}")

    def set_signature(self, signature: dict[str, Any]) -> None:
        """From now on, snapshots are taken (and used) under ``signature``: e.g. a new timeline after a durable
        resume; snapshots of the old one no longer count."""
        self._finish()
        self.signature = json.loads(json.dumps(signature))
        self._held = None
        self._verified.clear()

    # ------------------------------------------------------------------------------------------------ taking
    def snapshot(
        self, step: int, states: Mapping[str, Stateful], background: bool = False, mark_later: bool = False
    ) -> None:
        """Take a snapshot of ``states`` after ``step``: their ``state_dict()`` now; host tensors are copied now
        too, device tensors in the background. ``background``: host tensors too, on the path device state takes
        (for testing that path without a device). ``mark_later`` (host state): the background sums and marker
        wait for ``start_marking()`` (or anything that waits for the snapshot), e.g. until a durable save of the
        step has been dispatched, so that they do not compete with it.

        The tensors must not change until ``wait()`` returns (call it before the next optimizer step, e.g. from
        an optimizer step pre-hook); a snapshot still in flight is waited for first. Everything else is captured
        now: containers are rebuilt, other mutable leaves deep-copied.
        """
        if self.disabled:
            return
        self.wait()
        tensors: list[tuple[tuple[Any, ...], torch.Tensor, bool]] = []
        tree = {name: state_tree.split(state.state_dict(), (name,), tensors) for name, state in states.items()}
        self._copied = threading.Event()
        self._taking = Taking(step, [tensor for _, tensor, _ in tensors], self._copied)
        on_device = any(tensor.is_cuda for _, tensor, _ in tensors)
        if not on_device and not background:
            # Host state: copied here, in the training thread (a background copy competes with training for the
            # cores and the GIL, and the next optimizer step waits for it anyway; docs/bench.md compares the two).
            # Summing the copy and writing its marker read only the slot: the background thread does that, with
            # the GIL released while it sums.
            self._finish()  # the previous snapshot's marker (and its slot's bookkeeping) first
            copied = self._guarded(step, lambda: self._copy_to_slot(step, tree, tensors, None, self._taking))
            if copied is not None:
                self.background_cpu_s = None
                self._unmarked = (step, lambda: self._mark(copied))
                if not mark_later:
                    self.start_marking()
            return
        ready = None
        if on_device:
            device = next(tensor.device for _, tensor, _ in tensors if tensor.is_cuda)
            if self._stream is None:
                # made here, on the state's device: a new thread's current device is 0, and a stream made there
                # would put every rank's copies (and a CUDA context) on the node's first GPU
                self._stream = torch.cuda.Stream(device=device)
            ready = torch.cuda.Event()  # device state: copied device-to-host on a side stream
            ready.record(torch.cuda.current_stream(device))
        taking = self._taking
        self.start_marking()  # (the executor runs its jobs in order)
        self.background_cpu_s = None
        self._job = self._executor.submit(
            self._in_background, step, lambda: self._copied_then_marked(step, tree, tensors, ready, taking)
        )

    def _copied_then_marked(self, step: int, tree: dict[str, Any], tensors: list[Any], ready: Any, taking: Taking) -> None:
        copied = self._copy_to_slot(step, tree, tensors, ready, taking)
        if copied is not None:
            self._mark(copied)

    def wait(self) -> None:
        """Block until the copy of the snapshot in flight is done (its checksum and marker may still follow).
        The live tensors may change after this, so the snapshot can no longer be lent."""
        if self._copied is not None:
            self._copied.wait()
        self._taking = None

    def lend(self, step: int, in_use: Callable[[], bool]) -> LentSnapshot | None:
        """The snapshot of ``step`` taken by the last ``snapshot()``, for a durable save of the same step to write
        from instead of copying the live tensors again (the tier's copy is the staging copy). Call before anything
        changes the live tensors (``wait()`` ends the offer). Its slot is not overwritten while ``in_use()``: the
        snapshots after it all go to the other slot. None if there is no such snapshot."""
        taking = self._taking
        if self.disabled or taking is None or taking.step != step:
            return None
        self._lent.append((taking, in_use))
        return LentSnapshot(taking)

    def start_marking(self) -> None:
        """Start the background sums and marker of a snapshot taken with ``mark_later``."""
        if self._unmarked is not None:
            step, work = self._unmarked
            self._unmarked = None
            self._job = self._executor.submit(self._in_background, step, work)

    def background_cost(self, block: bool = False) -> float | None:
        """CPU seconds the latest snapshot's background work took; None while that work is still to come or
        runs, unless ``block``: then it waits for it."""
        if not block and (self._unmarked is not None or (self._job is not None and not self._job.done())):
            return None
        self._finish()
        return self.background_cpu_s

    def _finish(self) -> None:
        """Block until the snapshot in flight is complete (marker written) or has failed."""
        self.start_marking()
        if self._job is not None:
            self._job.result()
            self._job = None

    def _in_background(self, step: int, work: Callable[[], None]) -> None:
        """The executor's job: ``work``, then ``background_cpu_s`` = the CPU time it took."""
        started = time.thread_time()
        self._guarded(step, work)
        self.background_cpu_s = time.thread_time() - started

    def _guarded(self, step: int, work: Callable[[], Any]) -> Any:
        """``work()``; on any failure the tier turns itself off (it is an optimization: it never stops training)
        and None is returned."""
        try:
            return work()
        except Disabled as exc:
            self._disable(str(exc))
        except Exception as exc:
            self._disable(f"a local snapshot of step {step} failed: {type(exc).__name__}: {exc}")
        return None

    def _copy_to_slot(
        self,
        step: int,
        tree: dict[str, Any],
        tensors: list[tuple[tuple[Any, ...], torch.Tensor, bool]],
        ready: Any,
        taking: Taking,
    ) -> _Copied | None:
        """The first half of a snapshot: a slot chosen (its marker removed), the tensors copied into it, the
        skeleton encoded. ``taking.copied`` is set however it ends. None: no slot to write (both lent)."""
        try:
            slot = self._choose_slot(step)
            if slot is None:
                logger.debug("local snapshot of step %d skipped: durable saves write from both slots", step)
                return None
            plan = self._layout(tensors)
            views = self._slots.views(slot, plan, self._stream if ready is not None else None)
            self._copy(tensors, views, ready)
            taking.slot, taking.views = slot, views
            paths = None if plan.paths_in_marker else [entry.path for entry in plan.entries]
            encoding, skeleton = encode_skeleton({"tree": tree, "paths": paths})
            return _Copied(step, slot, plan, list(tree), encoding, skeleton)
        finally:
            taking.copied.set()  # the live tensors are no longer read

    def _mark(self, copied: _Copied) -> None:
        """The second half: the copy summed, the skeleton and then the marker written: the snapshot is complete."""
        slot, plan = copied.slot, copied.plan
        marker = SnapshotMarker(
            format=FORMAT,
            step=copied.step,
            rank=self.rank,
            world_size=self.world_size,
            signature=self.signature,
            states=copied.states,
            data_file=data_name(slot),
            data_size=plan.size,
            skeleton_file=skel_name(slot),
            skeleton_encoding=copied.encoding,
            skeleton_size=len(copied.skeleton),
            skeleton_checksum=buffer_sum(copied.skeleton, ALGORITHM),
            algorithm=ALGORITHM,
            chunk=CHUNK,
            data_sums=reading.chunk_sums(self._slots.buffers[slot], plan.size, ALGORITHM),
            tensors=[],  # encoded once per layout: plan.records_json
        )
        files = self._slots.files[slot]
        memory.overwrite(files.skeleton, copied.skeleton)  # the slot has no marker: no tmp + rename needed
        memory.replace(files.marker, marker.to_json(plan.records_json).encode(), files.marker_tmp)
        self._held[slot] = copied.step  # type: ignore[index]  # set by _choose_slot

    def _choose_slot(self, step: int) -> int | None:
        """The slot to write: never the one holding the newest older snapshot, never one a durable save is
        writing from (None when both are). Snapshots of this step or later (left by an earlier attempt that got
        further) are of another timeline and are dropped first."""
        if self._held is None:
            self._held = {slot: marker.step for slot, marker in self._markers().items()}
        for slot, held in list(self._held.items()):
            if held >= step:
                self._invalidate(slot)
        lent = self._lent_slots()
        usable = [slot for slot in SLOTS if slot not in lent]
        if not usable:
            return None
        free = [slot for slot in usable if slot not in self._held]
        # With a slot lent to a durable save, the other one is rewritten at every snapshot until the save is done:
        # a failure while it is being written finds the lent snapshot, a few steps older.
        slot = free[0] if free else min(usable, key=self._held.__getitem__)
        self._invalidate(slot)
        return slot

    def _lent_slots(self) -> set[int]:
        """The slots durable saves may still be reading: never written to. A lent snapshot not placed yet (this
        very snapshot, lent before its background copy chose a slot) stays on the list until it is copied."""
        self._lent = [
            (taking, in_use)
            for taking, in_use in self._lent
            if (in_use() if taking.slot is not None else not taking.copied.is_set())
        ]
        return {taking.slot for taking, _ in self._lent if taking.slot is not None}

    def _invalidate(self, slot: int) -> None:
        if self._dir is None:  # not this run's directory: never touched
            return
        try:
            os.unlink(self._slots.files[slot].marker)
        except FileNotFoundError:
            pass
        if self._held is not None:
            self._held.pop(slot, None)
        self._verified.pop(slot, None)

    def _layout(self, tensors: list[tuple[tuple[Any, ...], torch.Tensor, bool]]) -> Plan:
        if self._plan is not None and self._plan.matches(tensors):
            return self._plan
        plan = Plan([(path, t.dtype, t.shape, is_d, t.device) for path, t, is_d in tensors])
        self._slots.reserve(plan.size)
        self._plan = plan
        return plan

    def _copy(self, tensors: list[tuple[Any, torch.Tensor, bool]], views: list[torch.Tensor], ready: Any) -> None:
        memory.copy_into(views, [tensor for _, tensor, _ in tensors], ready, self._stream)

    # ------------------------------------------------------------------------------------------------ reading
    def complete_steps(self, verify_data: bool = True) -> list[int]:
        """Steps of this rank's complete snapshots that match this run, oldest first: marker, file sizes and
        skeleton checksum checked, and with ``verify_data`` the data's checksums too (once per process per
        snapshot). A resume passes False and then ``verify``s only the snapshot it is about to use: summing every
        slot's data at each restart would read twice the state that is restored."""
        if self.disabled:
            return []
        self._finish()
        markers = self._markers().items()
        return sorted({marker.step for slot, marker in markers if self._verify(slot, marker, data=verify_data)})

    def verify(self, step: int) -> bool:
        """Whether this rank holds a complete snapshot of ``step`` whose data matches its checksums."""
        if self.disabled:
            return False
        self._finish()
        return any(self._verify(slot, marker) for slot, marker in self._markers().items() if marker.step == step)

    def restore(self, step: int, states: Mapping[str, Stateful]) -> None:
        """Load the snapshot of ``step`` into ``states`` (same names as when it was taken) through their
        ``load_state_dict``, as ``dcp.load`` would: fresh tensors, DTensors rebuilt on the live mesh and placements.
        Snapshots of later steps are dropped (the run continues from ``step`` on another timeline). A state's
        ``state_dict()`` is called only when its snapshot holds DTensors (for their mesh and placements), so a
        progress object whose ``state_dict()`` would start a data loader iterator is safe to pass."""
        self._finish()
        found = [(slot, marker) for slot, marker in self._markers().items() if marker.step == step]
        found = [(slot, marker) for slot, marker in found if self._verify(slot, marker)]
        if not found:
            raise ValueError(f"no complete local snapshot of step {step} on rank {self.rank} in {self.root}")
        slot, marker = found[0]
        if sorted(marker.states) != sorted(states):
            raise ValueError(
                f"local snapshot of step {step} holds states {marker.states}, asked to restore {sorted(states)}"
            )
        tree = decode_skeleton(marker.skeleton_encoding, (self.root / skel_name(slot)).read_bytes())
        where = self.root / marker_name(slot)
        for name, state_dict in reading.read_state(self.root / data_name(slot), marker, tree, states, where).items():
            states[name].load_state_dict(state_dict)
        self.drop_after(step)
        self._held = {slot: held.step for slot, held in self._markers().items()}

    def drop_after(self, step: int) -> None:
        """Remove this rank's snapshots of steps after ``step``: the run goes on from ``step``, and those belong to
        a timeline it has left (call after resuming from a durable checkpoint). Nothing, when the directory is not
        this run's (the tier is off)."""
        if self._dir is None:
            return
        self._finish()
        for slot, marker in self._markers(match=False).items():
            if marker.step > step:
                self._invalidate(slot)

    def _markers(self, match: bool = True) -> dict[int, SnapshotMarker]:
        """slot -> its marker, for the slots whose marker is valid (and, with ``match``, of this run)."""
        return reading.read_markers(self.root, self._foreign if match else None)

    def _foreign(self, marker: SnapshotMarker) -> str:
        """Why ``marker`` is not of this run ('' when it is)."""
        if marker.world_size != self.world_size:
            return f"taken with {marker.world_size} ranks, this run has {self.world_size}"
        if marker.rank != self.rank:
            return f"taken by rank {marker.rank}"
        if marker.signature != self.signature:
            return "taken by another run or model (signature differs)"
        return ""

    def _verify(self, slot: int, marker: SnapshotMarker, data: bool = True) -> bool:
        """The snapshot's files are there, big enough, and match their checksums (the data's only with ``data``;
        once per process per snapshot)."""
        files = [self.root / data_name(slot), self.root / skel_name(slot), self.root / marker_name(slot)]
        try:
            identity = tuple((s.st_ino, s.st_size, s.st_mtime_ns) for s in map(os.stat, files))
        except OSError as exc:
            logger.debug("local snapshot %s not used: %s", files[2], exc)
            return False
        if self._verified.get(slot) == identity:
            return True
        problem = reading.data_problem(files[0], files[1], marker, data_sums=data)
        if problem:
            logger.debug("local snapshot %s not used: %s", files[2], problem)
            return False
        if data:
            self._verified[slot] = identity
        return True

    # ------------------------------------------------------------------------------------------------ ending
    def remove(self) -> None:
        """Delete this rank's snapshots (the run finished cleanly), and the directories once empty."""
        self._finish()
        self._unmap()
        if self._dir is not None:
            self._dir.remove()  # ftrain's own files only; directories only once empty
            self._dir.close()
            self._dir = None
        self._held = None
        self.disabled = self.disabled or "removed"

    def close(self) -> None:
        """Finish the snapshot in flight and let go of the mappings; the snapshots stay (a directory that never
        held one goes). Idempotent."""
        try:
            self._finish()
        finally:
            self._executor.shutdown(wait=True)
            self._unmap()
            self.disabled = self.disabled or "closed"
            if self._dir is not None:
                self._dir.remove_if_unused()
                self._dir.close()
                self._dir = None

    def _unmap(self) -> None:
        self._slots.unmap()

    def _disable(self, reason: str) -> None:
        if self.disabled is None:
            logger.warning("%s", reason)
        self.disabled = reason
        self._unmap()
