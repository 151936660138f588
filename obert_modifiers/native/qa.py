"""Extractive question answering for ``obert train question-answering`` on the native engine: SQuAD
records to features (windows over long contexts), logits back to answer texts, and the SQuAD
exact-match / F1 scores. The steps are the well-known ones of transformers' ``run_qa`` example and
SparseML's stock script (facts, rewritten here): contexts split into ``max_length`` windows that
overlap by ``doc_stride`` tokens; an answer outside a window is labelled with the CLS position; the
answer of an example is the best-scoring valid span over all its windows.

Records are flat: ``id, context, question, answers: {text: [...], answer_start: [...]}``.
"""

from __future__ import annotations

import collections
import re
import string
from collections.abc import Sequence

import numpy as np

__all__ = ["eval_features", "flatten_squad", "postprocess", "squad_scores", "train_features"]


def flatten_squad(articles: list[dict]) -> list[dict]:
    """SQuAD v1.1 nesting (``data/paragraphs/qas``) as flat records."""
    records = []
    for article in articles:
        for paragraph in article.get("paragraphs", []):
            for question in paragraph.get("qas", []):
                answers = question.get("answers", [])
                records.append(
                    {
                        "id": str(question["id"]),
                        "title": article.get("title", ""),
                        "context": paragraph["context"],
                        "question": question["question"],
                        "answers": {
                            "text": [a["text"] for a in answers],
                            "answer_start": [int(a["answer_start"]) for a in answers],
                        },
                    }
                )
    return records


def _encode(records: Sequence[dict], tokenizer, max_length: int, stride: int, padding) -> dict:
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("question answering needs a fast tokenizer (offsets)")
    if tokenizer.padding_side != "right":
        raise ValueError("question answering expects right padding (question first, context second)")
    return tokenizer(
        [r["question"].lstrip() for r in records],
        [r["context"] for r in records],
        truncation="only_second",
        max_length=max_length,
        stride=stride,
        return_overflowing_tokens=True,
        return_offsets_mapping=True,
        padding=padding,
    )


def train_features(records: Sequence[dict], tokenizer, max_length: int, stride: int, padding) -> dict:
    """Windows with ``start_positions``/``end_positions`` (the CLS position when the answer is not
    wholly inside the window)."""
    encoded = _encode(records, tokenizer, max_length, stride, padding)
    sample_of = encoded.pop("overflow_to_sample_mapping")
    offsets_all = encoded.pop("offset_mapping")
    starts, ends = [], []
    for index, offsets in enumerate(offsets_all):
        ids = encoded["input_ids"][index]
        cls = ids.index(tokenizer.cls_token_id) if tokenizer.cls_token_id in ids else 0
        sequence = encoded.sequence_ids(index)
        answers = records[sample_of[index]]["answers"]
        if not answers["answer_start"]:
            starts.append(cls), ends.append(cls)
            continue
        first = answers["answer_start"][0]
        last = first + len(answers["text"][0])
        token_start = sequence.index(1)
        token_end = len(sequence) - 1 - sequence[::-1].index(1)
        if not (offsets[token_start][0] <= first and offsets[token_end][1] >= last):
            starts.append(cls), ends.append(cls)
            continue
        while token_start < len(offsets) and offsets[token_start][0] <= first:
            token_start += 1
        while offsets[token_end][1] >= last:
            token_end -= 1
        starts.append(token_start - 1), ends.append(token_end + 1)
    return {**encoded, "start_positions": starts, "end_positions": ends}


def eval_features(records: Sequence[dict], tokenizer, max_length: int, stride: int, padding) -> dict:
    """Windows with ``example_id`` and the context's offsets (None outside the context)."""
    encoded = _encode(records, tokenizer, max_length, stride, padding)
    sample_of = encoded.pop("overflow_to_sample_mapping")
    ids, offsets = [], []
    for index, window in enumerate(encoded["offset_mapping"]):
        sequence = encoded.sequence_ids(index)
        ids.append(records[sample_of[index]]["id"])
        offsets.append([o if sequence[k] == 1 else None for k, o in enumerate(window)])
    encoded = dict(encoded)
    encoded["offset_mapping"], encoded["example_id"] = offsets, ids
    return encoded


def postprocess(
    records: Sequence[dict],
    extra: dict,
    start_logits,
    end_logits,
    n_best: int = 20,
    max_answer_length: int = 30,
) -> dict[str, str]:
    """Example id -> the text of its best valid span over all its windows."""
    windows = collections.defaultdict(list)
    for index, example_id in enumerate(extra["example_id"]):
        windows[example_id].append(index)
    answers = {}
    for record in records:
        best, best_score = "", -np.inf
        for index in windows[record["id"]]:
            offsets = extra["offset_mapping"][index]
            top_starts = np.argsort(start_logits[index])[-1 : -n_best - 1 : -1]
            top_ends = np.argsort(end_logits[index])[-1 : -n_best - 1 : -1]
            for s in top_starts:
                for e in top_ends:
                    if s >= len(offsets) or e >= len(offsets) or offsets[s] is None or offsets[e] is None:
                        continue
                    if e < s or e - s + 1 > max_answer_length:
                        continue
                    score = start_logits[index][s] + end_logits[index][e]
                    if score > best_score:
                        best_score = score
                        best = record["context"][offsets[s][0] : offsets[e][1]]
        answers[record["id"]] = best
    return answers


def _normalize(text: str) -> str:
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def _f1(prediction: str, truth: str) -> float:
    predicted, expected = _normalize(prediction).split(), _normalize(truth).split()
    common = collections.Counter(predicted) & collections.Counter(expected)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(predicted), same / len(expected)
    return 2 * precision * recall / (precision + recall)


def squad_scores(records: Sequence[dict], predictions: dict[str, str]) -> dict[str, float]:
    """SQuAD v1.1 exact match and F1 (percent), the best over each example's reference answers."""
    exact = f1 = 0.0
    for record in records:
        truths = record["answers"]["text"] or [""]
        prediction = predictions.get(record["id"], "")
        exact += max(float(_normalize(prediction) == _normalize(t)) for t in truths)
        f1 += max(_f1(prediction, t) for t in truths)
    count = max(len(records), 1)
    return {"exact_match": 100.0 * exact / count, "f1": 100.0 * f1 / count}
