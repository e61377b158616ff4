from pathlib import Path

import pytest

from ftrain.config import ConfigError, load_config

CONFIGS = sorted((Path(__file__).resolve().parent.parent / "recipes" / "configs").glob("*.yaml"))


def test_defaults_load():
    cfg = load_config([])
    assert cfg.run.dir == "runs/default"
    assert cfg.checkpoint.mode == "async"
    assert cfg.train.max_steps > 0


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_loads(path):
    load_config(["--config", str(path)])


def test_overrides_and_interpolation():
    cfg = load_config(["run.name=exp1", "train.max_steps=7", "train.lr=1e-4", "checkpoint.signals=[SIGUSR1]"])
    assert cfg.run.dir == "runs/exp1"
    assert cfg.train.max_steps == 7 and cfg.train.lr == pytest.approx(1e-4)
    assert cfg.checkpoint.signals == ["SIGUSR1"]


def _error(argv):
    with pytest.raises(ConfigError) as info:
        load_config(argv)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_unknown_key_is_named_with_a_suggestion():
    message = _error(["train.max_stepz=3"])
    assert "'train.max_stepz'" in message and "train.max_steps" in message


def test_unknown_section():
    assert "'bogus" in _error(["bogus.key=1"])


def test_wrong_type():
    assert "'train.max_steps'" in _error(["train.max_steps=many"])


@pytest.mark.parametrize(
    "override, key",
    [
        ("train.max_steps=0", "train.max_steps"),
        ("checkpoint.mode=fast", "checkpoint.mode"),
        ("model.d_model=130", "model.d_model"),
        ("checkpoint.keep_last=0", "checkpoint.keep_last"),
        ("checkpoint.signals=[SIGNOPE]", "checkpoint.signals"),
        ("run.name=a/b", "run.name"),
        ("checkpoint.write_threads=-1", "checkpoint.write_threads"),
        ("train.gc_interval=-5", "train.gc_interval"),
    ],
)
def test_impossible_values(override, key):
    assert f"'{key}'" in _error([override])


@pytest.mark.parametrize("word, mode", [("off", "off"), ("no", "off"), ("false", "off"), ("on", "async")])
def test_yaml_boolean_words_mean_what_the_user_meant(word, mode):
    assert load_config([f"checkpoint.mode={word}"]).checkpoint.mode == mode


def test_yaml_file_boolean_words(tmp_path):
    extra = tmp_path / "x.yaml"
    extra.write_text("checkpoint:\n  mode: off\n  resume: no\n")
    cfg = load_config(["--config", str(extra)])
    assert cfg.checkpoint.mode == "off" and cfg.checkpoint.resume == "never"


def test_string_fields_keep_what_was_typed():
    assert load_config(["run.name=007"]).run.name == "007"
    assert load_config(["checkpoint.resume=40"]).checkpoint.resume == "40"


def test_missing_config_file():
    assert "not found" in _error(["--config", "/nonexistent.yaml"])


def test_unknown_key_in_yaml_file(tmp_path):
    extra = tmp_path / "bad.yaml"
    extra.write_text("train:\n  max_stepz: 3\n")
    message = _error(["--config", str(extra)])
    assert "'train.max_stepz'" in message and "bad.yaml" in message


# ------------------------------------------------------------------------------- defaults live in the package
def test_defaults_come_from_the_package_alone(tmp_path):
    """An installed ftrain has no recipes/ next to it: a copy of the package by itself must load its defaults."""
    import shutil
    import subprocess
    import sys

    import ftrain

    shutil.copytree(Path(ftrain.__file__).parent, tmp_path / "pkg" / "ftrain", ignore=shutil.ignore_patterns("__pycache__"))
    code = "from ftrain.config import load_config; c = load_config([]); print(c.train.max_steps, c.checkpoint.signals)"
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env={"PYTHONPATH": str(tmp_path / "pkg")},
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["300", "['SIGTERM',", "'SIGUSR1']"]


def test_shipped_default_yaml_is_the_typed_defaults():
    """recipes/configs/default.yaml is the example users copy: it must say exactly what the code does."""
    from ftrain.config import defaults_yaml

    shipped = CONFIGS[0].parent / "default.yaml"
    assert shipped.read_text() == defaults_yaml(), (
        "regenerate: python -c 'from ftrain.config import defaults_yaml; print(defaults_yaml(), end=\"\")' "
        "> recipes/configs/default.yaml"
    )
    assert load_config(["--config", str(shipped)]) == load_config([])


def test_every_key_has_a_comment():
    from ftrain.config import keys

    infos = keys()
    assert {info.key for info in infos} >= {"train.lr", "log.level", "checkpoint.signals", "run.dir"}
    for info in infos:
        assert info.help and "\n" not in info.help, info.key


def test_log_level():
    assert load_config([]).log.level == "info"
    assert load_config(["log.level=debug"]).log.level == "debug"
    assert "'log.level'" in _error(["log.level=loud"])


# --------------------------------------------------------------------------- values that make no sense (#19)
@pytest.mark.parametrize(
    "override, key",
    [
        ("train.timeout_s=.inf", "train.timeout_s"),
        ("checkpoint.timeout_s=.inf", "checkpoint.timeout_s"),
        ("checkpoint.timeout_s=1e12", "checkpoint.timeout_s"),
        ("train.timeout_s=.nan", "train.timeout_s"),
        ("train.lr=.inf", "train.lr"),
        ("train.lr=.nan", "train.lr"),
        ("train.lr=-.inf", "train.lr"),
        ("train.grad_clip=.inf", "train.grad_clip"),
        ("train.weight_decay=.inf", "train.weight_decay"),
        ("train.min_lr_ratio=.nan", "train.min_lr_ratio"),
        ("model.dropout=.nan", "model.dropout"),
        ("model.seq_len=10000000", "model.seq_len"),
        ("model.seq_len=1", "model.seq_len"),
        ("model.d_model=0", "model.d_model"),
        ("model.d_model=-4", "model.d_model"),
        ("model.n_head=0", "model.n_head"),
        ("model.n_layer=0", "model.n_layer"),
        ("model.vocab_size=0", "model.vocab_size"),
        ("model.vocab_size=10", "model.vocab_size"),  # byte-level text has ids up to 255
        ("model.vocab_size=4294967296", "model.vocab_size"),
        ("train.batch_size=0", "train.batch_size"),
        ("train.seed=18446744073709551616", "train.seed"),
        ("train.seed=4294967296", "train.seed"),
        ("train.seed=-1", "train.seed"),
        ("train.max_steps=99999999999", "train.max_steps"),
        ("data.num_workers=-1", "data.num_workers"),
        ("checkpoint.signals=[SIGKILL]", "checkpoint.signals"),
        ("checkpoint.signals=[SIGTERM,SIGSTOP]", "checkpoint.signals"),
        ("checkpoint.signals=[sigterm]", "checkpoint.signals"),
        ("checkpoint.signals=[SIG_IGN]", "checkpoint.signals"),
        ("checkpoint.signals=[15]", "checkpoint.signals"),
        ("train.device=tpu", "train.device"),
    ],
)
def test_values_that_make_no_sense(override, key):
    message = _error([override])
    assert f"'{key}'" in message


def test_largest_seed_fits_what_the_code_seeds_with():
    """seed_rank_rngs seeds torch with (seed * 1_000_003 + step) * 1009 + rank + 1: it must fit manual_seed."""
    import torch

    from ftrain.config import MAX_INT, MAX_SEED

    cfg = load_config([f"train.seed={MAX_SEED}", f"train.max_steps={MAX_INT}"])
    value = (cfg.train.seed * 1_000_003 + cfg.train.max_steps) * 1009 + 1024 + 1
    assert value < 2**63
    torch.Generator().manual_seed(value)


@pytest.mark.parametrize(
    "content",
    [b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe binary", b"train:\n  lr: \x00\x01\x02\n", b"\xff\xfe\x00t\x00r"],
    ids=["png", "nul-bytes", "utf16"],
)
def test_binary_config_file_is_one_line(tmp_path, content):
    path = tmp_path / "model.bin"
    path.write_bytes(content)
    assert str(path) in _error(["--config", str(path)])


def test_config_path_that_is_a_directory(tmp_path):
    assert "not a regular file" in _error(["--config", str(tmp_path)])
