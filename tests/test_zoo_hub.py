"""The hub server as a subprocess on loopback (temporary SQLite + directory store), used over HTTP:
publish, search, pull, delete, tokens, refusals, atomic and concurrent publishes, resume."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from obert_modifiers.testing.hub_fixtures import make_deployment, make_onnx, make_training
from obert_modifiers.zoo.card import ModelCard, render_card
from obert_modifiers.zoo.client import HubClientError, delete, pull, push, resolve, search
from obert_modifiers.zoo.local import free_port, local_hub, start_hub

pytestmark = pytest.mark.integration

STUB = "zoo:nlp/text_classification/bert-tiny/pytorch/huggingface/rotten_tomatoes/pruned50-none"
LIMITS = ["--max-file-bytes", "8000000", "--max-upload-bytes", "20000000", "--gc-grace-seconds", "0"]
API = "/api/v1"


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    # SQLite by default; OBERT_HUB_TEST_DB=postgresql+psycopg://... runs these tests on PostgreSQL
    server = start_hub(
        tmp_path_factory.mktemp("hub"), extra_args=LIMITS, db_url=os.environ.get("OBERT_HUB_TEST_DB")
    )
    yield server
    server.stop()


@pytest.fixture(scope="module")
def deployment(tmp_path_factory) -> Path:
    return make_deployment(tmp_path_factory.mktemp("models") / "deployment")


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def auth(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def minimal_files(stub: str, tmp: Path, **card: str) -> dict[str, bytes]:
    """The two files a publish needs: a valid card for ``stub`` and a model.onnx."""
    text = render_card(
        ModelCard(
            domain="nlp",
            sub_domain="text_classification",
            architecture="bert",
            task="text-classification",
            **card,
        ),
        "# tiny\n",
    )
    onnx_path = make_onnx(tmp / f"m-{os.getpid()}-{time.monotonic_ns()}.onnx")
    return {"model.md": text.encode(), "deployment/model.onnx": onnx_path.read_bytes()}


def multipart(manifest: dict, parts: list[tuple[str, bytes]]) -> tuple[bytes, str]:
    boundary = "obert-test-boundary"
    body = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="manifest"\r\n\r\n'.encode()
        + json.dumps(manifest).encode()
        + b"\r\n"
    )
    for filename, data in parts:
        body += (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; '
            f'filename="{filename}"\r\n\r\n'.encode()
            + data
            + b"\r\n"
        )
    body += f"--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def manifest_for(stub: str, files: dict[str, bytes]) -> dict:
    return {"stub": stub, "files": [{"path": p, "size": len(d), "sha256": sha(d)} for p, d in files.items()]}


def raw_publish(
    hub, manifest: dict, parts: list[tuple[str, bytes]], token: str | None = None
) -> httpx.Response:
    body, content_type = multipart(manifest, parts)
    return httpx.post(
        f"{hub.url}{API}/models",
        content=body,
        timeout=30,
        headers={**auth(token or hub.token), "Content-Type": content_type},
    )


def visible(hub, stub: str) -> bool:
    return httpx.get(f"{hub.url}{API}/resolve", params={"stub": stub}).status_code == 200


def test_publish_search_pull_delete(hub, deployment, tmp_path):
    training = make_training(tmp_path / "training")
    record = push(
        deployment,
        STUB,
        hub.url,
        hub.token,
        training=training,
        progress=False,
        display_name="tiny test model",
    )
    paths = {f["path"]: f for f in record["files"]}
    assert {
        "model.md",
        "deployment/model.onnx",
        "deployment/export.json",
        "training/config.json",
        "training/model.safetensors",
        "recipe.md",
        "sparsity.png",
    } <= set(paths)
    for path, entry in paths.items():
        local = (deployment / path.split("/", 1)[1]) if path.startswith("deployment/") else None
        if local is not None:
            assert entry["sha256"] == sha(local.read_bytes()) and entry["size"] == local.stat().st_size
    assert record["card"]["stub"] == STUB and record["card"]["display_name"] == "tiny test model"

    for filters in (
        {"task": "text-classification"},
        {"task": "text_classification"},
        {"architecture": "bert"},
        {"dataset": "rotten_tomatoes"},
        {"sparse_tag": "pruned50-none"},
        {"domain": "nlp"},
    ):
        assert [m["stub"] for m in search(url=hub.url, **filters)["models"]] == [STUB], filters
    assert search("tiny test", url=hub.url)["total"] == 1
    assert search("no-such-words", url=hub.url)["total"] == 0
    assert search(url=hub.url, dataset="imdb")["total"] == 0

    card = httpx.get(f"{hub.url}{API}/models/{record['id']}/card")
    assert card.status_code == 200 and card.text.startswith("---\n") and "## Sparsity" in card.text

    cache = tmp_path / "cache"
    path = pull(STUB, hub.url, out=tmp_path / "pulled", cache=cache, progress=False)
    assert path == tmp_path / "pulled" / "training"  # the Hugging Face folder, for --model_name_or_path
    for rel, entry in paths.items():
        assert sha((tmp_path / "pulled" / rel).read_bytes()) == entry["sha256"], rel
    blobs = {p.name for p in (cache / "blobs").rglob("*") if p.is_file() and len(p.name) == 64}
    assert blobs == {f["sha256"] for f in record["files"]}  # cache keyed by checksum
    # a second pull of the same model is served from the cache and the existing folder
    assert pull(STUB, hub.url, out=tmp_path / "pulled", cache=cache, progress=False) == path
    # a tool that rewrites a pulled file in place does not poison the cache for the next pull
    with open(tmp_path / "pulled" / "deployment" / "model.onnx", "r+b") as handle:
        handle.write(b"garbage")
    again = pull(STUB, hub.url, out=tmp_path / "pulled-again", cache=cache, progress=False).parent
    assert sha((again / "deployment" / "model.onnx").read_bytes()) == paths["deployment/model.onnx"]["sha256"]

    # content the hub already has is not sent again: a manifest alone publishes a copy
    copy_stub = STUB.replace("pruned50", "pruned59")
    manifest = {
        "stub": copy_stub,
        "files": [{k: f[k] for k in ("path", "size", "sha256")} for f in record["files"]],
    }
    check = httpx.post(f"{hub.url}{API}/publish/check", json=manifest, headers=auth(hub.token))
    assert check.status_code == 200 and check.json()["missing"] == []
    card_text = render_card(
        ModelCard(**{**record["card"], "stub": copy_stub, "sparse_tag": "pruned59-none"}), "# c\n"
    )
    card_entry = next(f for f in manifest["files"] if f["path"] == "model.md")
    card_entry.update(size=len(card_text.encode()), sha256=sha(card_text.encode()))
    copied = raw_publish(hub, manifest, [(card_entry["sha256"], card_text.encode())])
    assert copied.status_code == 201, copied.text
    assert delete(copy_stub, hub.url, hub.token)["deleted"] == copy_stub

    assert delete(STUB, hub.url, hub.token)["deleted"] == STUB
    assert not visible(hub, STUB)
    with pytest.raises(HubClientError, match="unknown stub"):
        pull(STUB, hub.url, out=tmp_path / "again", cache=cache, progress=False)
    stored = {p.name for p in (hub.store / "blobs").rglob("*") if p.is_file()}
    assert not stored & {f["sha256"] for f in record["files"]}  # unreferenced blobs are removed


def test_tokens_and_ownership(hub, deployment, tmp_path):
    stub = STUB.replace("pruned50", "pruned51")
    files = minimal_files(stub, tmp_path)
    manifest = manifest_for(stub, files)
    body, content_type = multipart(manifest, [(sha(d), d) for d in files.values()])
    no_token = httpx.post(f"{hub.url}{API}/models", content=body, headers={"Content-Type": content_type})
    assert no_token.status_code == 401 and "write token" in no_token.json()["detail"]
    bad = raw_publish(hub, manifest, [(sha(d), d) for d in files.values()], token="obh_not-a-token")
    assert bad.status_code == 401 and "invalid or revoked token" in bad.json()["detail"]
    with pytest.raises(HubClientError, match="refused the token"):
        push(deployment, stub, hub.url, "obh_wrong", progress=False)
    assert not visible(hub, stub)

    assert raw_publish(hub, manifest, [(sha(d), d) for d in files.values()]).status_code == 201
    # a second owner, created on the server side with the real CLI
    created = subprocess.run(
        [
            sys.executable,
            "-m",
            "obert_modifiers.cli",
            "zoo",
            "token",
            "create",
            "mallory",
            "--db",
            hub.db_url,
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert created.returncode == 0, created.stderr
    other = json.loads(created.stdout)["token"]
    model_id = resolve(stub, hub.url)["id"]
    forbidden = httpx.delete(f"{hub.url}{API}/models/{model_id}", headers=auth(other))
    assert forbidden.status_code == 403 and "only its owner" in forbidden.json()["detail"]
    replace = raw_publish(hub, manifest, [(sha(d), d) for d in files.values()], token=other)
    assert replace.status_code == 403
    # reads are public
    assert httpx.get(f"{hub.url}{API}/models/{model_id}").status_code == 200
    assert httpx.delete(f"{hub.url}{API}/models/{model_id}", headers=auth(hub.token)).status_code == 200


def test_refuses_traversal_oversize_and_bad_checksums(hub, tmp_path):
    stub = STUB.replace("pruned50", "pruned52")
    files = minimal_files(stub, tmp_path)
    good_parts = [(sha(d), d) for d in files.values()]

    for evil in ("../evil.txt", "deployment/../../hub.db", "/etc/passwd", "deployment\\..\\x", ".git/config"):
        manifest = manifest_for(stub, {**files, evil: b"x"})
        check = httpx.post(f"{hub.url}{API}/publish/check", json=manifest, headers=auth(hub.token))
        assert check.status_code == 422, evil
        response = raw_publish(hub, manifest, good_parts + [(sha(b"x"), b"x")])
        assert response.status_code == 422 and "refused" in response.json()["detail"], evil
    # a file part whose name is not a manifest checksum (e.g. a path) is refused
    response = raw_publish(hub, manifest_for(stub, files), [("../../outside", b"data")] + good_parts)
    assert response.status_code == 400 and "not the sha256" in response.json()["detail"]
    # downloads cannot reach outside a model either
    for path in ("..%2F..%2Fhub.db", "../../hub.db", "%2e%2e/%2e%2e/hub.db"):
        assert httpx.get(f"{hub.url}{API}/models/x/files/{path}").status_code == 404

    big = {**files, "deployment/weights.bin": b""}
    manifest = manifest_for(stub, big)
    manifest["files"][-1]["size"] = 9_000_000  # over --max-file-bytes 8000000
    check = httpx.post(f"{hub.url}{API}/publish/check", json=manifest, headers=auth(hub.token))
    assert check.status_code == 413 and "per-file limit" in check.json()["detail"]
    assert raw_publish(hub, manifest, good_parts).status_code == 413
    # a declared Content-Length over the limit is refused before any byte of the body is read
    port = int(hub.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as connection:
        connection.sendall(
            (
                f"POST {API}/models HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {hub.token}"
                "\r\nContent-Type: multipart/form-data; boundary=b\r\nContent-Length: 99999999999"
                "\r\n\r\n"
            ).encode()
        )
        assert connection.recv(200).startswith(b"HTTP/1.1 413")
    # more bytes than the manifest declares
    short = manifest_for(stub, files)
    short["files"][1]["size"] -= 10
    response = raw_publish(hub, short, good_parts)
    assert response.status_code in (400, 422)

    # content that does not match its declared sha256
    tampered = manifest_for(stub, files)
    onnx_sha = tampered["files"][1]["sha256"]
    corrupted = bytearray(files["deployment/model.onnx"])
    corrupted[-1] ^= 0xFF
    response = raw_publish(
        hub, tampered, [(sha(files["model.md"]), files["model.md"]), (onnx_sha, bytes(corrupted))]
    )
    assert response.status_code == 400 and "sha256 mismatch" in response.json()["detail"]
    assert "deployment/model.onnx" in response.json()["detail"]

    # a card that fails the schema, or disagrees with the stub, is refused naming the field
    wrong = minimal_files(stub, tmp_path, dataset="imdb")
    response = raw_publish(hub, manifest_for(stub, wrong), [(sha(d), d) for d in wrong.values()])
    assert response.status_code == 422 and "'dataset'" in response.json()["detail"]
    bad_card = {**files, "model.md": b"---\ndomain: nlp\nsub_domain: x\narchitecture: bert\n---\n"}
    response = raw_publish(hub, manifest_for(stub, bad_card), [(sha(d), d) for d in bad_card.values()])
    assert response.status_code == 422 and "field 'task'" in response.json()["detail"]

    assert not visible(hub, stub)
    assert list((hub.store / "staging").iterdir()) == []


def _start_partial_upload(hub, stub: str, tmp_path: Path) -> socket.socket:
    files = minimal_files(stub, tmp_path)
    files["deployment/weights.bin"] = os.urandom(3_000_000)
    body, content_type = multipart(manifest_for(stub, files), [(sha(d), d) for d in files.values()])
    port = int(hub.url.rsplit(":", 1)[1])
    connection = socket.create_connection(("127.0.0.1", port))
    head = (
        f"POST {API}/models HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {hub.token}\r\n"
        f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    connection.sendall(head.encode() + body[: len(body) // 2])
    return connection


def _wait_for(predicate, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def test_killed_upload_leaves_nothing_and_orphans_are_cleaned(tmp_path):
    root = tmp_path / "hub"
    server = start_hub(root, extra_args=LIMITS)
    staging = server.store / "staging"
    stub = STUB.replace("pruned50", "pruned53")
    try:
        # the client dies midway: the server drops the upload at once
        connection = _start_partial_upload(server, stub, tmp_path)
        assert _wait_for(lambda: len(list(staging.iterdir())) == 1)
        connection.close()
        assert _wait_for(lambda: list(staging.iterdir()) == [])
        assert not visible(server, stub)

        # the server dies midway: the leftovers are removed by the next start
        connection = _start_partial_upload(server, stub, tmp_path)
        assert _wait_for(
            lambda: any((d / "blobs").exists() or len(list(d.iterdir())) > 1 for d in staging.iterdir())
        )
        server.process.kill()
        server.process.wait(10)
        connection.close()
        leftovers = list(staging.iterdir())
        assert len(leftovers) == 1 and any(p.name != ".lock" for p in leftovers[0].iterdir())
    finally:
        server.stop()
    restarted = start_hub(root, extra_args=LIMITS)
    try:
        assert list(staging.iterdir()) == []
        assert not visible(restarted, stub)
        assert search(url=restarted.url)["total"] == 0
        assert [p for p in (restarted.store / "blobs").rglob("*") if p.is_file()] == []
    finally:
        restarted.stop()


def test_concurrent_publishes_of_one_stub_end_with_one_complete_model(hub, tmp_path):
    stub = STUB.replace("pruned50", "pruned54")
    versions = {}
    for index in range(3):
        folder = make_deployment(tmp_path / f"v{index}", seed=index + 10, pad_bytes=300_000 + 4000 * index)
        versions[f"v{index}"] = sha((folder / "model.onnx").read_bytes())
    barrier = threading.Barrier(3)
    errors: list[BaseException] = []

    def publish(name: str) -> None:
        try:
            barrier.wait()
            push(tmp_path / name, stub, hub.url, hub.token, progress=False, display_name=name)
        except BaseException as error:  # noqa: BLE001 - collected and asserted below
            errors.append(error)

    threads = [threading.Thread(target=publish, args=(name,)) for name in versions]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert errors == []
    record = resolve(stub, hub.url)
    winner = record["card"]["display_name"]
    files = {f["path"]: f["sha256"] for f in record["files"]}
    assert files["deployment/model.onnx"] == versions[winner]  # not a mix
    assert record["card"]["size"]["onnx_bytes"] == (tmp_path / winner / "model.onnx").stat().st_size
    out = pull(stub, hub.url, out=tmp_path / "pulled", cache=tmp_path / "cache", progress=False).parent
    assert sha((out / "deployment/model.onnx").read_bytes()) == versions[winner]
    assert search(url=hub.url, sparse_tag="pruned54-none")["total"] == 1
    delete(stub, hub.url, hub.token)


def test_range_requests_and_resumed_downloads(hub, deployment, tmp_path):
    stub = STUB.replace("pruned50", "pruned55")
    big = make_deployment(tmp_path / "big", pad_bytes=2_000_000)
    record = push(big, stub, hub.url, hub.token, progress=False)
    entry = next(f for f in record["files"] if f["path"] == "deployment/model.onnx")
    content = (big / "model.onnx").read_bytes()

    head = httpx.head(entry["url"])
    assert head.status_code == 200 and int(head.headers["content-length"]) == len(content)
    assert head.headers["accept-ranges"] == "bytes" and head.headers["x-checksum-sha256"] == entry["sha256"]
    part = httpx.get(entry["url"], headers={"Range": "bytes=100-199"})
    assert part.status_code == 206 and part.content == content[100:200]
    # sparsezoo's downloader asks for one byte past the end: served, clamped
    assert httpx.get(entry["url"], headers={"Range": f"bytes=0-{len(content)}"}).content == content

    cache = tmp_path / "cache"
    blob_dir = cache / "blobs" / entry["sha256"][:2]
    blob_dir.mkdir(parents=True)
    (blob_dir / f"{entry['sha256']}.partial").write_bytes(content[:1_000_000])  # an interrupted download
    out = pull(stub, hub.url, out=tmp_path / "resumed", cache=cache, progress=False).parent
    assert sha((out / "deployment/model.onnx").read_bytes()) == entry["sha256"]
    assert not (blob_dir / f"{entry['sha256']}.partial").exists()

    cache2 = tmp_path / "cache2"
    blob_dir2 = cache2 / "blobs" / entry["sha256"][:2]
    blob_dir2.mkdir(parents=True)
    (blob_dir2 / f"{entry['sha256']}.partial").write_bytes(b"\0" * 1000)  # a corrupted partial download
    with pytest.raises(HubClientError, match="sha256 mismatch"):
        pull(stub, hub.url, out=tmp_path / "corrupt", cache=cache2, progress=False)
    assert not (blob_dir2 / f"{entry['sha256']}.partial").exists()
    assert not (tmp_path / "corrupt").exists()  # nothing half-written
    out = pull(stub, hub.url, out=tmp_path / "corrupt", cache=cache2, progress=False).parent
    assert sha((out / "deployment/model.onnx").read_bytes()) == entry["sha256"]
    delete(stub, hub.url, hub.token)


def test_clear_client_errors(hub, tmp_path):
    with pytest.raises(HubClientError, match=r"unknown stub zoo:nlp/.*/nothing-none"):
        pull(STUB.replace("pruned50-none", "nothing-none"), hub.url, out=tmp_path / "x", progress=False)
    down = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(HubClientError, match="cannot reach the hub"):
        pull(STUB, down, progress=False)
    with pytest.raises(HubClientError, match="no hub URL"):
        os.environ.pop("OBERT_HUB_URL", None)
        os.environ.pop("SPARSEZOO_API_URL", None)
        search()
    with pytest.raises(Exception, match="invalid stub"):
        pull("zoo:not/a/stub", hub.url)


def test_cli_push_search_pull_delete(hub, deployment, tmp_path):
    stub = STUB.replace("pruned50", "pruned56")
    env = {
        **os.environ,
        "OBERT_HUB_URL": hub.url,
        "OBERT_HUB_TOKEN": hub.token,
        "OBERT_HUB_CACHE": str(tmp_path / "cache"),
    }

    def obert(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "obert_modifiers.cli", *args],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
        )

    pushed = obert("zoo", "push", str(deployment), "--stub", stub)
    assert pushed.returncode == 0 and f"published {stub}" in pushed.stdout, pushed.stderr
    found = obert("zoo", "search", "--sparse-tag", "pruned56-none", "--json")
    assert [m["stub"] for m in json.loads(found.stdout)["models"]] == [stub]
    pulled = obert("zoo", "pull", stub, "--out", str(tmp_path / "m"))
    assert pulled.returncode == 0 and Path(pulled.stdout.strip()) == tmp_path / "m" / "deployment"
    unknown = obert("zoo", "pull", stub.replace("pruned56", "pruned99"))
    assert unknown.returncode == 1 and "unknown stub" in unknown.stderr and "Traceback" not in unknown.stderr
    deleted = obert("zoo", "delete", stub)
    assert deleted.returncode == 0 and not visible(hub, stub)


def test_graphql_answers_the_sparsezoo_query(hub, deployment, tmp_path):
    from sparsezoo.api.query_parser import QueryParser
    from sparsezoo.model.utils import get_model_metadata_from_stub

    stub = STUB.replace("pruned50", "pruned57")
    push(
        deployment,
        stub,
        hub.url,
        hub.token,
        progress=False,
        metrics={"accuracy": 0.8},
        latency=[{"engine": "onnxruntime", "median_ms": 2.0, "items_per_second": 500.0}],
    )
    # the exact query text the sparsezoo 1.8.1 client builds for a stub
    query = QueryParser(
        operation_body="models",
        arguments=get_model_metadata_from_stub(stub[4:]),
        fields=[
            "model_id",
            "model_onnx_size_compressed_bytes",
            "files(version: 2)",
            "benchmark_results",
            "training_results",
            "repo_name",
            "repo_namespace",
        ],
    ).query_body
    data = httpx.post(f"{hub.url}/v2/graphql", json={"query": query}).json()
    assert "errors" not in data
    [model] = data["data"]["models"]
    types = {(f["displayName"], f["fileType"]) for f in model["files"]}
    assert {
        ("model.onnx", "onnx"),
        ("model.md", "card"),
        ("recipe.md", "recipe"),
        ("config.json", "deployment"),
        ("vocab.txt", "deployment"),
    } <= types
    assert model["trainingResults"][0]["recordedValue"] == 0.8
    assert model["benchmarkResults"][0]["recordedValue"] == 500.0
    assert model["modelOnnxSizeCompressedBytes"] == (deployment / "model.onnx").stat().st_size
    none = httpx.post(
        f"{hub.url}/v2/graphql", json={"query": '{ models(sparseTag: "nope") { modelId } }'}
    ).json()
    assert none == {"data": {"models": []}}
    broken = httpx.post(f"{hub.url}/v2/graphql", json={"query": "{ models(nope: 1) { modelId } }"})
    assert broken.status_code == 400 and "nope" in broken.json()["errors"][0]["message"]
    delete(stub, hub.url, hub.token)


def test_published_files_cannot_run_in_the_browser(hub, tmp_path):
    stub = STUB.replace("pruned50", "pruned58")
    files = minimal_files(stub, tmp_path)
    files["deployment/notes.html"] = b"<script>alert(document.cookie)</script>"
    files["deployment/logo.svg"] = b"<svg xmlns='http://www.w3.org/2000/svg'><script>alert(1)</script></svg>"
    response = raw_publish(hub, manifest_for(stub, files), [(sha(d), d) for d in files.values()])
    assert response.status_code == 201
    urls = {f["path"]: f["url"] for f in response.json()["files"]}
    for path in ("deployment/notes.html", "deployment/logo.svg"):
        served = httpx.get(urls[path])
        assert served.headers["content-type"] == "application/octet-stream"
        assert served.headers["content-disposition"].startswith("attachment")
        assert (
            served.headers["x-content-type-options"] == "nosniff"
            and "sandbox" in served.headers["content-security-policy"]
        )
    card = httpx.get(urls["model.md"])
    assert card.headers["content-type"].startswith("text/plain") and card.content == files["model.md"]
    delete(stub, hub.url, hub.token)


def test_local_hub_starts_and_stops_a_server(tmp_path, monkeypatch):
    with local_hub(tmp_path / "hub") as server:
        assert server.token.startswith("obh_") and server.url.startswith("http://127.0.0.1:")
        assert httpx.get(f"{server.url}{API}/health").json()["status"] == "ok"
        monkeypatch.setenv("OBERT_HUB_URL", server.url)  # the default hub for the client
        assert search()["total"] == 0
    assert server.process.poll() is not None
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{server.url}{API}/health")


def test_roundtrip_publishes_and_pulls_back(hub, deployment, tmp_path):
    from obert_modifiers.zoo import roundtrip

    result = roundtrip(deployment, STUB, tmp_path, progress=False, dataset="rotten_tomatoes")
    assert result["stub"] == STUB and result["pulled"] == tmp_path / "pulled" / "deployment"
    assert (result["pulled"] / "model.onnx").read_bytes() == (deployment / "model.onnx").read_bytes()
    # a pulled (zoo-layout) folder can be published again under another stub: its card follows the stub
    other = STUB.replace("rotten_tomatoes", "sst2")
    record = push(tmp_path / "pulled", other, hub.url, hub.token, progress=False)
    assert record["card"]["stub"] == other and record["card"]["dataset"] == "sst2"
    card_text = httpx.get(f"{hub.url}{API}/models/{record['id']}/card").text
    assert f"obert zoo pull {other}" in card_text and STUB not in card_text
    assert {f["path"] for f in record["files"]} == {
        p.relative_to(tmp_path / "pulled").as_posix()
        for p in (tmp_path / "pulled").rglob("*")
        if p.is_file() and not p.name.startswith(".")
    }
    delete(other, hub.url, hub.token)


def test_push_refuses_a_model_changed_since_export(hub, tmp_path):
    """export.json records the sha256 of the model.onnx the parity check ran on; a file rewritten
    since (as DeepSparse's shape overrides used to do) is refused before anything is uploaded."""
    folder = make_deployment(tmp_path / "changed", seed=7)
    stub = STUB.replace("pruned50-none", "changed-none")
    onnx_path = folder / "model.onnx"
    onnx_path.write_bytes(onnx_path.read_bytes() + b"\0")
    with pytest.raises(HubClientError, match=r"model\.onnx: changed since it was exported"):
        push(folder, stub, hub.url, hub.token, progress=False)
    with pytest.raises(HubClientError, match="unknown stub"):
        resolve(stub, hub.url)
    # the unchanged file publishes
    make_deployment(folder, seed=7)
    assert push(folder, stub, hub.url, hub.token, progress=False)["stub"] == stub
    delete(stub, hub.url, hub.token)


def test_obert_zoo_serve_command(tmp_path, deployment):
    db_url = f"sqlite:///{tmp_path / 'hub.db'}"
    cli = [sys.executable, "-m", "obert_modifiers.cli", "zoo"]
    token = subprocess.run(
        [*cli, "token", "create", "ci", "--db", db_url], capture_output=True, text=True, timeout=120
    )
    assert token.returncode == 0 and token.stdout.strip().startswith("obh_"), token.stderr
    refused = subprocess.run(
        [*cli, "serve", "--db", db_url, "--store", "s3://bucket/models"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    # no endpoint and no credentials here: refused at start with the store URL named (S3 itself is
    # tested against a loopback S3 server in tests/test_zoo_s3.py)
    assert refused.returncode == 1 and "s3://bucket/models" in refused.stderr, refused.stderr[-2000:]
    port = free_port()
    server = subprocess.Popen(
        [*cli, "serve", "--db", db_url, "--store", str(tmp_path / "store"), "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        assert _wait_for(lambda: _up(url), timeout=60)
        record = push(deployment, STUB, url, token.stdout.strip(), progress=False)
        assert record["owner"] == "ci" and resolve(STUB, url)["owner"] == "ci"
    finally:
        server.terminate()
        server.wait(10)


def _up(url: str) -> bool:
    try:
        return httpx.get(f"{url}{API}/health", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False
