"""Prune time estimate: the decoder-layer passes of the steps after the calibration pass, priced at its speed.

Under a multi-process launch the steps after calibration (layer loss scores, budget search: sensitivity,
candidate scoring, short-distillation ranking, re-fits) run on every rank (:mod:`.pipeline`); the only
collectives among them are the all-reduces that end each distributed score and the barrier after rank 0's
save, so a rank's next collective can wait as long as the longest stretch between them
(:attr:`LayerPasses.longest_stretch`). The unit of work
is one decoder layer run over one block (a sequence): :func:`count_layer_passes` counts the calibration's own,
:func:`passes_after_calibration` counts the later steps' from the config, and the calibration's seconds per
pass prices them. A pass followed by a backward costs ``1 + BACKWARD_COST`` passes. Not counted: LM-head
projections, pruning copies and least-squares solves; student layers are priced as teacher layers, and the
calibration's statistics hooks slow its passes, so the estimate errs high rather than low.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..adapters import get_adapter
from .layer_importance import _hidden_arg
from .reconstruct import ReconstructionConfig
from .targets import Candidate

if TYPE_CHECKING:
    from .pipeline import PruneConfig

logger = logging.getLogger(__name__)

BACKWARD_COST = 2.0
"""A layer's backward pass, in forward passes."""
TIMEOUT_MARGIN = 1.5
"""The timeout the warning asks for, as a multiple of the estimate."""


@dataclass
class LayerPasses:
    """Decoder-layer passes over one block, per step: all forward passes, and those followed by a backward."""

    forward: dict[str, int] = field(default_factory=dict)
    backward: dict[str, int] = field(default_factory=dict)
    longest_stretch: float = 0.0
    """The cost (as :attr:`cost`) of the longest run of passes between two collectives (see :meth:`collective`)."""
    _stretch: float = field(default=0.0, repr=False)

    def add(self, step: str, passes: int, *, backward: bool = False) -> None:
        """Add ``passes`` forward passes of ``step`` (each followed by a backward when ``backward``)."""
        if passes <= 0:
            return
        self.forward[step] = self.forward.get(step, 0) + passes
        if backward:
            self.backward[step] = self.backward.get(step, 0) + passes
        self._stretch += passes * (1 + (BACKWARD_COST if backward else 0))

    def collective(self) -> None:
        """Mark a collective after the passes added so far (a distributed score's all-reduce, the final barrier)."""
        self.longest_stretch = max(self.longest_stretch, self._stretch)
        self._stretch = 0.0

    @property
    def forwards(self) -> int:
        """Forward passes of all steps."""
        return sum(self.forward.values())

    @property
    def cost(self) -> float:
        """Forward-pass equivalents: every forward pass plus ``BACKWARD_COST`` per backward."""
        return self.forwards + BACKWARD_COST * sum(self.backward.values())


@contextmanager
def count_layer_passes(model: nn.Module, step: str = "calibration") -> Iterator[LayerPasses]:
    """Count ``model``'s decoder-layer passes (rows of each layer input) inside the block; a pass run with
    autograd on counts as followed by a backward."""
    passes = LayerPasses()

    def hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        passes.add(step, int(_hidden_arg(args, kwargs).shape[0]), backward=torch.is_grad_enabled())

    layers = get_adapter(model).decoder_layers(model)
    handles = [layer.register_forward_pre_hook(hook, with_kwargs=True) for layer in layers]
    try:
        yield passes
    finally:
        for handle in handles:
            handle.remove()


def refit_passes(teacher_shape: dict[str, int], shape: dict[str, int], cfg: ReconstructionConfig, *,
                 teacher_grams: bool) -> int:
    """Decoder-layer passes per calibration block of :func:`.reconstruct.reconstruct` re-fitting ``shape``.

    With ``G`` projection groups per layer, ``S`` student layers and ``k`` the last kept teacher layer (taken
    as the teacher's last: an upper bound when depth is cut): none when ``G = 0`` or a teacher-mode re-fit is
    solved from the calibration's Gram matrices (``teacher_grams``); teacher mode ``2k + 1``; sequential
    ``2k + (S - 1)(2G + 1) + 2G``.
    """
    if not cfg.enabled:
        return 0
    hidden_cut = shape["hidden_size"] < teacher_shape["hidden_size"]
    mode = cfg.mode if cfg.mode != "auto" else "sequential" if hidden_cut and cfg.refit_inputs else "teacher"
    inputs = cfg.refit_inputs and hidden_cut
    every = inputs and mode == "sequential"
    groups = 2 * int(inputs)
    groups += int("o_proj" in cfg.targets and (every or shape["num_heads"] < teacher_shape["num_heads"]))
    groups += int("down_proj" in cfg.targets and (every or shape["intermediate_size"] < teacher_shape["intermediate_size"]))
    if groups == 0 or (mode == "teacher" and not inputs and teacher_grams):
        return 0
    k = teacher_shape["num_layers"] - 1
    if mode == "teacher":
        return 2 * k + 1
    return 2 * k + (shape["num_layers"] - 1) * (2 * groups + 1) + 2 * groups


def layer_loss_passes(method: str, num_layers: int, max_drop: int) -> int:
    """Decoder-layer passes per block of :func:`.layer_importance.layer_loss_scores`: ``lm_loss`` runs every
    layer ``L + 1`` times; ``iterative`` step ``k`` (``R = L - k`` layers left) ``R`` for the current model plus
    ``R(R - 1)/2`` for the trials, which run only the layers above the removed one."""
    if method == "lm_loss":
        return (num_layers + 1) * num_layers
    if method == "iterative":
        return sum((r := num_layers - k) + r * (r - 1) // 2 for k in range(max_drop))
    return 0


def passes_after_calibration(
    cfg: PruneConfig,
    teacher_shape: dict[str, int],
    *,
    calib_blocks: int,
    max_drop: int,
    teacher_grams: bool,
    target: dict[str, int] | None = None,
    candidates: Sequence[Candidate] = (),
    sensitivity: Sequence[dict[str, int]] = (),
    score_blocks: int = 0,
    teacher_cache: bool = False,
) -> LayerPasses:
    """The decoder-layer passes :func:`.pipeline.prune_model` runs after its calibration pass, per step.

    ``target``: the explicit shape (else a budget search over ``candidates``, after the ``sensitivity``
    shapes). ``calib_blocks``: calibration blocks (re-fits and layer loss scores run on all of them, on every
    rank); ``score_blocks``: the search's scoring blocks; ``teacher_grams``: the calibration kept the teacher's
    Gram matrices; ``teacher_cache``: the short-distillation ranking reads the teacher from its cache. Which
    candidates the short distillation and the final re-fit take is known only after scoring: the costliest
    eligible ones are counted.
    """
    passes = LayerPasses()
    layers = teacher_shape["num_layers"]
    rcfg = cfg.reconstruction
    if cfg.layer_method in ("lm_loss", "iterative") and max_drop > 0:
        passes.add("layer_loss", layer_loss_passes(cfg.layer_method, layers, max_drop)
                   * min(cfg.layer_loss_blocks, calib_blocks))
    if target is not None:
        passes.add("reconstruction", refit_passes(teacher_shape, target, rcfg, teacher_grams=teacher_grams) * calib_blocks)
        passes.collective()  # the barrier after rank 0's save
        return passes
    search = cfg.search

    def refit(shape: dict[str, int]) -> int:
        return refit_passes(teacher_shape, shape, rcfg, teacher_grams=teacher_grams) * calib_blocks

    def score(shape: dict[str, int]) -> int:
        return shape["num_layers"] * score_blocks

    if search.score == "kl":  # the teacher's hidden states on the scoring blocks, once
        passes.add("search_teacher", layers * score_blocks)
    if search.sensitivity:
        if search.score != "kl":  # the teacher's own loss
            passes.add("search_teacher", layers * score_blocks)
            passes.collective()
        refits = search.reconstruct if search.sensitivity_reconstruct is None else search.sensitivity_reconstruct
        for shape in sensitivity:
            passes.add("sensitivity", (refit(shape) if refits else 0) + score(shape))
            passes.collective()
    for cand in candidates:
        passes.add("candidates", (refit(cand.shape) if search.reconstruct and cand.eligible else 0) + score(cand.shape))
        passes.collective()
    eligible = [c.shape for c in candidates if c.eligible]
    if search.distill_steps > 0:
        blocks = search.distill_steps * search.distill_batch_size
        if not teacher_cache:
            passes.add("distill_rank", layers * blocks)
        top = sorted(eligible, key=lambda s: refit(s) + s["num_layers"] * ((1 + BACKWARD_COST) * blocks + score_blocks),
                     reverse=True)
        for shape in top[: search.distill_candidates]:
            passes.add("distill_rank", refit(shape) + score(shape))
            passes.add("distill_rank", shape["num_layers"] * blocks, backward=True)
            passes.collective()
        passes.add("winner_reconstruction", max((refit(s) for s in top[: search.distill_candidates]), default=0))
    elif not search.reconstruct:  # the winner's re-fit (teacher mode: from the calibration's Gram matrices)
        passes.add("winner_reconstruction", max((refit(s) for s in eligible), default=0))
    passes.collective()  # the barrier after rank 0's save
    return passes


@dataclass
class PruneEstimate:
    """The steps after calibration (``passes``) priced at the calibration's measured speed."""

    passes: LayerPasses
    calibration: LayerPasses
    """The passes the calibration ran on this rank (none when its statistics came from the cache)."""
    calibration_s: float

    @property
    def seconds_per_pass(self) -> float | None:
        """Measured seconds per forward-pass equivalent; None when the calibration ran no pass."""
        return self.calibration_s / self.calibration.cost if self.calibration.cost else None

    @property
    def seconds(self) -> float | None:
        """Estimated seconds of the steps after calibration; None without a measured speed."""
        speed = self.seconds_per_pass
        return None if speed is None else self.passes.cost * speed

    @property
    def longest_wait_seconds(self) -> float | None:
        """Estimated seconds of the longest stretch without a collective (what a rank's next collective may wait)."""
        speed = self.seconds_per_pass
        return None if speed is None else self.passes.longest_stretch * speed


def report_estimate(estimate: PruneEstimate, *, distributed: bool, timeout_s: float | None) -> bool:
    """Log the estimate (info) and, for a distributed prune whose estimate exceeds the process group's
    ``timeout_s``, one warning with the timeout to set. True when it warned."""
    seconds = estimate.seconds
    if seconds is None:
        logger.info("prune time estimate: none (the calibration ran no forward to measure its speed, e.g. its "
                    "statistics came from the importance cache)")
        return False
    steps = ", ".join(f"{k} {v:,}" for k, v in estimate.passes.forward.items()) or "none"
    wait = estimate.longest_wait_seconds
    logger.info("prune time estimate after calibration: %.0f s (%.1f min), the longest without a collective %.0f s: "
                "%s decoder-layer passes over a block (%s) at %.3g s each, measured by the calibration", seconds,
                seconds / 60, wait, f"{estimate.passes.cost:,.0f}", steps, estimate.seconds_per_pass)
    if not distributed or timeout_s is None or wait <= timeout_s:
        return False
    minutes = math.ceil(TIMEOUT_MARGIN * wait / 60)
    logger.warning(
        "the longest stretch of the pruning steps after calibration without a collective (layer loss scores, one "
        "candidate's re-fit and scoring, the winner's re-fit and rank 0's save) is estimated at %.0f s (%.1f min) from "
        "the calibration's speed, longer than the process group's timeout of %.0f s (%.1f min): a rank's next "
        "collective may wait that long and time out, which kills the run. Raise train.process_group_timeout_minutes "
        "to at least %d, or prune once in a single process (minidistill prune with prune.output_dir) and start the "
        "run from the saved student (student.source=DIR)", wait, wait / 60, timeout_s, timeout_s / 60, minutes)
    return True


__all__ = ["BACKWARD_COST", "LayerPasses", "PruneEstimate", "count_layer_passes", "layer_loss_passes",
           "passes_after_calibration", "refit_passes", "report_estimate"]
