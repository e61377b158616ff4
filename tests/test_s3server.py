"""The S3 server the tests start (tests/s3server.py, SeaweedFS `weed mini`) behaves like S3 where ftrain relies on it."""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor

import pytest
from botocore.exceptions import ClientError

from s3server import s3_bucket, s3_server  # noqa: F401  (fixtures)

MiB = 1 << 20


def _code(err: ClientError) -> tuple[str, int]:
    return err.response["Error"]["Code"], err.response["ResponseMetadata"]["HTTPStatusCode"]


def test_put_get_round_trip(s3_server, s3_bucket):
    s3 = s3_server.client()
    body = os.urandom(3 * MiB + 17)
    put = s3.put_object(Bucket=s3_bucket, Key="dir/obj.bin", Body=body)
    got = s3.get_object(Bucket=s3_bucket, Key="dir/obj.bin")
    assert got["Body"].read() == body
    assert got["ETag"] == put["ETag"] == f'"{hashlib.md5(body).hexdigest()}"'
    assert s3.head_object(Bucket=s3_bucket, Key="dir/obj.bin")["ContentLength"] == len(body)
    ranged = s3.get_object(Bucket=s3_bucket, Key="dir/obj.bin", Range="bytes=100-199")["Body"].read()
    assert ranged == body[100:200]
    with pytest.raises(ClientError) as e:
        s3.get_object(Bucket=s3_bucket, Key="dir/missing")
    assert _code(e.value) == ("NoSuchKey", 404)


def test_list_objects_v2_honours_max_keys_and_continuation(s3_server, s3_bucket):
    s3 = s3_server.client()
    keys = [f"many/{i:03d}" for i in range(30)]
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda k: s3.put_object(Bucket=s3_bucket, Key=k, Body=k.encode()), keys))
    s3.put_object(Bucket=s3_bucket, Key="other/x", Body=b"")

    first = s3.list_objects_v2(Bucket=s3_bucket, Prefix="many/", MaxKeys=10)
    assert first["KeyCount"] == 10 and first["IsTruncated"] and first["NextContinuationToken"]
    pages = list(s3.get_paginator("list_objects_v2").paginate(
        Bucket=s3_bucket, Prefix="many/", PaginationConfig={"PageSize": 10}))
    assert [len(p["Contents"]) for p in pages] == [10, 10, 10]
    assert [o["Key"] for p in pages for o in p["Contents"]] == keys  # lexicographic, no repeats, none missed
    # Delimiter: "directories" come back as common prefixes.
    top = s3.list_objects_v2(Bucket=s3_bucket, Delimiter="/")
    assert sorted(p["Prefix"] for p in top["CommonPrefixes"]) == ["many/", "other/"]


def test_conditional_create_if_none_match_is_honoured(s3_server, s3_bucket):
    """SeaweedFS 4.48 honours If-None-Match: * (412 PreconditionFailed on an existing key) and If-Match, also on
    CompleteMultipartUpload: a commit marker can be written with create-only semantics."""
    s3 = s3_server.client()
    s3.put_object(Bucket=s3_bucket, Key="marker", Body=b"first", IfNoneMatch="*")
    with pytest.raises(ClientError) as e:
        s3.put_object(Bucket=s3_bucket, Key="marker", Body=b"second", IfNoneMatch="*")
    assert _code(e.value) == ("PreconditionFailed", 412)
    assert s3.get_object(Bucket=s3_bucket, Key="marker")["Body"].read() == b"first"

    etag = s3.head_object(Bucket=s3_bucket, Key="marker")["ETag"]
    with pytest.raises(ClientError) as e:
        s3.put_object(Bucket=s3_bucket, Key="marker", Body=b"x", IfMatch='"0123456789abcdef0123456789abcdef"')
    assert _code(e.value) == ("PreconditionFailed", 412)
    s3.put_object(Bucket=s3_bucket, Key="marker", Body=b"third", IfMatch=etag)

    mp = s3.create_multipart_upload(Bucket=s3_bucket, Key="marker")
    part = s3.upload_part(Bucket=s3_bucket, Key="marker", UploadId=mp["UploadId"], PartNumber=1, Body=b"mp")
    with pytest.raises(ClientError) as e:
        s3.complete_multipart_upload(
            Bucket=s3_bucket, Key="marker", UploadId=mp["UploadId"], IfNoneMatch="*",
            MultipartUpload={"Parts": [{"PartNumber": 1, "ETag": part["ETag"]}]})
    assert _code(e.value) == ("PreconditionFailed", 412)
    s3.abort_multipart_upload(Bucket=s3_bucket, Key="marker", UploadId=mp["UploadId"])
    assert s3.get_object(Bucket=s3_bucket, Key="marker")["Body"].read() == b"third"


def test_conditional_create_races_have_one_winner(s3_server, s3_bucket):
    s3 = s3_server.client()

    def attempt(i: int) -> int:
        try:
            s3.put_object(Bucket=s3_bucket, Key="race", Body=str(i).encode(), IfNoneMatch="*")
            return i
        except ClientError as e:
            assert _code(e) == ("PreconditionFailed", 412)
            return -1

    with ThreadPoolExecutor(8) as pool:
        winners = [i for i in pool.map(attempt, range(8)) if i >= 0]
    assert len(winners) == 1
    assert s3.get_object(Bucket=s3_bucket, Key="race")["Body"].read() == str(winners[0]).encode()


def test_multipart_upload_complete_and_abort(s3_server, s3_bucket):
    s3 = s3_server.client()
    parts_data = [os.urandom(5 * MiB), os.urandom(5 * MiB), os.urandom(123)]  # S3's minimum part size but the last
    mp = s3.create_multipart_upload(Bucket=s3_bucket, Key="big")
    parts = []
    for n, data in enumerate(parts_data, start=1):
        r = s3.upload_part(Bucket=s3_bucket, Key="big", UploadId=mp["UploadId"], PartNumber=n, Body=data)
        parts.append({"PartNumber": n, "ETag": r["ETag"]})
    listed = s3.list_parts(Bucket=s3_bucket, Key="big", UploadId=mp["UploadId"])
    assert [p["PartNumber"] for p in listed["Parts"]] == [1, 2, 3]
    done = s3.complete_multipart_upload(
        Bucket=s3_bucket, Key="big", UploadId=mp["UploadId"], MultipartUpload={"Parts": parts})
    # The ETag clients like s3torchconnector insist on: S3's form, md5 of the part md5s, "-<parts>".
    md5s = b"".join(hashlib.md5(d).digest() for d in parts_data)
    assert done["ETag"] == f'"{hashlib.md5(md5s).hexdigest()}-3"'
    assert s3.get_object(Bucket=s3_bucket, Key="big")["Body"].read() == b"".join(parts_data)

    ab = s3.create_multipart_upload(Bucket=s3_bucket, Key="aborted")
    s3.upload_part(Bucket=s3_bucket, Key="aborted", UploadId=ab["UploadId"], PartNumber=1, Body=b"x" * 1000)
    assert [u["UploadId"] for u in s3.list_multipart_uploads(Bucket=s3_bucket).get("Uploads", [])] == [ab["UploadId"]]
    s3.abort_multipart_upload(Bucket=s3_bucket, Key="aborted", UploadId=ab["UploadId"])
    assert s3.list_multipart_uploads(Bucket=s3_bucket).get("Uploads", []) == []
    with pytest.raises(ClientError) as e:
        s3.upload_part(Bucket=s3_bucket, Key="aborted", UploadId=ab["UploadId"], PartNumber=2, Body=b"y")
    assert _code(e.value) == ("NoSuchUpload", 404)
    with pytest.raises(ClientError) as e:
        s3.head_object(Bucket=s3_bucket, Key="aborted")
    assert _code(e.value)[1] == 404


def test_copy_and_batch_delete(s3_server, s3_bucket):
    s3 = s3_server.client()
    s3.put_object(Bucket=s3_bucket, Key="a", Body=b"payload")
    s3.copy_object(Bucket=s3_bucket, Key="b", CopySource={"Bucket": s3_bucket, "Key": "a"})
    assert s3.get_object(Bucket=s3_bucket, Key="b")["Body"].read() == b"payload"
    r = s3.delete_objects(Bucket=s3_bucket, Delete={"Objects": [{"Key": "a"}, {"Key": "b"}, {"Key": "never"}]})
    assert sorted(d["Key"] for d in r["Deleted"]) == ["a", "b", "never"] and not r.get("Errors")
    assert s3.list_objects_v2(Bucket=s3_bucket)["KeyCount"] == 0


def test_stop_and_start_keep_objects(s3_server, s3_bucket):
    s3 = s3_server.client()
    ports = dict(s3_server.ports)
    s3.put_object(Bucket=s3_bucket, Key="before-stop", Body=b"1")
    s3_server.stop()  # SIGTERM: graceful
    with pytest.raises(Exception):
        s3_server.client(connect_timeout=1, retries={"max_attempts": 1}).list_buckets()
    s3_server.start()
    assert s3_server.ports == ports
    assert s3.get_object(Bucket=s3_bucket, Key="before-stop")["Body"].read() == b"1"
    s3.put_object(Bucket=s3_bucket, Key="before-kill", Body=b"2")
    s3_server.stop(kill=True)  # SIGKILL: no shutdown at all
    s3_server.start()
    assert s3.get_object(Bucket=s3_bucket, Key="before-stop")["Body"].read() == b"1"
    assert s3.get_object(Bucket=s3_bucket, Key="before-kill")["Body"].read() == b"2"


def test_env_points_a_plain_boto3_client_at_the_server(s3_server, s3_bucket, monkeypatch):
    import boto3

    for k in [k for k in os.environ if k.startswith("AWS_")]:
        monkeypatch.delenv(k)
    for k, v in s3_server.env().items():
        monkeypatch.setenv(k, v)
    s3 = boto3.client("s3")
    urls = []
    s3.meta.events.register("before-send", lambda request, **kw: urls.append(request.url))
    s3.put_object(Bucket=s3_bucket, Key="k", Body=b"v")
    assert urls == [f"{s3_server.endpoint_url}/{s3_bucket}/k"]  # path style
    assert boto3.client("s3").get_object(Bucket=s3_bucket, Key="k")["Body"].read() == b"v"
