"""Holes an attacker (or a careless copy) can drive through verification, marker readers and prune.

Every checkpoint here is a one-process ``dcp.save`` whose states are named ``net``/``opt``/``train`` (not the
recipe's names), committed with ``layout.write_marker`` exactly as the library does: fast, and real files.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import shutil
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

from conftest import REPO
from ftrain.checkpoint import integrity, layout, loading
from ftrain.checkpoint.errors import CheckpointError
from ftrain.checkpoint.reader import read_state
from ftrain.checkpoint.safe_load import read_metadata_safely
from ftrain.ckpt_cli import main

STATE_KEYS = {"model": "net", "optimizer": "opt", "progress": "train"}
DATA = "__0_0.distcp"


# ------------------------------------------------------------------------------------------ helpers
def ckpt(*args):
    """The CLI in this process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in args])
        except SystemExit as exc:
            code = exc.code
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def one_line_error(proc, code):
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ftrain-ckpt: error:"), proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    return lines[0]


def model_state():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    return model, opt


def save_checkpoint(path: Path, step: int = 1) -> Path:
    """A committed checkpoint of a small model under the user's own names."""
    model, opt = model_state()
    state = {"net": model.state_dict(), "opt": opt.state_dict(), "train": {"step": step, "rng": {"cpu": torch.get_rng_state()}}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "torch.distributed is disabled ... assuming ... a single process"
        dcp.save(state, checkpoint_id=str(path), no_dist=True)
    commit(path, step)
    return path


def commit(path: Path, step: int, files=None, **extra) -> dict:
    """(Re)write the marker the way the library does; ``files`` replaces the honest file list."""
    (path / layout.MARKER).unlink(missing_ok=True)
    info = {"step": step, "world_size": 1, "state_keys": STATE_KEYS, **extra}
    return layout.write_marker(path, info, integrity.file_entries(path) if files is None else files)


def write_raw_marker(path: Path, marker) -> None:
    text = marker if isinstance(marker, (str, bytes)) else json.dumps(marker)
    (path / layout.MARKER).write_bytes(text.encode() if isinstance(text, str) else text)


def marker_of(path: Path) -> dict:
    return json.loads((path / layout.MARKER).read_text())


def read_metadata(path: Path):
    with open(path / ".metadata", "rb") as stream:
        return read_metadata_safely(stream)


def rewrite_metadata(path: Path, change) -> None:
    """Change DCP's metadata in place and recommit honest sizes and checksums (a careful attacker)."""
    metadata = read_metadata(path)
    change(metadata)
    (path / ".metadata").write_bytes(pickle.dumps(metadata))
    commit(path, marker_of(path)["step"])


def point_metadata_at(path: Path, source: Path, name: str = "__7_0.distcp") -> None:
    """Another run's data copied in under ``name``, every storage location moved there, and a marker that
    lists everything but that file, with honest sizes and checksums: the issue's "foreign data" attack."""
    shutil.copy(source, path / name)

    def point(metadata):
        for info in metadata.storage_data.values():
            info.relative_path = name

    rewrite_metadata(path, point)
    commit(path, marker_of(path)["step"], files=[e for e in integrity.file_entries(path) if e["name"] != name])


def storage_of(metadata, fqn):
    return next(info for index, info in metadata.storage_data.items() if index.fqn == fqn)


def check(path: Path, checksums: bool = True) -> str:
    """What resume's check() says of a one-rank checkpoint ('' = usable)."""
    expect = loading.Expectations(model=None, world_size=1, allow_world_size_change=False)
    return loading.check(path, expect, rank=0, world_size=1, verify_checksums=checksums)


def flip_byte(file: Path, at: int | None = None) -> None:
    data = bytearray(file.read_bytes())
    data[len(data) // 2 if at is None else at] ^= 0x40
    file.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    return save_checkpoint(tmp_path_factory.mktemp("template") / "step_00000001")


@pytest.fixture
def good(template, tmp_path) -> Path:
    path = tmp_path / "run" / "checkpoints" / "step_00000001"
    shutil.copytree(template, path)
    return path


def add_step(good: Path, step: int) -> Path:
    """Another committed checkpoint in the same run (same data, its own marker)."""
    path = good.parent / f"step_{step:08d}"
    shutil.copytree(good, path)
    commit(path, step)
    return path


def assert_damaged_everywhere(path: Path, needle: str, checksums: bool = True) -> None:
    """Every reader calls the checkpoint damaged with ``needle`` in its one-line reason."""
    problems = integrity.verify(path, checksums=checksums)
    assert problems and any(needle in p for p in problems), problems
    assert all("\n" not in p for p in problems)
    assert needle in check(path, checksums)
    verified = ckpt("verify", path, *([] if checksums else ["--sizes-only"]))
    assert verified.returncode == 1 and needle in verified.stdout, verified
    out = path.parent.parent / "out.pt"
    assert needle in one_line_error(ckpt("convert", path, out), 1)
    assert not out.exists()
    listed = ckpt("list", path.parent, "--json", *(["--verify"] if checksums else []))
    assert listed.returncode == 0, listed.stderr
    assert {row["step"]: row["status"] for row in json.loads(listed.stdout)}[layout.parse_step(path)] == "damaged"


# ------------------------------------------------------------------------------- the baseline holds
def test_a_good_checkpoint_under_any_naming_verifies_shows_and_converts(good, tmp_path):
    model, _ = model_state()
    assert integrity.verify(good) == [] and check(good) == ""
    assert ckpt("verify", good).stdout.startswith("OK")
    assert [r["status"] for r in json.loads(ckpt("list", good.parent.parent, "--json", "--verify").stdout)] == ["complete"]

    shown = ckpt("show", good, "--json")
    assert shown.returncode == 0, shown.stderr
    groups = json.loads(shown.stdout)["groups"]
    assert set(groups) == {"model", "optimizer", "rng", "progress"}
    assert {e["key"] for e in groups["model"]["entries"]} == {"net.weight", "net.bias"}
    assert json.loads(shown.stdout)["state_keys"] == STATE_KEYS
    assert "state keys: model = net, optimizer = opt" in ckpt("show", good).stdout

    assert ckpt("convert", good, tmp_path / "model.pt", "--model-only").returncode == 0
    weights = torch.load(tmp_path / "model.pt", weights_only=True)
    assert weights.keys() == {"weight", "bias"} and torch.equal(weights["weight"], model.weight.detach())
    assert ckpt("convert", good, tmp_path / "model.safetensors", "--format", "safetensors").returncode == 0
    from safetensors.torch import load_file

    assert torch.equal(load_file(str(tmp_path / "model.safetensors"))["bias"], model.bias.detach())
    assert ckpt("convert", good, tmp_path / "full.pt").returncode == 0
    assert set(torch.load(tmp_path / "full.pt", weights_only=True)) == {"net", "opt", "train"}


def test_legacy_marker_without_state_keys_uses_the_recipes_old_names(tmp_path):
    path = tmp_path / "step_00000003"
    model, opt = model_state()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"app": {"model": model.state_dict(), "optim": opt.state_dict()}, "train": {"step": 3}},
                 checkpoint_id=str(path), no_dist=True)
    layout.write_marker(path, {"step": 3, "world_size": 1, "format_version": 1}, integrity.file_entries(path))
    assert marker_of(path)["format_version"] == 1
    groups = json.loads(ckpt("show", path, "--json").stdout)["groups"]
    assert {"model", "optimizer", "progress"} <= set(groups)
    assert ckpt("convert", path, tmp_path / "m.pt", "--model-only").returncode == 0
    assert torch.load(tmp_path / "m.pt", weights_only=True).keys() == {"weight", "bias"}


# ------------------------------------------------------- item 4: foreign data behind a verified marker
def foreign_run(tmp_path: Path) -> Path:
    return save_checkpoint(tmp_path / "other" / "step_00000009", step=9)


@pytest.mark.parametrize("where", ["unlisted", "dotdot", "absolute", "subdir"])
def test_metadata_pointing_at_files_the_marker_does_not_list(where, good, tmp_path):
    other = foreign_run(tmp_path)
    if where == "unlisted":
        point_metadata_at(good, other / DATA)
        assert integrity.verify(good, files=[DATA]) == []  # every file the marker lists is intact
        assert_damaged_everywhere(good, "which the marker does not list")
        return
    if where == "dotdot":
        target = os.path.relpath(other / DATA, good)
    elif where == "absolute":
        target = str(other / DATA)
    else:
        (good / "sub").mkdir()
        shutil.copy(other / DATA, good / "sub" / DATA)
        target = f"sub/{DATA}"

    def point_elsewhere(metadata):
        for info in metadata.storage_data.values():
            info.relative_path = target

    rewrite_metadata(good, point_elsewhere)
    assert_damaged_everywhere(good, "not a plain file name inside the checkpoint")


@pytest.mark.parametrize("files", ["only_metadata", "empty", "no_metadata"])
def test_partial_or_empty_file_lists_are_damaged(files, good):
    data = good / DATA
    data.write_bytes(data.read_bytes()[:-100])  # and the data file is truncated
    entries = integrity.file_entries(good)
    if files == "only_metadata":
        marker = marker_of(good)
        marker["files"] = [e for e in entries if e["name"] == ".metadata"]
        marker["total_bytes"] = sum(e["size"] for e in marker["files"])
        write_raw_marker(good, marker)
        needle = "which the marker does not list"
    elif files == "empty":
        write_raw_marker(good, {**marker_of(good), "files": [], "total_bytes": 0})
        needle = "not a non-empty list"
    else:
        marker = marker_of(good)
        marker["files"] = [e for e in entries if e["name"] != ".metadata"]
        marker["total_bytes"] = sum(e["size"] for e in marker["files"])
        write_raw_marker(good, marker)
        needle = "does not list DCP's .metadata"
    assert_damaged_everywhere(good, needle)


def test_the_library_refuses_to_commit_a_marker_readers_would_call_damaged(good):
    with pytest.raises(ValueError, match="does not list DCP's .metadata"):
        commit(good, 1, files=[e for e in integrity.file_entries(good) if e["name"] == DATA])
    with pytest.raises(ValueError, match="not a non-empty list"):
        commit(good, 1, files=[])


@pytest.mark.parametrize("missing", ["data", "metadata", "all"])
def test_marker_without_checksums_is_damaged_when_checksums_are_verified(missing, good):
    marker = marker_of(good)
    for entry in marker["files"]:
        if missing == "all" or (entry["name"] == DATA) == (missing == "data"):
            for key in integrity.SUM_KEYS:
                entry.pop(key, None)
    write_raw_marker(good, marker)
    flip_byte(good / DATA)  # same size: only a checksum could tell
    assert_damaged_everywhere(good, "has no checksum in the marker")
    assert integrity.verify(good, checksums=False) == []  # sizes-only checking is what it says


@pytest.mark.parametrize("name", ["../outside.bin", "/etc/hostname", "a/b", "", ".", ".."])
def test_marker_names_outside_the_checkpoint_are_never_read(name, good, tmp_path):
    outside = tmp_path / "outside.bin"
    outside.write_bytes(b"secret" * 10)
    marker = marker_of(good)
    marker["files"].append({"name": name, "size": 60, "crc32": "00000000"})
    marker["total_bytes"] += 60
    write_raw_marker(good, marker)
    problems = integrity.verify(good)
    assert len(problems) == 1 and "is not a plain file name inside the checkpoint" in problems[0], problems
    assert "secret" not in problems[0] and "60 bytes" not in problems[0]
    verified = ckpt("verify", good)
    assert verified.returncode == 1 and "is malformed" in verified.stdout
    assert "is malformed" in check(good)


@pytest.mark.parametrize("file", [DATA, ".metadata"])
def test_a_symlink_out_of_the_checkpoint_is_damaged(file, good, tmp_path):
    outside = tmp_path / "elsewhere" / file
    outside.parent.mkdir()
    shutil.move(good / file, outside)
    (good / file).symlink_to(outside)  # same bytes, same size, same checksum: but not in the checkpoint
    assert_damaged_everywhere(good, "is a symbolic link out of the checkpoint")


@pytest.mark.parametrize("kind", ["dangling", "loop"])
def test_a_symlink_to_nothing_is_damaged(kind, good):
    (good / DATA).unlink()
    if kind == "dangling":
        (good / DATA).symlink_to(good / "gone.bin")
    else:
        (good / DATA).symlink_to(good / "loop.bin")
        (good / "loop.bin").symlink_to(good / DATA)
    assert_damaged_everywhere(good, "is a symbolic link to nothing readable")


def test_a_symlink_inside_the_checkpoint_is_fine(good):
    shutil.move(good / DATA, good / "real.bin")
    (good / DATA).symlink_to("real.bin")
    assert integrity.verify(good) == []


def huge_tensor(metadata):
    entry = metadata.state_dict_metadata["net.weight"]
    entry.size = torch.Size([1 << 20, 1 << 20])
    entry.chunks[0].sizes = torch.Size([1 << 20, 1 << 20])


def huge_shape_small_chunk(metadata):
    metadata.state_dict_metadata["net.weight"].size = torch.Size([1 << 20, 1 << 20])


def chunk_outside(metadata):
    metadata.state_dict_metadata["net.bias"].chunks[0].offsets = torch.Size([2])


def past_the_end(metadata):
    storage_of(metadata, "net.bias").offset = 10**12


def negative_length(metadata):
    storage_of(metadata, "train.step").length = -5


def no_storage(metadata):
    index = next(i for i in metadata.storage_data if i.fqn == "opt.state.0.exp_avg")
    del metadata.storage_data[index]


def not_a_shape(metadata):
    metadata.state_dict_metadata["net.bias"].size = "three"


def transforms(metadata):
    storage_of(metadata, "net.bias").transform_descriptors = ["zstd"]


@pytest.mark.parametrize(
    "change, needle",
    [
        (huge_tensor, "declares 4398046511104 bytes"),
        (huge_shape_small_chunk, "its chunks hold 12"),
        (chunk_outside, "outside its shape"),
        (past_the_end, "which has"),
        (negative_length, "not byte counts"),
        (no_storage, "has no stored bytes for its chunk"),
        (not_a_shape, "malformed tensor description"),
        (transforms, "stream transforms"),
    ],
)
def test_absurd_or_inconsistent_metadata_is_refused_before_anything_is_allocated(change, needle, good, tmp_path):
    rewrite_metadata(good, change)
    assert_damaged_everywhere(good, needle, checksums=False)
    with pytest.raises(ValueError, match=needle):
        read_state(good)  # the tools' reader refuses even without a marker's say
    (good / layout.MARKER).unlink()
    with pytest.raises(ValueError, match=needle):
        read_state(good)
    assert needle in one_line_error(ckpt("show", good), 1)


def test_convert_of_a_4_tb_tensor_is_one_line_exit_1(good, tmp_path):
    rewrite_metadata(good, huge_tensor)
    started = time.perf_counter()
    line = one_line_error(ckpt("convert", good, tmp_path / "x.pt"), 1)
    assert "declares 4398046511104 bytes" in line and time.perf_counter() - started < 30


def test_foreign_metadata_behind_a_verified_marker_never_loads(good, tmp_path):
    """The issue's case: resume and convert loaded another run's weights. Now the newest is unusable and
    the run falls back to the intact previous checkpoint."""
    newer = add_step(good, 2)
    point_metadata_at(newer, foreign_run(tmp_path) / DATA)
    result = load(good.parent)
    assert result.step == 1 and result.path == good


# ------------------------------------------------------------------- item 5: malformed markers
def _drop(field):
    def change(m):
        del m[field]
        return m
    return change


def _set(field, value):
    def change(m):
        m[field] = value
        return m
    return change


def _rename_size(m):
    m["files"][0]["sz"] = m["files"][0].pop("size")
    return m


def _file_entry(value):
    def change(m):
        m["files"][0] = value
        return m
    return change


def _entry_field(field, value):
    def change(m):
        m["files"][-1][field] = value
        return m
    return change


def _duplicate(m):
    m["files"].append(dict(m["files"][0]))
    m["total_bytes"] += m["files"][0]["size"]
    return m


MALFORMED = {
    "files missing": (_drop("files"), "files is missing"),
    "size renamed": (_rename_size, "size is missing"),
    "size a string": (_entry_field("size", "12"), 'size is "12"'),
    "size negative": (_entry_field("size", -1), "size is -1"),
    "entry not a dict": (_file_entry("__0_0.distcp"), "not an object"),
    "entry null": (_file_entry(None), "files[0] is missing"),
    "name a number": (_entry_field("name", 7), "name is 7"),
    "crc32 a number": (_entry_field("crc32", 123), "crc32 is 123"),
    "files a dict": (_set("files", {"a": 1}), "not a non-empty list"),
    "duplicate names": (_duplicate, "twice"),
    "step missing": (_drop("step"), "no step field"),
    "step a string": (_set("step", "5"), 'step is "5"'),
    "step a bool": (_set("step", True), "step is true"),
    "world_size zero": (_set("world_size", 0), "world_size is 0"),
    "world_size missing": (_drop("world_size"), "no world_size field"),
    "total_bytes wrong": (_set("total_bytes", 5), "not the sum of the file sizes"),
    "committed_at text": (_set("committed_at", "yesterday"), "not a time"),
    "committed_at NaN": (_set("committed_at", float("nan")), "not a time"),
    "format_version missing": (_drop("format_version"), "format_version is missing"),
    "format_version text": (_set("format_version", "2"), 'format_version is "2"'),
    "format_version zero": (_set("format_version", 0), "unknown format_version 0"),
    "state_keys a list": (_set("state_keys", ["net"]), "state_keys is"),
    "model a string": (_set("model", "gpt"), "model is"),
    "not an object": (lambda m: [m], "not an object"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_marker_is_damage_with_a_one_line_reason(case, good):
    change, needle = MALFORMED[case]
    write_raw_marker(good, change(marker_of(good)))
    with pytest.raises(ValueError) as raised:
        layout.read_marker(good)
    assert "is malformed" in str(raised.value) and needle in str(raised.value) and "\n" not in str(raised.value)
    assert_damaged_everywhere(good, needle)
    assert needle in one_line_error(ckpt("show", good), 1)


@pytest.mark.parametrize(
    "raw",
    [b"", b"{not json", b"\xff\xfe\x00binary", b"[" * 100_000 + b"]" * 100_000, b'{"step": 1, "files": [', b"null"],
)
def test_unreadable_marker_bytes_are_damage(raw, good):
    write_raw_marker(good, raw)
    with pytest.raises(ValueError):
        layout.read_marker(good)
    assert check(good)
    verified = ckpt("verify", good)
    assert verified.returncode == 1 and verified.stdout.startswith("DAMAGED") and len(verified.stdout.splitlines()) == 1
    one_line_error(ckpt("show", good), 1)
    one_line_error(ckpt("convert", good, good.parent / "x.pt"), 1)


def load(root: Path):
    """Resume in one process: the newest usable checkpoint of ``root`` into a fresh model's state."""
    target = {"net": torch.nn.Linear(4, 3).state_dict()}
    expect = loading.Expectations(model=None, world_size=1, allow_world_size_change=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return loading.load_best(
            target, loading.find_candidates(root, "auto"), resume="auto", expect=expect, rank=0, world_size=1,
            device=torch.device("cpu"), process_group=None, verify_checksums=True, optional_prefixes=(), root=root,
        )


@pytest.mark.parametrize("case", ["size renamed", "entry not a dict", "step a string", "not an object", "files missing"])
def test_resume_falls_back_past_a_malformed_newest_marker(case, good):
    newest = add_step(good, 2)
    change, needle = MALFORMED[case]
    write_raw_marker(newest, change(marker_of(newest)))
    result = load(good.parent)
    assert result.step == 1 and result.path == good


def test_list_of_a_run_with_a_malformed_marker_shows_every_checkpoint(good):
    add_step(good, 2)
    broken = add_step(good, 3)
    write_raw_marker(broken, _rename_size(marker_of(broken)))
    listed = ckpt("list", good.parent.parent)
    assert listed.returncode == 0 and "Traceback" not in listed.stderr
    rows = [line.split()[:2] for line in listed.stdout.splitlines()[1:] if not line.strip().startswith("!")]
    assert rows == [["1", "complete"], ["2", "complete"], ["3", "damaged"]]
    assert "size is missing" in listed.stdout


@pytest.mark.parametrize("version", [3, 17])
def test_a_newer_format_is_refused_in_one_line(version, good):
    write_raw_marker(good, {**marker_of(good), "format_version": version, "new_field": {"x": 1}})
    expected = f"written by a newer ftrain (format_version {version}); this one reads 1-2"
    with pytest.raises(layout.NewerFormatError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        layout.read_marker(good)
    with pytest.raises(CheckpointError, match="newer ftrain"):
        check(good)  # a configuration problem, not damage: resume stops instead of skipping it
    verified = ckpt("verify", good)
    assert verified.returncode == 1 and verified.stdout.startswith("UNSUPPORTED") and expected in verified.stdout
    rows = json.loads(ckpt("list", good.parent, "--json").stdout)
    assert rows[0]["status"] == "unsupported" and expected in rows[0]["problems"][0]
    assert expected in one_line_error(ckpt("show", good), 1)


def test_format_version_constants():
    assert layout.FORMAT_VERSION == 2 and layout.SUPPORTED_FORMAT_VERSIONS == (1, 2)


# ---------------------------------------------------------------------------- item 6: prune
def three_steps(good):
    return good, add_step(good, 2), add_step(good, 3)


def steps_left(good):
    return [d.step for d in layout.scan(good.parent)]


@pytest.mark.parametrize("damage", ["flip", "truncate", "malformed", "foreign"])
def test_prune_keeps_the_newest_checkpoint_that_verifies(damage, good, tmp_path):
    first, second, third = three_steps(good)
    if damage == "flip":
        flip_byte(third / DATA)
    elif damage == "truncate":
        (third / DATA).write_bytes((third / DATA).read_bytes()[:-10])
    elif damage == "malformed":
        write_raw_marker(third, _drop("files")(marker_of(third)))
    else:
        point_metadata_at(third, foreign_run(tmp_path) / DATA)
    dry = ckpt("prune", good.parent.parent, "--keep-last", "1", "--dry-run")
    assert dry.returncode == 0 and f"keeping {second}: the newest checkpoint that verifies" in dry.stdout, dry
    assert "step_00000003 is damaged" in dry.stdout and steps_left(good) == [1, 2, 3]
    pruned = ckpt("prune", good.parent.parent, "--keep-last", "1")
    assert pruned.returncode == 0, pruned.stderr
    assert steps_left(good) == [2, 3]
    assert integrity.verify(second) == []


def test_prune_with_two_damaged_newest_keeps_the_oldest(good):
    first, second, third = three_steps(good)
    flip_byte(second / DATA)
    write_raw_marker(third, "{broken")
    pruned = ckpt("prune", good.parent.parent, "--keep-last", "1")
    assert pruned.returncode == 0 and f"keeping {first}" in pruned.stdout
    assert steps_left(good) == [1, 3]


def test_prune_refuses_when_nothing_verifies_unless_forced(good):
    for path in three_steps(good):
        flip_byte(path / DATA)
    refused = ckpt("prune", good.parent.parent, "--keep-last", "1")
    assert "no checkpoint under" in one_line_error(refused, 1) and steps_left(good) == [1, 2, 3]
    forced = ckpt("prune", good.parent.parent, "--keep-last", "1", "--force")
    assert forced.returncode == 0 and steps_left(good) == [3]


def test_prune_without_damage_is_unchanged(good):
    three_steps(good)
    pruned = ckpt("prune", good.parent.parent, "--keep-last", "2")
    assert pruned.returncode == 0 and "keeping" not in pruned.stdout and steps_left(good) == [2, 3]


def own_process_start() -> str:
    return (Path("/proc") / str(os.getpid()) / "stat").read_text().rsplit(")", 1)[1].split()[19]


@pytest.mark.parametrize(
    "holder, age_s, live",
    [
        ("this_process", 0, True),
        ("this_process", 3600, True),  # a live process on this host, even if its heartbeat lags
        ("dead_pid", 0, False),
        ("other_host", 0, True),
        ("other_host", 120, False),
        ("half_written", 0, True),
        ("half_written", 120, False),
        ("pid_null", 0, True),
        ("pid_null", 120, False),
        ("wrong_start", 0, False),  # a reused pid that is not the holder
    ],
)
def test_prune_refuses_while_a_live_job_holds_the_lock(holder, age_s, live, good):
    three_steps(good)
    run_dir = good.parent.parent
    me = {"host": socket.gethostname(), "pid": os.getpid(), "process_start": own_process_start()}
    if holder == "dead_pid":
        dead = subprocess.Popen(["true"])
        dead.wait()
        content = json.dumps({**me, "pid": dead.pid})
    elif holder == "other_host":
        content = json.dumps({**me, "host": "another-node"})
    elif holder == "half_written":
        content = ""
    elif holder == "pid_null":
        content = json.dumps({**me, "pid": None})
    elif holder == "wrong_start":
        content = json.dumps({**me, "process_start": "1"})
    else:
        content = json.dumps(me)
    lock = run_dir / "LOCK"
    lock.write_text(content)
    old = time.time() - age_s
    os.utime(lock, (old, old))
    pruned = ckpt("prune", run_dir, "--keep-last", "1")
    if live:
        assert "not pruning while a job may be writing" in one_line_error(pruned, 1)
        assert steps_left(good) == [1, 2, 3]
        forced = ckpt("prune", run_dir, "--keep-last", "1", "--force")
        assert forced.returncode == 0 and "pruning anyway" in forced.stderr
    else:
        assert pruned.returncode == 0, pruned.stderr
        assert "left by a job that is gone" in pruned.stderr
    assert steps_left(good) == [3]
    assert lock.read_text() == content  # prune reads the lock, never changes it


def test_prune_refuses_while_a_real_job_holds_the_lock(good):
    """A real process takes the run's lock the library's way; prune refuses until it is gone."""
    three_steps(good)
    run_dir = good.parent.parent
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time\nfrom ftrain.checkpoint.lock import RunLock\n"
         "RunLock(sys.argv[1]).acquire()\nprint('held', flush=True)\ntime.sleep(120)\n", str(run_dir)],
        stdout=subprocess.PIPE, text=True, cwd=REPO,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        line = one_line_error(ckpt("prune", run_dir, "--keep-last", "1"), 1)
        assert f"pid {holder.pid}" in line and steps_left(good) == [1, 2, 3]
    finally:
        holder.kill()
        holder.wait()
    pruned = ckpt("prune", run_dir, "--keep-last", "1")  # SIGKILLed: its lock is stale now
    assert pruned.returncode == 0, pruned.stderr
    assert steps_left(good) == [3]


# --------------------------------------------------------------- issue 15: a run directory will do
@pytest.mark.parametrize("given", ["run", "checkpoints"])
def test_show_verify_convert_take_a_run_directory(given, good, tmp_path):
    add_step(good, 2)
    newest = add_step(good, 3)
    incomplete = good.parent / "step_00000004"
    shutil.copytree(good, incomplete)
    (incomplete / layout.MARKER).unlink()
    where = good.parent.parent if given == "run" else good.parent
    for args in (("verify", where), ("show", where), ("convert", where, tmp_path / f"{given}.pt")):
        proc = ckpt(*args)
        assert proc.returncode == 0, proc.stderr
        assert f"using its latest complete checkpoint, {newest}" in proc.stderr
    assert str(newest) in ckpt("verify", where).stdout
    assert torch.load(tmp_path / f"{given}.pt", weights_only=True)["train"]["step"] == 1


def test_a_run_directory_without_a_complete_checkpoint_is_exit_2(tmp_path):
    (tmp_path / "run" / "checkpoints" / "step_00000005").mkdir(parents=True)
    for command in ("verify", "show"):
        assert "no complete checkpoint under" in one_line_error(ckpt(command, tmp_path / "run"), 2)


# ------------------------------------------------------------- item 7: one line, the README's codes
def test_convert_output_paths(good, tmp_path):
    out_dir = tmp_path / "a_dir"
    out_dir.mkdir()
    assert "is a directory" in one_line_error(ckpt("convert", good, out_dir), 2)
    existing = tmp_path / "model.pt"
    existing.write_bytes(b"keep me")
    assert "already exists" in one_line_error(ckpt("convert", good, existing), 2)
    assert "is not a torch.save file" in one_line_error(ckpt("convert", good, existing, "--overwrite"), 2)
    assert existing.read_bytes() == b"keep me"  # --overwrite replaces only convert's own earlier output
    existing.unlink()
    assert ckpt("convert", good, existing, "--model-only").returncode == 0
    assert "already exists (--overwrite" in one_line_error(ckpt("convert", good, existing), 2)
    assert ckpt("convert", good, existing, "--overwrite").returncode == 0
    assert "net" in torch.load(existing, weights_only=True)
    assert "is not a directory" in one_line_error(ckpt("convert", good, existing / "x.pt"), 2)
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temporary file left


def test_convert_of_a_damaged_checkpoint_is_exit_1(good, tmp_path):
    flip_byte(good / DATA)
    assert "is damaged, not converting" in one_line_error(ckpt("convert", good, tmp_path / "x.pt"), 1)
    assert not (tmp_path / "x.pt").exists()


class RunsACommand:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def test_checkpoints_refused_by_content_are_one_line(good, tmp_path):
    pwned = tmp_path / "PWNED"
    (good / ".metadata").write_bytes(pickle.dumps(RunsACommand(pwned)))
    commit(good, 1)
    for args in (("verify",), ("show",), ("convert",), ("list",)):
        target = good.parent if args[0] == "list" else good
        extra = [tmp_path / "x.pt"] if args[0] == "convert" else []
        proc = ckpt(*args, target, *extra)
        assert "Traceback" not in proc.stdout + proc.stderr
        assert "posix.system" in proc.stdout + proc.stderr, proc
        assert proc.returncode == (0 if args[0] == "list" else 1)
    assert not pwned.exists()


def test_the_script_prints_one_line_on_a_malformed_marker(good):
    write_raw_marker(good, _file_entry(["x"])(marker_of(good)))
    for command in ("show", "convert"):
        extra = [str(good.parent / "x.pt")] if command == "convert" else []
        proc = subprocess.run(
            [sys.executable, str(REPO / "tools" / "ckpt.py"), command, str(good), *extra],
            capture_output=True, text=True, timeout=120, cwd=REPO,
        )
        assert proc.returncode == 1 and "Traceback" not in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1 and "is malformed" in proc.stderr, proc.stderr
