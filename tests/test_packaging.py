"""The wheel, installed into a fresh virtual environment and used from outside the repository, as a new user would.

The new environment reuses the packages of the one running the tests (torch is large): a ``.pth`` file points
at their folders. ftrain itself comes only from the wheel, which is built from a copy of what it packages
(pyproject.toml, README.md, ftrain/), so nothing outside them can leak in.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest

from conftest import REPO

STEPS = ["model.seq_len=64", "train.batch_size=4", "train.max_steps=20", "checkpoint.interval=5", "log.interval=5"]
REUSED = ("torch", "torchdata", "tensorboard", "omegaconf", "yaml", "matplotlib", "numpy", "psutil", "xxhash")


def _setuptools_builds_wheels() -> bool:
    try:
        import setuptools
    except ImportError:
        return False
    return int(setuptools.__version__.split(".")[0]) >= 70  # builds a wheel without the `wheel` package


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("packaging")
    source = root / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    shutil.copytree(REPO / "ftrain", source / "ftrain", ignore=shutil.ignore_patterns("__pycache__"))
    wheels = root / "wheels"
    isolation = [] if _setuptools_builds_wheels() else ["--use-pep517"]  # else pip fetches setuptools itself
    build = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels), str(source)]
    if not isolation:
        build.insert(5, "--no-build-isolation")
    done = subprocess.run(build, capture_output=True, text=True, timeout=300, cwd=root)
    assert done.returncode == 0, done.stderr[-3000:]
    (wheel,) = wheels.glob("ftrain-*.whl")

    env_dir = root / "venv"
    venv.EnvBuilder(system_site_packages=True, with_pip=False, symlinks=True).create(env_dir)
    python = env_dir / "bin" / "python"
    site = Path(subprocess.check_output([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True).strip())
    folders = dict.fromkeys(str(Path(importlib.import_module(name).__file__).parent.parent) for name in REUSED)
    (site / "_reuse_test_env.pth").write_text("\n".join(folders) + "\n")
    install = [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", "--force-reinstall", str(wheel)]
    done = subprocess.run(install, capture_output=True, text=True, timeout=300, cwd=root)
    assert done.returncode == 0, done.stderr[-3000:]
    outside = root / "elsewhere"
    outside.mkdir()
    return {"python": python, "bin": env_dir / "bin", "cwd": outside, "site": site}


def run(installed: dict[str, Path], *cmd: str, timeout: float = 180) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = f"{installed['bin']}{os.pathsep}{env.get('PATH', '')}"
    return subprocess.run(list(cmd), capture_output=True, text=True, cwd=installed["cwd"], env=env, timeout=timeout)


def test_the_wheel_installs_commands_that_work_outside_the_repository(installed):
    where = run(installed, "python", "-c", "import ftrain, ftrain.config as c; print(ftrain.__file__)")
    assert where.returncode == 0, where.stderr
    assert where.stdout.strip().startswith(str(installed["site"])), where.stdout  # the wheel's copy, not the clone

    listing = run(installed, "python", "-m", "ftrain")
    assert listing.returncode == 0 and all(f"ftrain-{n}" in listing.stdout for n in ("train", "ckpt", "report", "chaos"))
    helped = run(installed, "ftrain-train", "--help")
    assert helped.returncode == 0 and "checkpoint.signals" in helped.stdout and "[SIGTERM, SIGUSR1]" in helped.stdout
    printed = run(installed, "ftrain-train", "--print-config", "train.max_steps=7")
    assert printed.returncode == 0 and "max_steps: 7" in printed.stdout and "dir: runs/default" in printed.stdout
    assert not (installed["cwd"] / "runs").exists()
    for command in ("ftrain-ckpt", "ftrain-report", "ftrain-chaos"):
        assert run(installed, command, "--help").returncode == 0, command

    # a 2-rank run under torchrun -m, from here
    run_dir = installed["cwd"] / "run"
    trained = run(installed, "python", "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                  "-m", "ftrain", "train", f"run.dir={run_dir}", *STEPS, timeout=300)
    assert trained.returncode == 0, trained.stderr[-4000:]
    listed = run(installed, "ftrain-ckpt", "list", "--json", str(run_dir))
    assert listed.returncode == 0, listed.stderr
    steps = sorted(entry["step"] for entry in json.loads(listed.stdout) if entry.get("status") == "complete")
    assert steps[-1] == 20
    report = run(installed, "ftrain-report", str(run_dir))
    assert report.returncode == 0, report.stderr
    assert "training steps" in report.stdout and (run_dir / "overhead.png").is_file()
