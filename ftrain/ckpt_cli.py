"""``ftrain-ckpt`` (also ``tools/ckpt.py``): list, show, verify, convert and prune checkpoints.

    ftrain-ckpt list RUN_DIR [--json] [--verify]
    ftrain-ckpt show CHECKPOINT [--json]
    ftrain-ckpt verify CHECKPOINT [--sizes-only]
    ftrain-ckpt convert CHECKPOINT OUT [--model-only] [--format torch|safetensors]
    ftrain-ckpt prune RUN_DIR --keep-last N [--keep-every K] [--dry-run]

Exit codes: 0 ok; 1 the checkpoint is damaged (verify) or an operation failed; 2 bad usage or a path that is
not what the command needs. Errors are one line on stderr.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from ftrain.checkpoint import integrity, layout
from ftrain.checkpoint.lock import LOCK_NAME
from ftrain.checkpoint.reader import read_state
from ftrain.checkpoint.safe_load import read_metadata_safely


class UsageError(Exception):
    """Bad path or argument: exit code 2."""


# ------------------------------------------------------------------------------------------- helpers
def checkpoints_root(run_dir: Path) -> Path:
    """Accept a run directory or its ``checkpoints/`` folder."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UsageError(f"{run_dir}: no such directory")
    if (run_dir / "checkpoints").is_dir():
        return run_dir / "checkpoints"
    if layout.scan(run_dir) or run_dir.name == "checkpoints":
        return run_dir
    raise UsageError(f"{run_dir}: not an ftrain run directory (no checkpoints/ inside)")


def checkpoint_dir(path: Path) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise UsageError(f"{path}: no such directory")
    if not (path / ".metadata").is_file() and not (path / layout.MARKER).is_file():
        raise UsageError(f"{path}: not a checkpoint directory (neither {layout.MARKER} nor DCP .metadata inside)")
    return path


def human_bytes(size: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if size < 1000 or unit == "TB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{int(size)} B"
        size /= 1000
    return f"{size:.1f} TB"


def status_of(step_dir: layout.StepDir, checksums: bool) -> tuple[str, dict[str, Any] | None, list[str]]:
    if not step_dir.complete:
        return "incomplete", None, []
    problems = integrity.verify(step_dir.path, checksums=checksums)
    try:
        marker = layout.read_marker(step_dir.path)
    except ValueError:
        marker = None
    return ("damaged" if problems else "complete"), marker, problems


# ------------------------------------------------------------------------------------------ commands
def cmd_list(args: argparse.Namespace) -> int:
    root = checkpoints_root(args.run_dir)
    rows = []
    for step_dir in layout.scan(root):
        status, marker, problems = status_of(step_dir, checksums=args.verify)
        size = marker["total_bytes"] if marker else sum(p.stat().st_size for p in step_dir.path.iterdir() if p.is_file())
        rows.append(
            {
                "step": step_dir.step,
                "path": str(step_dir.path),
                "status": status,
                "bytes": size,
                "committed_at": marker.get("committed_at") if marker else None,
                "world_size": marker.get("world_size") if marker else None,
                "problems": problems,
            }
        )
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    if not rows:
        print(f"no checkpoints under {root}")
        return 0
    print(f"{'step':>8}  {'status':<10}  {'size':>9}  {'committed':<19}  {'ranks':>5}  path")
    for row in rows:
        when = (
            datetime.datetime.fromtimestamp(row["committed_at"]).strftime("%Y-%m-%d %H:%M:%S")
            if row["committed_at"]
            else "-"
        )
        ranks = row["world_size"] if row["world_size"] is not None else "-"
        print(f"{row['step']:>8}  {row['status']:<10}  {human_bytes(row['bytes']):>9}  {when:<19}  {ranks:>5}  {row['path']}")
        for problem in row["problems"]:
            print(f"{'':>10}! {problem}")
    return 0


GROUPS = (("app.model.", "model"), ("app.optim.", "optimizer"), ("train.data.", "data"), ("train.rng.", "rng"), ("train.", "progress"))


def group_of(key: str) -> str:
    return next((name for prefix, name in GROUPS if key.startswith(prefix)), "other")


def describe_metadata(path: Path) -> dict[str, Any]:
    """Keys by group with shapes, dtypes and bytes, read from DCP's metadata without loading any tensor."""
    with open(path / ".metadata", "rb") as stream:
        metadata = read_metadata_safely(stream)
    stored = defaultdict(int)
    for index, info in (metadata.storage_data or {}).items():
        stored[index.fqn] += getattr(info, "length", 0)
    groups: dict[str, dict[str, Any]] = {}
    for key, entry in sorted(metadata.state_dict_metadata.items()):
        group = groups.setdefault(group_of(key), {"entries": [], "bytes": 0})
        if hasattr(entry, "size") and hasattr(entry, "properties"):
            shape = list(entry.size)
            dtype = str(entry.properties.dtype).replace("torch.", "")
            nbytes = int(torch.Size(entry.size).numel()) * torch.empty((), dtype=entry.properties.dtype).element_size()
        else:
            shape, dtype, nbytes = None, "object", stored[key]
        group["entries"].append({"key": key, "shape": shape, "dtype": dtype, "bytes": nbytes})
        group["bytes"] += nbytes
    return groups


def cmd_show(args: argparse.Namespace) -> int:
    path = checkpoint_dir(args.checkpoint)
    groups = describe_metadata(path)
    marker = None
    if (path / layout.MARKER).is_file():
        marker = layout.read_marker(path)
    if args.json:
        print(json.dumps({"path": str(path), "marker": marker, "groups": groups}, indent=1))
        return 0
    if marker:
        print(
            f"{path}: step {marker['step']}, {marker['world_size']} rank(s), {human_bytes(marker['total_bytes'])} "
            f"in {len(marker['files'])} files, model {marker.get('model')}"
        )
    else:
        print(f"{path}: no commit marker (incomplete)")
    for name, group in groups.items():
        print(f"\n{name}: {len(group['entries'])} entries, {human_bytes(group['bytes'])}")
        for entry in group["entries"][: args.limit]:
            shape = "x".join(map(str, entry["shape"])) if entry["shape"] is not None else "-"
            print(f"  {entry['key']:<56} {entry['dtype']:<9} {shape:<14} {human_bytes(entry['bytes']):>9}")
        if len(group["entries"]) > args.limit:
            print(f"  ... {len(group['entries']) - args.limit} more (--limit to see them)")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    path = checkpoint_dir(args.checkpoint)
    problems = integrity.verify(path, checksums=not args.sizes_only)
    if problems:
        for problem in problems:
            print(f"DAMAGED {path}: {problem}")
        return 1
    marker = layout.read_marker(path)
    what = "sizes" if args.sizes_only else "sizes and checksums"
    print(f"OK {path}: {len(marker['files'])} files, {human_bytes(marker['total_bytes'])}, {what} match")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    path = checkpoint_dir(args.checkpoint)
    problems = integrity.verify(path, checksums=True)
    if problems:
        raise UsageError(f"{path} is damaged, not converting: {problems[0]}")
    state = read_state(path)
    if args.model_only or args.format == "safetensors":
        state = state.get("app", {}).get("model")
        if state is None:
            raise UsageError(f"{path}: holds no app.model entries (not an ftrain training checkpoint)")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.format == "safetensors":
        try:
            from safetensors.torch import save_file
        except ImportError:
            raise UsageError("--format safetensors needs the safetensors package: pip install safetensors") from None
        save_file({k: v.contiguous() for k, v in state.items()}, str(out))
    else:
        torch.save(state, out)
    print(f"wrote {out} ({human_bytes(out.stat().st_size)})")
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    root = checkpoints_root(args.run_dir)
    lock = root.parent / LOCK_NAME
    if lock.is_file():
        print(f"note: {lock} exists; a job may be writing here (prune spares the newest and in-flight ones)", file=sys.stderr)
    doomed = layout.plan_purge(root, args.keep_last, args.keep_every)
    for path in doomed:
        print(f"{'would remove' if args.dry_run else 'removing'} {path}")
        if not args.dry_run:
            layout.remove_dir(path)
    if not doomed:
        print("nothing to prune")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ftrain-ckpt",
        description="Inspect and manage ftrain checkpoints (step_*/ directories with a COMPLETE marker).",
        epilog="Exit codes: 0 ok, 1 damaged or failed, 2 bad usage or path.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("list", help="every step directory: complete / incomplete / damaged, size, time, ranks")
    p.add_argument("run_dir", type=Path, help="a run directory (or its checkpoints/ folder)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--verify", action="store_true", help="check checksums too (default: sizes only)")
    p.set_defaults(func=cmd_list)
    p = sub.add_parser("show", help="what a checkpoint holds, from DCP's metadata, without loading tensors")
    p.add_argument("checkpoint", type=Path, help="a step directory")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--limit", type=int, default=12, help="entries shown per group (default 12)")
    p.set_defaults(func=cmd_show)
    p = sub.add_parser("verify", help="check every file against the sizes and checksums in the marker")
    p.add_argument("checkpoint", type=Path, help="a step directory")
    p.add_argument("--sizes-only", action="store_true", help="skip checksums")
    p.set_defaults(func=cmd_verify)
    p = sub.add_parser("convert", help="to one torch.save file, or the model's weights to safetensors")
    p.add_argument("checkpoint", type=Path, help="a step directory")
    p.add_argument("out", type=Path, help="output file")
    p.add_argument("--model-only", action="store_true", help="only the model's weights")
    p.add_argument("--format", choices=("torch", "safetensors"), default="torch", help="output format (default torch)")
    p.set_defaults(func=cmd_convert)
    p = sub.add_parser("prune", help="delete old checkpoints by the trainer's retention rules")
    p.add_argument("run_dir", type=Path, help="a run directory (or its checkpoints/ folder)")
    p.add_argument("--keep-last", type=int, required=True, help="complete checkpoints to keep (>= 1)")
    p.add_argument("--keep-every", type=int, default=0, help="also keep every K-th step (0 = none)")
    p.add_argument("--dry-run", action="store_true", help="only say what would be removed")
    p.set_defaults(func=cmd_prune)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "keep_last", 1) < 1:
        parser.error("--keep-last must be at least 1 (the newest checkpoint is never removed)")
    try:
        return args.func(args)
    except UsageError as exc:
        print(f"ftrain-ckpt: error: {exc}", file=sys.stderr)
        return 2
    except (ValueError, OSError) as exc:
        print(f"ftrain-ckpt: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
