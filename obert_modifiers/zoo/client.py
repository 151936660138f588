"""Hub client: push a model folder under a stub, pull a stub (sha256-verified, resumable,
cached by checksum), search, delete; and ``local_hub()`` to run a throwaway hub on loopback.

The hub URL comes from ``url=``, else ``$OBERT_HUB_URL``, else ``$SPARSEZOO_API_URL``; the write
token from ``token=``, else ``$OBERT_HUB_TOKEN``. Downloads are cached under ``$OBERT_HUB_CACHE`` (default
``~/.cache/obert_modifiers/hub``): ``blobs/<sha256>`` for content, ``models/<stub>/`` for pulled
folders.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import queue
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from obert_modifiers.zoo.card import CARD_NAME, LATENCY_PLOT, SPARSITY_PLOT, CardError, read_card, render_card
from obert_modifiers.zoo.protocol import API_PREFIX, UnsafePathError, check_relative_path
from obert_modifiers.zoo.stubs import parse_stub

CHUNK = 1024 * 1024
MARKER = ".obert-hub.json"
TIMEOUT = httpx.Timeout(30.0, read=120.0, write=120.0)


class HubClientError(RuntimeError):
    """A hub operation that failed, with a message that says what to do."""


def hub_url(url: str | None = None) -> str:
    value = url or os.environ.get("OBERT_HUB_URL") or os.environ.get("SPARSEZOO_API_URL")
    if not value:
        raise HubClientError(
            "no hub URL: pass url=/--url or set OBERT_HUB_URL (or SPARSEZOO_API_URL), e.g. http://127.0.0.1:8000"
        )
    return value.rstrip("/")


def hub_token(token: str | None = None) -> str:
    value = token or os.environ.get("OBERT_HUB_TOKEN")
    if not value:
        raise HubClientError(
            "no write token: pass token=/--token or set OBERT_HUB_TOKEN "
            "(create one on the server with `obert zoo token create NAME`)"
        )
    return value


def cache_dir(path: str | os.PathLike | None = None) -> Path:
    if path is not None:
        return Path(path)
    if os.environ.get("OBERT_HUB_CACHE"):
        return Path(os.environ["OBERT_HUB_CACHE"])
    return Path.home() / ".cache" / "obert_modifiers" / "hub"


def _progress(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(
        total=total,
        desc=desc,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        disable=not enabled,
        leave=False,
        file=sys.stderr,
    )


def _raise_for(response: httpx.Response, what: str) -> None:
    if response.is_success:
        return
    try:
        detail = response.json().get("detail")
    except ValueError:
        detail = response.text[:300]
    if response.status_code == 401:
        raise HubClientError(f"{what}: the hub refused the token ({detail})")
    raise HubClientError(f"{what}: HTTP {response.status_code}: {detail}")


@contextlib.contextmanager
def _http(url: str) -> Iterator[httpx.Client]:
    https = url.lower().startswith("https://")
    try:
        # plain-http hubs skip loading the CA bundle (tens of ms per client); https verifies as usual
        with httpx.Client(base_url=url, timeout=TIMEOUT, follow_redirects=https, verify=https) as client:
            yield client
    except httpx.ConnectError as error:
        raise HubClientError(f"cannot reach the hub at {url}: is it running? ({error})") from None
    except httpx.TimeoutException as error:
        raise HubClientError(f"the hub at {url} did not answer in time ({error})") from None


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


# --------------------------------------------------------------------------------------- push


def _files_under(folder: Path, prefix: str = "") -> dict[str, Path]:
    files = {}
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        if path.is_file() and not any(part.startswith(".") for part in rel.split("/")):
            files[prefix + rel] = path
    return files


def _top_files(folder: Path, prefix: str) -> dict[str, Path]:
    return {
        prefix + p.name: p for p in sorted(folder.iterdir()) if p.is_file() and not p.name.startswith(".")
    }


def _check_unchanged_since_export(onnx_sha256: str, manifest_path: Path | None, onnx_path: Path) -> None:
    """``obert export`` records the sha256 of the model.onnx its parity check ran on; a file changed
    since (rewritten in place by a tool, edited, truncated) is not what was checked: refuse it."""
    if manifest_path is None:
        return
    try:
        expected = json.loads(manifest_path.read_text()).get("onnx_sha256")
    except (OSError, ValueError) as error:
        raise HubClientError(f"{manifest_path}: unreadable export manifest ({error})") from None
    if expected and onnx_sha256 != expected:
        raise HubClientError(
            f"{onnx_path}: changed since it was exported (its sha256 differs from the one "
            f"{manifest_path.name} recorded), so the export's parity check does not cover it; export "
            "the model again with `obert export` (DeepSparse/ONNX tools that fix input shapes can "
            "rewrite the file in place: docs/compat.md)"
        )


def assemble(
    folder: str | os.PathLike,
    stub: str,
    workdir: Path,
    training: str | os.PathLike | None = None,
    **card_facts: Any,
) -> dict[str, Path]:
    """The hub layout {path in the model: local file} for a zoo-layout folder (``deployment/``,
    optional ``training/``, ``model.md``...) or a deployment folder (+ ``training``). A missing card
    is generated; a card whose stub fields disagree with ``stub`` is rewritten to match it."""
    from obert_modifiers.zoo.card import write_card

    root = Path(folder)
    if not root.is_dir():
        raise HubClientError(f"{root}: no such folder")
    if (root / "deployment").is_dir():
        files = _files_under(root)
        deployment = root / "deployment"
    elif (root / "model.onnx").is_file():
        deployment = root
        files = {}
        for rel, path in _files_under(root).items():
            if rel in (CARD_NAME, SPARSITY_PLOT, LATENCY_PLOT):
                files[rel] = path
            else:
                files["deployment/" + rel] = path
    else:
        raise HubClientError(
            f"{root}: no model.onnx and no deployment/ folder: export the model first "
            "(obert export) and push the deployment folder"
        )
    if training is not None:
        training = Path(training)
        if not (training / "config.json").is_file():
            raise HubClientError(f"{training}: not a training folder (no config.json)")
        files.update(_top_files(training, "training/"))
    if "deployment/model.onnx" not in files:
        raise HubClientError(f"{deployment}: no model.onnx")
    for rel in files:
        try:
            check_relative_path(rel)
        except UnsafePathError as error:
            raise HubClientError(f"cannot publish {root}: {error}") from None

    if CARD_NAME not in files:
        card_path = write_card(
            deployment, workdir / CARD_NAME, stub=stub, training_dir=training, **card_facts
        )
        files[CARD_NAME] = card_path
        for plot in (SPARSITY_PLOT, LATENCY_PLOT):
            if (workdir / plot).is_file():
                files[plot] = workdir / plot
    else:
        try:
            card, body = read_card(files[CARD_NAME])
        except CardError as error:
            raise HubClientError(str(error)) from None
        wanted = parse_stub(stub)
        update = {k: v for k, v in wanted.fields().items()}
        if card.stub_fields() != update or card.stub != str(wanted):
            if card.stub:  # the body quotes the stub (title, how to run it)
                body = body.replace(card.stub, str(wanted))
            card = card.model_copy(update={**update, "stub": str(wanted)})
            (workdir / CARD_NAME).write_text(render_card(card, body), encoding="utf-8")
            files[CARD_NAME] = workdir / CARD_NAME
    if not any(rel.startswith("recipe") and rel.endswith(".md") and "/" not in rel for rel in files):
        recipe = next(
            (files[k] for k in ("deployment/recipe.yaml", "training/recipe.yaml") if k in files), None
        )
        if recipe is not None:
            # SparseZoo serves recipes as recipe.md (YAML front matter), which SparseML reads for zoo: stubs
            text = recipe.read_text(encoding="utf-8")
            (workdir / "recipe.md").write_text(
                f"---\n{text.rstrip()}\n---\n\n# Recipe\n\nThe recipe this model "
                "was trained with (front matter above).\n",
                encoding="utf-8",
            )
            files["recipe.md"] = workdir / "recipe.md"
    return files


def _multipart(manifest: dict, blobs: dict[str, Path], bar) -> tuple[str, int, Iterator[bytes]]:
    boundary = uuid.uuid4().hex
    head = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="manifest"\r\n'
            f"Content-Type: application/json\r\n\r\n"
        ).encode()
        + json.dumps(manifest).encode()
        + b"\r\n"
    )
    parts = [
        (
            sha,
            (
                f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{sha}"\r\n'
                f"Content-Type: application/octet-stream\r\n\r\n"
            ).encode(),
        )
        for sha in blobs
    ]
    tail = f"--{boundary}--\r\n".encode()
    length = len(head) + sum(len(h) + blobs[sha].stat().st_size + 2 for sha, h in parts) + len(tail)

    def body() -> Iterator[bytes]:
        yield head
        for sha, header in parts:
            yield header
            with open(blobs[sha], "rb") as handle:
                while chunk := handle.read(CHUNK):
                    bar.update(len(chunk))
                    yield chunk
            yield b"\r\n"
        yield tail

    return f"multipart/form-data; boundary={boundary}", length, body()


def push(
    folder: str | os.PathLike,
    stub: str,
    url: str | None = None,
    token: str | None = None,
    *,
    training: str | os.PathLike | None = None,
    progress: bool = True,
    **card_facts: Any,
) -> dict:
    """Publish ``folder`` (a deployment or zoo-layout folder; ``training`` adds a training folder)
    under ``stub``. Returns the hub's record of the model (id, stub, card, files with sha256)."""
    stub = str(parse_stub(stub))
    base, token = hub_url(url), hub_token(token)
    headers = {"Authorization": f"Bearer {token}"}
    with tempfile.TemporaryDirectory(prefix="obert-push-") as tmp:
        files = assemble(folder, stub, Path(tmp), training=training, **card_facts)
        entries, blobs = [], {}
        for rel, path in sorted(files.items()):
            sha = sha256_file(path)
            entries.append({"path": rel, "size": path.stat().st_size, "sha256": sha})
            blobs.setdefault(sha, path)
            if rel == "deployment/model.onnx":  # hashed once: the upload's digest is the one checked
                _check_unchanged_since_export(sha, files.get("deployment/export.json"), path)
        manifest = {"stub": stub, "files": entries}
        with _http(base) as client:
            check = client.post(f"{API_PREFIX}/publish/check", json=manifest, headers=headers)
            _raise_for(check, f"publish {stub}")
            # content the hub already stores (an earlier version, another model) is not sent again
            missing = set(check.json()["missing"])
            to_send = {
                sha: path
                for sha, path in blobs.items()
                if any(e["sha256"] == sha and e["path"] in missing for e in entries)
            }
            response = _send(client, manifest, to_send, headers, stub, progress)
            if response.status_code == 400 and any(
                text in response.text for text in ("was not uploaded", "upload incomplete")
            ):
                # the hub dropped content it had (its model was deleted meanwhile): send everything
                response = _send(client, manifest, blobs, headers, stub, progress)
            _raise_for(response, f"publish {stub}")
            return response.json()


def _send(
    client: httpx.Client, manifest: dict, blobs: dict[str, Path], headers: dict, stub: str, progress: bool
) -> httpx.Response:
    total = sum(p.stat().st_size for p in blobs.values())
    with _progress(total, f"upload {stub.rsplit('/', 1)[-1]}", progress) as bar:
        content_type, length, body = _multipart(manifest, blobs, bar)
        return client.post(
            f"{API_PREFIX}/models",
            content=body,
            headers={**headers, "Content-Type": content_type, "Content-Length": str(length)},
        )


# --------------------------------------------------------------------------------------- reads


def resolve(stub: str, url: str | None = None) -> dict:
    """The hub's record of ``stub`` (raises HubClientError naming the stub if it is unknown)."""
    canonical = str(parse_stub(stub))
    base = hub_url(url)
    with _http(base) as client:
        return _resolve(client, canonical, base)


def _resolve(client: httpx.Client, canonical: str, base: str) -> dict:
    response = client.get(f"{API_PREFIX}/resolve", params={"stub": canonical})
    if response.status_code == 404:
        raise HubClientError(f"unknown stub {canonical} on the hub at {base}")
    _raise_for(response, f"resolve {canonical}")
    return response.json()


def search(query: str | None = None, url: str | None = None, limit: int = 50, **filters: str | None) -> dict:
    params = {k: v for k, v in {"q": query, "limit": limit, **filters}.items() if v}
    with _http(hub_url(url)) as client:
        response = client.get(f"{API_PREFIX}/models", params=params)
        _raise_for(response, "search")
        return response.json()


def delete(stub: str, url: str | None = None, token: str | None = None) -> dict:
    record = resolve(stub, url)
    with _http(hub_url(url)) as client:
        response = client.delete(
            f"{API_PREFIX}/models/{record['id']}", headers={"Authorization": f"Bearer {hub_token(token)}"}
        )
        _raise_for(response, f"delete {record['stub']}")
        return response.json()


class _HashingWriter:
    """Writes and hashes downloaded chunks on a second thread, so the network read of the next
    chunk overlaps them (hashlib and file writes release the GIL)."""

    def __init__(self, handle, digest) -> None:
        self.handle, self.digest = handle, digest
        self.queue: queue.Queue = queue.Queue(maxsize=32)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while (chunk := self.queue.get()) is not None:
            if self.error is None:
                try:
                    self.handle.write(chunk)
                    self.digest.update(chunk)
                except BaseException as error:  # noqa: BLE001 - re-raised in close()
                    self.error = error

    def write(self, chunk: bytes) -> None:
        if self.error is not None:
            raise self.error
        self.queue.put(chunk)

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join()
        if self.error is not None:
            raise self.error


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _valid_blob(path: Path, size: int, sha: str) -> bool:
    """A cached blob is reused only if it still has its checksum: pulled folders hard-link the cache,
    so a tool that rewrites a pulled file in place also changes the cached blob."""
    if not path.is_file() or path.stat().st_size != size:
        return False
    if sha256_file(path) == sha:
        return True
    path.unlink(missing_ok=True)
    return False


def fetch_blob(client: httpx.Client, file: dict, blobs: Path, bar) -> Path:
    """Download one file into the checksum cache (resuming a partial download with Range) and
    verify its sha256; a cached blob is reused."""
    sha, size = file["sha256"], int(file["size"])
    target = blobs / sha[:2] / sha
    if _valid_blob(target, size, sha):
        bar.update(size)
        return target
    partial = target.with_name(sha + ".partial")
    with _locked(target.with_name(sha + ".lock")):
        if _valid_blob(target, size, sha):
            bar.update(size)
            return target
        digest = hashlib.sha256()
        offset = partial.stat().st_size if partial.is_file() else 0
        if offset > size:
            partial.unlink()
            offset = 0
        if offset:
            with open(partial, "rb") as handle:
                while chunk := handle.read(CHUNK):
                    digest.update(chunk)
            bar.update(offset)
        if offset < size:
            headers = {"Range": f"bytes={offset}-"} if offset else {}
            with client.stream("GET", file["url"], headers=headers) as response:
                if response.status_code == 404:
                    raise HubClientError(
                        f"file {file['path']} is gone from the hub (was the model replaced?)"
                    )
                _raise_for(response, f"download {file['path']}")
                mode = "ab" if response.status_code == 206 else "wb"
                if mode == "wb" and offset:  # the server ignored the range: start over
                    digest, offset = hashlib.sha256(), 0
                with open(partial, mode) as handle:
                    writer = _HashingWriter(handle, digest)
                    try:
                        for chunk in response.iter_bytes():
                            writer.write(chunk)
                            bar.update(len(chunk))
                    finally:
                        writer.close()
        actual = digest.hexdigest()
        if actual != sha:
            partial.unlink(missing_ok=True)
            raise HubClientError(
                f"file {file['path']}: sha256 mismatch (hub says {sha}, got {actual}); "
                "the partial download was discarded, pull again"
            )
        os.replace(partial, target)
    return target


def pull(
    stub: str,
    url: str | None = None,
    out: str | os.PathLike | None = None,
    *,
    progress: bool = True,
    cache: str | os.PathLike | None = None,
) -> Path:
    """Download the model at ``stub``; returns its ``training/`` folder (a Hugging Face model folder,
    usable as ``--model_name_or_path`` / ``--distill_teacher``) if it has one, else ``deployment/``.
    The whole layout is at the returned path's parent (``out`` if given)."""
    canonical, base = str(parse_stub(stub)), hub_url(url)
    with _http(base) as client:  # one connection for the lookup and every download
        return _pull(client, canonical, base, out, progress, cache_dir(cache))


def _pull(
    client: httpx.Client, stub: str, base: str, out: str | os.PathLike | None, progress: bool, root: Path
) -> Path:
    record = _resolve(client, stub, base)
    blobs = root / "blobs"
    target = Path(out) if out is not None else root / "models" / record["stub"][len("zoo:") :]
    marker = target / MARKER
    if marker.is_file():
        try:
            if json.loads(marker.read_text()).get("id") == record["id"]:
                return _entry_point(target)
        except ValueError:
            pass
    elif target.exists() and any(target.iterdir()):
        raise HubClientError(f"{target} exists and is not a pulled model folder: choose another --out")
    for item in record["files"]:
        check_relative_path(item["path"])  # never write outside the target, whatever the hub says
    total = sum(int(f["size"]) for f in record["files"])
    with _progress(total, f"download {record['stub'].rsplit('/', 1)[-1]}", progress) as bar:
        local = {f["path"]: fetch_blob(client, f, blobs, bar) for f in record["files"]}
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        for rel, blob in local.items():
            dest = staging / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(blob, dest)  # no second copy of the bytes; the cache re-checks blobs before reuse
            except OSError:  # another file system, or links not supported
                shutil.copyfile(blob, dest)
        (staging / MARKER).write_text(json.dumps({"stub": record["stub"], "id": record["id"]}))
        if target.exists():
            old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
            os.replace(target, old)
            os.replace(staging, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return _entry_point(target)


def _entry_point(target: Path) -> Path:
    for name in ("training", "deployment"):
        if (target / name).is_dir():
            return target / name
    return target


# --------------------------------------------------------------------------------------- local hub


@dataclass
class LocalHub:
    url: str
    token: str
    root: Path
    db_url: str
    store: Path
    process: subprocess.Popen = field(repr=False)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_hub(
    root_dir: str | os.PathLike,
    port: int | None = None,
    token_name: str = "local",
    extra_args: list[str] | None = None,
    timeout: float = 60.0,
    db_url: str | None = None,
) -> LocalHub:
    """Start ``python -m obert_modifiers.zoo.server`` on loopback with SQLite (or ``db_url``) + a
    store under ``root_dir`` and a fresh write token; returns once it answers."""
    root = Path(root_dir).resolve()
    root.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    db_url, store = db_url or f"sqlite:///{root / 'hub.db'}", root / "store"
    out_path, log_path = root / f"hub-{port}.out", root / "hub.log"
    command = [
        sys.executable,
        "-m",
        "obert_modifiers.zoo.server",
        "--db",
        db_url,
        "--store",
        str(store),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--create-token",
        token_name,
        "--log-level",
        "warning",
        *(extra_args or []),
    ]
    with open(out_path, "w") as out, open(log_path, "a") as log:
        process = subprocess.Popen(
            command, stdout=out, stderr=log, env={**os.environ, "PYTHONUNBUFFERED": "1"}
        )
    url = f"http://127.0.0.1:{port}"
    hub = LocalHub(url=url, token="", root=root, db_url=db_url, store=store, process=process)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise HubClientError(
                f"the hub server exited with {process.returncode}: {log_path.read_text()[-2000:]}"
            )
        if not hub.token and out_path.is_file():
            for line in out_path.read_text().splitlines():
                if line.startswith("{"):
                    hub.token = json.loads(line)["token"]
        if hub.token:
            try:
                if httpx.get(f"{url}{API_PREFIX}/health", timeout=2).status_code == 200:
                    return hub
            except httpx.HTTPError:
                pass
        time.sleep(0.1)
    hub.stop()
    raise HubClientError(
        f"the hub server did not start within {timeout:.0f}s: {log_path.read_text()[-2000:]}"
    )


@contextlib.contextmanager
def local_hub(root_dir: str | os.PathLike, **kwargs: Any) -> Iterator[LocalHub]:
    """A hub server subprocess on a free loopback port (SQLite + directory store under ``root_dir``),
    yielding an object with ``.url`` and ``.token``; stopped on exit."""
    hub = start_hub(root_dir, **kwargs)
    try:
        yield hub
    finally:
        hub.stop()


def roundtrip(
    folder: str | os.PathLike,
    stub: str,
    root_dir: str | os.PathLike,
    *,
    training: str | os.PathLike | None = None,
    progress: bool = True,
    **card_facts: Any,
) -> dict:
    """Publish ``folder`` to a throw-away hub on loopback and pull it back by stub (what ``make demo``
    ends with): returns ``{"stub", "url", "files", "pulled"}`` after checking every pulled file
    against the sha256 the hub recorded."""
    root = Path(root_dir)
    with local_hub(root / "hub") as hub:
        record = push(folder, stub, hub.url, hub.token, training=training, progress=progress, **card_facts)
        pulled = pull(record["stub"], hub.url, out=root / "pulled", cache=root / "cache", progress=progress)
        layout = pulled.parent
        for entry in record["files"]:
            if sha256_file(layout / entry["path"]) != entry["sha256"]:
                raise HubClientError(f"round trip of {stub}: {entry['path']} differs after the pull")
        return {"stub": record["stub"], "url": hub.url, "files": len(record["files"]), "pulled": pulled}
