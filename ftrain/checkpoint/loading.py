"""Choosing and loading a checkpoint: candidates for ``checkpoint.resume``, checks, fallback, agreement.

Every rank takes the same decision for every candidate (a collective after each check), so either all
ranks load a checkpoint or none does.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Union

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.stateful import Stateful

from ftrain.checkpoint import integrity, layout
from ftrain.checkpoint.errors import CheckpointError, ResumeRefused, describe_diff, describe_error
from ftrain.checkpoint.safe_load import ChecksumMismatch, SafeFileSystemReader, SafeLoadPlanner
from ftrain.checkpoint.collectives import max_over_ranks
from ftrain.checkpoint.storage import CheckpointDir, Storage, checkpoint_at, is_url, open_storage

logger = logging.getLogger("ftrain.checkpoint")


# What to load into: the states, or a function that chooses them from the candidate's commit marker.
StatesFor = Union[dict[str, Stateful], Callable[[dict[str, Any]], dict[str, Stateful]]]


@dataclass
class LoadResult:
    step: int
    dir: CheckpointDir
    load_s: float
    marker: dict[str, Any]

    @property
    def path(self) -> Path:
        """The local path of the checkpoint loaded (a local storage only)."""
        return self.dir.path


@dataclass(frozen=True)
class Expectations:
    """What a checkpoint must match to be loaded into this run."""

    model: dict[str, Any] | None
    world_size: int
    allow_world_size_change: bool


def find_candidates(root: Storage | Path, resume: str) -> list[layout.StepDir]:
    """Candidate checkpoints for ``checkpoint.resume``, best first; empty means start fresh."""
    storage = open_storage(root)
    if resume == "never":
        return []
    if resume == "auto":
        return list(reversed(layout.complete_steps(storage)))
    if resume.isdigit():
        step = int(resume)
        checkpoint = CheckpointDir(storage, layout.step_name(step))
        if not layout.has_marker(checkpoint):
            have = ", ".join(str(d.step) for d in layout.complete_steps(storage)) or "none"
            raise ResumeRefused(f"checkpoint.resume={resume}: no complete checkpoint {checkpoint} (complete steps: {have})")
        return [layout.StepDir(step, checkpoint, True)]
    checkpoint = checkpoint_at(resume if is_url(resume) else Path(resume).expanduser())
    if not checkpoint.storage.is_dir(checkpoint.name):
        raise ResumeRefused(f"checkpoint.resume={resume}: no such checkpoint directory")
    if not layout.has_marker(checkpoint):
        raise ResumeRefused(f"checkpoint.resume={resume}: not a complete checkpoint (no {layout.MARKER} marker)")
    return [layout.StepDir(layout.parse_step(checkpoint) or -1, checkpoint, True)]


def load_best(
    states: StatesFor,
    candidates: list[layout.StepDir],
    *,
    resume: str,
    expect: Expectations,
    rank: int,
    world_size: int,
    device: torch.device,
    process_group: dist.ProcessGroup | None,
    verify_checksums: bool,
    optional_prefixes: tuple[str, ...],
    root: Storage | Path,
) -> LoadResult | None:
    """Load the newest usable candidate into ``states``; fall back to older ones, logging why.

    Keys under ``optional_prefixes`` may be missing from the checkpoint (per-rank entries of another world
    size); every other key must be there. Nothing in the checkpoint is unpickled beyond plain data.
    """
    if not candidates:
        why = "checkpoint.resume=never" if resume == "never" else f"no complete checkpoint under {open_storage(root).describe()}"
        logger.info("starting fresh: %s", why)
        return None
    tried = []
    for candidate in candidates:
        started = time.perf_counter()
        problem = _agree(check(candidate.dir, expect, rank, world_size, verify_checksums), world_size)
        if not problem:
            marker = layout.read_marker(candidate.dir)
            try:
                dcp.load(
                    states(marker) if callable(states) else states,
                    storage_reader=SafeFileSystemReader(
                        candidate.dir, expected_sums=data_sums(marker) if verify_checksums else None
                    ),
                    planner=SafeLoadPlanner(optional_prefixes),
                    process_group=process_group,
                )
            except BaseException as exc:  # DCP's CheckpointException derives from BaseException
                if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                    raise
                problem = _load_problem(exc)
            problem = _agree(problem, world_size)
        if not problem:
            load_s = max_over_ranks([time.perf_counter() - started], device)[0]
            logger.info("resumed from %s (step %d) in %.2f s", candidate.dir, marker["step"], load_s)
            return LoadResult(int(marker["step"]), candidate.dir, load_s, marker)
        logger.warning("checkpoint %s is unusable (%s); trying the previous one", candidate.dir, problem)
        tried.append(f"{candidate.dir.name}: {problem}")
    raise CheckpointError("no usable checkpoint; tried " + "; ".join(tried))


def check(where: layout.Where, expect: Expectations, rank: int, world_size: int, verify_checksums: bool) -> str:
    """Checks before loading: the marker, that it was made for this run's model, file sizes, and the checksums of
    the small files (the data files are summed while they load: ``SafeFileSystemReader``).

    A checkpoint of another model, of a newer ftrain's format or (if refused) of another world size is a
    configuration error, raised at once; damage (a malformed marker included) is returned as a problem so the
    caller can fall back.
    """
    path = checkpoint_at(where)
    try:
        marker = layout.read_marker(path)
    except layout.NewerFormatError as exc:
        raise ResumeRefused(f"{exc}: resume it with that ftrain, or use another run.dir") from None
    except ValueError as exc:
        return str(exc)
    if expect.model is not None and marker.get("model") != expect.model:
        raise ResumeRefused(
            f"checkpoint {path} was saved for a different model ({describe_diff(marker.get('model'), expect.model)}); "
            f"use a matching config or another run.dir"
        )
    if marker.get("world_size") != expect.world_size and not expect.allow_world_size_change:
        raise ResumeRefused(
            f"checkpoint {path} was saved with {marker.get('world_size')} ranks, this run has {expect.world_size}, "
            f"and checkpoint.on_world_size_change=refuse"
        )
    # Each rank checks its share of the files; _agree() combines the verdicts. The data files' checksums are
    # verified while they are loaded (SafeFileSystemReader): a cold resume then reads them once, not twice.
    names = [entry["name"] for entry in marker["files"]]
    problems = integrity.verify(
        path, checksums=verify_checksums, files=names[rank::world_size], sum_later=layout.is_data_file
    )
    return "; ".join(problems)


def data_sums(marker: dict[str, Any]) -> dict[str, tuple[str, str]]:
    """The checksums of a checkpoint's data files, for verifying them while they are loaded."""
    sums = {entry["name"]: integrity.recorded_sum(entry) for entry in marker["files"] if layout.is_data_file(entry["name"])}
    return {name: recorded for name, recorded in sums.items() if recorded is not None}


def _load_problem(exc: BaseException) -> str:
    """Why ``dcp.load`` failed, in one line; a data file failing its checksum is damage, said as ``check`` would."""
    failures = getattr(exc, "failures", None)
    causes = [f[0] if isinstance(f, tuple) else f for f in failures.values()] if isinstance(failures, dict) else [exc]
    if causes and all(isinstance(cause, ChecksumMismatch) for cause in causes):
        return "; ".join(dict.fromkeys(str(cause) for cause in causes))
    return f"load failed: {describe_error(exc)}"


def _agree(problem: str, world_size: int) -> str:
    """All ranks take the same decision: a checkpoint unusable on one rank is unusable for all.
    Returns every rank's reasons, so rank 0 can say what was wrong wherever it was found."""
    if world_size == 1:
        return problem
    problems: list[str] = [""] * world_size
    dist.all_gather_object(problems, problem)
    return "; ".join(dict.fromkeys(p for p in problems if p))
