"""Objectives of the quality study's "match (equal tokens)" comparison: what else the student matches besides logits.

``OBJECTIVES`` maps a row name to the ``DistillLossConfig.from_dict`` dict of that run, each one loss term of
``loss.extra`` (or one option of the logit term) on top of logit KD, with logit KD alone as the baseline.
Feature terms use the ``auto`` balance at weight 0.5 (each rescaled to half the logit term's magnitude);
weight matching uses ``fixed`` weights, since it is exactly 0 at the start for a student pruned without
re-fit and ``auto`` would then blow it up as soon as it leaves 0. Gradient-based token attention is left
out: it needs eager student attention and costs ~2.4x a step (see ``minidistill/distill/losses/saliency.py``).
"""

from __future__ import annotations

GROUP = "match (equal tokens)"
BASELINE = "logit KD"


def _feature(name: str, settings: float | dict = 0.5) -> dict:
    return {"extra": {name: settings}, "balance": "auto"}


OBJECTIVES: dict[str, dict] = {
    BASELINE: {},
    "KD + weights (L2 to the teacher's kept rows / columns)": {"extra": {"weights": 1.0}},
    "KD + MMD (gaussian kernel, over tokens)": _feature("mmd"),
    "KD + NST (MMD over neurons, polynomial kernel)": _feature("nst"),
    "KD + activation attention (per-token norms)": _feature("token_attention"),
    "KD + activation boundaries (MLP gates)": _feature("activation_boundary"),
    "KD + FSP (flow matrices of consecutive layers)": _feature("fsp"),
    "KD + RKD (distance + angle, across the batch)": _feature("rkd"),
    "teacher-bounded KD (margin 0.1 nats)": {"logits": {"teacher_bound_margin": 0.1}},
    "confidence-weighted KD": {"logits": {"token_weighting": "confidence"}},
    "entropy-weighted KD": {"logits": {"token_weighting": "entropy"}},
}
