"""Checkpoint benchmark: what a checkpoint costs, next to the floors of this machine, and what a failure costs.

One documented command per question; each writes ``bench.json`` and ``bench.md`` into ``--out`` (how long each
takes, and what it measured: docs/bench.md):

    python tools/bench_checkpoint.py --out runs/bench          # full: 1 GB state, 3 reps, 12 recipe runs
    python tools/bench_checkpoint.py --quick --out /tmp/bench  # CI form: checks it works, not its timings
    python tools/bench_checkpoint.py --parts goodput --out runs/bench-goodput   # failures
    python tools/bench_checkpoint.py --quick --parts goodput --out /tmp/bench-goodput   # its CI form
    python tools/bench_checkpoint.py --parts s3 --out runs/bench-s3   # object storage (a SeaweedFS of its own)
    python tools/bench_checkpoint.py --parts loop --loop-before REV --out runs/bench-loop   # own loop, REV beside

It has five parts; ``--parts`` runs ``micro,trainer`` unless told otherwise:

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
* ``goodput`` (``bench/goodput.py``) runs the recipe (``--goodput-steps``, ``checkpoint.interval=
  --goodput-interval``) with the local snapshot tier on and off: the restart floor (torchrun starting workers
  that only import torch and DCP and join a group), throughput without failures and the health check's per-step
  cost, ``--goodput-kills`` whole-job SIGKILLs and as many single-rank SIGKILLs under ``--max-restarts`` (steps
  redone, time lost, cost per failure, ETTR, bit-identical to an uninterrupted run), and one
  ``checkpoint.interval=auto`` run (intervals chosen, overhead against ``checkpoint.overhead_budget``).
* ``s3`` (``bench/object_storage.py``): save and resume through ``checkpoint.dir=s3://`` against the same
  server's floor (parallel plain PUT/GET of the same bytes), a small save's CPU time in one process to disk and to
  the store, and the recipe's loop saving to local disk and to the store, side by side with checkpointing off (``--s3-url``, or a SeaweedFS server of its own).
* ``loop`` (``bench/own_loop.py``): a training loop of its own through the public ``ftrain.Checkpointer`` (an FSDP2
  MLP of ``--loop-size-mb`` with AdamW, ``--loop-steps`` steps, a save every ``--loop-interval``): loop time with no
  Checkpointer, with the local tier off and with the defaults, alternating over ``--loop-reps`` rounds; save cost
  and the time of one ``load()`` per configuration; with ``--loop-before REV`` the same configurations on the
  sources of ``REV`` interleaved with them (before and after in one run).

Times are the maximum over ranks of one repetition; tables show the median and [min-max] over repetitions.
Exit codes: 0 done (targets missed or not), 1 a run failed, 2 bad arguments.

This file parses the arguments and runs the parts; the modules of ``tools/bench/`` do the work. They are imported
as ``bench``: Python puts this script's folder first on ``sys.path`` (under torchrun too, and DCP's writer process
inherits it).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import MANAGER_MODES, REPO, BenchError
from bench.goodput import CONFIGS, QUICK_CONFIGS, run_goodput_part
from bench.launch import run_logged, tail, torchrun_cmd
from bench.micro import run_worker
from bench.object_storage import cleanup as cleanup_s3, run_s3_part
from bench.own_loop import run_loop_part
from bench.report import write_report
from bench.system import OtherLoad, environment, source_fingerprint, wait_for_quiet
from bench.trainer_runs import first_window, run_trainer_part


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
        "failures: python tools/bench_checkpoint.py --parts goodput | "
        "micro part by hand: torchrun --standalone --nproc_per_node=2 tools/bench_checkpoint.py --parts micro",
        formatter_class=_HelpFormatter,
    )
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "bench", help="directory for results and scratch files")
    parser.add_argument("--parts", default="micro,trainer", help="comma-separated: micro, trainer, goodput, s3, loop")
    parser.add_argument("--quick", action="store_true",
                        help="small and fast (16 MB, 1 rep, 20-step trainer runs of off and async only; goodput: 30 "
                        "steps of a smaller batch, 1 run per tier, 1 kill of each kind with the tier on only; loop: "
                        "4 MB, 7 steps, a save every 3, 1 round): checks that it works, for CI; its numbers mean little")
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
                        help="extra recipe override for every trainer and goodput run (repeatable)")
    parser.add_argument("--goodput-steps", type=int, default=600, help="goodput part: train.max_steps of each run")
    parser.add_argument("--goodput-interval", type=int, default=50, help="goodput part: checkpoint.interval")
    parser.add_argument("--goodput-kills", type=int, default=4,
                        help="goodput part: SIGKILLs per configuration (job, rank; each with the local tier on, off)")
    parser.add_argument("--goodput-reps", type=int, default=4,
                        help="goodput part: uninterrupted runs per local-tier setting (alternating; the median step "
                        "of a run varies 2-4%% from run to run here, so a 1%% target needs several pairs)")
    parser.add_argument("--goodput-seed", type=int, default=0,
                        help="goodput part: seeds the kill moments and ranks [default: 0]")
    parser.add_argument("--goodput-max-delay", type=float, default=None,
                        help="goodput part: most seconds of training before each kill [default: spread the kills "
                        "over the run, from the measured steps/s]")
    parser.add_argument("--goodput-configs", default="",
                        help="goodput part: comma-separated kill/setup pairs to run, e.g. rank/on,process/warm, or "
                        "none (the floors and uninterrupted runs only) [default: all; with --quick: job/warm,process/warm]")
    parser.add_argument("--loop-steps", type=int, default=40, help="loop part: steps of each loop job")
    parser.add_argument("--loop-interval", type=int, default=10, help="loop part: a durable save every N steps")
    parser.add_argument("--loop-reps", type=int, default=3,
                        help="loop part: rounds, each running every configuration once")
    parser.add_argument("--loop-skip", type=int, default=2,
                        help="loop part: first steps left out of the loop time (the first optimizer step allocates "
                        "AdamW's state, the first snapshots fault in their memory)")
    parser.add_argument("--loop-size-mb", type=float, default=240.0,
                        help="loop part: the MLP's parameters + AdamW's two moments in MB (float32, all ranks)")
    parser.add_argument("--loop-layers", type=int, default=4, help="loop part: square Linear layers of the MLP")
    parser.add_argument("--loop-batch", type=int, default=32, help="loop part: rows per rank and step")
    parser.add_argument("--loop-before", default="", metavar="GIT_REV",
                        help="loop part: also run the tier-off and defaults configurations on the ftrain sources of "
                        "this commit (git archive into --out), interleaved with the current ones")
    parser.add_argument("--quiet-wait", type=float, default=30.0,
                        help="before each torchrun launch, wait up to this many seconds for the machine to be "
                        "quiet (other processes under 10%% of the CPUs for a second)")
    parser.add_argument("--s3-url", default="",
                        help="s3 part: an s3://bucket/prefix to measure (endpoint and credentials from the AWS "
                        "environment) [default: a SeaweedFS server of its own on 127.0.0.1]")
    parser.add_argument("--s3-threads", type=int, default=2, help="s3 part: files written and read in parallel")
    parser.add_argument("--keep", action="store_true",
                        help="keep checkpoints, scratch files and the trainer and goodput run directories")
    args = parser.parse_args(argv)
    if args.quick:
        args.size_mb = args.size_mb or 16.0
        args.tensor_mb = min(args.tensor_mb, 4.0)
        args.reps, args.warmup, args.quiet_wait = 1, 1, 0.0
        args.trainer_steps, args.trainer_reps, args.trainer_skip = 20, 1, 5
        args.goodput_steps, args.goodput_interval, args.goodput_kills, args.goodput_reps = 30, 10, 1, 1
        args.loop_steps, args.loop_interval, args.loop_reps, args.loop_skip = 7, 3, 1, 1
        args.loop_size_mb, args.loop_batch = 4.0, 4
    # not options: the restart floor's launches (the last one also times the health check), and a bound per chaos run
    args.goodput_floor_reps, args.goodput_health_iters = (1, 200) if args.quick else (3, 2000)
    args.goodput_timeout = 600.0 if args.quick else 1800.0
    args.goodput_model = ["model.seq_len=64", "train.batch_size=4"] if args.quick else []  # quick: shorter steps
    # quick: the failures only with the local tier on (the tier-off path is the same code, and time is short)
    if args.goodput_configs == "none":
        args.goodput_configs = []
    elif args.goodput_configs:
        wanted = _split(args.goodput_configs)
        known = {f"{kind}/{setup}": (kind, setup) for kind, setup in CONFIGS}
        if set(wanted) - set(known):
            parser.error(f"--goodput-configs: choose from {', '.join(known)}")
        args.goodput_configs = [known[name] for name in wanted]
    else:
        args.goodput_configs = list(QUICK_CONFIGS if args.quick else CONFIGS)
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
    if not args.parts or set(args.parts) - {"micro", "trainer", "goodput", "s3", "loop"}:
        return f"--parts must name micro, trainer, goodput, s3 and/or loop, got {','.join(args.parts) or 'nothing'}"
    if set(args.trainer_modes) - set(MANAGER_MODES):
        return f"--trainer-modes takes {', '.join(MANAGER_MODES)}; got {','.join(args.trainer_modes)}"
    if args.nproc < 1 or args.reps < 1 or args.warmup < 0 or args.trainer_reps < 1:
        return "--nproc, --reps and --trainer-reps must be >= 1, --warmup >= 0"
    if args.size_mb is not None and args.size_mb <= 0 or args.tensor_mb <= 0:
        return "--size-mb and --tensor-mb must be > 0"
    if args.interval < 1 or args.trainer_skip < 0:
        return "--interval must be >= 1 and --trainer-skip >= 0"
    if "trainer" in args.parts and first_window(args.trainer_skip, args.interval) + args.interval > args.trainer_steps:
        return "--trainer-steps must leave one --interval window after --trainer-skip"
    if args.goodput_kills < 1 or args.goodput_reps < 1 or args.goodput_interval < 1:
        return "--goodput-kills, --goodput-reps and --goodput-interval must be >= 1"
    if args.goodput_max_delay is not None and args.goodput_max_delay < 0.5:
        return "--goodput-max-delay must be >= 0.5 (the shortest delay before a kill)"
    window = first_window(args.trainer_skip, args.goodput_interval) + args.goodput_interval
    if "goodput" in args.parts and window > args.goodput_steps:
        return "--goodput-steps must leave one --goodput-interval window after --trainer-skip"
    if args.loop_reps < 1 or args.loop_layers < 1 or args.loop_batch < 1 or args.loop_size_mb <= 0:
        return "--loop-reps, --loop-layers and --loop-batch must be >= 1, --loop-size-mb > 0"
    if args.loop_interval < 1 or not 0 <= args.loop_skip < args.loop_steps - 1 or args.loop_steps <= args.loop_interval:
        return "--loop-steps must exceed --loop-interval (>= 1) and leave steps after --loop-skip (>= 0)"
    return ""


# ------------------------------------------------------------------------------------------- orchestration
def launch_micro(args: argparse.Namespace, argv: list[str]) -> dict[str, Any]:
    """Run the micro part under torchrun; returns what rank 0 wrote."""
    out = Path(args.out)
    result_path = out / "micro.json"
    result_path.unlink(missing_ok=True)
    log_path = out / "logs" / "micro.log"
    # This script again, one process per rank. The ranks take their number from torchrun, and --nproc must not
    # reach torchrun's own parser: on Python 3.12 it reads options after the script and finds --nproc ambiguous.
    cmd = torchrun_cmd(args.nproc, Path(__file__).resolve(), without_option(argv, "--nproc"))
    env = {**os.environ, "FTRAIN_BENCH_ORCHESTRATED": "1"}
    waited = wait_for_quiet(args.quiet_wait)
    load = OtherLoad()
    code = run_logged(cmd, log_path, env, echo=lambda line: line.startswith("[bench]"))
    if code != 0 or not result_path.is_file():
        raise BenchError(f"micro part failed (exit {code}); last lines: {tail(log_path)} (full log: {log_path})")
    result = json.loads(result_path.read_text())
    result["config"].update({**load.shares(), "quiet_wait_s": waited})
    return result


def without_option(argv: list[str], name: str) -> list[str]:
    """``argv`` less ``name VALUE`` and ``name=VALUE``."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == name:
            skip = True
        elif not arg.startswith(name + "="):
            kept.append(arg)
    return kept


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
        if "goodput" in args.parts:
            result["goodput"] = run_goodput_part(args)
        if "loop" in args.parts:
            result["loop"] = run_loop_part(args)
        if "s3" in args.parts:
            try:
                result["s3"] = run_s3_part(args)
            finally:
                cleanup_s3(args)
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
