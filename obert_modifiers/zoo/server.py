"""The hub server: a FastAPI app (REST API + OpenAPI, the SparseZoo v2 GraphQL subset, web pages),
served by uvicorn. ``python -m obert_modifiers.zoo.server --db URL --store DIR --port N``
(or ``obert zoo serve``). No torch, no SparseML: it starts in about a second."""

import argparse
import hashlib
import json
import logging
import mimetypes
import os
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Header, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import ClientDisconnect

from obert_modifiers.version import __version__
from obert_modifiers.zoo.card import CardError, parse_card
from obert_modifiers.zoo.db import Database
from obert_modifiers.zoo.protocol import API_PREFIX, Manifest, UnsafePathError
from obert_modifiers.zoo.service import SEARCH_FIELDS, Hub, HubError, Limits, model_detail, model_summary
from obert_modifiers.zoo.store import S3Store, open_store
from obert_modifiers.zoo.stubs import StubError

_LOGGER = logging.getLogger("obert_modifiers.zoo")
MAX_MANIFEST_BYTES = 4 * 1024 * 1024
MULTIPART_OVERHEAD = 1024 * 1024  # boundaries and part headers on top of the files


def default_home() -> Path:
    return Path(os.environ.get("OBERT_HUB_HOME") or Path.home() / ".obert-hub")


def default_db_url() -> str:
    return f"sqlite:///{default_home() / 'hub.db'}"


def default_store_url() -> str:
    return str(default_home() / "store")


def _validation_message(error: ValidationError, what: str) -> str:
    parts = []
    for item in error.errors():
        loc = ".".join(str(p) for p in item["loc"])
        parts.append(f"{loc}: {item['msg']}" if loc else item["msg"])
    return f"{what}: " + "; ".join(parts)


class BlobResponse(FileResponse):
    """A FileResponse that reads 1 MiB at a time (Starlette's default 64 KiB costs a thread hop per
    64 KiB, which halves download throughput on a busy machine)."""

    chunk_size = 1024 * 1024


def _byte_range(header: str | None, size: int) -> tuple[int, int] | None:
    """(start, end exclusive) of a single ``bytes=`` range, clamped to the size (an end past it is
    what the sparsezoo client sends); None for no range or several ranges (answered in full).
    Raises ``ValueError`` for a range that cannot be satisfied."""
    if not header:
        return None
    units, _, spec = header.partition("=")
    if units.strip().lower() != "bytes" or "," in spec:
        return None
    first, dash, last = spec.strip().partition("-")
    try:
        if not dash:
            return None
        if not first.strip():  # suffix: the last N bytes
            count = int(last)
            if count <= 0:
                raise ValueError(header)
            return max(0, size - count), size
        start = int(first)
        end = int(last) + 1 if last.strip() else size
    except ValueError:
        raise ValueError(header) from None
    if start >= size or end <= start:
        raise ValueError(header)
    return start, min(end, size)


def _s3_response(
    request: Request,
    store: S3Store,
    sha256: str,
    stub: str,
    path: str,
    media_type: str,
    filename: str,
    disposition: str,
    headers: dict[str, str],
) -> Response:
    """A download streamed from S3 (``Range`` passed on as a ranged GET), headers as FileResponse's."""
    size = store.size(sha256)
    if size is None:
        raise HubError(404, f"{stub}: the content of {path} is missing from the store")
    headers = {
        **headers,
        "Accept-Ranges": "bytes",
        "ETag": f'"{sha256}"',
        "Content-Disposition": f'{disposition}; filename="{filename}"',
    }
    try:
        span = _byte_range(request.headers.get("range"), size)
    except ValueError:
        return Response(status_code=416, headers={"Content-Range": f"bytes */{size}"})
    status, (start, end) = (200, (0, size)) if span is None else (206, span)
    if status == 206:
        headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
    headers["Content-Length"] = str(end - start)
    if request.method == "HEAD" or end == start:
        return Response(status_code=status, headers=headers, media_type=media_type)
    return StreamingResponse(
        store.iter_range(sha256, start, end), status_code=status, headers=headers, media_type=media_type
    )


_INLINE_IMAGES = {"image/png", "image/jpeg", "image/gif", "image/webp"}


def _served_type(path: str) -> tuple[str, bool]:
    """(Content-Type, show inline) for a published file: plots inline, text as text/plain (never
    HTML or SVG, which could run scripts), everything else as a download."""
    guessed = mimetypes.guess_type(path)[0] or ""
    if guessed in _INLINE_IMAGES:
        return guessed, True
    if path.endswith((".md", ".yaml", ".yml", ".txt", ".json", ".csv")):
        return ("application/json" if path.endswith(".json") else "text/plain; charset=utf-8"), True
    return "application/octet-stream", False


class ErrorBody(BaseModel):
    detail: str


class FileInfo(BaseModel):
    path: str
    size: int
    sha256: str
    url: str


class ModelSummary(BaseModel):
    id: str
    stub: str
    domain: str
    sub_domain: str
    task: str
    architecture: str
    sub_architecture: str | None = None
    framework: str
    repo: str
    dataset: str
    sparse_tag: str
    owner: str
    created: str | None = None
    total_bytes: int
    display_name: str | None = None
    sparsity: float | None = None
    quantized: bool | None = None
    url: str


class ModelDetail(ModelSummary):
    card: dict[str, Any]
    files: list[FileInfo]


class SearchResult(BaseModel):
    total: int
    limit: int
    offset: int
    models: list[ModelSummary]


class CheckResult(BaseModel):
    ok: bool
    stub: str
    missing: list[str]


class GraphQLRequest(BaseModel):
    query: str
    variables: dict[str, Any] | None = None
    operationName: str | None = None  # noqa: N815 (GraphQL's name)


ERRORS = {
    400: {"model": ErrorBody},
    401: {"model": ErrorBody},
    403: {"model": ErrorBody},
    404: {"model": ErrorBody},
    413: {"model": ErrorBody},
    415: {"model": ErrorBody},
    422: {"model": ErrorBody},
}


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
                raise HubError(422, _validation_message(error, "manifest refused")) from None
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
        try:
            card, body = parse_card(text, "model.md")
        except CardError as error:
            raise HubError(422, str(error)) from None
        self.hub.check_card(card, self.manifest.stub)
        return self.manifest, card, body


def create_app(
    db_url: str | None = None,
    store_url: str | None = None,
    limits: Limits | None = None,
    public_url: str | None = None,
) -> FastAPI:
    db = Database(db_url or default_db_url())
    store = open_store(store_url or default_store_url())
    hub = Hub(db, store, limits)
    hub.cleanup()

    app = FastAPI(
        title="obert-modifiers model hub",
        version=__version__,
        description=(
            "A self-hostable SparseZoo-style model hub. Reads are public; writes need a token "
            "(`Authorization: Bearer ...`, created on the server with `obert zoo token create NAME`). "
            "Also answers the SparseZoo v2 GraphQL subset used by the sparsezoo 1.8.1 client at /v2/graphql."
        ),
    )
    app.state.hub = hub

    def base_url(request: Request) -> str:
        return (public_url or str(request.base_url)).rstrip("/")

    @app.exception_handler(HubError)
    async def _hub_error(_request: Request, error: HubError) -> JSONResponse:
        return JSONResponse({"detail": error.message}, status_code=error.status)

    @app.exception_handler(StubError)
    async def _stub_error(_request: Request, error: StubError) -> JSONResponse:
        return JSONResponse({"detail": str(error)}, status_code=422)

    @app.exception_handler(UnsafePathError)
    async def _path_error(_request: Request, error: UnsafePathError) -> JSONResponse:
        return JSONResponse({"detail": str(error)}, status_code=400)

    def require_owner(authorization: Annotated[str | None, Header()] = None) -> str:
        if not authorization:
            raise HubError(
                401,
                "this operation needs a write token: send 'Authorization: Bearer <token>' "
                "(create one on the server with `obert zoo token create NAME`)",
            )
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise HubError(401, "malformed Authorization header: expected 'Bearer <token>'")
        owner = db.token_owner(token.strip())
        if owner is None:
            raise HubError(401, "invalid or revoked token")
        return owner

    Owner = Annotated[str, Depends(require_owner)]

    @app.get(f"{API_PREFIX}/health", tags=["meta"])
    def health() -> dict[str, str]:
        return {"status": "ok", "version": __version__}

    @app.get(f"{API_PREFIX}/models", response_model=SearchResult, tags=["models"], responses=ERRORS)
    def search_models(
        request: Request,
        q: Annotated[str | None, Query(max_length=200, description="words to find in stub and card")] = None,
        domain: Annotated[str | None, Query(max_length=100)] = None,
        sub_domain: Annotated[str | None, Query(max_length=100)] = None,
        task: Annotated[str | None, Query(max_length=100)] = None,
        architecture: Annotated[str | None, Query(max_length=100)] = None,
        dataset: Annotated[str | None, Query(max_length=100)] = None,
        sparse_tag: Annotated[str | None, Query(max_length=100)] = None,
        framework: Annotated[str | None, Query(max_length=100)] = None,
        repo: Annotated[str | None, Query(max_length=100)] = None,
        limit: Annotated[int, Query(ge=1, le=500)] = 50,
        offset: Annotated[int, Query(ge=0, le=1_000_000)] = 0,
    ) -> dict:
        values = locals()
        filters = {key: values[key] for key in SEARCH_FIELDS}
        total, rows = hub.search(filters, q, limit, offset)
        url = base_url(request)
        return {
            "total": total,
            "limit": limit,
            "offset": offset,
            "models": [model_summary(m, url) for m in rows],
        }

    @app.get(f"{API_PREFIX}/resolve", response_model=ModelDetail, tags=["models"], responses=ERRORS)
    def resolve(
        request: Request, stub: Annotated[str, Query(max_length=600, description="zoo:... stub")]
    ) -> dict:
        return model_detail(hub.resolve(stub), base_url(request))

    @app.get(
        f"{API_PREFIX}/models/{{model_id}}", response_model=ModelDetail, tags=["models"], responses=ERRORS
    )
    def get_model(request: Request, model_id: str) -> dict:
        return model_detail(hub.get(model_id), base_url(request))

    @app.get(
        f"{API_PREFIX}/models/{{model_id}}/card", tags=["models"], responses=ERRORS, response_class=Response
    )
    def get_card(model_id: str) -> Response:
        model = hub.get(model_id)
        card_file = next((f for f in model.files if f.path == "model.md"), None)
        if card_file is None:
            raise HubError(404, f"{model.stub} has no model.md")
        return Response(store.read_bytes(card_file.sha256), media_type="text/markdown; charset=utf-8")

    @app.api_route(
        f"{API_PREFIX}/models/{{model_id}}/files/{{path:path}}",
        methods=["GET", "HEAD"],
        tags=["files"],
        responses={
            **ERRORS,
            200: {"content": {"application/octet-stream": {}}},
            206: {"description": "partial content (Range)"},
        },
        response_class=FileResponse,
    )
    def download_file(request: Request, model_id: str, path: str) -> Response:
        """Download one file; ``Range`` requests resume, ``X-Checksum-SHA256`` carries its sha256."""
        model = hub.get(model_id)
        entry = next((f for f in model.files if f.path == path), None)
        if entry is None:
            raise HubError(404, f"{model.stub} has no file {path[:200]!r}")
        media_type, inline = _served_type(path)
        headers = {
            "X-Checksum-SHA256": entry.sha256,
            "Cache-Control": "public, max-age=60",
            # published files are untrusted: never let a browser run them on the hub's origin
            "X-Content-Type-Options": "nosniff",
            "Content-Security-Policy": "default-src 'none'; sandbox",
        }
        filename = path.rsplit("/", 1)[-1]
        disposition = "inline" if inline else "attachment"
        if isinstance(store, S3Store):
            return _s3_response(
                request, store, entry.sha256, model.stub, path, media_type, filename, disposition, headers
            )
        blob = store.blob_path(entry.sha256)
        if not blob.is_file():
            raise HubError(404, f"{model.stub}: the content of {path} is missing from the store")
        return BlobResponse(
            blob,
            media_type=media_type,
            filename=filename,
            content_disposition_type=disposition,
            headers=headers,
        )

    @app.post(f"{API_PREFIX}/publish/check", response_model=CheckResult, tags=["publish"], responses=ERRORS)
    def check_publish(manifest: Manifest, owner: Owner) -> dict:
        """Check a publish manifest (token, stub, paths, sizes, ownership) before sending the bytes;
        ``missing`` lists the files whose content the hub does not have yet."""
        hub.check_manifest(manifest, owner)
        missing = [f.path for f in manifest.files if not store.has(f.sha256)]
        return {"ok": True, "stub": manifest.stub, "missing": missing}

    @app.post(
        f"{API_PREFIX}/models",
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
    async def publish(request: Request, owner: Owner) -> JSONResponse:
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
        with store.staging_area() as folder:
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
        return JSONResponse(model_detail(model, base_url(request)), status_code=201)

    @app.delete(f"{API_PREFIX}/models/{{model_id}}", tags=["models"], responses=ERRORS)
    def delete_model(model_id: str, owner: Owner) -> dict[str, str]:
        model = hub.delete(model_id, owner)
        return {"deleted": model.stub, "id": model.id}

    @app.post("/v2/graphql", tags=["sparsezoo"], responses=ERRORS)
    def graphql(request: Request, body: GraphQLRequest) -> JSONResponse:
        """The SparseZoo v2 GraphQL subset (``models(...)`` with files, results, repo names)."""
        from obert_modifiers.zoo.graphql_api import execute

        payload = execute(hub, base_url(request), body.query, body.variables, body.operationName)
        return JSONResponse(payload, status_code=200 if payload.get("data") is not None else 400)

    from obert_modifiers.zoo.web import add_web_routes

    add_web_routes(app, hub, base_url)
    return app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m obert_modifiers.zoo.server", description="obert model hub server"
    )
    parser.add_argument(
        "--db", default=None, help="SQLAlchemy URL (default sqlite:///$OBERT_HUB_HOME/hub.db)"
    )
    parser.add_argument(
        "--store",
        default=None,
        help="blob store: a directory (default $OBERT_HUB_HOME/store) or "
        "s3://BUCKET/PREFIX[?endpoint_url=URL]",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--public-url", default=None, help="URL clients reach the hub at (for download URLs)")
    parser.add_argument("--max-file-bytes", type=int, default=Limits.max_file_bytes)
    parser.add_argument("--max-upload-bytes", type=int, default=Limits.max_upload_bytes)
    parser.add_argument("--max-files", type=int, default=Limits.max_files)
    parser.add_argument("--gc-grace-seconds", type=float, default=Limits.gc_grace_seconds)
    parser.add_argument(
        "--create-token",
        default=None,
        metavar="NAME",
        help="create a write token NAME and print it as JSON on the first line",
    )
    parser.add_argument("--log-level", default="info")
    parser.add_argument(
        "--loop", default="auto", help="uvicorn event loop: auto (uvloop if installed), asyncio"
    )
    parser.add_argument(
        "--http", default="auto", help="uvicorn HTTP parser: auto (httptools if installed), h11"
    )
    args = parser.parse_args(argv)
    serve(
        args.db,
        args.store,
        args.host,
        args.port,
        public_url=args.public_url,
        limits=Limits(args.max_file_bytes, args.max_upload_bytes, args.max_files, args.gc_grace_seconds),
        create_token=args.create_token,
        log_level=args.log_level,
        loop=args.loop,
        http=args.http,
    )


def serve(
    db_url: str | None,
    store_url: str | None,
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    public_url: str | None = None,
    limits: Limits | None = None,
    create_token: str | None = None,
    log_level: str = "info",
    loop: str = "auto",
    http: str = "auto",
) -> None:
    import uvicorn

    db_url = db_url or default_db_url()
    if db_url.startswith("sqlite:///"):
        Path(db_url[len("sqlite:///") :]).expanduser().parent.mkdir(parents=True, exist_ok=True)
    app = create_app(db_url, store_url, limits, public_url)
    if create_token:
        token = app.state.hub.db.create_token(create_token)
        print(json.dumps({"token": token, "name": create_token}), flush=True)
    uvicorn.run(app, host=host, port=port, log_level=log_level, access_log=False, loop=loop, http=http)


if __name__ == "__main__":
    main()
