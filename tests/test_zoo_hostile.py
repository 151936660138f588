"""The hub client against a hostile hub, and the hub server against hostile clients.

The hostile hub is a real HTTP server on loopback, started inside the test, that answers crafted
JSON (a sha256 that is a path to a victim file, ``../`` paths, negative or huge sizes, wrong types,
non-JSON, more bytes than declared, a connection dropped mid-upload). Every case must end in one
HubClientError line naming the bad value, with the victim intact and nothing written outside the
pull's destination and cache; through ``obert zoo pull`` / ``push`` too, without a traceback."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from obert_modifiers.errors import ObertError
from obert_modifiers.testing.hub_fixtures import make_deployment, make_onnx
from obert_modifiers.zoo.card import ModelCard, render_card
from obert_modifiers.zoo.client import HubClientError, pull, push
from obert_modifiers.zoo.db import Database
from obert_modifiers.zoo.local import start_hub
from obert_modifiers.zoo.protocol import UnsafePathError, check_relative_path
from obert_modifiers.zoo.stubs import StubError, parse_stub

STUB = "zoo:nlp/text_classification/bert-tiny/pytorch/huggingface/rotten_tomatoes/pruned60-none"
API = "/api/v1"
MODEL_ID = "0123456789abcdef0123456789abcdef"
CONTENT = b"hello from a hub\n"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ------------------------------------------------------------------------------------ hostile hub

Answer = tuple[int, dict[str, str], bytes]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # quiet
        pass

    def _answer(self) -> None:
        server: _HostileServer = self.server  # type: ignore[assignment]
        length = int(self.headers.get("content-length") or 0)
        answer = server.respond(self, length)
        if answer is None:  # drop the connection without an answer
            self.close_connection = True
            return
        status, headers, body = answer
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        if "Content-Length" not in headers:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_DELETE = _answer


class _HostileServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, respond: Callable[[BaseHTTPRequestHandler, int], Answer | None]) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.respond = respond


@contextmanager
def hostile_hub(respond: Callable[[BaseHTTPRequestHandler, int], Answer | None]) -> Iterator[str]:
    server = _HostileServer(respond)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def _json(data) -> Answer:
    return 200, {"Content-Type": "application/json"}, json.dumps(data).encode()


def record_hub(files: list, **overrides) -> Callable:
    """A hub whose resolve answers ``files`` (and ``overrides``), and whose downloads serve CONTENT."""

    def respond(handler: BaseHTTPRequestHandler, _length: int) -> Answer:
        if handler.path.startswith(f"{API}/resolve"):
            return _json({"id": MODEL_ID, "stub": STUB, "files": files, **overrides})
        return 200, {"Content-Type": "application/octet-stream"}, CONTENT

    return respond


def good_file(**overrides) -> dict:
    return {"path": "deployment/model.onnx", "size": len(CONTENT), "sha256": sha(CONTENT), **overrides}


def tree(root: Path, skip: tuple[Path, ...]) -> dict[str, tuple[int, float]]:
    """Every file under ``root`` (outside ``skip``) with size and mtime."""
    found = {}
    for path in root.rglob("*"):
        if any(path == s or s in path.parents for s in skip):
            continue
        if path.is_file():
            found[str(path)] = (path.stat().st_size, path.stat().st_mtime_ns)
    return found


# messages show a hub's value cut to 80 characters (client._shown); a path under pytest's tmp_path (longer
# under pytest-xdist: .../popen-gw0/...) is named by its first characters
SHOWN = 60


@pytest.fixture
def victim(tmp_path) -> Path:
    path = tmp_path / "victim.txt"
    path.write_bytes(b"x" * len(CONTENT))  # same size as the files the hub declares
    return path


def _hostile_cases(victim: Path) -> list[tuple[str, Callable, str]]:
    """(case, hub, text the one-line error must hold)."""
    return [
        ("sha256 is a path", record_hub([good_file(sha256=str(victim))]), str(victim)),
        ("sha256 climbs out", record_hub([good_file(sha256="../../../" + victim.name)]), "../../../"),
        ("sha256 upper case", record_hub([good_file(sha256=sha(CONTENT).upper())]), "sha256"),
        ("sha256 + newline", record_hub([good_file(sha256=sha(CONTENT) + "\n")]), "sha256"),
        ("path climbs out", record_hub([good_file(path="../victim.txt")]), "../victim.txt"),
        ("absolute path", record_hub([good_file(path=str(victim))]), str(victim)),
        ("path + newline", record_hub([good_file(path="deployment/evil\n")]), "evil\\n"),
        ("hidden path", record_hub([good_file(path=".obert-hub.json")]), ".obert-hub.json"),
        ("file is a folder", record_hub([good_file(path="deployment"), good_file()]), "deployment"),
        ("path twice", record_hub([good_file(), good_file()]), "listed twice"),
        ("negative size", record_hub([good_file(size=-1)]), "-1"),
        ("huge size", record_hub([good_file(size=10**18)]), "1000000000000000000"),
        ("size is text", record_hub([good_file(size="17")]), "'17'"),
        ("size is bool", record_hub([good_file(size=True)]), "True"),
        ("size is float", record_hub([good_file(size=17.0)]), "17.0"),
        ("files not a list", record_hub({"a": 1}), "file list"),
        ("no files", record_hub([]), "file list"),
        ("entry not an object", record_hub(["deployment/model.onnx"]), "file entry"),
        ("id climbs out", record_hub([good_file()], id="../../x"), "../../x"),
        ("id not text", record_hub([good_file()], id=7), "model id"),
        ("another stub", record_hub([good_file()], stub="zoo:../../../../../../x/y"), "stub"),
        ("not JSON", lambda h, n: (200, {"Content-Type": "text/html"}, b"<html>hi</html>"), "not JSON"),
        ("JSON list", lambda h, n: _json([1, 2]), "JSON list"),
        ("server error", lambda h, n: (500, {}, b"Traceback (most recent call last):\n boom"), "HTTP 500"),
        ("hangs up", lambda h, n: None, "broke mid-request"),
    ]


def test_pull_from_a_hostile_hub_touches_nothing_outside_destination_and_cache(tmp_path, victim):
    before = victim.read_bytes()
    for case, respond, named in _hostile_cases(victim):
        out, cache = tmp_path / f"out-{len(case)}-{case[:6]}", tmp_path / "cache"
        outside = tree(tmp_path, (out, cache))
        with hostile_hub(respond) as url:
            with pytest.raises(HubClientError) as raised:
                pull(STUB, url, out=out, cache=cache, progress=False)
        message = str(raised.value)
        assert "\n" not in message and named[:SHOWN] in message, (case, message)
        assert victim.read_bytes() == before, case
        assert tree(tmp_path, (out, cache)) == outside, case  # nothing written or removed outside
        assert not out.exists(), case  # and no half-written destination


def test_pull_refuses_more_bytes_than_declared(tmp_path):
    flood = b"y" * (3 * 1024 * 1024)
    files = [good_file(sha256=sha(flood[: len(CONTENT)]))]

    def respond(handler: BaseHTTPRequestHandler, _length: int) -> Answer:
        if handler.path.startswith(f"{API}/resolve"):
            return _json({"id": MODEL_ID, "stub": STUB, "files": files})
        return 200, {"Content-Type": "application/octet-stream"}, flood

    with hostile_hub(respond) as url:
        with pytest.raises(HubClientError, match=f"more than the {len(CONTENT)} bytes it declared"):
            pull(STUB, url, out=tmp_path / "out", cache=tmp_path / "cache", progress=False)
    left = [p for p in (tmp_path / "cache").rglob("*") if p.is_file() and not p.name.endswith(".lock")]
    assert left == [] and not (tmp_path / "out").exists()


def test_pull_downloads_from_the_hub_not_from_urls_it_names(tmp_path):
    """A file's URL in the hub's answer is not followed (it could point anywhere): the client builds
    it from the checked model id and path."""
    seen: list[str] = []

    def respond(handler: BaseHTTPRequestHandler, _length: int) -> Answer:
        seen.append(handler.path)
        if handler.path.startswith(f"{API}/resolve"):
            return _json({"id": MODEL_ID, "stub": STUB, "files": [good_file(url="http://127.0.0.1:9/x")]})
        return 200, {}, CONTENT

    with hostile_hub(respond) as url:
        pulled = pull(STUB, url, out=tmp_path / "out", cache=tmp_path / "cache", progress=False)
    assert (pulled / "model.onnx").read_bytes() == CONTENT
    assert seen[-1] == f"{API}/models/{MODEL_ID}/files/deployment/model.onnx"


def _obert(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "obert_modifiers.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )


def test_obert_zoo_pull_cli_prints_one_line_for_a_hostile_hub(tmp_path, victim):
    before = victim.read_bytes()
    cases = {c: (r, n) for c, r, n in _hostile_cases(victim)}
    for case in ("sha256 is a path", "path climbs out", "huge size", "not JSON", "hangs up"):
        respond, named = cases[case]
        with hostile_hub(respond) as url:
            done = _obert(
                "zoo", "pull", STUB, "--url", url, "--out", str(tmp_path / "out"),
                env={"OBERT_HUB_CACHE": str(tmp_path / "cache")},
            )  # fmt: skip
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 1 and len(lines) == 1, (case, done.stderr)
        assert lines[0].startswith("error: ") and named[:SHOWN] in lines[0] and "Traceback" not in done.stderr
    assert victim.read_bytes() == before


# ------------------------------------------------------------------------------ network failures


def test_push_to_a_server_that_dies_mid_upload_is_one_line(tmp_path):
    deployment = make_deployment(tmp_path / "deployment", pad_bytes=4 * 1024 * 1024)

    def respond(handler: BaseHTTPRequestHandler, length: int) -> Answer | None:
        if handler.path == f"{API}/publish/check":
            manifest = json.loads(handler.rfile.read(length))
            return _json({"ok": True, "stub": STUB, "missing": [f["path"] for f in manifest["files"]]})
        handler.rfile.read(64 * 1024)  # a little of the upload, then the server is gone
        return None

    with hostile_hub(respond) as url:
        with pytest.raises(HubClientError) as raised:
            push(deployment, STUB, url, "obh_token", progress=False)
        assert "\n" not in str(raised.value) and url in str(raised.value)
        done = _obert("zoo", "push", str(deployment), "--stub", STUB, "--url", url, "--token", "obh_x")
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    # the progress bar (stderr) is wiped; the failure is the one line after it
    errors = [line for line in done.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and errors[0].lstrip(" \r").startswith("error: ") and url in errors[0]


def test_urls_the_client_cannot_use_are_one_line(tmp_path):
    bad_urls = ("ftp://127.0.0.1:1", "http://127.0.0.1:99999", "http://[::1", "http://exa mple.org", "nohost")
    for bad in bad_urls:
        with pytest.raises(HubClientError, match="not an http"):
            pull(STUB, bad, out=tmp_path / "x", progress=False)
    deployment = make_deployment(tmp_path / "deployment")
    for token in ("obh_a\nX-Evil: 1", "obh_\u00e9", "obh a"):
        with pytest.raises(HubClientError, match="write token holds"):
            push(deployment, STUB, "http://127.0.0.1:9", token, progress=False)
    done = _obert("zoo", "pull", STUB, "--url", "http://127.0.0.1:99999", "--out", str(tmp_path / "y"))
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "99999" in done.stderr


def test_a_push_check_answer_of_the_wrong_shape_is_one_line(tmp_path):
    deployment = make_deployment(tmp_path / "deployment")
    answers = [_json({"ok": True, "missing": "deployment/model.onnx"}), _json({"ok": True})]
    for answer in answers:
        with hostile_hub(lambda h, n, a=answer: (h.rfile.read(n), a)[1]) as url:
            with pytest.raises(HubClientError, match="not a list of paths"):
                push(deployment, STUB, url, "obh_token", progress=False)


# --------------------------------------------------------------------- the server, hostile clients


def test_full_string_matching_and_control_characters():
    for path in ("deployment/evil\n", "deployment\n/evil", "deployment/\x00x", "deployment/x\x7f", "a/\tb"):
        with pytest.raises(UnsafePathError):
            check_relative_path(path)
    for stub in (STUB + "\n", STUB.replace("/pytorch", "\n/pytorch"), STUB + "\x00", STUB + "?a=\r"):
        with pytest.raises(StubError):
            parse_stub(stub)
    for error in (UnsafePathError, StubError, HubClientError):
        assert issubclass(error, ObertError)


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    server = start_hub(tmp_path_factory.mktemp("hub"))
    yield server
    server.stop()


def _card(stub: str, **extra) -> bytes:
    card = ModelCard(domain="nlp", sub_domain="text_classification", architecture="bert",
                     task="text-classification", **extra)  # fmt: skip
    return render_card(card, "# tiny\n").encode()


def _multipart(manifest: dict, parts: list[tuple[str, bytes]]) -> tuple[bytes, str]:
    boundary = "obert-hostile-boundary"
    body = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="manifest"\r\n\r\n'.encode()
        + json.dumps(manifest).encode()
        + b"\r\n"
    )
    for name, data in parts:
        body += (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n\r\n'.encode()
            + data
            + b"\r\n"
        )
    return body + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def _files(tmp_path: Path, stub: str, seed: int = 0, **card) -> dict[str, bytes]:
    onnx = make_onnx(tmp_path / f"m{seed}-{time.monotonic_ns()}.onnx", seed=seed).read_bytes()
    return {"model.md": _card(stub, **card), "deployment/model.onnx": onnx}


def _manifest(stub: str, files: dict[str, bytes]) -> dict:
    return {"stub": stub, "files": [{"path": p, "size": len(d), "sha256": sha(d)} for p, d in files.items()]}


def test_control_characters_are_refused_over_http(hub, tmp_path):
    headers = {"Authorization": f"Bearer {hub.token}"}
    base = _files(tmp_path, STUB)
    for evil in ("deployment/evil\n", "deployment\n/evil", "deployment/e\x00vil", "deployment/evil\x7f"):
        files = {**base, evil: b"payload"}
        manifest = _manifest(STUB, files)
        check = httpx.post(f"{hub.url}{API}/publish/check", json=manifest, headers=headers)
        assert check.status_code == 422 and "control character" in check.text, (evil, check.text)
        body, content_type = _multipart(manifest, [(sha(d), d) for d in files.values()])
        published = httpx.post(
            f"{hub.url}{API}/models", content=body, headers={**headers, "Content-Type": content_type}
        )
        assert published.status_code == 422, (evil, published.text)
    for stub in (STUB + "\n", STUB.replace("/pytorch", "\n/pytorch")):
        assert httpx.get(f"{hub.url}{API}/resolve", params={"stub": stub}).status_code == 422
        check = httpx.post(f"{hub.url}{API}/publish/check", json=_manifest(stub, base), headers=headers)
        assert check.status_code == 422, check.text
    assert httpx.get(f"{hub.url}{API}/resolve", params={"stub": STUB}).status_code == 404


def test_downloads_quote_the_file_name(hub, tmp_path):
    stub = STUB.replace("pruned60", "pruned61")
    files = {**_files(tmp_path, stub), "deployment/we+ird=name@1.bin": b"\x00\x01"}
    body, content_type = _multipart(_manifest(stub, files), [(sha(d), d) for d in files.values()])
    headers = {"Authorization": f"Bearer {hub.token}", "Content-Type": content_type}
    assert httpx.post(f"{hub.url}{API}/models", content=body, headers=headers).status_code == 201
    record = httpx.get(f"{hub.url}{API}/resolve", params={"stub": stub}).json()
    url = next(f["url"] for f in record["files"] if f["path"].endswith(".bin"))
    disposition = httpx.get(url).headers["content-disposition"]
    quoted = "filename*=UTF-8''we%2Bird%3Dname%401.bin"
    assert disposition == f'attachment; filename="we+ird=name@1.bin"; {quoted}'
    card = next(f["url"] for f in record["files"] if f["path"] == "model.md")
    assert httpx.get(card).headers["content-disposition"].startswith('inline; filename="model.md"; ')
    from obert_modifiers.zoo.server.routes.files import content_disposition

    assert content_disposition("attachment", 'a"b\\c\né.txt') == (
        "attachment; filename=\"a\\\"b\\\\c__.txt\"; filename*=UTF-8''a%22b%5Cc%0A%C3%A9.txt"
    )


# ---------------------------------------------------------------------------------- GraphQL cost

MODELS_QUERY = "{ models(limit: 1) { modelId files(version: 2) { displayName fileSize } } }"


def test_graphql_refuses_expensive_queries_before_running_them(hub):
    url = f"{hub.url}/v2/graphql"
    assert httpx.post(url, json={"query": MODELS_QUERY}).status_code == 200
    aliases = "{ " + " ".join(f"a{i}: models {{ modelId files {{ path }} }}" for i in range(5000)) + " }"
    started = time.monotonic()
    refused = httpx.post(url, json={"query": aliases}, timeout=60)
    assert refused.status_code == 400 and time.monotonic() - started < 5, refused.text[:300]
    assert len(refused.content) < 10_000
    big = httpx.post(url, json={"query": "{ models { modelId } }" + " " * 100_000})
    assert big.status_code == 400 and "limit" in big.json()["detail"]
    fields = "{ models { " + " ".join(f"f{i}: modelId" for i in range(300)) + " } }"
    assert "fields" in httpx.post(url, json={"query": fields}).json()["errors"][0]["message"]
    many = "{ " + " ".join(f"a{i}: modelId" for i in range(4000)) + " }"  # under 64 KiB, 12k tokens
    assert len(many) < 64 * 1024 and httpx.post(url, json={"query": many}).status_code == 400
    deep = "{ models { files { path { a { b { c { d } } } } } } }"  # refused before validation
    assert "more than 6 deep" in httpx.post(url, json={"query": deep}).json()["errors"][0]["message"]
    fragments = (
        "query { models { ...A } } fragment A on Model { ...B ...B ...B ...B ...B ...B ...B ...B } "
        "fragment B on Model { ...C ...C ...C ...C ...C ...C ...C ...C } "
        "fragment C on Model { modelId stub repo framework }"
    )
    expanded = httpx.post(url, json={"query": fragments})
    assert expanded.status_code == 400 and "fragments are expanded" in expanded.text
    for bad in (b"not json", b'{"query": 5}', b"[]"):
        answer = httpx.post(url, content=bad, headers={"Content-Type": "application/json"})
        assert answer.status_code == 400, bad
    nested = "{ models " + "{ files " * 300 + "{ path }" + " }" * 301
    assert httpx.post(url, json={"query": nested}).status_code == 400


def test_graphql_stops_a_query_past_its_time(tmp_path):
    from obert_modifiers.zoo.graphql_api import execute
    from obert_modifiers.zoo.service import Hub
    from obert_modifiers.zoo.store import open_store

    hub = Hub(Database(f"sqlite:///{tmp_path / 'hub.db'}"), open_store(str(tmp_path / "store")))
    assert execute(hub, "http://hub", MODELS_QUERY)["data"] == {"models": []}
    late = execute(hub, "http://hub", MODELS_QUERY, max_seconds=-1.0)
    assert late["data"] is None and "ran longer" in late["errors"][0]["message"]


# ------------------------------------------------------------- refused commit, logs under serve


def test_a_publish_refused_at_commit_leaves_no_blob_behind(tmp_path):
    server = start_hub(tmp_path / "hub")
    try:
        other = Database(server.db_url).create_token("bob")
        loser = _files(tmp_path, STUB, seed=1, display_name="loser")
        winner = _files(tmp_path, STUB, seed=2, display_name="winner")
        manifest = _manifest(STUB, loser)
        body, content_type = _multipart(manifest, [(sha(d), d) for d in loser.values()])
        card_sha = sha(loser["model.md"])
        split = body.index(loser["deployment/model.onnx"])  # the card part is sent, the ONNX waits
        go, answers = threading.Event(), {}

        def slow_body() -> Iterator[bytes]:
            yield body[:split]
            go.wait(30)
            yield body[split:]

        def publish_slowly() -> None:
            answers["loser"] = httpx.post(
                f"{server.url}{API}/models",
                content=slow_body(),
                headers={"Authorization": f"Bearer {server.token}", "Content-Type": content_type},
                timeout=60,
            )

        thread = threading.Thread(target=publish_slowly)
        thread.start()
        staging = server.store / "staging"
        deadline = time.monotonic() + 20
        while not any(staging.rglob(card_sha)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert any(staging.rglob(card_sha)), "the loser's manifest and card did not arrive"
        # the winner (another owner) publishes the stub while the loser is still uploading
        body2, type2 = _multipart(_manifest(STUB, winner), [(sha(d), d) for d in winner.values()])
        won = httpx.post(
            f"{server.url}{API}/models", content=body2,
            headers={"Authorization": f"Bearer {other}", "Content-Type": type2},
        )  # fmt: skip
        assert won.status_code == 201, won.text
        go.set()
        thread.join(60)
        assert answers["loser"].status_code == 403, answers["loser"].text
        blobs = {p.name for p in (server.store / "blobs").rglob("*") if p.is_file()}
        assert blobs == {f["sha256"] for f in won.json()["files"]}  # no unreferenced blob
        assert not {sha(d) for d in loser.values()} & blobs
    finally:
        server.stop()


def test_obert_zoo_serve_logs_the_hubs_refusals(tmp_path):
    from obert_modifiers.zoo.local import free_port

    port = free_port()
    log = tmp_path / "serve.err"
    with open(log, "w") as err:
        process = subprocess.Popen(
            [sys.executable, "-m", "obert_modifiers.cli", "zoo", "serve", "--db",
             f"sqlite:///{tmp_path / 'hub.db'}", "--store", str(tmp_path / "store"), "--port", str(port)],
            stdout=subprocess.DEVNULL,
            stderr=err,
        )  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}{API}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        refused = httpx.delete(f"{url}{API}/models/abc", headers={"Authorization": "Bearer obh_forged"})
        assert refused.status_code == 401
        evil = httpx.get(f"{url}{API}/resolve", params={"stub": STUB + "\nINFO: forged line"})
        assert evil.status_code == 422
        deadline = time.monotonic() + 10
        while "invalid or revoked token" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        process.terminate()
        process.wait(10)
    text = log.read_text()
    assert "refused DELETE /api/v1/models/abc: HTTP 401: invalid or revoked token" in text, text
    assert "obert_modifiers.zoo" in text
    assert "\nINFO: forged line" not in text and "\\nINFO: forged line" in text  # one line per refusal


def test_hub_answers_of_the_wrong_shape_for_push_search_delete_are_one_line(tmp_path):
    deployment = make_deployment(tmp_path / "deployment")

    def publish_answers(record) -> Callable:
        def respond(handler: BaseHTTPRequestHandler, length: int) -> Answer:
            handler.rfile.read(length)
            if handler.path == f"{API}/publish/check":
                return _json({"ok": True, "stub": STUB, "missing": []})
            return 201, {"Content-Type": "application/json"}, json.dumps(record).encode()

        return respond

    for record, named in (
        ({}, "model id"),
        ({"id": MODEL_ID, "stub": STUB + "\x1b[2J"}, "stub"),
        ({"id": MODEL_ID, "stub": STUB.replace("pruned60", "pruned61"), "files": []}, "another stub"),
        ({"id": MODEL_ID, "stub": STUB, "files": "x"}, "file list"),
    ):
        with hostile_hub(publish_answers(record)) as url:
            with pytest.raises(HubClientError, match=named):
                push(deployment, STUB, url, "obh_token", progress=False)
    escape = {"id": MODEL_ID, "stub": STUB + "\x1b]0;owned\x07", "total_bytes": 1}
    for answer in (
        {"total": 1, "models": [escape]},
        {"total": 1, "models": [{"id": MODEL_ID, "stub": STUB, "total_bytes": "1"}]},
        {"total": "1", "models": []},
        {"total": 1, "models": [{"id": MODEL_ID, "stub": STUB, "total_bytes": 1, "sparsity": "high"}]},
    ):
        with hostile_hub(lambda h, n, a=answer: _json(a)) as url:
            done = _obert("zoo", "search", "--url", url)
        assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
        assert len(done.stderr.strip().splitlines()) == 1 and "\x1b" not in done.stdout + done.stderr

    def delete_answers(handler: BaseHTTPRequestHandler, _length: int) -> Answer:
        if handler.path.startswith(f"{API}/resolve"):
            return _json({"id": MODEL_ID, "stub": STUB, "files": [good_file()]})
        return _json({"deleted": None})

    with hostile_hub(delete_answers) as url:
        done = _obert("zoo", "delete", STUB, "--url", url, "--token", "obh_x")
    assert done.returncode == 1 and "Traceback" not in done.stderr and "deleted=None" in done.stderr


def test_the_server_refuses_odd_ids_queries_and_cards_without_a_5xx(hub, tmp_path):
    for model_id in ("%00", "a%0A", "x" * 200, "..%2F..%2Fetc"):
        for suffix in ("", "/card", "/files/model.md"):
            answer = httpx.get(f"{hub.url}{API}/models/{model_id}{suffix}")
            assert answer.status_code == 404, (model_id, suffix, answer.status_code)
        assert httpx.get(f"{hub.url}/models/{model_id}").status_code == 404
    for params in ({"q": "a\x00b"}, {"task": "x\ny"}, {"dataset": "\x7f"}):
        assert httpx.get(f"{hub.url}{API}/models", params=params).status_code == 422, params
    stub = STUB.replace("pruned60", "pruned62")
    files = _files(tmp_path, stub)
    files["model.md"] = files["model.md"].replace(b"# tiny", b"# ti\x00ny")
    body, content_type = _multipart(_manifest(stub, files), [(sha(d), d) for d in files.values()])
    headers = {"Authorization": f"Bearer {hub.token}", "Content-Type": content_type}
    refused = httpx.post(f"{hub.url}{API}/models", content=body, headers=headers)
    assert refused.status_code == 422 and "control character" in refused.text


def test_a_repull_never_removes_files_the_pull_did_not_write(hub, tmp_path):
    stub = STUB.replace("pruned60", "pruned63")
    first = push(make_deployment(tmp_path / "a", seed=1), stub, hub.url, hub.token, progress=False)
    out = tmp_path / "out"
    pull(stub, hub.url, out=out, cache=tmp_path / "cache", progress=False)
    mine = out / "deployment" / "my-notes.txt"
    mine.write_text("mine")
    second = push(make_deployment(tmp_path / "b", seed=2), stub, hub.url, hub.token, progress=False)
    assert second["id"] != first["id"]
    with pytest.raises(HubClientError, match="deployment/my-notes.txt"):
        pull(stub, hub.url, out=out, cache=tmp_path / "cache", progress=False)
    assert mine.read_text() == "mine"
    mine.unlink()
    pulled = pull(stub, hub.url, out=out, cache=tmp_path / "cache", progress=False)
    assert json.loads((out / ".obert-hub.json").read_text())["id"] == second["id"]
    assert (pulled / "model.onnx").read_bytes() == (tmp_path / "b" / "model.onnx").read_bytes()
    done = _obert("zoo", "pull", stub, "--url", hub.url, "--out", str(tmp_path / "ro" / "x"),
                  env={"OBERT_HUB_CACHE": str(tmp_path / "cache")})  # fmt: skip
    assert done.returncode == 0, done.stderr
    (tmp_path / "locked").mkdir(mode=0o500)
    if os.geteuid() != 0:  # root writes anywhere
        denied = _obert("zoo", "pull", stub, "--url", hub.url, "--out", str(tmp_path / "locked" / "x"))
        assert denied.returncode == 1 and "Traceback" not in denied.stderr and "ermission" in denied.stderr


def test_token_names_with_control_characters_are_refused_in_one_line(tmp_path):
    db = f"sqlite:///{tmp_path / 'hub.db'}"
    for name in ("alice\nINFO: forged", "bob\x7f", "\x1b[31mred"):
        done = _obert("zoo", "token", "create", name, "--db", db)
        assert done.returncode == 1 and "control character" in done.stderr and "Traceback" not in done.stderr
    assert _obert("zoo", "token", "create", "carol", "--db", db).stdout.startswith("obh_")
