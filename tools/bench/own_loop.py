"""The ``loop`` part: a training loop of its own through the public ``ftrain.Checkpointer``, and what checkpoints
cost it, with the local snapshot tier off and on (the defaults), next to the same loop without checkpoints.

Each configuration is a torchrun job of ``bench/loop_worker.py`` (2 ranks by default, an FSDP2 MLP whose parameters
and AdamW state are ``--loop-size-mb``, gloo on CPU, ``--loop-steps`` steps, a durable save every ``--loop-interval``):

* ``none``: no Checkpointer; ``tier-off``: ``local_interval=0``; ``defaults``: nothing set but the interval
  (the local tier on, ``local_interval=auto``);
* with ``--loop-before REV``, ``before tier-off`` and ``before defaults``: the same worker with ``PYTHONPATH``
  pointing at the sources of ``REV`` (``git archive`` of its ``ftrain/`` into ``--out``), interleaved with the
  others, so that before and after come from one run under the same outside load. The current configurations
  run on a copy of this checkout's ``ftrain/`` taken at the start (edits made meanwhile do not reach them).

``--loop-reps`` rounds, each running every configuration once, the order rotated from round to round. Loop time:
from the end of step ``--loop-skip`` until the last step's ``maybe_save(last=True)`` returned (the final commit
included), the slowest rank; its ratio to the ``none`` job of the same round; and the same ratio of the CPU time
the ranks' processes used in those steps (all their threads), which the outside load of a shared machine moves
far less than wall time. After each checkpointing job, a
second short job of the same configuration times one ``load()`` of the checkpoint it left (page cache warm).
Save cost: the checkpointer's own ``checkpoint/blocking_s`` of each save before the last, and the ``maybe_save``
call at those steps.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

from ftrain import tags
from ftrain.checkpoint.local import default_directory
from ftrain.checkpoint.run_dir import TENSORBOARD_DIR

from .common import REPO, BenchError, remove, summarize
from .launch import run_logged, tail, torchrun_cmd
from .system import OtherLoad, wait_for_quiet

WORKER = Path(__file__).with_name("loop_worker.py")
CURRENT = ("none", "tier-off", "defaults")  # worker --config values; "before X" runs X on the older sources
BEFORE = ("before tier-off", "before defaults")
# what the worker needs of the Checkpointer in every tree it runs on
NEEDED_KEYWORDS = ("interval", "keep_last", "local_interval")


def loop_labels(before: dict[str, Any] | None) -> list[str]:
    """The configurations in the order of the first round: each before-configuration next to its current one."""
    return ["none", "tier-off", *(["before tier-off"] if before else []), "defaults",
            *(["before defaults"] if before else [])]


def run_loop_part(args: argparse.Namespace) -> dict[str, Any]:
    out = Path(args.out)
    after = source_of_tree()
    try:
        after["path"] = str(copy_current(out / "trees" / "after"))
        before = prepare_before(args.loop_before, out / "trees" / "before") if args.loop_before else None
        labels = loop_labels(before)
        runs = []
        for rep in range(args.loop_reps):
            order = labels[rep % len(labels):] + labels[: rep % len(labels)]
            for label in order:
                runs.append(run_config(args, label, rep, Path(after["path"]), before))
    finally:
        if not args.keep:
            remove(out / "trees")
    summary = summarize_loop(runs, labels, args.loop_skip)
    return {"config": loop_config(args, after, before), "runs": runs, "configs": summary,
            "comparisons": compare(summary, bool(before))}


def loop_config(args: argparse.Namespace, after: dict[str, Any], before: dict[str, Any] | None) -> dict[str, Any]:
    return {"nproc": args.nproc, "steps": args.loop_steps, "interval": args.loop_interval, "skip": args.loop_skip,
            "reps": args.loop_reps, "size_mb": args.loop_size_mb, "layers": args.loop_layers,
            "batch": args.loop_batch, "after": after, "before": before}


# ---------------------------------------------------------------------------------------------- the trees
def git(*argv: str) -> str:
    proc = subprocess.run(["git", *argv], capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        raise BenchError(f"git {' '.join(argv)} failed: {proc.stderr.strip()}")
    return proc.stdout.strip()


def source_of_tree() -> dict[str, Any]:
    """This checkout's commit, and the files under ``ftrain/`` that differ from it (measured as they are)."""
    changed = sorted({*git("diff", "--name-only", "HEAD", "--", "ftrain").split(),
                      *git("ls-files", "--others", "--exclude-standard", "--", "ftrain").split()})
    return {"commit": git("rev-parse", "--short=12", "HEAD"), "changed": changed}


def copy_current(into: Path) -> Path:
    """This checkout's ``ftrain/`` as it is now, copied: what the current configurations run on, unchanged by edits
    made to the checkout while the part runs."""
    remove(into)
    shutil.copytree(REPO / "ftrain", into / "ftrain", ignore=shutil.ignore_patterns("__pycache__"))
    return into


def prepare_before(rev: str, into: Path) -> dict[str, Any]:
    """``ftrain/`` of ``rev`` extracted under ``into``; checks that its Checkpointer takes what the worker passes."""
    commit = git("rev-parse", "--verify", f"{rev}^{{commit}}")
    path = into / commit[:12]
    remove(path)
    path.mkdir(parents=True)
    archive = subprocess.run(["git", "archive", "--format=tar", commit, "ftrain"], capture_output=True, cwd=REPO)
    if archive.returncode != 0:
        raise BenchError(f"git archive {commit} ftrain failed: {archive.stderr.decode(errors='replace').strip()}")
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(path, filter="data")
    probe = ("import inspect, json, os, ftrain; p = inspect.signature(ftrain.Checkpointer).parameters; "
             "print(json.dumps([os.path.dirname(os.path.dirname(ftrain.__file__)), sorted(p), "
             "any(v.kind is v.VAR_KEYWORD for v in p.values())]))")
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=tree_env(path),
                          cwd=path)
    if proc.returncode != 0:
        raise BenchError(f"ftrain of {rev} does not import: {proc.stderr.strip().splitlines()[-1:]}")
    found, keywords, var_keyword = json.loads(proc.stdout.strip().splitlines()[-1])
    if Path(found).resolve() != path.resolve():
        raise BenchError(f"PYTHONPATH={path} imported ftrain from {found}, not from the tree of {rev}")
    missing = [k for k in NEEDED_KEYWORDS if k not in keywords and not var_keyword]
    if missing:
        raise BenchError(f"ftrain.Checkpointer of {rev} takes no {', '.join(missing)}: the loop worker needs them")
    return {"rev": rev, "commit": commit[:12], "subject": git("log", "-1", "--format=%s", commit)[:100],
            "path": str(path)}


def tree_env(path: Path) -> dict[str, str]:
    """The environment that makes ``import ftrain`` find the sources under ``path`` first."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(path), *filter(None, [env.get("PYTHONPATH", "")])])
    return env


# ------------------------------------------------------------------------------------------------- the jobs
def run_config(
    args: argparse.Namespace, label: str, rep: int, current: Path, before: dict[str, Any] | None
) -> dict[str, Any]:
    """The loop job of one configuration, then (checkpointing ones) the resume job; the run directory goes after."""
    config = label.removeprefix("before ")
    tree = Path(before["path"]) if label.startswith("before ") and before else current
    name = f"{label.replace(' ', '-')}-{rep}"
    run_dir = Path(args.out) / "loop" / name
    remove(run_dir)
    run_dir.mkdir(parents=True)
    result: dict[str, Any] = {"label": label, "rep": rep}
    try:
        loop = launch(args, tree, config, "loop", run_dir, name)
        result.update(loop_metrics(loop, args.loop_skip, args.loop_interval))
        result["tree"] = loop["ftrain"]
        if config != "none":
            result.update(read_scalars(run_dir / TENSORBOARD_DIR, args.loop_steps))
            result["resume_s"] = launch(args, tree, config, "resume", run_dir, name)["load_s"]
    finally:
        remove(default_directory(run_dir))  # local snapshots a failed job left behind
        if not args.keep:
            remove(run_dir)
    print(f"[bench] loop {label:<16} rep={rep}  loop {result['loop_s']:.2f} s"
          + (f", resume {result['resume_s']:.2f} s" if "resume_s" in result else "")
          + f" (other load {result['other_cpu_share']:.0%})", flush=True)
    return result


def launch(args: argparse.Namespace, tree: Path, config: str, phase: str, run_dir: Path, name: str) -> dict[str, Any]:
    out_json = run_dir.parent / f"{name}-{phase}.json"
    out_json.unlink(missing_ok=True)
    worker_args = ["--run-dir", str(run_dir), "--out", str(out_json), "--config", config, "--phase", phase,
                   "--steps", str(args.loop_steps), "--skip", str(args.loop_skip),
                   "--interval", str(args.loop_interval),
                   "--size-mb", str(args.loop_size_mb), "--layers", str(args.loop_layers),
                   "--batch", str(args.loop_batch)]
    log_path = Path(args.out) / "logs" / f"loop-{name}-{phase}.log"
    waited = wait_for_quiet(args.quiet_wait)
    load = OtherLoad()
    code = run_logged(torchrun_cmd(args.nproc, WORKER, worker_args), log_path, tree_env(tree), echo=lambda line: False)
    if code != 0 or not out_json.is_file():
        raise BenchError(f"loop job {name} ({phase}) exited {code}: {tail(log_path)} (full log: {log_path})")
    result = json.loads(out_json.read_text())
    out_json.unlink()
    if Path(result.get("ftrain", tree)).resolve() != tree.resolve():
        raise BenchError(f"loop job {name} imported ftrain from {result['ftrain']}, not from {tree}")
    if phase == "loop":
        result.update(load.shares(), quiet_wait_s=waited)
    return result


def loop_metrics(loop: dict[str, Any], skip: int, interval: int) -> dict[str, Any]:
    """Loop time and what the maybe_save calls cost, from the worker's per-step times (slowest rank)."""
    steps, calls = loop["step_s"], loop["maybe_save_s"]
    last = len(steps)
    saves = [s for s in range(1, last) if s % interval == 0]  # the saves before the last step
    metrics: dict[str, Any] = {
        "loop_s": sum(steps[skip:]),
        "loop_without_last_s": sum(steps[skip:-1]),
        "loop_cpu_s": loop["cpu_s"],
        "median_step_s": statistics.median(steps[skip:-1]),
        "step_s": steps,
        "width": loop["width"], "params": loop["params"],
        "other_cpu_share": loop["other_cpu_share"], "quiet_wait_s": loop["quiet_wait_s"],
    }
    if calls:
        # the local snapshot interval in force at each step (None: the tree does not say); a durable save always
        # takes a snapshot too when the tier is on (the save writes from its copy)
        intervals = loop["local_interval"]
        known, tier_on = None not in intervals, any(intervals)
        snapshot_steps = [s for s in range(1, last + 1) if s % interval == 0 or s == last
                          or intervals[s - 1] and s % intervals[s - 1] == 0] if known and tier_on else []
        plain = [s for s in range(skip + 1, last) if s not in saves]
        metrics.update(
            save_call_s=[calls[s - 1] for s in saves],
            final_save_s=calls[last - 1],
            close_s=loop["close_s"],
            snapshot_steps=snapshot_steps if known else None,
            local_intervals=intervals,
            call_snapshot_s=[calls[s - 1] for s in plain if s in snapshot_steps],
            call_plain_s=[calls[s - 1] for s in plain if s not in snapshot_steps] if known else [],
            snapshots_plain=len([s for s in plain if s in snapshot_steps]) if known else None,
            saves_measured=len([s for s in saves if s > skip]) + 1,  # the last step's save too
        )
    return metrics


def read_scalars(tb_dir: Path, last: int) -> dict[str, Any]:
    """The checkpointer's own records: each save's blocked time, and local_interval=auto's choices."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0})
    acc.Reload()
    found = set(acc.Tags()["scalars"])

    def scalars(tag: str) -> list[tuple[int, float]]:
        return [(e.step, e.value) for e in acc.Scalars(tag)] if tag in found else []

    return {
        # the last save's blocking time is the whole save (the loop waits for its commit): left out
        "blocking_s": [v for s, v in scalars(tags.CKPT_BLOCKING_S) if s < last],
        "save_until_commit_s": [v for _, v in scalars(tags.CKPT_SAVE_S)],
        "auto_intervals": scalars(tags.LOCAL_INTERVAL),
        "auto_snapshot_cost_s": scalars(tags.LOCAL_SNAPSHOT_S),
    }


# ------------------------------------------------------------------------------------------------- summary
def summarize_loop(runs: list[dict[str, Any]], labels: list[str], skip: int) -> dict[str, Any]:
    """Per configuration: loop time and its ratio to the ``none`` job of the same round, save cost, resume."""
    none = {r["rep"]: r for r in runs if r["label"] == "none"}
    summary: dict[str, Any] = {}
    for label in labels:
        mine = [r for r in runs if r["label"] == label]
        entry: dict[str, Any] = {
            "loop_s": summarize([r["loop_s"] for r in mine]),
            "loop_cpu_s": summarize([r["loop_cpu_s"] for r in mine]),
            "median_step_s": summarize([r["median_step_s"] for r in mine]),
            "other_cpu_share": summarize([r["other_cpu_share"] for r in mine]),
        }
        if label != "none":
            entry["ratio_to_none"] = summarize([r["loop_s"] / none[r["rep"]]["loop_s"] for r in mine])
            entry["ratio_to_none_without_last"] = summarize(
                [r["loop_without_last_s"] / none[r["rep"]]["loop_without_last_s"] for r in mine])
            entry["cpu_ratio_to_none"] = summarize([r["loop_cpu_s"] / none[r["rep"]]["loop_cpu_s"] for r in mine])
            for key in ("blocking_s", "save_call_s", "call_snapshot_s", "call_plain_s"):
                values = [v for r in mine for v in r[key]]
                entry[key] = summarize(values) if values else None
            for key in ("final_save_s", "resume_s"):
                entry[key] = summarize([r[key] for r in mine])
            known = [r["snapshot_steps"] for r in mine if r["snapshot_steps"] is not None]
            entry["snapshots_measured"] = summarize([float(sum(s > skip for s in k)) for k in known]) if known else None
            entry["snapshots_all"] = summarize([float(len(k)) for k in known]) if known else None
            plain = [float(r["snapshots_plain"]) for r in mine if r.get("snapshots_plain") is not None]
            entry["snapshots_plain"] = summarize(plain) if plain else None
            entry["saves_measured"] = summarize([float(r["saves_measured"]) for r in mine])
            entry["auto_intervals"] = mine[0]["auto_intervals"]
            entry["auto_snapshot_cost_s"] = [c for r in mine for c in r["auto_snapshot_cost_s"]]
        summary[label] = entry
    return summary


def compare(summary: dict[str, Any], with_before: bool) -> dict[str, Any]:
    """Defaults minus tier-off (the loop ratios, per round), for each tree; after / before of save and resume."""
    def paired_gap(on: str, off: str, key: str = "ratio_to_none") -> dict[str, Any] | None:
        a, b = summary.get(on, {}).get(key), summary.get(off, {}).get(key)
        if not a or not b:
            return None
        gaps = [x - y for x, y in zip(a["samples"], b["samples"])]
        return {**summarize(gaps), "of_medians": a["median"] - b["median"]}

    result: dict[str, Any] = {"defaults_minus_tier_off": paired_gap("defaults", "tier-off"),
                              "cpu defaults_minus_tier_off": paired_gap("defaults", "tier-off", "cpu_ratio_to_none")}
    if with_before:
        result["before_defaults_minus_tier_off"] = paired_gap("before defaults", "before tier-off")
        result["cpu before_defaults_minus_tier_off"] = paired_gap("before defaults", "before tier-off",
                                                                  "cpu_ratio_to_none")
        for config in ("tier-off", "defaults"):
            now, then = summary[config], summary[f"before {config}"]
            result[f"after_vs_before {config}"] = {
                key: _ratio_of_medians(now.get(key), then.get(key))
                for key in ("blocking_s", "save_call_s", "final_save_s", "resume_s", "ratio_to_none",
                            "cpu_ratio_to_none")
            }
    return result


def _ratio_of_medians(a: dict[str, Any] | None, b: dict[str, Any] | None) -> float | None:
    return a["median"] / b["median"] if a and b and b["median"] > 0 else None

