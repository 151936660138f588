"""SQuAD v1.1 exact match and F1 for ``datasets.load_metric("squad")`` (question answering), bundled
with obert-modifiers so the stock SparseML scripts run offline. Scores follow the published SQuAD
definition: answers are lower-cased and stripped of punctuation, articles and extra spaces; a
prediction scores the best value over the gold answers; results are percentages.
"""

import collections
import re
import string

import datasets

_DESCRIPTION = "SQuAD v1.1 exact match and token F1 (percentages)."
_INPUTS = """
Args:
    predictions: list of {"id": str, "prediction_text": str}.
    references: list of {"id": str, "answers": {"text": [str], "answer_start": [int]}}.
Returns:
    {"exact_match": float, "f1": float}
"""
_PUNCTUATION = set(string.punctuation)


def normalize_answer(text):
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(prediction, truth):
    return float(normalize_answer(prediction) == normalize_answer(truth))


def token_f1(prediction, truth):
    predicted = normalize_answer(prediction).split()
    gold = normalize_answer(truth).split()
    common = sum((collections.Counter(predicted) & collections.Counter(gold)).values())
    if common == 0:
        return 0.0
    precision = common / len(predicted)
    recall = common / len(gold)
    return 2 * precision * recall / (precision + recall)


class Squad(datasets.Metric):
    def _info(self):
        return datasets.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_INPUTS,
            features=datasets.Features(
                {
                    "predictions": {
                        "id": datasets.Value("string"),
                        "prediction_text": datasets.Value("string"),
                    },
                    "references": {
                        "id": datasets.Value("string"),
                        "answers": datasets.features.Sequence(
                            {"text": datasets.Value("string"), "answer_start": datasets.Value("int32")}
                        ),
                    },
                }
            ),
        )

    def _compute(self, predictions, references):
        by_id = {p["id"]: p["prediction_text"] for p in predictions}
        exact = f1 = 0.0
        for reference in references:
            if reference["id"] not in by_id:
                raise ValueError(f"squad: no prediction for question id {reference['id']!r}")
            prediction = by_id[reference["id"]]
            truths = reference["answers"]["text"] or [""]
            exact += max(exact_match(prediction, truth) for truth in truths)
            f1 += max(token_f1(prediction, truth) for truth in truths)
        total = max(len(references), 1)
        return {"exact_match": 100.0 * exact / total, "f1": 100.0 * f1 / total}
