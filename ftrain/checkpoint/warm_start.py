"""Warm start: a new run's model (and optionally optimizer) from weights made elsewhere.

``load_initial(path, model, ...)`` reads, by what it finds at ``path``:
  * an ftrain checkpoint (a step directory with its ``COMPLETE`` marker), or a run directory: its latest
    complete checkpoint. The marker's ``state_keys`` say where the model and the optimizer are.
  * a plain DCP checkpoint (``.metadata``, no marker): the model's keys are found under ``model.``,
    ``app.model.`` or bare, whichever holds most of them.
  * safetensors: a ``.safetensors`` file, a directory in Hugging Face's layout (``model.safetensors``, or shards
    with ``model.safetensors.index.json``, as ``export`` writes), or such an index file.
Every key of the model must be there with its shape, and every model key the source holds must exist in the
model, except keys under an ``exclude`` prefix: those are neither loaded nor required and keep the values the
model was initialised with. Any mismatch is one ``CheckpointError`` line naming the first keys. DCP checkpoints
are read through the safe loader (no code runs from them); safetensors never holds code. ``check_source(path)``
recognises a source without reading a tensor (the recipe's preflight runs it before anything is written).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn as nn
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from ftrain.checkpoint import integrity, keys, layout
from ftrain.checkpoint.errors import CheckpointError, describe_error
from ftrain.checkpoint.run_dir import CHECKPOINTS_DIR
from ftrain.checkpoint.safe_load import SafeFileSystemReader, SafeLoadPlanner, read_metadata_safely
from ftrain.checkpoint.storage import CheckpointDir, checkpoint_at, is_url, open_storage

SAFETENSORS_SINGLE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
DCP_MODEL_PREFIXES = ("model", "app.model", "")  # where a plain DCP checkpoint may keep the model ("" = bare)
DCP_OPTIMIZER_PREFIXES = ("optimizer", "app.optim", "optim")
SHOWN = 3  # keys named per kind of mismatch


@dataclass
class Source:
    """What ``path`` turned out to be."""

    kind: str  # "ftrain checkpoint" | "DCP checkpoint" | "safetensors"
    path: Path | str  # as given (a URL for a checkpoint in object storage)
    marker: dict[str, Any] | None = None
    files: list[Path] = field(default_factory=list)  # safetensors files
    checkpoint: CheckpointDir | None = None  # the DCP kinds: where its files are read from

    def describe(self) -> str:
        step = f" (step {self.marker['step']})" if self.marker else ""
        return f"{self.kind} {self.path}{step}"


def load_initial(
    path: str | Path,
    model: nn.Module,
    *,
    exclude: list[str] | tuple[str, ...] = (),
    model_only: bool = True,
    optimizer: torch.optim.Optimizer | None = None,
    process_group: dist.ProcessGroup | None = None,
) -> str:
    """Load ``model`` (plain, DDP or FSDP2) from ``path`` and return a one-line description of what was loaded.

    ``exclude``: key prefixes to leave at their initial values. ``model_only=False`` also loads ``optimizer``'s
    per-parameter state (moments, step counts) from a checkpoint that has one; its hyperparameters (lr, betas,
    weight decay: the param groups) stay the new run's, and excluded parameters keep a fresh state. Collective
    under a process group: every rank calls it with the same arguments. Errors are one-line ``CheckpointError``s.
    """
    source = find_source(path)
    if not model_only and optimizer is None:
        raise CheckpointError("warm start with the optimizer state (model_only=False) needs the optimizer")
    if not model_only and source.kind == "safetensors":
        raise CheckpointError(
            f"warm start from {source.describe()}: safetensors holds no optimizer state; load the model only"
        )
    prefixes = tuple(p for p in exclude if p)
    state = get_model_state_dict(model)
    wanted = {k: v for k, v in state.items() if not k.startswith(prefixes)}
    left = sorted(set(state) - set(wanted))
    if source.kind == "safetensors":
        _load_safetensors(source, model, wanted, prefixes)
        what = "model"
    else:
        what = _load_dcp(source, model, wanted, prefixes, None if model_only else optimizer, process_group)
    kept = f"; {len(left)} left at their initial values (under {', '.join(prefixes)})" if left else ""
    return f"warm start: {what} from {source.describe()}, {len(wanted)} model tensors{kept}"


# ----------------------------------------------------------------------------------------- finding it
def check_source(path: Path) -> Source:
    """What ``path`` is, checked without reading a tensor: ``find_source``, then the safetensors headers or DCP's
    ``.metadata`` (through the restricted unpickler). Anything ``load_initial`` cannot start from is a one-line
    ``CheckpointError``; the config's preflight calls this before anything is written."""
    source = find_source(path)
    if source.kind == "safetensors":
        safetensors_shapes(source.files)
        return source
    assert source.checkpoint is not None
    try:
        with source.checkpoint.storage.open_read(source.checkpoint.file(layout.DCP_METADATA)) as stream:
            read_metadata_safely(stream)
    except OSError as exc:
        where = f"warm start from {source.describe()}: cannot read its {layout.DCP_METADATA}"
        raise CheckpointError(f"{where}: {exc.strerror or exc}") from None
    except ValueError as exc:  # UnsafeCheckpointError included
        raise CheckpointError(f"warm start from {source.describe()}: {' '.join(str(exc).split())}") from None
    return source


def find_source(path: str | Path) -> Source:
    """Classify ``path``; anything that is none of the supported kinds is a one-line ``CheckpointError``."""
    if is_url(path):
        return _find_stored(str(path))
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(f"warm start from {path}: no such file or directory")
    if path.is_file():
        if path.name.endswith(".safetensors"):
            return Source("safetensors", path, files=[path])
        if path.name.endswith(".index.json"):
            return Source("safetensors", path, files=_indexed_files(path))
        raise CheckpointError(f"warm start from {path}: a file that is neither .safetensors nor a safetensors index")
    if (path / layout.MARKER).is_file():
        try:
            marker = layout.read_marker(path)
        except ValueError as exc:  # NewerFormatError included: its message says which versions this one reads
            raise CheckpointError(f"warm start from {path}: {exc}") from None
        return Source("ftrain checkpoint", path, marker, checkpoint=checkpoint_at(path))
    if (path / SAFETENSORS_INDEX).is_file():
        return Source("safetensors", path, files=_indexed_files(path / SAFETENSORS_INDEX))
    if (path / SAFETENSORS_SINGLE).is_file():
        return Source("safetensors", path, files=[path / SAFETENSORS_SINGLE])
    if (path / layout.DCP_METADATA).is_file():
        return Source("DCP checkpoint", path, checkpoint=checkpoint_at(path))
    root = path / CHECKPOINTS_DIR if (path / CHECKPOINTS_DIR).is_dir() else path
    if layout.scan(root):
        latest = layout.latest_complete(root)
        if latest is None:
            raise CheckpointError(f"warm start from {path}: a run directory with no complete checkpoint under {root}")
        return find_source(latest.path)
    raise CheckpointError(
        f"warm start from {path}: not an ftrain checkpoint or run directory, a DCP checkpoint (.metadata) or "
        f"a safetensors export ({SAFETENSORS_SINGLE} or {SAFETENSORS_INDEX})"
    )


def _find_stored(url: str) -> Source:
    """``find_source`` for a URL: an ftrain or DCP checkpoint in object storage, or a checkpoint dir there
    (its latest complete checkpoint)."""
    try:
        checkpoint = checkpoint_at(url)
        if layout.has_marker(checkpoint):
            return Source("ftrain checkpoint", url, layout.read_marker(checkpoint), checkpoint=checkpoint)
        if checkpoint.storage.exists(checkpoint.file(layout.DCP_METADATA)):
            return Source("DCP checkpoint", url, checkpoint=checkpoint)
        latest = layout.latest_complete(open_storage(url))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"warm start from {url}: {' '.join(str(exc).split())}") from None
    if latest is None:
        raise CheckpointError(f"warm start from {url}: no ftrain or DCP checkpoint there, and no complete step_* under it")
    return Source("ftrain checkpoint", str(latest.dir), layout.read_marker(latest.dir), checkpoint=latest.dir)


def _indexed_files(index: Path) -> list[Path]:
    """The shard files an index names: plain names next to it, each present."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        names = sorted(set(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        why = f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
        raise CheckpointError(f"warm start from {index}: not a safetensors index ({why})") from None
    for name in names:
        if not (isinstance(name, str) and layout.is_plain_name(name)):
            raise CheckpointError(f"warm start from {index}: names {name!r}, not a file next to it")
        if not (index.parent / name).is_file():
            raise CheckpointError(f"warm start from {index}: its shard {name} is missing")
    return [index.parent / name for name in names]


# ------------------------------------------------------------------------------------------- checking
def check_match(
    where: str,
    wanted: dict[str, Any],
    stored: dict[str, tuple[int, ...] | None],
    prefixes: tuple[str, ...],
    extra_ok: bool = False,
) -> None:
    """``stored``: the source's model keys with their shapes (``None``: not a tensor). A missing key, a key the
    model lacks (unless ``extra_ok``) or another shape is one ``CheckpointError`` line naming the first few."""
    missing = [k for k in wanted if k not in stored]
    unexpected = [] if extra_ok else [k for k in stored if k not in wanted and not k.startswith(prefixes)]
    shapes = [
        f"{k} {_shape(stored[k])} in the source, {_shape(tuple(v.shape))} in the model"
        for k, v in wanted.items()
        if k in stored and stored[k] != tuple(v.shape)
    ]
    problems = [
        _listed("missing from the source", missing),
        _listed("not in the model", unexpected),
        _listed("of another shape", shapes),
    ]
    problems = [p for p in problems if p]
    if problems:
        hint = " (checkpoint.exclude_from_loading leaves keys by prefix at their initial values)"
        raise CheckpointError(f"warm start from {where}: the model does not match it: {'; '.join(problems)}{hint}")


def _listed(what: str, items: list[str]) -> str:
    if not items:
        return ""
    more = f" and {len(items) - SHOWN} more" if len(items) > SHOWN else ""
    return f"{len(items)} key(s) {what}: {', '.join(items[:SHOWN])}{more}"


def _shape(shape: tuple[int, ...] | None) -> str:
    return "(not a tensor)" if shape is None else "[" + ", ".join(map(str, shape)) + "]"


# ---------------------------------------------------------------------------------------- safetensors
def safetensors_shapes(files: list[Path]) -> dict[str, tuple[tuple[int, ...], Path]]:
    """Every tensor's shape and file, from the headers only."""
    safe_open = _safe_open()
    found: dict[str, tuple[tuple[int, ...], Path]] = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as handle:
                for key in handle.keys():
                    found[key] = (tuple(handle.get_slice(key).get_shape()), file)
        except Exception as exc:  # safetensors raises its own SafetensorError for a bad header
            why = f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
            raise CheckpointError(f"warm start from {file}: not a readable safetensors file ({why})") from None
    return found


def read_safetensors(path: Path, names: list[str] | None = None) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, index or export directory (all of them, or ``names``)."""
    source = find_source(Path(path))
    if source.kind != "safetensors":
        raise CheckpointError(f"{path} is a {source.kind}, not safetensors")
    where = safetensors_shapes(source.files)
    safe_open = _safe_open()
    tensors: dict[str, torch.Tensor] = {}
    by_file: dict[Path, list[str]] = {}
    for name in names if names is not None else list(where):
        by_file.setdefault(where[name][1], []).append(name)
    for file, members in by_file.items():
        with safe_open(str(file), framework="pt") as handle:
            for name in members:
                tensors[name] = handle.get_tensor(name)
    return tensors


def _load_safetensors(source: Source, model: nn.Module, wanted: dict[str, Any], prefixes: tuple[str, ...]) -> None:
    shapes = safetensors_shapes(source.files)
    check_match(str(source.path), wanted, {k: shape for k, (shape, _) in shapes.items()}, prefixes)
    tensors = read_safetensors(source.path, list(wanted))
    full = {k: tensors[k].to(wanted[k].dtype) for k in wanted}
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, strict=False))


def _safe_open() -> Any:
    try:
        from safetensors import safe_open
    except ImportError:
        raise CheckpointError("warm start from safetensors needs the safetensors package (pip install safetensors)") from None
    return safe_open


# ------------------------------------------------------------------------------------------------ DCP
def _load_dcp(
    source: Source,
    model: nn.Module,
    wanted: dict[str, Any],
    prefixes: tuple[str, ...],
    optimizer: torch.optim.Optimizer | None,
    process_group: dist.ProcessGroup | None,
) -> str:
    """Load the model (and the optimizer, if given) from a DCP checkpoint; returns what was loaded."""
    where = str(source.path)
    checkpoint = source.checkpoint
    assert checkpoint is not None
    _check_files(source)
    with checkpoint.storage.open_read(checkpoint.file(layout.DCP_METADATA)) as stream:
        metadata = read_metadata_safely(stream)
    entries = metadata.state_dict_metadata
    if source.marker is not None:
        roles = keys.state_keys(source.marker)
        model_prefix, optim_prefixes = roles[keys.MODEL], (roles[keys.OPTIMIZER],)
    else:
        model_prefix, optim_prefixes = _detect_prefix(where, wanted, entries), DCP_OPTIMIZER_PREFIXES
    start = f"{model_prefix}." if model_prefix else ""
    stored = {
        key[len(start):]: tuple(entry.size) if isinstance(entry, TensorStorageMetadata) else None
        for key, entry in entries.items()
        if key.startswith(start)
    }
    check_match(where, wanted, stored, prefixes, extra_ok=not model_prefix)
    target: dict[str, Any] = {model_prefix: dict(wanted)} if model_prefix else dict(wanted)
    what = "model"
    optim_state = None
    if optimizer is not None:
        optim_prefix = next((p for p in optim_prefixes if any(k.startswith(f"{p}.state.") for k in entries)), None)
        if optim_prefix is None:
            raise CheckpointError(f"warm start from {where}: holds no optimizer state; load the model only")
        optim_state = get_optimizer_state_dict(model, optimizer)
        # Only the per-parameter state (moments, step counts): lr, betas and weight decay are the new run's.
        target[optim_prefix] = {"state": _without(optim_state.get("state", {}), prefixes)}
        what = "model and optimizer"
    try:
        reader = SafeFileSystemReader(checkpoint)
        dcp.load(target, storage_reader=reader, planner=SafeLoadPlanner(), process_group=process_group)
    except BaseException as exc:  # DCP's CheckpointException derives from BaseException
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            raise
        raise CheckpointError(f"warm start from {where}: loading failed: {describe_error(exc)}") from None
    set_model_state_dict(model, wanted, options=StateDictOptions(strict=False))
    if optim_state is not None:
        assert optimizer is not None
        set_optimizer_state_dict(model, optimizer, optim_state)
    return what


def _check_files(source: Source) -> None:
    """Before reading: the marker's files with their sizes (an ftrain checkpoint), and DCP's metadata against
    the files it points into (any DCP checkpoint). Every rank checks the same, so all agree."""
    from ftrain.checkpoint.reader import check_before_reading

    assert source.checkpoint is not None
    if source.marker is not None:
        problems = integrity.verify(source.checkpoint, checksums=False)
        if problems:
            raise CheckpointError(f"warm start from {source.path}: the checkpoint is damaged: {problems[0]}")
    try:
        check_before_reading(source.checkpoint)
    except ValueError as exc:
        raise CheckpointError(f"warm start from {source.path}: {exc}") from None


def _detect_prefix(where: str, wanted: dict[str, Any], entries: dict[str, Any]) -> str:
    """The prefix of ``DCP_MODEL_PREFIXES`` under which the checkpoint holds most of the model's keys."""
    def hits(prefix: str) -> int:
        start = f"{prefix}." if prefix else ""
        return sum(f"{start}{key}" in entries for key in wanted)

    best = max(DCP_MODEL_PREFIXES, key=hits)
    if not hits(best):
        sample = ", ".join(sorted(entries)[:SHOWN])
        raise CheckpointError(
            f"warm start from {where}: none of the model's keys (e.g. {next(iter(wanted), '-')}) is in it, bare or "
            f"under {', '.join(repr(p + '.') for p in DCP_MODEL_PREFIXES if p)}; it holds e.g. {sample}"
        )
    return best


def _without(state: dict[str, Any], prefixes: tuple[str, ...]) -> dict[str, Any]:
    """Optimizer ``state`` (by parameter name) without the parameters under ``prefixes``."""
    return {k: v for k, v in state.items() if not (isinstance(k, str) and k.startswith(prefixes))}
