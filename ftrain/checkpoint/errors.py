"""Errors of the checkpoint layer, and turning DCP's many-line failures into one line."""

from __future__ import annotations

from typing import Any


class CheckpointError(RuntimeError):
    """A checkpoint could not be saved or loaded; the message says which and why."""


class ResumeRefused(CheckpointError):
    """The run cannot resume as configured (a checkpoint of another model or a newer format, a ``resume`` that
    names no complete checkpoint, a refused world size): a configuration error, found before anything changed."""


def describe_error(exc: BaseException) -> str:
    """One line with the root cause: DCP wraps each rank's exception and its traceback in one big message."""
    failures = getattr(exc, "failures", None)
    if isinstance(failures, dict) and failures:
        causes: dict[str, list[str]] = {}
        for rank, failure in sorted(failures.items()):
            cause = failure[0] if isinstance(failure, tuple) else failure
            causes.setdefault(f"{type(cause).__name__}: {squash(cause)}", []).append(str(rank))
        return "; ".join(f"rank {','.join(ranks)}: {cause}" for cause, ranks in causes.items())
    return f"{type(exc).__name__}: {squash(exc)}"


def squash(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:400]


def describe_diff(saved: Any, current: Any) -> str:
    """``key: checkpoint X, now Y`` for every key that differs."""
    if isinstance(saved, dict) and isinstance(current, dict):
        keys = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
        return ", ".join(f"{k}: checkpoint {saved.get(k)!r}, now {current.get(k)!r}" for k in keys)
    return f"checkpoint {saved!r}, now {current!r}"
