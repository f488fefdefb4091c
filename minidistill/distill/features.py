"""What one forward of a model exposes to the loss terms: final hidden states, head, captured layer features.

Roles name the models of a run (``student``, ``teacher``; peers of a mutual run are students too). Teachers may be
one model, an :class:`EnsembleTeacher` (its members' mean distribution) or a cache (:class:`CachedTeacher`).
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..adapters import get_adapter
from .roles import STUDENT, TEACHER

if TYPE_CHECKING:  # capture imports this module
    from .capture import AttentionLayout


# ---------------------------------------------------------------------------------------------- features


@dataclass
class CaptureRequest:
    """Intermediate features a loss term needs from one model, by layer index."""

    hidden: set[int] = field(default_factory=set)
    qk: set[int] = field(default_factory=set)
    values: set[int] = field(default_factory=set)
    gates: set[int] = field(default_factory=set)
    """MLP gate pre-activations."""

    def merge(self, other: "CaptureRequest") -> "CaptureRequest":
        return CaptureRequest(
            self.hidden | other.hidden, self.qk | other.qk, self.values | other.values, self.gates | other.gates
        )

    @property
    def layers(self) -> list[int]:
        return sorted(self.hidden | self.qk | self.values | self.gates)


@dataclass
class ModelFeatures:
    """What one forward of one model exposes to the loss terms."""

    final_hidden: torch.Tensor
    """[batch, seq, hidden] after the final norm (the lm_head input)."""
    head_weight: torch.Tensor
    """lm_head weight [vocab, hidden]."""
    head_bias: torch.Tensor | None = None
    hidden: dict[int, torch.Tensor] = field(default_factory=dict)
    queries: dict[int, torch.Tensor] = field(default_factory=dict)
    keys: dict[int, torch.Tensor] = field(default_factory=dict)
    values: dict[int, torch.Tensor] = field(default_factory=dict)
    gates: dict[int, torch.Tensor] = field(default_factory=dict)
    """MLP gate pre-activations [batch, seq, intermediate], by layer."""
    attention: dict[int, AttentionLayout] = field(default_factory=dict)
    """How each layer with captured queries / keys / values turned them into attention weights in this forward
    (scaling, sliding window, causality), as its attention function was called."""

    def detached(self) -> "ModelFeatures":
        """The same features cut from the autograd graph (a trained role read as a target)."""
        def cut(tensors: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
            return {k: v.detach() for k, v in tensors.items()}

        return ModelFeatures(
            final_hidden=self.final_hidden.detach(), head_weight=self.head_weight.detach(),
            head_bias=None if self.head_bias is None else self.head_bias.detach(), hidden=cut(self.hidden),
            queries=cut(self.queries), keys=cut(self.keys), values=cut(self.values), gates=cut(self.gates),
            attention=dict(self.attention),
        )


@dataclass
class EnsembleFeatures:
    """The features of each member of an ensemble teacher (:class:`EnsembleTeacher`); the logit term's target is
    the mean of the members' distributions."""

    members: list[ModelFeatures]


class EnsembleTeacher(nn.Module):
    """Frozen models of one tokenizer whose mean distribution is the teacher (e.g. born-again generations)."""

    def __init__(self, members: list[nn.Module]):
        super().__init__()
        if len(members) < 1:
            raise ValueError("an ensemble teacher needs at least one member")
        self.members = nn.ModuleList(members)

    @property
    def config(self):
        """The first member's config (sharding and placement helpers look for ``.config``)."""
        return self.members[0].config

    def get_output_embeddings(self) -> nn.Module:
        """The first member's output head (the members share the tokenizer)."""
        return self.members[0].get_output_embeddings()


@dataclass
class CachedTeacher:
    """The teacher of one micro-batch read from a teacher cache: top-k ids, their log-probs and the rest log-mass."""

    indices: torch.Tensor
    """[batch, seq - 1, k] token ids."""
    logprobs: torch.Tensor
    """[batch, seq - 1, k] log-probabilities (temperature 1)."""
    rest: torch.Tensor
    """[batch, seq - 1] log of the mass outside the top-k."""


def unwrap_module(model: nn.Module) -> nn.Module:
    """The model inside DDP / DeepSpeed (``.module``), ``torch.compile`` (``._orig_mod``) and PEFT
    (``get_base_model()``, the model with the adapters injected) wrappers."""
    while True:
        if callable(getattr(model, "get_base_model", None)):
            model = model.get_base_model()
            continue
        inner = getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            inner = getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def model_features(model: nn.Module, input_ids: torch.Tensor, request: CaptureRequest, *, copy_head: bool = False) -> ModelFeatures:
    """One forward of ``model`` (no vocabulary logits) returning the final hidden states, head and features.

    The root forward runs with an empty ``logits_to_keep`` so that sharding wrappers see their usual
    call, while hooks on the final norm and the lm_head pick up what the logit loss needs. ``copy_head``
    clones the head weight (needed when a sharded model frees its gathered weights after forward).
    Final-logit soft-capping (a gemma config option, off in gemma3_text) is not applied.
    """
    inner = unwrap_module(model)
    adapter = get_adapter(inner)
    grabbed: dict[str, object] = {}

    def norm_hook(_m, _args, out):
        grabbed["final_hidden"] = out[0] if isinstance(out, tuple) else out

    def head_hook(module, _args):  # before the head runs: a ZeRO-3 module's weight is gathered then, not after
        w, b = module.weight, getattr(module, "bias", None)
        grabbed["head"] = (w.detach().clone(), None if b is None else b.detach().clone()) if copy_head else (w, b)

    handles = [
        inner.get_submodule(adapter.final_norm).register_forward_hook(norm_hook),
        inner.get_submodule(adapter.lm_head).register_forward_pre_hook(head_hook),
    ]
    capture = None
    if request.layers:
        from .capture import CaptureSpec, FeatureCapture

        spec = CaptureSpec(
            layers=request.layers,
            hidden=bool(request.hidden),
            queries=bool(request.qk),
            keys=bool(request.qk),
            values=bool(request.values),
            gates=bool(request.gates),
        )
        capture = FeatureCapture(inner, spec)
    no_logits = torch.zeros(0, dtype=torch.long, device=input_ids.device)
    try:
        with capture if capture is not None else nullcontext():
            model(input_ids=input_ids, logits_to_keep=no_logits, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    head_weight, head_bias = grabbed["head"]
    feats = ModelFeatures(final_hidden=grabbed["final_hidden"], head_weight=head_weight, head_bias=head_bias)
    if capture is not None:
        feats.hidden = dict(capture.hidden)
        feats.queries = dict(capture.queries)
        feats.keys = dict(capture.keys)
        feats.values = dict(capture.values)
        feats.gates = dict(capture.gates)
        feats.attention = dict(capture.attention)
    return feats


__all__ = ["STUDENT", "TEACHER", "CachedTeacher", "CaptureRequest", "EnsembleFeatures", "EnsembleTeacher", "ModelFeatures",
           "model_features", "unwrap_module"]
