"""Accuracy: the fraction of items whose prediction equals the reference."""

import datasets
import evaluate

_DESCRIPTION = "Fraction of items whose predicted label equals the reference label."
_INPUTS = """
Args:
    predictions (list of int): predicted labels (e.g. 1 when the greedy continuation matched).
    references (list of int): reference labels.
Returns:
    accuracy (float): matches / items, in [0, 1].
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _INPUTS)
class Accuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_INPUTS,
            features=datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references):
        if len(predictions) == 0:
            raise ValueError("accuracy needs at least one item")
        return {"accuracy": sum(int(p == r) for p, r in zip(predictions, references)) / len(predictions)}
