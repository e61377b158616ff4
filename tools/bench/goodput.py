"""The goodput part: what failures cost a run of the default recipe with the local snapshot tier on (the default)
and off (durable checkpoints only), measured side by side in one benchmark run.

1. *restart floor*: ``torchrun`` starting the same number of workers that only import torch and
   ``torch.distributed.checkpoint`` and join a gloo group (a script written into the work directory); from the
   launch until every worker has joined, median of 3 launches;
2. *throughput*: uninterrupted recipe runs with the tier off, on, and on with warm restarts, alternating, same seed; steps/s from
   TensorBoard's wall times (``trainer_runs.read_run``). The runs of the first repetition are the references the
   runs under failures are compared with, and each other's (bit-identical weights and losses);
3. *failures*: ``ftrain.harness.chaos.run_chaos`` SIGKILLs the whole job (``job``), and separately one worker under
   ``torchrun --max-restarts`` (``rank``), each with the tier on and off and warm restarts off; then, with the
   defaults (tier and warm restarts on), the whole job and one rank's training process (``process``: its warm
   parent forks a new one), all at the same random moments (same seed); per configuration: steps redone and time lost per failure (from the kill to the first step after it),
   the cost per failure, ETTR, and whether the final weights and every loss match the reference;
4. *health check*: it cannot be switched off, so its per-step cost is a micro-benchmark in the last floor
   launch: ``HealthMonitor.judge`` + ``record`` and a 3-float vs a 2-float ``sum_over_ranks`` (the verdict is
   the third float of the per-step all-reduce);
5. ``checkpoint.interval=auto``: one run with the tier on; the intervals it chose (``checkpoint/interval``) and
   the checkpoint overhead measured in it (blocked time, and blocked time + slowdown of steps during the write).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

from ftrain import tags
from ftrain.harness.chaos import compare_runs, measure_goodput, run_chaos
from ftrain.checkpoint.local import default_directory
from ftrain.checkpoint.run_dir import CONFIG_NAME, TENSORBOARD_DIR
from ftrain.config import load_config

from .common import REPO, BenchError, ratio, remove, summarize
from .launch import TORCHRUN, children_cpu_s, run_logged, tail
from .system import OtherLoad, wait_for_quiet
from .trainer_runs import read_run

# The setups compared ("tiers" in the results): durable checkpoints only (off), the local tier on (on), both as
# before warm restarts; and the default (warm): the local tier on and warm restarts on.
WARM_RESTARTS_OFF = "train.warm_restarts=0"
LOCAL_TIER = {
    "off": ["checkpoint.local_interval=0", WARM_RESTARTS_OFF],
    "on": ["checkpoint.local_interval=auto", WARM_RESTARTS_OFF],
    "warm": ["checkpoint.local_interval=auto"],
}
# (kill kind, setup): a whole-job kill and one worker SIGKILLed (torchrun's restart) without warm restarts, then
# with them: a whole-job kill, and one rank's training process SIGKILLed (the warm parent forks a new one).
CONFIGS = (("job", "off"), ("job", "on"), ("rank", "off"), ("rank", "on"), ("job", "warm"), ("process", "warm"))
QUICK_CONFIGS = (("job", "warm"), ("process", "warm"))
MIN_DELAY_S = 0.5  # training time before a kill, at least
FLOOR_SCRIPT = "restart_floor.py"
JOINED, TRAINED, HEALTH = "GOODPUT_JOINED", "GOODPUT_TRAINED", "GOODPUT_HEALTH"

# What every restarted worker pays before it can train, and nothing else (joined), then what any trainer of the
# recipe's model pays before its first step, without ftrain (trained): the same FSDP2 model and AdamW, one
# step on random tokens with the recipe's clipping and loss all-reduce. torch's first-use costs are in the second:
# torch._dynamo is imported at the first DTensor (FSDP2) or optimizer.zero_grad, DTensor's sharding rules are
# computed at their first use. The health micro-benchmark runs last, when asked for (a number of iterations).
FLOOR_SOURCE = f'''"""Restart floor of tools/bench_checkpoint.py --parts goodput (written by tools/bench/goodput.py)."""
import json
import os
import sys
import time

import torch  # noqa: F401
import torch.distributed as dist
import torch.distributed.checkpoint  # noqa: F401

dist.init_process_group("gloo")
os.write(1, f"{JOINED} {{dist.get_rank()}} {{time.time()!r}}\\n".encode())  # one write: the ranks share the pipe

from ftrain.config import ModelConfig
from ftrain.model import build_model

setup = json.loads(sys.argv[1])
model = build_model(ModelConfig(**setup["model"]), torch.device("cpu"), 0)
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
tokens = torch.randint(0, setup["model"]["vocab_size"], (setup["batch_size"], setup["model"]["seq_len"] + 1))
loss = model(tokens[:, :-1], tokens[:, 1:])
loss.backward()
torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
optimizer.step()
optimizer.zero_grad()
dist.all_reduce(loss.detach())
os.write(1, f"{TRAINED} {{dist.get_rank()}} {{time.time()!r}}\\n".encode())
if setup["health_iters"]:
    sys.path.insert(0, setup["tools"])
    from bench.goodput import health_check_cost

    cost = health_check_cost(setup["health_iters"])
    if dist.get_rank() == 0:
        print("{HEALTH} " + json.dumps(cost), flush=True)
dist.destroy_process_group()
sys.stdout.flush()
os._exit(0)  # as ftrain.cli: after FSDP2 on gloo, interpreter finalization can abort (SIGABRT; see there)
'''


# ------------------------------------------------------------------------------------------------- the part
def run_goodput_part(args: argparse.Namespace) -> dict[str, Any]:
    """Floor, throughput, failures and auto interval, in that order; see the module docstring."""
    work = Path(args.out) / "goodput"
    remove(work)
    work.mkdir(parents=True)
    phases, started = {}, time.perf_counter()

    def phase(name: str) -> None:
        nonlocal started
        phases[name] = time.perf_counter() - started
        started = time.perf_counter()

    try:
        floor = measure_restart_floor(args, work)
        phase("restart_floor")
        throughput = run_throughput(args, work)
        phase("throughput")
        slower = min(t["steps_per_s"]["median"] for t in throughput["tiers"].values())
        max_delay = args.goodput_max_delay or kill_spread(args, slower)
        failures = {}
        for kind, tier in args.goodput_configs:
            reference = work / f"throughput-{tier}-0"
            failures[f"{kind}/{tier}"] = run_failures(args, work, kind, tier, reference, max_delay)
            phase(f"failures {kind}/{tier}")
        auto = run_auto_interval(args, work)
        phase("auto")
    finally:
        for run_dir in work.iterdir() if work.is_dir() else []:
            remove(default_directory(run_dir))  # local snapshots a failed run left behind
        if not args.keep:
            remove(work)
    step_s = throughput["tiers"]["off"]["plain_step_s"]["median"]
    return {
        "config": goodput_config(args, max_delay),
        "restart_floor_s": floor["joined_s"],
        "first_step_floor_s": floor["trained_s"],
        "health": health_summary(floor["health"], step_s, throughput["step_time_noise"]),
        "throughput": throughput,
        "failures": failures,
        "auto": auto,
        "phase_s": phases,
    }


def goodput_config(args: argparse.Namespace, max_delay: float) -> dict[str, Any]:
    return {
        "nproc": args.nproc,
        "max_steps": args.goodput_steps,
        "interval": args.goodput_interval,
        "kills": args.goodput_kills,
        "configs": [f"{kind}/{tier}" for kind, tier in args.goodput_configs],
        "reps": args.goodput_reps,
        "seed": args.goodput_seed,
        "skip": args.trainer_skip,
        "kill_delay_s": [MIN_DELAY_S, max_delay],
        "floor_launches": args.goodput_floor_reps,
        "health_iters": args.goodput_health_iters,
        "overrides": recipe_overrides(args, Path("<run.dir>"), args.goodput_interval),
        "overrides_by_tier": LOCAL_TIER,
    }


def kill_spread(args: argparse.Namespace, steps_per_s: float) -> float:
    """The longest training time before a kill: even if every delay is the longest, all kills land within 90% of
    the run's training time (at the slower tier's measured steps/s), so none comes after the run finished."""
    training_s = args.goodput_steps / steps_per_s
    return max(MIN_DELAY_S + 0.5, 0.9 * training_s / args.goodput_kills)


# ------------------------------------------------------------------------------------------- recipe runs
def recipe_overrides(args: argparse.Namespace, run_dir: Path, interval: int | str) -> list[str]:
    return [
        f"run.dir={run_dir}",
        f"train.max_steps={args.goodput_steps}",
        f"checkpoint.interval={interval}",
        f"log.interval={args.goodput_steps}",
        *args.goodput_model,
        *(["train.device=cuda"] if args.device == "cuda" else ["train.device=cpu"] if args.device == "cpu" else []),
        *args.trainer_arg,
    ]


def recipe_cmd(args: argparse.Namespace, run_dir: Path, tier: str, *, interval: int | str | None = None,
               max_restarts: int = 0) -> list[str]:
    interval = args.goodput_interval if interval is None else interval
    return [*TORCHRUN, "--standalone", f"--nproc_per_node={args.nproc}", f"--max-restarts={max_restarts}",
            str(REPO / "recipes" / "train.py"), *recipe_overrides(args, run_dir, interval), *LOCAL_TIER[tier]]


def run_recipe(args: argparse.Namespace, cmd: list[str], name: str) -> dict[str, Any]:
    """One uninterrupted run of ``cmd``; its wall time and the other processes' CPU share meanwhile."""
    log_path = Path(args.out) / "logs" / f"goodput-{name}.log"
    waited = wait_for_quiet(args.quiet_wait)
    started, load, cpu_before = time.perf_counter(), OtherLoad(), children_cpu_s()
    code = run_logged(cmd, log_path, dict(os.environ), echo=lambda line: False)
    if code != 0:
        raise BenchError(f"goodput run {name} exited {code}: {tail(log_path)} (full log: {log_path})")
    return {"wall_s": time.perf_counter() - started, "quiet_wait_s": waited, **load.shares(),
            "job_cpu_s": children_cpu_s() - cpu_before}


# ----------------------------------------------------------------------------------------- restart floor
def measure_restart_floor(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Median time from launching torchrun until every worker has joined (the restart floor) and until every
    worker has taken the recipe's first step without ftrain (the first-step floor); the last launch then also
    measures the health check's per-step cost."""
    script = work / FLOOR_SCRIPT
    script.write_text(FLOOR_SOURCE)
    cfg = load_config([*args.goodput_model, *args.trainer_arg])
    joined, trained, health = [], [], None
    for launch in range(args.goodput_floor_reps):
        last = launch == args.goodput_floor_reps - 1
        setup = {"model": vars(cfg.model), "batch_size": cfg.train.batch_size, "tools": str(REPO / "tools"),
                 "health_iters": args.goodput_health_iters if last else 0}
        times, output = launch_floor(args, script, json.dumps(setup), launch)
        joined.append(times[JOINED])
        trained.append(times[TRAINED])
        if last:
            health = parse_health(output)
    print(f"[bench] goodput restart floor {statistics.median(joined):.2f} s, first-step floor "
          f"{statistics.median(trained):.2f} s ({len(joined)} launches)", flush=True)
    return {"joined_s": summarize(joined), "trained_s": summarize(trained), "health": health}


def launch_floor(args: argparse.Namespace, script: Path, setup: str, launch: int) -> tuple[dict[str, float], str]:
    """One launch of the floor script: seconds from the launch until the last worker said JOINED, and TRAINED."""
    cmd = [*TORCHRUN, "--standalone", f"--nproc_per_node={args.nproc}", str(script), setup]
    log_path = Path(args.out) / "logs" / f"goodput-floor-{launch}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    wait_for_quiet(args.quiet_wait)
    launched = time.time()
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO, env=env)
    log_path.write_text(" ".join(cmd) + "\n" + done.stdout + done.stderr)
    if done.returncode != 0:
        raise BenchError(f"restart floor launch exited {done.returncode}: {tail(log_path)} (full log: {log_path})")
    times = {}
    for word in (JOINED, TRAINED):
        said = [float(line.split()[2]) for line in done.stdout.splitlines() if line.startswith(word)]
        if len(said) != args.nproc:
            raise BenchError(f"restart floor: {len(said)} of {args.nproc} workers said {word} (log: {log_path})")
        times[word] = max(said) - launched
    return times, done.stdout


def parse_health(output: str) -> dict[str, float]:
    lines = [line for line in output.splitlines() if line.startswith(HEALTH)]
    if not lines:
        raise BenchError("restart floor: the health check micro-benchmark printed no result")
    return json.loads(lines[-1].split(maxsplit=1)[1])


def health_check_cost(iters: int, warmup: int = 50) -> dict[str, float]:
    """On every rank of a joined gloo group: the median time of ``sum_over_ranks`` of 2 and of 3 floats
    (alternating which goes first) and of ``HealthMonitor.judge`` + ``record`` with the default policy; each the
    slowest rank's. Collective."""
    import torch
    import torch.distributed as dist

    from ftrain.distributed import sum_over_ranks
    from ftrain.health import HealthMonitor, HealthPolicy

    device, monitor = torch.device("cpu"), HealthMonitor(HealthPolicy())
    times: dict[str, list[float]] = {"allreduce_2_s": [], "allreduce_3_s": [], "judge_s": []}
    for i in range(warmup + iters):
        for n in (2, 3) if i % 2 else (3, 2):
            started = time.perf_counter()
            sum_over_ranks([1.0] * n, device)
            if i >= warmup:
                times[f"allreduce_{n}_s"].append(time.perf_counter() - started)
        started = time.perf_counter()
        monitor.judge(2.5, 0.75)
        monitor.record(2.5)
        if i >= warmup:
            times["judge_s"].append(time.perf_counter() - started)
    medians = {key: statistics.median(values) for key, values in times.items()}
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, medians)
    return {key: max(g[key] for g in gathered) for key in medians}


def health_summary(health: dict[str, float], step_s: float, noise: float | None) -> dict[str, Any]:
    """What the check adds per step, next to the median step time and the run-to-run noise of that time."""
    per_step = health["allreduce_3_s"] - health["allreduce_2_s"] + health["judge_s"]
    return {**health, "per_step_s": per_step, "median_step_s": step_s,
            "share_of_step": per_step / step_s, "step_time_noise": noise}


# -------------------------------------------------------------------------------------------- throughput
def run_throughput(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Uninterrupted runs, tier off and on, alternating (order swapped each repetition), same seed."""
    runs = []
    for rep in range(args.goodput_reps):
        order = list(LOCAL_TIER)
        for tier in order if rep % 2 == 0 else order[::-1]:
            runs.append(run_uninterrupted(args, work, tier, rep))
    tiers = {}
    for tier in LOCAL_TIER:
        mine = [r for r in runs if r["tier"] == tier]
        keys = ("steps_per_s", "plain_step_s", "other_cpu_share")
        tiers[tier] = {key: summarize([r[key] for r in mine]) for key in keys}
    by_rep = {(r["tier"], r["rep"]): r for r in runs}
    reps = range(args.goodput_reps)
    same_weights, same_losses, differences = compare_runs(work / "throughput-on-0", work / "throughput-off-0")
    return {
        "runs": runs,
        "tiers": tiers,
        # paired by repetition: outside load changes between repetitions more than within one
        "ratio_on_off": summarize([by_rep["on", r]["steps_per_s"] / by_rep["off", r]["steps_per_s"] for r in reps]),
        "ratio_on_off_median_step": summarize(
            [by_rep["off", r]["plain_step_s"] / by_rep["on", r]["plain_step_s"] for r in reps]),
        # what keeping a warm parent per rank costs a run without failures (the local tier on in both)
        "ratio_warm_on": summarize([by_rep["warm", r]["steps_per_s"] / by_rep["on", r]["steps_per_s"] for r in reps]),
        "ratio_warm_on_median_step": summarize(
            [by_rep["on", r]["plain_step_s"] / by_rep["warm", r]["plain_step_s"] for r in reps]),
        # the whole job's CPU time, on / warm: the warm parents' own work (imports once, the rehearsal once, the
        # watch loop) is in it, and outside load moves CPU time far less than wall time
        "ratio_warm_on_cpu": summarize([by_rep["on", r]["job_cpu_s"] / by_rep["warm", r]["job_cpu_s"] for r in reps]),
        "identical_on_off": {"weights": same_weights, "losses": same_losses, "differences": differences},
        "step_time_noise": step_time_noise(tiers),
    }


def run_uninterrupted(args: argparse.Namespace, work: Path, tier: str, rep: int) -> dict[str, Any]:
    run_dir = work / f"throughput-{tier}-{rep}"
    result = {"tier": tier, "rep": rep, **run_recipe(args, recipe_cmd(args, run_dir, tier), f"throughput-{tier}-{rep}")}
    measured = read_run(run_dir / TENSORBOARD_DIR, args.trainer_skip, args.goodput_interval)
    result.update({key: measured[key] for key in ("steps_per_s", "plain_step_s", "steps")})
    print(f"[bench] goodput throughput local tier {tier:<3} rep={rep}  {result['steps_per_s']:.2f} steps/s, median "
          f"step {result['plain_step_s'] * 1e3:.1f} ms (other load {result['other_cpu_share']:.0%})", flush=True)
    if rep > 0 and not args.keep:  # the first repetition's runs are the references of the failure runs
        remove(run_dir)
    return result


def step_time_noise(tiers: dict[str, Any]) -> float | None:
    """Run-to-run noise of the median step time: the largest (max - min) / median over the runs of one tier;
    None with one run per tier."""
    spreads = [(s["max"] - s["min"]) / s["median"] for s in (t["plain_step_s"] for t in tiers.values()) if s["n"] > 1]
    return max(spreads) if spreads else None


# ---------------------------------------------------------------------------------------------- failures
def run_failures(args: argparse.Namespace, work: Path, kind: str, tier: str, reference: Path,
                 max_delay: float) -> dict[str, Any]:
    """``args.goodput_kills`` failures of one kind with the tier on or off; what they cost, and the verdict."""
    name = f"chaos-{kind}-{tier}"
    run_dir = work / name
    restarts = args.goodput_kills + 3 if kind == "rank" else 0  # a whole-job kill is relaunched by run_chaos
    cmd = recipe_cmd(args, run_dir, tier, max_restarts=restarts)
    if kind == "process":  # every failure is the warm parents' to recover, none torchrun's
        cmd.append(f"train.warm_restarts={args.goodput_kills + 3}")
    waited = wait_for_quiet(args.quiet_wait)
    load = OtherLoad()
    prefix = f"[bench] goodput {kind} kills, local tier {tier}:"
    try:
        report = run_chaos(cmd, run_dir, kills=args.goodput_kills, kinds=(kind,), seed=args.goodput_seed,
                           min_delay=MIN_DELAY_S, max_delay=max_delay, timeout=args.goodput_timeout,
                           say=lambda line: print(prefix, line, flush=True))
    except RuntimeError as exc:
        raise BenchError(f"goodput {name}: {exc} (log: {Path(args.out) / 'logs' / f'goodput-{name}.log'})") from exc
    finally:
        chaos_log = run_dir.parent / f"{run_dir.name}.chaos.log"
        if chaos_log.is_file():
            shutil.move(chaos_log, Path(args.out) / "logs" / f"goodput-{name}.log")
    report.identical_weights, report.identical_losses, report.differences = compare_runs(run_dir, reference)
    measure_goodput(report, run_dir)
    load_shares = {"quiet_wait_s": waited, **load.shares()}
    return summarize_failures(report, kind, tier, args.goodput_kills, own_recovery(run_dir), load_shares)


def summarize_failures(report: Any, kind: str, tier: str, requested: int, own: dict[str, Any],
                       load: dict[str, float]) -> dict[str, Any]:
    """One configuration's row; the per-failure figures are None when no failure landed while it trained."""
    recoveries = report.recoveries

    def stats(values: list[float]) -> dict[str, Any] | None:
        return summarize(values) if values else None

    entry = {
        "kind": kind,
        "tier": tier,
        "requested": requested,
        "kills": report.kills,  # delivered while the job trained
        "missed": report.missed,
        "recovered": len(recoveries),
        "steps_redone": stats([float(r.steps_redone) for r in recoveries]),
        "time_lost_s": stats([r.recovery_s for r in recoveries]),
        "cost_per_failure_s": stats(report.cost_per_failure_s),
        "ettr": report.ettr if recoveries else None,
        "training_wall_s": report.training_wall_s,
        "identical": bool(report.identical_weights and report.identical_losses),
        "differences": report.differences,
        "own_report": own,
        "report": report.to_dict(),
        **load,
    }
    time_lost = entry["time_lost_s"]["median"] if entry["time_lost_s"] else float("nan")
    redone = entry["steps_redone"]["median"] if entry["steps_redone"] else float("nan")
    print(f"[bench] goodput {kind} kills, local tier {tier}: {len(recoveries)} of {requested} recovered, median "
          f"{redone:g} steps redone, {time_lost:.2f} s lost per failure, ETTR {entry['ettr'] or float('nan'):.3f}, "
          f"identical {entry['identical']}", flush=True)
    return entry


def own_recovery(run_dir: Path) -> dict[str, Any]:
    """What the run itself logged about its resumes (``recovery/*``); a resume to an earlier step than an
    earlier resume's log step overwrote that one, so there may be fewer than there were failures."""
    from ftrain.events import read_run_scalars

    wanted = (tags.RECOVERY_TIME_LOST_S, tags.RECOVERY_STEPS_REDONE, tags.RECOVERY_STARTUP_S, tags.RECOVERY_LOAD_S)
    scalars = read_run_scalars(run_dir, wanted)
    return {tag.split("/", 1)[1]: summarize(list(scalars[tag].values())) if scalars.get(tag) else None
            for tag in wanted}


# ------------------------------------------------------------------------------------------ auto interval
def run_auto_interval(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """One run with ``checkpoint.interval=auto`` (tier on): the intervals chosen and the overhead measured."""
    run_dir = work / "auto"
    result = run_recipe(args, recipe_cmd(args, run_dir, "warm", interval="auto"), "auto")  # the defaults
    result.update(auto_overhead(run_dir / TENSORBOARD_DIR))
    result["budget"] = overhead_budget(run_dir)
    result["overhead_vs_budget"] = ratio(result["overhead_share"], result["budget"])
    chosen = ", ".join(f"{int(v)} (step {s})" for s, v in result["intervals"])
    print(f"[bench] goodput interval=auto: {chosen or 'no interval logged'}; overhead "
          f"{result['overhead_share']:.2%} (blocked {result['blocked_share']:.2%}) of training time, "
          f"budget {result['budget']:.0%}", flush=True)
    return result


def overhead_budget(run_dir: Path) -> float:
    from omegaconf import OmegaConf

    return float(OmegaConf.load(run_dir / CONFIG_NAME).checkpoint.overhead_budget)


def auto_overhead(tb_dir: Path) -> dict[str, Any]:
    """Checkpoint overhead of a run from its TensorBoard events, over its training time (first step to last):

    * blocked: the sum of ``checkpoint/blocking_s`` (the final save, which the run waits for to exit, left out);
    * blocked + slowdown: the steps that started between a checkpoint step's end and its commit (its
      ``checkpoint/save_s`` later) hold the blocked time and the slowdown the background write causes; their
      time above the median step that ran without a save, summed (the in-run estimate the trainer part makes,
      for a varying interval).
    """
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0})
    acc.Reload()
    present = set(acc.Tags()["scalars"])

    def events(tag: str) -> dict[int, tuple[float, float]]:
        return {e.step: (e.wall_time, e.value) for e in acc.Scalars(tag)} if tag in present else {}

    walls = {step: wall for step, (wall, _) in events(tags.LOSS).items()}
    if len(walls) < 3:
        raise BenchError(f"{tb_dir}: too few steps to measure the checkpoint overhead")
    first, last = min(walls), max(walls)
    blocking = {s: v for s, (_, v) in events(tags.CKPT_BLOCKING_S).items() if s < last}
    saves = {s: v for s, (_, v) in events(tags.CKPT_SAVE_S).items()}
    during = set()  # steps that ran while a checkpoint blocked or wrote
    for step in blocking:
        end = walls.get(step, 0.0) + saves.get(step, blocking[step])  # save_s runs from the call to the commit
        nxt = step + 1
        while nxt in walls and (nxt == step + 1 or walls[nxt - 1] < end):
            during.add(nxt)
            nxt += 1
    durations = {s: walls[s] - walls[s - 1] for s in walls if s - 1 in walls}
    quiet = [d for s, d in durations.items() if s not in during]
    median = statistics.median(quiet) if quiet else 0.0
    training_s = walls[last] - walls[first]
    slowdown = sum(durations[s] - median for s in during if s in durations)
    return {
        "intervals": [[s, v] for s, (_, v) in sorted(events(tags.CKPT_INTERVAL).items())],
        "checkpoints": sorted(blocking),
        "training_s": training_s,
        "blocked_s": sum(blocking.values()),
        "slowdown_s": slowdown,
        "median_step_s": median,
        "blocked_share": sum(blocking.values()) / training_s,
        "overhead_share": slowdown / training_s,
    }
