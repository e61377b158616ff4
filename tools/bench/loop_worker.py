"""One rank of the ``loop`` part of tools/bench_checkpoint.py (launched by ``bench/own_loop.py`` under torchrun).

A training loop of its own through the public ``ftrain.Checkpointer``: an MLP of ``--layers`` square ``Linear``
layers, each and the whole model ``fully_shard``'ed (FSDP2, gloo, CPU), AdamW, a fixed random batch per rank.

* ``--phase loop``: ``--steps`` steps; with ``--config tier-off`` or ``defaults`` the loop calls
  ``maybe_save(step, last=step == steps, loss=...)`` after every optimizer step (``interval=--interval``,
  ``keep_last=2``; ``local_interval=0`` for ``tier-off``, nothing else set for ``defaults``); ``--config none``
  has no Checkpointer at all. Each step's wall time (the step and its ``maybe_save``) and the ``maybe_save`` call
  alone are recorded, the maximum over ranks, and the CPU time each rank's process (all its threads) used after
  step ``--skip`` until the end of the last step, summed over ranks;
* ``--phase resume``: a Checkpointer with the same options on the run directory the loop left, and one
  ``load()`` timed (the maximum over ranks); the step it returns must be ``--steps``.

Rank 0 writes the result as JSON to ``--out``. This script is run with the ``ftrain`` found first on
``PYTHONPATH`` (the benchmark's ``--loop-before`` points it at an older tree), so it uses only what every
version it measures has: the ``Checkpointer`` keywords ``interval``, ``keep_last`` and ``local_interval``,
``load``, ``maybe_save`` and ``close``. What it reads beyond them (the local snapshot schedule's interval, for
the report) is looked up with ``getattr`` and left out where absent.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

CONFIGS = ("none", "tier-off", "defaults")


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--config", choices=CONFIGS, required=True)
    parser.add_argument("--phase", choices=("loop", "resume"), default="loop")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--skip", type=int, default=2, help="CPU time is counted from the end of this step")
    parser.add_argument("--interval", type=int, default=10)
    parser.add_argument("--size-mb", type=float, default=240.0, help="parameters + AdamW's two moments, all ranks")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=64, help="rows per rank and step")
    return parser.parse_args(argv)


def width_for(size_mb: float, layers: int) -> int:
    """The layer width whose parameters (weights and biases) and AdamW's two moments, float32, are ``size_mb``."""
    params = size_mb * 1e6 / (3 * 4)
    return max(int((-1 + math.sqrt(1 + 4 * params / layers)) / 2), 8)


def build(args: argparse.Namespace) -> tuple[nn.Module, torch.optim.Optimizer, int]:
    from torch.distributed.fsdp import fully_shard

    width = width_for(args.size_mb, args.layers)
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(args.layers):
        layers += [nn.Linear(width, width), nn.ReLU()]
    model = nn.Sequential(*layers[:-1])
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    return model, optimizer, width


def checkpointer(args: argparse.Namespace, model: nn.Module, optimizer: torch.optim.Optimizer):  # noqa: ANN201
    import ftrain

    options = {"interval": args.interval, "keep_last": 2}
    if args.config == "tier-off":
        options["local_interval"] = 0
    return ftrain.Checkpointer(args.run_dir, model=model, optimizer=optimizer, **options)


def max_over_ranks(values: list[float]) -> list[float]:
    tensor = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor.tolist()


def local_interval(ckpt) -> int | None:  # noqa: ANN001
    """The local snapshot interval in force (the schedule that decides whether this step is snapshotted)."""
    schedule = getattr(ckpt, "local_schedule", None)
    value = getattr(schedule, "interval", None)
    return int(value) if value is not None else None


def run_loop(args: argparse.Namespace) -> dict:
    import ftrain

    model, optimizer, width = build(args)
    rank = dist.get_rank()
    generator = torch.Generator().manual_seed(1 + rank)
    inputs = torch.randn(args.batch, width, generator=generator)
    targets = torch.randn(args.batch, width, generator=generator)
    ckpt = None if args.config == "none" else checkpointer(args, model, optimizer)
    started = time.perf_counter()
    first = ckpt.load() if ckpt is not None else 0
    load_s = time.perf_counter() - started
    if first != 0:
        raise SystemExit(f"the loop phase must start fresh, but load() returned step {first}")
    ends, calls, intervals = [], [], []
    cpu_from = time.process_time()
    begin = time.perf_counter()
    for step in range(1, args.steps + 1):
        loss = F.mse_loss(model(inputs), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        value = loss.item()
        called = time.perf_counter()
        if ckpt is not None:
            intervals.append(local_interval(ckpt))
            ckpt.maybe_save(step, last=step == args.steps, loss=value)
        now = time.perf_counter()
        calls.append(now - called)
        ends.append(now - begin)
        if step == args.skip:
            cpu_from = time.process_time()
    cpu_s = time.process_time() - cpu_from
    closed = time.perf_counter()
    if ckpt is not None:
        ckpt.close()
    close_s = time.perf_counter() - closed
    # step durations: end of step s - end of step s-1 (the first from the loop's start), the slowest rank's
    durations = [ends[0], *(b - a for a, b in zip(ends, ends[1:]))]
    merged = max_over_ranks([*durations, *calls, close_s, load_s])
    cpu = torch.tensor([cpu_s], dtype=torch.float64)
    dist.all_reduce(cpu)
    n = args.steps
    return {
        "config": args.config,
        "ftrain": os.path.dirname(os.path.dirname(ftrain.__file__)),
        "width": width,
        "params": sum(p.numel() for p in model.parameters()),
        "step_s": merged[:n],
        "maybe_save_s": merged[n:2 * n] if ckpt is not None else [],
        "close_s": merged[2 * n],
        "fresh_load_s": merged[2 * n + 1],
        "cpu_s": cpu.item(),
        "local_interval": intervals,
    }


def run_resume(args: argparse.Namespace) -> dict:
    model, optimizer, _width = build(args)
    ckpt = checkpointer(args, model, optimizer)
    dist.barrier()
    started = time.perf_counter()
    step = ckpt.load()
    load_s = time.perf_counter() - started
    ckpt.close()
    if step != args.steps:
        raise SystemExit(f"resume loaded step {step}, expected {args.steps}")
    return {"config": args.config, "step": step, "load_s": max_over_ranks([load_s])[0]}


def main(argv: list[str]) -> int:
    args = parse(argv)
    dist.init_process_group("gloo")
    result = run_loop(args) if args.phase == "loop" else run_resume(args)
    if dist.get_rank() == 0:
        with open(args.out, "w") as handle:
            json.dump(result, handle)
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    code = main(sys.argv[1:])
    sys.stdout.flush(), sys.stderr.flush()
    os._exit(code)  # no interpreter finalization, where gloo's threads can abort a finished process (custom_loop.py)
