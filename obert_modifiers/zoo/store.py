"""Blob stores. Files are stored content-addressed (by sha256), so a file name from a client never
becomes a path on the server, identical files are stored once, and a blob, once in place, never
changes (a publish moves verified, complete files in; a reader never sees a half-written blob).

``open_store(url)``: a directory (``/path``, ``file:///path``) is the default. S3-compatible URLs
(``s3://bucket/prefix``) are recognised and refused with a clear error: not supported yet.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse

SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
LOCK_NAME = ".lock"


class StoreError(RuntimeError):
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
        if not SHA256_RE.match(sha256):
            raise StoreError(f"not a sha256 digest: {sha256!r}")
        return self.blobs / sha256[:2] / sha256

    def has(self, sha256: str) -> bool:
        return self.blob_path(sha256).is_file()

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
                if SHA256_RE.match(blob.name):
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


def open_store(url: str) -> LocalStore:
    """The blob store named by ``url``: a directory path or ``file://`` URL."""
    parsed = urlparse(url)
    if parsed.scheme in ("s3", "s3a", "gs", "http", "https"):
        raise StoreError(
            f"store {url!r}: S3-compatible object stores are not supported yet by this hub release; "
            "use a directory (a path or file:///path), e.g. on a shared volume"
        )
    if parsed.scheme == "file":
        return LocalStore(parsed.path)
    if parsed.scheme and len(parsed.scheme) > 1:
        raise StoreError(f"store {url!r}: unknown scheme {parsed.scheme!r}; use a directory path")
    return LocalStore(url)
