"""Reconstruction: re-fit the output projection of each pruned block by least squares on calibration data.

For a block whose input units were removed (query heads before ``o_proj``, MLP neurons before
``down_proj``), with ``X`` the teacher's full input to the projection, ``K`` the kept input columns,
``R`` the kept hidden (output) rows and ``W`` the teacher's weight, the student's weight solves

    min_{W_K} ||X_K W_K^T - X W_R^T||^2 + lam ||W_K||^2,   lam = damping * mean(diag(X_K^T X_K))
    =>  W_K^T = (X_K^T X_K + lam I)^{-1} X_K^T X W_R^T

in float64. Only the ``K x K`` Gram block and the ``K x |R|`` cross block are accumulated.

Memory stays bounded by processing ONE TEACHER LAYER AT A TIME (SparseGPT-style): one backbone pass
per calibration batch records the inputs of the first decoder layer and the keyword arguments each
layer receives (masks, rotary embeddings; shared tensors, so stored once), stopping after the last
layer that needs a re-fit. Then the calibration hidden states (``tokens x hidden`` in the teacher's
dtype, on its device) are pushed through the teacher layer by layer; while layer ``l`` runs, hooks
accumulate the statistics of its projections, which are solved and freed before layer ``l + 1``.
Cost: about two teacher forwards over the calibration tokens, plus the Gram products.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..adapters import get_adapter
from ..config import ConfigBase, ConfigError
from .apply import head_rows
from .prune_map import PruneMap

logger = logging.getLogger(__name__)

REFIT_TARGETS = ("o_proj", "down_proj")


@dataclass
class ReconstructionConfig(ConfigBase):
    """Least-squares re-fit of pruned blocks' output projections."""

    enabled: bool = True
    """Re-fit after pruning; off keeps the plain teacher slices."""
    damping: float = 1e-2
    """Ridge strength relative to the mean diagonal of the kept inputs' Gram matrix."""
    targets: list[str] = field(default_factory=lambda: list(REFIT_TARGETS))
    """Projections that may be re-fitted: ``o_proj`` (when heads were removed), ``down_proj`` (neurons)."""

    def validate(self) -> None:
        if not self.damping >= 0.0:
            raise ConfigError(f"reconstruction.damping={self.damping}: must be >= 0")
        unknown = [t for t in self.targets if t not in REFIT_TARGETS]
        if unknown:
            raise ConfigError(f"reconstruction.targets has {unknown}; choose from {list(REFIT_TARGETS)}")


def solve_refit(gram: torch.Tensor, cross: torch.Tensor, damping: float) -> torch.Tensor:
    """``(gram + lam I)^{-1} cross`` in float64 with ``lam = damping * mean(diag(gram))``."""
    gram, cross = gram.double(), cross.double()
    lam = damping * gram.diagonal().mean().clamp_min(torch.finfo(torch.float64).tiny)
    a = gram + lam * torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    chol, info = torch.linalg.cholesky_ex(a)
    if int(info) == 0:
        return torch.cholesky_solve(cross, chol)
    # Singular (damping 0 with dependent inputs): the minimum-norm least-squares solution.
    return torch.linalg.pinv(a, hermitian=True) @ cross


class ProjectionStats:
    """Accumulates ``X_K^T X_K`` and ``X_K^T X W_R^T`` (float64) from a projection's inputs."""

    def __init__(self, weight: torch.Tensor, kept_cols: torch.Tensor, kept_rows: torch.Tensor) -> None:
        device = weight.device
        self.cols = kept_cols.to(device)
        self.target_weight = weight.detach().index_select(0, kept_rows.to(device)).double()  # [R, N]
        k = self.cols.numel()
        self.gram = torch.zeros(k, k, dtype=torch.float64, device=device)
        self.cross = torch.zeros(k, self.target_weight.shape[0], dtype=torch.float64, device=device)
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).double()
        xk = x.index_select(1, self.cols)
        self.gram.addmm_(xk.T, xk)
        self.cross.addmm_(xk.T, x @ self.target_weight.T)
        self.tokens += x.shape[0]

    def hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self.add(args[0] if args else kwargs["input"])


class _StopForward(Exception):
    """Raised by a hook to end a forward pass early."""


@dataclass
class _CalibrationBatch:
    hidden: torch.Tensor
    layer_args: dict[int, tuple[tuple, dict[str, Any]]]


def _layer_output(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def capture_layer_inputs(teacher: nn.Module, batches: Iterable[torch.Tensor], last_layer: int) -> list[_CalibrationBatch]:
    """Per batch: the first decoder layer's input and each layer's other arguments up to ``last_layer``."""
    a = get_adapter(teacher)
    layers = a.decoder_layers(teacher)
    backbone = teacher.get_submodule(a.backbone)
    device = next(teacher.parameters()).device
    captured: list[_CalibrationBatch] = []
    current: dict[str, Any] = {}

    def make_hook(index: int):
        def hook(module, args, kwargs):
            hidden, rest = (args[0], args[1:]) if args else (kwargs["hidden_states"], ())
            kwargs = {k: v for k, v in kwargs.items() if k != "hidden_states"}
            if index == 0:
                current["hidden"] = hidden.detach()
            current["args"][index] = (rest, kwargs)
            if index == last_layer:
                raise _StopForward

        return hook

    handles = [layer.register_forward_pre_hook(make_hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        for input_ids in batches:
            current.clear()
            current["args"] = {}
            try:
                backbone(input_ids=input_ids.to(device), use_cache=False)
            except _StopForward:
                pass
            else:
                raise RuntimeError("the backbone finished without reaching the last layer to re-fit")
            captured.append(_CalibrationBatch(current["hidden"], current["args"]))
    finally:
        for h in handles:
            h.remove()
    if not captured:
        raise ValueError("reconstruction needs calibration batches; got none")
    return captured


def _refit_plan(pmap: PruneMap, cfg: ReconstructionConfig) -> dict[int, list[tuple[str, int, torch.Tensor]]]:
    """Teacher layer -> [(target, student layer, kept input columns)] of the projections to re-fit."""
    t = pmap.teacher["shape"]
    plan: dict[int, list[tuple[str, int, torch.Tensor]]] = {}
    for i, (layer, lm) in enumerate(zip(pmap.kept_layers, pmap.layers)):
        items = []
        if "o_proj" in cfg.targets and len(lm.kept_query_heads) < t["num_heads"]:
            items.append(("o_proj", i, head_rows(lm.kept_query_heads, t["head_dim"])))
        if "down_proj" in cfg.targets and len(lm.kept_neurons) < t["intermediate_size"]:
            items.append(("down_proj", i, torch.as_tensor(lm.kept_neurons, dtype=torch.long)))
        if items:
            plan[layer] = items
    return plan


@torch.no_grad()
def reconstruct(
    student: nn.Module,
    teacher: nn.Module,
    pmap: PruneMap,
    batches: Iterable[torch.Tensor],
    cfg: ReconstructionConfig,
) -> list[str]:
    """Re-fit the student's pruned output projections in place (see the module docstring).

    ``batches`` yields ``input_ids``. Returns the re-fitted parameter names, also appended to
    ``pmap.refit``.
    """
    cfg.validate()
    if not cfg.enabled:
        return []
    a = get_adapter(teacher)
    plan = _refit_plan(pmap, cfg)
    if not plan:
        logger.info("reconstruction: no block lost input units; nothing to re-fit")
        return []
    last = max(plan)
    was_training = teacher.training
    teacher.eval()
    kept_rows = torch.as_tensor(pmap.kept_hidden, dtype=torch.long)
    teacher_layers = a.decoder_layers(teacher)
    student_params = dict(student.named_parameters())
    refit: list[str] = []
    try:
        calibration = capture_layer_inputs(teacher, batches, last)
        tokens = sum(b.hidden.shape[0] * b.hidden.shape[1] for b in calibration)
        logger.info("reconstruction: %d layers to re-fit on %d calibration tokens", len(plan), tokens)
        for index in range(last + 1):
            layer = teacher_layers[index]
            stats: list[tuple[str, int, ProjectionStats]] = []
            handles = []
            for target, student_layer, cols in plan.get(index, []):
                proj = a.layer_part(layer, target)
                s = ProjectionStats(proj.weight, cols, kept_rows)
                handles.append(proj.register_forward_pre_hook(s.hook, with_kwargs=True))
                stats.append((target, student_layer, s))
            try:
                for batch in calibration:
                    rest, kwargs = batch.layer_args[index]
                    out = layer(batch.hidden, *rest, **kwargs)
                    if index < last:
                        batch.hidden = _layer_output(out)
            finally:
                for h in handles:
                    h.remove()
            for target, student_layer, s in stats:
                name = f"{a.layers}.{student_layer}.{getattr(a, target)}.weight"
                param = student_params[name]
                solution = solve_refit(s.gram, s.cross, cfg.damping).T  # [R, K]
                if solution.shape != param.shape:
                    raise ValueError(f"{name}: re-fit has shape {tuple(solution.shape)}, parameter {tuple(param.shape)}")
                param.copy_(solution.to(param.device, param.dtype))
                refit.append(name)
                logger.debug("re-fitted %s on %d tokens", name, s.tokens)
            del stats
    finally:
        teacher.train(was_training)
    pmap.refit.extend(n for n in refit if n not in pmap.refit)
    return refit
