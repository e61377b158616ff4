"""``ftrain-ckpt`` (also ``tools/ckpt.py``): list, show, verify, convert and prune checkpoints.

    ftrain-ckpt list RUN_DIR [--json] [--verify]
    ftrain-ckpt show CHECKPOINT|RUN_DIR [--json]
    ftrain-ckpt verify CHECKPOINT|RUN_DIR [--sizes-only] [--values]
    ftrain-ckpt convert CHECKPOINT|RUN_DIR OUT [--model-only] [--format torch|safetensors] [--dtype D] [--overwrite]
    ftrain-ckpt prune RUN_DIR --keep-last N [--keep-every K] [--dry-run] [--force]

``convert --format safetensors`` writes the model's weights through ``ftrain.checkpoint.export``: an OUT ending in
``.safetensors`` is one file, any other OUT a directory in Hugging Face's layout (shards and index above 5 GB).
An existing OUT is replaced only with ``--overwrite``, and only if it is an earlier output of the same kind (a
torch.save file, a safetensors file, an export directory holding nothing but an export's files) that lies in no
checkpoint and no run directory; anything else is refused in one line and left as it was.

A run directory (or its ``checkpoints/`` folder) given where a checkpoint is expected means its latest complete
checkpoint; the one picked is named on stderr. Exit codes: 0 ok; 1 the checkpoint is damaged or an operation
failed or was refused; 2 bad usage or a path that is not what the command needs. Errors are one line on stderr.
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

from ftrain.checkpoint import integrity, keys, layout
from ftrain.checkpoint.errors import describe_error
from ftrain.checkpoint.lock import LOCK_NAME, live_holder
from ftrain.checkpoint.run_dir import CHECKPOINTS_DIR
from ftrain.checkpoint.reader import flatten, read_state, select, read_tensors
from ftrain.checkpoint.safe_load import read_metadata_safely
from ftrain.checkpoint.storage import CheckpointDir, Storage, StorageError, checkpoint_at, is_url, open_storage
from ftrain.ckpt_output import is_checkpoint, output_problem, write_atomically


class UsageError(Exception):
    """Bad path or argument: exit code 2."""


class DamagedError(Exception):
    """The checkpoint is damaged, or an operation on it failed or was refused: exit code 1."""


# ------------------------------------------------------------------------------------------- helpers
def location(text: str) -> Path | str:
    """A command-line location: a URL as is (``s3://bucket/prefix``), anything else a path."""
    return text if is_url(text) else Path(text)


def stored(url: str) -> Storage:
    try:
        return open_storage(url)
    except (StorageError, ImportError) as exc:
        raise UsageError(str(exc)) from None


def checkpoints_root(run_dir: Path | str) -> Storage:
    """Accept a run directory or its ``checkpoints/`` folder, or a checkpoint dir in object storage."""
    if is_url(run_dir):
        storage = stored(str(run_dir))
        if not storage.is_dir():
            raise UsageError(f"{run_dir}: nothing stored there")
        return storage
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UsageError(f"{run_dir}: no such directory")
    if (run_dir / CHECKPOINTS_DIR).is_dir():
        return open_storage(run_dir / CHECKPOINTS_DIR)
    if layout.scan(run_dir) or run_dir.name == CHECKPOINTS_DIR:
        return open_storage(run_dir)
    raise UsageError(f"{run_dir}: not an ftrain run directory (no checkpoints/ inside)")


def checkpoint_dir(path: Path | str) -> CheckpointDir:
    """A checkpoint directory; a run directory (or its ``checkpoints/``, or a checkpoint dir in object storage)
    means its latest complete checkpoint."""
    if is_url(path):
        try:
            checkpoint = checkpoint_at(str(path))
        except StorageError as exc:
            raise UsageError(str(exc)) from None
        if layout.has_marker(checkpoint) or checkpoint.storage.exists(checkpoint.file(layout.DCP_METADATA)):
            return checkpoint
        return latest_of(checkpoints_root(path), path)
    path = Path(path)
    if not path.is_dir():
        raise UsageError(f"{path}: no such directory")
    if is_checkpoint(path):
        return checkpoint_at(path)
    if not ((path / CHECKPOINTS_DIR).is_dir() or layout.scan(path) or path.name == CHECKPOINTS_DIR):
        raise UsageError(
            f"{path}: neither a checkpoint (no {layout.MARKER} or DCP {layout.DCP_METADATA} inside) nor a run directory"
        )
    return latest_of(checkpoints_root(path), path)


def latest_of(root: Storage, given: Path | str) -> CheckpointDir:
    latest = layout.latest_complete(root)
    if latest is None:
        raise UsageError(f"{given}: no complete checkpoint under {root.describe()}")
    print(f"ftrain-ckpt: {given}: using its latest complete checkpoint, {latest.dir}", file=sys.stderr)
    return latest.dir


def read_marker(path: CheckpointDir) -> dict[str, Any]:
    """The checkpoint's marker; a missing, malformed or too new marker is ``DamagedError`` (exit 1)."""
    try:
        return layout.read_marker(path)
    except layout.NewerFormatError as exc:
        raise DamagedError(str(exc)) from None
    except ValueError as exc:
        raise DamagedError(f"{path} is damaged: {exc}") from None


def human_bytes(size: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if size < 1000 or unit == "TB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{int(size)} B"
        size /= 1000
    return f"{size:.1f} TB"


def when(timestamp: Any) -> str:
    try:
        return datetime.datetime.fromtimestamp(timestamp).strftime("%Y-%m-%d %H:%M:%S")
    except (TypeError, ValueError, OverflowError, OSError):
        return "-"


def disk_bytes(path: Path | CheckpointDir) -> int:
    checkpoint = checkpoint_at(path)
    return sum(info.size for info in checkpoint.storage.files(checkpoint.name))


# ------------------------------------------------------------------------------------------ commands
def cmd_list(args: argparse.Namespace) -> int:
    root = checkpoints_root(args.run_dir)
    rows = []
    for step_dir in layout.scan(root):
        status, marker, problems = integrity.status(step_dir, checksums=args.verify)
        rows.append(
            {
                "step": step_dir.step,
                "path": str(step_dir.dir),
                "status": status,
                "bytes": marker["total_bytes"] if marker else disk_bytes(step_dir.dir),
                "committed_at": marker["committed_at"] if marker else None,
                "world_size": marker["world_size"] if marker else None,
                "problems": problems,
            }
        )
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    if not rows:
        print(f"no checkpoints under {root.describe()}")
        return 0
    print(f"{'step':>8}  {'status':<11}  {'size':>9}  {'committed':<19}  {'ranks':>5}  path")
    for row in rows:
        ranks = row["world_size"] if row["world_size"] is not None else "-"
        print(
            f"{row['step']:>8}  {row['status']:<11}  {human_bytes(row['bytes']):>9}  {when(row['committed_at']):<19}  "
            f"{ranks:>5}  {row['path']}"
        )
        for problem in row["problems"]:
            print(f"{'':>10}! {problem}")
    return 0


def groups_for(marker: dict[str, Any] | None) -> list[tuple[str, str]]:
    """(key prefix, group) pairs, longest prefix first, from the marker's state keys (without a marker:
    today's names and the legacy ones)."""
    naming = [keys.state_keys(marker)] if marker else [keys.DEFAULT_STATE_KEYS, keys.LEGACY_STATE_KEYS]
    pairs = set()
    for names in naming:
        progress = names[keys.PROGRESS]
        pairs |= {
            (names[keys.MODEL] + ".", "model"),
            (names[keys.OPTIMIZER] + ".", "optimizer"),
            (progress + ".data.", "data"),
            (progress + ".rng.", "rng"),
            (progress + ".", "progress"),
        }
    return sorted(pairs, key=lambda pair: (-len(pair[0]), pair[0]))


def group_of(key: str, groups: list[tuple[str, str]]) -> str:
    """The group of a key: by the marker's roles, else the key's first component (a user's extra state)."""
    return next((name for prefix, name in groups if key.startswith(prefix)), key.split(".", 1)[0])


def describe_metadata(path: CheckpointDir, marker: dict[str, Any] | None) -> dict[str, Any]:
    """Keys by group with shapes, dtypes and bytes, read from DCP's metadata without loading any tensor.
    The metadata is checked first (``integrity.check_metadata``): damage is ``DamagedError``."""
    with path.storage.open_read(path.file(layout.DCP_METADATA)) as stream:
        metadata = read_metadata_safely(stream)
    sizes = (
        {entry["name"]: entry["size"] for entry in marker["files"]}
        if marker
        else {info.name: info.size for info in path.storage.files(path.name)}
    )
    problems = integrity.check_metadata(metadata, sizes)
    if problems:
        raise DamagedError(f"{path} is damaged: {'; '.join(problems)}")
    stored: dict[str, int] = defaultdict(int)
    for index, info in metadata.storage_data.items():
        stored[index.fqn] += info.length
    prefixes = groups_for(marker)
    groups: dict[str, dict[str, Any]] = {}
    for key, entry in sorted(metadata.state_dict_metadata.items()):
        group = groups.setdefault(group_of(key, prefixes), {"entries": [], "bytes": 0})
        if hasattr(entry, "size") and hasattr(entry, "properties"):
            shape = list(entry.size)
            dtype = str(entry.properties.dtype).replace("torch.", "")
            nbytes = torch.Size(entry.size).numel() * entry.properties.dtype.itemsize
        else:
            shape, dtype, nbytes = None, "object", stored[key]
        group["entries"].append({"key": key, "shape": shape, "dtype": dtype, "bytes": nbytes})
        group["bytes"] += nbytes
    return groups


def cmd_show(args: argparse.Namespace) -> int:
    path = checkpoint_dir(args.checkpoint)
    marker = read_marker(path) if layout.has_marker(path) else None
    if not path.storage.exists(path.file(layout.DCP_METADATA)):
        raise DamagedError(f"{path} is damaged: no DCP {layout.DCP_METADATA}")
    groups = describe_metadata(path, marker)
    if args.json:
        state_keys = keys.state_keys(marker) if marker else None
        print(json.dumps({"path": str(path), "marker": marker, "state_keys": state_keys, "groups": groups}, indent=1))
        return 0
    if marker:
        print(
            f"{path}: step {marker['step']}, {marker['world_size']} rank(s), {human_bytes(marker['total_bytes'])} "
            f"in {len(marker['files'])} files, model {marker.get('model')}"
        )
        print("state keys: " + ", ".join(f"{role} = {prefix}" for role, prefix in keys.state_keys(marker).items()))
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
    try:
        layout.read_marker(path)
    except layout.NewerFormatError as exc:
        print(f"UNSUPPORTED {path}: {exc}")
        return 1
    except ValueError:
        pass  # integrity.verify reports it
    problems = integrity.verify(path, checksums=not args.sizes_only)
    if problems:
        for problem in problems:
            print(f"DAMAGED {path}: {problem}")
        return 1
    if args.values:
        nonfinite = nonfinite_tensors(path)
        if nonfinite:
            shown = ", ".join(nonfinite[:5]) + (f" and {len(nonfinite) - 5} more" if len(nonfinite) > 5 else "")
            print(f"NONFINITE {path}: NaN or Inf in {len(nonfinite)} tensor(s): {shown}")
            return 1
    marker = layout.read_marker(path)
    what = ("sizes" if args.sizes_only else "sizes and checksums") + " match" + (", every value finite" if args.values else "")
    print(f"OK {path}: {len(marker['files'])} files, {human_bytes(marker['total_bytes'])}, {what}")
    return 0


def nonfinite_tensors(path: CheckpointDir) -> list[str]:
    """Keys of the floating-point tensors of a checkpoint that hold NaN or Inf (reads every tensor)."""
    return [
        key
        for key, tensor in read_tensors(path).items()
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())
    ]


def check_output(out: Path, overwrite: bool, kind: str = "torch") -> None:
    """Refuse (exit 2) an output path that convert may not write (``ckpt_output.output_problem``)."""
    problem = output_problem(out, overwrite, kind)
    if problem:
        raise UsageError(problem)


def cmd_convert(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if args.format == "safetensors":
        return convert_to_safetensors(args, out)
    if args.dtype:
        raise UsageError("--dtype applies to --format safetensors only")
    check_output(out, args.overwrite)
    path = checkpoint_dir(args.checkpoint)
    marker = read_marker(path)
    problems = integrity.verify(path, checksums=True)
    if problems:
        raise DamagedError(f"{path} is damaged, not converting: {problems[0]}")
    state = read_state(path)
    if args.model_only:
        prefix = keys.state_keys(marker)[keys.MODEL]
        state = select(flatten(state), prefix)
        if not state:
            raise UsageError(f"{path}: holds no model entries under {prefix!r} (the key its marker names)")
    write_atomically(out, lambda tmp: torch.save(state, tmp))
    print(f"wrote {out} ({human_bytes(out.stat().st_size)})")
    return 0


def convert_to_safetensors(args: argparse.Namespace, out: Path) -> int:
    """The model's weights through ``ftrain.checkpoint.export`` (the code the training-time export runs): OUT
    named ``*.safetensors`` is one file; any other OUT is a directory in Hugging Face's layout (sharded above
    5 GB, with ``model.safetensors.index.json``)."""
    from ftrain.checkpoint import export
    from ftrain.checkpoint.errors import CheckpointError

    single = out.name.endswith(".safetensors")
    check_output(out, args.overwrite, "safetensors" if single else "export")
    path = checkpoint_dir(args.checkpoint)
    read_marker(path)  # a missing, malformed or too new marker: exit 1 with its reason
    try:
        dtype = export.parse_dtype(args.dtype or "")
        tensors = export.model_tensors(path)
        if not single:
            export.export_from_checkpoint(path, out, dtype)
            print(f"wrote {out}/ ({human_bytes(disk_bytes(out))})")
            return 0
        save_file = export._save_file()
        ready = export.prepare(tensors, dtype)
        write_atomically(out, lambda tmp: save_file(ready, str(tmp), metadata={"format": "pt"}))
    except CheckpointError as exc:
        raise DamagedError(str(exc)) from None
    print(f"wrote {out} ({human_bytes(out.stat().st_size)})")
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    root = checkpoints_root(args.run_dir)
    if root.is_local:  # a run directory's LOCK says whether a job writes there (object storage: see the README)
        local = root.local_path()
        run_dir = local.parent if local.name == CHECKPOINTS_DIR else local
        holder = live_holder(run_dir)
        if holder and not args.force:
            raise DamagedError(
                f"{run_dir} is in use by {holder}; not pruning while a job may be writing (--force to prune anyway)"
            )
        if holder:
            print(f"note: {run_dir} is in use by {holder}; pruning anyway (--force)", file=sys.stderr)
        elif (run_dir / LOCK_NAME).exists():
            print(f"note: {run_dir / LOCK_NAME} was left by a job that is gone", file=sys.stderr)
    doomed = layout.plan_purge(root, args.keep_last, args.keep_every)
    keep, skipped = integrity.newest_verified(root, checksums=not args.sizes_only)
    if keep is None and skipped:
        if not args.force:
            raise DamagedError(
                f"no checkpoint under {root.describe()} verifies ({skipped[0]}); not pruning (--force to prune anyway)"
            )
        print(f"note: no checkpoint under {root.describe()} verifies; pruning anyway (--force)", file=sys.stderr)
    if keep is not None and (skipped or keep.dir in doomed):
        doomed = [checkpoint for checkpoint in doomed if checkpoint != keep.dir]
        print(f"keeping {keep.dir}: the newest checkpoint that verifies" + (f" ({'; '.join(skipped)})" if skipped else ""))
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
        epilog="Exit codes: 0 ok, 1 damaged, failed or refused, 2 bad usage or path.",
    )
    checkpoint_help = (
        "a step directory, or a run directory (or its checkpoints/, or s3://bucket/prefix): its latest complete checkpoint"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("list", help="every step directory: complete / incomplete / damaged, size, time, ranks")
    p.add_argument("run_dir", type=location, help="a run directory (or its checkpoints/ folder, or s3://bucket/prefix)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--verify", action="store_true", help="check checksums too (default: sizes and metadata only)")
    p.set_defaults(func=cmd_list)
    p = sub.add_parser("show", help="what a checkpoint holds, from DCP's metadata, without loading tensors")
    p.add_argument("checkpoint", type=location, help=checkpoint_help)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--limit", type=int, default=12, help="entries shown per group (default 12)")
    p.set_defaults(func=cmd_show)
    p = sub.add_parser("verify", help="check every file against the marker, and DCP's metadata against the files")
    p.add_argument("checkpoint", type=location, help=checkpoint_help)
    p.add_argument("--sizes-only", action="store_true", help="skip checksums")
    p.add_argument("--values", action="store_true", help="also read every tensor and check it holds no NaN or Inf (slower)")
    p.set_defaults(func=cmd_verify)
    p = sub.add_parser("convert", help="to one torch.save file, or the model's weights to safetensors")
    p.add_argument("checkpoint", type=location, help=checkpoint_help)
    p.add_argument(
        "out", type=Path, help="output file; for --format safetensors without a .safetensors name, a directory"
    )
    p.add_argument("--model-only", action="store_true", help="only the model's weights")
    p.add_argument("--format", choices=("torch", "safetensors"), default="torch", help="output format (default torch)")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an earlier output of convert of the same format (never a checkpoint, a run directory, "
        "anything in one, or a directory holding other files)",
    )
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="safetensors: cast floating-point weights")
    p.set_defaults(func=cmd_convert)
    p = sub.add_parser("prune", help="delete old checkpoints by the trainer's retention rules")
    p.add_argument("run_dir", type=location, help="a run directory (or its checkpoints/ folder, or s3://bucket/prefix)")
    p.add_argument("--keep-last", type=int, required=True, help="complete checkpoints to keep (>= 1)")
    p.add_argument("--keep-every", type=int, default=0, help="also keep every K-th step (0 = none)")
    p.add_argument("--dry-run", action="store_true", help="only say what would be removed")
    p.add_argument("--sizes-only", action="store_true", help="find the newest good checkpoint without checksums")
    p.add_argument("--force", action="store_true", help="prune even while a live job holds the LOCK or nothing verifies")
    p.set_defaults(func=cmd_prune)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "keep_last", 1) < 1:
        parser.error("--keep-last must be at least 1 (the newest checkpoint is never removed)")
    if getattr(args, "keep_every", 0) < 0:
        parser.error("--keep-every must be 0 (none) or a positive step interval")
    try:
        return args.func(args)
    except UsageError as exc:
        print(f"ftrain-ckpt: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ftrain-ckpt: interrupted", file=sys.stderr)
        return 130
    except BaseException as exc:  # noqa: BLE001 - DCP's CheckpointException derives from BaseException
        if isinstance(exc, SystemExit):
            raise
        message = str(exc) if isinstance(exc, (DamagedError, ValueError, OSError)) else describe_error(exc)
        print(f"ftrain-ckpt: error: {' '.join(message.split())}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
