"""Rank the best zero-shot candidates after a short distillation (Minitron: zero-shot scores of
equal-size candidates are unstable; a few hundred steps of retraining separate them).

Each of the top ``search.distill_candidates`` candidates (by zero-shot score) is built as the recipe
would start from it (pruned and reconstructed), distilled for ``search.distill_steps`` steps on the
first ``steps x distill_batch_size`` training blocks, in order, with the same seed, using logit KD
(forward KL on the teacher's logits, :class:`FusedLogitKDLoss`: full-vocabulary logits never exist
for a whole batch) and AdamW at a constant ``search.distill_lr``; then it is scored on the search's
scoring blocks with the search's score. The teacher runs once per batch for all candidates: its final hidden
states are computed once and reused (``steps x batch x seq x hidden`` floats). The winner's
short-distilled weights are discarded: the search returns the winner's pruned + reconstructed init,
the starting point the distillation recipe expects.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from ..adapters import get_adapter
from ..config import ConfigError
from ..distill.losses.cached import CachedLogitKDLoss
from ..distill.losses.fused import FusedLogitKDLoss
from ..distill.teacher_cache import TeacherCache
from .targets import SHAPE_TARGET_KEYS, SearchConfig, format_rows, teacher_hidden_states

logger = logging.getLogger(__name__)


def check_distill_data(search: SearchConfig, num_train_blocks: int) -> None:
    """Refuse a short distillation that needs more training blocks than there are (before pruning).

    With ``search.score_on=train_tail`` the last ``score_blocks`` are the search's and are not trained on.
    """
    need = search.distill_steps * search.distill_batch_size
    free = num_train_blocks - (search.score_blocks if search.score_on == "train_tail" else 0)
    if search.distill_steps > 0 and need > free:
        most = max(free, 0) // search.distill_batch_size
        where = f"data.train holds {num_train_blocks}"
        if free != num_train_blocks:
            where += f", {max(free, 0)} before the search's {search.score_blocks} scoring blocks"
        raise ConfigError(
            f"search.distill_steps={search.distill_steps} x search.distill_batch_size={search.distill_batch_size} "
            f"needs {need} training blocks but {where}; set search.distill_steps <= "
            f"{most}, lower search.distill_batch_size, or use more training text"
        )


def distill_batches(train_ids: torch.Tensor, search: SearchConfig) -> list[torch.Tensor]:
    """The short distillation's batches: consecutive training blocks, the same for every candidate."""
    bs = search.distill_batch_size
    return [train_ids[i * bs : (i + 1) * bs] for i in range(search.distill_steps)]


def _head(model: nn.Module) -> nn.Module:
    return model.get_submodule(get_adapter(model).lm_head)


def short_distill(
    student: nn.Module,
    teacher_head: nn.Module | None,
    teacher_hidden: Sequence[torch.Tensor] | None,
    batches: Sequence[torch.Tensor],
    *,
    lr: float,
    seed: int,
    chunk_tokens: int = 256,
    cached: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = None,
    vocab_size: int | None = None,
) -> list[float]:
    """Distill ``student`` in place for one step per batch against precomputed teacher final hidden states, or
    against the teacher cache's rows of the batches (``cached``: ``(indices, logprobs, rest)`` per batch, as
    :meth:`~minidistill.distill.teacher_cache.TeacherCache.rows` gives them; the positions that predict a next token).

    Returns the per-step loss (forward KL per position, temperature 1).
    """
    torch.manual_seed(seed)
    adapter = get_adapter(student)
    backbone = student.get_submodule(adapter.backbone)
    head = student.get_submodule(adapter.lm_head)
    loss_fn = FusedLogitKDLoss("forward_kl", chunk_tokens=chunk_tokens)
    cached_fn = CachedLogitKDLoss(chunk_tokens=chunk_tokens, vocab_size=vocab_size)
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    device = next(student.parameters()).device
    if cached is None:
        t_weight = teacher_head.weight.detach()
        t_bias = None if getattr(teacher_head, "bias", None) is None else teacher_head.bias.detach()
    losses = []
    student.train()
    for ids, teacher_batch in zip(batches, teacher_hidden if cached is None else cached, strict=True):
        hidden = backbone(input_ids=ids.to(device)).last_hidden_state
        if cached is None:
            loss = loss_fn(hidden, head.weight, teacher_batch.to(device), t_weight,
                           student_head_bias=getattr(head, "bias", None), teacher_head_bias=t_bias)
        else:
            idx, lp, rest = (x.to(device) for x in teacher_batch)
            loss = cached_fn(hidden[:, :-1], head.weight, idx.long(), lp.to(hidden.dtype), rest.to(hidden.dtype),
                             student_head_bias=getattr(head, "bias", None))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    student.eval()
    opt.zero_grad(set_to_none=True)
    return losses


def distill_rank(
    teacher: nn.Module,
    rows: list[dict[str, Any]],
    build: Callable[[dict[str, int], bool], tuple[nn.Module, Any]],
    train_ids: torch.Tensor,
    score_fn: Callable[[nn.Module], float],
    search: SearchConfig,
    cache: TeacherCache | None = None,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Re-rank ``rows`` (zero-shot, best first) after a short distillation of the top eligible ones.

    Adds ``distilled_<score>``, ``distill_s`` (seconds spent on the candidate: build, steps, scoring)
    and ``distill_losses`` (first / last step) to each distilled row; distilled rows rank first by
    their score after the steps, the others follow by zero-shot score. Returns the rows and the
    winning row. With the run's teacher ``cache`` (built over ``train_ids``) the candidates read the teacher's
    top-k of their batches from it and the teacher does not run.
    """
    batches = distill_batches(train_ids, search)
    t0 = time.perf_counter()
    if cache is None:
        teacher_hidden, cached = teacher_hidden_states(teacher, batches), None  # one teacher forward per batch, for all
    else:
        bs = search.distill_batch_size
        teacher_hidden = None
        cached = [cache.rows(torch.arange(i * bs, i * bs + len(b))) for i, b in enumerate(batches)]
    teacher_s = time.perf_counter() - t0
    key = f"distilled_{search.score}"
    top = [r for r in rows if r["eligible"]][: search.distill_candidates]
    for i, row in enumerate(top):
        t0 = time.perf_counter()
        shape = {k: row[k] for k in SHAPE_TARGET_KEYS}
        shape["head_dim"] = get_adapter(teacher).shape(teacher.config)["head_dim"]
        student, _ = build(shape, True)
        with torch.enable_grad():
            losses = short_distill(student, _head(teacher), teacher_hidden, batches, lr=search.distill_lr,
                                   seed=search.seed, chunk_tokens=min(search.chunk_tokens, 256), cached=cached,
                                   vocab_size=None if cache is None else int(cache.manifest["vocab_size"]))
        row[key] = score_fn(student)
        row["distill_s"] = time.perf_counter() - t0
        row["distill_losses"] = [losses[0], losses[-1]]
        del student
        logger.info("short distillation %d/%d (%d steps): %s -> %s=%.4f (zero-shot %.4f), %.1f s", i + 1, len(top),
                    search.distill_steps, row.get("family"), key, row[key], row[search.score], row["distill_s"])
    distilled = sorted(top, key=lambda r: r[key])
    rest = [r for r in rows if key not in r]
    out = distilled + rest
    for rank, row in enumerate(out, 1):
        row["zero_shot_rank"] = row.get("zero_shot_rank", row["rank"])
        row["rank"] = rank
    logger.info("ranked after %d distillation steps (teacher %s once: %.1f s):\n%s", search.distill_steps,
                "hidden states" if cache is None else "cache rows read", teacher_s, format_rows(out))
    return out, distilled[0]


__all__ = ["check_distill_data", "distill_batches", "distill_rank", "short_distill"]
