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
