"""Perplexity from per-item log-likelihoods and unit counts: exp(-sum loglik / sum units)."""

import math

import datasets
import evaluate

_DESCRIPTION = (
    "Perplexity over a corpus from each item's summed log-likelihood (nats) and its number of units "
    "(words, bytes or tokens): exp(-sum(loglikelihoods) / sum(units)). Unlike the Hub's `perplexity` "
    "metric it runs no model; the caller scores the text."
)
_INPUTS = """
Args:
    predictions (list of float): summed log-likelihood of each item, in nats.
    references (list of int): number of units (words, bytes or tokens) in each item.
Returns:
    perplexity (float): exp(-sum(predictions) / sum(references)).
    bits_per_unit (float): -sum(predictions) / sum(references) / ln 2.
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _INPUTS)
class Perplexity(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_INPUTS,
            features=datasets.Features({"predictions": datasets.Value("float64"), "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references):
        units = sum(references)
        if units <= 0:
            raise ValueError("perplexity needs a positive number of units")
        nll = -sum(predictions) / units
        return {"perplexity": math.exp(nll), "bits_per_unit": nll / math.log(2)}
