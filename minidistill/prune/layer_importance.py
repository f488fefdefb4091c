"""Layer importance: block influence (ShortGPT), angular distance of layer blocks (Gromov et al.), LM-loss increase.

Methods (``prune.layer_method``):

- ``block_influence``: one-shot ShortGPT score of each layer from the calibration forward.
- ``contiguous`` (alias ``angular``): drop the contiguous block of ``n`` layers whose input and output
  are closest in angular distance (Gromov et al.); the rest is ordered by block influence.
- ``lm_loss``: one-shot increase of the calibration LM loss when each layer alone is skipped.
- ``iterative``: greedy removal that re-measures the LM loss after each removal
  (:func:`iterative_layer_removal`): the layer whose removal raises the loss least, given the layers
  already removed, goes next.

Block influence of layer ``l`` is ``1 - cos(h_l, h_{l+1})`` averaged over tokens, where ``h_l`` is the
input of layer ``l`` (``h_L`` the output of the last layer). The angular distance of the block of ``n``
layers starting at ``l`` is ``arccos(cos(h_l, h_{l+n})) / pi`` averaged over tokens (all tokens, not
only the last). Both come from the same forward pass: :class:`LayerSimilarity` accumulates the
token-averaged cosine and angular distance between every pair of layer inputs.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..adapters import get_adapter
from ..evaluation.perplexity import heldout_loss
from .distributed import CalibrationShard

LAYER_METHODS = ("block_influence", "angular", "contiguous", "lm_loss", "iterative")
SIMILARITY_METHODS = ("block_influence", "angular", "contiguous")
"""Methods scored from the calibration forward's layer statistics."""
LOSS_METHODS = ("lm_loss", "iterative")
"""Methods scored by evaluating the LM loss with layers removed."""


class LayerSimilarity:
    """Token-averaged cosine and angular distance between the inputs of every pair of layers."""

    def __init__(self, num_layers: int):
        self.num_layers = num_layers
        self.cos_sum = torch.zeros(num_layers + 1, num_layers + 1, dtype=torch.float64)
        self.angle_sum = torch.zeros(num_layers + 1, num_layers + 1, dtype=torch.float64)
        self.tokens = 0

    def update(self, states: Sequence[torch.Tensor]) -> None:
        """Add one batch: ``states[l]`` is the input of layer ``l`` ([B, T, D]); ``states[L]`` the last output."""
        if len(states) != self.num_layers + 1:
            raise ValueError(f"expected {self.num_layers + 1} hidden states, got {len(states)}")
        dtype = torch.promote_types(states[0].dtype, torch.float32)
        unit = torch.stack([s.reshape(-1, s.shape[-1]).to(dtype) for s in states])  # [L+1, N, D]
        unit = unit / unit.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        cos = torch.einsum("lnd,mnd->nlm", unit, unit).clamp(-1.0, 1.0)  # [N, L+1, L+1]
        self.cos_sum += cos.sum(0).double().cpu()
        self.angle_sum += (torch.arccos(cos) / math.pi).sum(0).double().cpu()
        self.tokens += unit.shape[1]

    def sum_over(self, shard: CalibrationShard) -> None:
        """Sum the statistics over ``shard``'s ranks (every rank calls it)."""
        if not shard.distributed:
            return
        n = self.cos_sum.numel()
        tokens = torch.tensor([float(self.tokens)], dtype=torch.float64)
        packed = shard.sum(torch.cat([self.cos_sum.reshape(-1), self.angle_sum.reshape(-1), tokens]))
        self.cos_sum = packed[:n].reshape(self.cos_sum.shape)
        self.angle_sum = packed[n : 2 * n].reshape(self.angle_sum.shape)
        self.tokens = int(round(packed[-1].item()))

    def mean_cos(self) -> torch.Tensor:
        return self.cos_sum / max(self.tokens, 1)

    def mean_angle(self) -> torch.Tensor:
        return self.angle_sum / max(self.tokens, 1)

    def block_influence(self) -> torch.Tensor:
        """[L] ``1 - cos(input, output)`` of each layer (higher = more important)."""
        cos = self.mean_cos()
        return torch.stack([1.0 - cos[i, i + 1] for i in range(self.num_layers)])

    def angular_distances(self, n: int) -> torch.Tensor:
        """[L - n + 1] angular distance between the input of layer ``l`` and of layer ``l + n``, per start ``l``."""
        if not 1 <= n <= self.num_layers:
            raise ValueError(f"block size n={n} must be in [1, {self.num_layers}]")
        ang = self.mean_angle()
        return torch.stack([ang[i, i + n] for i in range(self.num_layers - n + 1)])

    def best_block(self, n: int) -> tuple[int, torch.Tensor]:
        """Start of the block of ``n`` layers whose removal changes the residual stream least, and all distances."""
        d = self.angular_distances(n)
        return int(torch.argmin(d)), d

    # safetensors-friendly round trip
    def to_tensors(self) -> dict[str, torch.Tensor]:
        return {"layer_cos_sum": self.cos_sum, "layer_angle_sum": self.angle_sum,
                "layer_tokens": torch.tensor([self.tokens], dtype=torch.int64)}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> "LayerSimilarity":
        obj = cls(tensors["layer_cos_sum"].shape[0] - 1)
        obj.cos_sum = tensors["layer_cos_sum"].double()
        obj.angle_sum = tensors["layer_angle_sum"].double()
        obj.tokens = int(tensors["layer_tokens"][0])
        return obj


def _hidden_arg(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _layer_output(output) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


@contextmanager
def layer_similarity_hooks(model: nn.Module, similarity: LayerSimilarity):
    """Hooks that feed every forward's layer inputs (and last output) into ``similarity``; removed on exit."""
    layers = get_adapter(model).decoder_layers(model)
    states: list[torch.Tensor] = []

    def pre_hook(_module, args, kwargs):
        states.append(_hidden_arg(args, kwargs).detach())

    def last_hook(_module, _args, _kwargs, output):
        states.append(_layer_output(output).detach())
        similarity.update(states)
        states.clear()

    handles = [layer.register_forward_pre_hook(pre_hook, with_kwargs=True) for layer in layers]
    handles.append(layers[-1].register_forward_hook(last_hook, with_kwargs=True))
    try:
        yield similarity
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def layer_similarity(model: nn.Module, batches: Iterable[torch.Tensor], shard: CalibrationShard | None = None) -> LayerSimilarity:
    """Block influence and angular distances from one forward pass over ``batches`` (summed over ``shard``'s ranks)."""
    num_layers = len(get_adapter(model).decoder_layers(model))
    sim = LayerSimilarity(num_layers)
    backbone = model.get_submodule(get_adapter(model).backbone)
    device = next(model.parameters()).device
    with layer_similarity_hooks(model, sim):
        for ids in batches:
            backbone(input_ids=ids.to(device))
    if shard is not None:
        sim.sum_over(shard)
    return sim


@contextmanager
def skip_layer(model: nn.Module, index: int):
    """Make decoder layer ``index`` return its input unchanged (the layer is still run, its output dropped)."""
    layer = get_adapter(model).decoder_layers(model)[index]

    def hook(_module, args, kwargs, output):
        hidden = _hidden_arg(args, kwargs)
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    handle = layer.register_forward_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def layer_drop_loss_increase(model: nn.Module, batches: Sequence[torch.Tensor], *, chunk_tokens: int = 2048) -> torch.Tensor:
    """[L] increase of the LM loss (nats) when each layer alone is skipped; one evaluation per layer."""
    batches = list(batches)
    base = heldout_loss(model, batches, chunk_tokens=chunk_tokens)["loss"]
    out = []
    for i in range(len(get_adapter(model).decoder_layers(model))):
        with skip_layer(model, i):
            out.append(heldout_loss(model, batches, chunk_tokens=chunk_tokens)["loss"] - base)
    return torch.tensor(out, dtype=torch.float64)


class _PassThrough(nn.Module):
    """A removed decoder layer: returns its input hidden states (nothing is computed)."""

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


class _Replay(nn.Module):
    """Returns cached hidden states, one tensor per call in batch order, instead of its input."""

    def __init__(self, states: list[torch.Tensor]):
        super().__init__()
        self.states = states
        self.calls = 0

    def forward(self, hidden_states, *args, **kwargs):
        out = self.states[self.calls]
        self.calls += 1
        return out


@contextmanager
def replaced_layers(model: nn.Module, replacements: dict[int, nn.Module]):
    """Swap decoder layers ``{index: module}`` in place for the duration of the block."""
    layers = get_adapter(model).decoder_layers(model)
    saved = {i: layers[i] for i in replacements}
    try:
        for i, module in replacements.items():
            layers[i] = module
        yield
    finally:
        for i, module in saved.items():
            layers[i] = module


def loss_without_layers(model: nn.Module, batches: Sequence[torch.Tensor], removed: Iterable[int], *,
                        chunk_tokens: int = 2048) -> float:
    """LM loss (nats) over ``batches`` with the decoder layers ``removed`` taken out (not run at all)."""
    with replaced_layers(model, {i: _PassThrough() for i in removed}):
        return heldout_loss(model, batches, chunk_tokens=chunk_tokens)["loss"]


@dataclass
class LayerRemoval:
    """Result of greedy layer removal."""

    order: list[int]
    """Teacher layer indices in the order they were removed."""
    losses: list[float]
    """LM loss after each removal (``losses[k]``: with ``order[: k + 1]`` removed)."""
    base_loss: float
    """LM loss of the full model."""
    last_increase: torch.Tensor
    """[L] loss increase of removing each still-kept layer at the last step (NaN for removed layers)."""
    evaluations: int
    """Loss evaluations run (one per remaining layer per step)."""
    seconds: float
    """Wall time of the whole removal."""
    step_seconds: list[float]
    """Wall time from the start to the end of each removal (``step_seconds[k]``: ``order[: k + 1]`` known)."""

    def scores(self) -> torch.Tensor:
        """[L] layer scores (higher = keep): the ``n`` lowest are ``order[:n]`` for every ``n <= len(order)``.

        Removed layers score ``k - len(order)`` (the first removed lowest); kept layers score
        ``>= 0``, ordered by their loss increase at the last step.
        """
        num_layers = self.last_increase.numel()
        scores = torch.zeros(num_layers, dtype=torch.float64)
        kept = [i for i in range(num_layers) if i not in self.order]
        if kept:
            inc = self.last_increase[kept]
            scores[kept] = inc - inc.min()
        for k, layer in enumerate(self.order):
            scores[layer] = float(k - len(self.order))
        return scores


@torch.no_grad()
def iterative_layer_removal(
    model: nn.Module,
    batches: Sequence[torch.Tensor],
    num_drop: int,
    *,
    chunk_tokens: int = 2048,
    cache_prefix: bool = True,
    on_step: Callable[[list[int], list[float]], None] | None = None,
) -> LayerRemoval:
    """Greedily remove ``num_drop`` decoder layers, re-measuring the LM loss over ``batches`` after each.

    Step ``k`` evaluates every remaining layer: the loss with it removed on top of ``order[:k]``, and
    removes the argmin. One loss evaluation per remaining layer per step (``sum_k (L - k)`` in all).
    ``cache_prefix``: each step runs the current model once and keeps the input of every remaining
    layer; a candidate then runs only the layers above it, starting from that cached input
    (memory: one [tokens, hidden] tensor per layer; about half the compute of full evaluations).
    Greedy removals are nested, so one run with the largest ``num_drop`` serves every smaller one.
    ``on_step(order, losses)`` is called after each removal (progress reporting).
    """
    t0 = time.perf_counter()
    batches = list(batches)
    layers = get_adapter(model).decoder_layers(model)
    num_layers = len(layers)
    if not 0 <= num_drop < num_layers:
        raise ValueError(f"num_drop={num_drop} must be in [0, {num_layers})")
    order: list[int] = []
    losses: list[float] = []
    base_loss = None
    last = torch.full((num_layers,), float("nan"), dtype=torch.float64)
    evaluations = 0
    step_seconds: list[float] = []
    for _ in range(num_drop):
        remaining = [i for i in range(num_layers) if i not in order]
        states: dict[int, list[torch.Tensor]] = {i: [] for i in remaining}
        handles = []
        if cache_prefix:
            for i in remaining:
                handles.append(layers[i].register_forward_pre_hook(
                    lambda _m, args, kwargs, i=i: states[i].append(_hidden_arg(args, kwargs).detach()), with_kwargs=True))
        try:
            current = loss_without_layers(model, batches, order, chunk_tokens=chunk_tokens)
        finally:
            for h in handles:
                h.remove()
        if base_loss is None:
            base_loss = current
        trial = {}
        for i in remaining:
            if cache_prefix:  # layers below i pass through; i replays its cached input; order stays removed
                replacements = {j: _PassThrough() for j in range(i)}
                replacements.update({j: _PassThrough() for j in order})
                replacements[i] = _Replay(states[i])
                with replaced_layers(model, replacements):
                    trial[i] = heldout_loss(model, batches, chunk_tokens=chunk_tokens)["loss"]
            else:
                trial[i] = loss_without_layers(model, batches, [*order, i], chunk_tokens=chunk_tokens)
            evaluations += 1
        del states
        best = min(remaining, key=lambda i: (trial[i], i))
        last = torch.full((num_layers,), float("nan"), dtype=torch.float64)
        for i in remaining:
            last[i] = trial[i] - current
        order.append(best)
        losses.append(trial[best])
        step_seconds.append(time.perf_counter() - t0)
        if on_step is not None:
            on_step(list(order), list(losses))
    if base_loss is None:
        base_loss = heldout_loss(model, batches, chunk_tokens=chunk_tokens)["loss"]
    return LayerRemoval(order=order, losses=losses, base_loss=base_loss, last_increase=last,
                        evaluations=evaluations, seconds=time.perf_counter() - t0, step_seconds=step_seconds)


def layer_loss_scores(
    method: str,
    model: nn.Module,
    batches: Sequence[torch.Tensor],
    *,
    max_drop: int,
    chunk_tokens: int = 2048,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """[L] scores of a loss-based ``method`` (``lm_loss`` or ``iterative``) and a record for the prune map.

    ``max_drop``: the most layers any target drops (``iterative`` removes that many greedily).
    """
    t0 = time.perf_counter()
    batches = list(batches)
    record: dict[str, Any] = {"layer_loss_blocks": sum(int(b.shape[0]) for b in batches)}
    if method == "lm_loss":
        scores = layer_drop_loss_increase(model, batches, chunk_tokens=chunk_tokens)
    elif method == "iterative":
        removal = iterative_layer_removal(model, batches, max_drop, chunk_tokens=chunk_tokens)
        scores = removal.scores()
        record.update(layer_removal_order=removal.order, layer_removal_losses=[round(v, 6) for v in removal.losses],
                      layer_base_loss=round(removal.base_loss, 6), layer_loss_evaluations=removal.evaluations)
    else:
        raise ValueError(f"layer method {method!r} is not loss-based; choose one of {LOSS_METHODS}")
    record["layer_loss_seconds"] = round(time.perf_counter() - t0, 2)
    return scores, record


def layer_scores(
    method: str,
    *,
    num_drop: int,
    similarity: LayerSimilarity | None = None,
    loss_increase: torch.Tensor | None = None,
) -> torch.Tensor:
    """[L] layer scores (higher = keep) for dropping ``num_drop`` layers with ``method``.

    ``contiguous`` / ``angular`` rank the best contiguous block of ``num_drop`` layers last (block
    influence orders the rest). ``lm_loss`` and ``iterative`` take their scores from
    ``loss_increase`` (:func:`layer_loss_scores`); ``block_influence`` is independent of ``num_drop``.
    """
    if method in LOSS_METHODS:
        if loss_increase is None:
            raise ValueError(f"layer method {method!r} needs loss_increase (see layer_loss_scores)")
        return loss_increase.double()
    if method not in SIMILARITY_METHODS:
        raise ValueError(f"unknown layer importance method {method!r}; choose one of {LAYER_METHODS}")
    if similarity is None:
        raise ValueError(f"layer method {method!r} needs the layer similarity statistics")
    bi = similarity.block_influence()
    if method == "block_influence":
        return bi
    scores = bi.clone()
    if num_drop > 0:
        start, _ = similarity.best_block(num_drop)
        scores[start : start + num_drop] = bi.min() - 1.0
    return scores
