"""Durable checkpoints in an S3-compatible object store (``checkpoint.dir=s3://bucket/prefix``), through boto3.

Under the prefix the layout is the one on disk: ``step_{N:08d}/`` holding the DCP files and the ``COMPLETE``
marker object. Endpoint, credentials and region come from where every AWS tool finds them (``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, ``AWS_REGION``, profiles, config files); nothing of them is written
anywhere. A custom endpoint is addressed path-style (``http://host/bucket/key``), which every S3-compatible
server accepts.

How the guarantees of ``base.Storage`` hold without rename:

* An object appears whole or not at all. A data file is uploaded in parts (``PART_BYTES``) as DCP writes it and
  exists only once its multipart upload completes, when the stream is closed; a failed write aborts the upload.
  DCP writes ``.metadata`` (one upload: ``S3FileSystem`` holds its temporary file until the rename) only after
  every rank's files are complete, and rank 0 writes the ``COMPLETE`` object after that, alone and last: it
  decides completeness.
* ``write_atomic`` is one PUT (the marker is small).
* ``remove_dir`` deletes the marker object first, then the rest: no instant leaves a marker naming a deleted
  object. A removal killed half way leaves a directory without a marker: incomplete, removed at the next start.
* ``move_dir`` copies every object, the marker last, then removes the source (marker first).
* Transient errors (5xx, throttling, a reset connection) are retried by botocore with backoff (``RETRIES``).
* One run per prefix: ``claim`` creates an ``OWNER`` object with a conditional create (``If-None-Match: *``);
  a store that ignores the condition leaves a window in which two runs starting at the same instant on an
  empty prefix both believe they own it.

boto3 rather than ``s3fs`` or ``s3torchconnector``: it sends each part as DCP writes it, so the checksum is still
taken as the bytes go out and verified as they come back, and it measured the fastest of the three on the same
server (docs/bench.md).
"""

from __future__ import annotations

import os
import re
import threading
from contextlib import AbstractContextManager
from typing import IO, Any, Generator

from ftrain.checkpoint.storage.base import MARKER_NAME, FileInfo, Storage, StorageError
from ftrain.checkpoint.storage.s3_io import READ_AHEAD_BYTES, RangedReader, S3FileSystem, describe_s3_error
from ftrain.checkpoint.sums import Summer

SCHEME = "s3://"
RETRIES = 8  # attempts per request unless AWS_MAX_ATTEMPTS says otherwise (botocore's standard mode: backoff, jitter)
CONNECT_TIMEOUT_S, READ_TIMEOUT_S = 10, 120
_DELETE_BATCH = 1000  # S3's limit per DeleteObjects call
OWNER_NAME = "OWNER"  # at the prefix: which run writes here
_STEP_FILE = re.compile(r"step_\d{8}/[^/]+$")  # a file of a step directory: what ftrain's saves upload


def parse_url(url: str) -> tuple[str, str]:
    """``s3://bucket/some/prefix`` -> ("bucket", "some/prefix"); a one-line ``ValueError`` if it is not one."""
    if not url.startswith(SCHEME):
        raise ValueError(f"{url}: not an s3:// URL")
    bucket, _, prefix = url[len(SCHEME):].partition("/")
    if not bucket:
        raise ValueError(f"{url}: no bucket (expected s3://bucket/prefix)")
    return bucket, prefix.strip("/")


def make_client() -> Any:
    """A boto3 S3 client configured from the environment, with retries and path-style addressing for custom
    endpoints. ``ImportError`` with the install hint if boto3 is missing."""
    try:
        import boto3
        from botocore.config import Config
    except ImportError:
        raise ImportError("an s3:// checkpoint.dir needs boto3: pip install 'ftrain[s3]'") from None
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    # AWS_MAX_ATTEMPTS / AWS_RETRY_MODE, where set, say otherwise (as for every AWS tool)
    attempts = int(os.environ.get("AWS_MAX_ATTEMPTS") or RETRIES)
    config = Config(
        retries={"max_attempts": attempts, "mode": os.environ.get("AWS_RETRY_MODE") or "standard"},
        connect_timeout=CONNECT_TIMEOUT_S,
        read_timeout=READ_TIMEOUT_S,
        max_pool_connections=32,
        s3=s3_options(endpoint),
        # ftrain sums every byte itself (xxh3-64 as written, verified as read): botocore's own CRC32 of every
        # part, sent and checked again, would cost the training machine's CPU a second pass for nothing.
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )
    return boto3.session.Session().client("s3", endpoint_url=endpoint or None, config=config)


def s3_options(endpoint: str | None) -> dict[str, Any]:
    """botocore's ``s3`` options for ``endpoint`` (None: AWS itself). A custom endpoint is addressed path-style.
    Over https the payload is not signed: botocore would otherwise hash every byte with SHA-256 (one more pass
    over the data, the slowest, about a core-second per 1.4 GB here), while TLS already carries the bytes intact
    and ftrain checks its own checksums as it reads them back. Over plain http the signature is the bytes' only
    protection in transit, so there it stays."""
    options: dict[str, Any] = {"addressing_style": "path"} if endpoint else {}
    if not endpoint or endpoint.lower().startswith("https://"):
        options["payload_signing_enabled"] = False
    return options


def _missing(exc: Exception) -> bool:
    response = getattr(exc, "response", None) or {}
    code = str(response.get("Error", {}).get("Code", ""))
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return code in ("404", "NoSuchKey", "NotFound") or status == 404


class S3Storage(Storage):
    is_local = False
    dcp_sync_files = False  # an object is durable when its upload completes

    def __init__(self, url: str) -> None:
        self.bucket, self.prefix = parse_url(url)
        self.url = f"{SCHEME}{self.bucket}" + (f"/{self.prefix}" if self.prefix else "")
        self._client: Any = None
        self._lock = threading.Lock()

    # The client holds sockets and locks: a storage sent to DCP's writer process makes its own there.
    def __getstate__(self) -> dict[str, Any]:
        return {"bucket": self.bucket, "prefix": self.prefix, "url": self.url}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._client, self._lock = None, threading.Lock()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, S3Storage) and other.url == self.url

    def __hash__(self) -> int:
        return hash(self.url)

    def __repr__(self) -> str:
        return f"S3Storage({self.url!r})"

    @property
    def client(self) -> Any:
        with self._lock:
            if self._client is None:
                self._client = make_client()
            return self._client

    def key(self, name: str = "") -> str:
        return "/".join(part for part in (self.prefix, name) if part)

    def describe(self, name: str = "") -> str:
        return f"{self.url}/{name}" if name else self.url

    # ---------------------------------------------------------------------------------------- listing
    def _list(self, prefix: str, delimiter: bool) -> Generator[dict[str, Any], None, None]:
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=prefix, **({"Delimiter": "/"} if delimiter else {})
        )
        yield from pages

    def _dir_prefix(self, name: str) -> str:
        key = self.key(name)
        return f"{key}/" if key else ""

    def dirs(self) -> list[str]:
        return sorted(self.dirs_holding(MARKER_NAME))

    def dirs_holding(self, file_name: str) -> dict[str, bool]:
        # From one listing of the keys (a page per 1000 objects), not a request per directory; and not from the
        # listing's common prefixes: some stores (SeaweedFS) keep reporting a prefix whose objects are all deleted.
        base = self._dir_prefix("")
        found: dict[str, bool] = {}
        for page in self._list(base, delimiter=False):
            for item in page.get("Contents", []):
                head, slash, rest = item["Key"][len(base):].partition("/")
                if slash and head:
                    found[head] = found.get(head, False) or rest == file_name
        return found

    def files(self, dir_name: str) -> list[FileInfo]:
        base = self._dir_prefix(dir_name)
        found = []
        for page in self._list(base, delimiter=True):
            found += [
                FileInfo(item["Key"][len(base):], int(item["Size"]))
                for item in page.get("Contents", [])
                if item["Key"] != base
            ]
        return sorted(found, key=lambda info: info.name)

    def all_keys(self, dir_name: str) -> list[str]:
        """Every key under ``dir_name`` (at any depth)."""
        keys = []
        for page in self._list(self._dir_prefix(dir_name), delimiter=False):
            keys += [item["Key"] for item in page.get("Contents", [])]
        return keys

    def _head(self, name: str) -> dict[str, Any] | None:
        try:
            return self.client.head_object(Bucket=self.bucket, Key=self.key(name))
        except Exception as exc:
            if _missing(exc):
                return None
            raise StorageError(f"{self.describe(name)}: {describe_s3_error(exc)}") from None

    def exists(self, name: str) -> bool:
        return self._head(name) is not None

    def is_dir(self, name: str = "") -> bool:
        response = self.client.list_objects_v2(Bucket=self.bucket, Prefix=self._dir_prefix(name), MaxKeys=1)
        return bool(response.get("KeyCount", len(response.get("Contents", []))))

    def file_size(self, name: str) -> int:
        head = self._head(name)
        if head is None:
            raise FileNotFoundError(f"missing file {name.rsplit('/', 1)[-1]}")
        return int(head["ContentLength"])

    # ---------------------------------------------------------------------------------------- reading
    def read_bytes(self, name: str, limit: int | None = None) -> bytes:
        extra = {"Range": f"bytes=0-{limit - 1}"} if limit else {}
        try:
            response = self.client.get_object(Bucket=self.bucket, Key=self.key(name), **extra)
        except Exception as exc:
            if _missing(exc):
                raise FileNotFoundError(f"{self.describe(name)}: no such object") from None
            if "InvalidRange" in describe_s3_error(exc):  # an empty object asked for a range
                return b""
            raise StorageError(f"{self.describe(name)}: {describe_s3_error(exc)}") from None
        return response["Body"].read()

    def open_read(self, name: str) -> AbstractContextManager[IO[bytes]]:
        return RangedReader(self, name)  # type: ignore[return-value]

    def checksum(self, name: str, algorithm: str) -> str:
        """One GET of the whole object, summed as it streams in."""
        summer = Summer(algorithm)
        try:
            body = self.client.get_object(Bucket=self.bucket, Key=self.key(name))["Body"]
            while chunk := body.read(READ_AHEAD_BYTES):
                summer.update(chunk)
        except Exception as exc:
            if _missing(exc):
                raise FileNotFoundError(f"missing file {name.rsplit('/', 1)[-1]}") from None
            raise StorageError(f"{self.describe(name)}: {describe_s3_error(exc)}") from None
        return summer.hexdigest()

    # ---------------------------------------------------------------------------------------- writing
    def write_atomic(self, name: str, data: bytes, tmp_name: str | None = None) -> None:
        try:
            self.client.put_object(Bucket=self.bucket, Key=self.key(name), Body=data)
        except Exception as exc:
            raise StorageError(f"writing {self.describe(name)}: {describe_s3_error(exc)}") from None

    def sync_dir(self, dir_name: str) -> None:
        """Nothing to do: an object is durable once its upload completed."""

    def _delete(self, keys: list[str]) -> None:
        for start in range(0, len(keys), _DELETE_BATCH):
            batch = [{"Key": key} for key in keys[start : start + _DELETE_BATCH]]
            response = self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})
            errors = response.get("Errors") or []
            if errors:
                first = errors[0]
                raise StorageError(f"deleting {first.get('Key')}: {first.get('Code')}: {first.get('Message')}")

    def remove_dir(self, dir_name: str) -> None:
        marker = self.key(f"{dir_name}/{MARKER_NAME}")
        self.client.delete_object(Bucket=self.bucket, Key=marker)  # first: the rest is then never "complete"
        self._delete(self.all_keys(dir_name))

    def move_dir(self, dir_name: str, new_name: str) -> None:
        source = self._dir_prefix(dir_name)
        keys = self.all_keys(dir_name)
        marker = self.key(f"{dir_name}/{MARKER_NAME}")
        for key in sorted(keys, key=lambda k: k == marker):  # the marker last
            target = self._dir_prefix(new_name) + key[len(source):]
            self.client.copy({"Bucket": self.bucket, "Key": key}, self.bucket, target)
        self.remove_dir(dir_name)

    def abort_unfinished_writes(self) -> int:
        """Abort the multipart uploads left open in step directories by killed saves (their parts cost storage and
        never become objects). Only at a start, before any save: one run writes under a prefix. Uploads of any
        other key (another program's, in the same bucket or prefix) are not ftrain's and are left alone."""
        aborted = 0
        base = self._dir_prefix("")
        pages = self.client.get_paginator("list_multipart_uploads").paginate(Bucket=self.bucket, Prefix=base)
        for page in pages:
            for upload in page.get("Uploads", []):
                if not _STEP_FILE.match(upload["Key"][len(base):]):
                    continue
                self.client.abort_multipart_upload(Bucket=self.bucket, Key=upload["Key"], UploadId=upload["UploadId"])
                aborted += 1
        return aborted

    # -------------------------------------------------------------------------------------------- DCP
    def dcp_path(self, dir_name: str) -> str:
        return self.describe(dir_name)

    def dcp_filesystem(self) -> Any:
        return S3FileSystem(self)

    # ---------------------------------------------------------------------------------------- checks
    def check_access(self) -> None:
        """Before training: the bucket exists and this identity can list, write and delete under the prefix.
        ``StorageError`` with one line naming the problem; leaves nothing behind."""
        probe = self.key(f".ftrain-probe-{os.getpid()}-{threading.get_ident()}")
        try:
            self.client.list_objects_v2(Bucket=self.bucket, Prefix=self._dir_prefix(""), MaxKeys=1)
            self.client.put_object(Bucket=self.bucket, Key=probe, Body=b"")
            self.client.delete_object(Bucket=self.bucket, Key=probe)
        except ImportError:
            raise
        except Exception as exc:
            raise StorageError(f"checkpoint.dir {self.url}: {describe_s3_error(exc)}") from None

    def owner(self) -> tuple[str, str] | None:
        """(run id, description) of the run that writes under the prefix; None if none has yet."""
        try:
            lines = self.read_bytes(OWNER_NAME).decode(errors="replace").splitlines()
        except FileNotFoundError:
            return None
        return (lines[0].strip() if lines else "", lines[1].strip() if len(lines) > 1 else "another run")

    def claim(self, run_id: str, description: str, also_ours: list[str] | tuple[str, ...] = ()) -> str:
        """Make this run the one that writes under the prefix (``OWNER`` object, conditional create). Returns
        '' when it is (it was already under ``run_id`` or one of ``also_ours``, or it now is), else who owns it."""
        body = f"{run_id}\n{description}\n".encode()
        try:
            self.client.put_object(Bucket=self.bucket, Key=self.key(OWNER_NAME), Body=body, IfNoneMatch="*")
            return ""
        except Exception as exc:
            status = (getattr(exc, "response", None) or {}).get("ResponseMetadata", {}).get("HTTPStatusCode")
            if status not in (409, 412):
                raise StorageError(f"checkpoint.dir {self.url}: {describe_s3_error(exc)}") from None
        owner = self.owner()
        if owner is None:  # deleted meanwhile (a cleared prefix)
            return self.claim(run_id, description, also_ours)
        return "" if owner[0] == run_id or owner[0] in also_ours else owner[1]
