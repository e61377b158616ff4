"""Checks a run's inputs and outputs before anything is written or locked.

``preflight(cfg)`` runs in the command, before the Trainer takes the run directory's ``LOCK`` and writes its
``config.yaml``: a mistake found here leaves the run directory exactly as it was. Every problem is a
``ConfigError`` with a one-line message (the command prints it and exits 2).
"""

from __future__ import annotations

import os
import sysconfig
import uuid
from pathlib import Path

from ftrain.checkpoint import path_limits
from ftrain.checkpoint.path_limits import run_dir_deepest  # noqa: F401 - re-exported
from ftrain.config import Config, ConfigError

# What ftrain.data reads from a directory given as data.path (kept in step with ftrain.data.TEXT_SUFFIXES).
TEXT_SUFFIXES = {".py", ".txt", ".md", ".rst", ".json", ".yaml", ".yml", ".csv", ".html", ".c", ".h"}


def preflight(cfg: Config, world_size: int | None = None) -> None:
    """Raise ``ConfigError`` if a path is too long for its file system, the data cannot feed one step, the warm
    start's source is none, or the run directory cannot be written."""
    if world_size is None:
        world_size = int(os.environ.get("WORLD_SIZE", "1") or 1)
    check_path_limits(
        Path(cfg.run.dir), cfg.checkpoint.local_dir, run_key="run.dir", local_key="checkpoint.local_dir",
        run_name=cfg.run.name,
    )
    if getattr(cfg.data, "format", "text") == "text":
        check_text_data(cfg.data.path, cfg.model.seq_len, cfg.train.batch_size * world_size)
    _data_module_checks(cfg)
    check_initial_load(cfg.checkpoint.initial_load)
    check_run_dir(Path(cfg.run.dir))
    if cfg.checkpoint.mode != "off":
        check_checkpoint_dir(cfg.checkpoint.dir, Path(cfg.run.dir))


def check_checkpoint_dir(location: str, run_dir: Path) -> None:
    """An object-storage ``checkpoint.dir``: the client is installed, the bucket exists and takes writes and
    deletes, and the prefix is not owned by another run than the one whose ``RUN_ID`` ``run_dir`` holds (a new
    run directory is left to the Checkpointer, which asks every rank)."""
    from ftrain.checkpoint.layout import RUN_ID_NAME
    from ftrain.checkpoint.storage import StorageError, is_url, open_storage

    if not is_url(location):
        return
    try:
        storage = open_storage(location)
        storage.check_access()  # type: ignore[attr-defined]
        owner = storage.owner()  # type: ignore[attr-defined]
    except (StorageError, ImportError) as exc:
        raise ConfigError(" ".join(str(exc).split())) from None
    try:
        run_id = (run_dir / RUN_ID_NAME).read_text().strip()
    except OSError:  # a new run directory: the ranks decide together (another node's may be the owner's)
        return
    if owner is not None and owner[0] != run_id:
        raise ConfigError(
            f"checkpoint.dir {location} holds the checkpoints of another run ({owner[1]}); give this run its own "
            "checkpoint.dir, or resume that run with its run.dir"
        )


def _data_module_checks(cfg: Config) -> None:
    """The data module's own checks (other formats), when it has them; any ``ValueError`` is a config error."""
    try:
        from ftrain import data
    except ImportError:
        return
    check = getattr(data, "check_data", None)
    if check is None:
        return
    try:
        check(cfg)
    except ConfigError:
        raise
    except (ValueError, OSError) as exc:
        raise ConfigError(" ".join(str(exc).split())) from None


def check_text_data(path: str, seq_len: int, global_batch: int) -> None:
    """``data.path`` exists, is readable, and holds at least one step's windows of ``seq_len + 1`` bytes."""
    files = _text_files(path)
    total = 0
    for file in files:
        try:
            with open(file, "rb") as handle:
                handle.read(1)
            total += file.stat().st_size
        except OSError as exc:
            raise ConfigError(f"data.path: cannot read {file}: {exc.strerror or exc}") from None
    where = f"data.path {path}" if path else "the built-in corpus"
    if total == 0:
        raise ConfigError(f"{where} is empty")
    windows = (total - 1) // seq_len
    if windows < 1:
        raise ConfigError(f"{where} has {total} bytes, fewer than one window of model.seq_len + 1 = {seq_len + 1}")
    if windows < global_batch:
        raise ConfigError(
            f"{where} has {total} bytes = {windows} windows of model.seq_len={seq_len}, fewer than one step needs "
            f"(train.batch_size x ranks = {global_batch})"
        )


def _text_files(path: str) -> list[Path]:
    if not path:
        return sorted(p for p in Path(sysconfig.get_paths()["stdlib"]).glob("*.py") if p.is_file())
    root = Path(path).expanduser()
    if not root.exists():
        raise ConfigError(f"data.path {path} does not exist")
    if root.is_file():
        return [root]
    if not root.is_dir():
        raise ConfigError(f"data.path {path} is neither a file nor a directory")
    try:
        files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)
    except OSError as exc:
        raise ConfigError(f"data.path: cannot list {path}: {exc.strerror or exc}") from None
    if not files:
        raise ConfigError(f"data.path {path} holds no text files ({', '.join(sorted(TEXT_SUFFIXES))})")
    return files


def check_initial_load(path: str) -> None:
    """``checkpoint.initial_load`` names a source a warm start can read (recognised without reading a tensor).
    Checked at every start: the run may have a checkpoint of its own today, but a bad path is a bad config."""
    if not path:
        return
    from ftrain.checkpoint.errors import CheckpointError  # noqa: PLC0415 - torch only when a warm start is asked for
    from ftrain.checkpoint.warm_start import check_source  # noqa: PLC0415

    from ftrain.checkpoint.storage import is_url  # noqa: PLC0415

    try:
        check_source(path if is_url(path) else Path(path).expanduser())
    except (CheckpointError, OSError, ImportError) as exc:
        reason = " ".join(str(exc).split())
        when = "checked at every start, even when the run has a checkpoint of its own and would not use it"
        raise ConfigError(f"checkpoint.initial_load: {reason} ({when})") from None


def check_path_limits(
    run_dir: Path, local_dir: str = "", *, run_key: str = "run_dir", local_key: str = "local_dir", run_name: str = ""
) -> None:
    """``ftrain.checkpoint.path_limits.check_path_limits`` (the paths ftrain writes fit the file system's limits),
    its one-line ``ValueError`` as a ``ConfigError``."""
    try:
        path_limits.check_path_limits(run_dir, local_dir, run_key=run_key, local_key=local_key, run_name=run_name)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def check_run_dir(run_dir: Path) -> None:
    """``run.dir`` is a directory we can write into, or can be created; nothing is left behind by the check."""
    if run_dir.exists() or run_dir.is_symlink():
        if not run_dir.is_dir():
            raise ConfigError(f"run.dir {run_dir} exists and is not a directory")
        _try_write(run_dir, run_dir)
        return
    parent = run_dir.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(f"run.dir {run_dir} cannot be created: {parent} is not a directory")
    _try_write(parent, run_dir)


def _try_write(directory: Path, run_dir: Path) -> None:
    """Create and remove a temporary file in ``directory`` (permissions alone do not tell: root, read-only mounts)."""
    probe = directory / f".ftrain-preflight-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        fd = os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    except OSError as exc:
        what = "is not writable" if directory == run_dir else f"cannot be created in {directory}"
        raise ConfigError(f"run.dir {run_dir} {what}: {exc.strerror or exc}") from None
    os.close(fd)
    probe.unlink()
