"""A throw-away hub on loopback: ``start_hub`` / ``local_hub`` run ``python -m
obert_modifiers.zoo.server`` (SQLite + a directory store under a folder, a fresh write token) as a
subprocess; ``roundtrip`` publishes a folder to one and pulls it back (what ``make demo`` ends with)."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from obert_modifiers.deployment import sha256_file
from obert_modifiers.zoo.client import HubClientError, pull, push
from obert_modifiers.zoo.protocol import API_PREFIX


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
