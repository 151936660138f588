"""The bundled model folders and the tiny test BERT."""

from __future__ import annotations

import json

import numpy as np
import pytest

from obert_modifiers import models

SENTENCES = [
    "A gripping, beautifully acted drama that never lets go.",
    "The plot is moldy and obvious.",
    "Shares in the firm rose sharply after it reported record profits for the quarter.",
    "ok",
]


def test_minilm_l6_dir_is_a_bert_folder():
    folder = models.minilm_l6_dir()
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "bert" and config["num_hidden_layers"] == 6
    for name in models.TOKENIZER_FILES:
        assert (folder / name).is_file()


def test_save_tiny_bert(tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    folder = models.save_tiny_bert(tmp_path / "tiny", num_labels=3, num_layers=2)
    assert (folder / "pytorch_model.bin").is_file()
    assert not (folder / "model.safetensors").exists()
    config = json.loads((folder / "config.json").read_text())
    assert config["id2label"] == {"0": "negative", "1": "neutral", "2": "positive"}
    assert config["hidden_size"] == 32 and config["num_hidden_layers"] == 2
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForSequenceClassification.from_pretrained(folder)
    batch = tokenizer(SENTENCES[:2], padding=True, return_tensors="pt")
    assert model(**batch).logits.shape == (2, 3)
    # same seed, same weights; a non-empty target is refused
    again = models.save_tiny_bert(tmp_path / "again", num_labels=3, num_layers=2)
    assert (again / "pytorch_model.bin").read_bytes() == (folder / "pytorch_model.bin").read_bytes()
    with pytest.raises(FileExistsError):
        models.save_tiny_bert(folder)
    with pytest.raises(ValueError, match="distinct"):
        models.save_tiny_bert(tmp_path / "bad", num_labels=2, labels=["a", "a"])


def test_tiny_bert_fixture_has_string_labels(tiny_bert_dir):
    config = json.loads((tiny_bert_dir / "config.json").read_text())
    assert config["architectures"] == ["BertForSequenceClassification"]
    assert all(isinstance(v, str) for v in config["id2label"].values()) and len(config["id2label"]) == 5


@pytest.fixture(scope="module")
def l3_dir(tmp_path_factory):
    return models.minilm_l3_dir(cache_dir=tmp_path_factory.mktemp("cache"))


def test_minilm_l3_matches_onnxruntime(l3_dir):
    import onnxruntime as ort
    import torch
    from transformers import AutoTokenizer, BertModel

    tokenizer = AutoTokenizer.from_pretrained(l3_dir)
    model = BertModel.from_pretrained(l3_dir).eval()
    encoder_params = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("pooler."))
    assert encoder_params == pytest.approx(17.2e6, rel=0.01)  # DATA.md: 17.2 M parameters
    batch = tokenizer(SENTENCES, padding=True, return_tensors="np")
    session = ort.InferenceSession(str(models.minilm_l3_onnx()), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    feed = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    outputs = dict(zip(names, session.run(None, feed), strict=True))
    reference = next(v for v in outputs.values() if v.ndim == 3)  # token embeddings (last hidden state)
    with torch.no_grad():
        hidden = model(
            input_ids=torch.from_numpy(batch["input_ids"]),
            attention_mask=torch.from_numpy(batch["attention_mask"]),
        ).last_hidden_state.numpy()
    mask = batch["attention_mask"].astype(bool)
    diff = np.abs(hidden - reference)[mask].max()
    assert diff < 1e-4, diff  # measured 1.3e-6 (DATA.md)
    # the sentences are told apart: a wrong conversion gives near-identical or random embeddings
    pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
    pooled /= np.linalg.norm(pooled, axis=1, keepdims=True)
    assert pooled[0] @ pooled[1] < 0.99


def test_minilm_l3_is_cached(l3_dir):
    before = (l3_dir / "pytorch_model.bin").stat().st_mtime_ns
    assert models.minilm_l3_dir(cache_dir=l3_dir.parent) == l3_dir
    assert (l3_dir / "pytorch_model.bin").stat().st_mtime_ns == before
    assert (l3_dir / "vocab.txt").is_file()
    assert [p.name for p in l3_dir.parent.iterdir()] == [l3_dir.name]  # no temp folder left behind


def test_l3_state_dict_names_every_linear():
    state = models.l3_state_dict_from_onnx(models.minilm_l3_onnx())
    for layer in range(3):
        for linear in (
            "attention.self.query",
            "attention.self.key",
            "attention.self.value",
            "attention.output.dense",
            "intermediate.dense",
            "output.dense",
        ):
            assert f"encoder.layer.{layer}.{linear}.weight" in state
    assert state["encoder.layer.0.intermediate.dense.weight"].shape == (1536, 384)


def test_minilm_l3_conversion_tolerates_another_process_finishing_first(tmp_path, monkeypatch):
    """Two processes converting into the same cache: the one that finishes second keeps the
    first one's folder (the same conversion) and cleans up its own staging folder."""
    cache = tmp_path / "cache"
    real_save = models._save_l3

    def save_while_another_process_finishes(model, staging, onnx_path):
        real_save(model, staging, onnx_path)
        import shutil

        shutil.copytree(staging, cache / staging.name.split(".tmp-")[0].lstrip("."))  # it wins the race

    monkeypatch.setattr(models, "_save_l3", save_while_another_process_finishes)
    target = models.minilm_l3_dir(cache_dir=cache)
    assert (target / "config.json").is_file() and (target / "pytorch_model.bin").is_file()
    assert [p.name for p in cache.iterdir()] == [target.name]  # no staging folder left
