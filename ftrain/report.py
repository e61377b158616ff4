"""``ftrain-report``: what checkpointing cost a finished (or running) ftrain run, from its TensorBoard scalars.

    ftrain-report RUN_DIR [--json] [--plot PATH | --no-plot]

Prints the number of checkpoints; blocking time, background save time, staging and write time (median, p95,
max); checkpoint size and write throughput; the share of the training loop's time lost to checkpointing; and
the goodput so far: the failures the run recovered from (time lost, steps redone, start-up and load time, as the
resumed run logged them under ``recovery/*``), the cost per failure and the run's ETTR.
Draws a PNG of step time over steps with every checkpoint marked (default ``RUN_DIR/overhead.png``) when
matplotlib is installed (``pip install 'ftrain[report]'``). Every number is computed from the scalars as
TensorBoard shows them (see ``ftrain.events``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import textwrap
from pathlib import Path
from typing import Any

from ftrain import tags
from ftrain.checkpoint.run_dir import TENSORBOARD_DIR
from ftrain.events import NotARunError, events_dir, read_run_events

PROG = "ftrain-report"
EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2

STEP_TIME = tags.STEP_TIME_S
BLOCKING = tags.CKPT_BLOCKING_S
SAVE = tags.CKPT_SAVE_S
LOAD = tags.CKPT_LOAD_S
RECOVERY = {  # what a resumed run logged about the failure it recovered from (at its first step)
    "time_lost_s": tags.RECOVERY_TIME_LOST_S,
    "steps_redone": tags.RECOVERY_STEPS_REDONE,
    "startup_s": tags.RECOVERY_STARTUP_S,
    "load_s": tags.RECOVERY_LOAD_S,
}
# what one checkpoint reports (its failure count is a running total, not a cost)
CHECKPOINT_TAGS = tuple(tag for tag in tags.CHECKPOINT_TAGS if tag != tags.CKPT_FAILURES)
PLOT_NEEDS = "the plot needs matplotlib: pip install 'ftrain[report]'"

DEFINITION = (
    f"loop time lost = sum({BLOCKING}) / (sum({STEP_TIME}) + sum({BLOCKING})). "
    f"{STEP_TIME} of a checkpoint step ends before its save call, so blocking time is added to it; the "
    "staging wait inside the next step is counted in both sums, which makes the share a slight underestimate "
    "when staging waits are long. A run's last checkpoint (and a preemption save) blocks until committed."
)
GOODPUT_DEFINITION = (
    f"cost per failure = {tags.RECOVERY_TIME_LOST_S} (last step before the failure to first step after) + "
    f"{tags.RECOVERY_STEPS_REDONE} x the median step time; ETTR = 1 - the failures' cost / the training wall time "
    "(first step to last, from the events' wall times). A failure counts once its resumed run has logged a step; "
    "one whose record a later resume went back past (purged with the steps after it) is not counted."
)

DESCRIPTION = f"""\
Report what checkpointing cost an ftrain run, read from its TensorBoard scalars (rank 0; a resumed run is
read as TensorBoard shows it, the steps purged on resume left out).

Prints: the number of checkpoints that reported their cost (committed and failed); blocking time, how long
the training loop stood still for a checkpoint ({BLOCKING}); background save time from the save
call to the commit marker ({SAVE}), with its staging and write parts; checkpoint size; write
throughput; the share of the loop's time lost to checkpointing; and the goodput so far: the failures the run
recovered from, with the time lost, steps redone, start-up and load time each resumed run logged (recovery/*),
the cost per failure and the ETTR. Times are median, p95 (linear interpolation between sorted values) and
max. A checkpoint's cost is logged at the next save call (or at the end of the run), so a checkpoint whose
run was killed before then is not counted.

{textwrap.fill(DEFINITION, 108)}

{textwrap.fill(GOODPUT_DEFINITION, 108)}

Also draws a PNG (needs matplotlib: pip install 'ftrain[report]'): step time over steps, each checkpoint's
blocking time as a red bar at its step, and its background save as an orange band over the steps it
overlapped (save_s laid over the following step times)."""

EPILOG = """\
exit codes: 0 report written (without matplotlib: the text, and a note that the plot needs it);
2 bad usage, a path that does not exist, a plot path that cannot be written, or a directory without an
ftrain run's TensorBoard events."""


# ------------------------------------------------------------------------------------------------- numbers
def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100), interpolating linearly between the two nearest sorted values (as numpy)."""
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def describe(values: list[float], with_total: bool = True) -> dict[str, float] | None:
    """min, median, p95, max (and total) of a list; None when it is empty."""
    if not values:
        return None
    stats = {
        "min": min(values),
        "median": statistics.median(values),
        "p95": percentile(values, 95),
        "max": max(values),
    }
    if with_total:
        stats["total"] = math.fsum(values)
    return stats


def per_checkpoint(scalars: dict[str, dict[int, float]]) -> list[dict[str, Any]]:
    """One record per checkpoint that reported its cost, in step order; ``ok`` is False for a failed save."""
    records = []
    for step in sorted(scalars.get(BLOCKING, {})):
        record: dict[str, Any] = {"step": step, "ok": step in scalars.get(SAVE, {})}
        for tag in CHECKPOINT_TAGS:
            if step in scalars.get(tag, {}):
                record[tag.split("/", 1)[1]] = scalars[tag][step]
        records.append(record)
    return records


def goodput(scalars: dict[str, dict[int, float]], step_walls: dict[int, float] | None) -> dict[str, Any]:
    """The failures the run recovered from, what each cost, and the ETTR so far (``GOODPUT_DEFINITION``);
    ``step_walls``: ``{step: wall time}`` of the logged steps (``ftrain.events.read_run_events``)."""
    step_times = scalars.get(STEP_TIME, {})
    records = {name: scalars.get(tag, {}) for name, tag in RECOVERY.items()}
    at = sorted(records["time_lost_s"])
    median_step = statistics.median(step_times.values()) if step_times else 0.0
    costs = [records["time_lost_s"][s] + records["steps_redone"].get(s, 0.0) * median_step for s in at]
    wall = None
    if step_walls and step_times:
        first = min(step_walls)
        wall = max(step_walls.values()) - step_walls[first] + step_times.get(first, 0.0)  # the first step's own time
    return {
        "failures": len(at),
        "at_steps": at,
        **{name: describe([values[s] for s in at if s in values]) for name, values in records.items()},
        "cost_per_failure_s": describe(costs),
        "training_wall_s": wall,
        "ettr": max(0.0, 1.0 - math.fsum(costs) / wall) if wall else None,
        "definition": GOODPUT_DEFINITION,
    }


def summarize(
    scalars: dict[str, dict[int, float]], run_dir: str = "", step_walls: dict[int, float] | None = None
) -> dict[str, Any]:
    """The whole report as plain data (what ``--json`` prints); ``step_walls`` as for ``goodput``."""
    step_times = scalars.get(STEP_TIME, {})
    records = per_checkpoint(scalars)
    ok = [record for record in records if record["ok"]]

    def column(name: str, rows: list[dict[str, Any]]) -> list[float]:
        return [row[name] for row in rows if name in row]

    blocking_total = math.fsum(column("blocking_s", records))
    step_total = math.fsum(step_times.values())
    loop_total = step_total + blocking_total
    written = math.fsum(column("size_bytes", ok))
    write_time = math.fsum(column("write_s", ok))
    loads = scalars.get(LOAD, {})
    return {
        "run_dir": run_dir,
        "steps": {
            "count": len(step_times),
            "first": min(step_times, default=None),
            "last": max(step_times, default=None),
            "step_time_s": describe(list(step_times.values())),
        },
        "checkpoints": {
            "count": len(records),
            "committed": len(ok),
            "failed": len(records) - len(ok),
            "steps": [record["step"] for record in records],
        },
        "blocking_s": describe(column("blocking_s", records)),
        "save_s": describe(column("save_s", ok)),
        "staging_s": describe(column("staging_s", records)),
        "write_s": describe(column("write_s", ok)),
        "size_bytes": describe(column("size_bytes", ok)),
        "write_GBps": describe(column("write_GBps", ok), with_total=False),
        "write_GBps_overall": written / write_time / 1e9 if write_time > 0 else None,
        "resumes": {"count": len(loads), "steps": sorted(loads), "load_s": describe(list(loads.values()))},
        "loop_time_s": loop_total,
        "lost_share": blocking_total / loop_total if loop_total > 0 else 0.0,
        "definition": DEFINITION,
        "goodput": goodput(scalars, step_walls),
        "per_checkpoint": records,
    }


# ------------------------------------------------------------------------------------------------ text
def _time(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds * 1e3:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


def _size(num_bytes: float) -> str:
    return f"{num_bytes / 1e6:.1f} MB" if num_bytes < 1e9 else f"{num_bytes / 1e9:.2f} GB"


def _steps(steps: list[int]) -> str:
    if len(steps) <= 8:
        return ", ".join(map(str, steps))
    return ", ".join(map(str, steps[:3])) + ", ..., " + ", ".join(map(str, steps[-2:]))


def _times_line(stats: dict[str, float] | None) -> str:
    if stats is None:
        return "-"
    return f"median {_time(stats['median'])}   p95 {_time(stats['p95'])}   max {_time(stats['max'])}"


def _checkpoint_rows(report: dict[str, Any]) -> list[tuple[str, str]]:
    blocking, size, rate = report["blocking_s"], report["size_bytes"], report["write_GBps"]
    rows = [
        ("blocking", f"{_times_line(blocking)}   total {_time(blocking['total'])}"),
        ("background save", f"{_times_line(report['save_s'])}   (save call to commit marker)"),
        ("  staging", _times_line(report["staging_s"])),
        ("  write", _times_line(report["write_s"])),
    ]
    if size is not None:
        sizes = f"median {_size(size['median'])}   max {_size(size['max'])}   total written {_size(size['total'])}"
        rows.append(("size", sizes))
    if rate is not None:
        overall = report["write_GBps_overall"]
        rates = f"median {rate['median']:.3g} GB/s   min {rate['min']:.3g} GB/s   overall {overall:.3g} GB/s"
        rows.append(("write throughput", rates))
    return rows


def _goodput_rows(good: dict[str, Any]) -> list[tuple[str, str]]:
    if not good["failures"]:
        return [("failures", "none recovered from so far")]
    redone = good["steps_redone"]
    startup = _times_line(good["startup_s"])
    if good["load_s"]:
        startup += f"   (loading: median {_time(good['load_s']['median'])})"
    rows = [
        ("failures", f"{good['failures']} recovered from (first steps after them: {_steps(good['at_steps'])})"),
        ("  time lost", f"{_times_line(good['time_lost_s'])}   (last step before to first step after)"),
        ("  steps redone", f"median {redone['median']:g}   max {redone['max']:g}   total {redone['total']:g}"
         if redone else "-"),
        ("  start-up", startup),
        ("  cost per failure", f"{_times_line(good['cost_per_failure_s'])}   (time lost + steps redone)"),
    ]
    if good["ettr"] is not None:
        total = good["cost_per_failure_s"]["total"]
        rows.append(("ETTR", f"{good['ettr']:.3f}   = 1 - failures' cost {_time(total)} / training wall time "
                             f"{_time(good['training_wall_s'])}"))
    return rows


def format_text(report: dict[str, Any]) -> str:
    steps, ckpt, resumes = report["steps"], report["checkpoints"], report["resumes"]
    step_median = steps["step_time_s"]["median"] if steps["step_time_s"] else None
    where = f" at steps {_steps(ckpt['steps'])}" if ckpt["steps"] else ""
    rows = [
        ("training steps", f"{steps['count']} logged (steps {steps['first']}-{steps['last']}), "
                           f"median step time {_time(step_median)}"),
        ("checkpoints", f"{ckpt['count']} ({ckpt['committed']} committed, {ckpt['failed']} failed){where}"),
    ]
    if ckpt["count"]:
        rows += _checkpoint_rows(report)
    loads = f" (load {_times_line(resumes['load_s'])})" if resumes["count"] else ""
    rows.append(("resumes", f"{resumes['count']}{loads}"))
    blocking_total = report["blocking_s"]["total"] if report["blocking_s"] else 0.0
    rows.append(("loop time lost", f"{report['lost_share']:.2%}   = blocking {_time(blocking_total)} / "
                                   f"(step time + blocking) {_time(report['loop_time_s'])}"))
    rows += _goodput_rows(report["goodput"])
    if report.get("plot"):
        rows.append(("plot", report["plot"]))
    lines = [f"checkpoint overhead of {report['run_dir']}"]
    lines += [f"  {label:<20} {value}" for label, value in rows]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ plot
def background_spans(scalars: dict[str, dict[int, float]]) -> list[tuple[int, float]]:
    """(checkpoint step, end in step units) of each committed save, laying save_s over the next step times.

    Step k occupies the interval (k-1, k] on the x-axis; a save called after step N began at x = N.
    """
    step_times = scalars.get(STEP_TIME, {})
    spans = []
    for step, save_s in sorted(scalars.get(SAVE, {}).items()):
        end, left = float(step), save_s
        while left > 0 and (end_step := math.floor(end) + 1) in step_times:
            duration = step_times[end_step]
            if left <= duration:
                end += left / duration
                break
            end, left = float(end_step), left - duration
        spans.append((step, end))
    return spans


def _y_top(step_times: list[float], blocking: list[float]) -> float:
    """Top of the y-axis: everything, unless a few step times (e.g. the first, warm-up) dwarf the rest."""
    cap = max(3 * percentile(step_times, 95), *blocking, 0.0)
    return min(max(step_times + blocking), cap) * 1.05 if cap > 0 else 1.0


def _subtitle(report: dict[str, Any]) -> str:
    count = report["checkpoints"]["count"]
    if not count:
        return "no checkpoints reported"
    return (f"{count} checkpoints, blocking median {_time(report['blocking_s']['median'])}, "
            f"loop time lost {report['lost_share']:.2%}")


def matplotlib_missing() -> bool:
    import importlib.util

    return importlib.util.find_spec("matplotlib") is None


def render_plot(scalars: dict[str, dict[int, float]], report: dict[str, Any], path: Path) -> None:
    """Draw step time over steps with every checkpoint marked and save it as a PNG (needs matplotlib)."""
    from matplotlib.figure import Figure  # a Figure of its own: no pyplot, no global backend state

    step_times, blocking = scalars[STEP_TIME], scalars.get(BLOCKING, {})
    committed, loads = scalars.get(SAVE, {}), scalars.get(LOAD, {})
    y_top = _y_top(list(step_times.values()), list(blocking.values()))
    figure = Figure(figsize=(12, 6), dpi=100, layout="constrained")
    axes = figure.add_subplot()
    for index, (step, end) in enumerate(background_spans(scalars)):
        label = f"background save, laid over the steps it overlapped ({SAVE})" if index == 0 else None
        axes.axvspan(step, max(end, step + 0.05), color="orange", alpha=0.3, linewidth=0, label=label)
    steps = sorted(step_times)
    axes.plot(steps, [step_times[s] for s in steps], color="tab:blue", linewidth=1.5,
              marker="o" if len(steps) <= 150 else None, markersize=3, label=f"step time ({STEP_TIME})")
    for step in steps:
        if step_times[step] > y_top:  # clipped: say how high it was
            axes.annotate(f"{step_times[step]:.3g} s", (step, y_top), xytext=(3, -12), textcoords="offset points",
                          color="tab:blue", fontsize=8)
    for kind, color, chosen in (("committed", "tab:red", True), ("failed", "black", False)):
        bars = {step: value for step, value in blocking.items() if (step in committed) == chosen}
        if bars:
            label = (f"blocking: loop stopped for the checkpoint at this step ({BLOCKING})" if chosen
                     else "failed save (its blocking time)")
            axes.bar(list(bars), list(bars.values()), width=0.5, color=color, label=label, zorder=3)
    for index, step in enumerate(sorted(loads)):
        axes.axvline(step, color="tab:green", linewidth=2,
                     label=f"resumed from a checkpoint ({LOAD})" if index == 0 else None)
    axes.set_ylim(0, y_top)
    axes.set_xlim(min(step_times) - 1, max([*step_times, *blocking]) + 1)
    axes.set_xlabel("step")
    axes.set_ylabel("seconds")
    axes.grid(axis="y", color="0.9")
    axes.set_title(f"Checkpoint overhead: {report['run_dir']}\n{_subtitle(report)}", loc="left", fontsize=11)
    axes.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=1, frameon=False, fontsize=9)
    figure.savefig(path, format="png")


# ------------------------------------------------------------------------------------------------- CLI
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("run_dir", metavar="RUN_DIR", help="an ftrain run directory (the one holding tb/), or its tb/")
    parser.add_argument("--json", action="store_true", help="print the report as JSON (raw numbers, seconds, bytes)")
    plot = parser.add_mutually_exclusive_group()
    plot.add_argument("--plot", metavar="PATH", type=Path, help="write the PNG here (default: RUN_DIR/overhead.png)")
    plot.add_argument("--no-plot", action="store_true", help="do not draw the PNG")
    return parser.parse_args(argv)


def run_root(given: str | Path) -> Path:
    """The run directory, also when its ``tb/`` was given."""
    directory = events_dir(given)
    return directory.parent if directory.name == TENSORBOARD_DIR else directory


def fail(message: str, code: int) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.run_dir:
        return fail("RUN_DIR is empty", EXIT_USAGE)
    try:
        scalars, step_walls = read_run_events(args.run_dir)
        run_dir = run_root(args.run_dir)
    except (FileNotFoundError, NotADirectoryError, NotARunError) as exc:
        return fail(str(exc), EXIT_USAGE)
    report = summarize(scalars, str(run_dir), step_walls)
    report["plot"] = None
    if not args.no_plot and matplotlib_missing():
        print(f"{PROG}: note: no plot: {PLOT_NEEDS} (or pass --no-plot)", file=sys.stderr)
    elif not args.no_plot:
        plot_path = args.plot or run_dir / "overhead.png"
        try:
            render_plot(scalars, report, plot_path)
        except OSError as exc:
            return fail(f"cannot write the plot to {plot_path}: {exc.strerror or exc}", EXIT_USAGE)
        report["plot"] = str(plot_path)
    try:
        print(json.dumps(report, indent=2) if args.json else format_text(report))
        sys.stdout.flush()
    except BrokenPipeError:  # piped into e.g. head, which has what it wanted; keep the exit flush quiet
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
