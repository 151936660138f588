"""SQuAD v2.0 scores for ``datasets.load_metric("squad_v2")`` (question answering with unanswerable
questions), bundled with obert-modifiers so the stock SparseML scripts run offline. Follows the
published SQuAD 2.0 definition: normalized exact match and token F1; a question without gold
answers is right only when the prediction is empty; a prediction whose ``no_answer_probability``
exceeds the threshold counts as empty. Results are percentages, split by HasAns / NoAns, plus the
best scores over all thresholds.
"""

import collections
import re
import string

import datasets

_DESCRIPTION = "SQuAD v2.0 exact match and token F1 with unanswerable questions (percentages)."
_INPUTS = """
Args:
    predictions: list of {"id": str, "prediction_text": str, "no_answer_probability": float}.
    references: list of {"id": str, "answers": {"text": [str], "answer_start": [int]}}.
    no_answer_threshold: probability above which a prediction is treated as "no answer" (default 1.0).
Returns:
    {"exact", "f1", "total", "HasAns_exact", "HasAns_f1", "HasAns_total", "NoAns_exact", "NoAns_f1",
     "NoAns_total", "best_exact", "best_exact_thresh", "best_f1", "best_f1_thresh"} (keys for empty
    groups are left out)
"""
_PUNCTUATION = set(string.punctuation)


def normalize_answer(text):
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def token_f1(prediction, truth):
    predicted = normalize_answer(prediction).split()
    gold = normalize_answer(truth).split()
    if not predicted or not gold:  # "no answer" on either side: right only if both are empty
        return float(predicted == gold)
    common = sum((collections.Counter(predicted) & collections.Counter(gold)).values())
    if common == 0:
        return 0.0
    precision = common / len(predicted)
    recall = common / len(gold)
    return 2 * precision * recall / (precision + recall)


def _best(scores, no_answer_probability, has_answer):
    """Best total score over thresholds: answer questions in order of increasing no-answer probability."""
    current = best = float(sum(1 for qid in scores if not has_answer[qid]))
    threshold = 0.0
    for qid in sorted(scores, key=lambda q: no_answer_probability[q]):
        if has_answer[qid]:
            current += scores[qid]
        elif scores[qid] == 0:  # answering an unanswerable question with text loses its point
            current -= 1
        if current > best:
            best, threshold = current, no_answer_probability[qid]
    return 100.0 * best / max(len(scores), 1), threshold


class SquadV2(datasets.Metric):
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
                        "no_answer_probability": datasets.Value("float32"),
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

    def _compute(self, predictions, references, no_answer_threshold=1.0):
        by_id = {p["id"]: p for p in predictions}
        exact, f1, raw_exact, raw_f1, has_answer, no_answer_probability = {}, {}, {}, {}, {}, {}
        for reference in references:
            qid = reference["id"]
            if qid not in by_id:
                raise ValueError(f"squad_v2: no prediction for question id {qid!r}")
            truths = [t for t in reference["answers"]["text"] if normalize_answer(t)] or [""]
            has_answer[qid] = truths != [""]
            text = by_id[qid]["prediction_text"]
            no_answer_probability[qid] = float(by_id[qid]["no_answer_probability"])
            raw_exact[qid] = max(float(normalize_answer(text) == normalize_answer(t)) for t in truths)
            raw_f1[qid] = max(token_f1(text, t) for t in truths)
            exact[qid], f1[qid] = raw_exact[qid], raw_f1[qid]
            if no_answer_probability[qid] > no_answer_threshold:  # predicted "no answer"
                exact[qid] = f1[qid] = float(not has_answer[qid])

        def summary(prefix, ids):
            if not ids:
                return {}
            return {
                f"{prefix}exact": 100.0 * sum(exact[q] for q in ids) / len(ids),
                f"{prefix}f1": 100.0 * sum(f1[q] for q in ids) / len(ids),
                f"{prefix}total": len(ids),
            }

        result = summary("", list(exact))
        result.update(summary("HasAns_", [q for q in exact if has_answer[q]]))
        result.update(summary("NoAns_", [q for q in exact if not has_answer[q]]))
        result["best_exact"], result["best_exact_thresh"] = _best(
            raw_exact, no_answer_probability, has_answer
        )
        result["best_f1"], result["best_f1_thresh"] = _best(raw_f1, no_answer_probability, has_answer)
        return result
