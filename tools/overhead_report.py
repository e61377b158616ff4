#!/usr/bin/env python3
"""What checkpointing cost a finished (or running) ftrain run, from its TensorBoard scalars.

    python tools/overhead_report.py RUN_DIR [--json] [--plot PATH | --no-plot]

Prints the number of checkpoints; blocking time, background save time, staging and write time (median, p95,
max); checkpoint size and write throughput; and the share of the training loop's time lost to checkpointing.
Writes a PNG of step time over steps with every checkpoint marked (default ``RUN_DIR/overhead.png``).
Every number is computed from the scalars as TensorBoard shows them (see ``ftrain.events``).
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

from ftrain.events import NotARunError, events_dir, read_run_scalars

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2

STEP_TIME = "train/step_time_s"
BLOCKING = "checkpoint/blocking_s"
SAVE = "checkpoint/save_s"
CHECKPOINT_TAGS = (
    BLOCKING,
    "checkpoint/staging_s",
    SAVE,
    "checkpoint/write_s",
    "checkpoint/size_bytes",
    "checkpoint/write_GBps",
)
LOAD = "checkpoint/load_s"

DEFINITION = (
    "loop time lost = sum(checkpoint/blocking_s) / (sum(train/step_time_s) + sum(checkpoint/blocking_s)). "
    "train/step_time_s of a checkpoint step ends before its save call, so blocking time is added to it; the "
    "staging wait inside the next step is counted in both sums, which makes the share a slight underestimate "
    "when staging waits are long. A run's last checkpoint (and a preemption save) blocks until committed."
)

DESCRIPTION = f"""\
Report what checkpointing cost an ftrain run, read from its TensorBoard scalars (rank 0; a resumed run is
read as TensorBoard shows it, the steps purged on resume left out).

Prints: the number of checkpoints that reported their cost (committed and failed); blocking time, how long
the training loop stood still for a checkpoint (checkpoint/blocking_s); background save time from the save
call to the commit marker (checkpoint/save_s), with its staging and write parts; checkpoint size; write
throughput; and the share of the loop's time lost to checkpointing. Times are median, p95 (linear
interpolation between sorted values) and max. A checkpoint's cost is logged at the next save call (or at
the end of the run), so a checkpoint whose run was killed before then is not counted.

{textwrap.fill(DEFINITION, 108)}

Also writes a PNG: step time over steps, each checkpoint's blocking time as a red bar at its step, and its
background save as an orange band over the steps it overlapped (save_s laid over the following step times)."""

EPILOG = """\
exit codes: 0 report written; 1 the plot could not be drawn (Pillow missing; use --no-plot);
2 bad usage, a path that does not exist, or a directory without an ftrain run's TensorBoard events."""


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


def summarize(scalars: dict[str, dict[int, float]], run_dir: str = "") -> dict[str, Any]:
    """The whole report as plain data (what ``--json`` prints)."""
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
    if report.get("plot"):
        rows.append(("plot", report["plot"]))
    lines = [f"checkpoint overhead of {report['run_dir']}"]
    lines += [f"  {label:<18} {value}" for label, value in rows]
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


def nice_ticks(high: float, count: int = 6, integer: bool = False) -> list[float]:
    """Round tick values from 0 up to at least ``high`` (steps of 1, 2 or 5 times a power of ten)."""
    raw = max(high, 1e-12) / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)
    if integer:
        step = max(1, round(step))
    return [i * step for i in range(math.ceil(high / step - 1e-9) + 1)]


STEP_COLOR = (31, 90, 180)
BLOCKING_COLOR = (210, 30, 30)
FAILED_COLOR = (0, 0, 0)
BAND_COLOR = (255, 150, 0, 70)  # translucent; over white it looks like BAND_SWATCH
BAND_SWATCH = (255, 215, 165)
RESUME_COLOR = (40, 150, 60)


def _font(size: int) -> Any:
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)  # a scalable font (Pillow >= 10.1 with FreeType)
    except (TypeError, AttributeError, OSError):
        return ImageFont.load_default()  # Pillow's small bitmap font


def _text(draw: Any, xy: tuple[float, float], text: str, font: Any, anchor: str = "lt", fill: Any = "black") -> None:
    """Text placed by a two-letter anchor (l/m/r, t/m), computed here so that bitmap fonts work too."""
    box = draw.textbbox((0, 0), text, font=font)
    width, height = box[2] - box[0], box[3] - box[1]
    x = xy[0] - {"l": 0, "m": width / 2, "r": width}[anchor[0]] - box[0]
    y = xy[1] - {"t": 0, "m": height / 2, "b": height}[anchor[1]] - box[1]
    draw.text((x, y), text, fill=fill, font=font)


class _Frame:
    """The plot area: data coordinates (step, seconds) to pixels."""

    def __init__(self, x_range: tuple[float, float], y_top: float, box: tuple[int, int, int, int]) -> None:
        self.x_low, self.x_high = x_range
        self.y_top = y_top
        self.left, self.top, self.right, self.bottom = box

    def px(self, x: float) -> float:
        return self.left + (x - self.x_low) / max(self.x_high - self.x_low, 1e-12) * (self.right - self.left)

    def py(self, y: float) -> float:
        return self.bottom - min(max(y, 0.0), self.y_top) / self.y_top * (self.bottom - self.top)


def _y_top(step_times: list[float], blocking: list[float]) -> float:
    """Top of the y-axis: everything, unless a few step times (e.g. the first, warm-up) dwarf the rest."""
    cap = max(3 * percentile(step_times, 95), *blocking, 0.0)
    return min(max(step_times + blocking), cap) * 1.05 if cap > 0 else 1.0


def _axes(draw: Any, frame: _Frame, x_ticks: list[float], y_ticks: list[float], font: Any) -> None:
    for tick in y_ticks:
        draw.line([frame.left, frame.py(tick), frame.right, frame.py(tick)], fill=(225, 225, 225))
        _text(draw, (frame.left - 8, frame.py(tick)), f"{tick:g}", font, "rm")
    for tick in x_ticks:
        draw.line([frame.px(tick), frame.bottom, frame.px(tick), frame.bottom + 5], fill="black")
        _text(draw, (frame.px(tick), frame.bottom + 8), f"{tick:g}", font, "mt")
    draw.rectangle([frame.left, frame.top, frame.right, frame.bottom], outline="black")


def _bands(image: Any, frame: _Frame, spans: list[tuple[int, float]]) -> None:
    from PIL import Image, ImageDraw

    overlay = Image.new("RGBA", image.size, (0, 0, 0, 0))
    shade = ImageDraw.Draw(overlay)
    for step, end in spans:
        x0 = frame.px(step)
        shade.rectangle([x0, frame.top, max(frame.px(end), x0 + 2), frame.bottom], fill=BAND_COLOR)
    image.paste(overlay, (0, 0), overlay)


def _step_curve(draw: Any, frame: _Frame, step_times: dict[int, float], font: Any) -> None:
    ordered = sorted(step_times.items())
    points = [(frame.px(step), frame.py(value)) for step, value in ordered]
    if len(points) > 1:
        draw.line(points, fill=STEP_COLOR, width=2, joint="curve")
    for (x, y), (_, value) in zip(points, ordered, strict=True):
        if len(points) <= 150:
            draw.ellipse([x - 2.5, y - 2.5, x + 2.5, y + 2.5], fill=STEP_COLOR)
        if value > frame.y_top:  # clipped: say how high it was
            _text(draw, (x + 4, frame.top + 3), f"{value:.3g} s", font, "lt", fill=STEP_COLOR)


def _checkpoints(draw: Any, frame: _Frame, scalars: dict[str, dict[int, float]]) -> None:
    blocking, committed = scalars.get(BLOCKING, {}), scalars.get(SAVE, {})
    for step in scalars.get(LOAD, {}):
        draw.line([frame.px(step), frame.top, frame.px(step), frame.bottom], fill=RESUME_COLOR, width=2)
    for step in blocking:
        draw.line([frame.px(step), frame.top, frame.px(step), frame.bottom], fill=(150, 150, 150))
    half = max(2.0, 0.25 * (frame.px(1) - frame.px(0)))
    for step, value in blocking.items():
        color = BLOCKING_COLOR if step in committed else FAILED_COLOR
        draw.rectangle([frame.px(step) - half, frame.py(value), frame.px(step) + half, frame.bottom], fill=color)


def _legend(draw: Any, origin: tuple[float, float], scalars: dict[str, dict[int, float]], font: Any) -> None:
    entries = [
        ("line", STEP_COLOR, "step time (train/step_time_s)"),
        ("bar", BLOCKING_COLOR, "blocking: loop stopped for the checkpoint at this step (checkpoint/blocking_s)"),
        ("band", BAND_SWATCH, "background save, laid over the steps it overlapped (checkpoint/save_s)"),
    ]
    if set(scalars.get(BLOCKING, {})) - set(scalars.get(SAVE, {})):
        entries.append(("bar", FAILED_COLOR, "failed save (its blocking time)"))
    if scalars.get(LOAD):
        entries.append(("line", RESUME_COLOR, "resumed from a checkpoint (checkpoint/load_s)"))
    x, y = origin
    for index, (kind, color, text) in enumerate(entries):
        ey = y + index * 22
        if kind == "line":
            draw.line([x, ey + 8, x + 26, ey + 8], fill=color, width=3)
        elif kind == "bar":
            draw.rectangle([x + 9, ey, x + 17, ey + 16], fill=color)
        else:
            draw.rectangle([x, ey, x + 26, ey + 16], fill=color)
        _text(draw, (x + 36, ey + 8), text, font, "lm")


def _vertical_text(image: Any, text: str, center: tuple[float, float], font: Any) -> None:
    from PIL import Image, ImageDraw

    box = ImageDraw.Draw(image).textbbox((0, 0), text, font=font)
    label = Image.new("RGBA", (box[2] + 4, box[3] + 4), (255, 255, 255, 0))
    ImageDraw.Draw(label).text((2, 2), text, fill="black", font=font)
    label = label.rotate(90, expand=True)
    image.paste(label, (int(center[0] - label.width / 2), int(center[1] - label.height / 2)), label)


def _subtitle(report: dict[str, Any]) -> str:
    count = report["checkpoints"]["count"]
    if not count:
        return "no checkpoints reported"
    return (f"{count} checkpoints, blocking median {_time(report['blocking_s']['median'])}, "
            f"loop time lost {report['lost_share']:.2%}")


def render_plot(scalars: dict[str, dict[int, float]], report: dict[str, Any], path: Path) -> None:
    """Draw step time over steps with every checkpoint marked and save it as a PNG."""
    from PIL import Image, ImageDraw

    step_times, blocking = scalars[STEP_TIME], scalars.get(BLOCKING, {})
    spans = background_spans(scalars)
    x_low = min(step_times) - 1
    x_data = max([max(step_times), *(end for _, end in spans), *blocking])
    x_high = x_data + max(0.5, 0.01 * (x_data - x_low))  # room for the last bar
    x_ticks = [tick for tick in nice_ticks(x_data, integer=True) if x_low <= tick <= x_high]
    y_ticks = nice_ticks(_y_top(list(step_times.values()), list(blocking.values())))
    legend_rows = 3 + bool(set(blocking) - set(scalars.get(SAVE, {}))) + bool(scalars.get(LOAD))
    width, height = 1200, 560 + 22 * legend_rows
    frame = _Frame((x_low, x_high), y_ticks[-1], (90, 80, width - 30, height - 70 - 22 * legend_rows))

    image = Image.new("RGB", (width, height), "white")
    _bands(image, frame, spans)  # first: everything else is drawn over them
    draw = ImageDraw.Draw(image)
    small, normal, large = _font(13), _font(15), _font(20)
    _axes(draw, frame, x_ticks, y_ticks, small)
    _checkpoints(draw, frame, scalars)
    _step_curve(draw, frame, step_times, small)

    _text(draw, (frame.left, 18), f"Checkpoint overhead: {report['run_dir']}", large)
    _text(draw, (frame.left, 48), _subtitle(report), normal, fill=(70, 70, 70))
    _text(draw, ((frame.left + frame.right) / 2, frame.bottom + 30), "step", normal, "mt")
    _vertical_text(image, "seconds", (30, (frame.top + frame.bottom) / 2), normal)
    _legend(draw, (frame.left, frame.bottom + 62), scalars, normal)
    image.save(path, format="PNG")


# ------------------------------------------------------------------------------------------------- CLI
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="overhead_report.py",
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
    return directory.parent if directory.name == "tb" else directory


def fail(message: str, code: int) -> int:
    print(f"overhead_report.py: error: {message}", file=sys.stderr)
    return code


def pillow_missing() -> bool:
    try:
        import PIL.ImageDraw  # noqa: F401
    except ImportError:
        return True
    return False


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.run_dir:
        return fail("RUN_DIR is empty", EXIT_USAGE)
    if not args.no_plot and pillow_missing():
        return fail("the plot needs Pillow (pip install pillow); or pass --no-plot", EXIT_ERROR)
    try:
        scalars = read_run_scalars(args.run_dir)
        run_dir = run_root(args.run_dir)
    except (FileNotFoundError, NotADirectoryError, NotARunError) as exc:
        return fail(str(exc), EXIT_USAGE)
    report = summarize(scalars, str(run_dir))
    report["plot"] = None
    if not args.no_plot:
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
