"""The hub with the clients it must serve: the real sparsezoo 1.8.1 client and a DeepSparse pipeline
(``SPARSEZOO_API_URL`` pointing at the hub), Hugging Face loading of a pulled model, the web pages in
headless Chromium, and an API fuzz run (schemathesis) that must find no 5xx."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from obert_modifiers.testing.hub_fixtures import RECIPE, make_tiny_bert_folders
from obert_modifiers.zoo.client import pull, push
from obert_modifiers.zoo.local import start_hub

pytestmark = pytest.mark.integration

STUB = "zoo:nlp/text_classification/bert-tiny/pytorch/huggingface/bbc_news/base-none"
CHROMIUM = "/usr/bin/chromium"
SEQ = 32


def build_real_model(root: Path) -> Path:
    """A zoo-layout folder: training/ (tiny random BERT classifier, the stock trainer's file set, and
    a recipe) and deployment/ (its ONNX export with config and tokenizer)."""
    _deployment, training = make_tiny_bert_folders(root, SEQ)
    (training / "recipe.yaml").write_text(RECIPE)
    return root


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    root = tmp_path_factory.mktemp("compat")
    folder = build_real_model(root / "model")
    hub = start_hub(root / "hub")
    try:
        record = push(
            folder,
            STUB,
            hub.url,
            hub.token,
            progress=False,
            display_name="Tiny BBC news classifier",
            metrics={"accuracy": 0.91},
            dense_metrics={"accuracy": 0.93},
            latency=[{"engine": "deepsparse", "median_ms": 0.5}, {"engine": "onnxruntime", "median_ms": 0.9}],
        )
        yield hub, record, folder, root
    finally:
        hub.stop()


def test_sparsezoo_client_and_deepsparse_pipeline_resolve_the_stub(published):
    hub, record, folder, root = published
    code = f"""
import json, os, hashlib
import sparsezoo
model = sparsezoo.Model({STUB!r})
assert model.download() is True
names = sorted(os.listdir(model._path))
onnx_sha = hashlib.sha256(open(model.onnx_model.path, "rb").read()).hexdigest()
recipe = open(model.recipes.default.path).read()
from deepsparse import Pipeline
pipeline = Pipeline.create(task="text-classification", model_path={STUB!r}, sequence_length={SEQ})
output = pipeline(sequences=["the central bank raised interest rates again"])
print(json.dumps({{"path": model._path, "names": names, "onnx_sha": onnx_sha, "labels": output.labels,
                  "scores": output.scores, "validation": [r.recorded_value for r in
                                 model.validation_results["validation"]],
                  "card": model.model_card._validate_model_card()["sub_domain"], "recipe": recipe}}))
"""
    env = {
        **os.environ,
        "SPARSEZOO_API_URL": hub.url,
        "SPARSEZOO_MODELS_PATH": str(root / "sparsezoo-cache"),
        "NM_DISABLE_ANALYTICS": "1",
        "HOME": str(root / "home"),
    }
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    files = {f["path"]: f for f in record["files"]}
    assert report["onnx_sha"] == files["deployment/model.onnx"]["sha256"]
    assert {
        "model.onnx",
        "model.md",
        "config.json",
        "tokenizer.json",
        "vocab.txt",
        "pytorch_model.bin",
    } <= set(report["names"])
    assert report["path"].startswith(str(root / "sparsezoo-cache"))
    labels = json.loads((folder / "deployment" / "config.json").read_text())["id2label"].values()
    assert report["labels"][0] in labels and 0.0 < report["scores"][0] <= 1.0
    assert report["validation"] == [0.91] and report["card"] == "text_classification"
    assert "!OBertPruningModifier" in report["recipe"] and report["recipe"].startswith("---")


def test_pulled_training_folder_loads_as_a_hugging_face_model(published, tmp_path):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    hub, record, folder, _root = published
    path = pull(STUB, hub.url, cache=tmp_path / "cache", progress=False)
    assert path.name == "training" and (path / "pytorch_model.bin").is_file()
    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    original = AutoModelForSequenceClassification.from_pretrained(folder / "training").eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    inputs = tokenizer(["markets fell sharply"], return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, original(**inputs).logits)


def test_web_pages_in_headless_chromium(published):
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: apt-get install -y chromium (the browser check needs it)")
    from playwright.sync_api import sync_playwright

    hub, record, _folder, _root = published
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM,
            args=[
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--no-first-run",
            ],
        )
        try:
            page = browser.new_page()
            page.goto(hub.url + "/")
            assert STUB in page.locator("#models").inner_text()
            page.fill("#q", "no such model anywhere")
            page.click("#search-button")
            page.wait_for_load_state()
            assert page.locator("#models tbody tr").count() == 0 and "q=no+such+model" in page.url
            page.fill("#q", "bbc_news")
            page.click("#search-button")
            page.wait_for_load_state()
            assert page.locator("#models tbody tr").count() == 1
            page.click(f"text={STUB}")
            page.wait_for_load_state()
            assert page.locator("#stub").inner_text() == STUB
            card = page.locator("#card")
            assert card.locator("h1").inner_text() == "Tiny BBC news classifier"
            accuracy_row = card.locator("table tr", has_text="accuracy")
            assert "0.9100" in accuracy_row.inner_text() and "0.9300" in accuracy_row.inner_text()
            plot = card.locator("img[alt='latency per engine']")
            assert plot.count() == 1
            # the plot is really loaded and decoded by the browser
            page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=plot.element_handle())
            assert plot.evaluate("img => img.naturalWidth") > 100
            files_table = page.locator("#files").inner_text()
            onnx = next(f for f in record["files"] if f["path"] == "deployment/model.onnx")
            assert "deployment/model.onnx" in files_table and onnx["sha256"] in files_table
        finally:
            browser.close()


def test_card_markdown_cannot_inject_html():
    from obert_modifiers.zoo.web import render_markdown

    html = render_markdown(
        "# t\n<script>alert(1)</script>\n\n[x](javascript:alert(1)) ![p](plot.png)",
        lambda rel: f"/files/{rel}",
    )
    assert "<script>" not in html and "javascript:" not in html and 'src="/files/plot.png"' in html


def test_openapi_fuzz_finds_no_server_errors(published, tmp_path):
    hub, _record, _folder, _root = published
    schema = httpx.get(f"{hub.url}/openapi.json").json()
    assert {"/api/v1/models", "/api/v1/resolve", "/v2/graphql"} <= set(schema["paths"])
    schemathesis = Path(sys.executable).with_name("schemathesis")
    result = subprocess.run(
        [
            str(schemathesis),
            "run",
            f"{hub.url}/openapi.json",
            "--checks",
            "not_a_server_error",
            "-n",
            "10",
            "--max-time",
            "20",
            "--seed",
            "1",
            "--workers",
            "1",
            "--generation-database",
            "none",
            "--no-color",
            "-H",
            f"Authorization: Bearer {hub.token}",
        ],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout[-4000:]
    assert "passed" in result.stdout and "generated" in result.stdout
