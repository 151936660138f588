"""Scoring a deployment folder's ``model.onnx`` on a prepared split with ONNX Runtime.

The one scorer behind every accuracy the project reports from an exported file (``obert demo``'s
summary, the benchmark tables in ``docs/results.md`` and the README), so they all follow one rule:

- texts are tokenized with the deployment's own tokenizer and padded to the full sequence length
  (the graph's static length if it has one, else ``sequence_length``, 128 by default: the export's);
- batches are the graph's static batch size if it has one (the last batch is padded with empty
  texts), else ``batch_size``;
- graph inputs the tokenizer does not give (``token_type_ids`` of some tokenizers) are zeros;
- predicted ids are mapped to label names with ``config.json``'s ``id2label``; an id missing there
  counts as wrong.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

DEFAULT_SEQUENCE_LENGTH = 128  # the export's (obert export --sequence-length)
DEFAULT_BATCH_SIZE = 32


def read_split(csv_path: str | os.PathLike, max_rows: int | None = None) -> tuple[list[str], list[str]]:
    """Texts and label names of a prepared split (``sentence,label`` CSV), the first ``max_rows``."""
    from obert_modifiers.data import read_csv

    rows = read_csv(csv_path)[: max_rows or None]
    return [text for text, _ in rows], [label for _, label in rows]


def onnx_logits(
    deployment: str | os.PathLike,
    texts: Sequence[str],
    *,
    sequence_length: int = DEFAULT_SEQUENCE_LENGTH,
    batch_size: int = DEFAULT_BATCH_SIZE,
    on_batch: Callable[[int, int], None] | None = None,
):
    """ONNX Runtime logits (numpy, one row per text) of ``deployment/model.onnx``.

    ``on_batch(done, total)`` is called after each batch with the texts scored so far."""
    import numpy as np
    import onnxruntime as ort
    from transformers import AutoTokenizer

    deployment = Path(deployment)
    tokenizer = AutoTokenizer.from_pretrained(str(deployment))
    options = ort.SessionOptions()
    options.intra_op_num_threads = max(1, int(os.environ.get("OMP_NUM_THREADS", "0") or 0))
    session = ort.InferenceSession(
        str(deployment / "model.onnx"), options, providers=["CPUExecutionProvider"]
    )
    inputs = session.get_inputs()
    shape = inputs[0].shape
    static_batch = shape[0] if isinstance(shape[0], int) else None
    batch = static_batch or batch_size
    length = shape[1] if isinstance(shape[1], int) else sequence_length
    out = []
    for start in range(0, len(texts), batch):
        chunk = list(texts[start : start + batch])
        pad = batch - len(chunk) if static_batch else 0
        encoded = tokenizer(
            chunk + [""] * pad, padding="max_length", truncation=True, max_length=length, return_tensors="np"
        )
        feed = {i.name: encoded[i.name].astype(np.int64) for i in inputs if i.name in encoded}
        for i in inputs:  # token_type_ids etc. that the tokenizer did not give
            feed.setdefault(i.name, np.zeros((len(chunk) + pad, length), dtype=np.int64))
        out.append(session.run(None, feed)[0][: len(chunk)])
        if on_batch is not None:
            on_batch(start + len(chunk), len(texts))
    return np.concatenate(out) if out else np.zeros((0, 0))


def onnx_predictions(deployment: str | os.PathLike, texts: Sequence[str], **kwargs) -> list[str | None]:
    """Predicted label names (``config.json``'s ``id2label``; None for an unnamed id) for ``texts``."""
    id2label = _id2label(Path(deployment))
    return [id2label.get(int(i)) for i in onnx_logits(deployment, texts, **kwargs).argmax(-1)]


def onnx_correct(
    deployment: str | os.PathLike, texts: Sequence[str], labels: Sequence[str], **kwargs
) -> list[bool]:
    """Per text: does the exported model predict its label?"""
    if len(texts) != len(labels):
        raise ValueError(f"{len(texts)} texts but {len(labels)} labels: score the same rows")
    predicted = onnx_predictions(deployment, texts, **kwargs)
    return [p == label for p, label in zip(predicted, labels, strict=True)]


def onnx_accuracy(
    deployment: str | os.PathLike, test_csv: str | os.PathLike, max_rows: int | None = None, **kwargs
) -> float:
    """Accuracy of ``deployment/model.onnx`` on the split ``test_csv`` (its first ``max_rows`` rows)."""
    texts, labels = read_split(test_csv, max_rows)
    if not texts:
        raise ValueError(f"{test_csv}: no rows to score")
    correct = onnx_correct(deployment, texts, labels, **kwargs)
    return sum(correct) / len(correct)


def _id2label(deployment: Path) -> dict[int, str]:
    config = json.loads((deployment / "config.json").read_text())
    return {int(k): v for k, v in config.get("id2label", {}).items()}
