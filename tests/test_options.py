"""ftrain.CheckpointOptions: one typed source for every checkpoint option, shown by the Checkpointer's signature
and help, taken as keywords or as one object, and the recipe's config section built from it."""

from __future__ import annotations

import dataclasses
import inspect
import pydoc
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

import ftrain
from ftrain.checkpoint import options as opts
from ftrain.config import CheckpointConfig, load_config

from conftest import REPO

FIELDS = dataclasses.fields(ftrain.CheckpointOptions)


def _model_and_optimizer() -> tuple[nn.Module, torch.optim.Optimizer]:
    model = nn.Linear(4, 2)
    return model, torch.optim.SGD(model.parameters(), lr=0.1)


def test_the_signature_shows_every_option_with_its_default():
    params = inspect.signature(ftrain.Checkpointer).parameters
    assert not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    for f in FIELDS:
        assert params[opts.keyword_of(f)].kind is inspect.Parameter.KEYWORD_ONLY, f.name
        assert params[opts.keyword_of(f)].default == opts.option_default(f), f.name
    assert params["interval"].default == "50" and params["keep_last"].default == 3
    assert params["signals"].default == ["SIGTERM", "SIGUSR1"]
    assert {"run_dir", "model", "optimizer", "options"} <= set(params)
    assert params["checkpoint_dir"].default == ""  # config key checkpoint.dir: the keyword says what it is


def test_help_shows_every_option_with_its_meaning():
    rendered = pydoc.render_doc(ftrain.Checkpointer, renderer=pydoc.plaintext)
    text = " ".join(" ".join(line.lstrip().removeprefix("|") for line in rendered.splitlines()).split())
    for f in FIELDS:
        assert f"{opts.keyword_of(f)} (" in text, f.name
        assert " ".join(f.metadata["help"].split()) in text, f.name
    assert "every field of CheckpointOptions" not in text  # the placeholder was filled in


def _options_taken(run_dir, *args, **kwargs) -> ftrain.CheckpointOptions:
    """The options a Checkpointer built this way runs with (it is closed again at once: signal handlers go back)."""
    model, optimizer = _model_and_optimizer()
    build = kwargs.pop("build", ftrain.Checkpointer)
    ckpt = build(*args, run_dir, model=model, optimizer=optimizer, **kwargs)  # from_config: (section, run_dir)
    ckpt.abort()
    return ckpt.options


def test_keyword_and_options_forms_are_equal(tmp_path):
    keywords = _options_taken(tmp_path / "a", interval=100, keep_last=2, mode="sync")
    given = ftrain.CheckpointOptions(interval=100, keep_last=2, mode="sync")
    by_object = _options_taken(tmp_path / "b", options=given)
    assert keywords == by_object == ftrain.CheckpointOptions(interval="100", keep_last=2, mode="sync")
    assert by_object is not given  # a copy: changing it later changes nothing here
    # keywords beside options= replace its fields
    both = _options_taken(tmp_path / "c", options=given, keep_last=7)
    assert both.keep_last == 7 and both.interval == "100" and given.keep_last == 2


def test_an_unknown_keyword_is_a_type_error_naming_the_valid_ones(tmp_path):
    model, optimizer = _model_and_optimizer()
    with pytest.raises(TypeError, match="intervall") as info:
        ftrain.Checkpointer(tmp_path, model=model, optimizer=optimizer, intervall=5)
    assert all(opts.keyword_of(f) in str(info.value) for f in FIELDS)
    with pytest.raises(TypeError, match="unexpected keyword argument 'intervall'"):
        ftrain.CheckpointOptions(intervall=5)
    assert not tmp_path.joinpath("LOCK").exists()


def test_from_config_equals_the_keywords(tmp_path):
    cfg = load_config(["checkpoint.interval=7", "checkpoint.keep_last=4", "checkpoint.resume=never"])
    assert isinstance(cfg.checkpoint, ftrain.CheckpointOptions) and CheckpointConfig is ftrain.CheckpointOptions
    from_config = _options_taken(tmp_path / "a", cfg.checkpoint, build=ftrain.Checkpointer.from_config)
    keywords = _options_taken(tmp_path / "b", interval=7, keep_last=4, resume="never")
    assert from_config == keywords


def test_validate_names_the_key_in_one_line():
    for bad, key in [
        (dict(mode="sometimes"), "checkpoint.mode"),
        (dict(interval="0"), "checkpoint.interval"),
        (dict(keep_last=0), "checkpoint.keep_last"),
        (dict(timeout_s=float("inf")), "checkpoint.timeout_s"),
        (dict(signals=["SIGKILL"]), "checkpoint.signals"),
        (dict(keep_every="3"), "checkpoint.keep_every"),
        (dict(write_threads=2**40), "checkpoint.write_threads"),
    ]:
        with pytest.raises(ValueError, match=f"'{key}'") as info:
            ftrain.CheckpointOptions(**bad).validate()
        assert "\n" not in str(info.value)
    ftrain.CheckpointOptions().validate()


def test_keyword_forms_mean_what_the_config_would():
    given = ftrain.CheckpointOptions(interval=5, local_interval=0, resume=12, signals="SIGUSR1", local_dir=REPO)
    assert (given.interval, given.local_interval, given.resume) == ("5", "0", "12")
    assert given.signals == ["SIGUSR1"] and given.local_dir == str(REPO)
    given.validate()


@pytest.mark.parametrize("word, mode", [("off", "off"), ("no", "off"), ("false", "off"), ("on", "async")])
def test_yaml_boolean_words_still_reach_the_options(word, mode, tmp_path):
    assert load_config([f"checkpoint.mode={word}"]).checkpoint.mode == mode
    extra = tmp_path / "x.yaml"
    extra.write_text(f"checkpoint:\n  mode: {word}\n  resume: no\n  export: off\n")
    section = load_config(["--config", str(extra)]).checkpoint
    assert (section.mode, section.resume, section.export) == (mode, "never", "none")


def test_the_defaults_are_the_config_defaults():
    assert load_config([]).checkpoint == ftrain.CheckpointOptions()


def test_a_checkpointer_never_imports_omegaconf(tmp_path):
    code = (
        "import sys, ftrain, torch\n"
        "model = torch.nn.Linear(4, 2)\n"
        f"ckpt = ftrain.Checkpointer({str(tmp_path)!r}, model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),"
        " options=ftrain.CheckpointOptions(interval=2), keep_last=2)\n"
        "ckpt.load(); ckpt.save(1); ckpt.close()\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] == 'omegaconf' or m in ('ftrain.config', 'ftrain.preflight'))\n"
        "assert not bad, bad\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr


def test_the_options_module_imports_neither_torch_nor_omegaconf():
    code = "import sys, ftrain.checkpoint.options, ftrain.config; assert 'torch' not in sys.modules, 'torch'"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
