"""ftrain-train as a command: --help, --print-config, bad input that touches nothing, logging, preemption status."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from conftest import FAST, REPO, TORCHRUN, Job, check_ok, run_train, train_cmd, wait_for
from ftrain.__main__ import COMMANDS
from ftrain.config import keys
from ftrain.metrics import Progress, setup_logging


def ftrain(*args: str, cwd: Path = REPO, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ftrain", *args], capture_output=True, text=True, cwd=cwd, timeout=timeout)


def tree_hashes(root: Path) -> dict[str, str]:
    """Every file and directory under ``root``: a file by the hash of its bytes, a directory by its name."""
    found = {}
    for path in sorted(root.rglob("*")):
        name = str(path.relative_to(root))
        found[name] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
    return found


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One short, finished one-rank run: config.yaml, tb/, checkpoints — what a bad start must leave alone."""
    run_dir = tmp_path_factory.mktemp("finished")
    check_ok(run_train(run_dir, "train.max_steps=10", nproc=0))
    assert (run_dir / "config.yaml").is_file() and list((run_dir / "checkpoints").iterdir())
    return run_dir


# --------------------------------------------------------------------------------------- --help, --print-config
def test_help_lists_every_key_with_type_default_and_comment():
    proc = ftrain("train", "--help")
    assert proc.returncode == 0 and proc.stderr == ""
    rows = {line.split()[0]: line for line in proc.stdout.splitlines() if line.startswith("  ") and "." in line.split()[0]}
    for info in keys():
        row = rows[info.key]
        assert f" {info.type} " in row and row.rstrip().endswith(info.help), row
    assert "75" in proc.stdout and "--print-config" in proc.stdout
    assert subprocess.run([sys.executable, str(REPO / "recipes" / "train.py"), "-h"], capture_output=True).returncode == 0


def test_print_config_resolves_and_touches_nothing(tmp_path):
    run_dir = tmp_path / "new"
    proc = ftrain("train", "--print-config", f"run.dir={run_dir}", "train.lr=1e-4", "checkpoint.mode=off", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    import yaml

    printed = yaml.safe_load(proc.stdout)
    assert printed["run"]["dir"] == str(run_dir) and printed["train"]["lr"] == 1e-4
    assert printed["checkpoint"]["mode"] == "off" and printed["log"]["level"] == "info"
    assert not run_dir.exists() and os.listdir(tmp_path) == []
    bad = ftrain("train", "--print-config", "train.lr=fast")
    assert bad.returncode == 2 and len(bad.stderr.splitlines()) == 1


def test_python_m_ftrain_lists_the_installed_commands():
    proc = ftrain()
    assert proc.returncode == 0
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {f"ftrain-{name}": target for name, (target, _) in COMMANDS.items()}
    for name in scripts:
        assert name in proc.stdout
    unknown = ftrain("nope")
    assert unknown.returncode == 2 and len(unknown.stderr.splitlines()) == 1


# ------------------------------------------------------------------------------------- bad input touches nothing
def _bad_cases(tmp: Path, run_dir: Path) -> dict[str, list[str]]:
    (tmp / "empty.txt").write_bytes(b"")
    (tmp / "short.txt").write_text("too short for one window")
    (tmp / "few.txt").write_text("x" * 300)  # 4 windows of 64: one step of batch 8 needs 8
    (tmp / "empty_dir").mkdir(exist_ok=True)
    (tmp / "binary.yaml").write_bytes(bytes(range(256)) * 4)
    (tmp / "unknown.yaml").write_text("train:\n  max_stepz: 3\n")
    return {
        "missing data path": ["data.path=/nonexistent/corpus.txt"],
        "empty data file": [f"data.path={tmp / 'empty.txt'}"],
        "data shorter than one window": [f"data.path={tmp / 'short.txt'}"],
        "data shorter than one step": [f"data.path={tmp / 'few.txt'}", "train.batch_size=8"],
        "data dir without text": [f"data.path={tmp / 'empty_dir'}"],
        "run.dir is a file": [f"run.dir={run_dir / 'config.yaml'}"],
        "run.dir under a file": [f"run.dir={run_dir / 'config.yaml' / 'sub'}"],
        "unknown key": ["train.max_stepz=3"],
        "unknown key in a file": ["--config", str(tmp / "unknown.yaml")],
        "wrong type": ["train.max_steps=many"],
        "binary --config": ["--config", str(tmp / "binary.yaml")],
        "missing --config": ["--config", str(tmp / "absent.yaml")],
        "SIGKILL in signals": ["checkpoint.signals=[SIGTERM,SIGKILL]"],
        "unknown signal": ["checkpoint.signals=[SIGNOPE]"],
        "infinite train.timeout_s": ["train.timeout_s=.inf"],
        "infinite checkpoint.timeout_s": ["checkpoint.timeout_s=.inf"],
        "infinite lr": ["train.lr=.inf"],
        "vocab too small for bytes": ["model.vocab_size=10"],
        "absurd seq_len": ["model.seq_len=100000000"],
        "zero d_model": ["model.d_model=0"],
        "huge seed": ["train.seed=99999999999999999999"],
        "bad log level": ["log.level=chatty"],
    }


CASE_NAMES = [
    "missing data path", "empty data file", "data shorter than one window", "data shorter than one step",
    "data dir without text", "run.dir is a file", "run.dir under a file", "unknown key", "unknown key in a file",
    "wrong type", "binary --config", "missing --config", "SIGKILL in signals", "unknown signal",
    "infinite train.timeout_s", "infinite checkpoint.timeout_s", "infinite lr", "vocab too small for bytes",
    "absurd seq_len", "zero d_model", "huge seed", "bad log level",
]


@pytest.mark.parametrize("case", CASE_NAMES)
def test_bad_input_is_one_line_exit_2_and_the_run_directory_is_unchanged(case, finished_run, tmp_path, capsys, monkeypatch):
    """In this process (fast): ftrain.cli.main returns 2 for these before it builds anything."""
    from ftrain.cli import main

    args = _bad_cases(tmp_path, finished_run)[case]
    before = tree_hashes(finished_run)
    monkeypatch.chdir(tmp_path)
    assert main([f"run.dir={finished_run}", "model.seq_len=64", *args]) == 2
    out, err = capsys.readouterr()
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("ftrain: config error: "), err
    assert out == ""
    assert tree_hashes(finished_run) == before


@pytest.mark.parametrize("case", ["missing data path", "run.dir under a file", "binary --config"])
def test_bad_input_as_a_process(case, finished_run, tmp_path):
    args = _bad_cases(tmp_path, finished_run)[case]
    before = tree_hashes(finished_run)
    proc = subprocess.run(
        [sys.executable, str(REPO / "recipes" / "train.py"), f"run.dir={finished_run}", *args],
        capture_output=True, text=True, cwd=tmp_path, timeout=120,
    )
    assert proc.returncode == 2 and proc.stdout == ""
    assert len(proc.stderr.splitlines()) == 1 and proc.stderr.startswith("ftrain: config error: "), proc.stderr
    assert tree_hashes(finished_run) == before


def test_bad_input_under_torchrun_is_said_once_and_touches_nothing(finished_run, tmp_path):
    before = tree_hashes(finished_run)
    proc = subprocess.run(
        [*TORCHRUN, "--standalone", "--nproc_per_node=2", "-m", "ftrain", "train", f"run.dir={finished_run}",
         "data.path=/nonexistent/corpus.txt"],
        capture_output=True, text=True, cwd=tmp_path, timeout=120,
    )
    assert proc.returncode != 0
    assert proc.stderr.count("ftrain: config error: data.path /nonexistent/corpus.txt does not exist") == 1
    assert tree_hashes(finished_run) == before


# ------------------------------------------------------------- issue 28 item 16: a bad checkpoint.initial_load
def _not_a_source(tmp: Path, name: str) -> Path:
    """A path that checkpoint.initial_load cannot start from."""
    if name == "missing path":
        return tmp / "no_such_checkpoint"
    if name == "a text file":
        (tmp / "notes.txt").write_text("not weights\n")
        return tmp / "notes.txt"
    if name == "a .safetensors that is none":
        (tmp / "model.safetensors").write_bytes(b"\xff" * 64)
        return tmp / "model.safetensors"
    (tmp / "folder").mkdir()  # "a directory that is no checkpoint"
    (tmp / "folder" / "readme.md").write_text("hello\n")
    return tmp / "folder"


INITIAL_LOAD_CASES = ["missing path", "a text file", "a .safetensors that is none", "a directory that is no checkpoint"]


def _refused_as_config(proc: subprocess.CompletedProcess, needle: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-2000:], proc.stderr[-3000:])
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("ftrain: config error: "), proc.stderr
    assert needle in lines[0], lines[0]
    assert proc.stdout == ""


@pytest.mark.parametrize("case", INITIAL_LOAD_CASES)
def test_bad_initial_load_is_one_line_exit_2_and_creates_no_run_directory(case, tmp_path):
    """Issue 28 #16: it took the lock and wrote RUN_ID, config.yaml and checkpoints/, then exited 1."""
    source = _not_a_source(tmp_path, case)
    run_dir = tmp_path / "runs" / "new"
    before = tree_hashes(tmp_path)
    proc = subprocess.run(
        train_cmd(run_dir, f"checkpoint.initial_load={source}", nproc=0), capture_output=True, text=True, cwd=tmp_path,
        timeout=180,
    )
    _refused_as_config(proc, f"checkpoint.initial_load: warm start from {source}")
    assert not run_dir.exists() and tree_hashes(tmp_path) == before


def test_bad_initial_load_is_refused_even_when_the_run_resumes_its_own(finished_run, tmp_path):
    """The finished run would resume its own checkpoint and never read initial_load; a bad path is still refused,
    and the run directory stays byte for byte as it was."""
    before = tree_hashes(finished_run)
    proc = subprocess.run(
        train_cmd(finished_run, "train.max_steps=12", f"checkpoint.initial_load={tmp_path / 'gone'}", nproc=0),
        capture_output=True, text=True, cwd=tmp_path, timeout=180,
    )
    _refused_as_config(proc, "even when the run has a checkpoint of its own")
    assert tree_hashes(finished_run) == before


def test_a_good_initial_load_starts_the_run_from_it(finished_run, tmp_path):
    """The control: a run directory as initial_load passes the check and the new run starts from its weights."""
    run_dir = tmp_path / "warm"
    proc = run_train(run_dir, "train.max_steps=2", f"checkpoint.initial_load={finished_run}", nproc=0)
    check_ok(proc)
    assert "warm start: model from ftrain checkpoint" in proc.stdout + proc.stderr
    assert (run_dir / "checkpoints" / "step_00000002" / "COMPLETE").is_file()


# ------------------------------------------------------------- issue 28 item 17: an over-long run.name or run.dir
def _path_of_length(base: Path, length: int) -> Path:
    """A path under ``base`` of exactly ``length`` bytes, in components of at most 200 bytes."""
    path = base
    while len(str(path)) < length:
        room = length - len(str(path)) - 1  # after the separator
        size = room if room <= 200 else (150 if room - 200 < 2 else 200)
        path = path / ("d" * size)
    assert len(str(path)) == length
    return path


def _run_dir_at_the_path_limit(tmp: Path, extra: int = 0) -> Path:
    """The longest run.dir whose deepest file fits the path limit (4096 bytes with the final NUL), plus ``extra``."""
    from ftrain.preflight import run_dir_deepest

    tail = max(run_dir_deepest(), key=len)
    return _path_of_length(tmp / "deep", os.pathconf(tmp, "PC_PATH_MAX") - 1 - len(tail) - 1 + extra)


def _too_long(tmp: Path, case: str, finished_run: Path) -> tuple[list[str], str]:
    """(the arguments after the recipe, a word the one-line error must hold)."""
    over = "x" * (os.pathconf(tmp, "PC_NAME_MAX") + 1)
    if case == "run.name over the file-name limit":
        return [*FAST, f"run.name={over}"], "run.name is"
    if case == "a run.dir component over the file-name limit":
        return [*FAST, f"run.dir={tmp / 'runs' / over / 'r'}"], "run.dir's component"
    if case == "run.dir over the path limit":
        return [*FAST, f"run.dir={_path_of_length(tmp / 'deep', 4200)}"], "run.dir is too long"
    if case == "run.dir one byte too deep for its deepest file":
        return [*FAST, f"run.dir={_run_dir_at_the_path_limit(tmp, extra=1)}"], "run.dir is too long"
    return [*FAST, f"run.dir={finished_run}", f"checkpoint.local_dir={tmp / over}"], "checkpoint.local_dir's component"


TOO_LONG_CASES = [
    "run.name over the file-name limit", "a run.dir component over the file-name limit", "run.dir over the path limit",
    "run.dir one byte too deep for its deepest file", "checkpoint.local_dir over the file-name limit",
]


@pytest.mark.parametrize("case", TOO_LONG_CASES)
def test_an_over_long_run_name_or_dir_is_one_line_exit_2_and_writes_nothing(case, finished_run, tmp_path):
    """Issue 28 #17: a 17-32-line traceback and exit 1, after creating runs/. Now: one line naming the key and the
    limit, exit 2, nothing created (cwd and the finished run byte for byte as they were)."""
    args, needle = _too_long(tmp_path, case, finished_run)
    before, run_before = tree_hashes(tmp_path), tree_hashes(finished_run)
    proc = subprocess.run(
        [sys.executable, str(REPO / "recipes" / "train.py"), *args], capture_output=True, text=True, cwd=tmp_path,
        timeout=180,
    )
    _refused_as_config(proc, needle)
    assert "limit of" in proc.stderr and "Traceback" not in proc.stderr
    assert tree_hashes(tmp_path) == before and tree_hashes(finished_run) == run_before


def test_a_run_dir_right_at_the_limits_trains(tmp_path):
    """The control: a run.name of the longest file name allowed, and a run.dir whose deepest file needs exactly the
    path limit, both train and commit checkpoints."""
    longest = "n" * os.pathconf(tmp_path, "PC_NAME_MAX")
    named = subprocess.run(
        [sys.executable, str(REPO / "recipes" / "train.py"), *FAST, "train.max_steps=5", f"run.name={longest}"],
        capture_output=True, text=True, cwd=tmp_path, timeout=300,
    )
    check_ok(named)
    assert (tmp_path / "runs" / longest / "checkpoints" / "step_00000005" / "COMPLETE").is_file()
    deep = _run_dir_at_the_path_limit(tmp_path)
    check_ok(run_train(deep, "train.max_steps=5", nproc=0))
    assert (deep / "checkpoints" / "step_00000005" / "COMPLETE").is_file()


# ------------------------------------------------------------------------------------------------------ logging
def test_setup_logging_leaves_the_programs_own_handlers_alone():
    root = logging.getLogger()
    mine = logging.StreamHandler()
    root.addHandler(mine)
    ftrain_logger = logging.getLogger("ftrain")
    saved = (list(ftrain_logger.handlers), ftrain_logger.level, ftrain_logger.propagate)
    try:
        setup_logging(0, "warning")
        assert mine in root.handlers
        assert ftrain_logger.level == logging.WARNING and len(ftrain_logger.handlers) == len(saved[0]) + 1
        setup_logging(0)  # again, as the Trainer does: the chosen level stays, the handler is not doubled
        assert ftrain_logger.level == logging.WARNING and len(ftrain_logger.handlers) == len(saved[0]) + 1
        setup_logging(1, "debug")
        assert ftrain_logger.level == logging.WARNING  # ranks > 0: warnings and worse only
        setup_logging(0, "debug")
        assert ftrain_logger.level == logging.DEBUG
    finally:
        root.removeHandler(mine)
        ftrain_logger.handlers[:] = saved[0]
        ftrain_logger.setLevel(saved[1])
        ftrain_logger.propagate = saved[2]


def test_progress_averages_speed_over_the_interval():
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    ftrain_logger = logging.getLogger("ftrain")
    ftrain_logger.addHandler(handler)
    level = ftrain_logger.level
    ftrain_logger.setLevel(logging.INFO)
    try:
        progress = Progress(start_step=0, max_steps=8, interval=4)
        for step, rate in enumerate([1000.0, 1000.0, 1000.0, 100.0, 500.0, 500.0, 500.0, 500.0], start=1):
            progress.maybe_print(step, 1.0, 1e-3, rate)
    finally:
        ftrain_logger.removeHandler(handler)
        ftrain_logger.setLevel(level)
    speeds = [record.getMessage().split("tok/s")[0].split()[-1] for record in records]
    # 4 steps of 1000 tokens take 1 + 1 + 1 + 10 ms: 4000 tokens / 13 ms = 308 tok/s, not the last step's 100
    assert speeds == ["308", "500"]


# ------------------------------------------------------------------------------------------------- preemption
def test_sigterm_to_the_launcher_ends_with_75_and_a_preempted_marker(tmp_path):
    """A real SIGTERM to scripts/preemptible.sh, passed once to torchrun, which passes it to the workers.

    torchrun itself exits 1 (torch 2.13 raises SignalException whatever the workers returned); the workers save
    and exit 75, rank 0 writes PREEMPTED, and the script turns that into exit 75 for the scheduler.
    """
    run_dir = tmp_path / "run"
    cmd = ["bash", str(REPO / "scripts" / "preemptible.sh"), str(run_dir), *train_cmd(run_dir, "train.max_steps=400")]
    proc = Job(cmd, cwd=REPO)
    wait_for(lambda: any(run_dir.glob("checkpoints/*/COMPLETE")), what="a first checkpoint", proc=proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 75, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("ftrain: preempted: ") and "command exited 1" in last  # torchrun's own status
    marker = json.loads((run_dir / "PREEMPTED").read_text())
    committed = max(int(p.parent.name.split("_")[-1]) for p in run_dir.glob("checkpoints/*/COMPLETE"))
    assert 5 <= marker["step"] == committed < 400
    assert marker["signal"] in ("SIGTERM", "a signal on another rank", None)

    # the next start of the same run holds the lock: the marker of the earlier preemption goes
    again = subprocess.run(
        ["bash", str(REPO / "scripts" / "preemptible.sh"), str(run_dir),
         *train_cmd(run_dir, f"train.max_steps={marker['step'] + 2}")],
        capture_output=True, text=True, cwd=REPO, timeout=180,
    )
    check_ok(again)
    assert not (run_dir / "PREEMPTED").exists()


def test_preflight_reads_directories_as_the_data_module_does():
    """preflight keeps its own copy of the suffixes (it runs before torch is imported); it must match."""
    from ftrain import data, preflight

    if hasattr(data, "TEXT_SUFFIXES"):
        assert preflight.TEXT_SUFFIXES == data.TEXT_SUFFIXES
