"""Checksums of a checkpoint's files, and verifying a checkpoint against its commit marker.

The sums of the data files are taken while they are written (``writer.CheckpointWriter``) and land in
``CHECKSUMS.json``; the commit marker then records, for every file, its size and checksum: xxHash's xxh3-64
(``"xxh3_64"``, ``sums.WRITE_SUM``). Markers that record zlib's CRC-32 (``"crc32"``) instead are verified too.
xxh3-64 because summing is part of every save and every cold resume, and it is several times faster than CRC-32
(docs/bench.md).

The marker is the source of truth, and verification covers every byte DCP will read: each file the marker
lists (plain names, regular files inside the checkpoint), and DCP's ``.metadata``, whose every storage
location must lie inside a listed file, and whose declared tensor sizes must fit the bytes stored for them
(so nothing absurd is allocated when the checkpoint is read).
"""

from __future__ import annotations

import json
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Mapping

import torch
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorStorageMetadata,
)

from ftrain._torch_compat import dcp_storage_info_class
from ftrain.checkpoint import layout
from ftrain.checkpoint.errors import CheckpointError
from ftrain.checkpoint.safe_load import read_metadata_safely
from ftrain.checkpoint.storage import CheckpointDir, StorageError, checkpoint_at
from ftrain.checkpoint.sums import SUM_KEYS, WRITE_SUM, buffer_sum

CHECKSUMS = "CHECKSUMS.json"
VERIFY_THREADS = 4
MAX_PROBLEMS = 3  # metadata problems reported per checkpoint (the first ones; the rest are counted)
_STORAGE_INFO = dcp_storage_info_class()  # DCP's record of where an entry lies in a file

logger = logging.getLogger(__name__)


def file_entries(where: layout.Where) -> list[dict[str, Any]]:
    """Name, size and checksum (``sums.WRITE_SUM``: xxh3-64) of every file in the checkpoint directory ``where``,
    each read back and summed: for a marker of files ftrain wrote there itself (an export, whose files are small
    and just written)."""
    checkpoint = checkpoint_at(where)
    return _with_sums(checkpoint, layout.list_files(checkpoint), {})


def saved_entries(
    where: layout.Where, written: Mapping[str, str] | None = None, sizes: Mapping[str, int] | None = None
) -> list[dict[str, Any]]:
    """The commit marker's entries for the save just written to ``where``: name, size and checksum of the files
    that save wrote (the data files its ``CHECKSUMS.json`` names, ``CHECKSUMS.json`` and DCP's ``.metadata``) and
    of no other: the marker never vouches for bytes the save did not write, and loading reads only listed files
    (``metadata_problems``). Another file in the directory (placed there by something else, or left by an
    earlier save at this step) is left out, and left where it is.

    ``written`` and ``sizes``: each file's checksum and size as its writer wrote it, where the writer ran in this
    process (``CheckpointWriter.written_sums`` and ``written_sizes``): then nothing is listed or read back (on an
    object store no request, and no listing that could lag behind the uploads). Otherwise the directory is listed
    (a file of the save that is missing raises ``CheckpointError``: the step is not committed; any other file is
    named in a warning), ``CHECKSUMS.json`` gives the data files' sums, and it and ``.metadata`` are read back and
    summed."""
    checkpoint = checkpoint_at(where)
    try:
        recorded = _recorded_sums(checkpoint, written or {})
    except FileNotFoundError:
        raise CheckpointError(f"{checkpoint}: {CHECKSUMS} of this save is missing; not committed") from None
    own = sorted({*recorded, layout.DCP_METADATA})
    if sizes is not None and all(name in recorded and name in sizes for name in own):
        return [{"name": name, "size": sizes[name], WRITE_SUM: recorded[name]} for name in own]
    found = {entry["name"]: entry for entry in layout.list_files(checkpoint)}
    missing = [name for name in own if name not in found]
    if missing:
        verb = "is" if len(missing) == 1 else "are"
        raise CheckpointError(f"{checkpoint}: {', '.join(missing)} of this save {verb} missing; not committed")
    foreign = sorted(set(found) - set(own))
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        logger.warning("%s holds files this save did not write, left out of the checkpoint: %s", checkpoint, shown)
    entries = [found[name] for name in own]
    return _with_sums(checkpoint, entries, recorded)


def _with_sums(
    checkpoint: CheckpointDir, entries: list[dict[str, Any]], recorded: Mapping[str, str]
) -> list[dict[str, Any]]:
    """``entries`` with their checksums: the ``recorded`` one, or the file read back and summed."""
    for entry in entries:
        name = entry["name"]
        entry[WRITE_SUM] = recorded.get(name) or checkpoint.storage.checksum(checkpoint.file(name), WRITE_SUM)
    return entries


def _recorded_sums(checkpoint: CheckpointDir, written: Mapping[str, str]) -> dict[str, str]:
    """Sums by file name: ``written`` if it holds ``CHECKSUMS.json``'s own, else those ``CHECKSUMS.json`` records
    (one read: on object storage, one request) with its own sum, overlaid by ``written``. Raises
    ``FileNotFoundError`` if it is needed and absent."""
    if CHECKSUMS in written:
        return dict(written)
    raw = checkpoint.storage.read_bytes(checkpoint.file(CHECKSUMS))
    recorded = json.loads(raw)
    if not isinstance(recorded, dict) or not all(isinstance(v, str) for v in recorded.values()):
        raise CheckpointError(f"{checkpoint}: {CHECKSUMS} is not a table of file sums")
    return {**recorded, CHECKSUMS: buffer_sum(raw, WRITE_SUM), **written}


def verify(
    where: layout.Where,
    checksums: bool = True,
    files: list[str] | None = None,
    sum_later: Callable[[str], bool] | None = None,
) -> list[str]:
    """Problems found in the checkpoint at ``path`` (empty list: it is intact).

    Checks the marker (``layout.read_marker``), then every file it lists (or only ``files``): a regular file
    inside the checkpoint, the recorded size and, with ``checksums``, the recorded checksum (a file the marker
    gives no checksum is then damaged; a file for which ``sum_later(name)`` is true only needs to have one: its
    reader verifies it while loading). Whoever checks ``.metadata`` also checks that it points only into
    files the marker lists (``metadata_problems``). Files are checked ``VERIFY_THREADS`` at a time (reading
    and both checksums release the GIL), so a rank with several files reads them in parallel.
    """
    checkpoint = checkpoint_at(where)
    try:
        marker = layout.read_marker(checkpoint)
    except ValueError as exc:
        return [str(exc)]
    entries = [entry for entry in marker["files"] if files is None or entry["name"] in files]
    if not entries:
        return []
    with ThreadPoolExecutor(max_workers=min(VERIFY_THREADS, len(entries)), thread_name_prefix="ftrain-verify") as pool:
        found = list(pool.map(lambda entry: _check_file(checkpoint, entry, checksums, sum_later), entries))
    problems = [problem for problem in found if problem]
    metadata_ok = [not problem for entry, problem in zip(entries, found) if entry["name"] == layout.DCP_METADATA]
    if metadata_ok == [True]:  # this caller checks .metadata, and its bytes are the committed ones
        problems += metadata_problems(checkpoint, marker)
    return problems


def recorded_sum(entry: dict[str, Any]) -> tuple[str, str] | None:
    """(algorithm, digest) a marker's file entry records, preferred algorithm first; None if it has none."""
    algorithm = next((key for key in SUM_KEYS if key in entry), None)
    return None if algorithm is None else (algorithm, entry[algorithm])


def status(step_dir: layout.StepDir, checksums: bool) -> tuple[str, dict[str, Any] | None, list[str]]:
    """``complete``, ``damaged`` (a malformed marker included), ``unsupported`` (a newer ftrain's marker) or
    ``incomplete``; the marker if it is valid; the problems found."""
    if not step_dir.complete:
        return "incomplete", None, []
    try:
        marker = layout.read_marker(step_dir.dir)
    except layout.NewerFormatError as exc:
        return "unsupported", None, [str(exc)]
    except ValueError as exc:
        return "damaged", None, [str(exc)]
    problems = verify(step_dir.dir, checksums=checksums)
    return ("damaged" if problems else "complete"), marker, problems


def newest_verified(root: layout.Root, checksums: bool) -> tuple[layout.StepDir | None, list[str]]:
    """The newest complete checkpoint under ``root`` that verifies (None: none does), and why each newer one
    does not. Retention must never delete it."""
    skipped = []
    for step_dir in reversed(layout.complete_steps(root)):
        state, _, problems = status(step_dir, checksums)
        if state == "complete":
            return step_dir, skipped
        skipped.append(f"{step_dir.dir.name} is {state}: {problems[0]}")
    return None, skipped


def _check_file(
    checkpoint: CheckpointDir, entry: dict[str, Any], checksums: bool, sum_later: Callable[[str], bool] | None
) -> str:
    name = entry["name"]  # a plain name: layout.validate_marker checked it
    try:
        size = checkpoint.storage.file_size(checkpoint.file(name))
    except FileNotFoundError:
        return f"missing file {name}"
    except StorageError as exc:
        return str(exc)
    if size != entry["size"]:
        return f"{name} is {size} bytes, the marker says {entry['size']}"
    if checksums:
        recorded = recorded_sum(entry)
        if recorded is None:
            return f"{name} has no checksum in the marker (cannot verify its content)"
        if sum_later is not None and sum_later(name):
            return ""
        actual = checkpoint.storage.checksum(checkpoint.file(name), recorded[0])
        if actual != recorded[1]:
            return f"{name} fails its checksum ({recorded[0]} {actual}, marker {recorded[1]})"
    return ""


def metadata_problems(where: layout.Where, marker: dict[str, Any]) -> list[str]:
    """Problems of DCP's ``.metadata`` against the marker: read safely, every location in a listed file."""
    checkpoint = checkpoint_at(where)
    try:
        with checkpoint.storage.open_read(checkpoint.file(layout.DCP_METADATA)) as stream:
            metadata = read_metadata_safely(stream)
    except (OSError, ValueError) as exc:
        return [f"{layout.DCP_METADATA}: {' '.join(str(exc).split())[:300]}"]
    return check_metadata(metadata, {entry["name"]: entry["size"] for entry in marker["files"]})


def check_metadata(metadata: Metadata, sizes: dict[str, int]) -> list[str]:
    """Problems of DCP metadata, given the files that may hold data (name -> size): every storage location
    names one of them and lies inside it; every entry has its storage; every tensor's declared shape is
    covered by its chunks, and each chunk's bytes fit in the bytes stored for it. Nothing is allocated."""
    storage = getattr(metadata, "storage_data", None)
    entries = getattr(metadata, "state_dict_metadata", None)
    if not isinstance(storage, dict) or not isinstance(entries, dict):
        return [f"{layout.DCP_METADATA} has no storage table or no entry table"]
    problems: list[str] = []
    stored: dict[tuple[str, tuple[int, ...] | None], int] = {}
    for index, info in storage.items():
        problem = _storage_problem(index, info, sizes)
        if problem:
            problems.append(f"{layout.DCP_METADATA}: {problem}")
        else:
            stored[(index.fqn, None if index.offset is None else tuple(index.offset))] = info.length
    for fqn, entry in entries.items():
        problem = _entry_problem(fqn, entry, stored)
        if problem:
            problems.append(f"{layout.DCP_METADATA}: {problem}")
    if len(problems) > MAX_PROBLEMS:
        problems = problems[:MAX_PROBLEMS] + [f"{layout.DCP_METADATA}: {len(problems) - MAX_PROBLEMS} more problems"]
    return problems


def _storage_problem(index: Any, info: Any, sizes: dict[str, int]) -> str:
    if not isinstance(index, MetadataIndex) or not isinstance(index.fqn, str) or not _is_shape(index.offset, none_ok=True):
        return f"a storage key is {type(index).__name__} {_short(index)}, not an index of an entry"
    where = f"{index.fqn!r}"
    if not isinstance(info, _STORAGE_INFO):
        return f"storage of {where} is a {type(info).__name__}, not a file location"
    name = info.relative_path
    if not isinstance(name, str) or not layout.is_plain_name(name):
        return f"{where} is stored in {_short(name)}, not a plain file name inside the checkpoint"
    if name not in sizes:
        return f"{where} is stored in {name}, which the marker does not list"
    if not (_is_int(info.offset) and _is_int(info.length) and info.offset >= 0 and info.length >= 0):
        return f"{where} has offset {_short(info.offset)} and length {_short(info.length)}, not byte counts"
    if info.offset + info.length > sizes[name]:
        return f"{where} is at bytes {info.offset}-{info.offset + info.length} of {name}, which has {sizes[name]}"
    if getattr(info, "transform_descriptors", None):
        return f"{where} is stored through stream transforms {_short(info.transform_descriptors)}, which ftrain does not read"
    return ""


def _entry_problem(fqn: Any, entry: Any, stored: dict[tuple[str, tuple[int, ...] | None], int]) -> str:
    if not isinstance(fqn, str):
        return f"an entry is named {_short(fqn)}, not a string"
    if isinstance(entry, BytesStorageMetadata):
        return "" if (fqn, None) in stored else f"{fqn!r} has no stored bytes"
    if not isinstance(entry, TensorStorageMetadata):
        return f"{fqn!r} is a {type(entry).__name__}, not a tensor or bytes entry"
    dtype = getattr(getattr(entry, "properties", None), "dtype", None)
    if not isinstance(dtype, torch.dtype) or not _is_shape(entry.size) or not isinstance(entry.chunks, list):
        return f"{fqn!r} has a malformed tensor description"
    shape = tuple(entry.size)
    covered = 0
    for chunk in entry.chunks:
        if not isinstance(chunk, ChunkStorageMetadata) or not _is_shape(chunk.offsets) or not _is_shape(chunk.sizes):
            return f"{fqn!r} has a malformed chunk"
        offsets, sizes = tuple(chunk.offsets), tuple(chunk.sizes)
        if len(offsets) != len(shape) or len(sizes) != len(shape) or any(
            o + n > dim for o, n, dim in zip(offsets, sizes, shape)
        ):
            return f"{fqn!r} has a chunk at {list(offsets)} of {list(sizes)} outside its shape {list(shape)}"
        length = stored.get((fqn, offsets))
        if length is None:
            return f"{fqn!r} has no stored bytes for its chunk at {list(offsets)}"
        chunk_bytes = _numel(sizes) * dtype.itemsize
        if chunk_bytes > length:
            return f"{fqn!r} declares {chunk_bytes} bytes ({list(sizes)} {dtype}) in {length} stored bytes"
        covered += _numel(sizes)
    if covered != _numel(shape):
        return f"{fqn!r} declares shape {list(shape)} ({_numel(shape)} elements), its chunks hold {covered}"
    return ""


def _numel(shape: tuple[int, ...]) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_shape(value: Any, none_ok: bool = False) -> bool:
    if value is None:
        return none_ok
    return isinstance(value, tuple) and len(value) <= 64 and all(_is_int(d) and d >= 0 for d in value)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
