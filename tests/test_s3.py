"""Durable checkpoints in object storage (``checkpoint.dir=s3://bucket/prefix``), against a real S3 server
(SeaweedFS, started by the tests: tests/s3server.py). No mocks of the client."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from conftest import REPO, assert_same_tensors, check_ok, checkpoint_tensors, kill_job, run_train, scalars, start_train, wait_for
from s3server import S3Server, s3_bucket, s3_server  # noqa: F401  (importing registers the fixtures)

from ftrain.checkpoint import integrity, layout
from ftrain.checkpoint.storage import CheckpointDir, PosixStorage, open_storage
from ftrain.checkpoint.sums import WRITE_SUM, buffer_sum

NO_LOCAL = "checkpoint.local_interval=0"  # the durable path alone: resumes must come from the store


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """The AWS environment of the test server, for this process and the processes it starts."""
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    return s3_server


def keys_under(server: S3Server, bucket: str, prefix: str) -> dict[str, int]:
    found: dict[str, int] = {}
    for page in server.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        found.update({item["Key"]: item["Size"] for item in page.get("Contents", [])})
    return found


# ------------------------------------------------------------------------------------- the storage seam
@pytest.fixture(params=["posix", "s3"])
def storage(request, tmp_path):
    if request.param == "posix":
        return PosixStorage(tmp_path / "root")
    server = request.getfixturevalue("s3_env")
    bucket = request.getfixturevalue("s3_bucket")
    assert server is not None
    return open_storage(f"s3://{bucket}/some/prefix")


def test_storage_contract(storage):
    """What layout, integrity and the loader rely on, the same on disk and in an object store."""
    storage.make_root()
    assert storage.dirs() == [] and not storage.exists("step_00000001/a")
    if storage.is_local:  # files go into directories DCP made (an object store needs none)
        for name in ("step_00000001", "step_00000002"):
            storage.local_path(name).mkdir()
    storage.write_atomic("step_00000001/a.distcp", b"x" * 1000)
    storage.write_atomic("step_00000001/COMPLETE", b"{}")
    storage.write_atomic("step_00000002/b", b"")
    assert sorted(storage.dirs()) == ["step_00000001", "step_00000002"]
    assert [(f.name, f.size) for f in storage.files("step_00000001")] == [("COMPLETE", 2), ("a.distcp", 1000)]
    assert storage.exists("step_00000001/COMPLETE") and storage.is_dir("step_00000001")
    assert storage.file_size("step_00000002/b") == 0 and storage.read_bytes("step_00000002/b") == b""
    assert storage.read_bytes("step_00000001/a.distcp", limit=10) == b"x" * 10
    assert storage.checksum("step_00000001/a.distcp", WRITE_SUM) == buffer_sum(b"x" * 1000)
    with pytest.raises(FileNotFoundError):
        storage.file_size("step_00000001/nothing")
    with pytest.raises(FileNotFoundError):
        storage.read_bytes("step_00000001/nothing")
    with storage.open_read("step_00000001/a.distcp") as stream:
        stream.seek(990)
        assert stream.read() == b"x" * 10 and stream.seek(0, 2) == 1000
    storage.move_dir("step_00000001", "superseded/step_00000001-x")
    assert not storage.is_dir("step_00000001")
    assert storage.read_bytes("superseded/step_00000001-x/a.distcp") == b"x" * 1000
    storage.remove_dir("step_00000002")
    assert storage.dirs() == ["superseded"]


def test_remove_deletes_the_marker_first(s3_env, s3_bucket):
    """Without rename, the marker object goes first: an interrupted removal leaves an incomplete directory."""
    storage = open_storage(f"s3://{s3_bucket}/run")
    for name in ("a.distcp", ".metadata", "COMPLETE"):
        storage.write_atomic(f"step_00000005/{name}", b"data")
    deleted = []
    client = storage.client
    original = client.delete_object

    def stop_after_first(**kwargs):  # the removal "dies" after its first delete
        deleted.append(kwargs["Key"])
        original(**kwargs)
        raise KeyboardInterrupt

    client.delete_object = stop_after_first
    with pytest.raises(KeyboardInterrupt):
        storage.remove_dir("step_00000005")
    client.delete_object = original
    assert deleted == ["run/step_00000005/COMPLETE"]
    assert [(d.step, d.complete) for d in layout.scan(storage)] == [(5, False)]
    assert layout.remove_incomplete(storage) and layout.scan(storage) == []


def test_listings_past_one_page(s3_env, s3_bucket):
    """More objects than one listing page (1000): every one is found."""
    storage = open_storage(f"s3://{s3_bucket}/many")
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda i: storage.write_atomic(f"step_00000001/f{i:05d}", b"."), range(1105)))
    assert len(storage.files("step_00000001")) == 1105
    storage.remove_dir("step_00000001")
    assert storage.dirs() == []


def test_a_temporary_file_is_uploaded_once_under_its_final_name(s3_env, s3_bucket):
    """DCP writes .metadata as .metadata.tmp and renames it: the S3 file system holds the temporary file and makes
    it one upload under the final name at the rename (no temporary object, no copy); a write that fails while held
    leaves nothing."""
    from ftrain.checkpoint.storage import s3_io

    storage = open_storage(f"s3://{s3_bucket}/held")
    fs = s3_io.S3FileSystem(storage)
    tmp, final = f"{storage.url}/step_00000001/.metadata.tmp", f"{storage.url}/step_00000001/.metadata"
    with fs.create_stream(tmp, "wb") as stream:
        stream.write(b"meta")
        stream.write(b"data")
    assert storage.files("step_00000001") == []  # nothing sent yet
    assert fs.exists(tmp) and not fs.exists(final)
    fs.rename(tmp, final)
    assert [info.name for info in storage.files("step_00000001")] == [".metadata"]
    assert storage.read_bytes("step_00000001/.metadata") == b"metadata" and not fs.exists(tmp)
    with pytest.raises(RuntimeError):
        with fs.create_stream(f"{storage.url}/step_00000002/.metadata.tmp", "wb") as stream:
            stream.write(b"half")
            raise RuntimeError("the writer died")
    assert storage.files("step_00000002") == [] and not fs.exists(f"{storage.url}/step_00000002/.metadata.tmp")


def test_a_save_makes_few_requests(s3_env, s3_bucket):
    """A save with retention at work (async, keep_last=1), counted at the client: the data file, CHECKSUMS.json,
    .metadata (one upload) and the marker (names, sizes and sums come from the writer, which ran in this process:
    nothing is listed or read back at the commit); one listing of the prefix and the removal of the older
    checkpoint (marker, listing, batch delete). No HEAD, no copy, no GET; and the marker still verifies every
    file."""
    import time

    import torch

    from ftrain.checkpoint import CheckpointManager
    from ftrain.checkpoint.collectives import DistContext
    from ftrain.checkpoint.compat import RunSignature
    from ftrain.checkpoint.options import CheckpointOptions

    storage = open_storage(f"s3://{s3_bucket}/few")
    manager = CheckpointManager(storage, CheckpointOptions(mode="async", keep_last=1, write_threads=1),
                                DistContext(0, 1, torch.device("cpu"), None), RunSignature(model=None))
    state = {"w": torch.arange(1000, dtype=torch.float32), "b": torch.ones(10)}
    requests: list[str] = []
    try:
        for step in (1, 2):
            manager.save(step, {"state": state})
            assert manager.wait().ok
        wait_for(lambda: [d.step for d in layout.scan(storage)] == [2], 30, what="retention of step 1")
        storage.client.meta.events.register("before-call.s3", lambda model, **_: requests.append(model.name))
        manager.save(3, {"state": state})
        assert manager.wait().ok
        wait_for(lambda: requests.count("DeleteObjects") == 1, 30, what="retention of step 2")
        time.sleep(0.2)
    finally:
        manager.close()
    counts = {name: requests.count(name) for name in sorted(set(requests))}
    assert counts == {"DeleteObject": 1, "DeleteObjects": 1, "ListObjectsV2": 2, "PutObject": 4}, counts
    newest = layout.latest_complete(storage)
    assert newest is not None and newest.step == 3 and integrity.verify(newest.dir, checksums=True) == []


def test_uneven_writes_become_the_exact_bytes_in_parts(s3_env, s3_bucket, monkeypatch):
    """Writes that straddle part boundaries (1 byte, odd sizes, several parts at once) through the S3 file
    system's stream: the object is exactly the bytes written, in order, with whole parts sent from reused buffers
    (never more than UPLOADS_IN_FLIGHT + 1 of them); a small file is one PUT of what it holds."""
    import random

    from ftrain.checkpoint.storage import s3_io

    monkeypatch.setattr(s3_io, "PART_BYTES", 5 << 20)  # S3's smallest part: more parts for the same bytes
    storage = open_storage(f"s3://{s3_bucket}/uneven")
    fs = s3_io.S3FileSystem(storage)
    rng = random.Random(3)
    payload = rng.randbytes(27 << 20)  # 5.4 parts
    sizes = [1, 5 << 20, 3, (7 << 20) + 11, 12 << 20]
    sent: list[int] = []
    real_upload_part = storage.client.upload_part

    def upload_part(**kwargs):
        sent.append(id(kwargs["Body"]))
        return real_upload_part(**kwargs)

    monkeypatch.setattr(storage.client, "upload_part", upload_part)
    with fs.create_stream(f"{storage.url}/step_00000001/data", "wb") as stream:
        offset = 0
        for size in [*sizes, len(payload)]:
            chunk = payload[offset : offset + size]
            assert stream.write(memoryview(chunk)) == len(chunk)
            offset += len(chunk)
            if offset >= len(payload):
                break
        assert stream.tell() == len(payload)
    assert storage.read_bytes("step_00000001/data") == payload
    assert len(sent) == 6 and len(set(sent[:5])) <= s3_io.UPLOADS_IN_FLIGHT + 1
    with fs.create_stream(f"{storage.url}/step_00000001/small", "wb") as stream:
        stream.write(b"abc")
        stream.write(bytearray(b"de"))
    assert storage.read_bytes("step_00000001/small") == b"abcde" and len(sent) == 6


def test_a_large_file_goes_up_in_parts_and_verifies(s3_env, s3_bucket, tmp_path):
    """DCP's writer through the S3 file system: a multipart upload checksummed as it is sent, verified on read."""
    import torch
    import torch.distributed.checkpoint as dcp

    from ftrain.checkpoint.safe_load import SafeFileSystemReader
    from ftrain.checkpoint.writer import CheckpointWriter

    checkpoint = CheckpointDir(open_storage(f"s3://{s3_bucket}/big"), "step_00000001")
    state = {"big": torch.randn(10 << 20), "small": torch.arange(5), "blob": {"a": 1}}
    dcp.save(state, storage_writer=CheckpointWriter(checkpoint), no_dist=True)
    layout.write_marker(checkpoint, {"step": 1, "world_size": 1}, integrity.file_entries(checkpoint))
    assert integrity.verify(checkpoint) == []
    marker = layout.read_marker(checkpoint)
    loaded = {"big": torch.zeros(10 << 20), "small": torch.zeros(5, dtype=torch.long), "blob": {"a": 0}}
    from ftrain.checkpoint.loading import data_sums

    reader = SafeFileSystemReader(checkpoint, expected_sums=data_sums(marker))
    dcp.load(loaded, storage_reader=reader, no_dist=True)
    assert torch.equal(loaded["big"], state["big"]) and loaded["blob"] == {"a": 1}
    # a second save's uploads go through the same threads: no pool (and its threads) per save
    import threading

    from ftrain.checkpoint.storage.s3_io import upload_pool

    pool = upload_pool()
    dcp.save(state, storage_writer=CheckpointWriter(CheckpointDir(open_storage(f"s3://{s3_bucket}/big"), "step_00000002")),
             no_dist=True)
    assert upload_pool() is pool
    uploaders = [t for t in threading.enumerate() if t.name.startswith("ftrain-s3-upload")]
    assert 0 < len(uploaders) <= pool._max_workers


# ------------------------------------------------------------------------------------ the recipe on s3://
def test_sigkill_before_commit_then_resume_from_the_store_bit_for_bit(s3_env, s3_bucket, reference_run, tmp_path):
    """Every object of step 10 is uploaded, only the marker is missing: the relaunch resumes from step 5 in the
    store, cleans the leftover, and ends bit-identical to an uninterrupted run. Nothing durable is on local disk."""
    url = f"s3://{s3_bucket}/run"
    options = (f"checkpoint.dir={url}", NO_LOCAL)
    proc = start_train(tmp_path, *options, env={"FTRAIN_FAULT": "before_commit@10"})
    try:
        wait_for(lambda: "run/step_00000010/.metadata" in keys_under(s3_env, s3_bucket, "run/"), what="step 10's data", proc=proc)
    finally:
        kill_job(proc)
    stored = keys_under(s3_env, s3_bucket, "run/")
    assert "run/step_00000005/COMPLETE" in stored and "run/step_00000010/COMPLETE" not in stored
    assert not (tmp_path / "checkpoints").exists()

    resumed = run_train(tmp_path, *options)
    check_ok(resumed)
    assert f"{url}/step_00000005 (step 5)" in resumed.stderr
    assert scalars(tmp_path / "tb", "train/loss") == scalars(reference_run / "tb", "train/loss")
    assert_same_tensors(
        checkpoint_tensors(f"{url}/step_00000020"), checkpoint_tensors(reference_run / "checkpoints" / "step_00000020")
    )
    ckpt = _ckpt("verify", url)
    assert ckpt.returncode == 0 and f"OK {url}/step_00000020" in ckpt.stdout, ckpt.stderr
    listed = json.loads(_ckpt("list", url, "--json").stdout)
    assert [row["step"] for row in listed] == [10, 15, 20] and {row["status"] for row in listed} == {"complete"}


def test_damaged_newest_checkpoint_falls_back(s3_env, s3_bucket, tmp_path):
    """A flipped byte in the newest checkpoint's data object and a missing object in the one before: the resume
    falls back to the newest that verifies; ftrain-ckpt verify says which is damaged."""
    url = f"s3://{s3_bucket}/run"
    check_ok(run_train(tmp_path, f"checkpoint.dir={url}", NO_LOCAL, "train.max_steps=15"))
    client = s3_env.client()
    data = sorted(k for k in keys_under(s3_env, s3_bucket, "run/step_00000015/") if k.endswith(".distcp"))[0]
    body = bytearray(client.get_object(Bucket=s3_bucket, Key=data)["Body"].read())
    body[len(body) // 2] ^= 0xFF
    client.put_object(Bucket=s3_bucket, Key=data, Body=bytes(body))
    victim = sorted(k for k in keys_under(s3_env, s3_bucket, "run/step_00000010/") if k.endswith(".distcp"))[0]
    client.delete_object(Bucket=s3_bucket, Key=victim)
    verify = _ckpt("verify", f"{url}/step_00000015")
    assert verify.returncode == 1 and "fails its checksum" in verify.stdout, verify
    resumed = run_train(tmp_path, f"checkpoint.dir={url}", NO_LOCAL, "train.max_steps=20")
    check_ok(resumed)
    assert "step_00000015 is unusable" in resumed.stderr and "step_00000010 is unusable" in resumed.stderr
    assert f"{url}/step_00000005 (step 5)" in resumed.stderr


def test_the_payload_is_signed_over_plain_http_only(monkeypatch):
    """Over https (and AWS itself) botocore is told not to SHA-256 every payload byte for the signature (TLS
    carries them, ftrain sums them); over plain http the signature is kept."""
    from ftrain.checkpoint.storage.s3 import make_client, s3_options

    assert s3_options(None) == {"payload_signing_enabled": False}
    assert s3_options("HTTPS://store.example:9000") == {"addressing_style": "path", "payload_signing_enabled": False}
    assert s3_options("http://127.0.0.1:8333") == {"addressing_style": "path"}
    for key, value in {"AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s", "AWS_REGION": "us-east-1"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "https://store.example:9000")
    assert make_client().meta.config.s3["payload_signing_enabled"] is False
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:8333")
    assert "payload_signing_enabled" not in (make_client().meta.config.s3 or {})


def test_bad_bucket_is_one_line_and_touches_nothing(s3_env, tmp_path):
    run_dir = tmp_path / "run"
    proc = run_train(run_dir, "checkpoint.dir=s3://no-such-bucket-ftrain/run", nproc=0)
    assert proc.returncode == 2, proc.stderr
    assert "ftrain: config error: checkpoint.dir s3://no-such-bucket-ftrain/run: NoSuchBucket" in proc.stderr
    assert "Traceback" not in proc.stderr and not run_dir.exists()


def test_two_runs_on_one_prefix(s3_env, s3_bucket, tmp_path):
    """The prefix belongs to the first run (its OWNER object); another run directory is refused before it writes."""
    url = f"s3://{s3_bucket}/shared"
    check_ok(run_train(tmp_path / "a", f"checkpoint.dir={url}", NO_LOCAL, "train.max_steps=5", nproc=0))
    before = keys_under(s3_env, s3_bucket, "shared/")
    other = run_train(tmp_path / "b", f"checkpoint.dir={url}", NO_LOCAL, "train.max_steps=5", nproc=0)
    assert other.returncode == 2 and "holds the checkpoints of another run" in other.stderr, other.stderr
    assert keys_under(s3_env, s3_bucket, "shared/") == before
    assert not (tmp_path / "b" / "LOCK").exists() and not (tmp_path / "b" / "config.yaml").exists()
    again = run_train(tmp_path / "a", f"checkpoint.dir={url}", NO_LOCAL, "train.max_steps=10", nproc=0)
    check_ok(again)  # the run that owns it resumes there
    assert f"{url}/step_00000005 (step 5)" in again.stderr


def _ckpt(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ftrain.ckpt_cli", *args], capture_output=True, text=True, timeout=300, cwd=REPO
    )


BIG_MODEL = ("model.d_model=384", "model.n_layer=4")  # ~44 MB per rank with AdamW: each file goes up in parts


def test_sigkill_mid_upload_then_resume_bit_for_bit(s3_env, s3_bucket, tmp_path):
    """Killed while a data file of step 10 is half uploaded (its multipart upload open): no object of it exists,
    step 10 never looks complete, the relaunch aborts the open upload, resumes from step 5 and ends bit-identical."""
    reference = tmp_path / "reference"
    check_ok(run_train(reference, *BIG_MODEL, NO_LOCAL))
    url = f"s3://{s3_bucket}/run"
    run_dir = tmp_path / "run"
    options = (*BIG_MODEL, f"checkpoint.dir={url}", NO_LOCAL)
    client = s3_env.client()

    def open_uploads() -> list[str]:
        return [u["Key"] for u in client.list_multipart_uploads(Bucket=s3_bucket, Prefix="run/").get("Uploads", [])]

    proc = start_train(run_dir, *options, env={"FTRAIN_FAULT": "while_uploading@10"})
    try:
        wait_for(lambda: any("/step_00000010/" in key for key in open_uploads()), what="step 10's upload", proc=proc)
    finally:
        kill_job(proc)
    stored = keys_under(s3_env, s3_bucket, "run/")
    half = [key for key in open_uploads() if "/step_00000010/" in key]
    assert half and not any(key in stored for key in half)  # the half-sent file is no object
    assert "run/step_00000010/COMPLETE" not in stored and "run/step_00000005/COMPLETE" in stored

    resumed = run_train(run_dir, *options)
    check_ok(resumed)
    assert f"{url}/step_00000005 (step 5)" in resumed.stderr
    assert open_uploads() == []
    assert scalars(run_dir / "tb", "train/loss") == scalars(reference / "tb", "train/loss")
    assert_same_tensors(
        checkpoint_tensors(f"{url}/step_00000020"), checkpoint_tensors(reference / "checkpoints" / "step_00000020")
    )


def test_sigkill_after_the_marker_async_process(s3_env, s3_bucket, reference_run, tmp_path):
    """Killed right after step 10's marker object is written, with DCP's writer process uploading (the storage
    travels to it without its client): the relaunch resumes from step 10 and ends bit-identical."""
    url = f"s3://{s3_bucket}/run"
    options = (f"checkpoint.dir={url}", NO_LOCAL, "checkpoint.mode=async_process")
    proc = start_train(tmp_path, *options, env={"FTRAIN_FAULT": "after_commit@10"})
    try:
        wait_for(lambda: "run/step_00000010/COMPLETE" in keys_under(s3_env, s3_bucket, "run/"), what="step 10's marker", proc=proc)
    finally:
        kill_job(proc)
    resumed = run_train(tmp_path, *options)
    check_ok(resumed)
    assert f"{url}/step_00000010 (step 10)" in resumed.stderr
    assert scalars(tmp_path / "tb", "train/loss") == scalars(reference_run / "tb", "train/loss")
    assert_same_tensors(
        checkpoint_tensors(f"{url}/step_00000020"), checkpoint_tensors(reference_run / "checkpoints" / "step_00000020")
    )


def test_store_down_during_a_save_then_back(tmp_path, monkeypatch):
    """The server is killed while step 10's save waits to write: that save fails (logged, counted, never complete)
    and training goes on; once the server is back the next saves commit, and the run ends with exit 0."""
    server = S3Server(tmp_path / "server").start()
    try:
        for key, value in server.env().items():
            monkeypatch.setenv(key, value)
        server.make_bucket("outage")
        url = "s3://outage/run"
        # Step 10's writer pauses (the server goes down meanwhile) and the training thread pauses at steps 11 and
        # 15, so that step 15's save starts only ~12 s after step 10's failed, whatever the machine's load.
        env = {"FTRAIN_FAULT": "while_writing@10,step_done@11,step_done@15", "FTRAIN_FAULT_SECONDS": "12",
               "AWS_MAX_ATTEMPTS": "2"}
        proc = start_train(tmp_path / "run", f"checkpoint.dir={url}", NO_LOCAL, env=env)
        wait_for(lambda: proc.said("pausing at while_writing of step 10"), what="step 10's writer pause", proc=proc)
        server.stop(kill=True)
        wait_for(lambda: proc.said("checkpoint step 10 FAILED") and proc.said("pausing at step_done of step 15"), timeout=180,
                 what="step 10's failure with training held before step 15's save", proc=proc)
        server.start()
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
        stored = keys_under(server, "outage", "run/")
        assert "run/step_00000010/COMPLETE" not in stored
        assert {"run/step_00000015/COMPLETE", "run/step_00000020/COMPLETE"} <= set(stored), [
            line for line in err.splitlines() if "step 15" in line or "FAILED" in line
        ]
        assert max(scalars(tmp_path / "run" / "tb", "checkpoint/failures").values(), default=0) >= 1
        verify = _ckpt("verify", url)
        assert verify.returncode == 0, verify.stdout + verify.stderr
    finally:
        server.close()


def test_two_nodes_with_their_own_run_dirs_share_a_prefix_and_one_is_lost(s3_env, s3_bucket, reference_run, tmp_path):
    """Two torchrun agents on loopback, each node with its own run directory and local tier, durable checkpoints
    in one s3:// prefix. Node B is lost (agent and worker SIGKILLed, its local snapshots gone) and a replacement
    starts with B's empty run directory: the job resumes from the store and ends bit-identical."""
    import shutil
    import time
    import uuid

    from test_multinode import NODE_ENV, RDZV_CONF, free_port

    from ftrain.checkpoint.local import default_directory
    from ftrain.processes import kill_tree

    from conftest import FAST, TORCHRUN

    url = f"s3://{s3_bucket}/job"
    port, rdzv_id = free_port(), f"s3mn-{uuid.uuid4().hex[:8]}"
    procs: dict[str, subprocess.Popen] = {}

    def start(name: str, run_dir: Path, host: bool) -> None:
        cmd = [
            *TORCHRUN, "--nnodes=2", "--nproc_per_node=1", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}",
            f"--rdzv-id={rdzv_id}", f"--rdzv-conf={RDZV_CONF},is_host={int(host)}", "--max-restarts=3",
            str(REPO / "recipes" / "train.py"), f"run.dir={run_dir}", *FAST, f"checkpoint.dir={url}",
        ]
        log = open(tmp_path / f"{name}.log", "w")
        procs[name] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env={**os.environ, **NODE_ENV})

    def report() -> str:
        return "\n".join(f"--- {n}\n{(tmp_path / f'{n}.log').read_text(errors='replace')[-3000:]}" for n in procs)

    dir_a, dir_b = tmp_path / "node_a", tmp_path / "node_b"
    try:
        start("A", dir_a, True)
        start("B", dir_b, False)
        deadline = time.time() + 120
        while "job/step_00000005/COMPLETE" not in keys_under(s3_env, s3_bucket, "job/"):
            assert time.time() < deadline and all(p.poll() is None for p in procs.values()), report()
            time.sleep(0.1)
        kill_tree(procs["B"].pid)
        procs["B"].wait(timeout=30)
        shutil.rmtree(default_directory(dir_b), ignore_errors=True)  # the node's memory is gone with it
        shutil.rmtree(dir_b, ignore_errors=True)  # and its disk: the replacement starts empty
        start("B2", dir_b, False)
        for name in ("A", "B2"):
            procs[name].wait(timeout=max(deadline + 120 - time.time(), 1))
        assert procs["A"].returncode == 0 and procs["B2"].returncode == 0, report()
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                kill_tree(proc.pid)
                proc.wait(timeout=30)
        for run_dir in (dir_a, dir_b):
            shutil.rmtree(default_directory(run_dir), ignore_errors=True)
    logs = report()
    assert f"resumed from {url}/step_" in logs, logs
    assert_same_tensors(
        checkpoint_tensors(f"{url}/step_00000020"), checkpoint_tensors(reference_run / "checkpoints" / "step_00000020")
    )


def test_keep_every_reshard_warm_start_and_convert_from_the_store(s3_env, s3_bucket, tmp_path):
    """keep_every keeps its steps in the store; a resume on another world size reads the store; a new run warm
    starts from the s3:// prefix; ftrain-ckpt converts the latest checkpoint there to safetensors."""
    url = f"s3://{s3_bucket}/run"
    options = (f"checkpoint.dir={url}", NO_LOCAL, "checkpoint.keep_last=1", "checkpoint.keep_every=5")
    check_ok(run_train(tmp_path / "a", *options, "train.max_steps=15"))
    assert [d.step for d in layout.complete_steps(open_storage(url))] == [5, 10, 15]
    resharded = run_train(tmp_path / "a", *options, "train.max_steps=20", nproc=1)
    check_ok(resharded)
    assert f"{url}/step_00000015 (step 15)" in resharded.stderr
    warm = run_train(tmp_path / "b", f"checkpoint.initial_load={url}", "train.max_steps=2", nproc=0)
    check_ok(warm)
    assert f"warm start: model from ftrain checkpoint {url}/step_00000020" in warm.stderr + warm.stdout
    out = tmp_path / "model.safetensors"
    converted = _ckpt("convert", url, str(out), "--format", "safetensors")
    assert converted.returncode == 0 and out.is_file(), converted.stderr


@pytest.mark.soak  # CI: rollback in test_health, auto in test_interval, loading from the store in the kills above
def test_rollback_and_auto_interval_on_the_store(s3_env, s3_bucket, tmp_path):
    """checkpoint.interval=auto and a rollback past a NaN step, with every durable checkpoint in the store: the
    rollback restores the newest checkpoint from there, and every committed tensor is finite."""
    url = f"s3://{s3_bucket}/run"
    proc = run_train(
        tmp_path, f"checkpoint.dir={url}", "checkpoint.interval=auto", "debug.nan_at_steps=[12]", "train.max_steps=30"
    )
    check_ok(proc)
    assert proc.stderr.count("rollback: step 12 was unhealthy") == 1 and "; restored step " in proc.stderr, proc.stderr[-3000:]
    assert [d.step for d in layout.complete_steps(open_storage(url))][-1] == 30
    verdict = _ckpt("verify", url, "--values")
    assert verdict.returncode == 0 and "every value finite" in verdict.stdout, verdict.stdout + verdict.stderr


def test_start_up_cleaning_touches_only_what_ftrain_writes(s3_env, s3_bucket):
    """At a start, open uploads of step files and leftovers of step directories go; another program's open upload
    and a directory that merely ends in .deleting under the same prefix stay."""
    storage = open_storage(f"s3://{s3_bucket}/run")
    client = s3_env.client()
    ours = client.create_multipart_upload(Bucket=s3_bucket, Key="run/step_00000003/__0_0.distcp")["UploadId"]
    theirs = client.create_multipart_upload(Bucket=s3_bucket, Key="run/user/data.bin")["UploadId"]
    storage.write_atomic("notes.deleting/keep.txt", b"user's")
    storage.write_atomic("step_00000002.deleting/__0_0.distcp", b"half removed")
    layout.remove_incomplete(storage)
    open_ids = {u["UploadId"] for u in client.list_multipart_uploads(Bucket=s3_bucket).get("Uploads", [])}
    assert ours not in open_ids and theirs in open_ids
    assert storage.read_bytes("notes.deleting/keep.txt") == b"user's"
    assert "step_00000002.deleting" not in storage.dirs()
    client.abort_multipart_upload(Bucket=s3_bucket, Key="run/user/data.bin", UploadId=theirs)
