"""The trainer part: ``recipes/train.py`` under torchrun with checkpointing off and in each mode, and steps/s
read from TensorBoard's wall times."""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time
from pathlib import Path
from typing import Any

from ftrain.checkpoint.run_dir import TENSORBOARD_DIR

from .common import REPO, BenchError, remove, summarize
from .launch import children_cpu_s, run_logged, tail, torchrun_cmd
from .system import OtherLoad, wait_for_quiet


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


def run_recipe(
    args: argparse.Namespace, mode: str, rep: int, extra: list[str] | tuple[str, ...] = (), label: str = ""
) -> dict[str, Any]:
    """One recipe run; ``extra`` overrides go last, ``label`` (default: the mode) names its directory and log."""
    label = label or mode
    run_dir = Path(args.out) / "trainer" / f"{label}-{rep}"
    remove(run_dir)
    cmd = torchrun_cmd(args.nproc, REPO / "recipes" / "train.py", [*trainer_overrides(args, run_dir, mode), *extra])
    log_path = Path(args.out) / "logs" / f"trainer-{label}-{rep}.log"
    waited = wait_for_quiet(args.quiet_wait)
    started, load, cpu_before = time.perf_counter(), OtherLoad(), children_cpu_s()
    code = run_logged(cmd, log_path, dict(os.environ), echo=lambda line: False)
    wall = time.perf_counter() - started
    if code != 0:
        raise BenchError(f"trainer run mode={mode} rep={rep} exited {code}: {tail(log_path)} (full log: {log_path})")
    result = {"mode": mode, "rep": rep, "wall_s": wall, "quiet_wait_s": waited, **load.shares(),
              "job_cpu_s": children_cpu_s() - cpu_before,
              **read_run(run_dir / TENSORBOARD_DIR, args.trainer_skip, args.interval)}
    print(f"[bench] trainer {label:<18} rep={rep}  {result['window_steps_per_s']:.2f} steps/s "
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
