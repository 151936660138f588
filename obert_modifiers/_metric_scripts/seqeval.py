"""Entity-level precision/recall/F1 for ``datasets.load_metric("seqeval")`` (token classification),
bundled with obert-modifiers so the stock SparseML scripts run offline. The scoring itself is done by
the ``seqeval`` package (a dependency of sparseml[transformers]); this file only adapts it.
"""

import datasets
from seqeval.metrics import accuracy_score, classification_report

_DESCRIPTION = "Entity-level precision, recall and F1 (CoNLL style) computed with the seqeval package."
_INPUTS = """
Args:
    predictions: list of tag sequences (e.g. [["B-PER", "I-PER", "O"]]).
    references: list of tag sequences, same shapes.
    suffix, scheme, mode, sample_weight, zero_division: passed to seqeval's classification_report.
Returns:
    {TYPE: {"precision", "recall", "f1", "number"}, ..., "overall_precision", "overall_recall",
     "overall_f1", "overall_accuracy"}
"""


class Seqeval(datasets.Metric):
    def _info(self):
        tags = datasets.Sequence(datasets.Value("string", id="label"), id="sequence")
        return datasets.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_INPUTS,
            features=datasets.Features({"predictions": tags, "references": tags}),
        )

    def _compute(
        self,
        predictions,
        references,
        suffix=False,
        scheme=None,
        mode=None,
        sample_weight=None,
        zero_division="warn",
    ):
        if scheme is not None:
            import seqeval.scheme

            scheme = getattr(seqeval.scheme, scheme)
        report = classification_report(
            y_true=references,
            y_pred=predictions,
            suffix=suffix,
            output_dict=True,
            scheme=scheme,
            mode=mode,
            sample_weight=sample_weight,
            zero_division=zero_division,
        )
        report.pop("macro avg", None)
        report.pop("weighted avg", None)
        overall = report.pop("micro avg", {"precision": 0.0, "recall": 0.0, "f1-score": 0.0})
        scores = {
            entity: {
                "precision": values["precision"],
                "recall": values["recall"],
                "f1": values["f1-score"],
                "number": values["support"],
            }
            for entity, values in report.items()
        }
        scores["overall_precision"] = overall["precision"]
        scores["overall_recall"] = overall["recall"]
        scores["overall_f1"] = overall["f1-score"]
        scores["overall_accuracy"] = accuracy_score(y_true=references, y_pred=predictions)
        return scores
