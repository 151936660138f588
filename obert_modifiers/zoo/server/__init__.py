"""The hub server: a FastAPI app (REST API + OpenAPI, the SparseZoo v2 GraphQL subset, web pages),
served by uvicorn. ``python -m obert_modifiers.zoo.server --db URL --store DIR --port N``
(or ``obert zoo serve``). No torch, no SparseML: it starts in about a second.

Layout: ``deps.py`` (typed dependencies: the hub, its public URL, the token's owner),
``schemas.py`` (answer shapes), ``routes/`` (one router per resource); this module only assembles
the app (:func:`create_app`) and runs it (:func:`serve`, :func:`main`)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from obert_modifiers.version import __version__
from obert_modifiers.zoo.db import Database
from obert_modifiers.zoo.protocol import UnsafePathError
from obert_modifiers.zoo.server.deps import get_base_url
from obert_modifiers.zoo.service import Hub, HubError, Limits
from obert_modifiers.zoo.store import open_store
from obert_modifiers.zoo.stubs import StubError

_LOGGER = logging.getLogger("obert_modifiers.zoo")
DESCRIPTION = (
    "A self-hostable SparseZoo-style model hub. Reads are public; writes need a token "
    "(`Authorization: Bearer ...`, created on the server with `obert zoo token create NAME`). "
    "Also answers the SparseZoo v2 GraphQL subset used by the sparsezoo 1.8.1 client at /v2/graphql."
)


def default_home() -> Path:
    return Path(os.environ.get("OBERT_HUB_HOME") or Path.home() / ".obert-hub")


def default_db_url() -> str:
    return f"sqlite:///{default_home() / 'hub.db'}"


def default_store_url() -> str:
    return str(default_home() / "store")


def _one_line(text: str, limit: int = 300) -> str:
    """``text`` for a log line: control characters escaped (no forged lines), at most ``limit`` chars."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text[:limit])


def _refusal(request: Request, status: int, message: str) -> JSONResponse:
    path = _one_line(request.url.path, 200)
    _LOGGER.info("refused %s %s: HTTP %d: %s", request.method, path, status, _one_line(message))
    return JSONResponse({"detail": message}, status_code=status)


async def _hub_error(request: Request, error: HubError) -> JSONResponse:
    return _refusal(request, error.status, error.message)


async def _stub_error(request: Request, error: StubError) -> JSONResponse:
    return _refusal(request, 422, str(error))


async def _path_error(request: Request, error: UnsafePathError) -> JSONResponse:
    return _refusal(request, 400, str(error))


def create_app(
    db_url: str | None = None,
    store_url: str | None = None,
    limits: Limits | None = None,
    public_url: str | None = None,
) -> FastAPI:
    from obert_modifiers.zoo.server.routes import files, models, publish, sparsezoo
    from obert_modifiers.zoo.web import add_web_routes

    hub = Hub(Database(db_url or default_db_url()), open_store(store_url or default_store_url()), limits)
    hub.cleanup()
    app = FastAPI(title="obert-modifiers model hub", version=__version__, description=DESCRIPTION)
    app.state.hub, app.state.public_url = hub, public_url
    app.add_exception_handler(HubError, _hub_error)
    app.add_exception_handler(StubError, _stub_error)
    app.add_exception_handler(UnsafePathError, _path_error)
    for module in (models, files, publish, sparsezoo):
        app.include_router(module.router)
    add_web_routes(app, hub, get_base_url)
    return app


def configure_logging(level: str) -> logging.Logger:
    """Show the hub's own lines (refusals, clean-up, publishes) on stderr beside uvicorn's: the
    ``obert_modifiers.zoo`` logger gets one handler, at ``level`` (uvicorn's names: trace=debug)."""
    name = level.lower()
    numeric = logging.DEBUG if name == "trace" else logging.getLevelName(name.upper())
    if not isinstance(numeric, int):
        raise ValueError(f"--log-level {level!r}: expected critical, error, warning, info, debug or trace")
    _LOGGER.setLevel(numeric)
    if not any(getattr(handler, "_obert_hub", False) for handler in _LOGGER.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s:     %(name)s: %(message)s"))
        handler._obert_hub = True  # type: ignore[attr-defined]
        _LOGGER.addHandler(handler)
    _LOGGER.propagate = False
    return _LOGGER


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

    configure_logging(log_level)
    db_url = db_url or default_db_url()
    if db_url.startswith("sqlite:///"):
        Path(db_url[len("sqlite:///") :]).expanduser().parent.mkdir(parents=True, exist_ok=True)
    app = create_app(db_url, store_url, limits, public_url)
    if create_token:
        token = app.state.hub.db.create_token(create_token)
        print(json.dumps({"token": token, "name": create_token}), flush=True)
    uvicorn.run(app, host=host, port=port, log_level=log_level, access_log=False, loop=loop, http=http)
