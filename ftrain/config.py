"""Typed run configuration: one dataclass per section, loaded from YAML plus ``key=value`` overrides.

Every mistake a user can make here (unknown key, wrong type, impossible value) becomes one ``ConfigError``
whose message is a single line naming the key.
"""

from __future__ import annotations

import dataclasses
import difflib
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "recipes" / "configs" / "default.yaml"

CHECKPOINT_MODES = ("async", "async_process", "sync", "off")
ON_SAVE_FAILURE = ("continue", "abort")
ON_WORLD_SIZE_CHANGE = ("reshard", "refuse")


class ConfigError(ValueError):
    """A problem with the user's configuration; its message is one line."""


@dataclass
class RunConfig:
    name: str = "default"
    dir: str = "runs/${run.name}"


@dataclass
class ModelConfig:
    vocab_size: int = 256
    seq_len: int = 128
    n_layer: int = 2
    n_head: int = 4
    d_model: int = 128
    dropout: float = 0.1


@dataclass
class DataConfig:
    path: str = ""
    num_workers: int = 0
    record_samples: bool = False


@dataclass
class TrainConfig:
    max_steps: int = 300
    seed: int = 1234
    batch_size: int = 8
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    device: str = "auto"
    timeout_s: float = 300.0
    gc_interval: int = 50


@dataclass
class CheckpointConfig:
    interval: int = 50
    mode: str = "async"
    keep_last: int = 3
    keep_every: int = 0
    resume: str = "auto"
    on_failure: str = "continue"
    on_world_size_change: str = "reshard"
    verify: str = "checksums"
    signals: list[str] = field(default_factory=lambda: ["SIGTERM", "SIGUSR1"])
    timeout_s: float = 600.0
    write_threads: int = 0


@dataclass
class LogConfig:
    interval: int = 10


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)


# YAML 1.1 reads these words as booleans; for choice keys we map them back to what the user meant.
_BOOL_WORDS = {"off": False, "no": False, "false": False, "on": True, "yes": True, "true": True}
_BOOL_ALIASES = {
    "checkpoint.mode": {False: "off", True: "async"},
    "checkpoint.resume": {False: "never", True: "auto"},
}


def load_config(argv: list[str] | None = None) -> Config:
    """Build the config from ``[--config FILE] [key=value ...]`` on top of the defaults."""
    argv = list(argv or [])
    config_files = [DEFAULT_CONFIG]
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

    schema = OmegaConf.structured(Config)
    merged: DictConfig = schema
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
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
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
    hints = None
    for part in key.split("."):
        if not dataclasses.is_dataclass(cls):
            return None
        fields = {f.name: f for f in dataclasses.fields(cls)}
        if part not in fields:
            return None
        hints = fields[part].type
        cls = _resolve_type(hints)
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
    known = [
        f"{section.name}.{f.name}"
        for section in dataclasses.fields(Config)
        for f in dataclasses.fields(_resolve_type(section.type))
    ]
    close = difflib.get_close_matches(key, known, n=1)
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
            value = _get(cfg, key)
            raise ConfigError(f"bad value for '{key}' ({value!r}): {why}")

    require(bool(cfg.run.name.strip()), "run.name", "must not be empty")
    require("/" not in cfg.run.name, "run.name", "must not contain '/' (use run.dir for a path)")
    require(bool(cfg.run.dir.strip()), "run.dir", "must not be empty")
    require(cfg.train.max_steps >= 1, "train.max_steps", "must be at least 1")
    require(cfg.train.batch_size >= 1, "train.batch_size", "must be at least 1")
    require(cfg.train.lr > 0, "train.lr", "must be positive")
    require(0 <= cfg.train.min_lr_ratio <= 1, "train.min_lr_ratio", "must be in [0, 1]")
    require(cfg.train.warmup_steps >= 0, "train.warmup_steps", "must be >= 0")
    require(cfg.train.grad_clip >= 0, "train.grad_clip", "must be >= 0 (0 disables clipping)")
    require(cfg.train.weight_decay >= 0, "train.weight_decay", "must be >= 0")
    require(cfg.train.timeout_s > 0, "train.timeout_s", "must be positive")
    require(cfg.train.device in ("auto", "cpu", "cuda"), "train.device", "must be one of auto, cpu, cuda")
    require(1 <= cfg.model.vocab_size <= 256, "model.vocab_size", "byte-level tokens need 1..256")
    require(cfg.model.seq_len >= 2, "model.seq_len", "must be at least 2")
    require(cfg.model.n_layer >= 1, "model.n_layer", "must be at least 1")
    require(cfg.model.n_head >= 1, "model.n_head", "must be at least 1")
    require(cfg.model.d_model % max(cfg.model.n_head, 1) == 0, "model.d_model", "must be divisible by model.n_head")
    require(0 <= cfg.model.dropout < 1, "model.dropout", "must be in [0, 1)")
    require(cfg.data.num_workers >= 0, "data.num_workers", "must be >= 0")
    require(cfg.checkpoint.interval >= 1, "checkpoint.interval", "must be at least 1 step")
    require(cfg.checkpoint.mode in CHECKPOINT_MODES, "checkpoint.mode", f"must be one of {', '.join(CHECKPOINT_MODES)}")
    require(cfg.checkpoint.keep_last >= 1, "checkpoint.keep_last", "must be at least 1 (the latest is never deleted)")
    require(cfg.checkpoint.keep_every >= 0, "checkpoint.keep_every", "must be >= 0 (0 keeps none permanently)")
    require(cfg.checkpoint.on_failure in ON_SAVE_FAILURE, "checkpoint.on_failure", "must be continue or abort")
    require(
        cfg.checkpoint.on_world_size_change in ON_WORLD_SIZE_CHANGE,
        "checkpoint.on_world_size_change",
        "must be reshard or refuse",
    )
    require(cfg.checkpoint.verify in ("sizes", "checksums"), "checkpoint.verify", "must be sizes or checksums")
    require(cfg.checkpoint.timeout_s > 0, "checkpoint.timeout_s", "must be positive")
    require(cfg.train.gc_interval >= 0, "train.gc_interval", "must be >= 0 (0 = Python's automatic collection)")
    require(cfg.checkpoint.write_threads >= 0, "checkpoint.write_threads", "must be >= 0 (0 = one per free core, up to 4)")
    require(cfg.log.interval >= 1, "log.interval", "must be at least 1")
    resume = cfg.checkpoint.resume
    require(bool(resume.strip()), "checkpoint.resume", "must be auto, never, a step number or a path")
    for name in cfg.checkpoint.signals:
        require(isinstance(getattr(signal, str(name), None), signal.Signals), "checkpoint.signals", f"unknown signal {name!r}")


def _get(cfg: Config, dotted: str) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


def to_yaml(cfg: Config) -> str:
    """The fully resolved config as YAML, as saved in the run directory."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
