"""ftrain-ckpt on real checkpoints made by the recipe: list, show, verify, convert, prune."""

import contextlib
import io
import json
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import REPO
from ftrain.checkpoint import keys, layout
from ftrain.checkpoint.reader import read_tensors
from ftrain.ckpt_cli import main


def ckpt(*args):
    """Run the CLI in this process (fast); test_tool_script_runs covers the script itself."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in args])
        except SystemExit as exc:  # argparse errors
            code = exc.code
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def test_tool_script_runs(reference_run):
    proc = subprocess.run(
        [sys.executable, str(REPO / "tools" / "ckpt.py"), "verify", str(reference_run / "checkpoints" / "step_00000020")],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0 and proc.stdout.startswith("OK"), proc.stderr


@pytest.fixture
def run_copy(reference_run, tmp_path):
    """The reference run with one damaged and one incomplete checkpoint added."""
    run_dir = tmp_path / "run"
    shutil.copytree(reference_run, run_dir)
    damaged = run_dir / "checkpoints" / "step_00000015" / "__0_0.distcp"
    data = bytearray(damaged.read_bytes())
    data[100] ^= 0xFF
    damaged.write_bytes(bytes(data))
    incomplete = run_dir / "checkpoints" / "step_00000025"
    shutil.copytree(run_dir / "checkpoints" / "step_00000020", incomplete)
    (incomplete / "COMPLETE").unlink()
    return run_dir


def test_list_shows_complete_incomplete_and_damaged(run_copy):
    proc = ckpt("list", run_copy, "--json", "--verify")
    assert proc.returncode == 0, proc.stderr
    rows = {row["step"]: row for row in json.loads(proc.stdout)}
    assert {s: r["status"] for s, r in rows.items()} == {10: "complete", 15: "damaged", 20: "complete", 25: "incomplete"}
    assert rows[20]["world_size"] == 2 and rows[20]["bytes"] > 1e6
    text = ckpt("list", run_copy, "--verify").stdout
    assert "damaged" in text and "fails its checksum" in text


def model_prefix(path):
    """Where the model's weights live in this checkpoint, as its marker says."""
    return keys.state_keys(layout.read_marker(path))[keys.MODEL] + "."


def test_show_groups_keys_without_loading(reference_run):
    path = reference_run / "checkpoints" / "step_00000020"
    proc = ckpt("show", path, "--json")
    assert proc.returncode == 0, proc.stderr
    groups = json.loads(proc.stdout)["groups"]
    assert {"model", "optimizer", "data", "rng", "progress"} <= set(groups)
    qkv = next(e for e in groups["model"]["entries"] if e["key"] == model_prefix(path) + "blocks.0.qkv.weight")
    assert qkv["shape"] == [3 * 128, 128] and qkv["dtype"] == "float32" and qkv["bytes"] == 3 * 128 * 128 * 4
    assert groups["model"]["bytes"] == sum(e["bytes"] for e in groups["model"]["entries"])
    assert "model:" in ckpt("show", reference_run / "checkpoints" / "step_00000020").stdout


def test_verify_exit_codes(run_copy):
    good = ckpt("verify", run_copy / "checkpoints" / "step_00000020")
    assert good.returncode == 0 and good.stdout.startswith("OK")
    bad = ckpt("verify", run_copy / "checkpoints" / "step_00000015")
    assert bad.returncode == 1 and "__0_0.distcp fails its checksum" in bad.stdout
    assert ckpt("verify", run_copy / "checkpoints" / "step_00000015", "--sizes-only").returncode == 0
    incomplete = ckpt("verify", run_copy / "checkpoints" / "step_00000025")
    assert incomplete.returncode == 1 and "no COMPLETE marker" in incomplete.stdout


@pytest.mark.parametrize("args", [("verify", "/nonexistent"), ("list", "/"), ("show", "/tmp")])
def test_bad_paths_are_one_line_exit_2(args):
    proc = ckpt(*args)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and proc.stderr.startswith("ftrain-ckpt: error:")


def test_convert_to_torch_and_safetensors(reference_run, tmp_path):
    source = reference_run / "checkpoints" / "step_00000020"
    prefix = model_prefix(source)
    expected = {k[len(prefix):]: v for k, v in read_tensors(source).items() if k.startswith(prefix)}

    assert ckpt("convert", source, tmp_path / "full.pt").returncode == 0
    full = torch.load(tmp_path / "full.pt", weights_only=True)
    node = full
    for part in prefix.rstrip(".").split("."):
        node = node[part]
    assert torch.equal(node["head.weight"], expected["head.weight"])

    assert ckpt("convert", source, tmp_path / "model.pt", "--model-only").returncode == 0
    model = torch.load(tmp_path / "model.pt", weights_only=True)
    assert model.keys() == expected.keys() and all(torch.equal(model[k], expected[k]) for k in expected)

    from safetensors.torch import load_file

    assert ckpt("convert", source, tmp_path / "model.safetensors", "--format", "safetensors").returncode == 0
    weights = load_file(str(tmp_path / "model.safetensors"))
    assert weights.keys() == expected.keys() and all(torch.equal(weights[k], expected[k]) for k in expected)


def test_convert_refuses_a_damaged_checkpoint(run_copy, tmp_path):
    proc = ckpt("convert", run_copy / "checkpoints" / "step_00000015", tmp_path / "x.pt")
    assert proc.returncode == 1 and "damaged" in proc.stderr and not (tmp_path / "x.pt").exists()


def test_prune_follows_retention_rules(run_copy):
    dry = ckpt("prune", run_copy, "--keep-last", "1", "--dry-run")
    assert dry.returncode == 0 and "would remove" in dry.stdout
    assert len(layout.scan(run_copy / "checkpoints")) == 4
    assert ckpt("prune", run_copy, "--keep-last", "1").returncode == 0
    left = [(d.step, d.complete) for d in layout.scan(run_copy / "checkpoints")]
    assert left == [(20, True), (25, False)]  # the newest complete stays; a newer unfinished one is spared
    assert ckpt("prune", run_copy, "--keep-last", "0").returncode == 2


# ------------------------------------------------ issue 28 item 2: --overwrite replaces only convert's own output
def ckpt_process(*args, cwd=REPO):
    """The real command in a process of its own, as a user runs it."""
    return subprocess.run(
        [sys.executable, "-m", "ftrain.ckpt_cli", *map(str, args)], capture_output=True, text=True, timeout=180, cwd=cwd
    )


def tree_hashes(root):
    """Every file, link and directory under ``root``: a file by the hash of its bytes."""
    import hashlib

    found = {}
    for path in sorted(root.rglob("*")):
        name = str(path.relative_to(root))
        if path.is_symlink():
            found[name] = f"link {path.readlink()}"
        else:
            found[name] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
    return found


@pytest.fixture
def workspace(reference_run, tmp_path):
    """A copy of the reference run, a directory of someone else's files and a file convert did not write."""
    shutil.copytree(reference_run, tmp_path / "run")
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / "notes.txt").write_text("not ftrain's\n")
    (tmp_path / "theirs" / "model.safetensors").write_bytes(b"an older file of theirs")
    (tmp_path / "notes.pt").write_bytes(b"keep me")
    return tmp_path


OVERWRITE_REFUSED = {
    "a directory of others' files": ("run", "theirs", "--format", "safetensors"),
    "the checkpoint being converted": ("run/checkpoints/step_00000020", "run/checkpoints/step_00000020", "--format", "safetensors"),
    "the run directory": ("run", "run", "--format", "safetensors"),
    "the run's checkpoints folder": ("run", "run/checkpoints", "--format", "safetensors"),
    "a data file of a checkpoint": ("run", "run/checkpoints/step_00000010/__0_0.distcp"),
    "a run directory's own file": ("run", "run/config.yaml"),
    "a file convert did not write": ("run", "notes.pt"),
    "a .safetensors name of others'": ("run", "theirs/model.safetensors", "--format", "safetensors"),
}


# The refusal is one code path whatever the target: this case runs the real command in a process of its own (the
# exit code and stderr a user sees), the others run the CLI in this process (a process costs seconds of imports).
REFUSED_IN_A_PROCESS = "the run directory"


@pytest.mark.parametrize("case", list(OVERWRITE_REFUSED))
def test_convert_overwrite_refuses_what_convert_did_not_write(case, workspace, monkeypatch):
    """Issue 28 #2: --overwrite deleted a directory's files, a checkpoint's marker, a whole run. Now: one line,
    exit 2, and every byte under the workspace as it was."""
    before = tree_hashes(workspace)
    args = ("convert", *OVERWRITE_REFUSED[case], "--overwrite")
    if case == REFUSED_IN_A_PROCESS:
        proc = ckpt_process(*args, cwd=workspace)
    else:
        monkeypatch.chdir(workspace)
        proc = ckpt(*args)
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ftrain-ckpt: error:") and "already exists" in lines[0], proc.stderr
    assert proc.stdout == "" and "Traceback" not in proc.stderr
    assert tree_hashes(workspace) == before


def test_convert_overwrite_replaces_its_own_earlier_output(workspace):
    """The control: an earlier torch file, safetensors file and export directory of convert are replaced,
    and a sharded export with its index gives way to a one-file export; nothing else is touched."""
    from safetensors.torch import save_file

    run = workspace / "run"
    shards = workspace / "hf"
    shards.mkdir()
    for name in ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"):
        save_file({"x": torch.zeros(2)}, str(shards / name))
    (shards / "model.safetensors.index.json").write_text('{"metadata": {}, "weight_map": {}}')
    for out, fmt in (("full.pt", "torch"), ("model.safetensors", "safetensors")):
        first = ckpt("convert", run, workspace / out, "--format", fmt)  # in this process: only the setup
        assert first.returncode == 0, first.stderr
    others = {k: v for k, v in tree_hashes(workspace).items() if not k.startswith(("full.pt", "model.safetensors", "hf"))}
    for out, fmt in (("full.pt", "torch"), ("model.safetensors", "safetensors"), ("hf", "safetensors")):
        again = ckpt_process("convert", run, out, "--format", fmt, "--model-only", "--overwrite", cwd=workspace)
        assert again.returncode == 0, again.stderr
    assert sorted(p.name for p in shards.iterdir()) == ["ftrain_export.json", "model.safetensors"]
    assert "head.weight" in torch.load(workspace / "full.pt", weights_only=True)
    assert {k: v for k, v in tree_hashes(workspace).items() if k in others} == others
    assert not any(p.name.startswith(".") for p in workspace.iterdir())  # no temporary or set-aside copy left
