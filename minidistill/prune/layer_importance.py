"""Layer importance: block influence (ShortGPT), angular distance of layer blocks (Gromov et al.), LM-loss increase.

Block influence of layer ``l`` is ``1 - cos(h_l, h_{l+1})`` averaged over tokens, where ``h_l`` is the
input of layer ``l`` (``h_L`` the output of the last layer). The angular distance of the block of ``n``
layers starting at ``l`` is ``arccos(cos(h_l, h_{l+n})) / pi`` averaged over tokens (all tokens, not
only the last). Both come from the same forward pass: :class:`LayerSimilarity` accumulates the
token-averaged cosine and angular distance between every pair of layer inputs.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from ..adapters import get_adapter
from ..evaluation.perplexity import heldout_loss

LAYER_METHODS = ("block_influence", "angular", "lm_loss")


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
def layer_similarity(model: nn.Module, batches: Iterable[torch.Tensor]) -> LayerSimilarity:
    """Block influence and angular distances from one forward pass over ``batches``."""
    num_layers = len(get_adapter(model).decoder_layers(model))
    sim = LayerSimilarity(num_layers)
    backbone = model.get_submodule(get_adapter(model).backbone)
    device = next(model.parameters()).device
    with layer_similarity_hooks(model, sim):
        for ids in batches:
            backbone(input_ids=ids.to(device))
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


def layer_scores(
    method: str,
    *,
    num_drop: int,
    similarity: LayerSimilarity | None = None,
    loss_increase: torch.Tensor | None = None,
) -> torch.Tensor:
    """[L] layer scores (higher = keep) for dropping ``num_drop`` layers with ``method``.

    ``angular`` ranks the best contiguous block of ``num_drop`` layers last (block influence orders the
    rest); the other methods are independent of ``num_drop``.
    """
    if method == "lm_loss":
        if loss_increase is None:
            raise ValueError("layer method 'lm_loss' needs loss_increase")
        return loss_increase.double()
    if similarity is None:
        raise ValueError(f"layer method {method!r} needs the layer similarity statistics")
    bi = similarity.block_influence()
    if method == "block_influence":
        return bi
    if method == "angular":
        scores = bi.clone()
        if num_drop > 0:
            start, _ = similarity.best_block(num_drop)
            scores[start : start + num_drop] = bi.min() - 1.0
        return scores
    raise ValueError(f"unknown layer importance method {method!r}; choose one of {LAYER_METHODS}")
