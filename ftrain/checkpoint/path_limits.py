"""Whether a run directory (and a local snapshot directory) leave room for the deepest paths ftrain writes under
them, checked before anything is created: a path over a file-system limit would otherwise fail in the middle of a
save. Errors are one-line ``ValueError``s naming the key (``ftrain.preflight`` reports them as config errors)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

NAME_MAX_FALLBACK, PATH_MAX_FALLBACK = 255, 4096  # Linux's limits, where pathconf cannot tell
# The longest paths ftrain writes under a run directory (8-digit steps, a 7-digit pid, the lock's 16-hex-digit
# token; tb/ adds the host name) and under checkpoint.local_dir (a 5-digit rank).
RUN_DIR_DEEPEST = (
    "checkpoints/step_00000000/COMPLETE.tmp",
    "checkpoints/superseded/step_00000000-00000000-000000/CHECKSUMS.json",
    "exports/.step_00000000.replaced-4194304/model.safetensors.index.json",
    ".LOCK.0123456789abcdef.tmp",
    ".LOCK.takeover",
)
LOCAL_DIR_DEEPEST = ("rank-00000/slot-0.json.tmp",)


def check_path_limits(
    run_dir: Path, local_dir: str = "", *, run_key: str = "run_dir", local_key: str = "local_dir", run_name: str = ""
) -> None:
    """``run_dir`` and ``local_dir`` (when set) leave room for the deepest files ftrain writes under them: each
    component still to be made within the file-name limit, each whole absolute path within the path limit, as the
    nearest existing ancestor's file system says. A one-line ``ValueError`` names the key and the limit;
    nothing is created. ``run_name``: the key is ``run.name`` when the too-long component is the name."""
    check_path_length(Path(run_dir), run_key, run_dir_deepest(), run_name)
    if local_dir:
        check_path_length(Path(local_dir), local_key, LOCAL_DIR_DEEPEST)


def run_dir_deepest() -> tuple[str, ...]:
    """``RUN_DIR_DEEPEST`` and the TensorBoard event file, whose name holds this host's name."""
    return (*RUN_DIR_DEEPEST, f"tb/events.out.tfevents.0000000000000000000.{socket.gethostname()}.4194304.0")


def check_path_length(path: Path, key: str, deepest: tuple[str, ...], run_name: str = "") -> None:
    """``path``, and ``path`` joined with each of ``deepest``, can be created (see ``check_path_limits``)."""
    absolute = Path(os.path.abspath(path))
    existing = next(p for p in [absolute, *absolute.parents] if os.path.exists(p))
    name_max = _pathconf(existing, "PC_NAME_MAX", NAME_MAX_FALLBACK)
    for part in absolute.relative_to(existing).parts:
        size = len(os.fsencode(part))
        if size > name_max:
            what = "run.name" if run_name and part == run_name else f"{key}'s component {_shown(part)}"
            raise ValueError(
                f"{what} is {size} bytes long, over the file-name limit of {name_max} bytes "
                f"(PC_NAME_MAX of {_shown(str(existing))})"
            )
    path_max = _pathconf(existing, "PC_PATH_MAX", PATH_MAX_FALLBACK)
    tail = max(deepest, key=len)
    needed = len(os.fsencode(str(absolute / tail))) + 1  # the terminating NUL counts
    if needed > path_max:
        raise ValueError(
            f"{key} is too long: {len(os.fsencode(str(absolute)))} bytes as an absolute path, and the deepest file "
            f"ftrain writes under it ({tail}) needs {needed}, over the path limit of {path_max} bytes "
            f"(PC_PATH_MAX of {_shown(str(existing))})"
        )


def _pathconf(path: Path, name: str, fallback: int) -> int:
    try:
        value = os.pathconf(path, name)
    except (OSError, ValueError):
        return fallback
    return value if value and value > 0 else fallback


def _shown(text: str, keep: int = 48) -> str:
    """``text``, shortened in the middle beyond ``keep`` characters (a one-line message stays readable)."""
    return text if len(text) <= keep else f"{text[:keep - 16]}...{text[-13:]} ({len(text)} characters)"
