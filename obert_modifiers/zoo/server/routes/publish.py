"""Publish: check a manifest before sending bytes, then one streamed multipart upload (a JSON
``manifest`` part, then one ``file`` part per distinct content, named by its sha256) that becomes
visible atomically at commit."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import ClientDisconnect

from obert_modifiers.zoo.card import CardError, parse_card
from obert_modifiers.zoo.protocol import API_PREFIX, Manifest
from obert_modifiers.zoo.server.deps import BaseUrl, HubDep, Owner
from obert_modifiers.zoo.server.schemas import ERRORS, CheckResult, ModelDetail
from obert_modifiers.zoo.service import Hub, HubError, model_detail

_LOGGER = logging.getLogger("obert_modifiers.zoo")
MAX_MANIFEST_BYTES = 4 * 1024 * 1024
MULTIPART_OVERHEAD = 1024 * 1024  # boundaries and part headers on top of the files
router = APIRouter(prefix=API_PREFIX)


def validation_message(error: ValidationError, what: str) -> str:
    parts = []
    for item in error.errors():
        loc = ".".join(str(p) for p in item["loc"])
        parts.append(f"{loc}: {item['msg']}" if loc else item["msg"])
    return f"{what}: " + "; ".join(parts)


class _UploadReceiver:
    """Streams a multipart publish into a staging folder: a ``manifest`` part (JSON) first, then one
    ``file`` part per distinct blob, named by its sha256. Sizes and checksums are checked as the
    bytes arrive; anything unexpected raises HubError."""

    def __init__(self, hub: Hub, owner: str, folder: Path) -> None:
        self.hub, self.owner, self.folder = hub, owner, folder
        self.manifest: Manifest | None = None
        self.expected: dict[str, int] = {}  # sha256 -> size
        self.staged: dict[str, Path] = {}
        self._headers: dict[str, str] = {}
        self._field = b""
        self._value = b""
        self._kind: str | None = None
        self._buffer = bytearray()
        self._sha: str | None = None
        self._handle = None
        self._hasher = None
        self._count = 0

    def callbacks(self) -> dict:
        return {
            "on_part_begin": self._part_begin,
            "on_header_field": lambda d, s, e: self._append("_field", d[s:e]),
            "on_header_value": lambda d, s, e: self._append("_value", d[s:e]),
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._part_data,
            "on_part_end": self._part_end,
        }

    def _append(self, name: str, data: bytes) -> None:
        setattr(self, name, getattr(self, name) + data)
        if len(self._field) + len(self._value) > 16384:
            raise HubError(400, "multipart part header too long")

    def _part_begin(self) -> None:
        self._headers, self._kind = {}, None

    def _header_end(self) -> None:
        self._headers[self._field.decode("latin-1").lower()] = self._value.decode("latin-1")
        self._field = self._value = b""

    def _headers_finished(self) -> None:
        _, options = parse_options_header(self._headers.get("content-disposition", ""))
        name = options.get(b"name", b"").decode("latin-1")
        if name == "manifest":
            if self.manifest is not None:
                raise HubError(400, "the manifest part appears twice")
            self._kind, self._buffer = "manifest", bytearray()
        elif name == "file":
            if self.manifest is None:
                raise HubError(400, "the manifest part must come before the file parts")
            sha = options.get(b"filename", b"").decode("latin-1")
            if sha not in self.expected:
                raise HubError(400, f"file part {sha[:80]!r} is not the sha256 of any file in the manifest")
            if sha in self.staged:
                raise HubError(400, f"file part {sha} was sent twice")
            self._kind, self._sha = "file", sha
            self._handle = open(self.folder / sha, "wb")  # noqa: SIM115 (closed at part end)
            self._hasher, self._count = hashlib.sha256(), 0
        else:
            raise HubError(
                400, f"unexpected multipart field {name[:80]!r}: expected 'manifest' and 'file' parts"
            )

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        chunk = data[start:end]
        if self._kind == "manifest":
            self._buffer += chunk
            if len(self._buffer) > MAX_MANIFEST_BYTES:
                raise HubError(413, f"manifest is larger than {MAX_MANIFEST_BYTES} bytes")
        elif self._kind == "file":
            self._count += len(chunk)
            if self._count > self.expected[self._sha]:
                raise HubError(
                    400,
                    f"file {self._path_of(self._sha)}: more bytes than the manifest's size "
                    f"({self.expected[self._sha]})",
                )
            self._handle.write(chunk)
            self._hasher.update(chunk)

    def _path_of(self, sha: str) -> str:
        return next((f.path for f in self.manifest.files if f.sha256 == sha), sha)

    def _part_end(self) -> None:
        if self._kind == "manifest":
            try:
                self.manifest = Manifest.model_validate_json(bytes(self._buffer))
            except ValidationError as error:
                raise HubError(422, validation_message(error, "manifest refused")) from None
            self.hub.check_manifest(self.manifest, self.owner)
            self.expected = {f.sha256: f.size for f in self.manifest.files}
            for item in self.manifest.files:
                if self.expected[item.sha256] != item.size:
                    raise HubError(422, f"file {item.path}: same sha256 as another file but a different size")
        elif self._kind == "file":
            self._handle.close()
            self._handle = None
            digest = self._hasher.hexdigest()
            path = self._path_of(self._sha)
            if self._count != self.expected[self._sha]:
                raise HubError(
                    400,
                    f"file {path}: received {self._count} bytes, the manifest says "
                    f"{self.expected[self._sha]}",
                )
            if digest != self._sha:
                raise HubError(400, f"file {path}: sha256 mismatch (manifest {self._sha}, received {digest})")
            self.staged[self._sha] = self.folder / self._sha
        self._kind = None

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()

    def finish(self) -> tuple[Manifest, Any, str]:
        if self.manifest is None:
            raise HubError(400, "no manifest part in the upload")
        missing = [
            f.path
            for f in self.manifest.files
            if f.sha256 not in self.staged and not self.hub.store.has(f.sha256)
        ]
        if missing:
            raise HubError(400, f"upload incomplete: no content for {missing[:10]}")
        card_sha = next(f.sha256 for f in self.manifest.files if f.path == "model.md")
        card_path = self.staged.get(card_sha)
        try:
            raw = card_path.read_bytes() if card_path else self.hub.store.read_bytes(card_sha)
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise HubError(422, "model card model.md refused: not UTF-8 text") from None
        if any(c < " " and c not in "\t\n\r" or c == "\x7f" for c in text):
            raise HubError(422, "model card model.md refused: it holds a control character")
        try:
            card, body = parse_card(text, "model.md")
        except CardError as error:
            raise HubError(422, str(error)) from None
        self.hub.check_card(card, self.manifest.stub)
        return self.manifest, card, body


@router.post("/publish/check", response_model=CheckResult, tags=["publish"], responses=ERRORS)
def check_publish(hub: HubDep, manifest: Manifest, owner: Owner) -> dict:
    """Check a publish manifest (token, stub, paths, sizes, ownership) before sending the bytes;
    ``missing`` lists the files whose content the hub does not have yet."""
    hub.check_manifest(manifest, owner)
    missing = [f.path for f in manifest.files if not hub.store.has(f.sha256)]
    return {"ok": True, "stub": manifest.stub, "missing": missing}


@router.post(
    "/models",
    status_code=201,
    response_model=ModelDetail,
    tags=["publish"],
    responses=ERRORS,
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "required": ["manifest"],
                        "properties": {
                            "manifest": {
                                "type": "string",
                                "description": "JSON: {stub, files: [{path, size, sha256}]}",
                            },
                            "file": {
                                "type": "array",
                                "items": {"type": "string", "format": "binary"},
                                "description": "one part per distinct content, filename = its sha256",
                            },
                        },
                    }
                }
            },
        }
    },
)
async def publish(request: Request, hub: HubDep, base_url: BaseUrl, owner: Owner) -> JSONResponse:
    """Publish (or replace, if you own it) the model at a stub. Atomic: the model becomes visible
    only when every file has arrived and matched its sha256; a failed or interrupted upload leaves
    nothing behind."""
    content_type, options = parse_options_header(request.headers.get("content-type", ""))
    boundary = options.get(b"boundary")
    if content_type != b"multipart/form-data" or not boundary:
        raise HubError(415, "publish expects multipart/form-data with a 'manifest' part and 'file' parts")
    limit = hub.limits.max_upload_bytes + MAX_MANIFEST_BYTES + MULTIPART_OVERHEAD
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise HubError(
            413,
            f"upload of {declared} bytes is over the hub's limit of {hub.limits.max_upload_bytes} bytes",
        )
    with hub.store.staging_area() as folder:
        receiver = _UploadReceiver(hub, owner, folder)
        try:
            parser = MultipartParser(boundary, receiver.callbacks())
            received = 0
            async for chunk in request.stream():
                received += len(chunk)
                if received > limit:
                    raise HubError(
                        413, f"upload is over the hub's limit of {hub.limits.max_upload_bytes} bytes"
                    )
                parser.write(chunk)
            parser.finalize()
        except HubError:
            raise
        except ClientDisconnect:
            # the client went away: the staging folder is removed on the way out, nothing is visible
            _LOGGER.info("publish by %s interrupted: client disconnected", owner)
            return JSONResponse({"detail": "client disconnected"}, status_code=400)
        except Exception as error:  # malformed multipart
            raise HubError(400, f"malformed multipart upload: {error}") from None
        finally:
            receiver.close()
        manifest, card, body = receiver.finish()
        model = await run_in_threadpool(hub.commit, manifest, owner, receiver.staged, card, body)
    _LOGGER.info("published %s (%s) by %s", model.stub, model.id, owner)
    return JSONResponse(model_detail(model, base_url), status_code=201)

