"""Commit marker, discovery and retention on real directories."""

import json
import pickle

import pytest
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata, MetadataIndex

from ftrain.checkpoint import integrity, layout


def fake_metadata(size):
    """DCP metadata of one bytes entry that fills ``__0_0.distcp`` (real classes, no tensors)."""
    return pickle.dumps(
        Metadata(
            state_dict_metadata={"blob": BytesStorageMetadata()},
            storage_data={MetadataIndex("blob"): _StorageInfo("__0_0.distcp", 0, size)},
        )
    )


def make_step(root, step, complete=True, size=10):
    path = layout.step_dir(root, step)
    path.mkdir(parents=True)
    (path / "__0_0.distcp").write_bytes(b"x" * size)
    (path / ".metadata").write_bytes(fake_metadata(size))
    if complete:
        layout.write_marker(path, {"step": step, "world_size": 1}, integrity.file_entries(path))
    return path


def test_marker_content_and_atomic_write(tmp_path):
    path = make_step(tmp_path, 7, size=123)
    marker = json.loads((path / "COMPLETE").read_text())
    assert marker["step"] == 7 and marker["world_size"] == 1
    metadata_size = (path / ".metadata").stat().st_size
    assert marker["total_bytes"] == 123 + metadata_size
    assert {f["name"]: f["size"] for f in marker["files"]} == {"__0_0.distcp": 123, ".metadata": metadata_size}
    assert not (path / "COMPLETE.tmp").exists()
    assert integrity.verify(path) == []


def test_latest_ignores_data_without_marker(tmp_path):
    make_step(tmp_path, 10)
    make_step(tmp_path, 20, complete=False)
    assert layout.latest_complete(tmp_path).step == 10


def test_marker_being_written_does_not_count(tmp_path):
    make_step(tmp_path, 10)
    path = make_step(tmp_path, 20, complete=False)
    (path / "COMPLETE.tmp").write_text('{"step": 20')  # killed mid-write of the marker
    assert layout.latest_complete(tmp_path).step == 10


def test_half_deleted_checkpoint_is_not_complete(tmp_path):
    make_step(tmp_path, 10)
    path = make_step(tmp_path, 20)
    trash = path.with_name(path.name + ".deleting")  # a delete killed after its rename
    path.rename(trash)
    assert layout.latest_complete(tmp_path).step == 10
    assert trash in [d.path for d in layout.plan_purge(tmp_path, keep_last=3)]


def test_other_names_are_ignored(tmp_path):
    make_step(tmp_path, 10)
    (tmp_path / "step_abc").mkdir()
    (tmp_path / "notes.txt").write_text("hi")
    assert [d.step for d in layout.scan(tmp_path)] == [10]


def test_missing_root_means_no_checkpoints(tmp_path):
    assert layout.latest_complete(tmp_path / "nope") is None


def test_verify_finds_truncation_missing_files_and_flipped_bytes(tmp_path):
    path = make_step(tmp_path, 10, size=100)
    data = bytearray((path / "__0_0.distcp").read_bytes())
    data[50] ^= 0x01
    (path / "__0_0.distcp").write_bytes(bytes(data))
    assert any("__0_0.distcp fails its checksum" in p for p in integrity.verify(path))
    assert integrity.verify(path, checksums=False) == []  # same size: only the checksum can tell
    (path / "__0_0.distcp").write_bytes(b"short")
    (path / ".metadata").unlink()
    problems = integrity.verify(path)
    assert any("missing file .metadata" in p for p in problems)
    assert any("__0_0.distcp is 5 bytes" in p for p in problems)


def test_unreadable_marker(tmp_path):
    path = make_step(tmp_path, 10)
    (path / "COMPLETE").write_text("{not json")
    with pytest.raises(ValueError, match="unreadable"):
        layout.read_marker(path)
    assert "unreadable" in integrity.verify(path)[0]


def test_retention_keeps_last_and_every(tmp_path):
    for step in (10, 20, 30, 40, 50):
        make_step(tmp_path, step)
    doomed = layout.plan_purge(tmp_path, keep_last=2, keep_every=20)
    assert [layout.parse_step(p) for p in doomed] == [10, 30]


def test_retention_removes_stale_incomplete_but_not_in_flight(tmp_path):
    make_step(tmp_path, 10)
    make_step(tmp_path, 15, complete=False)  # a crashed save, older than the newest complete
    make_step(tmp_path, 20)
    make_step(tmp_path, 25, complete=False)  # the save in flight right now
    doomed = [layout.parse_step(p) for p in layout.plan_purge(tmp_path, keep_last=3, in_flight=25)]
    assert doomed == [15]


def test_retention_never_deletes_the_latest(tmp_path):
    make_step(tmp_path, 10)
    assert layout.plan_purge(tmp_path, keep_last=1) == []


def test_remove_dir_renames_first(tmp_path):
    path = make_step(tmp_path, 10)
    layout.remove_dir(path)
    assert list(tmp_path.iterdir()) == []


def test_startup_cleanup_and_set_aside(tmp_path):
    make_step(tmp_path, 10)
    make_step(tmp_path, 20)
    make_step(tmp_path, 30, complete=False)
    removed = layout.remove_incomplete(tmp_path)
    assert [p.name for p in removed] == ["step_00000030"]
    moved = layout.set_aside_newer(tmp_path, 10)
    assert len(moved) == 1 and moved[0].path.parent.name == "superseded"
    assert [d.step for d in layout.scan(tmp_path)] == [10]
