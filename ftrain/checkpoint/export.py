"""The model's weights as Hugging Face safetensors: in-process at the end of training, or from a checkpoint.

    {out_dir}/model.safetensors                                one shard
    {out_dir}/model-00001-of-0000N.safetensors ...             N shards, each at most ``max_shard_bytes``
    {out_dir}/model.safetensors.index.json                     (N > 1) {"metadata": {"total_size"}, "weight_map"}
    {out_dir}/ftrain_export.json                               what was exported: source, step, dtype, files

The recipe puts an export of step N in ``{run.dir}/exports/step_{N:08d}/`` (``export_dir``).

Commit rule: the rename is the commit. Everything is written into a temporary directory next to ``out_dir``
(``.{name}.partial-{pid}``), every file fsynced, the directory fsynced, then renamed to ``out_dir`` and the
parent fsynced. ``out_dir`` therefore exists only whole and durable, and the tools that read this layout
(``transformers``, ``safetensors``, ``warm_start``) need no marker of ours to know that. ``ftrain_export.json``
records sizes and xxh3-64 checksums (as a commit marker does) for checking, not for committing. Replacing an
existing export renames it aside first: a crash in between leaves no ``out_dir`` (never a mixed one), and the
aside copy is removed by the next export.
Only an export is replaced: an existing ``out_dir`` must be empty or hold nothing but this layout's files
(``is_export_dir``); anything else is refused before anything is written, and left exactly as it was.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

from ftrain.checkpoint import integrity, keys, layout
from ftrain.checkpoint.errors import CheckpointError
from ftrain.checkpoint.run_dir import EXPORTS_DIR
from ftrain.checkpoint.storage import checkpoint_at
from ftrain.checkpoint.storage.posix import fsync_dir

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
INFO_FILE = "ftrain_export.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 1000**3  # Hugging Face's default max_shard_size ("5GB")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_SHARD_NAME = re.compile(r"^model-\d{5}-of-\d{5}\.safetensors$")


def export_dir(run_dir: Path, step: int) -> Path:
    """Where the recipe puts the export of ``step``: ``{run_dir}/exports/step_{step:08d}``."""
    return Path(run_dir) / EXPORTS_DIR / f"step_{step:08d}"


def is_export_file(name: str) -> bool:
    """``name`` is one of the files an export writes (weights, shards, index, ``ftrain_export.json``)."""
    return name in (SINGLE_FILE, INDEX_FILE, INFO_FILE) or bool(_SHARD_NAME.match(name))


def is_export_dir(path: Path) -> bool:
    """``path`` is a real directory (not a link) that holds only an export's files, at least one of them."""
    path = Path(path)
    return not path.is_symlink() and path.is_dir() and any(path.iterdir()) and not _foreign_entries(path)


def _foreign_entries(path: Path) -> list[str]:
    """Names in directory ``path`` that are not an export's plain files (others' files, folders, links)."""
    return sorted(p.name for p in path.iterdir() if not (is_export_file(p.name) and p.is_file() and not p.is_symlink()))


def check_replaceable(out_dir: Path) -> None:
    """An existing ``out_dir`` may be replaced only if it is an earlier export or an empty directory; anything
    else (a checkpoint, a run directory, others' files, a link) is a one-line ``CheckpointError``."""
    problem = replace_problem(Path(out_dir))
    if problem:
        raise CheckpointError(f"{out_dir} {problem}; an export replaces only an earlier export")


def replace_problem(out_dir: Path) -> str:
    """Why the existing ``out_dir`` is no earlier export (nor empty), e.g. "holds files an export does not write
    (notes.txt)"; "" if it may be replaced or does not exist."""
    if not (out_dir.exists() or out_dir.is_symlink()):
        return ""
    if out_dir.is_symlink() or not out_dir.is_dir():
        return "is a symbolic link" if out_dir.is_symlink() else "is not a directory"
    foreign = _foreign_entries(out_dir)
    if not foreign:
        return ""
    more = f" and {len(foreign) - 3} more" if len(foreign) > 3 else ""
    return f"holds files an export does not write ({', '.join(foreign[:3])}{more})"


def parse_dtype(name: str) -> torch.dtype | None:
    """``checkpoint.export_dtype`` as a torch dtype: '' keeps each tensor's own."""
    if not name:
        return None
    if name not in DTYPES:
        raise ValueError(f"export dtype {name!r} is not one of {', '.join(DTYPES)} ('' keeps the model's)")
    return DTYPES[name]


def _save_file() -> Any:
    try:
        from safetensors.torch import save_file
    except ImportError:
        raise CheckpointError("safetensors export needs the safetensors package: pip install safetensors") from None
    return save_file


def prepare(state: dict[str, Any], dtype: torch.dtype | None, copy: bool = False) -> dict[str, torch.Tensor]:
    """The tensors of ``state`` as safetensors stores them: detached, on the CPU, contiguous, floating-point
    ones in ``dtype`` (if given), none sharing memory (tied weights become copies under both names). With
    ``copy`` every tensor is a copy, so the model may change while it is written."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, value in state.items():
        if not isinstance(value, torch.Tensor):
            continue
        tensor = value.detach().to("cpu")
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        tensor = tensor.contiguous()
        storage = tensor.untyped_storage()
        shared = storage.data_ptr() in seen or storage.nbytes() != tensor.numel() * tensor.element_size()
        if copy or shared:
            tensor = tensor.clone()
        seen.add(tensor.untyped_storage().data_ptr())
        out[name] = tensor
    return out


def plan_shards(tensors: dict[str, torch.Tensor], max_shard_bytes: int) -> list[list[str]]:
    """Names per shard, in order: a shard is closed before it would pass ``max_shard_bytes``; a larger tensor
    gets a shard of its own (Hugging Face's rule)."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def shard_names(count: int) -> list[str]:
    if count == 1:
        return [SINGLE_FILE]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def export_safetensors(
    model_state: dict[str, Any],
    out_dir: Path,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    info: dict[str, Any] | None = None,
) -> Path:
    """Write the tensors of ``model_state`` to ``out_dir`` in the Hugging Face layout and commit it (the rename,
    see the module docstring). An existing ``out_dir`` is replaced if it is an earlier export or empty, and
    refused otherwise (``check_replaceable``). Returns ``out_dir``."""
    if max_shard_bytes < 1:
        raise ValueError(f"max_shard_bytes must be positive, not {max_shard_bytes}")
    check_replaceable(Path(out_dir))
    save_file = _save_file()
    tensors = prepare(model_state, dtype)
    if not tensors:
        raise CheckpointError(f"nothing to export to {out_dir}: the model state holds no tensors")
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(out_dir)
    tmp = out_dir.with_name(f".{out_dir.name}.partial-{os.getpid()}")
    tmp.mkdir()
    try:
        shards = plan_shards(tensors, max_shard_bytes)
        names = shard_names(len(shards))
        for file_name, members in zip(names, shards):
            save_file({name: tensors[name] for name in members}, str(tmp / file_name), metadata={"format": "pt"})
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        if len(shards) > 1:
            weight_map = {name: file_name for file_name, members in zip(names, shards) for name in members}
            _write_json(tmp / INDEX_FILE, {"metadata": {"total_size": total}, "weight_map": weight_map})
        record = {
            **(info or {}),
            "dtype": str(dtype).replace("torch.", "") if dtype is not None else "as trained",
            "total_size": total,
            "tensors": len(tensors),
            "exported_at": time.time(),
            "files": integrity.file_entries(tmp),
        }
        _write_json(tmp / INFO_FILE, record)
        for path in tmp.iterdir():
            _fsync_file(path)
        fsync_dir(tmp)
        _commit(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def export_from_checkpoint(
    checkpoint_dir: layout.Where,
    out_dir: Path,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> Path:
    """Export the model of a committed ftrain checkpoint (found by its marker's ``state_keys``), after checking
    every file's size and checksum. Used by ``ftrain-ckpt convert --format safetensors``."""
    checkpoint = checkpoint_at(checkpoint_dir)
    tensors = model_tensors(checkpoint)
    marker = layout.read_marker(checkpoint)
    source = str(checkpoint.path.resolve()) if checkpoint.storage.is_local else str(checkpoint)
    info = {"source": source, "step": marker["step"]}
    return export_safetensors(tensors, out_dir, dtype, max_shard_bytes, info)


def model_tensors(checkpoint_dir: layout.Where) -> dict[str, torch.Tensor]:
    """The model's tensors of a committed ftrain checkpoint, unsharded, by parameter name. A damaged checkpoint,
    or one of a newer format, is a one-line ``CheckpointError``; the tensors are read through the safe loader."""
    from ftrain.checkpoint.reader import flatten, read_state, select

    path = checkpoint_at(checkpoint_dir)
    try:
        marker = layout.read_marker(path)
    except ValueError as exc:
        raise CheckpointError(str(exc)) from None
    problems = integrity.verify(path, checksums=True)
    if problems:
        raise CheckpointError(f"{path} is damaged, not exporting: {problems[0]}")
    prefix = keys.state_keys(marker)[keys.MODEL]
    tensors = {k: v for k, v in select(flatten(read_state(path)), prefix).items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"{path}: holds no model entries under {prefix!r} (the key its marker names)")
    return tensors


def gather_model_state(model: nn.Module, copy: bool = True) -> dict[str, torch.Tensor] | None:
    """The full (unsharded) model state on the CPU of rank 0; ``None`` on the other ranks. Collective: every
    rank calls it (FSDP2 all-gathers each parameter). With ``copy`` the tensors are copies (safe to write in the
    background while training goes on)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
        return None
    return prepare(state, None, copy=copy)


def export_model(
    model: nn.Module,
    out_dir: Path,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    info: dict[str, Any] | None = None,
) -> Path | None:
    """Export a live model (plain, DDP or FSDP2). Collective: every rank calls it; rank 0 writes and returns
    ``out_dir``, the others return ``None`` (they do not wait for the write; a barrier is the caller's)."""
    state = gather_model_state(model, copy=False)
    if state is None:
        return None
    return export_safetensors(state, out_dir, dtype, max_shard_bytes, info)


def export_model_async(
    model: nn.Module,
    out_dir: Path,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    info: dict[str, Any] | None = None,
) -> Future:
    """As ``export_model``, but only the gather (collective) happens now; rank 0 writes in a thread. The
    future's result is ``out_dir`` (``None`` on other ranks); a failure is its exception. Holds a CPU copy of
    the model on rank 0 until written."""
    state = gather_model_state(model, copy=True)
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ftrain-export")
    try:
        if state is None:
            return pool.submit(lambda: None)
        return pool.submit(export_safetensors, state, out_dir, dtype, max_shard_bytes, info)
    finally:
        pool.shutdown(wait=False)


def read_export(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of an export (a directory in this layout, or one ``.safetensors`` file)."""
    from ftrain.checkpoint.warm_start import read_safetensors

    return read_safetensors(Path(path))


# ------------------------------------------------------------------------------------------------ helpers
def _write_json(path: Path, content: dict[str, Any]) -> None:
    path.write_text(json.dumps(content, indent=1) + "\n")


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _commit(tmp: Path, out_dir: Path) -> None:
    """Rename ``tmp`` to ``out_dir`` (an existing one is renamed aside first, then deleted) and make it durable."""
    aside = None
    if out_dir.exists() or out_dir.is_symlink():
        aside = out_dir.with_name(f".{out_dir.name}.replaced-{os.getpid()}")
        os.replace(out_dir, aside)
    os.replace(tmp, out_dir)
    fsync_dir(out_dir.parent)
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


def _remove_leftovers(out_dir: Path) -> None:
    """Temporary and set-aside directories of ``out_dir`` left by an export that died."""
    for pattern in (f".{out_dir.name}.partial-*", f".{out_dir.name}.replaced-*"):
        for path in out_dir.parent.glob(pattern):
            shutil.rmtree(path, ignore_errors=True)
