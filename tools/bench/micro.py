"""The micro part, on one rank of a torchrun job: floors, ``dcp.save``, each CheckpointManager mode, resume, and
the peak host memory of each."""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from ftrain.checkpoint.storage.posix import fsync_dir

from .common import MANAGER_MODES, BenchError, remove, summarize
from .report import write_report
from .system import MemorySampler


def default_size_mb(device: torch.device) -> float:
    return 4096.0 if device.type == "cuda" else 1024.0


class Ranks:
    """This rank's place in the group, and max-over-ranks timing on a gloo group of the benchmark's own."""

    def __init__(self, rank: int, world_size: int, device: torch.device, checkpoint_group: dist.ProcessGroup) -> None:
        self.rank = rank
        self.world_size = world_size
        self.device = device
        self.checkpoint_group = checkpoint_group
        self.group = dist.new_group(backend="gloo")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        dist.barrier(group=self.group)

    def max(self, values: list[float]) -> list[float]:
        tensor = torch.tensor(values, dtype=torch.float64)
        if self.world_size > 1:
            dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=self.group)
        return tensor.tolist()

    def sync_device(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def timed(self, fn: Callable[[], Any]) -> float:
        """Run ``fn`` on every rank from a common start; the slowest rank's time."""
        self.barrier()
        started = time.perf_counter()
        fn()
        self.sync_device()
        return self.max([time.perf_counter() - started])[0]

    def say(self, message: str) -> None:
        if self.is_main:
            print(f"[bench] {message}", flush=True)


def make_state(per_rank_bytes: int, tensor_bytes: int, device: torch.device, rank: int) -> dict[str, torch.Tensor]:
    """Float32 tensors of random values adding up to ``per_rank_bytes``.

    Keys carry the rank: DCP takes a plain tensor whose key every rank has for a replicated one and writes it
    from rank 0 only, so shared keys would leave the other ranks with nothing to write.
    """
    generator = torch.Generator().manual_seed(1234 + rank)
    state, left, index = {}, per_rank_bytes, 0
    while left > 0:
        numel = max(min(tensor_bytes, left) // 4, 1)
        state[f"rank{rank}.t{index:04d}"] = torch.rand(numel, generator=generator).to(device)
        left -= numel * 4
        index += 1
    return state


def state_bytes(state: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


def empty_like_host(state: dict[str, torch.Tensor], pinned: bool = False) -> dict[str, torch.Tensor]:
    return {k: torch.empty(t.shape, dtype=t.dtype, pin_memory=pinned) for k, t in state.items()}


def copy_into(dst: dict[str, torch.Tensor], src: dict[str, torch.Tensor], non_blocking: bool = False) -> None:
    for key, tensor in src.items():
        dst[key].copy_(tensor, non_blocking=non_blocking)


def _byte_view(tensor: torch.Tensor) -> memoryview:
    return memoryview(tensor.numpy()).cast("B")


def write_file(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Plain sequential writes of every tensor's bytes, then fsync the file and its directory."""
    with open(path, "wb", buffering=0) as handle:
        for tensor in tensors.values():
            view, done = _byte_view(tensor), 0
            while done < len(view):
                done += handle.write(view[done:])
        os.fsync(handle.fileno())
    fsync_dir(path.parent)


def read_file(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Plain sequential reads straight into preallocated tensors."""
    with open(path, "rb", buffering=0) as handle:
        for tensor in tensors.values():
            view, done = _byte_view(tensor), 0
            while done < len(view):
                got = handle.readinto(view[done:])
                if not got:
                    raise BenchError(f"{path} is shorter than the state it should hold")
                done += got


def drop_page_cache(paths: list[Path]) -> None:
    """Evict these (fsynced, hence clean) files from the page cache, so that reading them goes to the disk."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


class Micro:
    """The micro part on one rank; every method is called by all ranks in the same order."""

    def __init__(self, args: argparse.Namespace, ranks: Ranks, state: dict[str, torch.Tensor], work: Path) -> None:
        self.args = args
        self.ranks = ranks
        self.state = state
        self.work = work
        self.rank_bytes = state_bytes(state)
        self.memory = MemorySampler()
        self.memory_results: dict[str, dict[str, Any]] = {}

    def repeat(self, fn: Callable[[], float | list[float]]) -> list[Any]:
        """Warm-up runs, then the measured ones."""
        for _ in range(self.args.warmup):
            fn()
        return [fn() for _ in range(self.args.reps)]

    def track(self, name: str, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` and record the peak host memory above what this rank held before it."""
        self.ranks.barrier()
        base_total, base_children = self.memory.reset()
        result = fn()
        peak_total, peak_children = self.memory.peak()
        extra, children = self.ranks.max([float(peak_total - base_total), float(peak_children - base_children)])
        self.memory_results[name] = {
            "extra_peak_bytes": int(extra),
            "children_extra_bytes": int(children),
            "ratio_to_rank_size": extra / self.rank_bytes,
        }
        return result

    # floors
    def copy_floor(self, pinned: bool) -> dict[str, Any]:
        dst = empty_like_host(self.state, pinned=pinned)
        times = self.repeat(lambda: self.ranks.timed(lambda: copy_into(dst, self.state, non_blocking=pinned)))
        return self._with_rate(summarize(times), self.rank_bytes * self.ranks.world_size)

    def disk_floor(self) -> dict[str, Any]:
        folder = self.work / "floor"
        if self.ranks.is_main:
            folder.mkdir(parents=True, exist_ok=True)
        self.ranks.barrier()
        path = folder / f"rank{self.ranks.rank}.bin"
        host = self.state if self.ranks.device.type == "cpu" else {k: t.cpu() for k, t in self.state.items()}
        into = empty_like_host(host)
        copy_into(into, host)  # touch the pages once, like the load target of a resume

        def write() -> float:
            path.unlink(missing_ok=True)
            return self.ranks.timed(lambda: write_file(path, host))

        def read() -> float:
            drop_page_cache([path])
            return self.ranks.timed(lambda: read_file(path, into))

        total = self.rank_bytes * self.ranks.world_size
        writes = self._with_rate(summarize(self.repeat(write)), total)
        reads = self._with_rate(summarize(self.repeat(read)), total)
        if not all(torch.equal(into[k], host[k]) for k in host):
            raise BenchError("the read floor read back different bytes than were written")
        self.ranks.barrier()
        remove(folder)
        return {"write": writes, "read": reads}

    # saves
    def dcp_save(self) -> dict[str, Any]:
        root = self.work / "dcp_save"
        counter = iter(range(10**6))

        def once() -> float:
            path = root / f"rep{next(counter)}"
            seconds = self.ranks.timed(
                lambda: dcp.save({"state": self.state}, checkpoint_id=str(path), process_group=self.ranks.checkpoint_group)
            )
            self._remove_later(path)
            return seconds

        result = self._with_rate(summarize(self.repeat(once)), self.rank_bytes * self.ranks.world_size)
        self._remove_later(root)
        return result

    def manager_mode(self, mode: str) -> dict[str, Any]:
        """Saves through ``CheckpointManager`` as the trainer makes them; keeps the last one for the resume part."""
        # retention must not run during the measurement
        manager = self._manager(self.work / "ckpt" / mode, mode, keep_last=self.args.warmup + self.args.reps + 1)
        step = iter(range(1, 10**6))
        previous: list[Path] = []

        def once() -> dict[str, float]:
            while previous:  # only the newest checkpoint is kept, outside the timed span
                self._remove_later(previous.pop())
            return self._save_once(manager, next(step), previous)

        try:
            reps = self.repeat(once)
        finally:
            manager.close()
        result = {key: summarize([r[key] for r in reps]) for key in reps[0] if key != "size_bytes"}
        result["size_bytes"] = int(reps[-1]["size_bytes"])
        result["write_gbps"] = summarize([r["size_bytes"] / r["write_s"] / 1e9 for r in reps])
        result["checkpoint"] = str(previous[-1]) if previous else ""
        return result

    def _manager(self, root: Path, mode: str, keep_last: int, **options: Any) -> Any:
        from ftrain.checkpoint import CheckpointManager
        from ftrain.checkpoint.compat import RunSignature
        from ftrain.config import CheckpointConfig
        from ftrain.distributed import DistContext

        ctx = DistContext(self.ranks.rank, self.ranks.world_size, self.ranks.device, self.ranks.checkpoint_group)
        section = CheckpointConfig(mode=mode, keep_last=keep_last, keep_every=0, **options)
        return CheckpointManager(root, section, ctx, RunSignature(model=None))

    def _save_once(self, manager: Any, step: int, previous: list[Path]) -> dict[str, float]:
        self.ranks.barrier()
        started = time.perf_counter()
        manager.save(step, {"state": self.state})
        blocked = time.perf_counter() - started
        manager.wait_for_staging()
        self.ranks.sync_device()
        staged = time.perf_counter() - started
        stats = manager.wait()  # collective: every rank calls it here
        committed = time.perf_counter() - started
        if stats is None or not stats.ok:
            raise BenchError(f"checkpoint save failed in mode {manager.mode}: {getattr(stats, 'error', '') or 'see log'}")
        previous.append(manager.storage.local_path(f"step_{step:08d}"))
        blocked, staged, committed = self.ranks.max([blocked, staged, committed])
        return {
            "blocked_s": blocked,
            "staged_s": staged,
            "commit_s": committed,
            "write_s": stats.write_s or committed,  # sync: the whole save is the write
            "size_bytes": float(stats.size_bytes),
        }

    # resume
    def resume(self, checkpoint: Path, target: dict[str, torch.Tensor],
               verify_checksums: bool | None = None) -> dict[str, Any]:
        """``CheckpointManager.load`` into ``target`` from a cold page cache; ``verify_checksums=None`` keeps the
        manager's default."""
        options = {} if verify_checksums is None else {"verify": "checksums" if verify_checksums else "sizes"}
        manager = self._manager(checkpoint.parent, "sync", keep_last=10**6, resume=str(checkpoint), **options)
        files = [p for p in checkpoint.iterdir() if p.is_file()]

        def once() -> list[float]:
            for tensor in target.values():  # so that the check below sees this load's values
                tensor.zero_()
            drop_page_cache(files)
            self.ranks.barrier()
            started = time.perf_counter()
            loaded = manager.load({"state": target})
            self.ranks.sync_device()
            own = time.perf_counter() - started
            if loaded is None:
                raise BenchError(f"resume found no checkpoint in {checkpoint}")
            return self.ranks.max([own, loaded.load_s])

        try:
            reps = self.repeat(once)
        finally:
            manager.close()
        if not all(torch.equal(target[k], self.state[k]) for k in self.state):
            raise BenchError(f"resume from {checkpoint} loaded different values than were saved")
        result = self._with_rate(summarize([r[0] for r in reps]), self.rank_bytes * self.ranks.world_size)
        result["manager_load_s"] = summarize([r[1] for r in reps])
        return result

    # plumbing
    def _with_rate(self, summary: dict[str, Any], nbytes: int) -> dict[str, Any]:
        summary["bytes"] = nbytes
        summary["gbps"] = nbytes / summary["median"] / 1e9 if summary["median"] > 0 else 0.0
        return summary

    def _remove_later(self, path: Path) -> None:
        """Delete a finished checkpoint between repetitions (rank 0, outside every timed span)."""
        self.ranks.barrier()
        if self.ranks.is_main:
            remove(path)
        self.ranks.barrier()

    def run(self) -> dict[str, Any]:
        cuda = self.ranks.device.type == "cuda"
        self.memory.start()
        floors: dict[str, Any] = {}
        self.ranks.say("floor: copy into a preallocated buffer")
        floors["staging_copy"] = self.track("floor: staging copy", lambda: self.copy_floor(pinned=False))
        floors["d2h_pinned"] = None
        if cuda:
            self.ranks.say("floor: device-to-host copy into pinned memory")
            floors["d2h_pinned"] = self.track("floor: d2h pinned", lambda: self.copy_floor(pinned=True))
        self.ranks.say("floor: sequential write + fsync, cold read")
        floors["disk"] = self.track("floor: disk write+read", self.disk_floor)
        saves: dict[str, Any] = {}
        self.ranks.say("dcp.save")
        saves["dcp_save"] = self.track("dcp.save", self.dcp_save)
        for mode in MANAGER_MODES:
            self.ranks.say(f"CheckpointManager mode={mode}")
            saves[mode] = self.track(f"manager {mode}", lambda: self.manager_mode(mode))
        self.ranks.say("resume (CheckpointManager.load, cold page cache)")
        checkpoint = Path(saves["sync"]["checkpoint"])
        # the state to load into exists before a resume (the model): allocated outside the memory measurement
        target = {k: torch.zeros_like(t) for k, t in self.state.items()}
        resume = self.track("resume", lambda: self.resume(checkpoint, target))
        unverified = None
        if True:  # resume with and without checksum verification, side by side
            self.ranks.say("resume without checksum verification")
            unverified = self.track("resume, no checksums",
                                    lambda: self.resume(checkpoint, target, verify_checksums=False))
        self.memory.stop()
        return {"floors": floors, "saves": saves, "resume": resume, "resume_without_checksums": unverified,
                "memory": self.memory_results}


def run_worker(args: argparse.Namespace) -> int:
    """The micro part on one rank of a torchrun job (or alone, without torchrun)."""
    from ftrain.distributed import close_distributed, init_distributed

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s", force=True)
    logging.getLogger("torch.distributed.checkpoint").setLevel(logging.WARNING)
    env = init_distributed(args.device, timeout_s=1800.0)
    ranks = Ranks(env.rank, env.world_size, env.device, env.checkpoint_group)
    size_mb = args.size_mb or default_size_mb(env.device)
    per_rank = int(size_mb * 1e6 / env.world_size)
    state = make_state(per_rank, int(args.tensor_mb * 1e6), env.device, env.rank)
    work = Path(args.out) / "work"
    ranks.say(f"micro: {size_mb:.0f} MB over {env.world_size} rank(s) on {env.device}, "
              f"{len(state)} tensors per rank, {args.warmup} warm-up + {args.reps} reps")
    try:
        micro = Micro(args, ranks, state, work).run()
    finally:
        ranks.barrier()
        if ranks.is_main and not args.keep:
            remove(work)
    if ranks.is_main:
        config = micro_config(args, env.device, env.world_size, size_mb, state)
        result = {"config": config, **micro}
        out = Path(args.out)
        (out / "micro.json").write_text(json.dumps(result, indent=1))
        if os.environ.get("FTRAIN_BENCH_ORCHESTRATED") != "1":  # launched by hand: report this part alone
            write_report(out, result)
    close_distributed()
    return 0


def micro_config(args: argparse.Namespace, device: torch.device, world_size: int, size_mb: float,
                 state: dict[str, torch.Tensor]) -> dict[str, Any]:
    return {
        "device": str(device),
        "world_size": world_size,
        "size_mb": size_mb,
        "rank_bytes": state_bytes(state),
        "tensors_per_rank": len(state),
        "reps": args.reps,
        "warmup": args.warmup,
        "directory": str(Path(args.out).resolve() / "work"),
    }
