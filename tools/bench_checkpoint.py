"""Checkpoint benchmark: what a checkpoint costs, next to the floors of this machine (issue #7).

One documented command runs everything and writes ``bench.json`` and ``bench.md`` into ``--out``:

    python tools/bench_checkpoint.py --out runs/bench          # full: 1 GB state, 3 reps, 12 recipe runs (~8 min, 2 CPUs)
    python tools/bench_checkpoint.py --quick --out /tmp/bench  # CI form (~45 s): checks it works, not its timings

It has two parts (``--parts micro,trainer``):

* ``micro`` runs in one process group, ``torchrun --standalone --nproc_per_node=N`` of this same script (launched
  for you; you may also launch it yourself, then only this part is reported). Every rank holds an equal share of a
  state of ``--size-mb`` in total and measures, with ``--reps`` repetitions after ``--warmup`` unmeasured ones:
  the floors (copy into a preallocated buffer; on CUDA the device-to-host copy into pinned memory; sequential
  write + fsync and cold read of the same bytes in the same directory), plain ``dcp.save``, each mode of
  ``ftrain.checkpoint.CheckpointManager`` (time blocked in ``save()``, until staging is done, until the commit
  marker), resume (``CheckpointManager.load`` from a cold page cache), and peak host memory of each.
* ``trainer`` runs ``recipes/train.py`` under torchrun with ``checkpoint.mode=off`` and with each mode every
  ``--interval`` steps, alternating, same seed, and compares steps/s taken from TensorBoard's wall times: run
  against run, and within each run (steps after a checkpoint vs the others), which other processes on a shared
  machine disturb far less. Each report says how much CPU other processes used while it ran.

Times are the maximum over ranks of one repetition; tables show the median and [min-max] over repetitions.
Exit codes: 0 done (targets missed or not), 1 a run failed, 2 bad arguments.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import hashlib
import inspect
import json
import logging
import math
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from ftrain.chaos import descendants
from ftrain.checkpoint.layout import fsync_dir

REPO = Path(__file__).resolve().parent.parent
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
ASYNC_MODES = ("async", "async_process")
MANAGER_MODES = ("sync", "async", "async_process")

# Targets of issue #7: (key, limit, comparison). Ratios measured in the same run.
TARGETS = {
    "blocking_vs_dcp_save": (0.05, "<="),
    "blocking_vs_staging_floor": (1.5, "<="),
    "trainer_throughput_vs_off": (0.95, ">="),
    "write_vs_disk_floor": (0.80, ">="),
    "extra_memory_vs_rank_size": (1.2, "<="),
}


class BenchError(RuntimeError):
    """A benchmark step failed; the message is one line that says which and where to look."""


# ------------------------------------------------------------------------------------------------ arguments
class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except for flags and for options whose help already says what the default depends on."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default in (None, False) or action.default == []:
            return action.help or ""
        return super()._get_help_string(action)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="tools/bench_checkpoint.py",
        description="Measure what ftrain's checkpoints cost next to this machine's floors; writes bench.json "
        "and bench.md into --out. Run it with plain python: it launches torchrun itself.",
        epilog="full: python tools/bench_checkpoint.py --out runs/bench | "
        "CI: python tools/bench_checkpoint.py --quick --out /tmp/bench | "
        "micro part by hand: torchrun --standalone --nproc_per_node=2 tools/bench_checkpoint.py --parts micro",
        formatter_class=_HelpFormatter,
    )
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "bench", help="directory for results and scratch files")
    parser.add_argument("--parts", default="micro,trainer", help="comma-separated: micro, trainer")
    parser.add_argument("--quick", action="store_true",
                        help="small and fast (16 MB, 1 rep, 20-step trainer runs of off and async only): "
                        "checks that it works, for CI; its numbers mean little")
    parser.add_argument("--nproc", type=int, default=2, help="ranks (torchrun --nproc_per_node)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="where the state lives")
    parser.add_argument("--size-mb", type=float, default=None,
                        help="state size in MB (1e6 bytes) over all ranks [default: 1024 on CPU, 4096 on CUDA]")
    parser.add_argument("--tensor-mb", type=float, default=64.0, help="the state is split into tensors of this size")
    parser.add_argument("--reps", type=int, default=3, help="measured repetitions of each micro measurement")
    parser.add_argument("--warmup", type=int, default=1,
                        help="unmeasured repetitions first (the first async_process save also starts its writer)")
    parser.add_argument("--interval", type=int, default=10, help="trainer part: checkpoint.interval of the checkpointed runs")
    parser.add_argument("--trainer-steps", type=int, default=200, help="trainer part: train.max_steps of each run")
    parser.add_argument("--trainer-reps", type=int, default=3, help="trainer part: runs per mode (alternating)")
    parser.add_argument("--trainer-skip", type=int, default=10, help="trainer part: first steps left out of steps/s")
    parser.add_argument("--trainer-modes", default=None,
                        help="trainer part: checkpoint modes compared with checkpoint.mode=off "
                        f"[default: {','.join(MANAGER_MODES)}; with --quick: async]")
    parser.add_argument("--trainer-arg", action="append", default=[], metavar="KEY=VALUE",
                        help="extra recipe override for every trainer run (repeatable)")
    parser.add_argument("--quiet-wait", type=float, default=30.0,
                        help="before each torchrun launch, wait up to this many seconds for the machine to be "
                        "quiet (other processes under 10%% of the CPUs for a second)")
    parser.add_argument("--keep", action="store_true", help="keep checkpoints, scratch files and trainer run directories")
    args = parser.parse_args(argv)
    if args.quick:
        args.size_mb = args.size_mb or 16.0
        args.tensor_mb = min(args.tensor_mb, 4.0)
        args.reps, args.warmup, args.quiet_wait = 1, 1, 0.0
        args.trainer_steps, args.trainer_reps, args.trainer_skip = 20, 1, 5
    if args.trainer_modes is None:
        args.trainer_modes = "async" if args.quick else ",".join(MANAGER_MODES)
    args.parts = _split(args.parts)
    args.trainer_modes = _split(args.trainer_modes)
    problems = _check_args(args)
    if problems:
        parser.error(problems)
    return args


def _split(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def _check_args(args: argparse.Namespace) -> str:
    if not args.parts or set(args.parts) - {"micro", "trainer"}:
        return f"--parts must name micro and/or trainer, got {','.join(args.parts) or 'nothing'}"
    if set(args.trainer_modes) - set(MANAGER_MODES):
        return f"--trainer-modes takes {', '.join(MANAGER_MODES)}; got {','.join(args.trainer_modes)}"
    if args.nproc < 1 or args.reps < 1 or args.warmup < 0 or args.trainer_reps < 1:
        return "--nproc, --reps and --trainer-reps must be >= 1, --warmup >= 0"
    if args.size_mb is not None and args.size_mb <= 0 or args.tensor_mb <= 0:
        return "--size-mb and --tensor-mb must be > 0"
    if args.interval < 1 or args.trainer_skip < 0:
        return "--interval must be >= 1 and --trainer-skip >= 0"
    if first_window(args.trainer_skip, args.interval) + args.interval > args.trainer_steps:
        return "--trainer-steps must leave one --interval window after --trainer-skip"
    return ""


def default_size_mb(device: torch.device) -> float:
    return 4096.0 if device.type == "cuda" else 1024.0


# ----------------------------------------------------------------------------------------------- statistics
def summarize(samples: list[float]) -> dict[str, Any]:
    """Median and spread of one measurement's repetitions."""
    return {
        "median": statistics.median(samples),
        "min": min(samples),
        "max": max(samples),
        "n": len(samples),
        "samples": samples,
    }


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b not in (None, 0) else None


# ------------------------------------------------------------------------------------------- host memory
def _status_kb(pid: int | str, fields: tuple[str, ...]) -> int:
    """Sum of the given ``/proc/<pid>/status`` fields in kB; 0 if the process is gone."""
    total = 0
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                name, _, value = line.partition(":")
                if name in fields:
                    total += int(value.split()[0])
    except (OSError, ValueError):
        return 0
    return total


class MemorySampler:
    """Samples this rank's host memory every ``period_s`` in a thread and keeps the peak since ``reset()``.

    Memory = this process's RSS (anonymous, file and shared-memory pages it touched) + the private anonymous
    RSS of its descendants (DCP's writer process). A child's shared-memory and file pages are left out: they are
    the staging buffers and libraries this process already counts.
    """

    def __init__(self, period_s: float = 0.01, rescan_s: float = 0.5) -> None:
        self.period_s = period_s
        self.rescan_s = rescan_s
        self._pid = os.getpid()
        self._children: list[int] = []
        self._lock = threading.Lock()
        self._peak = (0, 0)  # (total, children) in bytes
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="bench-memory", daemon=True)

    def sample(self) -> tuple[int, int]:
        own = _status_kb(self._pid, ("VmRSS",))
        children = sum(_status_kb(pid, ("RssAnon",)) for pid in self._children)
        return (own + children) * 1024, children * 1024

    def start(self) -> None:
        self._children = descendants(self._pid)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def reset(self) -> tuple[int, int]:
        """Start a new peak from now; returns the current (baseline) sample."""
        gc.collect()
        self._children = descendants(self._pid)
        now = self.sample()
        with self._lock:
            self._peak = now
        return now

    def peak(self) -> tuple[int, int]:
        self._record(self.sample())
        with self._lock:
            return self._peak

    def _record(self, now: tuple[int, int]) -> None:
        with self._lock:
            if now[0] > self._peak[0]:
                self._peak = now

    def _loop(self) -> None:
        last_scan = time.monotonic()
        while not self._stop.wait(self.period_s):
            if time.monotonic() - last_scan > self.rescan_s:
                self._children = descendants(self._pid)
                last_scan = time.monotonic()
            self._record(self.sample())


# ------------------------------------------------------------------------------------------ micro: helpers
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


def remove(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


# ------------------------------------------------------------------------------------------ micro: parts
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

        return CheckpointManager(
            root,
            mode=mode,
            keep_last=keep_last,
            keep_every=0,
            rank=self.ranks.rank,
            world_size=self.ranks.world_size,
            device=self.ranks.device,
            process_group=self.ranks.checkpoint_group,
            marker_info={},
            **options,
        )

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
        previous.append(manager.root / f"step_{step:08d}")
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
        options = {} if verify_checksums is None else {"verify_checksums": verify_checksums}
        manager = self._manager(checkpoint.parent, "sync", keep_last=10**6, **options)
        files = [p for p in checkpoint.iterdir() if p.is_file()]

        def once() -> list[float]:
            for tensor in target.values():  # so that the check below sees this load's values
                tensor.zero_()
            drop_page_cache(files)
            self.ranks.barrier()
            started = time.perf_counter()
            loaded = manager.load({"state": target}, str(checkpoint))
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
        from ftrain.checkpoint import CheckpointManager

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
        if "verify_checksums" in inspect.signature(CheckpointManager).parameters:
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


# ------------------------------------------------------------------------------------------- orchestration
def launch_micro(args: argparse.Namespace, argv: list[str]) -> dict[str, Any]:
    """Run the micro part under torchrun; returns what rank 0 wrote."""
    out = Path(args.out)
    result_path = out / "micro.json"
    result_path.unlink(missing_ok=True)
    log_path = out / "logs" / "micro.log"
    cmd = [*TORCHRUN, "--standalone", f"--nproc_per_node={args.nproc}", str(Path(__file__).resolve()), *argv]
    env = {**os.environ, "FTRAIN_BENCH_ORCHESTRATED": "1"}
    waited = wait_for_quiet(args.quiet_wait)
    load = OtherLoad()
    code = run_logged(cmd, log_path, env, echo=lambda line: line.startswith("[bench]"))
    if code != 0 or not result_path.is_file():
        raise BenchError(f"micro part failed (exit {code}); last lines: {tail(log_path)} (full log: {log_path})")
    result = json.loads(result_path.read_text())
    result["config"].update({**load.shares(), "quiet_wait_s": waited})
    return result


def run_logged(cmd: list[str], log_path: Path, env: dict[str, str], echo: Callable[[str], bool]) -> int:
    """Run ``cmd`` with its output going to ``log_path``; lines for which ``echo`` is true are also printed."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:
        log.write(" ".join(cmd) + "\n")
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO, env=env)
        assert proc.stdout is not None
        for line in proc.stdout:
            log.write(line)
            if echo(line):
                print(line.rstrip(), flush=True)
        return proc.wait()


def tail(path: Path, lines: int = 3) -> str:
    try:
        text = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    except OSError:
        return "(no log)"
    return " | ".join(text[-lines:])


def trainer_overrides(args: argparse.Namespace, run_dir: Path, mode: str) -> list[str]:
    return [
        f"run.dir={run_dir}",
        f"train.max_steps={args.trainer_steps}",
        f"checkpoint.mode={mode}",
        f"checkpoint.interval={args.interval}",
        "checkpoint.resume=never",
        f"log.interval={args.trainer_steps}",
        *(["train.device=cuda"] if args.device == "cuda" else ["train.device=cpu"] if args.device == "cpu" else []),
        *args.trainer_arg,
    ]


def run_trainer_part(args: argparse.Namespace) -> dict[str, Any]:
    """Recipe runs with checkpointing off and in each mode, alternating; steps/s from TensorBoard wall times."""
    modes = ["off", *args.trainer_modes]
    runs = []
    for rep in range(args.trainer_reps):
        order = modes[rep % len(modes):] + modes[: rep % len(modes)]  # rotate so drift does not favour one mode
        for mode in order:
            runs.append(run_recipe(args, mode, rep))
    return {"config": trainer_config(args), "runs": runs, "modes": summarize_trainer(runs, modes)}


def run_recipe(args: argparse.Namespace, mode: str, rep: int) -> dict[str, Any]:
    run_dir = Path(args.out) / "trainer" / f"{mode}-{rep}"
    remove(run_dir)
    cmd = [*TORCHRUN, "--standalone", f"--nproc_per_node={args.nproc}", str(REPO / "recipes" / "train.py"),
           *trainer_overrides(args, run_dir, mode)]
    log_path = Path(args.out) / "logs" / f"trainer-{mode}-{rep}.log"
    waited = wait_for_quiet(args.quiet_wait)
    started, load = time.perf_counter(), OtherLoad()
    code = run_logged(cmd, log_path, dict(os.environ), echo=lambda line: False)
    wall = time.perf_counter() - started
    if code != 0:
        raise BenchError(f"trainer run mode={mode} rep={rep} exited {code}: {tail(log_path)} (full log: {log_path})")
    result = {"mode": mode, "rep": rep, "wall_s": wall, "quiet_wait_s": waited, **load.shares(),
              **read_run(run_dir / "tb", args.trainer_skip, args.interval)}
    print(f"[bench] trainer mode={mode:<13} rep={rep}  {result['window_steps_per_s']:.2f} steps/s "
          f"(whole run {result['steps_per_s']:.2f}; other load {result['other_cpu_share']:.0%}; run {wall:.0f} s)",
          flush=True)
    if not args.keep:
        remove(run_dir)
    return result


def first_window(skip: int, interval: int) -> int:
    """The first checkpoint step at or after ``skip``: windows of ``interval`` steps start at checkpoint steps."""
    return max(math.ceil(skip / interval), 1) * interval


def read_run(tb_dir: Path, skip: int, interval: int) -> dict[str, Any]:
    """Steps/s of one recipe run from the wall time TensorBoard stored with each step's loss.

    * whole run: steps after ``skip`` / their wall time;
    * windows: ``interval`` / the median duration of the ``interval``-step windows that each start at a
      checkpoint step. Every window holds one checkpoint's whole cost (the save call after its first step's
      logging, the staging wait, the next save's wait for it); the median ignores windows that other
      processes slowed, which a shared machine has plenty of;
    * in-run ratio: ``interval`` x the median duration of the steps that do not follow a checkpoint step,
      divided by the median window: throughput with checkpoints / throughput without, both taken from the
      same run, hence under the same outside load.
    """
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    if "train/loss" not in tags:
        raise BenchError(f"no train/loss scalars in {tb_dir}")
    walls = {e.step: e.wall_time for e in acc.Scalars("train/loss")}
    last = max(walls)
    first = min((s for s in walls if s >= skip), default=last)
    starts = range(first_window(skip, interval), last - interval + 1, interval)
    windows = [walls[s + interval] - walls[s] for s in starts if s in walls and s + interval in walls]
    plain = [walls[s] - walls[s - 1] for s in walls if s > first and s - 1 in walls and (s - 1) % interval]
    if last <= first or not windows or min(windows) <= 0 or not plain:
        raise BenchError(f"{tb_dir}: too few steps after skipping {skip} to measure steps/s")

    def values(tag: str, before: int | None = None) -> list[float]:
        if tag not in tags:
            return []
        return [e.value for e in acc.Scalars(tag) if before is None or e.step < before]

    return {
        "steps_per_s": (last - first) / (walls[last] - walls[first]),
        "window_steps_per_s": interval / statistics.median(windows),
        "windows": len(windows),
        "plain_step_s": statistics.median(plain),
        "in_run_ratio": interval * statistics.median(plain) / statistics.median(windows),
        "steps": [first, last],
        # the final save's blocking time is the whole save (the run waits for its commit to exit): left out
        "checkpoint_blocking_s": values("checkpoint/blocking_s", before=last),
        "checkpoint_save_s": values("checkpoint/save_s"),
        "checkpoint_size_bytes": max(values("checkpoint/size_bytes") or [0.0]),
    }


def summarize_trainer(runs: list[dict[str, Any]], modes: list[str]) -> dict[str, Any]:
    """Per mode: steps/s, and its ratio to the checkpointing-off run of the same repetition."""
    off = {r["rep"]: r for r in runs if r["mode"] == "off"}
    summary = {}
    for mode in modes:
        mine = [r for r in runs if r["mode"] == mode]
        entry: dict[str, Any] = {
            "window_steps_per_s": summarize([r["window_steps_per_s"] for r in mine]),
            "steps_per_s": summarize([r["steps_per_s"] for r in mine]),
            "other_cpu_share": summarize([r["other_cpu_share"] for r in mine]),
            "in_run_ratio": summarize([r["in_run_ratio"] for r in mine]),
        }
        if mode != "off":
            # in-run ratios, each corrected by the off run's (what the estimate reads when nothing is saved)
            entry["ratio_to_off_in_run"] = summarize([r["in_run_ratio"] / off[r["rep"]]["in_run_ratio"] for r in mine])
            entry["ratio_to_off"] = summarize([r["window_steps_per_s"] / off[r["rep"]]["window_steps_per_s"] for r in mine])
            entry["ratio_to_off_whole_run"] = summarize([r["steps_per_s"] / off[r["rep"]]["steps_per_s"] for r in mine])
            blocking = [v for r in mine for v in r["checkpoint_blocking_s"]]
            saves = [v for r in mine for v in r["checkpoint_save_s"]]
            entry["checkpoint_blocking_s"] = summarize(blocking) if blocking else None
            entry["checkpoint_save_s"] = summarize(saves) if saves else None
            entry["checkpoint_size_bytes"] = max(r["checkpoint_size_bytes"] for r in mine)
        summary[mode] = entry
    return summary


def trainer_config(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "nproc": args.nproc,
        "max_steps": args.trainer_steps,
        "interval": args.interval,
        "reps": args.trainer_reps,
        "skip": args.trainer_skip,
        "overrides": trainer_overrides(args, Path("<run.dir>"), "<mode>"),
    }


# ----------------------------------------------------------------------------------------------- targets
def evaluate_targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target of issue #7 for each async mode: measured ratio, limit, met or by how much it is missed."""
    rows = []
    saves, floors = result.get("saves", {}), result.get("floors", {})
    memory, trainer = result.get("memory", {}), result.get("trainer", {}).get("modes", {})
    floor_copy = (floors.get("d2h_pinned") or floors.get("staging_copy") or {}).get("median")
    disk_gbps = floors.get("disk", {}).get("write", {}).get("gbps")
    dcp_save = saves.get("dcp_save", {}).get("median")
    for mode in ASYNC_MODES:
        save = saves.get(mode)
        if save:
            blocked = save["blocked_s"]["median"]
            rows.append(target_row("blocking_vs_dcp_save", mode, ratio(blocked, dcp_save),
                                   "blocked in save() / dcp.save total"))
            rows.append(target_row("blocking_vs_staging_floor", mode, ratio(blocked, floor_copy),
                                   "blocked in save() / staging-copy floor"))
            rows.append(target_row("write_vs_disk_floor", mode, ratio(save["write_gbps"]["median"], disk_gbps),
                                   "background write GB/s / sequential write+fsync GB/s"))
            mem = memory.get(f"manager {mode}")
            if mem:
                note = ""
                if mem["children_extra_bytes"] > 0:
                    note = f"writer process: {mem['children_extra_bytes'] / 1e6:.0f} MB of it"
                rows.append(target_row("extra_memory_vs_rank_size", mode, mem["ratio_to_rank_size"],
                                       "extra peak host memory / checkpoint bytes per rank", note))
        if mode in trainer:
            entry = trainer[mode]
            rows.append(target_row("trainer_throughput_vs_off", mode, entry["ratio_to_off_in_run"]["median"],
                                   "recipe steps/s, checkpoint every K steps / off (in-run estimate)",
                                   f"run against run: {entry['ratio_to_off']['median']:.3f}"))
    return rows


def target_row(key: str, mode: str, measured: float | None, what: str, note: str = "") -> dict[str, Any]:
    limit, op = TARGETS[key]
    if measured is None:
        return {"target": key, "mode": mode, "what": what, "limit": f"{op} {limit:g}", "measured": None,
                "met": None, "miss": "not measured", "note": note}
    met = measured <= limit if op == "<=" else measured >= limit
    if met:
        miss = ""
    elif op == "<=":
        miss = f"{measured / limit:.1f}x the limit"
    else:
        miss = f"{(limit - measured) / limit:.0%} short"
    return {"target": key, "mode": mode, "what": what, "limit": f"{op} {limit:g}", "measured": measured,
            "met": met, "miss": miss, "note": note}


# ------------------------------------------------------------------------------------------------- report
def fmt_s(summary: dict[str, Any] | None) -> str:
    """``median [min-max]`` of a time, in ms below one second."""
    if not summary:
        return "-"
    scale, unit = (1e3, "ms") if summary["median"] < 1 else (1.0, "s")
    med, low, high = (summary[k] * scale for k in ("median", "min", "max"))
    digits = 1 if unit == "ms" and summary["median"] * scale < 100 else 0 if unit == "ms" else 2
    if summary["n"] == 1:
        return f"{med:.{digits}f} {unit}"
    return f"{med:.{digits}f} {unit} [{low:.{digits}f}-{high:.{digits}f}]"


def fmt_x(value: float | None, digits: int = 2) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def report_markdown(result: dict[str, Any]) -> str:
    lines = [f"# Checkpoint benchmark ({result.get('created', '')})", "", f"Command: `{result.get('command', '')}`", ""]
    lines += machine_lines(result)
    if "targets" in result and result["targets"]:
        lines += targets_table(result["targets"])
    if "floors" in result:
        lines += micro_tables(result)
    if "trainer" in result:
        lines += trainer_table(result["trainer"])
    return "\n".join(lines) + "\n"


def machine_lines(result: dict[str, Any]) -> list[str]:
    env, cfg = result.get("environment", {}), result.get("config", {})
    lines = [f"Machine: {env.get('cpus', '?')} CPU cores, {env.get('memory_gb', '?')} GB RAM, torch {env.get('torch', '?')}, "
             f"{env.get('platform', '?')}; ftrain sources {env.get('ftrain_source', '?')}."]
    if env.get("other_cpu_share", 0.0) > 0.05 or env.get("steal_share", 0.0) > 0.05:
        lines.append(f"**Warning**: other processes used {env['other_cpu_share']:.0%} and the hypervisor stole "
                     f"{env['steal_share']:.0%} of the CPUs during this run; its numbers may be disturbed.")
    if cfg:
        lines.append(f"State: {cfg['size_mb']:.0f} MB over {cfg['world_size']} ranks on {cfg['device']} "
                     f"({cfg['rank_bytes'] / 1e6:.0f} MB per rank in {cfg['tensors_per_rank']} tensors); "
                     f"{cfg['warmup']} warm-up + {cfg['reps']} measured reps; times are the slowest rank's, "
                     f"shown as median [min-max]."
                     + (f" Other processes used {cfg['other_cpu_share']:.0%} of the CPUs meanwhile."
                        if "other_cpu_share" in cfg else ""))
    return [*lines, ""]


def targets_table(rows: list[dict[str, Any]]) -> list[str]:
    lines = ["## Targets", "", "| target | mode | measured | limit | status |", "|---|---|---|---|---|"]
    for row in rows:
        status = "not measured" if row["met"] is None else "met" if row["met"] else f"**missed**: {row['miss']}"
        if row["note"]:
            status += f" ({row['note']})"
        lines.append(f"| {row['what']} | {row['mode']} | {fmt_x(row['measured'], 3)} | {row['limit']} | {status} |")
    return [*lines, ""]


def micro_tables(result: dict[str, Any]) -> list[str]:
    floors, saves, resume, memory = result["floors"], result["saves"], result["resume"], result["memory"]
    rank_bytes = result["config"]["rank_bytes"]
    lines = ["## Saves and floors", "",
             "| what | blocked (caller) | staging done | committed / total | GB/s | extra peak host memory |",
             "|---|---|---|---|---|---|"]

    def mem(name: str) -> str:
        m = memory.get(name)
        return f"{m['extra_peak_bytes'] / 1e6:.0f} MB ({m['ratio_to_rank_size']:.2f}x rank)" if m else "-"

    lines.append(f"| floor: copy into preallocated buffer | - | {fmt_s(floors['staging_copy'])} | - | "
                 f"{fmt_x(floors['staging_copy']['gbps'])} | {mem('floor: staging copy')} |")
    if floors.get("d2h_pinned"):
        lines.append(f"| floor: device-to-host into pinned | - | {fmt_s(floors['d2h_pinned'])} | - | "
                     f"{fmt_x(floors['d2h_pinned']['gbps'])} | {mem('floor: d2h pinned')} |")
    disk = floors["disk"]
    lines.append(f"| floor: sequential write + fsync | - | - | {fmt_s(disk['write'])} | {fmt_x(disk['write']['gbps'])} | "
                 f"{mem('floor: disk write+read')} |")
    lines.append(f"| `dcp.save` | {fmt_s(saves['dcp_save'])} | - | {fmt_s(saves['dcp_save'])} | "
                 f"{fmt_x(saves['dcp_save']['gbps'])} | {mem('dcp.save')} |")
    for mode in MANAGER_MODES:
        s = saves[mode]
        lines.append(f"| CheckpointManager `{mode}` | {fmt_s(s['blocked_s'])} | {fmt_s(s['staged_s'])} | "
                     f"{fmt_s(s['commit_s'])} | {fmt_x(s['write_gbps']['median'])} (write) | {mem('manager ' + mode)} |")
    lines += ["", f"Checkpoint bytes per rank: {rank_bytes / 1e6:.0f} MB. GB/s counts all ranks' bytes; for the "
              "manager modes it is the background write (from staging done until every rank's files are durable).", ""]
    lines += ["## Resume", "", "| what | time | GB/s | vs read floor |", "|---|---|---|---|",
              f"| floor: sequential read, cold page cache | {fmt_s(disk['read'])} | {fmt_x(disk['read']['gbps'])} | 1 |",
              f"| `CheckpointManager.load`, cold page cache | {fmt_s(resume)} | {fmt_x(resume['gbps'])} | "
              f"{fmt_x(ratio(resume['median'], disk['read']['median']))}x |"]
    unverified = result.get("resume_without_checksums")
    if unverified:
        lines.append(f"| same, `verify_checksums=False` | {fmt_s(unverified)} | {fmt_x(unverified['gbps'])} | "
                     f"{fmt_x(ratio(unverified['median'], disk['read']['median']))}x |")
    lines.append("")
    return lines


def trainer_table(trainer: dict[str, Any]) -> list[str]:
    cfg = trainer["config"]
    k = cfg["interval"]
    lines = ["## Trainer", "",
             f"`recipes/train.py`, {cfg['nproc']} ranks, {cfg['max_steps']} steps, checkpoint every {k} steps, "
             f"{cfg['reps']} alternating run(s) per mode, steps/s from TensorBoard's wall times after step {cfg['skip']}.",
             "",
             f"- *steps/s*: {k} / the median duration of the {k}-step windows that each hold one checkpoint; *vs off*: "
             "divided by the `off` run of the same repetition (run against run: exposed to changes of outside load "
             "between runs).",
             f"- *in-run vs off*: within each run, {k} x the median step that does not follow a checkpoint / the "
             "median window (with / without checkpoints under the same outside load), divided by the same figure "
             "of the `off` run. This is the estimate the target uses.",
             "- *whole run*: all steps after the skipped ones / their wall time, and its ratio run against run.",
             "",
             "| mode | steps/s | vs off | in-run vs off | whole run: steps/s | vs off | blocked per checkpoint "
             "| save until commit | checkpoint size | other load |",
             "|---|---|---|---|---|---|---|---|---|---|"]

    def spread(summary: dict[str, Any] | None, digits: int) -> str:
        if not summary:
            return "-"
        text = f"{summary['median']:.{digits}f}"
        return text + (f" [{summary['min']:.{digits}f}-{summary['max']:.{digits}f}]" if summary["n"] > 1 else "")

    for mode, entry in trainer["modes"].items():
        size = entry.get("checkpoint_size_bytes")
        lines.append(
            f"| {mode} | {spread(entry['window_steps_per_s'], 2)} | {spread(entry.get('ratio_to_off'), 3)} | "
            f"{spread(entry.get('ratio_to_off_in_run'), 3)} | "
            f"{spread(entry['steps_per_s'], 2)} | {spread(entry.get('ratio_to_off_whole_run'), 3)} | "
            f"{fmt_s(entry.get('checkpoint_blocking_s'))} | {fmt_s(entry.get('checkpoint_save_s'))} | "
            f"{f'{size / 1e6:.1f} MB' if size else '-'} | {spread(entry['other_cpu_share'], 2)} |"
        )
    return [*lines, "", "Other load: the share of the CPUs that processes outside the benchmark used during each run "
            "(0.50 = one of two cores).", ""]


def source_fingerprint() -> str:
    """A short hash of ftrain's sources: which version of the library the numbers belong to."""
    digest = hashlib.sha256()
    for path in sorted((REPO / "ftrain").rglob("*.py")):
        digest.update(path.relative_to(REPO).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def environment() -> dict[str, Any]:
    try:
        memory_gb = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError):
        memory_gb = None
    return {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "memory_gb": memory_gb,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "ftrain_source": source_fingerprint(),
    }


class OtherLoad:
    """CPU time used by processes outside this benchmark while it ran (a busy machine disturbs every number),
    and the time the hypervisor stole from this machine's CPUs."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.busy, self.steal = _machine_cpu_s()
        self.own = _own_cpu_s()

    def shares(self) -> dict[str, float]:
        busy, steal = _machine_cpu_s()
        capacity = (time.monotonic() - self.started) * (os.cpu_count() or 1)
        other = busy - self.busy - (_own_cpu_s() - self.own)
        return {"other_cpu_share": max(other, 0.0) / capacity, "steal_share": (steal - self.steal) / capacity}


def _machine_cpu_s() -> tuple[float, float]:
    """(busy, stolen) CPU seconds of the whole machine since boot, from /proc/stat."""
    try:
        with open("/proc/stat") as handle:
            fields = [int(v) for v in handle.readline().split()[1:9]]
    except (OSError, ValueError):
        return 0.0, 0.0
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    tick = os.sysconf("SC_CLK_TCK")
    return (user + nice + system + irq + softirq) / tick, steal / tick


def wait_for_quiet(max_wait_s: float, threshold: float = 0.10) -> float:
    """Wait until the machine's CPUs are less than ``threshold`` busy for one second (this process is idle
    meanwhile, so that is other processes' load), or ``max_wait_s`` passed. Returns the seconds waited."""
    started = time.monotonic()
    while time.monotonic() - started < max_wait_s:
        before, _ = _machine_cpu_s()
        time.sleep(1.0)
        after, _ = _machine_cpu_s()
        if (after - before) / (os.cpu_count() or 1) < threshold:
            break
    return time.monotonic() - started


def _own_cpu_s() -> float:
    """CPU seconds of this process and of its finished (waited-for) descendants."""
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        usage = resource.getrusage(who)
        total += usage.ru_utime + usage.ru_stime
    return total


def write_report(out: Path, result: dict[str, Any]) -> None:
    result.setdefault("created", datetime.datetime.now().isoformat(timespec="seconds"))
    result.setdefault("command", " ".join([Path(sys.executable).name, *sys.argv]))
    result.setdefault("environment", environment())
    result["targets"] = evaluate_targets(result)
    (out / "bench.json").write_text(json.dumps(result, indent=1))
    (out / "bench.md").write_text(report_markdown(result))


# ----------------------------------------------------------------------------------------------------- main
def under_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or ("RANK" in os.environ and "WORLD_SIZE" in os.environ)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        if under_torchrun():
            return run_worker(args)
        started, load, source = time.perf_counter(), OtherLoad(), source_fingerprint()
        result: dict[str, Any] = {"command": " ".join(["python", "tools/bench_checkpoint.py", *argv])}
        if "micro" in args.parts:
            result.update(launch_micro(args, argv))
        if "trainer" in args.parts:
            result["trainer"] = run_trainer_part(args)
        result["elapsed_s"] = time.perf_counter() - started
        result["environment"] = {**environment(), **load.shares()}
        if result["environment"]["ftrain_source"] != source:
            result["environment"]["ftrain_source"] = f"changed during the run: {source} -> {source_fingerprint()}"
        write_report(out, result)
    except BenchError as exc:
        print(f"bench_checkpoint: error: {exc}", file=sys.stderr)
        return 1
    print((out / "bench.md").read_text())
    print(f"[bench] wrote {out / 'bench.json'} and {out / 'bench.md'} in {result['elapsed_s']:.0f} s")
    return 0


if __name__ == "__main__":  # required: DCP's writer process (async_process) re-imports this module
    sys.exit(main(sys.argv[1:]))
