"""The distillation objective: one step's loss from one forward of each model.

A :class:`DistillObjective` owns named loss terms (a registry: logits, hidden, attention, relations,
and any term added with :func:`register_loss_term`), their learnable parts (hidden-state channel
projections) and the loss balancer. Each term says which features it needs from which model role
(``student``, ``teacher``; more roles fit, e.g. a second student for mutual learning); the features
are captured during the single forward of each model (:func:`model_features`), and the logit term
works from final hidden states and the output-head weight so that no tokens x vocabulary logits exist.

:class:`DistillationModule` bundles the student and the objective into the one module the trainer
hands to accelerate: its ``forward`` runs the student and the losses, so DDP / FSDP2 / DeepSpeed see
every trainable parameter (student and projections) inside the wrapped forward.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from ..adapters import get_adapter
from ..config import ConfigBase, ConfigError
from ..prune.prune_map import PruneMap

logger = logging.getLogger(__name__)

STUDENT, TEACHER = "student", "teacher"


# ---------------------------------------------------------------------------------------------- config


@dataclass
class LogitLossSettings(ConfigBase):
    """Logit distillation (always on; it anchors the loss balance)."""

    weight: float = 1.0
    """Weight of the logit term."""
    divergence: str = "forward_kl"
    """Divergence between teacher and student token distributions (see LogitKDLoss)."""
    temperature: float = 1.0
    """Softmax temperature of both distributions."""
    beta: float = 0.5
    """Mixing coefficient of skewed / symmetric divergences."""
    top_k: int | None = None
    """Restrict the teacher distribution to its top-k tokens (None: full vocabulary)."""
    top_p: float | None = None
    """Restrict the teacher distribution to its top-p nucleus (None: full vocabulary)."""
    ce_weight: float = 0.0
    """Weight of the next-token cross-entropy on the data mixed into the logit term."""
    chunk_tokens: int = 256
    """Token positions projected to the vocabulary at once (extra memory ~ 4 x chunk_tokens x vocab floats)."""

    def validate(self) -> None:
        if self.weight <= 0:
            raise ConfigError(f"loss.logits.weight={self.weight}: must be positive (the logit term anchors the loss)")
        if self.temperature <= 0:
            raise ConfigError(f"loss.logits.temperature={self.temperature}: must be positive")
        if self.chunk_tokens < 1:
            raise ConfigError(f"loss.logits.chunk_tokens={self.chunk_tokens}: must be at least 1")


PairingStrategy = Literal["prune_map", "uniform", "last_k", "explicit"]


@dataclass
class LayerPairing(ConfigBase):
    """Which student layer is compared with which teacher layer."""

    strategy: PairingStrategy = "prune_map"
    """prune_map (each student layer with the teacher layer it came from), uniform, last_k or explicit."""
    k: int | None = None
    """last_k: number of final layers paired."""
    explicit: list[list[int]] | None = None
    """explicit: [[student_layer, teacher_layer], ...]."""
    student_layers: list[int] | None = None
    """Keep only pairs whose student layer is listed (None: all pairs)."""


@dataclass
class HiddenLossSettings(ConfigBase):
    """Hidden-state distillation through a learnable student-to-teacher channel projection."""

    weight: float = 0.0
    """Weight of the term (0 disables it)."""
    kind: str = "nmse"
    """Distance between projected student and teacher hidden states (see HiddenStateLoss)."""
    pairing: LayerPairing = field(default_factory=LayerPairing)
    """Layer pairs compared."""

    def validate(self) -> None:
        if self.weight < 0:
            raise ConfigError(f"loss.hidden.weight={self.weight}: must be >= 0")


@dataclass
class AttentionLossSettings(ConfigBase):
    """Attention-map transfer from post-RoPE queries and keys (student heads paired with teacher heads)."""

    weight: float = 0.0
    """Weight of the term (0 disables it)."""
    pairing: LayerPairing = field(default_factory=LayerPairing)
    """Layer pairs compared (default: each student layer with its teacher layer, heads paired by the prune map)."""
    chunk_queries: int = 256
    """Query positions whose attention rows are built at once."""

    def validate(self) -> None:
        if self.weight < 0:
            raise ConfigError(f"loss.attention.weight={self.weight}: must be >= 0")


@dataclass
class RelationLossSettings(ConfigBase):
    """Self-relation (q-q, k-k, v-v) transfer, MiniLM-style, with a fixed number of relation heads."""

    weight: float = 0.0
    """Weight of the term (0 disables it)."""
    num_relation_heads: int = 4
    """Relation heads the q/k/v features are split into (must divide both models' widths)."""
    relations: list[str] = field(default_factory=lambda: ["qq", "kk", "vv"])
    """Relations compared."""
    pairing: LayerPairing = field(default_factory=lambda: LayerPairing(strategy="last_k", k=1))
    """Layer pairs compared (default: the last layers)."""

    def validate(self) -> None:
        if self.weight < 0:
            raise ConfigError(f"loss.relations.weight={self.weight}: must be >= 0")


@dataclass
class DistillLossConfig(ConfigBase):
    """What the student is trained to match, and how the loss terms are combined."""

    logits: LogitLossSettings = field(default_factory=LogitLossSettings)
    """Logit distillation."""
    hidden: HiddenLossSettings = field(default_factory=HiddenLossSettings)
    """Hidden-state distillation."""
    attention: AttentionLossSettings = field(default_factory=AttentionLossSettings)
    """Attention-map transfer."""
    relations: RelationLossSettings = field(default_factory=RelationLossSettings)
    """Self-relation transfer."""
    extra: dict[str, float] = field(default_factory=dict)
    """Weights of further loss terms added with ``register_loss_term`` (by registered name)."""
    balance: Literal["fixed", "auto"] = "fixed"
    """fixed: weighted sum; auto: feature terms rescaled to the logit term's magnitude, times their weights."""

    def validate(self) -> None:
        for name, w in self.extra.items():
            if name in ("logits", "hidden", "attention", "relations"):
                raise ConfigError(f"loss.extra.{name}: set loss.{name}.weight instead")
            if w < 0:
                raise ConfigError(f"loss.extra.{name}={w}: must be >= 0")

    def weights(self) -> dict[str, float]:
        """Weight of every enabled term, by term name."""
        out = {"logits": self.logits.weight}
        for name in ("hidden", "attention", "relations"):
            w = getattr(self, name).weight
            if w > 0:
                out[name] = w
        out.update({name: w for name, w in self.extra.items() if w > 0})
        return out


# ---------------------------------------------------------------------------------------------- features


@dataclass
class CaptureRequest:
    """Intermediate features a loss term needs from one model, by layer index."""

    hidden: set[int] = field(default_factory=set)
    qk: set[int] = field(default_factory=set)
    values: set[int] = field(default_factory=set)

    def merge(self, other: "CaptureRequest") -> "CaptureRequest":
        return CaptureRequest(self.hidden | other.hidden, self.qk | other.qk, self.values | other.values)

    @property
    def layers(self) -> list[int]:
        return sorted(self.hidden | self.qk | self.values)


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


def _attention_scaling(model: nn.Module, layer: int) -> float:
    adapter = get_adapter(model)
    attn = adapter.layer_part(adapter.decoder_layers(model)[layer], "self_attn")
    return float(getattr(attn, "scaling", adapter.head_dim(model.config) ** -0.5))


def _sliding_window(model: nn.Module, layer: int) -> int | None:
    adapter = get_adapter(model)
    attn = adapter.layer_part(adapter.decoder_layers(model)[layer], "self_attn")
    window = getattr(attn, "sliding_window", None)
    return int(window) if window else None


def unwrap_module(model: nn.Module) -> nn.Module:
    """The model inside DDP / DeepSpeed / compile wrappers (those expose it as ``.module`` or ``._orig_mod``)."""
    while True:
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

    def head_hook(module, _args, _out):
        w, b = module.weight, getattr(module, "bias", None)
        grabbed["head"] = (w.detach().clone(), None if b is None else b.detach().clone()) if copy_head else (w, b)

    handles = [
        inner.get_submodule(adapter.final_norm).register_forward_hook(norm_hook),
        inner.get_submodule(adapter.lm_head).register_forward_hook(head_hook),
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
    return feats


# ---------------------------------------------------------------------------------------------- loss terms


@dataclass
class ObjectiveContext:
    """What loss-term builders may look at: the models by role, the prune map, the config."""

    models: dict[str, nn.Module]
    prune_map: PruneMap | None
    config: DistillLossConfig


class LossTerm(nn.Module):
    """One named loss term: which features it needs per role, and its value from them."""

    def requests(self) -> dict[str, CaptureRequest]:
        return {}

    def forward(self, features: dict[str, ModelFeatures], input_ids: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError


LossTermBuilder = Callable[[ObjectiveContext], LossTerm]
LOSS_TERMS: dict[str, LossTermBuilder] = {}


def register_loss_term(name: str) -> Callable[[LossTermBuilder], LossTermBuilder]:
    """Register a builder for the loss term ``name`` (its weight is read from the balancer weights)."""

    def deco(builder: LossTermBuilder) -> LossTermBuilder:
        LOSS_TERMS[name] = builder
        return builder

    return deco


def _pairs(ctx: ObjectiveContext, pairing: LayerPairing, term: str) -> list[tuple[int, int]]:
    """Student/teacher layer pairs for ``term``; ConfigError when none can be formed."""
    from .pairing import PairingError, pair_layers

    student, teacher = ctx.models[STUDENT], ctx.models[TEACHER]
    ns = get_adapter(student).shape(student.config)["num_layers"]
    nt = get_adapter(teacher).shape(teacher.config)["num_layers"]
    if pairing.strategy == "prune_map" and ctx.prune_map is None:
        raise ConfigError(
            f"loss.{term}.pairing.strategy=prune_map but the student has no prune map (it was not pruned "
            f"from this teacher); set loss.{term}.pairing.strategy=explicit with loss.{term}.pairing.explicit, "
            f"or set loss.{term}.weight=0"
        )
    explicit = [tuple(p) for p in pairing.explicit] if pairing.explicit is not None else None
    try:
        pairs = pair_layers(ns, nt, strategy=pairing.strategy, prune_map=ctx.prune_map, k=pairing.k, explicit=explicit)
    except PairingError as e:
        raise ConfigError(f"loss.{term}.pairing: {e}") from None
    if pairing.student_layers is not None:
        pairs = [p for p in pairs if p[0] in set(pairing.student_layers)]
    if not pairs:
        raise ConfigError(f"loss.{term}.pairing selects no layer pair; check loss.{term}.pairing.student_layers")
    return [(int(s), int(t)) for s, t in pairs]


class LogitTerm(LossTerm):
    """Fused (chunked) logit distillation from final hidden states and the lm_head weights."""

    def __init__(self, cfg: LogitLossSettings):
        super().__init__()
        from .losses.fused import FusedLogitKDLoss

        self.ce = cfg.ce_weight > 0
        self.loss = FusedLogitKDLoss(
            cfg.divergence,
            temperature=cfg.temperature,
            beta=cfg.beta,
            top_k=cfg.top_k,
            top_p=cfg.top_p,
            ce_weight=cfg.ce_weight,
            chunk_tokens=cfg.chunk_tokens,
        )

    def forward(self, features, input_ids):
        s, t = features[STUDENT], features[TEACHER]
        h_s = s.final_hidden[:, :-1].reshape(-1, s.final_hidden.shape[-1])
        h_t = t.final_hidden[:, :-1].reshape(-1, t.final_hidden.shape[-1])
        labels = input_ids[:, 1:].reshape(-1) if self.ce else None
        return self.loss(
            h_s, s.head_weight, h_t, t.head_weight, labels, student_head_bias=s.head_bias, teacher_head_bias=t.head_bias
        )


@register_loss_term("logits")
def _build_logits(ctx: ObjectiveContext) -> LossTerm:
    return LogitTerm(ctx.config.logits)


class HiddenTerm(LossTerm):
    """Mean over layer pairs of the distance between projected student and teacher layer outputs."""

    def __init__(self, ctx: ObjectiveContext):
        super().__init__()
        from .losses.hidden import ChannelProjection, HiddenStateLoss

        cfg = ctx.config.hidden
        self.pairs = _pairs(ctx, cfg.pairing, "hidden")
        s_dim = get_adapter(ctx.models[STUDENT]).shape(ctx.models[STUDENT].config)["hidden_size"]
        t_dim = get_adapter(ctx.models[TEACHER]).shape(ctx.models[TEACHER].config)["hidden_size"]
        # Without a prune map, student channel i starts mapped onto teacher channel i.
        kept = list(ctx.prune_map.kept_hidden) if ctx.prune_map is not None else list(range(min(s_dim, t_dim)))
        self.projection = ChannelProjection(s_dim, t_dim, kept_channels=kept)
        self.loss = HiddenStateLoss(kind=cfg.kind)

    def requests(self):
        return {STUDENT: CaptureRequest(hidden={s for s, _ in self.pairs}), TEACHER: CaptureRequest(hidden={t for _, t in self.pairs})}

    def forward(self, features, input_ids):
        s, t = features[STUDENT], features[TEACHER]
        losses = [self.loss(self.projection(s.hidden[i]), t.hidden[j]) for i, j in self.pairs]
        return torch.stack(losses).mean()


@register_loss_term("hidden")
def _build_hidden(ctx: ObjectiveContext) -> LossTerm:
    return HiddenTerm(ctx)


class AttentionTerm(LossTerm):
    """Mean over layer pairs of the attention-map transfer loss (student heads against their teacher heads)."""

    def __init__(self, ctx: ObjectiveContext):
        super().__init__()
        from .losses.attention import AttentionTransferLoss
        from .pairing import pair_heads

        cfg = ctx.config.attention
        self.pairs = _pairs(ctx, cfg.pairing, "attention")
        student, teacher = ctx.models[STUDENT], ctx.models[TEACHER]
        self.loss = AttentionTransferLoss(chunk_queries=cfg.chunk_queries)
        self.scaling = {(i, j): (_attention_scaling(student, i), _attention_scaling(teacher, j)) for i, j in self.pairs}
        self.sliding_window = {i: _sliding_window(student, i) for i, _ in self.pairs}
        self.teacher_heads: dict[int, list[int] | None] = {}
        for i, j in self.pairs:
            if ctx.prune_map is not None and ctx.prune_map.teacher_layer_of(i) == j:
                self.teacher_heads[i] = list(pair_heads(ctx.prune_map, i))
            else:
                self.teacher_heads[i] = None

    def requests(self):
        return {STUDENT: CaptureRequest(qk={s for s, _ in self.pairs}), TEACHER: CaptureRequest(qk={t for _, t in self.pairs})}

    def forward(self, features, input_ids):
        s, t = features[STUDENT], features[TEACHER]
        losses = []
        for i, j in self.pairs:
            s_scale, t_scale = self.scaling[(i, j)]
            losses.append(
                self.loss(
                    s.queries[i], s.keys[i], t.queries[j], t.keys[j],
                    student_scaling=s_scale, teacher_scaling=t_scale, teacher_heads=self.teacher_heads[i],
                    sliding_window=self.sliding_window[i],
                )
            )
        return torch.stack(losses).mean()


@register_loss_term("attention")
def _build_attention(ctx: ObjectiveContext) -> LossTerm:
    return AttentionTerm(ctx)


class RelationTerm(LossTerm):
    """Mean over layer pairs of the q/k/v self-relation loss."""

    def __init__(self, ctx: ObjectiveContext):
        super().__init__()
        from .losses.relations import RelationLoss

        cfg = ctx.config.relations
        self.pairs = _pairs(ctx, cfg.pairing, "relations")
        self.loss = RelationLoss(cfg.num_relation_heads, relations=tuple(cfg.relations))

    def requests(self):
        s_layers, t_layers = {s for s, _ in self.pairs}, {t for _, t in self.pairs}
        return {STUDENT: CaptureRequest(qk=s_layers, values=s_layers), TEACHER: CaptureRequest(qk=t_layers, values=t_layers)}

    def forward(self, features, input_ids):
        s, t = features[STUDENT], features[TEACHER]
        losses = [
            self.loss(
                {"q": s.queries[i], "k": s.keys[i], "v": s.values[i]},
                {"q": t.queries[j], "k": t.keys[j], "v": t.values[j]},
            )
            for i, j in self.pairs
        ]
        return torch.stack(losses).mean()


@register_loss_term("relations")
def _build_relations(ctx: ObjectiveContext) -> LossTerm:
    return RelationTerm(ctx)


# ---------------------------------------------------------------------------------------------- objective


class DistillObjective(nn.Module):
    """Named loss terms plus the balancer; ``forward(features_by_role, input_ids) -> (total, components)``.

    ``components`` holds each term's unweighted value (detached) under ``loss/<name>`` and the weight
    the balancer applied to it under ``weight/<name>``. Learnable parts (projections) and balancer buffers are submodules, so they
    are in ``state_dict()`` and ``parameters()``.
    """

    def __init__(self, cfg: DistillLossConfig, *, teacher: nn.Module, student: nn.Module, prune_map: PruneMap | None = None):
        super().__init__()
        from .balance import LossBalancer

        self.config = cfg
        ctx = ObjectiveContext(models={STUDENT: student, TEACHER: teacher}, prune_map=prune_map, config=cfg)
        weights = cfg.weights()
        unknown = [n for n in weights if n not in LOSS_TERMS]
        if unknown:
            raise ConfigError(
                f"loss.extra.{unknown[0]}: no loss term of that name is registered (known: {', '.join(sorted(LOSS_TERMS))})"
            )
        self.terms = nn.ModuleDict({name: LOSS_TERMS[name](ctx) for name in weights})
        self.balancer = LossBalancer(weights, mode=cfg.balance, anchor="logits")

    def requests(self) -> dict[str, CaptureRequest]:
        """Merged feature requests of all terms, by role."""
        out: dict[str, CaptureRequest] = {}
        for term in self.terms.values():
            for role, req in term.requests().items():
                out[role] = out.get(role, CaptureRequest()).merge(req)
        return out

    def request_for(self, role: str) -> CaptureRequest:
        return self.requests().get(role, CaptureRequest())

    def forward(self, features: dict[str, ModelFeatures], input_ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        components = {name: term(features, input_ids) for name, term in self.terms.items()}
        total, logged = self.balancer(components)
        out = {f"loss/{k}": v.detach().float() for k, v in components.items()}
        for k, v in logged.items():
            if k.endswith("/weight"):
                out[f"weight/{k[: -len('/weight')]}"] = torch.as_tensor(v, dtype=torch.float32)
        return total, out


class DistillationModule(nn.Module):
    """The trainable bundle handed to accelerate: the student and the objective's learnable parts.

    ``forward(input_ids, teacher_features)`` runs the student once and returns a dict with ``loss``
    (the balanced total, differentiable) and ``components`` (detached per-term values).
    """

    def __init__(self, student: nn.Module, objective: DistillObjective):
        super().__init__()
        self.student = student
        self.objective = objective

    @property
    def config(self):
        """The student's config (accelerate and sharding helpers look for ``.config``)."""
        return self.student.config

    def forward(self, input_ids: torch.Tensor, teacher_features: ModelFeatures | None, *, eval_chunk_tokens: int | None = None) -> dict:
        """Training: ``{"loss", "components"}``. With ``eval_chunk_tokens``: ``{"stats"}``, the held-out sums
        ``[nll, tokens, top-1 agreements with the teacher]`` of :func:`minidistill.training.evaluation.heldout_stats`."""
        if eval_chunk_tokens is not None:
            from ..training.evaluation import heldout_stats

            features = model_features(self.student, input_ids, CaptureRequest())
            return {"stats": heldout_stats(features, input_ids, chunk_tokens=eval_chunk_tokens, reference=teacher_features)}
        student_features = model_features(self.student, input_ids, self.objective.request_for(STUDENT))
        total, components = self.objective({STUDENT: student_features, TEACHER: teacher_features}, input_ids)
        return {"loss": total, "components": components}


@torch.no_grad()
def teacher_features(teacher: nn.Module, input_ids: torch.Tensor, objective: DistillObjective, *, copy_head: bool = False) -> ModelFeatures:
    """The frozen teacher's features for one micro-batch (one forward, no gradients)."""
    return model_features(teacher, input_ids, objective.request_for(TEACHER), copy_head=copy_head)


__all__ = [
    "AttentionLossSettings",
    "CaptureRequest",
    "DistillLossConfig",
    "DistillObjective",
    "DistillationModule",
    "HiddenLossSettings",
    "LOSS_TERMS",
    "LayerPairing",
    "LogitLossSettings",
    "LossTerm",
    "ModelFeatures",
    "ObjectiveContext",
    "RelationLossSettings",
    "model_features",
    "register_loss_term",
    "teacher_features",
]
