"""``ftrain-chaos``: kill a training run at random moments, let it recover each time, check it ends as if never
interrupted.

    ftrain-chaos --workdir /tmp/chaos --kills 10 --seed 0
    ftrain-chaos --workdir /tmp/chaos --kills 5 --kinds rank,sigterm -- \\
        torchrun --standalone --nproc_per_node=2 --max-restarts=20 -m ftrain train train.max_steps=200

The command (default: the default recipe on 2 ranks) gets ``run.dir=WORKDIR/reference`` for one uninterrupted
run, then ``run.dir=WORKDIR/chaos log.interval=1`` for the run under fire. Kinds: ``job`` (SIGKILL everything,
start again), ``rank`` (SIGKILL one worker; needs torchrun --max-restarts), ``sigterm`` (one worker is
preempted: it saves and exits 75). At the end the final checkpoints' tensors and the loss curves must be
bit-identical. Exit code: 0 identical, 1 different, 2 bad usage.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

from ftrain.harness.chaos import KINDS, compare_runs, measure_goodput, run_chaos

# the default recipe on 2 ranks, from wherever this is run (the package, not a clone's recipes/train.py)
DEFAULT_CMD = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "ftrain", "train"]


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="ftrain-chaos",
        description="Kill a training run at random moments and check it recovers bit for bit.",
        epilog="Everything after -- is the training command (without run.dir).",
    )
    parser.add_argument("--workdir", type=Path, required=True, help="where the reference and chaos runs go")
    parser.add_argument("--kills", type=int, default=10, help="failures to inject (default 10)")
    parser.add_argument("--kinds", default="job", help=f"comma-separated, drawn at random: {', '.join(KINDS)}")
    parser.add_argument("--seed", type=int, default=0, help="seeds the kinds, delays and ranks chosen")
    parser.add_argument("--min-delay", type=float, default=0.5, help="seconds of training before a kill, at least")
    parser.add_argument("--max-delay", type=float, default=4.0, help="... and at most")
    parser.add_argument("--timeout", type=float, default=1800, help="give up after this many seconds")
    parser.add_argument("--reference", type=Path, help="an existing uninterrupted run of the same command to compare with")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("cmd", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.cmd = [c for c in args.cmd if c != "--"] or DEFAULT_CMD
    args.kinds = tuple(k.strip() for k in args.kinds.split(","))
    bad = [k for k in args.kinds if k not in KINDS]
    if bad:
        parser.error(f"unknown kind {bad[0]!r}; choose from {', '.join(KINDS)}")
    if args.kills < 0 or args.min_delay < 0 or args.max_delay < args.min_delay:
        parser.error("need --kills >= 0 and 0 <= --min-delay <= --max-delay")
    if any(c.startswith("run.dir=") for c in args.cmd):
        parser.error("leave run.dir out of the command: chaos sets it")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    reference = args.reference or args.workdir / "reference"
    if args.reference is None:
        shutil.rmtree(reference, ignore_errors=True)
        print(f"reference run -> {reference}", file=sys.stderr)
        done = subprocess.run([*args.cmd, f"run.dir={reference}"], capture_output=True, text=True)
        if done.returncode != 0:
            print(f"ftrain-chaos: error: the reference run failed ({done.returncode}): {done.stderr.strip()[-500:]}", file=sys.stderr)
            return 1
    chaos_dir = args.workdir / "chaos"
    shutil.rmtree(chaos_dir, ignore_errors=True)
    report = run_chaos(
        [*args.cmd, f"run.dir={chaos_dir}", "log.interval=1"],
        chaos_dir,
        kills=args.kills,
        kinds=args.kinds,
        seed=args.seed,
        min_delay=args.min_delay,
        max_delay=args.max_delay,
        timeout=args.timeout,
        say=lambda line: print(line, file=sys.stderr),
    )
    report.identical_weights, report.identical_losses, report.differences = compare_runs(chaos_dir, reference)
    measure_goodput(report, chaos_dir)
    if args.json:
        print(json.dumps(report.to_dict(), indent=1))
    else:
        print_report(report)
    return 0 if report.ok else 1


def print_report(report) -> None:
    recoveries = report.recoveries
    print(f"kills {report.kills}, recoveries {len(recoveries)}, finished at step {report.final_step} in {report.wall_s:.0f} s")
    if report.missed:
        print(f"({report.missed} failure(s) came after the run had finished and were not counted; use a longer run)")
    if recoveries:
        times = sorted(r.recovery_s for r in recoveries)
        print(
            f"time to training again: median {times[len(times) // 2]:.1f} s, max {times[-1]:.1f} s; "
            f"steps redone: {sum(r.steps_redone for r in recoveries)} in all, max {max(r.steps_redone for r in recoveries)}"
        )
    if report.cost_per_failure_s:
        costs = sorted(report.cost_per_failure_s)
        print(f"cost per failure (time to training again + steps redone): median {costs[len(costs) // 2]:.1f} s, max {costs[-1]:.1f} s")
    if report.ettr is not None:
        print(f"effective training time ratio (ETTR): {report.ettr:.2f} ({report.training_wall_s:.1f} s of training wall time)")
    print(f"final weights identical to the uninterrupted run: {'yes' if report.identical_weights else 'NO'}")
    print(f"loss curve identical to the uninterrupted run:   {'yes' if report.identical_losses else 'NO'}")
    for difference in report.differences:
        print(f"  differs: {difference}")


if __name__ == "__main__":
    sys.exit(main())
