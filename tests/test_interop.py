"""Interoperability: safetensors exports, warm starts (with exclusions), and checkpoints of an older ftrain.

In one process where the behaviour is a library call's; the format fixture is resumed by the real recipe."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import ftrain
from ftrain.checkpoint import export, layout, warm_start
from ftrain.checkpoint.errors import CheckpointError
from ftrain.checkpoint.reader import read_tensors, select
from ftrain.events import read_scalars
from ftrain.tags import LOSS

from conftest import REPO

safetensors_torch = pytest.importorskip("safetensors.torch")
FIXTURE = REPO / "tests" / "fixtures" / f"format_v{layout.FORMAT_VERSION}"


class Net(nn.Module):
    """A body and a head, so a warm start can leave the head out."""

    def __init__(self, width: int = 16, classes: int = 4) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(8, width), nn.LayerNorm(width), nn.ReLU(), nn.Linear(width, width))
        self.head = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.body(x)))


def _net(seed: int, **kwargs: int) -> Net:
    torch.manual_seed(seed)
    return Net(**kwargs)


def _train(model: nn.Module, optimizer: torch.optim.Optimizer, steps: int) -> None:
    for _ in range(steps):
        loss = model(torch.randn(8, 8)).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"tensors differ: {different}"


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    """A run trained 50 steps under ftrain.Checkpointer; its final checkpoint and the model's tensors."""
    run_dir = tmp_path_factory.mktemp("run")
    model = _net(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    with ftrain.Checkpointer(run_dir, model=model, optimizer=optimizer, interval=25, mode="sync") as ckpt:
        ckpt.load()
        for step in range(1, 51):
            _train(model, optimizer, 1)
            ckpt.maybe_save(step, last=step == 50)
    checkpoint = layout.latest_complete(run_dir / "checkpoints")
    assert checkpoint is not None and checkpoint.step == 50
    return checkpoint.path, {k: v.clone() for k, v in model.state_dict().items()}


# -------------------------------------------------------------------------------------------------- export
def test_export_from_a_checkpoint_loads_with_safetensors_bit_for_bit(trained, tmp_path):
    checkpoint, weights = trained
    out = export.export_from_checkpoint(checkpoint, export.export_dir(tmp_path, 50))
    assert out == tmp_path / "exports" / "step_00000050"
    assert sorted(p.name for p in out.iterdir()) == ["ftrain_export.json", "model.safetensors"]
    _same(safetensors_torch.load_file(str(out / "model.safetensors")), select(read_tensors(checkpoint), "model"))
    _same(safetensors_torch.load_file(str(out / "model.safetensors")), weights)
    info = json.loads((out / "ftrain_export.json").read_text())
    assert info["step"] == 50 and info["files"][0]["name"] == "model.safetensors"
    assert not list(tmp_path.glob("exports/.*")), "temporary directories left behind"


def test_export_shards_with_a_hugging_face_index_and_casts(trained, tmp_path):
    _, weights = trained
    out = export.export_safetensors(weights, tmp_path / "sharded", torch.bfloat16, max_shard_bytes=600)
    index = json.loads((out / export.INDEX_FILE).read_text())
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert sorted(index["weight_map"]) == sorted(weights) and set(index["weight_map"].values()) == set(shards)
    assert index["metadata"]["total_size"] == sum(v.numel() * 2 for v in weights.values())
    loaded: dict[str, torch.Tensor] = {}
    for shard in shards:
        loaded.update(safetensors_torch.load_file(str(out / shard)))
    _same(loaded, {k: v.to(torch.bfloat16) for k, v in weights.items()})
    # Exporting again replaces the export whole: no shard of the previous one is left.
    export.export_safetensors(weights, out)
    assert sorted(p.name for p in out.iterdir()) == ["ftrain_export.json", "model.safetensors"]


def test_a_failed_export_leaves_the_previous_one_whole(trained, tmp_path, monkeypatch):
    _, weights = trained
    out = export.export_safetensors(weights, tmp_path / "export")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    (tmp_path / ".export.partial-999").mkdir()  # left by an export that died
    real = export._save_file()
    written = []

    def second_shard_fails(tensors, path, metadata=None):
        if written:
            raise OSError(28, "No space left on device")
        written.append(path)
        real(tensors, path, metadata=metadata)

    monkeypatch.setattr(export, "_save_file", lambda: second_shard_fails)
    with pytest.raises(OSError, match="No space"):
        export.export_safetensors({k: v * 2 for k, v in weights.items()}, out, max_shard_bytes=600)
    assert written and {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"], "temporary directories left behind"


def test_export_model_in_process_with_tied_weights(tmp_path):
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 10, bias=False))
    model[1].weight = model[0].weight  # tied: safetensors refuses shared memory, the export writes copies
    out = export.export_model(model, tmp_path / "tied")
    loaded = safetensors_torch.load_file(str(out / "model.safetensors"))
    assert torch.equal(loaded["0.weight"], model[0].weight) and torch.equal(loaded["1.weight"], model[0].weight)
    future = export.export_model_async(model, tmp_path / "tied_async", torch.float16)
    assert future.result(timeout=60) == tmp_path / "tied_async"
    assert safetensors_torch.load_file(str(tmp_path / "tied_async" / "model.safetensors"))["0.weight"].dtype == torch.float16


def test_ckpt_convert_safetensors_uses_the_export(trained, tmp_path):
    checkpoint, weights = trained
    run = lambda *args: subprocess.run(  # noqa: E731
        [sys.executable, "-m", "ftrain.ckpt_cli", "convert", str(checkpoint), *map(str, args)],
        capture_output=True, text=True, timeout=120, cwd=REPO,
    )
    proc = run(tmp_path / "hf", "--format", "safetensors", "--dtype", "bfloat16")
    assert proc.returncode == 0, proc.stderr
    info = json.loads((tmp_path / "hf" / export.INFO_FILE).read_text())
    assert info["dtype"] == "bfloat16" and info["step"] == 50
    _same(warm_start.read_safetensors(tmp_path / "hf"), {k: v.to(torch.bfloat16) for k, v in weights.items()})
    proc = run(tmp_path / "hf", "--format", "safetensors")
    assert proc.returncode == 2 and "already exists" in proc.stderr and proc.stderr.count("\n") == 1
    single = tmp_path / "model.safetensors"  # a .safetensors name: one file, as before
    assert run(single, "--format", "safetensors").returncode == 0
    _same(safetensors_torch.load_file(str(single)), weights)


# ---------------------------------------------------------------------------------------------- warm start
def test_warm_start_from_the_export_then_trains_with_a_fresh_optimizer(trained, tmp_path):
    checkpoint, weights = trained
    out = export.export_from_checkpoint(checkpoint, tmp_path / "export")
    model = _net(1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    line = warm_start.load_initial(out, model, exclude=[])
    assert "safetensors" in line and "\n" not in line
    _same(model.state_dict(), weights)
    assert not optimizer.state  # fresh
    with ftrain.Checkpointer(tmp_path / "run2", model=model, optimizer=optimizer, mode="sync") as ckpt:
        assert ckpt.load() == 0
        for step in range(1, 4):
            _train(model, optimizer, 1)
            ckpt.maybe_save(step, last=step == 3)
    assert not torch.equal(model.state_dict()["head.weight"], weights["head.weight"])
    assert layout.latest_complete(tmp_path / "run2" / "checkpoints").step == 3


@pytest.mark.parametrize("kind", ["ftrain run directory", "ftrain checkpoint", "safetensors file", "plain DCP"])
def test_exclude_from_loading_keeps_the_seeded_initial_values(trained, tmp_path, kind):
    checkpoint, weights = trained
    if kind == "ftrain run directory":
        source = checkpoint.parent.parent
    elif kind == "ftrain checkpoint":
        source = checkpoint
    elif kind == "safetensors file":
        source = tmp_path / "w.safetensors"
        safetensors_torch.save_file(weights, str(source))
    else:
        import torch.distributed.checkpoint as dcp

        source = tmp_path / "dcp"
        dcp.save({"app": {"model": dict(weights)}}, checkpoint_id=str(source), no_dist=True)
    initial = _net(7, classes=3).state_dict()  # a new head of another size
    model = _net(7, classes=3)
    line = warm_start.load_initial(source, model, exclude=["head."])
    assert "1 left at their initial values" not in line and "2 left at their initial values (under head.)" in line
    loaded = model.state_dict()
    for key in loaded:
        expected = initial[key] if key.startswith("head.") else weights[key]
        assert torch.equal(loaded[key], expected), key


def test_warm_start_with_the_optimizer_state(trained, tmp_path):
    checkpoint, weights = trained
    saved = select(read_tensors(checkpoint), "optimizer")
    model = _net(3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3)  # the saved run used 1e-2
    line = warm_start.load_initial(checkpoint, model, model_only=False, optimizer=optimizer)
    assert "model and optimizer" in line
    _same(model.state_dict(), weights)
    for name, param in model.named_parameters():
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(optimizer.state[param][key], saved[f"state.{name}.{key}"]), (name, key)
    assert optimizer.param_groups[0]["lr"] == 5e-3  # hyperparameters are the new run's
    fresh = _net(3)
    fresh_optimizer = torch.optim.AdamW(fresh.parameters(), lr=5e-3)
    warm_start.load_initial(checkpoint, fresh, model_only=False, optimizer=fresh_optimizer, exclude=["head."])
    assert not torch.equal(fresh_optimizer.state[fresh.head.weight]["exp_avg"], saved["state.head.weight.exp_avg"])
    assert torch.equal(fresh_optimizer.state[fresh.body[0].weight]["exp_avg"], saved["state.body.0.weight.exp_avg"])
    exported = export.export_from_checkpoint(checkpoint, tmp_path / "e")
    with pytest.raises(CheckpointError, match="no optimizer state"):
        warm_start.load_initial(exported, _net(3), model_only=False, optimizer=optimizer)


def _one_line_error(path: Path, model: nn.Module, **kwargs: object) -> str:
    with pytest.raises(CheckpointError) as info:
        warm_start.load_initial(path, model, **kwargs)
    message = str(info.value)
    assert "\n" not in message and len(message) < 600, message
    return message


def test_mismatches_are_one_line_errors_naming_the_keys(trained, tmp_path):
    checkpoint, _ = trained
    message = _one_line_error(checkpoint, _net(0, classes=3))
    assert "of another shape: head.weight [4, 16] in the source, [3, 16] in the model" in message
    message = _one_line_error(checkpoint, _net(0, width=12))
    assert "key(s) of another shape" in message and "more" in message  # the first few named, the rest counted
    renamed = nn.Sequential(nn.Linear(8, 16))
    message = _one_line_error(checkpoint, renamed)
    assert "2 key(s) missing from the source: 0.weight, 0.bias" in message
    assert "8 key(s) not in the model: body.0.weight, body.0.bias, body.1.weight and 5 more" in message
    assert "exclude_from_loading" in message
    assert "no such file" in _one_line_error(tmp_path / "nowhere", _net(0))
    (tmp_path / "empty").mkdir()
    assert "not an ftrain checkpoint" in _one_line_error(tmp_path / "empty", _net(0))
    (tmp_path / "junk.safetensors").write_bytes(b"\xff" * 64)
    assert "not a readable safetensors file" in _one_line_error(tmp_path / "junk.safetensors", _net(0))
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / export.INDEX_FILE).write_text(json.dumps({"weight_map": {"w": "../outside.safetensors"}}))
    assert "not a file next to it" in _one_line_error(tmp_path / "hf", _net(0))


def test_a_newer_format_version_is_refused_in_one_line(trained, tmp_path):
    checkpoint, _ = trained
    copy = tmp_path / checkpoint.name
    shutil.copytree(checkpoint, copy)
    marker = json.loads((copy / layout.MARKER).read_text())
    (copy / layout.MARKER).write_text(json.dumps({**marker, "format_version": 99}))
    message = _one_line_error(copy, _net(0))
    assert "newer ftrain (format_version 99)" in message
    with pytest.raises(CheckpointError, match="format_version 99") as info:
        export.model_tensors(copy)
    assert "\n" not in str(info.value)
    model = _net(0)
    ckpt = ftrain.Checkpointer(tmp_path / "run", model=model, optimizer=torch.optim.AdamW(model.parameters()))
    shutil.copytree(copy, tmp_path / "run" / "checkpoints" / copy.name)
    with pytest.raises(CheckpointError, match="newer ftrain") as info:
        ckpt.load()
    ckpt.abort()
    assert "\n" not in str(info.value)


# -------------------------------------------------------------------------------------- format fixture
def test_format_fixture_is_small_and_today_s_format():
    size = sum(p.stat().st_size for p in FIXTURE.rglob("*") if p.is_file())
    assert size < 500_000, f"{FIXTURE} holds {size} bytes"
    marker = layout.read_marker(FIXTURE / "checkpoints" / "step_00000004")
    assert marker["format_version"] == layout.FORMAT_VERSION


def test_a_checkpoint_of_today_s_format_resumes_bit_for_bit(tmp_path):
    """The guard across versions: a checkpoint written by an earlier commit, resumed by this one, continues
    with exactly the losses the uninterrupted run logged. Never regenerate the fixture to make this pass."""
    record = json.loads((FIXTURE / "losses.json").read_text())
    run_dir = tmp_path / "run"
    shutil.copytree(FIXTURE / "checkpoints", run_dir / "checkpoints")
    shutil.copy(FIXTURE / "data.txt", tmp_path / "data.txt")
    command = [
        sys.executable, str(REPO / "recipes" / "train.py"), "--config", str(FIXTURE / "config.yaml"),
        f"run.dir={run_dir}", f"data.path={tmp_path / 'data.txt'}",
    ]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resumed from {run_dir / 'checkpoints' / 'step_00000004'}" in proc.stderr + proc.stdout
    losses = read_scalars(run_dir / "tb", [LOSS])[LOSS]
    resumed = {step: losses[step] for step in range(record["resume_step"] + 1, 9)}
    expected = {step: record["loss"][str(step)] for step in resumed}
    assert resumed == expected


# ------------------------------------------------------------------------------------------------ config
def test_config_keys_for_export_and_warm_start():
    from ftrain.config import ConfigError, load_config

    cfg = load_config(["checkpoint.export=safetensors", "checkpoint.export_dtype=bfloat16",
                       "checkpoint.initial_load=runs/base", "checkpoint.exclude_from_loading=[head.,lm_head.]",
                       "checkpoint.initial_load_model_only=false"])
    section = cfg.checkpoint
    assert (section.export, section.export_dtype, section.initial_load) == ("safetensors", "bfloat16", "runs/base")
    assert section.exclude_from_loading == ["head.", "lm_head."] and section.initial_load_model_only is False
    assert export.parse_dtype(section.export_dtype) is torch.bfloat16
    assert load_config(["checkpoint.export=off"]).checkpoint.export == "none"
    defaults = load_config([]).checkpoint
    assert (defaults.export, defaults.export_dtype, defaults.initial_load, defaults.exclude_from_loading) == ("none", "", "", [])
    for bad, key in (("checkpoint.export=onnx", "checkpoint.export"), ("checkpoint.export_dtype=int8", "checkpoint.export_dtype"),
                     ("checkpoint.exclude_from_loading=['']", "checkpoint.exclude_from_loading")):
        with pytest.raises(ConfigError, match=key) as info:
            load_config([bad])
        assert "\n" not in str(info.value)


# ----------------------------------------------------------------------------------------- FSDP2, 2 ranks
FSDP_WORKER = r'''
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from ftrain.checkpoint import export, warm_start
from ftrain.config import ModelConfig
from ftrain.model import build_model

out = Path(sys.argv[1])
dist.init_process_group("gloo")
rank = dist.get_rank()
cfg = ModelConfig(seq_len=16, n_layer=2, d_model=16, n_head=2)
full = lambda m: get_model_state_dict(m, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

model = build_model(cfg, torch.device("cpu"), seed=1)  # FSDP2: every block and the root fully_shard'ed
written = export.export_model(model, out / "export", torch.float32)
assert (written is not None) == (rank == 0), written
dcp.save({"model": get_model_state_dict(model)}, checkpoint_id=str(out / "dcp"))
dist.barrier()
expected = full(model)

for source in ("export", "dcp"):
    fresh = build_model(cfg, torch.device("cpu"), seed=2)
    initial = full(fresh)
    line = warm_start.load_initial(out / source, fresh, exclude=["head."])
    got = full(fresh)
    if rank == 0:
        assert "left at their initial values (under head.)" in line, line
        for key in got:
            want = initial[key] if key.startswith("head.") else expected[key]
            assert torch.equal(got[key], want), (source, key)
if rank == 0:
    print("FSDP2 OK", flush=True)
dist.destroy_process_group()
# Skip interpreter finalization: gloo's run-loop thread can still be releasing the last all-gather's tensors
# then, and taking the GIL during finalization aborts the process (SIGABRT; see ftrain.cli._train).
os._exit(0)
'''


def test_fsdp2_export_and_warm_start_under_torchrun(tmp_path):
    """export_model gathers the sharded model (collective, rank 0 writes); load_initial loads an export and a
    sharded DCP checkpoint into a freshly sharded model, leaving the excluded head at its initial values."""
    script = tmp_path / "worker.py"
    script.write_text(FSDP_WORKER)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script), str(tmp_path)]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0 and "FSDP2 OK" in proc.stdout, proc.stderr[-4000:]


def test_recipe_exports_at_the_last_step_and_a_second_run_warm_starts_from_it(tmp_path):
    """The config keys wired through ftrain.Checkpointer: checkpoint.export at the final step, then
    checkpoint.initial_load (with exclude_from_loading) in a run that has no checkpoint of its own."""
    from conftest import check_ok, run_train
    from ftrain.checkpoint import export, layout
    from ftrain.checkpoint.reader import read_tensors

    source = tmp_path / "source"
    check_ok(run_train(source, "train.max_steps=6", "checkpoint.export=safetensors", nproc=0))
    exported = export.read_export(export.export_dir(source, 6))
    saved = read_tensors(layout.step_dir(source / "checkpoints", 6))
    assert exported and all(torch.equal(t, saved[f"model.{k}"]) for k, t in exported.items())

    warm = run_train(
        tmp_path / "warm", "train.max_steps=3", f"checkpoint.initial_load={export.export_dir(source, 6)}",
        "checkpoint.exclude_from_loading=[head.]", nproc=0,
    )
    check_ok(warm)
    assert "warm start:" in warm.stderr and "head." in warm.stderr, warm.stderr[-2000:]
    assert layout.latest_complete(tmp_path / "warm" / "checkpoints").step == 3
