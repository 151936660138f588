"""Small model folders for hub tests and the hub benchmark, made without torch: a tiny ONNX graph
built with ``onnx.helper`` (optionally padded with a large initializer to reach a given size),
a BERT-like ``config.json``, the bundled MiniLM tokenizer files when available, an ``export.json``
written through :class:`obert_modifiers.deployment.DeploymentManifest` (so it cannot drift from
what export writes), and a recipe.

:func:`make_tiny_bert_folders` is the one exception (it imports torch when called): a real tiny
BERT classifier and its ONNX export, for the clients that must run the model (the sparsezoo client
with a DeepSparse pipeline, Hugging Face loading) in tests and ``integrations/sparsezoo``."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from obert_modifiers.deployment import DeploymentManifest, Parity, Sparsity, sha256_file

RECIPE = """\
modifiers:
  - !EpochRangeModifier
    start_epoch: 0.0
    end_epoch: 3.0
  - !OBertPruningModifier
    params: __ALL_PRUNABLE__
    init_sparsity: 0.7
    final_sparsity: 0.8
    start_epoch: 0.0
    end_epoch: 2.0
    update_frequency: 0.5
    mask_type: unstructured
"""


def make_onnx(path: Path, hidden: int = 8, pad_bytes: int = 0, seed: int = 0) -> Path:
    """A valid ONNX model: logits = MatMul(input, W) (+ a large unused-but-kept initializer)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    weight = rng.standard_normal((hidden, 2)).astype(np.float32)
    weight[: hidden // 2] = 0.0  # half the rows pruned: a measurable sparsity
    inits = [numpy_helper.from_array(weight, "encoder.layer.0.output.dense.weight")]
    nodes = [helper.make_node("MatMul", ["input", "encoder.layer.0.output.dense.weight"], ["logits"])]
    if pad_bytes > 0:
        pad = rng.standard_normal(max(1, pad_bytes // 4)).astype(np.float32)
        inits.append(numpy_helper.from_array(pad, "padding"))
        nodes.append(helper.make_node("Identity", ["padding"], ["padding_out"]))
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, hidden])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 2])]
        + ([helper.make_tensor_value_info("padding_out", TensorProto.FLOAT, None)] if pad_bytes > 0 else []),
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def _tokenizer_files(out: Path) -> None:
    try:
        from obert_modifiers.models import TOKENIZER_FILES, minilm_l6_dir

        source = minilm_l6_dir()
        for name in TOKENIZER_FILES:
            if (source / name).is_file():
                (out / name).write_bytes((source / name).read_bytes())
        return
    except Exception:  # the bundled model package is optional for these fixtures
        pass
    (out / "vocab.txt").write_text(
        "\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "film"]) + "\n"
    )
    (out / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True}))
    (out / "special_tokens_map.json").write_text(json.dumps({"unk_token": "[UNK]"}))
    (out / "tokenizer.json").write_text(json.dumps({"version": "1.0"}))


def make_deployment(out: str | Path, pad_bytes: int = 0, seed: int = 0, with_recipe: bool = True) -> Path:
    """A deployment folder: model.onnx, config.json, tokenizer files, recipe.yaml, export.json."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    make_onnx(out / "model.onnx", pad_bytes=pad_bytes, seed=seed)
    config = {
        "architectures": ["BertForSequenceClassification"],
        "model_type": "bert",
        "num_hidden_layers": 4,
        "hidden_size": 32,
        "id2label": {"0": "negative", "1": "positive"},
        "label2id": {"negative": 0, "positive": 1},
    }
    (out / "config.json").write_text(json.dumps(config, indent=2))
    _tokenizer_files(out)
    if with_recipe:
        (out / "recipe.yaml").write_text(RECIPE)
    DeploymentManifest(
        task="text-classification",
        sequence_length=128,
        opset=13,
        quantized=False,
        num_layers=4,
        num_parameters=16 + pad_bytes // 4,
        sparsity=Sparsity(
            overall=0.5, per_layer={f"encoder.layer.{i}.output.dense.weight": 0.5 for i in range(4)}
        ),
        parity=Parity(max_abs_diff=1e-6, tolerance=1e-4, num_samples=8),
        onnx_sha256=sha256_file(out / "model.onnx"),
        source_model="tiny-bert",
    ).write(out)
    return out


def make_training(out: str | Path) -> Path:
    """A Hugging Face-shaped training folder (config, tokenizer, safetensors weights, eval results)."""
    from safetensors.numpy import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    weights = {
        f"bert.encoder.layer.{i}.attention.self.query.weight": rng.standard_normal((8, 8)).astype(np.float32)
        for i in range(2)
    }
    weights["bert.encoder.layer.0.attention.self.query.weight"][:4] = 0
    save_file(weights, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps({"model_type": "bert", "num_hidden_layers": 2}))
    _tokenizer_files(out)
    (out / "eval_results.json").write_text(json.dumps({"eval_accuracy": 0.8125, "eval_loss": 0.4}))
    (out / "recipe.yaml").write_text(RECIPE)
    return out


def make_tiny_bert_folders(root: str | Path, sequence_length: int = 32) -> tuple[Path, Path]:
    """A random 4-layer BERT classifier with 5 labels (``root/training``) and its ONNX export with
    config and tokenizer files (``root/deployment``); returns ``(deployment, training)``."""
    import torch
    from transformers import AutoModelForSequenceClassification

    from obert_modifiers.models import save_tiny_bert

    root = Path(root)
    training = save_tiny_bert(root / "training", num_labels=5)
    model = AutoModelForSequenceClassification.from_pretrained(training).eval()
    deployment = root / "deployment"
    deployment.mkdir()
    ids = torch.ones(1, sequence_length, dtype=torch.long)
    names = ["input_ids", "attention_mask", "token_type_ids"]
    torch.onnx.export(
        model,
        (ids, torch.ones_like(ids), torch.zeros_like(ids)),
        str(deployment / "model.onnx"),
        input_names=names,
        output_names=["logits"],
        opset_version=14,
        dynamo=False,
        dynamic_axes={**{n: {0: "batch", 1: "sequence"} for n in names}, "logits": {0: "batch"}},
    )
    for name in (
        "config.json",
        "vocab.txt",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
    ):
        shutil.copy(training / name, deployment / name)
    return deployment, training
