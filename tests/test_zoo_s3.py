"""The hub with an S3 blob store (``--store s3://...``), against moto's standalone S3-API server on
loopback (a real HTTP S3 endpoint, as SQLite is a real database): publish, pull, Range download,
delete, and clear errors for a missing bucket or an unreachable endpoint."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time

import boto3  # noqa: E402  (hub extra)
import httpx
import moto.server  # noqa: E402,F401  (dev extra: the S3-compatible server on loopback)
import pytest

from obert_modifiers.testing.hub_fixtures import make_deployment
from obert_modifiers.zoo.client import HubClientError, delete, pull, push
from obert_modifiers.zoo.local import free_port, start_hub

pytestmark = pytest.mark.integration

STUB = "zoo:nlp/text_classification/bert-tiny/pytorch/huggingface/rotten_tomatoes/pruned50-none"
API = "/api/v1"
BUCKET = "obert-hub-test"
AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@pytest.fixture(scope="module")
def s3_endpoint(tmp_path_factory):
    port = free_port()
    log = open(tmp_path_factory.mktemp("moto") / "moto.log", "w")  # noqa: SIM115
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, **AWS_ENV},
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert process.poll() is None, f"moto server exited with {process.returncode}"
        try:
            httpx.get(url, timeout=1)
            break
        except httpx.HTTPError:
            time.sleep(0.2)
    else:
        pytest.fail("moto server did not start within 30 s")
    try:
        yield url
    finally:
        process.terminate()
        process.wait(10)
        log.close()


@pytest.fixture(scope="module")
def s3(s3_endpoint):
    client = boto3.client("s3", endpoint_url=s3_endpoint, **_boto_credentials())
    client.create_bucket(Bucket=BUCKET)
    return client


def _boto_credentials() -> dict:
    return {
        "aws_access_key_id": AWS_ENV["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": AWS_ENV["AWS_SECRET_ACCESS_KEY"],
        "region_name": AWS_ENV["AWS_DEFAULT_REGION"],
    }


def _keys(s3, prefix: str) -> list[str]:
    return [item["Key"] for item in s3.list_objects_v2(Bucket=BUCKET, Prefix=prefix).get("Contents", [])]


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_publish_pull_range_delete_on_s3(tmp_path, s3, s3_endpoint, monkeypatch):
    for key, value in AWS_ENV.items():
        monkeypatch.setenv(key, value)  # inherited by the hub subprocess
    store_url = f"s3://{BUCKET}/hub?endpoint_url={s3_endpoint}"
    deployment = make_deployment(tmp_path / "deployment", pad_bytes=3 * 1024 * 1024)
    hub = start_hub(tmp_path / "hub", extra_args=["--store", store_url, "--gc-grace-seconds", "0"])
    try:
        record = push(deployment, STUB, hub.url, hub.token, progress=False)
        shas = {f["sha256"] for f in record["files"]}
        # every blob is in the bucket under its sha256; no staging key is left behind
        blob_keys = _keys(s3, "hub/blobs/")
        assert {k.rsplit("/", 1)[-1] for k in blob_keys} == shas
        assert all(k == f"hub/blobs/{k.rsplit('/', 1)[-1][:2]}/{k.rsplit('/', 1)[-1]}" for k in blob_keys)
        assert _keys(s3, "hub/staging/") == []
        assert not (hub.store / "blobs").exists()  # nothing went to the local directory store

        pulled = pull(
            record["stub"], hub.url, out=tmp_path / "pulled", cache=tmp_path / "cache", progress=False
        )
        layout = pulled.parent
        for entry in record["files"]:
            assert _sha((layout / entry["path"]).read_bytes()) == entry["sha256"], entry["path"]

        onnx = next(f for f in record["files"] if f["path"] == "deployment/model.onnx")
        assert onnx["size"] > 3 * 1024 * 1024
        full = (deployment / "model.onnx").read_bytes()
        url = onnx["url"]
        head = httpx.head(url)
        assert head.status_code == 200 and head.headers["content-length"] == str(len(full))
        assert (
            head.headers["accept-ranges"] == "bytes" and head.headers["x-checksum-sha256"] == onnx["sha256"]
        )
        part = httpx.get(url, headers={"Range": "bytes=1000-2999999"})
        assert part.status_code == 206 and part.content == full[1000:3000000]
        assert part.headers["content-range"] == f"bytes 1000-2999999/{len(full)}"
        tail = httpx.get(url, headers={"Range": "bytes=-100"})
        assert tail.status_code == 206 and tail.content == full[-100:]
        clamped = httpx.get(url, headers={"Range": f"bytes=0-{len(full)}"})  # sparsezoo's one-past-end
        assert clamped.status_code == 206 and clamped.content == full
        assert httpx.get(url, headers={"Range": f"bytes={len(full)}-"}).status_code == 416
        card = httpx.get(f"{hub.url}{API}/models/{record['id']}/card")
        assert card.status_code == 200 and card.text == (layout / "model.md").read_text()

        # a re-publish of the same content uploads nothing new and keeps the blobs
        again = push(deployment, STUB, hub.url, hub.token, progress=False)
        assert again["id"] != record["id"] and {f["sha256"] for f in again["files"]} == shas
        assert {k.rsplit("/", 1)[-1] for k in _keys(s3, "hub/blobs/")} == shas

        delete(STUB, hub.url, hub.token)
        assert _keys(s3, "hub/blobs/") == []  # unreferenced blobs are removed from the bucket
        assert httpx.get(url).status_code == 404
    finally:
        hub.stop()


def test_bad_bucket_and_unreachable_endpoint_are_named(tmp_path, s3_endpoint, monkeypatch):
    for key, value in AWS_ENV.items():
        monkeypatch.setenv(key, value)
    missing = f"s3://no-such-bucket/hub?endpoint_url={s3_endpoint}"
    with pytest.raises(HubClientError) as error:
        start_hub(tmp_path / "a", extra_args=["--store", missing], timeout=30)
    assert missing in str(error.value) and "no such bucket" in str(error.value)

    dead = f"s3://{BUCKET}/hub?endpoint_url=http://127.0.0.1:{free_port()}"
    cli = [sys.executable, "-m", "obert_modifiers.cli", "zoo", "serve"]
    refused = subprocess.run(
        [*cli, "--db", f"sqlite:///{tmp_path / 'hub.db'}", "--store", dead],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert refused.returncode == 1, refused.stderr[-2000:]
    assert dead in refused.stderr and "cannot be reached" in refused.stderr
    assert "Traceback" not in refused.stderr

    unknown = f"s3://{BUCKET}/hub?endpoint={s3_endpoint}"
    with pytest.raises(HubClientError, match="unknown option"):
        start_hub(tmp_path / "b", extra_args=["--store", unknown], timeout=30)


def test_store_interface_on_s3(tmp_path, s3, s3_endpoint, monkeypatch):
    """The store itself: put via a staging key, has/size/read/range, touch on re-put, delete, and
    clean-up of a staging key left by a killed publish."""
    from obert_modifiers.zoo.store import S3Store, open_store

    for key, value in AWS_ENV.items():
        monkeypatch.setenv(key, value)
    store = open_store(f"s3://{BUCKET}/unit?endpoint_url={s3_endpoint}")
    assert isinstance(store, S3Store)
    data = os.urandom(100_000)
    sha = _sha(data)
    with store.staging_area() as folder:
        (folder / sha).write_bytes(data)
        assert not store.has(sha)
        store.put(sha, folder / sha)
        assert not (folder / sha).exists()
    assert store.has(sha) and store.size(sha) == len(data) and store.read_bytes(sha) == data
    assert b"".join(store.iter_range(sha, 10, 5000, chunk_size=1000)) == data[10:5000]
    assert [s for s, _ in store.iter_blobs()] == [sha]
    first = dict(store.iter_blobs())[sha]
    time.sleep(1.1)
    staged = tmp_path / sha
    staged.write_bytes(data)
    store.put(sha, staged)  # already there: touched, not re-uploaded
    assert dict(store.iter_blobs())[sha] > first and not staged.exists()
    with pytest.raises(Exception, match="sha256"):
        store.has("../etc/passwd")

    s3.put_object(Bucket=BUCKET, Key="unit/staging/dead/" + sha, Body=b"partial")
    store.staging_grace = 3600
    assert store.clean_staging() == []  # young: could be a live upload elsewhere
    store.staging_grace = 0
    assert store.clean_staging() == ["unit/staging/dead/" + sha]
    assert _keys(s3, "unit/staging/") == []
    store.delete(sha)
    assert not store.has(sha) and list(store.iter_blobs()) == []
