"""The local snapshot tier: each rank's latest training state in node-local memory, so a failure redoes a step,
not an interval.

    tier = LocalSnapshots(default_directory(run_dir), rank, world_size, signature)
    step = agree_on_step(tier.complete_steps(verify_data=False), durable_step, group)   # at load, every rank
    # ... then every rank tier.verify(step)s; if one fails, all agree again without that step
    if step is not None:
        tier.restore(step, states)            # bit-identical to loading a durable checkpoint of that step
    else:
        tier.drop_after(durable_step)         # snapshots of steps the run will now redo belong to another timeline
    ...
    tier.snapshot(step, states)               # after the optimizer step (host state: taken whole, ~1 ms here;
                                              # device state: copied to the host in the background)
    tier.wait()                               # before the next optimizer step changes what is being copied
    ...
    tier.remove(); tier.close()               # the run finished cleanly

Layout of ``{directory}/rank-{rank}/`` (default directory: ``/dev/shm/ftrain-<sha256 of the run directory>[:16]``,
created with mode 0700):

    slot-0.data  slot-1.data   tensor bytes: every tensor (a DTensor's local shard) at a 64-byte aligned offset;
                               allocated once (posix_fallocate, so a full /dev/shm can never SIGBUS a write into
                               the mapping) and reused, written through a MAP_SHARED mapping (torch.from_file)
    slot-0.skel  slot-1.skel   the rest of the state (ints, floats, strings, bytes blobs, the tree's shape):
                               a bare pickle read back by torch's weights_only unpickler (never runs code)
    slot-0.json  slot-1.json   the marker, written last (tmp + os.replace): step, signature, world_size, rank,
                               state names, each tensor's key/dtype/shape/offset and path in the state tree
                               (in the skeleton instead if a key is not a str, int or bool), checksums of data
                               and skeleton

Two slots alternate: the marker of the slot about to be written is removed before its first byte changes, so
the other slot's snapshot stays complete while the new one is in flight. A snapshot counts only when its marker
is valid, matches this run (signature, world size, rank) and its checksums verify; anything else is skipped
(``complete_steps`` logs why at debug level).

What survives what: the files live in tmpfs, so they survive anything that kills processes (SIGKILL, the OOM
killer, a torchrun restart round, a relaunched job) but not a reboot or the loss of the node.

The durable tier writes from the tier: a durable save comes with a snapshot of its step, and ``lend`` hands that
snapshot's copies to the save (``staging.Prestaged``) instead of a second staging copy. The lent slot is not
written again until the save is done; snapshots meanwhile all go to the other slot (a failure while that one is
being written finds the lent snapshot, a few steps older).

Memory per rank: 2 x the per-rank tensor bytes (the local shards of model + optimizer + any tensor state) plus
2 x the skeleton (a few KB), in /dev/shm (it counts as shared memory of the node). If the tier cannot get that
room (``shutil.disk_usage`` of the directory, ``max_bytes``, or posix_fallocate failing), it says so once (a
warning on ``ftrain.checkpoint``) and turns itself off: ``snapshot`` does nothing, ``complete_steps`` is empty.
A failure while taking a snapshot turns it off the same way; the tier never stops training.

Checksums: xxHash's xxh3-64 when ``xxhash`` is installed, else zlib's CRC-32, per 64 MiB chunk; the marker names
the algorithm. Measured on 256 MiB in /dev/shm here: zlib.crc32 6.6 GB/s, xxh3_64 21 GB/s, google-crc32c 8.6
GB/s on bytes but it refuses a writable or mapped buffer ("must be read-only bytes-like object"), so it would
need a copy (2.0 GB/s) and is not used. All three release the GIL.

Hot path: ``snapshot`` calls each state's ``state_dict()`` and walks the result (tensors out, the rest into a
new tree). Host state is then copied, summed and marked right there, in the training thread: on the recipe's 2
busy cores a background thread doing the same cost 5% of throughput at a snapshot per step, the inline call 0.6%
(the thread competed with training for the cores and the GIL, and training had to wait for its copy before the
next optimizer step anyway). Device state is copied device-to-host on a side stream by a background thread, and
``wait`` waits for that copy only. The skeleton is a bare pickle (``_encode_skeleton``), read back by torch's
weights_only unpickler. Measured here by ``tools/bench_local_tier.py`` (recipe model 0.48M parameters + AdamW +
TrainProgress = 5.8 MB in 118 tensors, one rank, medians of 50): ``snapshot()`` with the ``Local*State`` adapters
0.57 ms; with ``ftrain.state``'s states 2.6 ms, whose ``get_model_state_dict``/``get_optimizer_state_dict`` take 0.7 ms each
(vs 0.04/0.01 ms for the modules' own) and ``TrainProgress`` 0.18 ms for its torch.save blobs. The ``Local*State``
adapters restore the same objects (same model, same rank), so they suffice here. Inside the running recipe (2
ranks on 2 cores, the step's data evicting everything between snapshots) the same call takes 1.3 ms per rank
(2.9 MB): copy 0.30, state dicts 0.34, walk ~0.15, layout check 0.06, slot choice 0.06 (the marker's unlink),
skeleton 0.09, sums 0.09, files 0.08. With 256 MB more state the copy
takes 20-55 ms (5-14 GB/s) and the sums 0.01-0.02 s with xxh3 (0.1-0.2 s with CRC-32). With 512 MB more:
``complete_steps()`` (sums both slots) 0.16 s, a resume's ``complete_steps(verify_data=False)`` + ``verify(step)``
0.06 s; ``restore`` 0.2-0.4 s (mostly the first touch of the fresh tensors).
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import logging
import mmap
import os
import pickle
import shutil
import threading
import time
import weakref
import zlib
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.stateful import Stateful
from torch.distributed.tensor import DTensor

from ftrain.checkpoint.local_dir import NotUsable, Owner, RankDir
from ftrain.state import from_blob, to_blob

logger = logging.getLogger("ftrain.checkpoint")

# 2: the skeleton's encoding is in the marker; 3: the tensors' paths may be in the marker instead of the skeleton.
# Format 2 is still read; a snapshot of format 1 is not used (the run redoes a few steps).
FORMAT = 3
FORMATS_READ = (2, 3)
SKELETON_PICKLE, SKELETON_TORCH = "pickle", "torch"
SKELETON_ENCODINGS = (SKELETON_PICKLE, SKELETON_TORCH)
SLOTS = (0, 1)
ALIGN = 64
CHUNK = 64 << 20  # bytes per checksum
_IMMUTABLE = (int, float, bool, complex, str, bytes, type(None), torch.dtype, torch.device, torch.Size)
_IMMUTABLE_TYPES = frozenset(_IMMUTABLE)  # for the exact-type test on the hot path
_JSON_EXACT = frozenset((str, int, bool, type(None)))  # what a JSON round trip gives back as it was


def _crc32(buffer: memoryview) -> str:
    return f"{zlib.crc32(buffer):08x}"


def _checksum_functions() -> dict[str, Callable[[memoryview], str]]:
    found: dict[str, Callable[[memoryview], str]] = {"crc32": _crc32}
    try:
        import xxhash

        found["xxh3_64"] = lambda buffer: f"{xxhash.xxh3_64_intdigest(buffer):016x}"
    except ImportError:
        pass
    return found


CHECKSUMS = _checksum_functions()
ALGORITHM = "xxh3_64" if "xxh3_64" in CHECKSUMS else "crc32"  # the fastest one installed


def default_directory(run_dir: Path) -> Path:
    """``/dev/shm/ftrain-<16 hex digits>``: node-local memory, one directory per (resolved) run directory."""
    digest = hashlib.sha256(str(Path(run_dir).resolve()).encode()).hexdigest()[:16]
    return Path("/dev/shm") / f"ftrain-{digest}"


def agree_on_step(local_steps: list[int], durable_step: int | None, process_group: Any = None) -> int | None:
    """The newest step that every rank holds complete locally and that is newer than ``durable_step``; None if
    there is none. Collective over ``process_group`` (use a gloo group) when ``torch.distributed`` is initialized."""
    mine = sorted({int(step) for step in local_steps})
    if dist.is_available() and dist.is_initialized():
        gathered: list[Any] = [None] * dist.get_world_size(process_group)
        dist.all_gather_object(gathered, mine, group=process_group)
    else:
        gathered = [mine]
    return common_step(gathered, durable_step)


def common_step(per_rank: list[list[int]], durable_step: int | None) -> int | None:
    """``agree_on_step``'s decision from every rank's list of complete steps."""
    common = set.intersection(*(set(steps) for steps in per_rank)) if per_rank else set()
    floor = -1 if durable_step is None else durable_step
    newer = [step for step in common if step > floor]
    return max(newer) if newer else None


class LocalModelState(Stateful):
    """A model through its own ``state_dict``/``load_state_dict``: what the local tier needs (same model, same rank)
    at a fraction of ``get_model_state_dict``'s cost on the hot path (see the module docstring).

    When no module changes how it is saved (no ``state_dict``, ``_save_to_state_dict`` or ``get_extra_state`` of
    its own, no post-hooks), ``state_dict()`` collects the same entries straight from the modules' parameters and
    persistent buffers, after running their pre-hooks (FSDP2's make sure the parameters are the sharded ones): the
    same entries in the same order with the same ``_metadata``, as ``state_dict(keep_vars=True)`` gives them (the
    snapshot only reads them; a ``detach()`` per DTensor was most of the cost): 0.04 ms instead of 0.2 ms for the
    recipe's FSDP2 model (23 modules). ``direct(model)`` says which path a model takes."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model

    def state_dict(self) -> dict[str, Any]:
        # The modules are listed at every call (~0.01 ms): a module added or wrapped after construction counts.
        modules = list(self.model.named_modules(remove_duplicate=False))
        if not _plain(modules):
            return self.model.state_dict()
        state: OrderedDict[str, Any] = OrderedDict()
        for name, module in modules:
            for hook in module._state_dict_pre_hooks.values():
                hook(module, f"{name}." if name else "", False)
        for name, module in modules:
            prefix = f"{name}." if name else ""
            for key, param in module._parameters.items():
                if param is not None:
                    state[prefix + key] = param
            for key, buffer in module._buffers.items():
                if buffer is not None and key not in module._non_persistent_buffers_set:
                    state[prefix + key] = buffer
        state._metadata = OrderedDict((name, {"version": module._version}) for name, module in modules)  # type: ignore[attr-defined]
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.model.load_state_dict(state_dict)


class LocalOptimizerState(Stateful):
    """An optimizer through its own ``state_dict``/``load_state_dict``. An optimizer with no state yet is
    snapshotted as such (initializing it would change its next update); a restore initializes the fresh
    optimizer first (``layout_state_dict``), so that it finds the DTensor layout of every entry."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer

    def state_dict(self) -> dict[str, Any]:
        return self.optimizer.state_dict()

    def layout_state_dict(self) -> dict[str, Any]:
        if not self.optimizer.state:
            from torch.distributed.checkpoint.state_dict import _init_optim_state

            _init_optim_state(self.optimizer)
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state_dict)


class LocalProgressState(Stateful):
    """``ftrain.state.TrainProgress`` without its ``torch.save`` blobs: the same entries, but the RNG, scheduler
    and loader states stay objects (their tensors go into the slot, the rest into the skeleton, serialized in the
    background thread). ``TrainProgress.state_dict()`` spends most of its time making the blobs."""

    def __init__(self, progress: Any) -> None:
        self.progress = progress

    def state_dict(self) -> dict[str, Any]:
        from ftrain.state import capture_rng

        progress, key = self.progress, f"rank_{self.progress.rank}"
        return {
            "step": progress.step,
            "world_size": progress.world_size,
            "data_position": dict(progress.data_position),
            "scheduler": progress.scheduler.state_dict() if progress.scheduler is not None else None,
            "rng": {key: capture_rng(progress.device)},
            "data": {key: progress.dataloader.state_dict() if progress.dataloader is not None else None},
            "health": {key: progress.health_state()},
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:

        names = [name for name in ("rng", "data", "health") if name in state_dict]  # older snapshots lack "health"
        blobs = {name: {key: to_blob(value) for key, value in state_dict[name].items()} for name in names}
        self.progress.load_state_dict({**state_dict, "scheduler": to_blob(state_dict["scheduler"]), **blobs})


@dataclass(frozen=True)
class _Entry:
    """One tensor of a snapshot: where it is in the state tree and in the slot's data file."""

    path: tuple[Any, ...]
    dtype: torch.dtype
    shape: tuple[int, ...]
    dtensor: bool
    device: str
    offset: int
    nbytes: int

    def record(self) -> dict[str, Any]:
        return {
            "key": ".".join(str(part) for part in self.path),
            "dtype": str(self.dtype).removeprefix("torch."),
            "shape": list(self.shape),
            "offset": self.offset,
            "nbytes": self.nbytes,
            "dtensor": self.dtensor,
            "device": self.device,
        }


class _Plan:
    """Where each tensor of a snapshot goes in a slot file. It stays the same from step to step while the state
    keeps its layout (same paths, dtypes, shapes, devices), so the marker's table of tensors is encoded once."""

    def __init__(self, key: list[tuple[Any, ...]]) -> None:
        self.key = key  # (path, dtype, shape, dtensor, device) per tensor
        self.entries: list[_Entry] = []
        offset = 0
        for path, dtype, shape, is_d, device in key:
            nbytes = _numel(shape) * dtype.itemsize
            self.entries.append(_Entry(path, dtype, tuple(shape), is_d, str(device), offset, nbytes))
            offset += -(-nbytes // ALIGN) * ALIGN
        self.size = offset
        # JSON keeps str, int, bool and None apart, so paths made of those go into the marker's table (encoded
        # once per layout) instead of into the skeleton (pickled at every snapshot).
        self.paths_in_marker = all(type(part) in _JSON_EXACT for entry in self.entries for part in entry.path)
        records = [entry.record() for entry in self.entries]
        if self.paths_in_marker:
            for record, entry in zip(records, self.entries):
                record["path"] = list(entry.path)
        self.records_json = json.dumps(records)

    def matches(self, tensors: list[tuple[tuple[Any, ...], torch.Tensor, bool]]) -> bool:
        """Whether ``tensors`` have this plan's layout (compared in place: no key is built at every step)."""
        if len(tensors) != len(self.key):
            return False
        for (path, tensor, is_d), (k_path, dtype, shape, k_is_d, device) in zip(tensors, self.key):
            if tensor.dtype is not dtype or tensor.shape != shape or path != k_path or is_d is not k_is_d:
                return False
            if tensor.device != device:
                return False
        return True


class _Taking:
    """A snapshot being taken: its live tensors and, once copied, the slot and the views that hold the copies."""

    def __init__(self, step: int, tensors: list[torch.Tensor], copied: threading.Event) -> None:
        self.step = step
        self.tensors = tensors
        self.copied = copied
        self.slot: int | None = None
        self.views: list[torch.Tensor] | None = None  # set only when every copy succeeded


class LentSnapshot:
    """A snapshot's copies of the live tensors, lent to a durable save of the same step (a ``staging.Prestaged``)."""

    def __init__(self, taking: _Taking) -> None:
        self._taking = taking
        self._copies: dict[tuple[Any, ...], torch.Tensor] | None = None

    def ready(self) -> bool:
        self._taking.copied.wait()
        return self._taking.views is not None

    def copy_of(self, tensor: torch.Tensor) -> torch.Tensor | None:
        if self._copies is None:
            assert self._taking.views is not None, "ready() first"
            self._copies = {_identity(live): view for live, view in zip(self._taking.tensors, self._taking.views)}
        return self._copies.get(_identity(tensor))


def _identity(tensor: torch.Tensor) -> tuple[Any, ...]:
    """Which memory a tensor reads, as what it reads it: two tensors with equal identities hold equal values."""
    return (
        tensor.untyped_storage().data_ptr(),
        tensor.storage_offset(),
        tuple(tensor.shape),
        tensor.stride(),
        tensor.dtype,
        tensor.device,
    )


class _Disabled(Exception):
    """The tier cannot run here (no room, no usable directory); the message says why."""


class LocalSnapshots:
    """Per-rank snapshots of the full training state in node-local memory (a directory on /dev/shm).

    Args:
        directory: the run's snapshot directory (``default_directory(run_dir)``); this rank uses ``rank-{rank}/``.
        rank, world_size: this process's place in the job; a snapshot of another rank or world size is never used.
        signature: what identifies the run and its model (JSON-serializable, e.g. the durable marker's signature
            fields); a snapshot with another signature is never used.
        max_bytes: the most this rank's two slots may take (default: whatever the directory's filesystem has free).
        owner: the run the directory is claimed for (``local_dir.Owner``); default: one derived from ``signature``
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
        self._files = {slot: _SlotFiles(self.root, slot) for slot in SLOTS}
        self.rank = rank
        self.world_size = world_size
        self.max_bytes = max_bytes
        self.disabled: str | None = None  # why the tier is off
        # CPU time of the last snapshot's work in the background thread (device state only; 0 for host state,
        # which snapshot() takes whole, so its cost is the call's own time)
        self.background_cpu_s: float | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ftrain-local")
        self._job: Future[None] | None = None
        self._copied: threading.Event | None = None
        self._buffers: dict[int, torch.Tensor] = {}  # slot -> its data file, mapped
        self._views: dict[int, tuple[_Plan, list[torch.Tensor]]] = {}  # slot -> (its plan, a view per tensor)
        self._plan: _Plan | None = None
        self._held: dict[int, int] | None = None  # slot -> step of its complete snapshot, known to this process
        self._taking: _Taking | None = None  # the snapshot taken since the last wait(), which lend() can offer
        self._lent: tuple[_Taking, Callable[[], bool]] | None = None  # a snapshot a durable save reads, while in use
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
    def snapshot(self, step: int, states: Mapping[str, Stateful]) -> None:
        """Take a snapshot of ``states`` after ``step``: their ``state_dict()`` now; host tensors are copied now
        too, device tensors in the background.

        The tensors must not change until ``wait()`` returns (call it before the next optimizer step, e.g. from
        an optimizer step pre-hook); a snapshot still in flight is waited for first. Everything else is captured
        now: containers are rebuilt, other mutable leaves deep-copied.
        """
        if self.disabled:
            return
        self.wait()
        tensors: list[tuple[tuple[Any, ...], torch.Tensor, bool]] = []
        tree = {name: _split(state.state_dict(), (name,), tensors) for name, state in states.items()}
        self._copied = threading.Event()
        self._taking = _Taking(step, [tensor for _, tensor, _ in tensors], self._copied)
        if not any(tensor.is_cuda for _, tensor, _ in tensors):
            # Host state: taken here, in the training thread. A background thread measured far worse: on the
            # recipe's 2 busy cores a snapshot at every step cost 5% of throughput from a thread, 0.6% inline
            # (tools/bench_local_tier.py; docs/bench.md), since the thread's copy and Python work compete with
            # training for the cores and the GIL, and training waits for it before the next optimizer step anyway.
            self._take(step, tree, tensors, None, self._taking)
            return
        device = next(tensor.device for _, tensor, _ in tensors if tensor.is_cuda)
        if self._stream is None:
            # made here, on the state's device: a new thread's current device is 0, and a stream made there would
            # put every rank's copies (and a CUDA context) on the node's first GPU
            self._stream = torch.cuda.Stream(device=device)
        ready = torch.cuda.Event()  # device state: copied device-to-host on a side stream, in the background
        ready.record(torch.cuda.current_stream(device))
        self._job = self._executor.submit(self._take, step, tree, tensors, ready, self._taking)

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
        self._lent = (taking, in_use)
        return LentSnapshot(taking)

    def _finish(self) -> None:
        """Block until the snapshot in flight is complete (marker written) or has failed."""
        if self._job is not None:
            self._job.result()
            self._job = None

    def _take(
        self,
        step: int,
        tree: dict[str, Any],
        tensors: list[tuple[tuple[Any, ...], torch.Tensor, bool]],
        ready: Any,
        taking: _Taking,
    ) -> None:
        started = time.thread_time()
        try:
            try:
                slot = self._choose_slot(step)
                plan = self._layout(tensors)
                views = self._slot_views(slot, plan, pin=ready is not None)
                self._copy(tensors, views, ready)
                taking.slot, taking.views = slot, views
                paths = None if plan.paths_in_marker else [entry.path for entry in plan.entries]
                encoding, skeleton = _encode_skeleton({"tree": tree, "paths": paths})
            finally:
                taking.copied.set()  # the live tensors are no longer read
            marker = {
                "format": FORMAT,
                "step": step,
                "rank": self.rank,
                "world_size": self.world_size,
                "signature": self.signature,
                "states": list(tree),
                "data": {"file": _data_name(slot), "size": plan.size},
                "skeleton": {
                    "file": _skel_name(slot),
                    "encoding": encoding,
                    "size": len(skeleton),
                    "checksum": _sum(skeleton, ALGORITHM),
                },
                "checksum": {"algorithm": ALGORITHM, "chunk": CHUNK, "data": _chunk_sums(self._buffers[slot], plan.size)},
            }
            files = self._files[slot]
            _overwrite(files.skeleton, skeleton)  # the slot has no marker: no tmp + rename needed
            text = f'{json.dumps(marker)[:-1]}, "tensors": {plan.records_json}}}'
            _replace(files.marker, text.encode(), files.marker_tmp)
            assert self._held is not None
            self._held[slot] = step
            self.background_cpu_s = time.thread_time() - started if ready is not None else 0.0
        except _Disabled as exc:
            self._disable(str(exc))
        except Exception as exc:  # the tier is an optimization: it must never stop training
            self._disable(f"a local snapshot of step {step} failed: {type(exc).__name__}: {exc}")

    def _choose_slot(self, step: int) -> int:
        """The slot to write: never the one holding the newest older snapshot. Snapshots of this step or later
        (left by an earlier attempt that got further) are of another timeline and are dropped first."""
        if self._held is None:
            self._held = {slot: marker["step"] for slot, marker in self._markers().items()}
        for slot, held in list(self._held.items()):
            if held >= step:
                self._invalidate(slot)
        lent = self._lent_slot()
        usable = [slot for slot in SLOTS if slot != lent]
        free = [slot for slot in usable if slot not in self._held]
        # With a slot lent to a durable save, the other one is rewritten at every snapshot until the save is done:
        # a failure while it is being written finds the lent snapshot, a few steps older.
        slot = free[0] if free else min(usable, key=self._held.__getitem__)
        self._invalidate(slot)
        return slot

    def _lent_slot(self) -> int | None:
        """The slot a durable save may still be reading: never written to."""
        if self._lent is None:
            return None
        taking, in_use = self._lent
        if taking.slot is not None and in_use():
            return taking.slot
        self._lent = None
        return None

    def _invalidate(self, slot: int) -> None:
        if self._dir is None:  # not this run's directory: never touched
            return
        try:
            os.unlink(self._files[slot].marker)
        except FileNotFoundError:
            pass
        if self._held is not None:
            self._held.pop(slot, None)
        self._verified.pop(slot, None)

    def _layout(self, tensors: list[tuple[tuple[Any, ...], torch.Tensor, bool]]) -> _Plan:
        if self._plan is not None and self._plan.matches(tensors):
            return self._plan
        plan = _Plan([(path, t.dtype, t.shape, is_d, t.device) for path, t, is_d in tensors])
        self._reserve(plan.size)
        self._plan = plan
        return plan

    def _reserve(self, size: int) -> None:
        """Make both slot files ``size`` bytes (or more), with the room reserved, before any is mapped."""
        current = {slot: _file_size(self.root / _data_name(slot)) for slot in SLOTS}
        needed = sum(max(0, size - have) for have in current.values())
        limit = shutil.disk_usage(self.root).free
        if self.max_bytes is not None:
            limit = min(limit, self.max_bytes - sum(current.values()))
        if needed > limit:
            raise _Disabled(
                f"local snapshots off: rank {self.rank} needs {_mb(2 * size)} for two snapshots in {self.root.parent}, "
                f"{_mb(max(limit, 0))} more is available; training goes on with durable checkpoints only"
            )
        for slot in SLOTS:
            if current[slot] < size:
                self._buffers.pop(slot, None)
                self._views.pop(slot, None)
                fd = os.open(self.root / _data_name(slot), os.O_RDWR | os.O_CREAT, 0o600)
                try:
                    os.posix_fallocate(fd, 0, size)
                except OSError as exc:
                    raise _Disabled(f"local snapshots off: cannot reserve {_mb(size)} in {self.root}: {exc}") from None
                finally:
                    os.close(fd)

    def _slot_views(self, slot: int, plan: _Plan, pin: bool = False) -> list[torch.Tensor]:
        cached = self._views.get(slot)
        if cached is not None and cached[0] is plan:
            return cached[1]
        buffer = self._buffers.get(slot)
        file_size = _file_size(self.root / _data_name(slot))
        if buffer is None or buffer.numel() != file_size:
            buffer = _map(self._files[slot].data, file_size)
            if pin:
                assert self._stream is not None
                with torch.cuda.device(self._stream.device):  # this thread's current device is 0 otherwise
                    _page_lock(buffer, self._files[slot].data)
            self._buffers[slot] = buffer
        views = [_view(buffer, entry) for entry in plan.entries]
        self._views[slot] = (plan, views)
        return views

    def _copy(self, tensors: list[tuple[Any, torch.Tensor, bool]], views: list[torch.Tensor], ready: Any) -> None:
        with torch.no_grad():
            if ready is None:
                # one call for all tensors: 0.08 ms instead of 0.13 ms for the recipe's 118 (per-call overhead)
                torch._foreach_copy_(views, [tensor for _, tensor, _ in tensors])
                return
            assert self._stream is not None
            with torch.cuda.device(self._stream.device), torch.cuda.stream(self._stream):
                self._stream.wait_event(ready)  # every update the training stream had queued at snapshot()
                for (_, tensor, _), view in zip(tensors, views):
                    view.copy_(tensor, non_blocking=True)  # asynchronous into the pinned slot (else synchronous)
                self._stream.synchronize()

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
        return sorted({marker["step"] for slot, marker in markers if self._verify(slot, marker, data=verify_data)})

    def verify(self, step: int) -> bool:
        """Whether this rank holds a complete snapshot of ``step`` whose data matches its checksums."""
        if self.disabled:
            return False
        self._finish()
        return any(self._verify(slot, marker) for slot, marker in self._markers().items() if marker["step"] == step)

    def restore(self, step: int, states: Mapping[str, Stateful]) -> None:
        """Load the snapshot of ``step`` into ``states`` (same names as when it was taken) through their
        ``load_state_dict``, as ``dcp.load`` would: fresh tensors, DTensors rebuilt on the live mesh and placements.
        Snapshots of later steps are dropped (the run continues from ``step`` on another timeline). A state's
        ``state_dict()`` is called only when its snapshot holds DTensors (for their mesh and placements), so a
        progress object whose ``state_dict()`` would start a data loader iterator is safe to pass."""
        self._finish()
        found = [(slot, marker) for slot, marker in self._markers().items() if marker["step"] == step]
        found = [(slot, marker) for slot, marker in found if self._verify(slot, marker)]
        if not found:
            raise ValueError(f"no complete local snapshot of step {step} on rank {self.rank} in {self.root}")
        slot, marker = found[0]
        if sorted(marker["states"]) != sorted(states):
            raise ValueError(
                f"local snapshot of step {step} holds states {marker['states']}, asked to restore {sorted(states)}"
            )
        for name, state_dict in self._read(slot, marker, states).items():
            states[name].load_state_dict(state_dict)
        self.drop_after(step)
        self._held = {slot: held["step"] for slot, held in self._markers().items()}

    def drop_after(self, step: int) -> None:
        """Remove this rank's snapshots of steps after ``step``: the run goes on from ``step``, and those belong to
        a timeline it has left (call after resuming from a durable checkpoint). Nothing, when the directory is not
        this run's (the tier is off)."""
        if self._dir is None:
            return
        self._finish()
        for slot, marker in self._markers(match=False).items():
            if marker["step"] > step:
                self._invalidate(slot)

    def _read(self, slot: int, marker: dict[str, Any], states: Mapping[str, Stateful]) -> dict[str, Any]:
        skeleton = _decode_skeleton(marker["skeleton"]["encoding"], (self.root / _skel_name(slot)).read_bytes())
        listed = skeleton["paths"] if skeleton["paths"] is not None else [record["path"] for record in marker["tensors"]]
        paths = [tuple(path) for path in listed]
        if len(paths) != len(marker["tensors"]):
            raise ValueError(f"local snapshot {self.root / _marker_name(slot)}: skeleton and marker disagree")
        live: dict[str, Any] = {}
        values: dict[tuple[Any, ...], torch.Tensor] = {}
        with open(self.root / _data_name(slot), "rb", buffering=0) as data:
            for path, record in zip(paths, marker["tensors"]):
                tensor = _read_tensor(data, record)
                if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                    # a poisoned state (NaN written into a parameter while the loss still looked finite) is never
                    # resumed: the durable tier, whose writer refuses such tensors, takes over
                    raise ValueError(f"local snapshot of step {marker['step']}: {record['key']} holds NaN or Inf")
                if record["dtensor"]:
                    if path[0] not in live:
                        state = states[path[0]]
                        live[path[0]] = getattr(state, "layout_state_dict", state.state_dict)()
                    tensor = _as_dtensor(tensor, _at(live[path[0]], path[1:]), path)
                values[path] = tensor
        return {name: _join(skeleton["tree"][name], (name,), values) for name in marker["states"]}

    def _markers(self, match: bool = True) -> dict[int, dict[str, Any]]:
        """slot -> its marker, for the slots whose marker is well formed (and, with ``match``, of this run)."""
        found = {}
        for slot in SLOTS:
            path = self.root / _marker_name(slot)
            try:
                marker = json.loads(path.read_bytes())
            except FileNotFoundError:
                continue
            except (OSError, ValueError) as exc:
                logger.debug("local snapshot %s not used: unreadable marker (%s)", path, exc)
                continue
            problem = _marker_problem(marker, slot)
            if not problem and match:
                problem = self._foreign(marker)
            if problem:
                logger.debug("local snapshot %s not used: %s", path, problem)
                continue
            found[slot] = marker
        return found

    def _foreign(self, marker: dict[str, Any]) -> str:
        if marker["world_size"] != self.world_size:
            return f"taken with {marker['world_size']} ranks, this run has {self.world_size}"
        if marker["rank"] != self.rank:
            return f"taken by rank {marker['rank']}"
        if marker["signature"] != self.signature:
            return "taken by another run or model (signature differs)"
        return ""

    def _verify(self, slot: int, marker: dict[str, Any], data: bool = True) -> bool:
        """The snapshot's files are there, big enough, and match their checksums (the data's only with ``data``;
        once per process per snapshot)."""
        files = [self.root / _data_name(slot), self.root / _skel_name(slot), self.root / _marker_name(slot)]
        try:
            identity = tuple((s.st_ino, s.st_size, s.st_mtime_ns) for s in map(os.stat, files))
        except OSError as exc:
            logger.debug("local snapshot %s not used: %s", files[2], exc)
            return False
        if self._verified.get(slot) == identity:
            return True
        problem = _data_problem(files[0], files[1], marker, data_sums=data)
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
        self._views.clear()
        self._buffers.clear()

    def _disable(self, reason: str) -> None:
        if self.disabled is None:
            logger.warning("%s", reason)
        self.disabled = reason
        self._unmap()


# ---------------------------------------------------------------------------------------------- helpers
def direct(model: torch.nn.Module) -> bool:
    """Whether ``LocalModelState`` collects ``model``'s state directly (else through ``model.state_dict()``)."""
    return _plain(list(model.named_modules(remove_duplicate=False)))


def _plain(modules: list[tuple[str, torch.nn.Module]]) -> bool:
    """Whether ``nn.Module.state_dict`` of these modules is only their parameters and persistent buffers."""
    base = torch.nn.Module
    return all(
        type(module).state_dict is base.state_dict
        and type(module)._save_to_state_dict is base._save_to_state_dict
        and type(module).get_extra_state is base.get_extra_state
        and not module._state_dict_hooks
        for _, module in modules
    )


def _split(value: Any, path: tuple[Any, ...], tensors: list[tuple[tuple[Any, ...], torch.Tensor, bool]]) -> Any:
    """A copy of the tree with every strided tensor taken out (into ``tensors``, a None in its place).

    This runs at every snapshot over every entry of the state: a container's plain values and DTensors are
    handled in its own loop, without a call or a path per entry (the recipe's optimizer state: 37 instead of
    46 us, isolated)."""
    kind = type(value)
    if kind is dict or kind is OrderedDict:
        tree = kind()
        for key, item in value.items():
            item_kind = type(item)
            if item_kind in _IMMUTABLE_TYPES:
                tree[key] = item
            elif item_kind is DTensor:  # FSDP2's parameters and their optimizer state
                tensors.append(((*path, key), item._local_tensor, True))
                tree[key] = None
            elif item_kind is torch.Tensor and _strided(item):  # e.g. an optimizer's step
                tensors.append(((*path, key), item, False))
                tree[key] = None
            else:
                tree[key] = _split(item, (*path, key), tensors)
        if kind is OrderedDict and hasattr(value, "_metadata"):  # nn.Module.state_dict()'s per-module versions
            tree._metadata = value._metadata  # type: ignore[union-attr]
        return tree
    if kind is torch.Tensor or kind is torch.nn.Parameter:
        if _strided(value):
            tensors.append((path, value, False))
            return None
        return value.detach().clone()  # rare: kept whole in the skeleton
    if kind is list or kind is tuple:
        items = [
            item if type(item) in _IMMUTABLE_TYPES else _split(item, (*path, index), tensors)
            for index, item in enumerate(value)
        ]
        return items if kind is list else tuple(items)
    if kind in _IMMUTABLE_TYPES:
        return value
    if isinstance(value, DTensor):
        tensors.append((path, value._local_tensor, True))
        return None
    if isinstance(value, torch.Tensor):
        return _split(value.as_subclass(torch.Tensor), path, tensors)
    if isinstance(value, dict):  # a subclass: kept as the plain container it extends
        ordered = isinstance(value, OrderedDict)
        tree = _split(OrderedDict(value) if ordered else dict(value), path, tensors)
        if ordered and hasattr(value, "_metadata"):
            tree._metadata = value._metadata
        return tree
    if isinstance(value, (list, tuple)):
        items = [_split(item, (*path, index), tensors) for index, item in enumerate(value)]
        return items if isinstance(value, list) else tuple(items)
    if isinstance(value, _IMMUTABLE):
        return value
    return copy.deepcopy(value)  # never alias what training may change before the snapshot is written


def _strided(tensor: torch.Tensor) -> bool:
    """Whether a tensor's elements can go into the slot as they are (else it stays whole in the skeleton)."""
    return tensor.layout is torch.strided and not tensor.is_quantized and not tensor.is_meta


def _join(tree: Any, path: tuple[Any, ...], values: dict[tuple[Any, ...], torch.Tensor]) -> Any:
    """``_split`` undone: the tensors put back at their paths."""
    if path in values:
        return values[path]
    if isinstance(tree, dict):
        joined = OrderedDict() if isinstance(tree, OrderedDict) else {}
        for key, item in tree.items():
            joined[key] = _join(item, (*path, key), values)
        if hasattr(tree, "_metadata"):
            joined._metadata = tree._metadata  # type: ignore[union-attr]
        return joined
    if isinstance(tree, (list, tuple)):
        items = [_join(item, (*path, index), values) for index, item in enumerate(tree)]
        return items if isinstance(tree, list) else tuple(items)
    return tree


def _at(tree: Any, path: tuple[Any, ...]) -> Any:
    for key in path:
        try:
            tree = tree[key]
        except (KeyError, IndexError, TypeError):
            return None
    return tree


def _as_dtensor(local: torch.Tensor, live: Any, path: tuple[Any, ...]) -> DTensor:
    if not isinstance(live, DTensor):
        raise ValueError(f"cannot restore {'.'.join(map(str, path))}: it was a DTensor, the live state has none there")
    return DTensor.from_local(
        local.to(live._local_tensor.device),
        live.device_mesh,
        live.placements,
        run_check=False,
        shape=live.shape,
        stride=live.stride(),
    )


def _map(path: str, size: int) -> torch.Tensor:
    """The file's bytes as a tensor written through a shared mapping that keeps its file descriptor: torch's
    multiprocessing then hands views of it to another process by descriptor (``async_process``'s writer maps the
    same pages, no copy). ``torch.from_file`` closes its descriptor, and torch would copy such a tensor into new
    shared memory instead (replacing this mapping in place)."""
    fd = os.open(path, os.O_RDWR)
    try:
        storage = torch.UntypedStorage._new_shared_fd_cpu(fd, size)  # maps a dup of fd, kept open with the map
    finally:
        os.close(fd)
    return torch.empty(0, dtype=torch.uint8).set_(storage)


def _page_lock(buffer: torch.Tensor, name: str) -> None:
    """Page-lock a slot's mapping for the device-to-host copies (``cudaHostRegister``, as DCP's stager and ours pin
    shared buffers): asynchronous copies at full speed on the side stream, instead of synchronous ones through a
    pageable bounce buffer. Unlocked when the mapping's tensor goes. If it cannot be locked, the copies still work."""
    if not buffer.nbytes:
        return
    from torch.cuda import _pin_memory_utils

    try:
        _pin_memory_utils.pin_memory(buffer.data_ptr(), buffer.nbytes)
    except RuntimeError as exc:
        logger.warning("local snapshots: cannot page-lock %s (%s); device copies go through pageable memory", name, exc)
        return
    weakref.finalize(buffer, _pin_memory_utils.unpin_memory, buffer.data_ptr())


def _view(buffer: torch.Tensor, entry: _Entry) -> torch.Tensor:
    return buffer[entry.offset : entry.offset + entry.nbytes].view(entry.dtype).view(entry.shape)


def _read_tensor(data: Any, record: dict[str, Any]) -> torch.Tensor:
    tensor = torch.empty(record["shape"], dtype=_dtype(record["dtype"]))
    if record["nbytes"]:
        raw = tensor.view(-1).view(torch.uint8).numpy()
        data.seek(record["offset"])
        if data.readinto(raw) != record["nbytes"]:
            raise ValueError(f"local snapshot: {record['key']} is cut short")
    device = torch.device(record["device"])
    return tensor if device.type == "cpu" else tensor.to(device)


def _sum(content: bytes, algorithm: str) -> str:
    return CHECKSUMS[algorithm](memoryview(content))


def _chunk_sums(buffer: torch.Tensor, size: int) -> list[str]:
    view = memoryview(buffer.numpy())
    return [CHECKSUMS[ALGORITHM](view[start : min(start + CHUNK, size)]) for start in range(0, size, CHUNK)]


def _data_problem(data: Path, skel: Path, marker: dict[str, Any], *, data_sums: bool = True) -> str:
    algorithm = marker["checksum"]["algorithm"]
    if algorithm not in CHECKSUMS:
        return f"checksum algorithm {algorithm} is not installed here"
    size = marker["data"]["size"]
    if _file_size(data) < size:
        return f"{data.name} is shorter than the marker's {size} bytes"
    skeleton = skel.read_bytes()
    if len(skeleton) != marker["skeleton"]["size"] or _sum(skeleton, algorithm) != marker["skeleton"]["checksum"]:
        return f"{skel.name} fails its checksum"
    if data_sums and size and _file_sums(data, size, algorithm) != marker["checksum"]["data"]:
        return f"{data.name} fails its checksum"
    return ""


def _file_sums(path: Path, size: int, algorithm: str) -> list[str]:
    """The chunk sums of the first ``size`` bytes of ``path``, read through a populated read-only mapping."""
    with open(path, "rb") as handle:
        flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
        with mmap.mmap(handle.fileno(), size, flags=flags, prot=mmap.PROT_READ) as mapped:
            with memoryview(mapped) as view:
                return [CHECKSUMS[algorithm](view[start : min(start + CHUNK, size)]) for start in range(0, size, CHUNK)]


def _marker_problem(marker: Any, slot: int) -> str:
    """Why a marker is malformed ('' when it is well formed)."""
    if not isinstance(marker, dict) or marker.get("format") not in FORMATS_READ:
        return f"unknown format {marker.get('format') if isinstance(marker, dict) else marker!r}"
    try:
        assert isinstance(marker["step"], int) and isinstance(marker["rank"], int)
        assert isinstance(marker["world_size"], int) and isinstance(marker["states"], list)
        assert marker["data"]["file"] == _data_name(slot) and marker["skeleton"]["file"] == _skel_name(slot)
        assert marker["skeleton"]["encoding"] in SKELETON_ENCODINGS
        size, chunk = marker["data"]["size"], marker["checksum"]["chunk"]
        assert isinstance(size, int) and size >= 0 and chunk == CHUNK
        assert isinstance(marker["checksum"]["data"], list) and len(marker["checksum"]["data"]) == -(-size // CHUNK)
        for record in marker["tensors"]:
            numel = _numel(record["shape"])
            assert numel >= 0 and record["nbytes"] == numel * _dtype(record["dtype"]).itemsize
            assert 0 <= record["offset"] and record["offset"] + record["nbytes"] <= size
            assert isinstance(record.get("path", []), list)
    except (AssertionError, KeyError, TypeError, ValueError) as exc:
        return f"malformed marker ({type(exc).__name__}: {exc})"
    return ""


class _HoldsTensor(Exception):
    """The skeleton holds a tensor (a rare kind that stays whole): it needs torch.save."""


class _SkeletonPickler(pickle.Pickler):
    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, torch.Tensor):
            raise _HoldsTensor
        return NotImplemented


def _encode_skeleton(skeleton: dict[str, Any]) -> tuple[str, bytes]:
    """(encoding, bytes). Normally a bare pickle (protocol 2, what torch.save writes inside its archive): ~15 us
    here against ~190 us for torch.save's zip archive, at every snapshot. A tensor left in the skeleton (sparse,
    quantized) needs torch.save."""
    buffer = io.BytesIO()
    try:
        _SkeletonPickler(buffer, protocol=2).dump(skeleton)
        return SKELETON_PICKLE, buffer.getvalue()
    except _HoldsTensor:
        return SKELETON_TORCH, to_blob(skeleton)


def _decode_skeleton(encoding: str, blob: bytes) -> Any:
    """Both encodings are read by torch's weights_only unpickler: building containers and plain values only,
    never running code from the file. (``torch.load(weights_only=True)`` reads only torch.save's archive, so the
    bare pickle goes to the same unpickler directly.)"""
    if encoding == SKELETON_TORCH:
        return from_blob(blob)
    from torch import _weights_only_unpickler

    try:
        return _weights_only_unpickler.Unpickler(io.BytesIO(blob)).load()
    except Exception as exc:  # its refusals are UnpicklingError; a truncated file can raise others
        raise ValueError(f"skeleton not readable: {exc}") from None


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return dtype


def _numel(shape: Any) -> int:
    count = 1
    for dim in shape:
        if not isinstance(dim, int) or dim < 0:
            raise ValueError(f"bad shape {shape!r}")
        count *= dim
    return count


def _replace(path: str, content: bytes, tmp: str) -> None:
    """Write ``path`` atomically (``tmp`` + rename). No fsync: on tmpfs there is no disk, and the tier does not
    claim to survive the machine."""
    _overwrite(tmp, content)
    os.replace(tmp, path)


def _overwrite(path: str, content: bytes) -> None:
    """Write ``path`` in place: for a file only a marker written after it vouches for. os-level calls, as this
    runs at every snapshot (half the time of ``open()``'s buffered file object)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        view = memoryview(content)
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)


def _file_size(path: Path) -> int:
    try:
        return os.stat(path).st_size
    except FileNotFoundError:
        return 0


def _mb(size: int) -> str:
    return f"{size / 1e6:.1f} MB"


class _SlotFiles:
    """A slot's file names as strings, made once: ``Path`` arithmetic costs microseconds at every snapshot."""

    def __init__(self, root: Path, slot: int) -> None:
        self.data = str(root / _data_name(slot))
        self.skeleton = str(root / _skel_name(slot))
        self.marker = str(root / _marker_name(slot))
        self.marker_tmp = self.marker + ".tmp"


def _data_name(slot: int) -> str:
    return f"slot-{slot}.data"


def _skel_name(slot: int) -> str:
    return f"slot-{slot}.skel"


def _marker_name(slot: int) -> str:
    return f"slot-{slot}.json"
