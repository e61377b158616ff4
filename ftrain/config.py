"""Typed run configuration: one dataclass per section, loaded from YAML plus ``key=value`` overrides.

The dataclasses below are the one source of every default and of the one-line comment that explains each key
(``--help``, ``defaults_yaml()`` and ``recipes/configs/default.yaml`` are all made from them). Every mistake a
user can make here (unknown key, wrong type, impossible value, unreadable file) becomes one ``ConfigError``
whose message is a single line naming the key.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

# The checkpoint section is the checkpoint package's own options type (its words, defaults and checks live there).
from ftrain.checkpoint.options import (  # noqa: F401 - re-exported: the mode and option words, the limits
    AUTO,
    CHECKPOINT_MODES,
    EXPORT_DTYPES,
    EXPORT_FORMATS,
    EXPORT_NONE,
    EXPORT_SAFETENSORS,
    MAX_INT,
    MAX_TIMEOUT_S,
    MODE_ASYNC,
    MODE_ASYNC_PROCESS,
    MODE_OFF,
    MODE_SYNC,
    ON_SAVE_FAILURE,
    ON_WORLD_SIZE_CHANGE,
    RESUME_NEVER,
    UNCATCHABLE_SIGNALS,
    CheckpointOptions,
    value_problem,
)
from ftrain.checkpoint.options import option as _key

LOG_LEVELS = ("debug", "info", "warning", "error")
MAX_SEED = 2**32 - 1  # (seed * 1_000_003 + step) * 1009 + rank + 1 must stay below torch.manual_seed's 2**63
MAX_SEQ_LEN = 1_000_000

DEFAULTS_HEADER = """\
# ftrain default run: a tiny byte-level GPT on the Python standard library's own source, 2 ranks on CPU.
#
#   torchrun --standalone --nproc_per_node=2 recipes/train.py
#   torchrun --standalone --nproc_per_node=2 recipes/train.py run.name=try2 train.max_steps=60 checkpoint.interval=5
#
# These are the built-in defaults (ftrain/config.py holds them; `ftrain-train --help` lists them). Copy this file to
# start a config of your own: only the keys you change need to be in it. An unknown key is an error.
"""


class ConfigError(ValueError):
    """A problem with the user's configuration; its message is one line."""


@dataclass
class RunConfig:
    name: str = _key("default", "run directory name under runs/")
    dir: str = _key("runs/${run.name}", "output: config.yaml, tb/ (TensorBoard), checkpoints/")


@dataclass
class ModelConfig:
    vocab_size: int = _key(256, "token ids are 0..vocab_size-1; byte-level text needs 256")
    seq_len: int = _key(128, "context length in tokens (bytes for text)")
    n_layer: int = _key(2, "transformer blocks")
    n_head: int = _key(4, "attention heads")
    d_model: int = _key(128, "width")
    dropout: float = _key(0.1, "draws on the RNG, so resuming must restore it")


@dataclass
class DataConfig:
    format: str = _key("text", "text: bytes of text files; tokens: a flat binary token file (nanoGPT's train.bin)", ("text", "tokens"))
    path: str = _key("", "a text file or a directory of text files ('' = built-in stdlib corpus); or the token file")
    dtype: str = _key("uint16", "format=tokens: the token file's integer type", ("uint16", "uint32"))
    num_workers: int = _key(0, "StatefulDataLoader worker processes per rank (0 = in the main process)")
    record_samples: bool = _key(False, "append each step's sample indices to {run.dir}/samples/rank_R.jsonl")


@dataclass
class TrainConfig:
    max_steps: int = _key(300, "optimizer steps in the whole run")
    seed: int = _key(1234, "model init, data order and per-rank dropout all derive from it")
    batch_size: int = _key(8, "sequences per rank per step")
    lr: float = _key(3e-3, "peak learning rate (AdamW)")
    min_lr_ratio: float = _key(0.1, "cosine decays to lr * min_lr_ratio at max_steps")
    warmup_steps: int = _key(20, "linear warmup steps")
    weight_decay: float = _key(0.1, "AdamW decoupled weight decay")
    grad_clip: float = _key(1.0, "clip the global grad norm at this value; 0 disables")
    device: str = _key("auto", "auto (CUDA if present), cpu or cuda", ("auto", "cpu", "cuda"))
    timeout_s: float = _key(300.0, "a collective waiting longer (a stalled or lost rank) is an error, not a hang")
    warm_restarts: int = _key(3, "under torchrun: training processes each rank's warm parent forks again after a failure, resuming from the local tier, before leaving it to torchrun's restart (0 = off)")
    gc_interval: int = _key(50, "Python GC at every N-th step boundary instead of mid-step (0 = automatic)")
    on_unhealthy: str = _key("rollback", "a step with a non-finite loss or grad norm (or a spike): rollback | stop | ignore", ("rollback", "stop", "ignore"))
    spike_factor: float = _key(0.0, "a loss more than max((factor - 1) x |median|, 6 robust std) above the median of the last 50 healthy ones is unhealthy: for an ordinary positive loss, one above factor x the median (0 = off)")
    max_rollbacks: int = _key(3, "rollbacks allowed in one process; one more unhealthy step stops the run")
    rollback_skip_batches: int = _key(-1, "batches skipped after a rollback; -1 = those since the restored checkpoint + 10%")


CheckpointConfig = CheckpointOptions  # the checkpoint section: every key, default and help in ftrain.checkpoint.options


@dataclass
class LogConfig:
    interval: int = _key(10, "console progress line every N steps (TensorBoard gets every step)")
    level: str = _key("info", "console log level: debug | info | warning | error (ranks > 0: warning at least)", LOG_LEVELS)


@dataclass
class DebugConfig:
    nan_at_steps: list[int] = _key([], "TEST HOOK: rank 0's loss is NaN at these steps (once per process)")
    poison_param_at_steps: list[int] = _key([], "TEST HOOK: rank 0 writes a NaN into a parameter after these steps' update (once per process)")
    spike_at_steps: list[int] = _key([], "TEST HOOK: rank 0's loss is 100 times larger at these steps (once per process)")


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)


@dataclass(frozen=True)
class KeyInfo:
    """One config key as ``--help`` and the defaults file show it."""

    key: str
    type: str
    default: Any
    help: str
    choices: tuple[str, ...]


def keys() -> list[KeyInfo]:
    """Every key of the schema, section by section, in declaration order."""
    found = []
    for section in dataclasses.fields(Config):
        for f in dataclasses.fields(_resolve_type(section.type)):
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default
            type_name = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
            found.append(KeyInfo(f"{section.name}.{f.name}", type_name, default, f.metadata.get("help", ""), f.metadata.get("choices", ())))
    return found


def format_value(value: Any) -> str:
    """A default as it is written in YAML (``[SIGTERM, SIGUSR1]``, ``''``, ``0.003``)."""
    return yaml.safe_dump(value, default_flow_style=True, width=1000).strip().removesuffix("...").strip()


def defaults_yaml() -> str:
    """The built-in defaults as a commented YAML file (``recipes/configs/default.yaml`` is exactly this)."""
    lines = [DEFAULTS_HEADER.rstrip("\n")]
    section = None
    for info in keys():
        head, name = info.key.split(".", 1)
        if head != section:
            lines += ["", f"{head}:"]
            section = head
        lines.append(f"  {name}: {format_value(info.default)}".ljust(32) + f"# {info.help}")
    return "\n".join(lines) + "\n"


# YAML 1.1 reads these words as booleans; for choice keys we map them back to what the user meant.
_BOOL_WORDS = {"off": False, "no": False, "false": False, "on": True, "yes": True, "true": True}
_BOOL_ALIASES = {
    "checkpoint.mode": {False: MODE_OFF, True: MODE_ASYNC},
    "checkpoint.resume": {False: RESUME_NEVER, True: AUTO},
    "checkpoint.export": {False: EXPORT_NONE, True: EXPORT_SAFETENSORS},
}


def parse_argv(argv: list[str]) -> tuple[list[Path], list[str]]:
    """Split ``[--config FILE] [key=value ...]`` into config files and overrides."""
    argv = list(argv)
    config_files: list[Path] = []
    overrides: list[str] = []
    while argv:
        arg = argv.pop(0)
        if arg in ("--config", "-c"):
            if not argv:
                raise ConfigError("--config needs a YAML file")
            config_files.append(Path(argv.pop(0)))
        elif arg.startswith("--config="):
            config_files.append(Path(arg.split("=", 1)[1]))
        elif "=" in arg and not arg.startswith("-"):
            overrides.append(arg)
        else:
            raise ConfigError(f"unexpected argument {arg!r}: expected --config FILE or key=value")
    return config_files, overrides


def load_config(argv: list[str] | None = None) -> Config:
    """Build the config from ``[--config FILE] [key=value ...]`` on top of the built-in defaults."""
    config_files, overrides = parse_argv(list(argv or []))
    merged: DictConfig = OmegaConf.structured(Config)
    for path in dict.fromkeys(config_files):
        merged = _merge(merged, _read_yaml(path), source=str(path))
    for item in overrides:
        key, _, raw = item.partition("=")
        merged = _merge(merged, _override(key.strip(), raw), source=f"override {item!r}")
    try:
        resolved = OmegaConf.to_container(merged, resolve=True)
    except OmegaConfBaseException as exc:
        raise ConfigError(_one_line(exc)) from None
    cfg = _to_dataclass(resolved)
    validate(cfg)
    return cfg


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise ConfigError(f"config file not found: {path}")
    if not path.is_file():
        raise ConfigError(f"config file {path} is not a regular file")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not a YAML text file (byte {exc.start} is not UTF-8)") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({_one_line(exc)})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    data.pop("defaults", None)
    return _unbool_choices(data)


def _override(key: str, raw: str) -> dict[str, Any]:
    """Turn ``key=raw`` into a nested dict, keeping ``raw`` a string where the schema wants one."""
    if not key:
        raise ConfigError(f"override '={raw}' has no key")
    field_type = _field_type(key)
    if key in _BOOL_ALIASES and raw.strip().lower() in _BOOL_WORDS:
        value: Any = _BOOL_ALIASES[key][_BOOL_WORDS[raw.strip().lower()]]
    elif field_type is str:
        value = raw
    else:
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
    nested: dict[str, Any] = {}
    node = nested
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return nested


def _field_type(key: str) -> Any:
    """The annotated type of ``key`` in the schema, or None for an unknown key (reported at merge)."""
    cls: Any = Config
    for part in key.split("."):
        if not dataclasses.is_dataclass(cls):
            return None
        fields = {f.name: f for f in dataclasses.fields(cls)}
        if part not in fields:
            return None
        cls = _resolve_type(fields[part].type)
    return cls


def _resolve_type(annotation: Any) -> Any:
    names = {"str": str, "int": int, "float": float, "bool": bool}
    if isinstance(annotation, str):
        if annotation in names:
            return names[annotation]
        return globals().get(annotation, annotation)
    return annotation


def _unbool_choices(data: dict[str, Any]) -> dict[str, Any]:
    for dotted, aliases in _BOOL_ALIASES.items():
        section, key = dotted.split(".")
        value = data.get(section, {}).get(key) if isinstance(data.get(section), dict) else None
        if isinstance(value, bool):
            data[section][key] = aliases[value]
    return data


def _merge(base: DictConfig, update: dict[str, Any], source: str) -> DictConfig:
    try:
        return OmegaConf.merge(base, update)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or ""
        if "Key" in type(exc).__name__ and key:
            raise ConfigError(f"unknown config key '{key}' in {source}{_suggest(key)}") from None
        if key:
            raise ConfigError(f"bad value for '{key}' in {source}: {_first_sentence(exc)}") from None
        raise ConfigError(f"{source}: {_one_line(exc)}") from None


def _suggest(key: str) -> str:
    close = difflib.get_close_matches(key, [info.key for info in keys()], n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _first_sentence(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0]


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


def _to_dataclass(data: dict[str, Any]) -> Config:
    sections = {}
    for section in dataclasses.fields(Config):
        section_cls = _resolve_type(section.type)
        sections[section.name] = section_cls(**data[section.name])
    return Config(**sections)


def validate(cfg: Config) -> None:
    """Reject impossible values with a one-line reason that names the key."""

    def require(ok: bool, key: str, why: str) -> None:
        if not ok:
            raise ConfigError(f"bad value for '{key}' ({_get(cfg, key)!r}): {why}")

    _validate_generic(cfg, require)
    require(bool(cfg.run.name.strip()), "run.name", "must not be empty")
    require("/" not in cfg.run.name, "run.name", "must not contain '/' (use run.dir for a path)")
    require(bool(cfg.run.dir.strip()), "run.dir", "must not be empty")
    require("\0" not in cfg.run.dir + cfg.data.path, "run.dir" if "\0" in cfg.run.dir else "data.path", "must not contain a NUL byte")
    require(cfg.train.max_steps >= 1, "train.max_steps", "must be at least 1")
    require(0 <= cfg.train.seed <= MAX_SEED, "train.seed", f"must be in 0..{MAX_SEED} (2**32 - 1)")
    require(cfg.train.batch_size >= 1, "train.batch_size", "must be at least 1")
    require(cfg.train.lr > 0, "train.lr", "must be positive")
    require(0 <= cfg.train.min_lr_ratio <= 1, "train.min_lr_ratio", "must be in [0, 1]")
    require(cfg.train.warmup_steps >= 0, "train.warmup_steps", "must be >= 0")
    require(cfg.train.grad_clip >= 0, "train.grad_clip", "must be >= 0 (0 disables clipping)")
    require(cfg.train.weight_decay >= 0, "train.weight_decay", "must be >= 0")
    require(0 < cfg.train.timeout_s <= MAX_TIMEOUT_S, "train.timeout_s", f"must be positive and at most {MAX_TIMEOUT_S:.0f} s (30 days)")
    require(0 <= cfg.train.warm_restarts <= 1000, "train.warm_restarts", "must be between 0 (off) and 1000")
    require(1 <= cfg.model.vocab_size, "model.vocab_size", "must be at least 1")
    if getattr(cfg.data, "format", "text") == "text":
        require(cfg.model.vocab_size >= 256, "model.vocab_size", "byte-level text has token ids 0..255: needs at least 256")
    require(2 <= cfg.model.seq_len <= MAX_SEQ_LEN, "model.seq_len", f"must be in 2..{MAX_SEQ_LEN:,}")
    require(cfg.model.n_layer >= 1, "model.n_layer", "must be at least 1")
    require(cfg.model.n_head >= 1, "model.n_head", "must be at least 1")
    require(cfg.model.d_model >= 1, "model.d_model", "must be at least 1")
    require(cfg.model.d_model % max(cfg.model.n_head, 1) == 0, "model.d_model", "must be divisible by model.n_head")
    require(0 <= cfg.model.dropout < 1, "model.dropout", "must be in [0, 1)")
    require(cfg.data.num_workers >= 0, "data.num_workers", "must be >= 0")
    require(cfg.train.gc_interval >= 0, "train.gc_interval", "must be >= 0 (0 = Python's automatic collection)")
    require(cfg.train.spike_factor == 0 or cfg.train.spike_factor > 1, "train.spike_factor", "must be 0 (off) or above 1")
    require(cfg.train.max_rollbacks >= 0, "train.max_rollbacks", "must be >= 0")
    require(cfg.train.rollback_skip_batches >= -1, "train.rollback_skip_batches", "must be >= 0, or -1 for automatic")
    require(cfg.log.interval >= 1, "log.interval", "must be at least 1")
    try:
        cfg.checkpoint.validate()
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def _validate_generic(cfg: Config, require: Any) -> None:
    """Rules every key of a kind obeys: choices, finite floats, integers that fit 32 bits (the checkpoint section
    checks its own, in ``CheckpointOptions.validate``)."""
    for info in keys():
        if info.key.startswith("checkpoint."):
            continue
        problem = value_problem(_get(cfg, info.key), info.choices, limit_int=info.key != "train.seed")
        require(problem is None, info.key, problem or "")


def _get(cfg: Config, dotted: str) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


def to_yaml(cfg: Config) -> str:
    """The fully resolved config as YAML, as saved in the run directory."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
