"""Reading a rank's snapshots back: their markers, their checks against the files, and the state they hold."""

from __future__ import annotations

import logging
import mmap
from pathlib import Path
from typing import IO, Any, Callable, Mapping

import torch
from torch.distributed.checkpoint.stateful import Stateful
from torch.distributed.tensor import DTensor

from ftrain._torch_compat import local_tensor
from ftrain.checkpoint import state_tree
from ftrain.checkpoint.local.marker import CHUNK, SLOTS, SnapshotMarker, TensorRecord, dtype_named, marker_name
from ftrain.checkpoint.local.memory import file_size
from ftrain.checkpoint.sums import SUM_KEYS, buffer_sum

logger = logging.getLogger("ftrain.checkpoint")


def read_markers(root: Path, problem: Callable[[SnapshotMarker], str] | None = None) -> dict[int, SnapshotMarker]:
    """slot -> its marker, for the slots under ``root`` whose marker is valid (and, with ``problem``, for which
    it returns ''). Every marker left out is logged at debug level with the reason."""
    found = {}
    for slot in SLOTS:
        path = root / marker_name(slot)
        try:
            text = path.read_bytes()
        except FileNotFoundError:
            continue
        except OSError as exc:
            logger.debug("local snapshot %s not used: unreadable marker (%s)", path, exc)
            continue
        try:
            marker = SnapshotMarker.from_json(text)
            marker.validate(slot)
        except ValueError as exc:
            logger.debug("local snapshot %s not used: malformed marker (%s)", path, exc)
            continue
        reason = problem(marker) if problem is not None else ""
        if reason:
            logger.debug("local snapshot %s not used: %s", path, reason)
            continue
        found[slot] = marker
    return found


def chunk_sums(buffer: torch.Tensor, size: int, algorithm: str) -> list[str]:
    """The sums of the first ``size`` bytes of a slot's mapping, one per ``CHUNK``."""
    view = memoryview(buffer.numpy())
    return [buffer_sum(view[start : min(start + CHUNK, size)], algorithm) for start in range(0, size, CHUNK)]


def file_sums(path: Path, size: int, algorithm: str) -> list[str]:
    """The chunk sums of the first ``size`` bytes of ``path``, read through a populated read-only mapping."""
    with open(path, "rb") as handle:
        flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
        with mmap.mmap(handle.fileno(), size, flags=flags, prot=mmap.PROT_READ) as mapped:
            with memoryview(mapped) as view:
                return [buffer_sum(view[start : min(start + CHUNK, size)], algorithm) for start in range(0, size, CHUNK)]


def data_problem(data: Path, skel: Path, marker: SnapshotMarker, *, data_sums: bool = True) -> str:
    """Why the slot's files do not match ``marker`` ('' when they do): sizes and the skeleton's sum, and with
    ``data_sums`` the data's sums too."""
    algorithm = marker.algorithm
    if algorithm not in SUM_KEYS:
        return f"checksum algorithm {algorithm} is not installed here"
    size = marker.data_size
    if file_size(data) < size:
        return f"{data.name} is shorter than the marker's {size} bytes"
    skeleton = skel.read_bytes()
    if len(skeleton) != marker.skeleton_size or buffer_sum(skeleton, algorithm) != marker.skeleton_checksum:
        return f"{skel.name} fails its checksum"
    if data_sums and size and file_sums(data, size, algorithm) != marker.data_sums:
        return f"{data.name} fails its checksum"
    return ""


def read_state(
    data_path: Path, marker: SnapshotMarker, skeleton: dict[str, Any], states: Mapping[str, Stateful], where: Path
) -> dict[str, Any]:
    """state name -> its state dict, as the snapshot holds it: fresh tensors (on the devices they were taken
    from), DTensors rebuilt on the live state's mesh and placements. ValueError if the snapshot holds NaN or Inf,
    or its skeleton and marker disagree."""
    listed = skeleton["paths"] if skeleton["paths"] is not None else [record.path for record in marker.tensors]
    paths = [tuple(path) for path in listed]
    if len(paths) != len(marker.tensors):
        raise ValueError(f"local snapshot {where}: skeleton and marker disagree")
    live: dict[str, Any] = {}
    values: dict[tuple[Any, ...], torch.Tensor] = {}
    with open(data_path, "rb", buffering=0) as data:
        for path, record in zip(paths, marker.tensors):
            tensor = _read_tensor(data, record)
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                # a poisoned state (NaN written into a parameter while the loss still looked finite) is never
                # resumed: the durable tier, whose writer refuses such tensors, takes over
                raise ValueError(f"local snapshot of step {marker.step}: {record.key} holds NaN or Inf")
            if record.dtensor:
                if path[0] not in live:
                    state = states[path[0]]
                    live[path[0]] = getattr(state, "layout_state_dict", state.state_dict)()
                tensor = _as_dtensor(tensor, state_tree.at(live[path[0]], path[1:]), path)
            values[path] = tensor
    return {name: state_tree.join(skeleton["tree"][name], (name,), values) for name in marker.states}


def _read_tensor(data: IO[bytes], record: TensorRecord) -> torch.Tensor:
    tensor = torch.empty(record.shape, dtype=dtype_named(record.dtype))
    if record.nbytes:
        raw = tensor.view(-1).view(torch.uint8).numpy()
        data.seek(record.offset)
        if data.readinto(raw) != record.nbytes:
            raise ValueError(f"local snapshot: {record.key} is cut short")
    device = torch.device(record.device)
    return tensor if device.type == "cpu" else tensor.to(device)


def _as_dtensor(local: torch.Tensor, live: Any, path: tuple[Any, ...]) -> DTensor:
    if not isinstance(live, DTensor):
        raise ValueError(f"cannot restore {'.'.join(map(str, path))}: it was a DTensor, the live state has none there")
    return DTensor.from_local(
        local.to(local_tensor(live).device),
        live.device_mesh,
        live.placements,
        run_check=False,
        shape=live.shape,
        stride=live.stride(),
    )
