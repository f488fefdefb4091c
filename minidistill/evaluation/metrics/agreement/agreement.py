"""Top-1 agreement: the fraction of positions where a student's greedy token equals the teacher's."""

import datasets
import evaluate

_DESCRIPTION = "Fraction of positions where the predicted token id equals the reference (teacher) token id."
_INPUTS = """
Args:
    predictions (list of int): student's greedy next-token ids.
    references (list of int): teacher's greedy next-token ids at the same positions.
Returns:
    agreement (float): matches / positions, in [0, 1].
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _INPUTS)
class Agreement(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_INPUTS,
            features=datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references):
        if len(predictions) == 0:
            raise ValueError("agreement needs at least one position")
        matches = sum(int(p == r) for p, r in zip(predictions, references))
        return {"agreement": matches / len(predictions)}
