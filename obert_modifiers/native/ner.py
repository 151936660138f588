"""Token classification for ``obert train token-classification`` on the native engine: words to
features with one label per word (its first sub-token; the others and the special tokens are -100,
ignored by the loss), and seqeval-style scores over IOB entity spans (precision, recall, F1) plus
token accuracy, as the stock script reports them (facts of the format, rewritten here)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["entity_scores", "entity_spans", "token_features"]

IGNORED = -100


def token_features(
    records: Sequence[dict],
    tokenizer,
    words_key: str,
    tags_key: str,
    label2id: dict,
    max_length: int,
    padding,
) -> dict:
    encoded = tokenizer(
        [list(r[words_key]) for r in records], is_split_into_words=True, truncation=True,
        max_length=max_length, padding=padding,
    )  # fmt: skip
    labels = []
    for index, record in enumerate(records):
        previous, row = None, []
        for word in encoded.word_ids(index):
            row.append(IGNORED if word is None or word == previous else label2id[str(record[tags_key][word])])
            previous = word
        labels.append(row)
    return {**encoded, "labels": labels}


def entity_spans(tags: Sequence[str]) -> set[tuple[str, int, int]]:
    """``(type, start, end)`` of every IOB entity (an ``I-X`` after ``O`` or another type starts one)."""
    spans, start, kind = set(), None, None
    for position, tag in enumerate([*tags, "O"]):
        prefix, _, name = tag.partition("-")
        continues = prefix == "I" and kind == name
        if start is not None and not continues:
            spans.add((kind, start, position))
            start, kind = None, None
        if prefix in ("B", "I") and not continues:
            start, kind = position, name
    return spans


def entity_scores(logits, labels, id2label: dict) -> dict[str, float]:
    """Overall entity precision / recall / F1 and token accuracy over the labelled positions."""
    predictions = np.argmax(logits, axis=-1)
    found = expected = correct = 0
    right = total = 0
    for predicted_row, label_row in zip(predictions, labels, strict=True):
        keep = label_row != IGNORED
        gold = [id2label[int(i)] for i in label_row[keep]]
        guess = [id2label[int(i)] for i in predicted_row[keep]]
        right += sum(g == p for g, p in zip(gold, guess, strict=True))
        total += len(gold)
        gold_spans, guess_spans = entity_spans(gold), entity_spans(guess)
        found, expected, correct = (
            found + len(guess_spans),
            expected + len(gold_spans),
            correct + len(gold_spans & guess_spans),
        )
    precision = correct / found if found else 0.0
    recall = correct / expected if expected else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1, "accuracy": right / total if total else 0.0}
