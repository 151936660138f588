"""Model cards, stubs, torch-free weight reading: no server involved."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from obert_modifiers.testing.hub_fixtures import make_deployment, make_training
from obert_modifiers.zoo.card import (
    CardError,
    parse_card,
    read_card,
    render_card,
    summarize_recipe,
    validate_card,
    write_card,
)
from obert_modifiers.zoo.protocol import UnsafePathError, check_relative_path
from obert_modifiers.zoo.stubs import StubError, parse_stub

STUB = "zoo:nlp/text_classification/minilm-l6/pytorch/huggingface/rotten_tomatoes/pruned80_quant-none"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_stub_grammar_matches_sparsezoo():
    from sparsezoo.model.utils import get_model_metadata_from_stub

    stub = parse_stub(STUB)
    assert (stub.architecture, stub.sub_architecture, stub.dataset, stub.sparse_tag) == (
        "minilm",
        "l6",
        "rotten_tomatoes",
        "pruned80_quant-none",
    )
    assert str(stub) == STUB and str(parse_stub(STUB[4:] + "?recipe=x")) == STUB
    # the fields the real sparsezoo client sends for the same stub
    theirs = get_model_metadata_from_stub(STUB[4:])
    assert {k: v for k, v in stub.fields().items() if k in theirs} == theirs
    for bad in ("zoo:nlp/x", "zoo:nlp/a/b/c/d/e/../f", "zoo:nlp/a b/c/d/e/f/g", ""):
        with pytest.raises(StubError, match="invalid stub"):
            parse_stub(bad)


@pytest.mark.parametrize(
    "path",
    ["../x", "a/../../b", "/etc/passwd", "a\\b", ".hidden", "a//b", "", "a/./b", "x" * 300, "a\x00b", "-rf"],
)
def test_unsafe_paths_refused(path):
    with pytest.raises(UnsafePathError):
        check_relative_path(path)


def test_card_from_deployment_folder(tmp_path):
    deployment = make_deployment(tmp_path / "dep")
    latency = [
        {
            "engine": "deepsparse",
            "batch_size": 1,
            "sequence_length": 128,
            "median_ms": 0.8,
            "items_per_second": 1200.0,
        },
        {"engine": "onnxruntime", "batch_size": 1, "median_ms": 2.1, "error": None},
    ]
    path = write_card(
        deployment,
        stub=STUB,
        metrics={"accuracy": 0.81},
        dense_metrics={"accuracy": 0.83},
        latency=latency,
        license="Apache-2.0",
    )
    assert path == deployment / "model.md"
    card, body = read_card(path)
    assert (
        card.stub == STUB and card.dataset == "rotten_tomatoes" and card.sparse_tag == "pruned80_quant-none"
    )
    assert card.task == "text-classification" and card.num_layers == 4 and card.quantized is False
    assert card.sparsity.overall == 0.5 and len(card.sparsity.per_layer) == 4
    assert [m.type for m in card.recipe.modifiers] == ["EpochRangeModifier", "OBertPruningModifier"]
    assert card.recipe.modifiers[1].settings["final_sparsity"] == 0.8
    assert [lat.engine for lat in card.latency] == ["deepsparse", "onnxruntime"]
    assert card.metrics[0].dense_value == 0.83
    for section in (
        "## What was done",
        "## Accuracy",
        "## Sparsity",
        "## Size",
        "## Latency",
        "## How to run it",
    ):
        assert section in body
    assert "| accuracy | rotten_tomatoes | 0.8100 | 0.8300 | -0.0200 |" in body
    assert "OBertPruningModifier | 0 → 2 |" in body and "`final_sparsity=0.8`" in body
    assert "![per-layer sparsity](sparsity.png)" in body and "![latency per engine](latency.png)" in body
    for plot in ("sparsity.png", "latency.png"):
        assert (deployment / plot).read_bytes()[:8] == PNG_MAGIC
    # the front matter is what sparsezoo's own card parser reads
    from sparsezoo.objects import File

    parsed = File(name="model.md", path=str(path))._validate_model_card()
    assert parsed["domain"] == "nlp" and parsed["sub_domain"] == "text_classification"


def test_card_from_training_folder_measures_sparsity(tmp_path):
    training = make_training(tmp_path / "train")
    card, body = read_card(write_card(training, dense_metrics={"accuracy": 0.85}))
    assert card.sparsity.overall == pytest.approx(0.25)
    assert card.metrics[0].name == "accuracy" and card.metrics[0].value == 0.8125
    assert card.sparse_tag == "pruned25-none" and card.num_layers == 2
    assert card.size.weights_bytes == (training / "model.safetensors").stat().st_size


def test_card_schema_refuses_with_field_and_reason(tmp_path):
    deployment = make_deployment(tmp_path / "dep")
    with pytest.raises(CardError, match=r"field 'sparse_tag'.*letters, digits"):
        write_card(deployment, sparse_tag="pruned 80!")
    assert not (deployment / "model.md").exists()  # nothing half-written
    with pytest.raises(CardError, match=r"field 'sparsity.overall'.*less than or equal to 1"):
        validate_card(
            {
                "domain": "nlp",
                "sub_domain": "x",
                "architecture": "bert",
                "task": "t",
                "sparsity": {"overall": 1.5},
            }
        )
    with pytest.raises(CardError, match=r"field 'task'.*Field required"):
        validate_card({"domain": "nlp", "sub_domain": "x", "architecture": "bert"})
    with pytest.raises(CardError, match=r"field 'colour'.*Extra inputs"):
        validate_card({"domain": "nlp", "sub_domain": "x", "architecture": "bert", "task": "t", "colour": 1})
    with pytest.raises(CardError, match="no YAML front matter"):
        parse_card("# just markdown\n")


def test_card_round_trip(tmp_path):
    card, body = read_card(write_card(make_deployment(tmp_path / "dep"), stub=STUB))
    again, body_again = parse_card(render_card(card, body))
    assert again == card and body_again.strip() == body.strip()


def test_recipe_summary_reads_sparseml_recipes_without_sparseml():
    text = """---
version: 1.1.0
num_epochs: 3
training_modifiers:
  - !pytorch.EpochRangeModifier
    start_epoch: 0.0
    end_epoch: eval(num_epochs)
  - !LayerDropModifier
    keep: 3
---
# notes
"""
    summary = summarize_recipe(text, "recipe.md")
    assert [(m.type, m.start_epoch) for m in summary.modifiers] == [
        ("EpochRangeModifier", 0.0),
        ("LayerDropModifier", None),
    ]
    assert summary.modifiers[1].settings == {"keep": 3}


def test_torch_checkpoint_read_without_torch(tiny_bert_dir):
    import torch

    from obert_modifiers.zoo.weights import read_torch_zip

    ours = read_torch_zip(tiny_bert_dir / "pytorch_model.bin")
    theirs = torch.load(tiny_bert_dir / "pytorch_model.bin", weights_only=True)
    assert set(ours) == set(theirs)
    for name, tensor in theirs.items():
        np.testing.assert_array_equal(ours[name], tensor.numpy())


@pytest.mark.integration
def test_zoo_modules_do_not_import_torch():
    code = (
        "import sys\n"
        "import obert_modifiers.zoo.server, obert_modifiers.zoo.client, obert_modifiers.zoo.card\n"
        "import obert_modifiers.zoo.cli, obert_modifiers.zoo.graphql_api, obert_modifiers.zoo.web\n"
        "import obert_modifiers.zoo.weights, obert_modifiers.zoo.local\n"
        "from obert_modifiers.zoo.server.routes import files, models, publish, sparsezoo\n"
        "print(sorted(m for m in ('torch', 'sparseml', 'transformers') if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().replace("'", '"')) == []


@pytest.mark.integration
def test_obert_card_command(tmp_path):
    deployment = make_deployment(tmp_path / "dep")

    def obert(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "obert_modifiers.cli", *args], capture_output=True, text=True, timeout=120
        )

    done = obert(
        "card", str(deployment), "--stub", STUB, "--metric", "accuracy=0.8", "--dense", "accuracy=0.85"
    )
    assert done.returncode == 0, done.stderr
    card, body = read_card(deployment / "model.md")
    assert card.stub == STUB and card.metrics[0].dense_value == 0.85 and "-0.0500" in body
    bad = obert("card", str(deployment), "--metric", "accuracy")
    assert bad.returncode != 0 and "NAME=NUMBER" in bad.stderr
    refused = obert("card", str(tmp_path / "nowhere"))
    assert (
        refused.returncode == 1 and "no such folder" in refused.stderr and "Traceback" not in refused.stderr
    )
