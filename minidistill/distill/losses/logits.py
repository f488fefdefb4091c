"""Logit distillation: divergences between teacher and student next-token distributions.

Conventions (``p_T`` teacher, ``p_S`` student, both softmax(logits / temperature)):

- ``forward_kl``: KL(p_T || p_S) = sum p_T (log p_T - log p_S).
- ``reverse_kl``: KL(p_S || p_T).
- ``jsd``: generalized Jensen-Shannon divergence of GKD (arXiv 2306.13649, as in TRL's GKDTrainer):
  ``m = beta p_T + (1 - beta) p_S``, ``JSD_beta = beta KL(p_T || m) + (1 - beta) KL(p_S || m)``.
  ``JSD_beta`` itself tends to 0 at both ends; ``JSD_beta / beta -> KL(p_T || p_S)`` as beta -> 0 and
  ``JSD_beta / (1 - beta) -> KL(p_S || p_T)`` as beta -> 1. Following GKD/TRL, ``beta=0`` computes
  forward KL and ``beta=1`` reverse KL; interior values are the unnormalised ``JSD_beta``.
- ``tv``: total variation 0.5 * sum |p_T - p_S|.
- ``skew_kl``: skew KL of DistiLLM (Ko et al., 2024): KL(p_T || a p_T + (1 - a) p_S) with ``a = beta``
  (DistiLLM uses a = 0.1; a = 0 is forward KL, a = 1 gives 0).

All mixtures are formed in log space (logaddexp), so no log(0) appears. Logits must be finite.

Temperature: both logits are divided by ``temperature`` and the divergence is multiplied by
``temperature**2`` (Hinton et al.), so gradient magnitudes stay comparable across temperatures.

Hard labels: with ``ce_weight = w`` the per-token loss is ``(1 - w) * KD + w * CE`` where CE is the
student's cross-entropy on ``labels`` at temperature 1. Positions with ``labels == ignore_index``
count for neither term.

Sparse teacher (``top_k`` / ``top_p``): per position the teacher keeps its ``top_k`` most probable
tokens (``top_p``: the smallest most-probable set with mass >= top_p; both: the intersection) with
their exact probabilities; the remaining teacher mass ``1 - sum(kept)`` becomes one "rest" bucket that
is compared against the student's total mass outside the kept tokens. Both distributions stay
normalised over ``kept + 1`` buckets, and when the rest holds a single token (or none) the loss equals
the full-vocabulary loss exactly.

Teacher-bounded KD (``bound_margin = m``, needs ``labels``): the KD term of a position is 0 where the student
already beats the teacher on the true next token by at least ``m`` nats, i.e. where
``CE_student + m <= CE_teacher`` (both at temperature 1); elsewhere it is unchanged. The CE term is not bounded.

Padded heads (``vocab_size = n``): teacher and student heads may differ in rows past the tokenizer's ``n`` ids.
Both logits are widened with -inf columns to the larger head and every column ``>= n`` is set to -inf
before the softmax, so padding rows get no probability (and the student's no gradient).

Per-token weighting (``token_weighting``) multiplies each position's KD term by a weight from the teacher's
distribution at temperature 1 (no gradient), the mean still dividing by the number of counted positions:
``confidence``: the teacher's top probability ``max_v p_T``; ``entropy``: ``H(p_T) / log V`` (in [0, 1]),
which stresses the positions where the teacher spreads its mass.
"""

from __future__ import annotations

import math
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Divergence = Literal["forward_kl", "reverse_kl", "jsd", "tv", "skew_kl"]
DIVERGENCES: tuple[str, ...] = get_args(Divergence)
TokenWeighting = Literal["none", "confidence", "entropy"]
TOKEN_WEIGHTINGS: tuple[str, ...] = get_args(TokenWeighting)


def _log_mix(lp_a: Tensor, lp_b: Tensor, weight_a: float) -> Tensor:
    """log(weight_a * exp(lp_a) + (1 - weight_a) * exp(lp_b)), for 0 < weight_a < 1."""
    return torch.logaddexp(lp_a + math.log(weight_a), lp_b + math.log1p(-weight_a))


def _kl_terms(lp_p: Tensor, lp_q: Tensor) -> Tensor:
    """Elementwise p (log p - log q) (summing over the last dim gives KL(p || q))."""
    return lp_p.exp() * (lp_p - lp_q)


def divergence_terms(lp_t: Tensor, lp_s: Tensor, divergence: str, beta: float) -> Tensor:
    """Elementwise terms whose sum over the last dim is the divergence between teacher and student.

    ``lp_t`` / ``lp_s`` are log-probabilities over the same buckets (finite values).
    """
    if divergence == "forward_kl" or (divergence == "jsd" and beta == 0.0) or (divergence == "skew_kl" and beta == 0.0):
        return _kl_terms(lp_t, lp_s)
    if divergence == "reverse_kl" or (divergence == "jsd" and beta == 1.0):
        return _kl_terms(lp_s, lp_t)
    if divergence == "jsd":
        lp_m = _log_mix(lp_t, lp_s, beta)
        return beta * _kl_terms(lp_t, lp_m) + (1.0 - beta) * _kl_terms(lp_s, lp_m)
    if divergence == "tv":
        return 0.5 * (lp_t.exp() - lp_s.exp()).abs()
    if divergence == "skew_kl":
        if beta == 1.0:
            return torch.zeros_like(lp_s)
        return _kl_terms(lp_t, _log_mix(lp_t, lp_s, beta))
    raise ValueError(f"divergence={divergence!r}: choose one of {list(DIVERGENCES)}")


def teacher_keep_mask(lp_t: Tensor, top_k: int | None, top_p: float | None) -> Tensor:
    """Bool mask [..., V] of the teacher tokens kept by top-k and/or top-p (at least one per row)."""
    vocab = lp_t.shape[-1]
    keep = torch.ones_like(lp_t, dtype=torch.bool)
    if top_k is not None and top_k < vocab:
        idx = lp_t.topk(top_k, dim=-1).indices
        keep = torch.zeros_like(keep).scatter_(-1, idx, True)
    if top_p is not None:
        sorted_lp, order = lp_t.sort(dim=-1, descending=True)
        probs = sorted_lp.exp()
        mass_before = probs.cumsum(-1) - probs
        keep_sorted = mass_before < top_p
        keep = keep & torch.zeros_like(keep).scatter_(-1, order, keep_sorted)
    return keep


def sparse_buckets(lp_t: Tensor, lp_s: Tensor, keep: Tensor, columns: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Kept tokens plus one rest bucket: (lp_t, lp_s, valid) of shape [..., V + 1].

    Dropped tokens and an empty rest bucket are invalid; their log-probabilities are set to 0
    (finite placeholders, so that no nan reaches the backward pass) and must be masked by ``valid``.
    ``columns`` (bool [V], optional): the token columns; others (padding) are neither kept nor in the rest.
    """
    if columns is not None:
        keep = keep & columns
    dropped = ~keep if columns is None else ~keep & columns
    has_rest = dropped.any(-1, keepdim=True)
    # Rows without a rest bucket take logsumexp over all tokens (finite; masked out below).
    rest_from = dropped | ~has_rest

    def rest(lp: Tensor) -> Tensor:
        return torch.logsumexp(lp.masked_fill(~rest_from, float("-inf")), dim=-1, keepdim=True)

    zero = lp_t.new_zeros(())
    bucket_t = torch.cat([torch.where(keep, lp_t, zero), torch.where(has_rest, rest(lp_t), zero)], -1)
    bucket_s = torch.cat([torch.where(keep, lp_s, zero), torch.where(has_rest, rest(lp_s), zero)], -1)
    return bucket_t, bucket_s, torch.cat([keep, has_rest], -1)


def mask_padding(logits: Tensor, width: int, vocab_size: int) -> Tensor:
    """``logits`` widened to ``width`` columns with -inf, and columns ``>= vocab_size`` set to -inf."""
    if logits.shape[-1] < width:
        pad = logits.new_full((*logits.shape[:-1], width - logits.shape[-1]), float("-inf"))
        logits = torch.cat([logits, pad], -1)
    if vocab_size < width:
        logits = logits.masked_fill(torch.arange(width, device=logits.device) >= vocab_size, float("-inf"))
    return logits


class LogitKDLoss(nn.Module):
    """Distillation loss between student and teacher logits (see the module docstring)."""

    def __init__(
        self,
        divergence: Divergence = "forward_kl",
        *,
        temperature: float = 1.0,
        beta: float = 0.5,
        top_k: int | None = None,
        top_p: float | None = None,
        ce_weight: float = 0.0,
        ignore_index: int = -100,
        reduction: Literal["mean", "sum"] = "mean",
        bound_margin: float | None = None,
        token_weighting: TokenWeighting = "none",
        vocab_size: int | None = None,
        detach_teacher: bool = True,
    ):
        """``detach_teacher=False``: the teacher logits receive the divergence's gradient too (a trained target);
        the per-token weights and the top-k / top-p selection stay constants."""
        super().__init__()
        self.detach_teacher = bool(detach_teacher)
        if vocab_size is not None and vocab_size < 1:
            raise ValueError(f"vocab_size={vocab_size!r} must be >= 1 (or None: heads of equal size, nothing masked)")
        self.vocab_size = vocab_size
        if bound_margin is not None and not bound_margin >= 0:
            raise ValueError(f"bound_margin={bound_margin!r} must be >= 0 (or None for no bound)")
        if token_weighting not in TOKEN_WEIGHTINGS:
            raise ValueError(f"token_weighting={token_weighting!r}: choose one of {list(TOKEN_WEIGHTINGS)}")
        self.bound_margin = None if bound_margin is None else float(bound_margin)
        self.token_weighting = token_weighting
        if divergence not in DIVERGENCES:
            raise ValueError(f"divergence={divergence!r}: choose one of {list(DIVERGENCES)}")
        if not temperature > 0:
            raise ValueError(f"temperature={temperature!r} must be > 0")
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"beta={beta!r} must be in [0, 1]")
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k={top_k!r} must be >= 1 (or None for the full vocabulary)")
        if top_p is not None and not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p={top_p!r} must be in (0, 1] (or None for the full vocabulary)")
        if not 0.0 <= ce_weight <= 1.0:
            raise ValueError(f"ce_weight={ce_weight!r} must be in [0, 1]")
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction={reduction!r}: choose 'mean' or 'sum'")
        self.divergence = divergence
        self.temperature = float(temperature)
        self.beta = float(beta)
        self.top_k = top_k
        self.top_p = top_p
        self.ce_weight = float(ce_weight)
        self.ignore_index = ignore_index
        self.reduction = reduction

    def extra_repr(self) -> str:
        return (
            f"divergence={self.divergence!r}, temperature={self.temperature}, beta={self.beta}, top_k={self.top_k}, "
            f"top_p={self.top_p}, ce_weight={self.ce_weight}, reduction={self.reduction!r}, "
            f"bound_margin={self.bound_margin}, token_weighting={self.token_weighting!r}, vocab_size={self.vocab_size}"
        )

    # ------------------------------------------------------------------ building blocks
    def check_inputs(self, student_shape: torch.Size, teacher_shape: torch.Size, labels: Tensor | None) -> None:
        """Raise ValueError on mismatched shapes or missing labels."""
        if self.vocab_size is not None:
            if min(student_shape[-1], teacher_shape[-1]) < self.vocab_size:
                raise ValueError(
                    f"student vocabulary ({student_shape[-1]}) or teacher vocabulary ({teacher_shape[-1]}) is smaller than "
                    f"vocab_size={self.vocab_size}: both heads must cover the tokenizer's ids"
                )
        elif student_shape[-1] != teacher_shape[-1]:
            raise ValueError(
                f"student vocabulary ({student_shape[-1]}) != teacher vocabulary ({teacher_shape[-1]}): "
                "student and teacher must share the tokenizer and the lm_head size"
            )
        if student_shape[:-1] != teacher_shape[:-1]:
            raise ValueError(f"student positions {tuple(student_shape[:-1])} != teacher positions {tuple(teacher_shape[:-1])}")
        if labels is None and self.ce_weight > 0:
            raise ValueError(f"ce_weight={self.ce_weight} needs labels; pass labels or set ce_weight=0")
        if labels is None and self.bound_margin is not None:
            raise ValueError(f"bound_margin={self.bound_margin} needs labels; pass labels or set bound_margin=None")
        if labels is not None and labels.shape != student_shape[:-1]:
            raise ValueError(f"labels shape {tuple(labels.shape)} != logits positions {tuple(student_shape[:-1])}")

    def align_logits(self, student_logits: Tensor, teacher_logits: Tensor) -> tuple[Tensor, Tensor]:
        """Both logits at the larger head's width with padding columns (``>= vocab_size``) at -inf; as given without vocab_size."""
        if self.vocab_size is None:
            return student_logits, teacher_logits
        width = max(student_logits.shape[-1], teacher_logits.shape[-1])
        return mask_padding(student_logits, width, self.vocab_size), mask_padding(teacher_logits, width, self.vocab_size)

    def token_columns(self, width: int, device: torch.device) -> Tensor | None:
        """Bool [width] of token columns (None when no column is padding)."""
        if self.vocab_size is None or self.vocab_size >= width:
            return None
        return torch.arange(width, device=device) < self.vocab_size

    def kd_per_token(self, student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
        """Temperature-scaled divergence per position ([..., V] -> [...]), T^2 included (logits already aligned)."""
        compute_dtype = torch.promote_types(student_logits.dtype, torch.float32)
        t = self.temperature
        if self.detach_teacher:
            teacher_logits = teacher_logits.detach()
        student_logits, teacher_logits = student_logits.to(compute_dtype), teacher_logits.to(compute_dtype)
        if t != 1.0:
            student_logits, teacher_logits = student_logits / t, teacher_logits / t
        lp_s = F.log_softmax(student_logits, dim=-1)
        lp_t = F.log_softmax(teacher_logits, dim=-1)
        columns = self.token_columns(lp_t.shape[-1], lp_t.device)
        if self.top_k is None and self.top_p is None:
            if columns is None:
                per_token = divergence_terms(lp_t, lp_s, self.divergence, self.beta).sum(-1)
            else:  # padding columns: finite placeholders, masked out
                zero = lp_t.new_zeros(())
                terms = divergence_terms(torch.where(columns, lp_t, zero), torch.where(columns, lp_s, zero), self.divergence, self.beta)
                per_token = torch.where(columns, terms, zero).sum(-1)
        else:
            keep = teacher_keep_mask(lp_t, self.top_k, self.top_p)
            bucket_t, bucket_s, valid = sparse_buckets(lp_t, lp_s, keep, columns)
            terms = divergence_terms(bucket_t, bucket_s, self.divergence, self.beta)
            per_token = torch.where(valid, terms, terms.new_zeros(())).sum(-1)
        return per_token * (t * t)

    @property
    def needs_labels(self) -> bool:
        """Whether the loss reads ``labels`` (CE or the teacher bound)."""
        return self.ce_weight > 0 or self.bound_margin is not None

    def kd_token_weights(self, student_logits: Tensor, teacher_logits: Tensor, labels: Tensor | None) -> Tensor | None:
        """Per-position factor of the KD term [...] from the bound and the weighting (None: all 1); no gradient."""
        if self.bound_margin is None and self.token_weighting == "none":
            return None
        with torch.no_grad():
            dtype = torch.promote_types(student_logits.dtype, torch.float32)
            lp_t = F.log_softmax(teacher_logits.detach().to(dtype), dim=-1)
            weight = torch.ones(lp_t.shape[:-1], dtype=dtype, device=lp_t.device)
            if self.token_weighting == "confidence":
                weight = lp_t.max(-1).values.exp()
            elif self.token_weighting == "entropy":
                plogp = lp_t.exp() * lp_t
                if self.vocab_size is not None:  # padding columns: 0 * -inf
                    plogp = torch.where(torch.isfinite(lp_t), plogp, plogp.new_zeros(()))
                weight = -plogp.sum(-1) / math.log(min(lp_t.shape[-1], self.vocab_size or lp_t.shape[-1]))
            if self.bound_margin is not None:
                safe = labels.clamp_min(0).unsqueeze(-1)
                ce_t = -lp_t.gather(-1, safe).squeeze(-1)
                ce_s = -F.log_softmax(student_logits.detach().to(dtype), dim=-1).gather(-1, safe).squeeze(-1)
                weight = torch.where(ce_s + self.bound_margin <= ce_t, torch.zeros_like(weight), weight)
        return weight

    def token_mask(self, labels: Tensor | None) -> Tensor | None:
        """Bool mask of counted positions (None when every position counts)."""
        return None if labels is None else labels != self.ignore_index

    def denominator(self, labels: Tensor | None, num_positions: int) -> float:
        """What the summed loss is divided by: counted tokens (at least 1) for "mean", 1 for "sum"."""
        if self.reduction == "sum":
            return 1.0
        count = num_positions if labels is None else int((labels != self.ignore_index).sum())
        return float(max(count, 1))

    def summed_loss(self, student_logits: Tensor, teacher_logits: Tensor, labels: Tensor | None) -> Tensor:
        """Sum over counted positions of ``(1 - ce_weight) * KD + ce_weight * CE`` (no reduction by count)."""
        student_logits, teacher_logits = self.align_logits(student_logits, teacher_logits)
        student_logits = student_logits.reshape(-1, student_logits.shape[-1])
        teacher_logits = teacher_logits.reshape(-1, teacher_logits.shape[-1])
        labels = None if labels is None else labels.reshape(-1)
        per_token = student_logits.new_zeros((), dtype=torch.promote_types(student_logits.dtype, torch.float32))
        if self.ce_weight < 1.0:
            per_token = (1.0 - self.ce_weight) * self.kd_per_token(student_logits, teacher_logits)
            kd_weights = self.kd_token_weights(student_logits, teacher_logits, labels)
            if kd_weights is not None:
                per_token = per_token * kd_weights
        if self.ce_weight > 0.0:
            ce = F.cross_entropy(
                student_logits.to(per_token.dtype), labels, ignore_index=self.ignore_index, reduction="none"
            )
            per_token = per_token + self.ce_weight * ce
        mask = self.token_mask(labels)
        if mask is not None:
            per_token = torch.where(mask, per_token, per_token.new_zeros(()))
        return per_token.sum()

    def summed_loss_and_grad(self, student_logits: Tensor, teacher_logits: Tensor, labels: Tensor | None,
                             scale: float) -> tuple[Tensor, Tensor] | None:
        """:meth:`summed_loss` of [N, V] logits and ``scale`` x its gradient w.r.t. ``student_logits``, in closed form;
        None where it does not apply (another divergence, a temperature, top-k / top-p, the bound, token weights,
        padding columns).

        Forward KL plus CE: the gradient of ``(1 - w) KL(p_t || p_s) + w CE`` w.r.t. the student logits is
        ``p_s - (1 - w) p_t - w onehot(y)``, so a chunk needs two log-softmaxes, their exps and two dot products
        instead of autograd's passes through log-softmax, the KL terms and a second log-softmax for the CE.
        """
        closed_form = (self.divergence == "forward_kl" and self.temperature == 1.0 and self.top_k is None and self.top_p is None
                       and self.bound_margin is None and self.token_weighting == "none")
        w = self.ce_weight
        if (not closed_form or student_logits.shape != teacher_logits.shape or (w > 0 and labels is None)
                or self.token_columns(student_logits.shape[-1], student_logits.device) is not None):
            return None
        lp_s = F.log_softmax(student_logits.detach(), -1)
        grad = torch.exp(lp_s)  # p_s, becomes the gradient in place
        per_token = torch.zeros(lp_s.shape[0], dtype=lp_s.dtype, device=lp_s.device)
        if w < 1.0:
            lp_t = F.log_softmax(teacher_logits.detach(), -1)
            p_t = torch.exp(lp_t)
            per_token += (1.0 - w) * (torch.linalg.vecdot(p_t, lp_t) - torch.linalg.vecdot(p_t, lp_s))  # KL(p_t || p_s)
            grad.sub_(p_t, alpha=1.0 - w)
            del p_t, lp_t
        mask = self.token_mask(labels)
        if w > 0.0:
            rows = torch.arange(lp_s.shape[0], device=lp_s.device)
            targets = torch.where(mask, labels, 0)
            per_token -= w * lp_s[rows, targets]
            grad[rows, targets] -= w
        row_scale = torch.full_like(per_token, scale)
        if mask is not None:
            per_token = torch.where(mask, per_token, 0.0)
            row_scale = torch.where(mask, row_scale, 0.0)
        return per_token.sum(), grad.mul_(row_scale[:, None])

    # ------------------------------------------------------------------ forward
    def forward(self, student_logits: Tensor, teacher_logits: Tensor, labels: Tensor | None = None) -> Tensor:
        """Loss of ``student_logits`` [..., V] against ``teacher_logits`` [..., V] (no gradient to the teacher).

        ``labels`` [...] (already shifted by the caller) masks ``ignore_index`` positions and feeds CE.
        """
        self.check_inputs(student_logits.shape, teacher_logits.shape, labels)
        num_positions = student_logits.numel() // max(student_logits.shape[-1], 1)
        return self.summed_loss(student_logits, teacher_logits, labels) / self.denominator(labels, num_positions)
