"""Accuracy for ``datasets.load_metric("accuracy")``, bundled with obert-modifiers so the stock
SparseML training scripts never fetch a metric script from the internet.

Written for obert-modifiers; the inputs and the output key match the metric those scripts expect.
"""

import datasets
import numpy as np

_DESCRIPTION = (
    "Accuracy: the fraction (or, with normalize=False, the count) of predictions equal to the references."
)
_INPUTS = """
Args:
    predictions: predicted labels (ints).
    references: true labels (ints).
    normalize: if False, return the number of correct predictions instead of the fraction.
    sample_weight: optional weight per example.
Returns:
    {"accuracy": float}
"""


class Accuracy(datasets.Metric):
    def _info(self):
        label = (
            datasets.Sequence(datasets.Value("int32"))
            if self.config_name == "multilabel"
            else datasets.Value("int32")
        )
        return datasets.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_INPUTS,
            features=datasets.Features({"predictions": label, "references": label}),
        )

    def _compute(self, predictions, references, normalize=True, sample_weight=None):
        predictions = np.asarray(predictions)
        references = np.asarray(references)
        if predictions.shape != references.shape:
            raise ValueError(
                f"accuracy: predictions {predictions.shape} and references {references.shape} differ in shape"
            )
        correct = predictions == references
        if correct.ndim > 1:  # multilabel: an example counts only if every label matches
            correct = correct.all(axis=tuple(range(1, correct.ndim)))
        weights = np.ones(len(correct)) if sample_weight is None else np.asarray(sample_weight, dtype=float)
        total = float((correct * weights).sum())
        if normalize:
            total = total / float(weights.sum()) if len(correct) else 0.0
        return {"accuracy": total}
