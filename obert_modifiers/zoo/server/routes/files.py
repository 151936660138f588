"""Downloads: one file of a model, with byte ranges (resume) and its sha256 in a header; from the
directory store (1 MiB reads) or streamed from S3."""

from __future__ import annotations

import mimetypes
from urllib.parse import quote

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, Response, StreamingResponse

from obert_modifiers.zoo.protocol import API_PREFIX
from obert_modifiers.zoo.server.deps import HubDep
from obert_modifiers.zoo.server.schemas import ERRORS
from obert_modifiers.zoo.service import HubError
from obert_modifiers.zoo.store import S3Store

router = APIRouter(prefix=API_PREFIX)
_INLINE_IMAGES = {"image/png", "image/jpeg", "image/gif", "image/webp"}


class BlobResponse(FileResponse):
    """A FileResponse that reads 1 MiB at a time (Starlette's default 64 KiB costs a thread hop per
    64 KiB, which halves download throughput on a busy machine)."""

    chunk_size = 1024 * 1024


def content_disposition(disposition: str, filename: str) -> str:
    """``inline|attachment; filename="..."; filename*=UTF-8''...`` (RFC 6266 / RFC 5987): the quoted
    ASCII fallback escapes ``\\`` and ``"`` and replaces anything outside printable ASCII with ``_``;
    the extended form carries the exact name, percent-encoded."""
    fallback = "".join(
        ("\\" + c if c in '\\"' else c) if 0x20 <= ord(c) < 0x7F else "_" for c in filename
    )
    return f"{disposition}; filename=\"{fallback}\"; filename*=UTF-8''{quote(filename, safe='')}"


def byte_range(header: str | None, size: int) -> tuple[int, int] | None:
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
    request: Request, store: S3Store, sha256: str, stub: str, path: str, media_type: str, headers: dict
) -> Response:
    """A download streamed from S3 (``Range`` passed on as a ranged GET), headers as FileResponse's."""
    size = store.size(sha256)
    if size is None:
        raise HubError(404, f"{stub}: the content of {path} is missing from the store")
    headers = {**headers, "Accept-Ranges": "bytes", "ETag": f'"{sha256}"'}
    try:
        span = byte_range(request.headers.get("range"), size)
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


def served_type(path: str) -> tuple[str, bool]:
    """(Content-Type, show inline) for a published file: plots inline, text as text/plain (never
    HTML or SVG, which could run scripts), everything else as a download."""
    guessed = mimetypes.guess_type(path)[0] or ""
    if guessed in _INLINE_IMAGES:
        return guessed, True
    if path.endswith((".md", ".yaml", ".yml", ".txt", ".json", ".csv")):
        return ("application/json" if path.endswith(".json") else "text/plain; charset=utf-8"), True
    return "application/octet-stream", False


@router.api_route(
    "/models/{model_id}/files/{path:path}",
    methods=["GET", "HEAD"],
    tags=["files"],
    responses={
        **ERRORS,
        200: {"content": {"application/octet-stream": {}}},
        206: {"description": "partial content (Range)"},
    },
    response_class=FileResponse,
)
def download_file(request: Request, hub: HubDep, model_id: str, path: str) -> Response:
    """Download one file; ``Range`` requests resume, ``X-Checksum-SHA256`` carries its sha256."""
    model = hub.get(model_id)
    entry = next((f for f in model.files if f.path == path), None)
    if entry is None:
        raise HubError(404, f"{model.stub} has no file {path[:200]!r}")
    media_type, inline = served_type(path)
    headers = {
        "X-Checksum-SHA256": entry.sha256,
        "Cache-Control": "public, max-age=60",
        # published files are untrusted: never let a browser run them on the hub's origin
        "X-Content-Type-Options": "nosniff",
        "Content-Security-Policy": "default-src 'none'; sandbox",
        "Content-Disposition": content_disposition(
            "inline" if inline else "attachment", path.rsplit("/", 1)[-1]
        ),
    }
    store = hub.store
    if isinstance(store, S3Store):
        return _s3_response(request, store, entry.sha256, model.stub, path, media_type, headers)
    blob = store.blob_path(entry.sha256)
    if not blob.is_file():
        raise HubError(404, f"{model.stub}: the content of {path} is missing from the store")
    return BlobResponse(blob, media_type=media_type, headers=headers)
