"""Hub client: push a model folder under a stub, pull a stub (sha256-verified, resumable,
cached by checksum), search, delete. (A throw-away hub on loopback: ``obert_modifiers.zoo.local``.)

The hub URL comes from ``url=``, else ``$OBERT_HUB_URL``, else ``$SPARSEZOO_API_URL``; the write
token from ``token=``, else ``$OBERT_HUB_TOKEN``. Downloads are cached under ``$OBERT_HUB_CACHE`` (default
``~/.cache/obert_modifiers/hub``): ``blobs/<sha256>`` for content, ``models/<stub>/`` for pulled
folders.

A hub is not trusted: every value it answers is checked before it touches the disk
(:func:`checked_record`: ids, stub, paths by the server's own rules, sha256 digests, sizes within
limits), downloads are bounded by the size the hub declared, and a pull writes only inside its
destination and the cache. Any failure, of the network or of the hub, is one :class:`HubClientError`
line (:func:`raise_for_answer` maps every HTTP answer; :func:`_http` every transport error).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import queue
import re
import shutil
import sys
import tempfile
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import httpx

from obert_modifiers.deployment import (
    DeploymentError,
    DeploymentManifest,
    folder_kind,
    sha256_file,
    staged_dir,
)
from obert_modifiers.errors import ObertError
from obert_modifiers.zoo.card import CARD_NAME, LATENCY_PLOT, SPARSITY_PLOT, CardError, read_card, render_card
from obert_modifiers.zoo.protocol import API_PREFIX, SHA256_RE, UnsafePathError, check_relative_path
from obert_modifiers.zoo.stubs import StubError, parse_stub

CHUNK = 1024 * 1024
MARKER = ".obert-hub.json"
TIMEOUT = httpx.Timeout(30.0, read=120.0, write=120.0)
# what a pull accepts from a hub (the server's own defaults are 4 GiB a file, 8 GiB a model)
MAX_PULL_FILE_BYTES = 256 * 1024**3
MAX_PULL_BYTES = 1024**4
MAX_PULL_FILES = 100_000
MAX_ANSWER_BYTES = 64 * 1024**2  # a JSON answer (a model's record, a search page)
MODEL_ID_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")  # applied with fullmatch


class HubClientError(ObertError, RuntimeError):
    """A hub operation that failed, with a message that says what to do."""


def hub_url(url: str | None = None) -> str:
    value = url or os.environ.get("OBERT_HUB_URL") or os.environ.get("SPARSEZOO_API_URL")
    if not value:
        raise HubClientError(
            "no hub URL: pass url=/--url or set OBERT_HUB_URL (or SPARSEZOO_API_URL), e.g. http://127.0.0.1:8000"
        )
    try:
        parts = urlsplit(value)
        ok = parts.scheme in ("http", "https") and bool(parts.hostname)
        _ = parts.port  # a port that is not a number raises here
    except ValueError:  # e.g. a port that is not a number
        ok = False
    if not ok or any(not c.isprintable() or c.isspace() for c in value):
        raise HubClientError(
            f"hub URL {_shown(value, 200)} is not an http(s) URL; expected e.g. http://127.0.0.1:8000"
        )
    return value.rstrip("/")


def _shown(value: Any, limit: int = 80) -> str:
    """A value a hub (or a user) sent, for a one-line message: repr'd (control characters escaped)
    and cut to ``limit`` characters."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def hub_token(token: str | None = None) -> str:
    value = token or os.environ.get("OBERT_HUB_TOKEN")
    if not value:
        raise HubClientError(
            "no write token: pass token=/--token or set OBERT_HUB_TOKEN "
            "(create one on the server with `obert zoo token create NAME`)"
        )
    if not all("!" <= c <= "~" for c in value):  # it goes into an HTTP header as it is
        raise HubClientError(
            "the write token holds a space, a control or a non-ASCII character: copy it again "
            "from `obert zoo token create NAME`"
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


def _one_line(text: str, limit: int = 300) -> str:
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text[:limit])


def _detail(body: bytes) -> str:
    """The hub's reason for a refusal, on one line: its JSON ``detail`` if a string, else the start
    of the body; control characters escaped, cut to 300 characters."""
    try:
        detail = json.loads(body).get("detail")
    except (ValueError, AttributeError):
        detail = None
    if not isinstance(detail, str):
        detail = body[:300].decode("utf-8", "replace")
    return _one_line(detail) or "no reason given"


def raise_for_answer(response: httpx.Response, body: bytes, what: str, not_found: str | None = None) -> None:
    """Every HTTP answer of the hub goes through here: a success returns, anything else raises one
    HubClientError line naming the operation, the status and the hub's reason."""
    status = response.status_code
    if 200 <= status < 300:
        return
    if status == 404 and not_found is not None:
        raise HubClientError(not_found)
    detail = _detail(body)
    if status == 401:
        raise HubClientError(f"{what}: the hub refused the token ({detail})")
    if status == 403:
        raise HubClientError(f"{what}: not allowed ({detail})")
    if status == 413:
        raise HubClientError(f"{what}: too large for the hub ({detail})")
    if 300 <= status < 400:
        raise HubClientError(
            f"{what}: the hub answered with a redirect (HTTP {status}) to "
            f"{_shown(response.headers.get('location', ''), 200)}; use that URL as the hub URL"
        )
    if status >= 500:
        raise HubClientError(f"{what}: the hub failed (HTTP {status}: {detail}); try again later")
    raise HubClientError(f"{what}: HTTP {status}: {detail}")


def _read_answer(response: httpx.Response, what: str, limit: int = MAX_ANSWER_BYTES) -> bytes:
    """The body of a streamed answer, refused once it is over ``limit`` bytes (decoded)."""
    body = bytearray()
    for chunk in response.iter_bytes():
        body += chunk
        if len(body) > limit:
            if not response.is_success:  # the start is enough to say why it failed
                return bytes(body[:limit])
            raise HubClientError(f"{what}: the hub's answer is over {limit} bytes; is the URL a hub's?")
    return bytes(body)


def request(
    client: httpx.Client, method: str, url: str, what: str, **kwargs: Any
) -> tuple[httpx.Response, bytes]:
    """One request to the hub: (response, body read up to MAX_ANSWER_BYTES)."""
    with client.stream(method, url, **kwargs) as response:
        return response, _read_answer(response, what)


def json_answer(
    response: httpx.Response, body: bytes, what: str, expect: type = dict, not_found: str | None = None
) -> Any:
    """The JSON body of a successful answer, checked to be an ``expect`` (one line otherwise)."""
    raise_for_answer(response, body, what, not_found)
    try:
        data = json.loads(body)
    except ValueError:
        raise HubClientError(
            f"{what}: the hub answered HTTP {response.status_code} with something that is not JSON "
            f"({_shown(body[:60].decode('utf-8', 'replace'))}); is the URL a hub's?"
        ) from None
    if not isinstance(data, expect):
        kind = {dict: "object", list: "list"}.get(expect, expect.__name__)
        raise HubClientError(f"{what}: the hub answered a JSON {type(data).__name__}, expected a JSON {kind}")
    return data


@contextlib.contextmanager
def _http(url: str) -> Iterator[httpx.Client]:
    """One HTTP client for a hub; every transport failure (unreachable, timed out, the connection
    dropped mid-request, a URL that cannot be built...) becomes one HubClientError line."""
    https = url.lower().startswith("https://")
    try:
        # plain-http hubs skip loading the CA bundle (tens of ms per client); https verifies as usual
        with httpx.Client(base_url=url, timeout=TIMEOUT, follow_redirects=https, verify=https) as client:
            yield client
    except httpx.ConnectError as error:
        raise HubClientError(f"cannot reach the hub at {url}: is it running? ({error})") from None
    except httpx.TimeoutException as error:
        reason = str(error) or type(error).__name__
        raise HubClientError(f"the hub at {url} did not answer in time ({reason})") from None
    except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError) as error:
        raise HubClientError(
            f"the connection to the hub at {url} broke mid-request "
            f"({_shown(str(error) or type(error).__name__, 200)}); "
            "try again (a pull resumes where it stopped; a publish is all or nothing)"
        ) from None
    except (httpx.InvalidURL, httpx.UnsupportedProtocol) as error:
        raise HubClientError(f"cannot use the hub URL {url}: {_shown(str(error), 200)}") from None
    except (httpx.RequestError, httpx.StreamError) as error:
        raise HubClientError(
            f"network error with the hub at {url}: {type(error).__name__}: {_shown(str(error), 200)}"
        ) from None


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
        expected = DeploymentManifest.read(manifest_path).onnx_sha256
    except DeploymentError as error:
        raise HubClientError(f"cannot publish: {error}") from None
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
    try:
        kind = folder_kind(root)
    except DeploymentError as error:
        if not root.is_dir():
            raise HubClientError(f"{root}: no such folder") from None
        kind = str(error)
    if kind == "zoo" and (root / "deployment").is_dir():
        files = _files_under(root)
        deployment = root / "deployment"
    elif kind == "deployment" and (root / "model.onnx").is_file():
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
            what = f"publish {stub}"
            answer = json_answer(
                *request(client, "POST", f"{API_PREFIX}/publish/check", what, json=manifest, headers=headers),
                what,
            )
            missing = answer.get("missing")
            if not isinstance(missing, list) or not all(isinstance(m, str) for m in missing):
                raise HubClientError(
                    f"{what}: the hub's check answered 'missing': {_shown(missing)}, not a list of paths"
                )
            # content the hub already stores (an earlier version, another model) is not sent again
            missing = set(missing)
            to_send = {
                sha: path
                for sha, path in blobs.items()
                if any(e["sha256"] == sha and e["path"] in missing for e in entries)
            }
            response, body = _send(client, manifest, to_send, headers, stub, progress)
            if response.status_code == 400 and any(
                text.encode() in body for text in ("was not uploaded", "upload incomplete")
            ):
                # the hub dropped content it had (its model was deleted meanwhile): send everything
                response, body = _send(client, manifest, blobs, headers, stub, progress)
            record = json_answer(response, body, what)
            _check_model(record, what, base)
            if record["stub"] != stub:
                raise HubClientError(f"{what}: the hub answered for another stub, {record['stub']}")
            if not isinstance(record.get("files"), list):
                raise HubClientError(f"{what}: the hub's answer has no file list ({_shown(record, 120)})")
            return record


def _send(
    client: httpx.Client, manifest: dict, blobs: dict[str, Path], headers: dict, stub: str, progress: bool
) -> tuple[httpx.Response, bytes]:
    total = sum(p.stat().st_size for p in blobs.values())
    with _progress(total, f"upload {stub.rsplit('/', 1)[-1]}", progress) as bar:
        content_type, length, body = _multipart(manifest, blobs, bar)
        return request(
            client,
            "POST",
            f"{API_PREFIX}/models",
            f"publish {stub}",
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
    """The hub's record of ``canonical``; its id, stub and files checked (:func:`checked_record`)."""
    what = f"resolve {canonical}"
    response, body = request(client, "GET", f"{API_PREFIX}/resolve", what, params={"stub": canonical})
    record = json_answer(response, body, what, not_found=f"unknown stub {canonical} on the hub at {base}")
    checked_record(record, canonical, base)
    return record


def search(query: str | None = None, url: str | None = None, limit: int = 50, **filters: str | None) -> dict:
    params = {k: v for k, v in {"q": query, "limit": limit, **filters}.items() if v}
    with _http(hub_url(url)) as client:
        response, body = request(client, "GET", f"{API_PREFIX}/models", "search", params=params)
        answer = json_answer(response, body, "search")
        models = answer.get("models")
        if not isinstance(models, list) or not all(isinstance(m, dict) for m in models):
            raise HubClientError(f"search: the hub's answer has no list of models ({_shown(answer, 120)})")
        for model in models:
            _check_model(model, "search", hub_url(url))
            if type(model.get("total_bytes")) is not int:
                size = model.get("total_bytes")
                raise HubClientError(f"search: the hub's answer has a bad total_bytes {_shown(size)}")
            sparsity = model.get("sparsity")
            if sparsity is not None and (type(sparsity) not in (int, float) or not 0 <= sparsity <= 1):
                raise HubClientError(f"search: the hub's answer has a bad sparsity {_shown(sparsity)}")
        if type(answer.get("total")) is not int:
            raise HubClientError(f"search: the hub's answer has a bad total {_shown(answer.get('total'))}")
        return answer


def delete(stub: str, url: str | None = None, token: str | None = None) -> dict:
    record = resolve(stub, url)
    what = f"delete {record['stub']}"
    headers = {"Authorization": f"Bearer {hub_token(token)}"}
    with _http(hub_url(url)) as client:
        answer = json_answer(
            *request(client, "DELETE", f"{API_PREFIX}/models/{record['id']}", what, headers=headers), what
        )
    if answer.get("deleted") != record["stub"]:
        raise HubClientError(f"{what}: the hub answered deleted={_shown(answer.get('deleted'))}")
    return answer


def _check_model(model: dict, what: str, base: str) -> None:
    """A model summary from the hub has a sane id and a valid stub (so printing it is safe)."""
    model_id, stub = model.get("id"), model.get("stub")
    if not isinstance(model_id, str) or not MODEL_ID_RE.fullmatch(model_id):
        raise HubClientError(f"{what}: the hub at {base} answered a bad model id {_shown(model_id)}")
    try:
        ok = isinstance(stub, str) and str(parse_stub(stub)) == stub
    except StubError:
        ok = False
    if not ok:
        raise HubClientError(f"{what}: the hub at {base} answered a bad stub {_shown(stub)}")


def checked_record(record: dict, canonical: str, base: str) -> list[dict]:
    """Check what a hub answered for ``canonical`` before anything of it reaches the disk or a URL:
    the model id, the stub (the one asked for), and each file's path (the server's rules, no file
    also used as a folder), size (a non-negative int within MAX_PULL_FILE_BYTES, all within
    MAX_PULL_BYTES) and sha256 (64 lowercase hex). Returns the files as ``{path, size, sha256}``;
    raises one HubClientError line naming the bad value."""

    def bad(what: str, value: Any, rule: str) -> HubClientError:
        return HubClientError(
            f"the hub at {base} answered {canonical} with a bad {what} {_shown(value)}: {rule}; "
            "nothing was written (is it a hub you trust?)"
        )

    model_id = record.get("id")
    if not isinstance(model_id, str) or not MODEL_ID_RE.fullmatch(model_id):
        raise bad("model id", model_id, "expected 1-64 letters, digits, '_' or '-'")
    stub = record.get("stub")
    try:
        same = isinstance(stub, str) and str(parse_stub(stub)) == canonical
    except StubError:
        same = False
    if not same:
        raise bad("stub", stub, f"expected the stub asked for, {canonical}")
    files = record.get("files")
    if not isinstance(files, list) or not files:
        raise bad("file list", files, "expected a non-empty JSON list")
    if len(files) > MAX_PULL_FILES:
        raise bad("file list", f"{len(files)} files", f"more than {MAX_PULL_FILES}")
    checked, total = [], 0
    for item in files:
        if not isinstance(item, dict):
            raise bad("file entry", item, "expected a JSON object {path, size, sha256}")
        path, size, sha = item.get("path"), item.get("size"), item.get("sha256")
        try:
            check_relative_path(path)
        except UnsafePathError as error:
            raise bad("file path", path, str(error)) from None
        if type(size) is not int or not 0 <= size <= MAX_PULL_FILE_BYTES:
            raise bad(f"size of {path}", size, f"expected an integer from 0 to {MAX_PULL_FILE_BYTES}")
        if not isinstance(sha, str) or not SHA256_RE.fullmatch(sha):
            raise bad(f"sha256 of {path}", sha, "expected 64 lowercase hex characters")
        total += size
        checked.append({"path": path, "size": size, "sha256": sha})
    if total > MAX_PULL_BYTES:
        raise bad("total size", total, f"more than {MAX_PULL_BYTES} bytes")
    paths = {f["path"] for f in checked}
    if len(paths) != len(checked):
        dup = next(p for p in paths if sum(f["path"] == p for f in checked) > 1)
        raise bad("file list", dup, "a path listed twice")
    for path in paths:
        parts = path.split("/")
        for depth in range(1, len(parts)):
            if "/".join(parts[:depth]) in paths:
                raise bad("file path", path, f"{'/'.join(parts[:depth])!r} is also listed as a file")
    return checked


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
    so a tool that rewrites a pulled file in place also changes the cached blob (which a fresh
    download then replaces by rename; nothing is deleted here)."""
    if not path.is_file() or path.stat().st_size != size:
        return False
    return sha256_file(path) == sha


def file_url(model_id: str, path: str) -> str:
    """Where a hub serves one file of a model, relative to the hub URL (built here from checked
    values, never taken from the hub's answer)."""
    return f"{API_PREFIX}/models/{model_id}/files/{quote(path, safe='/')}"


def fetch_blob(client: httpx.Client, file: dict, blobs: Path, bar, model_id: str | None = None) -> Path:
    """Download one file (``{path, size, sha256}`` as :func:`checked_record` returns them) into the
    checksum cache, resuming a partial download with Range, reading no more than its size, and
    verify its sha256; a cached blob is reused."""
    sha, size, path = file["sha256"], file["size"], file["path"]
    if not SHA256_RE.fullmatch(sha) or type(size) is not int or size < 0:  # checked_record's rules
        raise HubClientError(f"file {path}: bad sha256 {_shown(sha)} or size {_shown(size)}")
    url = file_url(model_id, path) if model_id is not None else file["url"]
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
            with client.stream("GET", url, headers=headers) as response:
                if not response.is_success:
                    start = _read_answer(response, f"download {path}", limit=4096)
                    raise_for_answer(
                        response,
                        start,
                        f"download {path}",
                        not_found=f"file {path} is gone from the hub (was the model replaced?)",
                    )
                mode = "ab" if response.status_code == 206 else "wb"
                if mode == "wb" and offset:  # the server ignored the range: start over
                    digest, offset = hashlib.sha256(), 0
                received = offset
                with open(partial, mode) as handle:
                    writer = _HashingWriter(handle, digest)
                    try:
                        for chunk in response.iter_bytes():
                            received += len(chunk)
                            if received > size:  # never more on disk than the hub declared
                                break
                            writer.write(chunk)
                            bar.update(len(chunk))
                    finally:
                        writer.close()
                if received > size:
                    partial.unlink(missing_ok=True)
                    raise HubClientError(
                        f"file {path}: the hub sent more than the {size} bytes it declared; "
                        "the download was discarded"
                    )
        actual = digest.hexdigest()
        if actual != sha:
            partial.unlink(missing_ok=True)
            raise HubClientError(
                f"file {path}: sha256 mismatch (hub says {sha}, got {actual}); "
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


def _pulled(target: Path) -> dict | None:
    """What a previous pull recorded in ``target`` (``{stub, id, files}``), None if it is not a
    pulled folder."""
    try:
        data = json.loads((target / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _foreign_files(target: Path, pulled: dict) -> list[str]:
    """Files in a pulled folder that its pull did not write (a pull replaces the folder only when
    there are none: it never removes what it did not create)."""
    made = pulled.get("files")
    if not isinstance(made, list):  # written before pulls listed their files
        return []
    found = [p.relative_to(target).as_posix() for p in target.rglob("*") if not p.is_dir()]
    return sorted(set(found) - set(made) - {MARKER})


def _pull(
    client: httpx.Client, stub: str, base: str, out: str | os.PathLike | None, progress: bool, root: Path
) -> Path:
    record = _resolve(client, stub, base)
    files = checked_record(record, stub, base)  # nothing the hub said reaches the disk unchecked
    model_id = record["id"]
    blobs = root / "blobs"
    target = Path(out) if out is not None else root / "models" / parse_stub(stub).path
    if target.exists() and not target.is_dir():
        raise HubClientError(f"{target} exists and is not a folder: choose another --out")
    pulled = _pulled(target) if target.is_dir() else None
    if pulled is not None and pulled.get("id") == model_id:
        return _entry_point(target)
    if pulled is None and target.is_dir() and any(target.iterdir()):
        raise HubClientError(f"{target} exists and is not a pulled model folder: choose another --out")
    foreign = _foreign_files(target, pulled) if pulled is not None else []
    if foreign:
        raise HubClientError(
            f"{target} holds files an earlier pull did not write ({', '.join(foreign[:3])}"
            f"{', ...' if len(foreign) > 3 else ''}); move them or choose another --out"
        )
    total = sum(f["size"] for f in files)
    _check_free_space(blobs, files, total)
    with _progress(total, f"download {stub.rsplit('/', 1)[-1]}", progress) as bar:
        local = {f["path"]: fetch_blob(client, f, blobs, bar, model_id) for f in files}
    # built beside the target and renamed into place; a folder an earlier pull made (or an empty
    # one) is replaced only once the new one is complete
    with staged_dir(target, overwrite=target.exists()) as staging:
        for rel, blob in local.items():
            dest = staging / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(blob, dest)  # no second copy of the bytes; the cache re-checks blobs before reuse
            except OSError:  # another file system, or links not supported
                shutil.copyfile(blob, dest)
        (staging / MARKER).write_text(json.dumps({"stub": stub, "id": model_id, "files": sorted(local)}))
    return _entry_point(target)


def _check_free_space(blobs: Path, files: list[dict], total: int) -> None:
    """Refuse a pull whose missing content cannot fit the cache's disk (before a byte is written)."""
    needed = sum(f["size"] for f in files if not (blobs / f["sha256"][:2] / f["sha256"]).is_file())
    if not needed:
        return
    probe = blobs
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if needed > free:
        raise HubClientError(
            f"pulling needs {needed} bytes in the cache {blobs} but its disk has {free} free; "
            "free some space or set OBERT_HUB_CACHE to another disk"
        )


def _entry_point(target: Path) -> Path:
    for name in ("training", "deployment"):
        if (target / name).is_dir():
            return target / name
    return target
