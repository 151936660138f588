"""GLUE scores for ``datasets.load_metric("glue", TASK)`` (text classification with --task_name),
bundled with obert-modifiers so the stock SparseML scripts run offline. Per task: CoLA Matthews
correlation; STS-B Pearson and Spearman correlation; MRPC and QQP accuracy and F1; every other task
accuracy. Computed with scikit-learn and SciPy.
"""

import datasets
import numpy as np

TASKS = (
    "sst2",
    "mnli",
    "mnli_mismatched",
    "mnli_matched",
    "cola",
    "stsb",
    "mrpc",
    "qqp",
    "qnli",
    "rte",
    "wnli",
    "hans",
)
_DESCRIPTION = "GLUE benchmark scores for one task (the configuration name)."
_INPUTS = """
Args:
    predictions: predicted labels (ints), or scores (floats) for stsb.
    references: true labels, or scores for stsb.
Returns:
    cola: {"matthews_correlation"}; stsb: {"pearson", "spearmanr"}; mrpc, qqp: {"accuracy", "f1"};
    others: {"accuracy"}
"""


class Glue(datasets.Metric):
    def _info(self):
        if self.config_name not in TASKS:
            raise KeyError(f"glue: unknown task {self.config_name!r}; expected one of {list(TASKS)}")
        value = datasets.Value("float32" if self.config_name == "stsb" else "int64")
        return datasets.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_INPUTS,
            features=datasets.Features({"predictions": value, "references": value}),
            format="numpy",
        )

    def _compute(self, predictions, references):
        predictions = np.asarray(predictions)
        references = np.asarray(references)
        if self.config_name == "cola":
            from sklearn.metrics import matthews_corrcoef

            return {"matthews_correlation": float(matthews_corrcoef(references, predictions))}
        if self.config_name == "stsb":
            from scipy.stats import pearsonr, spearmanr

            return {
                "pearson": float(pearsonr(predictions, references)[0]),
                "spearmanr": float(spearmanr(predictions, references)[0]),
            }
        accuracy = float((predictions == references).mean()) if len(references) else 0.0
        if self.config_name in ("mrpc", "qqp"):
            from sklearn.metrics import f1_score

            return {"accuracy": accuracy, "f1": float(f1_score(y_true=references, y_pred=predictions))}
        return {"accuracy": accuracy}
