"""Memory-flat logit distillation: lm_head projection and loss fused, chunk by chunk over tokens.

:class:`FusedLogitKDLoss` takes the final hidden states and lm_head weights of student and teacher
instead of their logits. The forward pass walks over ``chunk_tokens`` positions at a time: it forms
the chunk's logits of both models (in float32), computes the chunk's loss with
:class:`~minidistill.distill.losses.logits.LogitKDLoss` (so values and gradients are those of the
plain loss) and immediately turns the gradient w.r.t. the chunk's student logits into gradients
w.r.t. the student hidden chunk and the student head weight/bias (accumulated). Only those gradients
(N x D_s and V x D_s) are kept for the backward pass, which scales them by the incoming gradient.
Neither model's full N x V logits ever exist: peak extra memory is a few ``chunk_tokens x V`` buffers.

The teacher side receives no gradient unless the loss is built with ``detach_teacher=False`` and the teacher's
inputs require one (a trained target): its chunk gradients are then turned into gradients w.r.t. the teacher
hidden chunk and head the same way. Double backward is not supported.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from minidistill.distill.losses.logits import Divergence, LogitKDLoss, TokenWeighting, mask_padding


def _as_float(t: Tensor | None) -> Tensor | None:
    """``t`` in (at least) float32; no copy when it already is."""
    if t is None:
        return None
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def mixture_logprobs(logits: list[Tensor], vocab_size: int | None) -> Tensor:
    """Log of the mean of the members' softmax distributions (rows past ``vocab_size`` masked first), [..., V]."""
    width = max(x.shape[-1] for x in logits)
    tokens = width if vocab_size is None else vocab_size
    lps = [F.log_softmax(mask_padding(x, width, tokens), -1) for x in logits]
    return torch.logsumexp(torch.stack(lps), 0) - math.log(len(lps))


def _project(hidden: Tensor, weight: Tensor, bias: Tensor | None, out_dtype: torch.dtype) -> Tensor:
    """``hidden @ weight^T + bias`` in the weight's dtype, returned in ``out_dtype``."""
    return F.linear(hidden.detach().to(weight.dtype), weight, bias).to(out_dtype)


def _accumulate_chunk(
    start: int,
    stop: int,
    student_hidden: Tensor,
    teacher_hidden: Tensor,
    labels: Tensor | None,
    loss_fn: LogitKDLoss,
    denominator: float,
    heads: tuple[Tensor, Tensor | None, Tensor, Tensor | None],
    grads: tuple[Tensor | None, Tensor | None, Tensor | None],
    total: Tensor,
    extra_teachers: list[tuple[Tensor, Tensor, Tensor | None]] = (),
    teacher_grads: tuple[Tensor | None, Tensor | None, Tensor | None] = (None, None, None),
) -> None:
    """Add rows ``start:stop``'s loss to ``total`` and their gradients into ``grads`` (and the teacher's into
    ``teacher_grads``; in place).

    The head matmuls run in the heads' dtype; logits, loss and gradients are in ``total``'s dtype."""
    w_s, b_s, w_t, b_t = heads
    grad_h, grad_w, grad_b = grads
    dtype = total.dtype
    if any(g is not None for g in teacher_grads):
        _accumulate_both(start, stop, student_hidden, teacher_hidden, labels, loss_fn, denominator, heads, grads, total,
                         teacher_grads)
        return
    h_s = student_hidden[start:stop].detach().to(w_s.dtype)
    chunk_labels = None if labels is None else labels[start:stop]
    with torch.no_grad():
        logits_t = _project(teacher_hidden[start:stop], w_t, b_t, dtype)
        if extra_teachers:  # an ensemble teacher: the mean of the members' distributions
            logits_t = mixture_logprobs([logits_t, *(_project(h[start:stop], w.to(w_t.dtype), None if b is None else b.to(w_t.dtype), dtype)
                                                     for h, w, b in extra_teachers)], loss_fn.vocab_size)
        logits_s = _project(h_s, w_s, b_s, dtype)
    if grad_h is None and grad_w is None and grad_b is None:
        with torch.no_grad():
            total += loss_fn.summed_loss(logits_s, logits_t, chunk_labels) / denominator
        return
    closed_form = loss_fn.summed_loss_and_grad(logits_s, logits_t, chunk_labels, 1.0 / denominator)
    if closed_form is not None:
        summed, grad_logits = closed_form
        total += summed / denominator
    else:
        logits_s.requires_grad_(True)
        with torch.enable_grad():
            chunk_loss = loss_fn.summed_loss(logits_s, logits_t, chunk_labels) / denominator
            (grad_logits,) = torch.autograd.grad(chunk_loss, logits_s)
        total += chunk_loss.detach()
        del chunk_loss
    del logits_s, logits_t
    if grad_h is not None:
        if w_s.dtype == dtype:
            torch.mm(grad_logits, w_s, out=grad_h[start:stop])
        else:  # a half-precision head matmul
            grad_h[start:stop] = torch.mm(grad_logits.to(w_s.dtype), w_s)
    if grad_w is not None:
        if w_s.dtype == dtype:
            grad_w.addmm_(grad_logits.t(), h_s)
        else:
            grad_w += torch.mm(grad_logits.t().to(w_s.dtype), h_s)
    if grad_b is not None:
        grad_b += grad_logits.sum(0)


def _head_grads(grad_logits: Tensor, hidden: Tensor, weight: Tensor, start: int, stop: int,
                grads: tuple[Tensor | None, Tensor | None, Tensor | None]) -> None:
    """Chunk logits' gradient -> gradients of the chunk's hidden rows, the head weight and bias (accumulated)."""
    grad_h, grad_w, grad_b = grads
    if grad_h is not None:
        grad_h[start:stop] = torch.mm(grad_logits.to(weight.dtype), weight).to(grad_h.dtype)
    if grad_w is not None:
        grad_w += torch.mm(grad_logits.t().to(weight.dtype), hidden).to(grad_w.dtype)
    if grad_b is not None:
        grad_b += grad_logits.sum(0).to(grad_b.dtype)


def _accumulate_both(start, stop, student_hidden, teacher_hidden, labels, loss_fn, denominator, heads, grads, total,
                     teacher_grads) -> None:
    """:func:`_accumulate_chunk` when the teacher side takes gradients too (autograd on the chunk's logits)."""
    w_s, b_s, w_t, b_t = heads
    dtype = total.dtype
    h_s = student_hidden[start:stop].detach().to(w_s.dtype)
    h_t = teacher_hidden[start:stop].detach().to(w_t.dtype)
    chunk_labels = None if labels is None else labels[start:stop]
    with torch.no_grad():
        logits_s, logits_t = _project(h_s, w_s, b_s, dtype), _project(h_t, w_t, b_t, dtype)
    logits_s.requires_grad_(True)
    logits_t.requires_grad_(True)
    with torch.enable_grad():
        chunk_loss = loss_fn.summed_loss(logits_s, logits_t, chunk_labels) / denominator
        grad_s, grad_t = torch.autograd.grad(chunk_loss, (logits_s, logits_t), allow_unused=True)
    total += chunk_loss.detach()
    for grad_logits, hidden, weight, out in ((grad_s, h_s, w_s, grads), (grad_t, h_t, w_t, teacher_grads)):
        if grad_logits is None:
            grad_logits = torch.zeros_like(logits_s if out is grads else logits_t)
        _head_grads(grad_logits, hidden, weight, start, stop, out)


def precomputed_grads(ctx: Any, grad_output: Tensor) -> list[Tensor | None]:
    """Backward of a loss whose forward saved the gradients of its inputs (``ctx.has_grads``,
    ``ctx.input_dtypes``): each scaled by ``grad_output`` and cast to its input's dtype."""
    saved = iter(ctx.saved_tensors)
    return [(next(saved) * grad_output).to(dtype) if has else None for has, dtype in zip(ctx.has_grads, ctx.input_dtypes)]


class _FusedLinearKD(torch.autograd.Function):
    """Chunked lm_head + KD loss; saves only the input gradients (see the module docstring)."""

    @staticmethod
    def forward(
        ctx: Any,
        student_hidden: Tensor,
        student_weight: Tensor,
        student_bias: Tensor | None,
        teacher_hidden: Tensor,
        teacher_weight: Tensor,
        teacher_bias: Tensor | None,
        labels: Tensor | None,
        loss_fn: LogitKDLoss,
        chunk_tokens: int,
        extra_teachers: list[tuple[Tensor, Tensor, Tensor | None]] = (),
        head_autocast: bool = False,
    ) -> Tensor:
        need_h, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        teacher_needs = [False] * 3 if loss_fn.detach_teacher else list(ctx.needs_input_grad[3:6])
        if any(teacher_needs) and extra_teachers:
            raise ValueError("an ensemble teacher is frozen: build the loss with detach_teacher=True")
        num_tokens = student_hidden.shape[0]
        denominator = loss_fn.denominator(labels, num_tokens)

        device = student_hidden.device
        heads = [_as_float(None if t is None else t.detach()) for t in (student_weight, student_bias, teacher_weight, teacher_bias)]
        compute_dtype = heads[0].dtype
        if head_autocast and torch.is_autocast_enabled(device.type):  # the head matmuls in autocast's dtype
            heads = [None if t is None else t.to(torch.get_autocast_dtype(device.type)) for t in heads]
        grad_h = torch.empty(student_hidden.shape, dtype=compute_dtype, device=device) if need_h else None
        grad_w = torch.zeros(student_weight.shape, dtype=compute_dtype, device=device) if need_w else None
        grad_b = torch.zeros(student_bias.shape, dtype=compute_dtype, device=device) if need_b else None
        teacher_grads = (
            torch.empty(teacher_hidden.shape, dtype=compute_dtype, device=device) if teacher_needs[0] else None,
            torch.zeros(teacher_weight.shape, dtype=compute_dtype, device=device) if teacher_needs[1] else None,
            torch.zeros(teacher_bias.shape, dtype=compute_dtype, device=device) if teacher_needs[2] else None,
        )
        total = torch.zeros((), dtype=compute_dtype, device=device)

        # Loss and gradients in float32 even under autocast (e.g. bf16 mixed precision); logits too, unless
        # head_autocast rounds them to autocast's dtype.
        with torch.autocast(device_type=device.type, enabled=False):
            for start in range(0, num_tokens, chunk_tokens):
                _accumulate_chunk(
                    start, min(start + chunk_tokens, num_tokens), student_hidden, teacher_hidden, labels, loss_fn,
                    denominator, tuple(heads), (grad_h, grad_w, grad_b), total, extra_teachers, teacher_grads,
                )

        ctx.has_grads = (need_h, need_w, need_b, *(g is not None for g in teacher_grads))
        ctx.input_dtypes = tuple(None if t is None else t.dtype for t in (student_hidden, student_weight, student_bias,
                                                                          teacher_hidden, teacher_weight, teacher_bias))
        ctx.save_for_backward(*(g for g in (grad_h, grad_w, grad_b, *teacher_grads) if g is not None))
        return total

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor):
        return (*precomputed_grads(ctx, grad_output), None, None, None, None, None)


class FusedLogitKDLoss(nn.Module):
    """:class:`LogitKDLoss` on ``hidden @ W^T (+ b)`` of both models, without materialising full logits.

    Takes the same arguments as :class:`LogitKDLoss` (``vocab_size`` for heads that differ by padding rows; the teacher bound and the per-token weights are formed
    chunk by chunk too) plus ``chunk_tokens`` (positions per chunk;
    peak extra memory grows with ``chunk_tokens x vocab``). Logits are computed in float32 per chunk
    whatever the input dtype (half-precision head weights are upcast once per call, V x D each);
    gradients are returned in the inputs' dtypes. Tested bound for bfloat16 inputs: loss within 1e-5
    relative of float32 arithmetic on the same rounded inputs, gradients within bfloat16 rounding (1e-2).
    ``head_precision="autocast"``: under autocast the head matmuls (logits and the two gradient products) run in
    autocast's dtype, as every other linear layer does there; softmax, divergence and the accumulated gradients
    stay float32. Without autocast it changes nothing. ``detach_teacher=False``: teacher inputs that require a
    gradient get the loss's gradient too (a trained target).
    """

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
        chunk_tokens: int = 256,
        bound_margin: float | None = None,
        token_weighting: TokenWeighting = "none",
        vocab_size: int | None = None,
        head_precision: Literal["float32", "autocast"] = "float32",
        detach_teacher: bool = True,
    ):
        super().__init__()
        if chunk_tokens < 1:
            raise ValueError(f"chunk_tokens={chunk_tokens!r} must be >= 1")
        if head_precision not in ("float32", "autocast"):
            raise ValueError(f"head_precision={head_precision!r} must be 'float32' or 'autocast'")
        self.chunk_tokens = int(chunk_tokens)
        self.head_precision = head_precision
        self.loss_fn = LogitKDLoss(
            divergence, temperature=temperature, beta=beta, top_k=top_k, top_p=top_p, ce_weight=ce_weight,
            ignore_index=ignore_index, reduction=reduction, bound_margin=bound_margin, token_weighting=token_weighting,
            vocab_size=vocab_size, detach_teacher=detach_teacher,
        )

    def extra_repr(self) -> str:
        return f"chunk_tokens={self.chunk_tokens}, head_precision={self.head_precision}"

    def forward(
        self,
        student_hidden: Tensor,
        student_head_weight: Tensor,
        teacher_hidden: Tensor,
        teacher_head_weight: Tensor,
        labels: Tensor | None = None,
        *,
        student_head_bias: Tensor | None = None,
        teacher_head_bias: Tensor | None = None,
        extra_teachers: list[tuple[Tensor, Tensor, Tensor | None]] | None = None,
    ) -> Tensor:
        """Loss for hidden states [..., D_s] / [..., D_t] and head weights [V, D_s] / [V, D_t].

        ``extra_teachers``: further ``(hidden [..., D_i], head weight [V, D_i], bias)`` of an ensemble teacher; the
        target is then the mean of all members' distributions (:func:`mixture_logprobs`), tempered as one.
        """
        d_s, d_t = student_hidden.shape[-1], teacher_hidden.shape[-1]
        if student_head_weight.dim() != 2 or student_head_weight.shape[1] != d_s:
            raise ValueError(f"student head weight {tuple(student_head_weight.shape)} does not take hidden size {d_s}")
        if teacher_head_weight.dim() != 2 or teacher_head_weight.shape[1] != d_t:
            raise ValueError(f"teacher head weight {tuple(teacher_head_weight.shape)} does not take hidden size {d_t}")
        student_shape = torch.Size((*student_hidden.shape[:-1], student_head_weight.shape[0]))
        teacher_shape = torch.Size((*teacher_hidden.shape[:-1], teacher_head_weight.shape[0]))
        self.loss_fn.check_inputs(student_shape, teacher_shape, labels)
        flat_labels = None if labels is None else labels.reshape(-1)
        return _FusedLinearKD.apply(
            student_hidden.reshape(-1, d_s),
            student_head_weight,
            student_head_bias,
            teacher_hidden.reshape(-1, d_t),
            teacher_head_weight,
            teacher_head_bias,
            flat_labels,
            self.loss_fn,
            self.chunk_tokens,
            [(h.reshape(-1, h.shape[-1]), w.detach(), None if b is None else b.detach()) for h, w, b in extra_teachers or []],
            self.head_precision == "autocast",
        )
