"""``CheckpointOptions``: every checkpoint option with its type, default, meaning and allowed words, in one place.

The recipe's ``checkpoint`` config section is this dataclass (``ftrain.config.CheckpointConfig``), and
``ftrain.Checkpointer`` takes its fields as keyword arguments (its signature and docstring are made from them), so
``ftrain-train --help``, ``recipes/configs/default.yaml`` and ``help(ftrain.Checkpointer)`` all read from here.
``validate()`` rejects an impossible value in one line that names the key. This module imports neither torch nor
OmegaConf.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import inspect
import math
import os
import signal
import textwrap
from dataclasses import dataclass, field
from typing import Any

# checkpoint.mode
MODE_ASYNC, MODE_ASYNC_PROCESS, MODE_SYNC, MODE_OFF = "async", "async_process", "sync", "off"
CHECKPOINT_MODES = (MODE_ASYNC, MODE_ASYNC_PROCESS, MODE_SYNC, MODE_OFF)
# checkpoint.interval, checkpoint.local_interval and checkpoint.resume
AUTO = "auto"
LOCAL_OFF = "0"  # checkpoint.local_interval: no local snapshots
RESUME_NEVER = "never"
# checkpoint.on_failure
ON_FAILURE_CONTINUE, ON_FAILURE_ABORT = "continue", "abort"
ON_SAVE_FAILURE = (ON_FAILURE_CONTINUE, ON_FAILURE_ABORT)
# checkpoint.on_world_size_change
RESHARD, REFUSE = "reshard", "refuse"
ON_WORLD_SIZE_CHANGE = (RESHARD, REFUSE)
# checkpoint.verify
VERIFY_SIZES, VERIFY_CHECKSUMS = "sizes", "checksums"
VERIFY_LEVELS = (VERIFY_SIZES, VERIFY_CHECKSUMS)
# checkpoint.export and checkpoint.export_dtype
EXPORT_NONE, EXPORT_SAFETENSORS = "none", "safetensors"
EXPORT_FORMATS = (EXPORT_NONE, EXPORT_SAFETENSORS)
EXPORT_DTYPES = ("", "float32", "bfloat16", "float16")

MAX_INT = 2**31 - 1  # every integer option fits a 32-bit signed int (steps, sizes, counts)
MAX_TIMEOUT_S = 30 * 86400.0  # 30 days; threading and timedelta overflow long before inf
UNCATCHABLE_SIGNALS = ("SIGKILL", "SIGSTOP")
KEY_PREFIX = "checkpoint."  # errors name an option by its config key


def option(
    default: Any, help: str, choices: tuple[str, ...] = (), accepts: str = "", keyword: str = ""  # noqa: A002
) -> Any:
    """A dataclass field with its default, the one-line comment users see, the allowed words of a choice option,
    (``accepts``) the wider type a keyword argument may have (``int | str`` where ``5`` means ``"5"``), and
    (``keyword``) the ``Checkpointer`` keyword when it is not the field's name."""
    metadata = {"help": help, "choices": choices, "accepts": accepts, "keyword": keyword}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class CheckpointOptions:
    """How ``ftrain.Checkpointer`` saves, keeps and resumes; the ``checkpoint`` section of the recipe's config."""

    dir: str = option(
        "",
        "where durable checkpoints live: '' = {run_dir}/checkpoints, another path, or s3://bucket/prefix (any "
        "S3-compatible store; endpoint and credentials from the AWS environment; pip install 'ftrain[s3]')",
        accepts="str | os.PathLike",
        keyword="checkpoint_dir",
    )
    interval: str = option("50", "save every N steps, or auto: the fewest steps whose measured cost fits overhead_budget; the last step is always saved", accepts="int | str")
    overhead_budget: float = option(0.01, "interval=auto: the share of training time checkpoints may cost (blocked + slowed steps)")
    max_interval_s: float = option(1800.0, "interval=auto: a durable checkpoint is never older than this (wall seconds)")
    mode: str = option(MODE_ASYNC, "async | async_process | sync | off", CHECKPOINT_MODES)
    keep_last: int = option(3, "complete checkpoints kept; older ones go only after a newer one commits")
    keep_every: int = option(0, "also save and keep every K-th step forever, whatever the interval (0 = none)")
    resume: str = option(AUTO, "auto (latest complete) | never | a step number | a checkpoint path", accepts="int | str | os.PathLike")
    on_failure: str = option(ON_FAILURE_CONTINUE, "a failed background save: continue (warn, count) or abort the run", ON_SAVE_FAILURE)
    on_world_size_change: str = option(
        RESHARD, "resume on another rank count: reshard (data read exactly once) or refuse", ON_WORLD_SIZE_CHANGE
    )
    verify: str = option(VERIFY_CHECKSUMS, "check the checkpoint's files when resuming: sizes (before loading), or also checksums (xxh3-64; CRC-32 in older checkpoints), verified as the data loads", VERIFY_LEVELS)
    signals: list[str] = option(["SIGTERM", "SIGUSR1"], "these save a checkpoint at the next step and exit with code 75", accepts="list[str] | str")
    timeout_s: float = option(600.0, "a save (or its staging) that takes longer is an error, not a hang")
    write_threads: int = option(0, "files each rank writes in parallel; 0 = auto (cores per local rank, at most 4)")
    local_interval: str = option(AUTO, "every N steps each rank also snapshots its state in node-local memory (0 = off); auto: the fewest steps whose measured cost fits overhead_budget", accepts="int | str")
    local_dir: str = option("", "where the local snapshots live; '' = /dev/shm/ftrain-<hash of run.dir>", accepts="str | os.PathLike")
    export: str = option(EXPORT_NONE, "also write the model as Hugging Face safetensors at the last step and keep_every steps", EXPORT_FORMATS)
    export_dtype: str = option("", "the export's floating-point dtype: '' = as trained, float32, bfloat16 or float16", EXPORT_DTYPES)
    initial_load: str = option("", "warm start a run with no checkpoint yet from: an ftrain checkpoint or run dir, DCP, or safetensors", accepts="str | os.PathLike")
    initial_load_model_only: bool = option(True, "initial_load: weights only (optimizer, schedule, step, data start fresh); false: optimizer too")
    exclude_from_loading: list[str] = option([], "initial_load: key prefixes left at their initial values, e.g. [head.]", accepts="list[str] | str")

    def __post_init__(self) -> None:
        # What a keyword argument may be beyond the config's type: 5 for "5", a path for its string, one signal.
        for name in ("interval", "local_interval", "resume"):
            value = getattr(self, name)
            if isinstance(value, int) and not isinstance(value, bool):
                setattr(self, name, str(value))
        for name in ("dir", "resume", "local_dir", "initial_load"):
            value = getattr(self, name)
            if isinstance(value, os.PathLike):
                setattr(self, name, os.fspath(value))
        for name in ("signals", "exclude_from_loading"):
            value = getattr(self, name)
            if isinstance(value, str):
                setattr(self, name, [value])
            elif isinstance(value, (list, tuple)):
                setattr(self, name, list(value))

    def validate(self) -> None:
        """Raise ``ValueError`` with one line that names the first impossible option and why."""

        def require(ok: bool, name: str, why: str) -> None:
            if not ok:
                raise ValueError(f"bad value for '{KEY_PREFIX}{name}' ({getattr(self, name)!r}): {why}")

        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            require(_has_type(value, f.type), f.name, f"must be {_TYPE_WORDS[f.type]}")
            problem = value_problem(value, f.metadata["choices"])
            require(problem is None, f.name, problem or "")
        require(0 < self.timeout_s <= MAX_TIMEOUT_S, "timeout_s", f"must be positive and at most {MAX_TIMEOUT_S:.0f} s (30 days)")
        interval = self.interval.strip()
        require(interval == AUTO or (interval.isdigit() and int(interval) >= 1), "interval", "must be auto or a number of steps >= 1")
        require(0 < self.overhead_budget < 1, "overhead_budget", "must be a share of time in (0, 1), e.g. 0.01")
        require(self.max_interval_s > 0, "max_interval_s", "must be positive")
        local = self.local_interval.strip()
        require(local == AUTO or local.isdigit(), "local_interval", "must be auto or a number of steps >= 0 (0 turns local snapshots off)")
        require(self.keep_last >= 1, "keep_last", "must be at least 1 (the latest is never deleted)")
        require(self.keep_every >= 0, "keep_every", "must be >= 0 (0 keeps none permanently)")
        require(self.write_threads >= 0, "write_threads", "must be >= 0 (0 = one per free core, up to 4)")
        require(bool(self.resume.strip()), "resume", "must be auto, never, a step number or a path")
        has_safetensors = importlib.util.find_spec("safetensors") is not None
        require(self.export != EXPORT_SAFETENSORS or has_safetensors, "export", "needs the safetensors package (pip install safetensors)")
        require("\0" not in self.initial_load, "initial_load", "must not contain a NUL byte")
        require(all(p.strip() for p in self.exclude_from_loading), "exclude_from_loading", "an empty prefix would exclude every key")
        for name in self.signals:
            require(name not in UNCATCHABLE_SIGNALS, "signals", f"{name} cannot be caught, so it cannot trigger a save")
            known = isinstance(getattr(signal, name, None), signal.Signals)
            require(known, "signals", f"unknown signal {name!r} (use names like SIGTERM, SIGUSR1)")


_TYPE_WORDS = {"str": "a string", "int": "an integer", "float": "a number", "bool": "true or false", "list[str]": "a list of strings"}


def _has_type(value: Any, annotation: str) -> bool:
    if annotation == "str":
        return isinstance(value, str)
    if annotation == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation == "float":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation == "bool":
        return isinstance(value, bool)
    return isinstance(value, list) and all(isinstance(item, str) for item in value)


def value_problem(value: Any, choices: tuple[str, ...] = (), limit_int: bool = True) -> str | None:
    """What every option of a kind must obey (choices, finite numbers, integers within 32 bits); None if it does."""
    if choices and value not in choices:
        return f"must be one of {', '.join(choices)}"
    if isinstance(value, float) and not math.isfinite(value):
        return "must be a finite number"
    if limit_int and isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_INT:
        return f"must be at most {MAX_INT} (2**31 - 1)"
    return None


def option_names() -> list[str]:
    return [f.name for f in dataclasses.fields(CheckpointOptions)]


def keyword_of(f: dataclasses.Field) -> str:
    """The ``Checkpointer`` keyword of an option (its field name unless it says otherwise)."""
    return f.metadata["keyword"] or f.name


def option_default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def option_parameters() -> list[inspect.Parameter]:
    """Every option as a keyword-only parameter with its default, for a constructor that takes them by name."""
    return [
        inspect.Parameter(keyword_of(f), inspect.Parameter.KEYWORD_ONLY, default=option_default(f), annotation=f.metadata["accepts"] or f.type)
        for f in dataclasses.fields(CheckpointOptions)
    ]


def describe_options(indent: str = "    ", width: int = 116) -> str:
    """Every option as a docstring entry: ``name (type, default X): help. One of: ...``."""
    lines = []
    for f in dataclasses.fields(CheckpointOptions):
        name = f.name if keyword_of(f) == f.name else f"{keyword_of(f)} (config key {KEY_PREFIX}{f.name})"
        text = f"{name} ({f.metadata['accepts'] or f.type}, default {option_default(f)!r}): {f.metadata['help']}"
        choices = f.metadata["choices"]
        if choices and not all(c and c in f.metadata["help"] for c in choices):
            text += f". One of: {', '.join(repr(c) for c in choices)}"
        lines += textwrap.wrap(text, width, initial_indent=indent, subsequent_indent=indent + "    ", break_on_hyphens=False)
    return "\n".join(lines)


def merge_options(given: CheckpointOptions | None, values: dict[str, Any]) -> CheckpointOptions:
    """The options ``given`` (or the defaults) with the keyword ``values`` in place of their fields, checked."""
    fields_by_keyword = {keyword_of(f): f.name for f in dataclasses.fields(CheckpointOptions)}
    unknown = sorted(set(values) - set(fields_by_keyword))
    if unknown:
        known = ", ".join(sorted(fields_by_keyword))
        raise TypeError(f"Checkpointer got unknown option(s) {', '.join(unknown)}; options are {known}")
    values = {fields_by_keyword[keyword]: value for keyword, value in values.items()}
    if given is None:
        given = CheckpointOptions()
    elif not isinstance(given, CheckpointOptions):
        if not dataclasses.is_dataclass(given):
            raise TypeError(f"options must be a ftrain.CheckpointOptions, not {type(given).__name__}")
        given = CheckpointOptions(**dataclasses.asdict(given))
    chosen = dataclasses.replace(given, **values)  # a copy: the caller's object is never changed
    chosen.validate()
    return chosen


def show_options_in_signature(cls: type, marker: str) -> None:
    """Give ``cls.__init__`` (which takes the options as ``**values``) a signature with every option as a keyword
    parameter, and put their descriptions in place of the line ``marker`` of its docstring (``help()``,
    ``inspect.signature`` and editors' call tips show them)."""
    init = cls.__init__
    params = [p for p in inspect.signature(init).parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    init.__signature__ = inspect.Signature([*params, *option_parameters()], return_annotation=None)
    cls.__doc__ = cls.__doc__.replace(marker, describe_options(indent=" " * 8))
