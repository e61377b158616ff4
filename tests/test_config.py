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
