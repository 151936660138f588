"""Blob stores. Files are stored content-addressed (by sha256), so a file name from a client never
becomes a path on the server, identical files are stored once, and a blob, once in place, never
changes (a publish moves verified, complete files in; a reader never sees a half-written blob).

``open_store(url)``: a directory (``/path``, ``file:///path``) is the default;
``s3://BUCKET[/PREFIX][?endpoint_url=http://host:port&region=R]`` selects an S3-compatible object
store (boto3; credentials from the standard AWS environment variables / config files).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

from obert_modifiers.errors import ObertError

SHA256_RE = re.compile(r"[0-9a-f]{64}")  # applied with fullmatch
LOCK_NAME = ".lock"


class StoreError(ObertError, RuntimeError):
    """A store URL that cannot be used, or a blob that is not there."""


class LocalStore:
    """Blobs under ``root/blobs/ab/<sha256>``; uploads staged under ``root/staging/<id>/``, each
    staging folder holding an flock'ed ``.lock`` for as long as its upload runs, so any process can
    tell a live upload from the leftovers of a killed one."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root).expanduser().resolve()
        self.blobs = self.root / "blobs"
        self.staging = self.root / "staging"
        self.blobs.mkdir(parents=True, exist_ok=True)
        self.staging.mkdir(parents=True, exist_ok=True)

    def __repr__(self) -> str:
        return f"LocalStore({str(self.root)!r})"

    def blob_path(self, sha256: str) -> Path:
        if not SHA256_RE.fullmatch(sha256):
            raise StoreError(f"not a sha256 digest: {sha256!r}")
        return self.blobs / sha256[:2] / sha256

    def has(self, sha256: str) -> bool:
        return self.blob_path(sha256).is_file()

    def read_bytes(self, sha256: str) -> bytes:
        return self.blob_path(sha256).read_bytes()

    def put(self, sha256: str, staged_file: Path) -> None:
        """Move a verified staged file in (atomic rename); an existing blob is kept and touched."""
        target = self.blob_path(sha256)
        if target.is_file():
            os.utime(target)
            staged_file.unlink(missing_ok=True)
            return
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staged_file, target)

    def delete(self, sha256: str) -> None:
        self.blob_path(sha256).unlink(missing_ok=True)

    def iter_blobs(self) -> Iterator[tuple[str, float]]:
        """(sha256, mtime) of every blob."""
        for shard in self.blobs.iterdir():
            if not shard.is_dir():
                continue
            for blob in shard.iterdir():
                if SHA256_RE.fullmatch(blob.name):
                    try:
                        yield blob.name, blob.stat().st_mtime
                    except FileNotFoundError:
                        continue

    @contextmanager
    def staging_area(self) -> Iterator[Path]:
        """A fresh staging folder, locked while in use and removed afterwards."""
        folder = self.staging / uuid.uuid4().hex
        folder.mkdir(parents=True)
        lock = open(folder / LOCK_NAME, "w")  # noqa: SIM115 (held for the whole upload)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            yield folder
        finally:
            shutil.rmtree(folder, ignore_errors=True)
            lock.close()

    def clean_staging(self) -> list[str]:
        """Remove the staging folders of uploads whose process is gone (their lock is free)."""
        removed = []
        for folder in self.staging.iterdir():
            lock_path = folder / LOCK_NAME
            try:
                with open(lock_path, "a") as lock:
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    shutil.rmtree(folder, ignore_errors=True)
                    removed.append(folder.name)
            except BlockingIOError:
                continue  # a live upload in another process
            except (FileNotFoundError, NotADirectoryError):
                if folder.exists() and time.time() - folder.stat().st_mtime > 60:
                    shutil.rmtree(folder, ignore_errors=True) if folder.is_dir() else folder.unlink()
                    removed.append(folder.name)
        return removed


S3_STAGING_GRACE_SECONDS = 24 * 3600.0


class S3Store:
    """Blobs as objects ``PREFIX/blobs/ab/<sha256>`` in an S3-compatible bucket. A publish stages
    the verified files in a local folder (locked like ``LocalStore``'s), uploads each under
    ``PREFIX/staging/<id>/<sha256>``, then copies it to its blob key (an S3 object appears whole or
    not at all) and deletes the staging key; the model becomes visible with the database commit.
    Staging keys (and unfinished multipart uploads) older than ``staging_grace`` are the leftovers
    of killed publishes and are removed by ``clean_staging``."""

    def __init__(
        self,
        url: str,
        *,
        local_staging: str | os.PathLike | None = None,
        staging_grace: float = S3_STAGING_GRACE_SECONDS,
    ) -> None:
        try:
            import boto3
            from botocore.config import Config
        except ImportError:
            raise StoreError(
                f"store {url!r}: S3 stores need boto3 (pip install 'obert-modifiers[hub]')"
            ) from None
        self.url = url
        parsed = urlparse(url)
        self.bucket = parsed.netloc
        if not self.bucket:
            raise StoreError(f"store {url!r}: no bucket name; use s3://BUCKET/PREFIX")
        self.prefix = parsed.path.strip("/")
        options = {k: v[-1] for k, v in parse_qs(parsed.query).items()}
        unknown = set(options) - {"endpoint_url", "region"}
        if unknown:
            raise StoreError(
                f"store {url!r}: unknown option(s) {sorted(unknown)}; known: endpoint_url, region"
            )
        self.staging_grace = staging_grace
        self.client = boto3.session.Session().client(
            "s3",
            endpoint_url=options.get("endpoint_url"),
            region_name=options.get("region"),
            config=Config(
                connect_timeout=5, read_timeout=60, retries={"max_attempts": 2, "mode": "standard"}
            ),
        )
        self._check_bucket()
        root = Path(local_staging) if local_staging else Path(tempfile.gettempdir()) / "obert-hub-s3"
        digest = hashlib.sha256(url.encode()).hexdigest()[:16]
        self._local = LocalStore(root / digest)

    def __repr__(self) -> str:
        return f"S3Store({self.url!r})"

    def _key(self, *parts: str) -> str:
        return "/".join(p for p in (self.prefix, *parts) if p)

    def _fail(self, what: str, error: Exception) -> StoreError:
        return StoreError(f"store {self.url!r}: {what}: {error}")

    def _check_bucket(self) -> None:
        from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

        try:
            self.client.head_bucket(Bucket=self.bucket)
        except ClientError as error:
            code = error.response.get("Error", {}).get("Code", "")
            reason = {"404": "no such bucket", "NoSuchBucket": "no such bucket", "403": "access denied"}
            raise self._fail(
                f"bucket {self.bucket!r} cannot be used ({reason.get(code, code)})", error
            ) from None
        except NoCredentialsError as error:
            raise self._fail(
                "no S3 credentials (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE)", error
            ) from None
        except BotoCoreError as error:
            raise self._fail("the S3 endpoint cannot be reached or used", error) from None

    def blob_key(self, sha256: str) -> str:
        if not SHA256_RE.fullmatch(sha256):
            raise StoreError(f"not a sha256 digest: {sha256!r}")
        return self._key("blobs", sha256[:2], sha256)

    def _head(self, sha256: str) -> dict[str, Any] | None:
        from botocore.exceptions import ClientError

        try:
            return self.client.head_object(Bucket=self.bucket, Key=self.blob_key(sha256))
        except ClientError as error:
            if error.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return None
            raise self._fail(f"cannot read blob {sha256}", error) from None

    def has(self, sha256: str) -> bool:
        return self._head(sha256) is not None

    def size(self, sha256: str) -> int | None:
        """The blob's size in bytes, or None if it is not there."""
        head = self._head(sha256)
        return None if head is None else int(head["ContentLength"])

    def read_bytes(self, sha256: str) -> bytes:
        return self.client.get_object(Bucket=self.bucket, Key=self.blob_key(sha256))["Body"].read()

    def iter_range(self, sha256: str, start: int, end: int, chunk_size: int = 1024 * 1024) -> Iterator[bytes]:
        """Bytes ``start`` .. ``end - 1`` of a blob, streamed from S3 with a ``Range`` GET."""
        response = self.client.get_object(
            Bucket=self.bucket, Key=self.blob_key(sha256), Range=f"bytes={start}-{end - 1}"
        )
        body = response["Body"]
        try:
            yield from body.iter_chunks(chunk_size)
        finally:
            body.close()

    def put(self, sha256: str, staged_file: Path) -> None:
        """Upload a verified staged file under a staging key, copy it to its blob key, drop the
        staging key; an existing blob is kept and touched (so garbage collection's grace restarts)."""
        target = self.blob_key(sha256)
        source = {"Bucket": self.bucket, "Key": target}
        if self.has(sha256):
            self.client.copy_object(
                Bucket=self.bucket,
                Key=target,
                CopySource=source,
                Metadata={"touched": str(time.time())},
                MetadataDirective="REPLACE",
            )
            staged_file.unlink(missing_ok=True)
            return
        staging_key = self._key("staging", uuid.uuid4().hex, sha256)
        try:
            self.client.upload_file(str(staged_file), self.bucket, staging_key)
            self.client.copy({"Bucket": self.bucket, "Key": staging_key}, self.bucket, target)
        except Exception as error:  # botocore / S3Transfer errors
            raise self._fail(f"upload of blob {sha256} failed", error) from None
        finally:
            try:
                self.client.delete_object(Bucket=self.bucket, Key=staging_key)
            except Exception:  # left for clean_staging (after the grace)
                pass
        staged_file.unlink(missing_ok=True)

    def delete(self, sha256: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self.blob_key(sha256))

    def _list(self, prefix: str) -> Iterator[dict[str, Any]]:
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix):
            yield from page.get("Contents", [])

    def iter_blobs(self) -> Iterator[tuple[str, float]]:
        """(sha256, last-modified time) of every blob."""
        for item in self._list(self._key("blobs") + "/"):
            name = item["Key"].rsplit("/", 1)[-1]
            if SHA256_RE.fullmatch(name):
                yield name, item["LastModified"].timestamp()

    @contextmanager
    def staging_area(self) -> Iterator[Path]:
        """A fresh local staging folder for the incoming files (locked while in use)."""
        with self._local.staging_area() as folder:
            yield folder

    def clean_staging(self) -> list[str]:
        """Remove dead local staging folders, and staging keys / unfinished multipart uploads older
        than the grace (a live upload's staging key lives for seconds, not hours)."""
        removed = self._local.clean_staging()
        cutoff = time.time() - self.staging_grace
        staging = self._key("staging") + "/"
        for item in self._list(staging):
            if item["LastModified"].timestamp() < cutoff:
                self.client.delete_object(Bucket=self.bucket, Key=item["Key"])
                removed.append(item["Key"])
        uploads = self.client.list_multipart_uploads(Bucket=self.bucket, Prefix=staging)
        for upload in uploads.get("Uploads", []):
            if upload["Initiated"].timestamp() < cutoff:
                self.client.abort_multipart_upload(
                    Bucket=self.bucket, Key=upload["Key"], UploadId=upload["UploadId"]
                )
                removed.append(upload["Key"])
        return removed


BlobStore = LocalStore | S3Store


def open_store(url: str) -> BlobStore:
    """The blob store named by ``url``: a directory path, a ``file://`` URL, or ``s3://BUCKET/PREFIX``
    (options ``?endpoint_url=...&region=...``)."""
    parsed = urlparse(url)
    if parsed.scheme == "s3":
        return S3Store(url)
    if parsed.scheme in ("s3a", "gs", "http", "https"):
        raise StoreError(
            f"store {url!r}: scheme {parsed.scheme!r} is not supported; use s3://BUCKET/PREFIX "
            "(with ?endpoint_url=... for other S3-compatible servers) or a directory"
        )
    if parsed.scheme == "file":
        return LocalStore(parsed.path)
    if parsed.scheme and len(parsed.scheme) > 1:
        raise StoreError(f"store {url!r}: unknown scheme {parsed.scheme!r}; use a directory path")
    return LocalStore(url)
