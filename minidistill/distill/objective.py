"""The distillation objective: one step's loss from one forward of each model.

A :class:`DistillObjective` owns named loss terms (a registry: logits, hidden, attention, relations,
the knowledge-matching terms under ``loss.extra`` -- weights, mmd, nst, token_attention,
activation_boundary, fsp, rkd -- and any term added with :func:`register_loss_term`), their learnable
parts (hidden-state channel projections, weight maps) and the loss balancer. Each term says which features it needs from which model role
(``student``, ``teacher``; more roles fit, e.g. a second student for mutual learning); the features
are captured during the single forward of each model (:func:`model_features`), and the logit term
works from final hidden states and the output-head weight so that no tokens x vocabulary logits exist.

:class:`DistillationModule` bundles the student and the objective into the one module the trainer
hands to accelerate: its ``forward`` runs the student and the losses, so DDP / FSDP2 / DeepSpeed see
every trainable parameter (student and projections) inside the wrapped forward.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
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
    teacher_bound_margin: float | None = None
    """Teacher-bounded KD: no KD on tokens where the student's CE beats the teacher's by this many nats (None: off)."""
    token_weighting: Literal["none", "confidence", "entropy"] = "none"
    """Per-token KD weight from the teacher: its top probability (confidence) or normalised entropy (entropy)."""

    def validate(self) -> None:
        if self.teacher_bound_margin is not None and not self.teacher_bound_margin >= 0:
            raise ConfigError(f"loss.logits.teacher_bound_margin={self.teacher_bound_margin}: must be >= 0 (or null for off)")
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
    extra: dict[str, float | dict[str, Any]] = field(default_factory=dict)
    """Further loss terms added with ``register_loss_term``, by registered name: a weight, or a mapping of the
    term's settings (``weight`` plus its options, see :data:`EXTRA_SETTINGS`)."""
    balance: Literal["fixed", "auto"] = "fixed"
    """fixed: weighted sum; auto: feature terms rescaled to the logit term's magnitude, times their weights, with
    the magnitudes measured over each optimizer step's micro-batches and all processes (used from the next step)."""

    def validate(self) -> None:
        for name in self.extra:
            if name in ("logits", "hidden", "attention", "relations"):
                raise ConfigError(f"loss.extra.{name}: set loss.{name}.weight instead")
            w = self.extra_weight(name)
            if w < 0:
                raise ConfigError(f"loss.extra.{name}={w}: must be >= 0")
            if name in EXTRA_SETTINGS:
                self.extra_settings(name)

    def extra_weight(self, name: str) -> float:
        """Weight of the extra term ``name`` (a bare number, or the mapping's ``weight``, default 1)."""
        value = self.extra[name]
        if isinstance(value, dict):
            from ..config import _convert

            return _convert(value.get("weight", 1.0), float, f"loss.extra.{name}.weight")
        return float(value)

    def extra_settings(self, name: str) -> "ExtraTermSettings":
        """The parsed settings of the extra term ``name`` (its registered settings class; defaults for a bare weight)."""
        value = self.extra.get(name, {})
        data = dict(value) if isinstance(value, dict) else {"weight": value}
        cls = EXTRA_SETTINGS.get(name, ExtraTermSettings)
        return cls.from_dict(data, prefix=f"loss.extra.{name}.")

    def weights(self) -> dict[str, float]:
        """Weight of every enabled term, by term name."""
        out = {"logits": self.logits.weight}
        for name in ("hidden", "attention", "relations"):
            w = getattr(self, name).weight
            if w > 0:
                out[name] = w
        out.update({name: self.extra_weight(name) for name in self.extra if self.extra_weight(name) > 0})
        return out


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


def feature_terms(cfg: DistillLossConfig) -> tuple[list[str], str | None]:
    """The enabled terms besides the logit term, and the config key that enables the first of them (None: none)."""
    features = [n for n in cfg.weights() if n != "logits"]
    if not features:
        return features, None
    return features, f"loss.{features[0]}.weight" if features[0] in ("hidden", "attention", "relations") else f"loss.extra.{features[0]}"


def check_cache_compatible(cfg: DistillLossConfig) -> None:
    """ConfigError when ``cfg`` needs more of the teacher than a teacher cache holds (its top-k, temperature 1)."""
    features, key = feature_terms(cfg)
    if features:
        raise ConfigError(
            f"teacher_cache.enabled=true holds only the teacher's top-k logits, but {key} asks for teacher features "
            f"({', '.join(features)}), which need a teacher forward: set {key}=0 or teacher_cache.enabled=false"
        )
    lg, default = cfg.logits, LogitLossSettings()
    for key in ("divergence", "temperature", "top_k", "top_p", "teacher_bound_margin", "token_weighting"):
        if getattr(lg, key) != getattr(default, key):
            raise ConfigError(
                f"teacher_cache.enabled=true trains the forward KL at temperature 1 against the cached top-k (its k sets the "
                f"truncation), but loss.logits.{key}={getattr(lg, key)!r}: leave it at {getattr(default, key)!r} or set "
                "teacher_cache.enabled=false"
            )


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
    return feats


# ---------------------------------------------------------------------------------------------- loss terms


@dataclass
class ObjectiveContext:
    """What loss-term builders may look at: the models by role, the prune map, the config."""

    models: dict[str, nn.Module]
    prune_map: PruneMap | None
    config: DistillLossConfig
    vocab_size: int | None = None
    """Token ids of the shared tokenizer when the two heads differ by padding rows (those rows are masked)."""


class LossTerm(nn.Module):
    """One named loss term: which features it needs per role, and its value from them."""

    def requests(self) -> dict[str, CaptureRequest]:
        return {}

    def forward(self, features: dict[str, ModelFeatures], input_ids: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError


LossTermBuilder = Callable[[ObjectiveContext], LossTerm]
LOSS_TERMS: dict[str, LossTermBuilder] = {}


@dataclass
class ExtraTermSettings(ConfigBase):
    """Settings of a term under ``loss.extra.<name>``; a bare number there sets only the weight."""

    weight: float = 1.0
    """Weight of the term (0 disables it)."""


EXTRA_SETTINGS: dict[str, type[ExtraTermSettings]] = {}
"""Settings class of each extra term that has options (parsed from ``loss.extra.<name>``)."""


def register_loss_term(name: str, settings: type[ExtraTermSettings] | None = None) -> Callable[[LossTermBuilder], LossTermBuilder]:
    """Register a builder for the loss term ``name`` (its weight is read from the balancer weights).

    ``settings``: the term's options class, parsed from a mapping under ``loss.extra.<name>``
    (builders read it with ``ctx.config.extra_settings(name)``).
    """

    def deco(builder: LossTermBuilder) -> LossTermBuilder:
        LOSS_TERMS[name] = builder
        if settings is not None:
            EXTRA_SETTINGS[name] = settings
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

    def __init__(self, cfg: LogitLossSettings, vocab_size: int | None = None):
        super().__init__()
        from .losses.fused import FusedLogitKDLoss

        self.loss = FusedLogitKDLoss(
            cfg.divergence,
            temperature=cfg.temperature,
            beta=cfg.beta,
            top_k=cfg.top_k,
            top_p=cfg.top_p,
            ce_weight=cfg.ce_weight,
            chunk_tokens=cfg.chunk_tokens,
            bound_margin=cfg.teacher_bound_margin,
            token_weighting=cfg.token_weighting,
            vocab_size=vocab_size,
        )
        self.ce = self.loss.loss_fn.needs_labels
        from .losses.cached import CachedLogitKDLoss

        self.cached = CachedLogitKDLoss(chunk_tokens=cfg.chunk_tokens, vocab_size=vocab_size, ce_weight=cfg.ce_weight)

    def forward(self, features, input_ids, target_mask: torch.Tensor | None = None):
        """``target_mask`` [batch, seq] (bool): only positions predicting a True token count (None: all)."""
        s, t = features[STUDENT], features[TEACHER]
        extra = None
        if isinstance(t, EnsembleFeatures):
            t, extra = t.members[0], [(m.final_hidden[:, :-1], m.head_weight, m.head_bias) for m in t.members[1:]]
        if isinstance(t, CachedTeacher):
            if target_mask is not None:
                raise ValueError("target_mask is not supported with a cached teacher")
            h_s = s.final_hidden[:, :-1]
            labels = input_ids[:, 1:] if self.cached.ce_weight > 0 else None
            return self.cached(h_s, s.head_weight, t.indices, t.logprobs, t.rest, labels, student_head_bias=s.head_bias)
        h_s = s.final_hidden[:, :-1].reshape(-1, s.final_hidden.shape[-1])
        h_t = t.final_hidden[:, :-1].reshape(-1, t.final_hidden.shape[-1])
        labels = input_ids[:, 1:].reshape(-1) if self.ce else None
        if target_mask is not None:
            ignore = self.loss.loss_fn.ignore_index
            labels = input_ids[:, 1:].masked_fill(~target_mask[:, 1:], ignore).reshape(-1)
        return self.loss(
            h_s, s.head_weight, h_t, t.head_weight, labels, student_head_bias=s.head_bias, teacher_head_bias=t.head_bias,
            extra_teachers=extra,
        )


@register_loss_term("logits")
def _build_logits(ctx: ObjectiveContext) -> LossTerm:
    rows = {role: unwrap_module(m).get_output_embeddings().weight.shape[0] for role, m in ctx.models.items()}
    if ctx.vocab_size is None and len(set(rows.values())) > 1:
        raise ConfigError(
            f"the teacher's lm_head has {rows[TEACHER]} rows and the student's {rows[STUDENT]}: pass vocab_size (the shared "
            "tokenizer's ids, see minidistill.distill.pairing.align_vocabularies) so that the padding rows are masked"
        )
    return LogitTerm(ctx.config.logits, ctx.vocab_size)


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


# ---------------------------------------------------------------------------------------------- knowledge-matching terms
# Terms under ``loss.extra.<name>`` with their settings (a mapping: ``weight`` plus options).


def _layer_count(model: nn.Module) -> int:
    return get_adapter(model).shape(model.config)["num_layers"]


def _check_student_layers(ctx: ObjectiveContext, pairing: LayerPairing, term: str) -> None:
    """ConfigError when ``pairing.student_layers`` names a layer the student does not have."""
    n = _layer_count(ctx.models[STUDENT])
    bad = [i for i in pairing.student_layers or [] if not 0 <= i < n]
    if bad:
        raise ConfigError(f"loss.{term}.pairing.student_layers has {bad}: the student has layers 0..{n - 1}")


def _feature_pairs(ctx: ObjectiveContext, pairing: LayerPairing, term: str) -> list[tuple[int, int]]:
    _check_student_layers(ctx, pairing, term)
    return _pairs(ctx, pairing, term)


def _kept_hidden(ctx: ObjectiveContext, term: str, why: str) -> list[int] | None:
    """Teacher channels compared with the student's (the prune map's kept channels; None for equal widths)."""
    if ctx.prune_map is not None:
        return list(ctx.prune_map.kept_hidden)
    s_dim = get_adapter(ctx.models[STUDENT]).shape(ctx.models[STUDENT].config)["hidden_size"]
    t_dim = get_adapter(ctx.models[TEACHER]).shape(ctx.models[TEACHER].config)["hidden_size"]
    if s_dim != t_dim:
        raise ConfigError(f"loss.{term}: {why} needs equal hidden widths or a prune map (student {s_dim}, teacher {t_dim})")
    return None


def _is_sharded(model: nn.Module) -> bool:
    """Whether ``model``'s parameters are FSDP2 shards (DTensor) or DeepSpeed ZeRO-3 partitions."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) or hasattr(p, "ds_id") for p in model.parameters())


def _select(x: torch.Tensor, index: list[int] | None) -> torch.Tensor:
    return x if index is None else x.index_select(-1, torch.as_tensor(index, device=x.device))


@dataclass
class WeightMatchSettings(ExtraTermSettings):
    """``loss.extra.weights``: L2 between student weights and the teacher's (through the prune map, else learned maps)."""

    pairing: LayerPairing = field(default_factory=lambda: LayerPairing(strategy="uniform"))
    """Without a prune map: which teacher layer's weights each student layer is compared with."""


class WeightMatchTerm(LossTerm):
    """Student parameters against teacher weights mapped through the prune map (or learned linear maps).

    Reads whole student parameters, so it runs unsharded (one process or DDP); FSDP2 / ZeRO-3 are refused.
    The targets are plain tensors (not buffers: they are neither checkpointed nor broadcast by DDP).
    """

    def __init__(self, ctx: ObjectiveContext, cfg: WeightMatchSettings):
        super().__init__()
        from .losses.weights import LinearWeightMap, WeightMatchLoss

        student, teacher = ctx.models[STUDENT], ctx.models[TEACHER]
        self._student = (student,)  # a reference, not a submodule: the student's parameters belong to the student
        s_params = dict(student.named_parameters())
        if ctx.prune_map is not None:
            from ..prune.apply import apply_prune_map

            mapped = dict(apply_prune_map(teacher, ctx.prune_map).named_parameters())
            self.targets = {n: mapped[n].detach() for n, p in s_params.items() if n in mapped and mapped[n].shape == p.shape}
            self.map = None
        else:
            pairs = dict(_pairs(ctx, cfg.pairing, "extra.weights"))
            t_params = dict(teacher.named_parameters())
            prefix = get_adapter(student).layers + "."
            self.targets = {}
            for name, p in s_params.items():
                t_name = name
                if name.startswith(prefix):
                    index, _, rest = name[len(prefix) :].partition(".")
                    if int(index) not in pairs:
                        continue
                    t_name = f"{prefix}{pairs[int(index)]}.{rest}"
                t = t_params.get(t_name)
                if t is not None and t.dim() == p.dim() and p.dim() in (1, 2):
                    self.targets[name] = t.detach()
            size_pairs = {
                pair for n, t in self.targets.items() for pair in LinearWeightMap.axis_pairs(s_params[n].shape, t.shape)
            }
            self.map = LinearWeightMap(size_pairs)
        if not self.targets:
            raise ConfigError("loss.extra.weights: no student parameter has a teacher counterpart")
        self.loss = WeightMatchLoss()

    def forward(self, features, input_ids):
        if _is_sharded(self._student[0]):
            raise ConfigError(
                "loss.extra.weights reads whole student parameters: use it in one process or under DDP, "
                "not FSDP2 / DeepSpeed ZeRO-3 (set loss.extra.weights to 0 there)"
            )
        params = dict(self._student[0].named_parameters())
        student, targets = {}, {}
        for name, target in self.targets.items():
            p = params[name]
            if target.device != p.device:
                target = self.targets[name] = target.to(p.device)
            student[name] = p
            targets[name] = target if self.map is None else self.map(target, p.shape)
        return self.loss(student, targets)


@dataclass
class FeatureMMDSettings(ExtraTermSettings):
    """``loss.extra.mmd``: maximum mean discrepancy between student and teacher activations per layer pair."""

    KEY: ClassVar[str] = "mmd"
    kernel: Literal["linear", "polynomial", "gaussian"] = "gaussian"
    """Kernel between samples (linear, polynomial, gaussian)."""
    samples: Literal["neurons", "tokens"] = "tokens"
    """tokens: each token's hidden state is a sample; neurons: each channel's activations over the tokens (NST)."""
    degree: int = 2
    """Polynomial kernel degree."""
    coef: float = 0.0
    """Polynomial kernel offset."""
    sigma: float = 1.0
    """Gaussian kernel bandwidth (samples are L2-normalised)."""
    pairing: LayerPairing = field(default_factory=LayerPairing)
    """Layer pairs compared."""

    def validate(self) -> None:
        if self.degree < 1:
            raise ConfigError(f"loss.extra.{self.KEY}.degree={self.degree}: must be >= 1")
        if self.sigma <= 0:
            raise ConfigError(f"loss.extra.{self.KEY}.sigma={self.sigma}: must be positive")


@dataclass
class NSTSettings(FeatureMMDSettings):
    """``loss.extra.nst``: neuron selectivity transfer (MMD over neurons, polynomial kernel of degree 2)."""

    KEY: ClassVar[str] = "nst"

    kernel: Literal["linear", "polynomial", "gaussian"] = "polynomial"
    samples: Literal["neurons", "tokens"] = "neurons"


class FeatureMMDTerm(LossTerm):
    """Mean over layer pairs of the MMD between student and teacher layer outputs."""

    def __init__(self, ctx: ObjectiveContext, cfg: FeatureMMDSettings):
        super().__init__()
        from .losses.distribution import FeatureMMDLoss

        name = cfg.KEY
        self.pairs = _feature_pairs(ctx, cfg.pairing, f"extra.{name}")
        self.kept = _kept_hidden(ctx, f"extra.{name}", "samples=tokens") if cfg.samples == "tokens" else None
        self.loss = FeatureMMDLoss(cfg.kernel, samples=cfg.samples, degree=cfg.degree, coef=cfg.coef, sigma=cfg.sigma)

    def requests(self):
        return {STUDENT: CaptureRequest(hidden={s for s, _ in self.pairs}), TEACHER: CaptureRequest(hidden={t for _, t in self.pairs})}

    def forward(self, features, input_ids):
        s, t = features[STUDENT], features[TEACHER]
        return torch.stack([self.loss(s.hidden[i], _select(t.hidden[j], self.kept)) for i, j in self.pairs]).mean()


@dataclass
class TokenAttentionSettings(ExtraTermSettings):
    """``loss.extra.token_attention``: per-token attention maps (activation norms or saliency) between paired layers."""

    source: Literal["activation", "gradient"] = "activation"
    """activation: per-token norm of the hidden states; gradient: of |dCE/dh| (one more teacher forward + backward,
    a double backward through the student, B x T x vocab logits of both models, ~2.4x a step; needs eager student
    attention, one process or DDP)."""
    pairing: LayerPairing = field(default_factory=LayerPairing)
    """Layer pairs compared."""


def _model_saliency(model: nn.Module, input_ids: torch.Tensor, layers: list[int]) -> dict[int, torch.Tensor]:
    """``|dCE/dh|`` of a frozen model's own next-token CE w.r.t. the outputs of ``layers`` (one forward + backward)."""
    from .losses.saliency import next_token_ce, saliency

    inner = unwrap_module(model)
    decoder = get_adapter(inner).decoder_layers(inner)
    lowest, grabbed = min(layers), {}

    def hook(i, _m, _args, out):
        h = out[0] if isinstance(out, tuple) else out
        if i == lowest:  # the graph starts here (the model's weights are frozen)
            h = h.detach().requires_grad_(True)
            out = (h, *out[1:]) if isinstance(out, tuple) else h
        grabbed[i] = h
        return out

    handles = [decoder[i].register_forward_hook(functools.partial(hook, i)) for i in set(layers)]
    try:
        with torch.enable_grad():
            logits = model(input_ids=input_ids, use_cache=False).logits
            grads = saliency(next_token_ce(logits, input_ids), [grabbed[i] for i in layers], create_graph=False)
    finally:
        for h in handles:
            h.remove()
    return dict(zip(layers, grads))


class TokenAttentionTerm(LossTerm):
    """Mean over layer pairs of the token-attention transfer loss (activation- or gradient-based)."""

    def __init__(self, ctx: ObjectiveContext, cfg: TokenAttentionSettings):
        super().__init__()
        from .losses.saliency import TokenAttentionLoss

        self.pairs = _feature_pairs(ctx, cfg.pairing, "extra.token_attention")
        self.source = cfg.source
        implementation = getattr(unwrap_module(ctx.models[STUDENT]).config, "_attn_implementation", None) or "eager"
        if cfg.source == "gradient" and implementation != "eager":
            raise ConfigError(
                "loss.extra.token_attention.source=gradient backpropagates through the student's saliency (a double "
                f"backward), which {implementation!r} attention kernels do not support; set student.attn_implementation=eager"
            )
        self._teacher = (ctx.models[TEACHER],)  # a reference: the frozen teacher is not part of the objective
        self.loss = TokenAttentionLoss()

    def requests(self):
        teacher = set() if self.source == "gradient" else {t for _, t in self.pairs}
        return {STUDENT: CaptureRequest(hidden={s for s, _ in self.pairs}), TEACHER: CaptureRequest(hidden=teacher)}

    def forward(self, features, input_ids):
        s, t = features[STUDENT], features[TEACHER]
        if self.source == "activation":
            return torch.stack([self.loss(s.hidden[i], t.hidden[j]) for i, j in self.pairs]).mean()
        from .losses.saliency import next_token_ce, saliency

        if not torch.is_grad_enabled() or not s.final_hidden.requires_grad:
            raise ConfigError("loss.extra.token_attention.source=gradient needs the student's forward graph (training only)")
        if _is_sharded(self._teacher[0]):
            raise ConfigError(
                "loss.extra.token_attention.source=gradient runs in one process or under DDP: FSDP2 / DeepSpeed ZeRO-3 "
                "do not support its double backward and second teacher pass; use source=activation there"
            )
        logits = F.linear(s.final_hidden, s.head_weight, s.head_bias)
        s_sal = saliency(next_token_ce(logits, input_ids), [s.hidden[i] for i, _ in self.pairs], create_graph=True)
        t_sal = _model_saliency(self._teacher[0], input_ids, [j for _, j in self.pairs])
        return torch.stack([self.loss(g, t_sal[j]) for g, (_, j) in zip(s_sal, self.pairs)]).mean()


@dataclass
class ActivationBoundarySettings(ExtraTermSettings):
    """``loss.extra.activation_boundary``: hinge making student MLP neurons active where the teacher's are."""

    margin: float = 0.25
    """How far past zero the student's gate pre-activation must be."""
    pairing: LayerPairing = field(default_factory=LayerPairing)
    """Layer pairs compared (neurons paired by the prune map's kept neurons)."""

    def validate(self) -> None:
        if self.margin < 0:
            raise ConfigError(f"loss.extra.activation_boundary.margin={self.margin}: must be >= 0")


class ActivationBoundaryTerm(LossTerm):
    """Mean over layer pairs of the activation-boundary hinge on MLP gate pre-activations."""

    def __init__(self, ctx: ObjectiveContext, cfg: ActivationBoundarySettings):
        super().__init__()
        from .losses.boundary import ActivationBoundaryLoss

        self.pairs = _feature_pairs(ctx, cfg.pairing, "extra.activation_boundary")
        s_size = get_adapter(ctx.models[STUDENT]).shape(ctx.models[STUDENT].config)["intermediate_size"]
        t_size = get_adapter(ctx.models[TEACHER]).shape(ctx.models[TEACHER].config)["intermediate_size"]
        self.neurons: dict[int, list[int] | None] = {}
        for i, j in self.pairs:
            if ctx.prune_map is not None and ctx.prune_map.teacher_layer_of(i) == j:
                self.neurons[i] = list(ctx.prune_map.layers[i].kept_neurons)
            elif s_size == t_size:
                self.neurons[i] = None
            else:
                raise ConfigError(
                    f"loss.extra.activation_boundary: student layer {i} and teacher layer {j} have {s_size} and {t_size} "
                    "MLP neurons and no prune map pairs them; pair layers with pairing.strategy=prune_map"
                )
        self.loss = ActivationBoundaryLoss(cfg.margin)

    def requests(self):
        return {STUDENT: CaptureRequest(gates={s for s, _ in self.pairs}), TEACHER: CaptureRequest(gates={t for _, t in self.pairs})}

    def forward(self, features, input_ids):
        s, t = features[STUDENT], features[TEACHER]
        return torch.stack([self.loss(s.gates[i], _select(t.gates[j], self.neurons[i])) for i, j in self.pairs]).mean()


@dataclass
class FlowSettings(ExtraTermSettings):
    """``loss.extra.fsp``: flow matrices between two layers' features, matched between paired layer pairs."""

    student_pairs: list[list[int]] | None = None
    """[[first, second], ...] student layers (each with its paired teacher layer); None: consecutive paired layers."""
    matrix: Literal["channels", "tokens"] = "channels"
    """channels: FSP [D, D] over the prune map's kept channels; tokens: Gram [T, T] (any widths)."""
    normalize: bool = True
    """L2-normalise each token's features before the product."""
    pairing: LayerPairing = field(default_factory=LayerPairing)
    """Which teacher layer each student layer is paired with."""

    def validate(self) -> None:
        for k, pair in enumerate(self.student_pairs or []):
            if len(pair) != 2:
                raise ConfigError(f"loss.extra.fsp.student_pairs[{k}]={pair}: must be [first_layer, second_layer]")
            if pair[0] == pair[1]:
                raise ConfigError(
                    f"loss.extra.fsp.student_pairs[{k}]={pair} uses layer {pair[0]} twice: a flow matrix relates two different layers"
                )


class FlowTerm(LossTerm):
    """Flow (FSP / Gram) matrices of student layer pairs against those of their teacher layer pairs."""

    def __init__(self, ctx: ObjectiveContext, cfg: FlowSettings):
        super().__init__()
        from .losses.flow import FlowLoss

        paired = dict(_feature_pairs(ctx, cfg.pairing, "extra.fsp"))
        n = _layer_count(ctx.models[STUDENT])
        if cfg.student_pairs is None:
            layers = sorted(paired)
            pairs = [(a, b) for a, b in zip(layers, layers[1:])]
            if not pairs:
                raise ConfigError("loss.extra.fsp: the pairing gives one student layer; a flow matrix needs two (set student_pairs)")
        else:
            pairs = [(int(a), int(b)) for a, b in cfg.student_pairs]
        for k, (a, b) in enumerate(pairs):
            for layer in (a, b):
                if not 0 <= layer < n:
                    raise ConfigError(f"loss.extra.fsp.student_pairs[{k}]={[a, b]}: the student has layers 0..{n - 1}")
                if layer not in paired:
                    raise ConfigError(f"loss.extra.fsp.student_pairs[{k}]={[a, b]}: layer {layer} has no teacher layer in the pairing")
        self.pairs = [((a, b), (paired[a], paired[b])) for a, b in pairs]
        self.kept = _kept_hidden(ctx, "extra.fsp", "matrix=channels") if cfg.matrix == "channels" else None
        self.loss = FlowLoss(cfg.matrix, normalize=cfg.normalize)

    def requests(self):
        s_layers = {x for (a, b), _ in self.pairs for x in (a, b)}
        t_layers = {x for _, (a, b) in self.pairs for x in (a, b)}
        return {STUDENT: CaptureRequest(hidden=s_layers), TEACHER: CaptureRequest(hidden=t_layers)}

    def forward(self, features, input_ids):
        s, t = features[STUDENT], features[TEACHER]
        student = [(s.hidden[a], s.hidden[b]) for (a, b), _ in self.pairs]
        teacher = [(_select(t.hidden[a], self.kept), _select(t.hidden[b], self.kept)) for _, (a, b) in self.pairs]
        return self.loss(student, teacher)


@dataclass
class RelationalKDSettings(ExtraTermSettings):
    """``loss.extra.rkd``: distance- and angle-wise relations between the batch's pooled sequence features."""

    distance_weight: float = 1.0
    """Weight of the distance-wise loss."""
    angle_weight: float = 2.0
    """Weight of the angle-wise loss."""
    student_layer: int | None = None
    """Student layer whose outputs are pooled (None: the final hidden states, the lm_head input)."""
    teacher_layer: int | None = None
    """Teacher layer pooled (None: final hidden states, or the prune map's layer of student_layer)."""

    def validate(self) -> None:
        if self.distance_weight < 0 or self.angle_weight < 0 or self.distance_weight + self.angle_weight == 0:
            raise ConfigError("loss.extra.rkd.distance_weight / angle_weight: both >= 0 and not both 0")


class RelationalKDTerm(LossTerm):
    """RKD on token-averaged features of every sequence of the global micro-batch (gathered across ranks).

    The value does not depend on the process count, and the gradient is scaled so that data-parallel
    averaging gives the one-process gradient. Relations span one micro-batch of all ranks, not accumulation steps.
    """

    def __init__(self, ctx: ObjectiveContext, cfg: RelationalKDSettings):
        super().__init__()
        from .losses.rkd import RelationalKDLoss

        ns, nt = _layer_count(ctx.models[STUDENT]), _layer_count(ctx.models[TEACHER])
        s_layer, t_layer = cfg.student_layer, cfg.teacher_layer
        if s_layer is not None and not 0 <= s_layer < ns:
            raise ConfigError(f"loss.extra.rkd.student_layer={s_layer}: the student has layers 0..{ns - 1}")
        if t_layer is not None and not 0 <= t_layer < nt:
            raise ConfigError(f"loss.extra.rkd.teacher_layer={t_layer}: the teacher has layers 0..{nt - 1}")
        if s_layer is not None and t_layer is None:
            if ctx.prune_map is None:
                raise ConfigError("loss.extra.rkd.student_layer is set but there is no prune map: set loss.extra.rkd.teacher_layer")
            t_layer = ctx.prune_map.teacher_layer_of(s_layer)
        if (s_layer is None) != (t_layer is None):
            raise ConfigError("loss.extra.rkd: set both student_layer and teacher_layer, or neither (final hidden states)")
        self.student_layer, self.teacher_layer = s_layer, t_layer
        self.loss = RelationalKDLoss(cfg.distance_weight, cfg.angle_weight)

    def requests(self):
        if self.student_layer is None:
            return {}
        return {STUDENT: CaptureRequest(hidden={self.student_layer}), TEACHER: CaptureRequest(hidden={self.teacher_layer})}

    def forward(self, features, input_ids):
        from .losses.rkd import MIN_SEQUENCES_PER_RANK, gather_rows, scale_gradient

        s, t = features[STUDENT], features[TEACHER]
        h_s = s.final_hidden if self.student_layer is None else s.hidden[self.student_layer]
        h_t = t.final_hidden if self.teacher_layer is None else t.hidden[self.teacher_layer]
        if h_s.shape[0] < MIN_SEQUENCES_PER_RANK:
            raise ConfigError(
                f"loss.extra.rkd needs at least {MIN_SEQUENCES_PER_RANK} sequences per process in each micro-batch, "
                f"got {h_s.shape[0]}: raise train.batch_size (it is split over processes and accumulation steps)"
            )
        dtype = torch.promote_types(h_s.dtype, torch.float32)
        pooled_s = gather_rows(h_s.to(dtype).mean(1))
        with torch.no_grad():
            pooled_t = gather_rows(h_t.to(dtype).mean(1))
        return scale_gradient(self.loss(pooled_s, pooled_t))


def _register_extra(name: str, settings: type[ExtraTermSettings], term: Callable[[ObjectiveContext, Any], LossTerm]) -> None:
    register_loss_term(name, settings)(lambda ctx: term(ctx, ctx.config.extra_settings(name)))


for _name, _settings, _term in (
    ("weights", WeightMatchSettings, WeightMatchTerm),
    ("mmd", FeatureMMDSettings, FeatureMMDTerm),
    ("nst", NSTSettings, FeatureMMDTerm),
    ("token_attention", TokenAttentionSettings, TokenAttentionTerm),
    ("activation_boundary", ActivationBoundarySettings, ActivationBoundaryTerm),
    ("fsp", FlowSettings, FlowTerm),
    ("rkd", RelationalKDSettings, RelationalKDTerm),
):
    _register_extra(_name, _settings, _term)
del _name, _settings, _term


# ---------------------------------------------------------------------------------------------- objective


class DistillObjective(nn.Module):
    """Named loss terms plus the balancer; ``forward(features_by_role, input_ids) -> (total, components)``.

    ``components`` holds each term's unweighted value (detached) under ``loss/<name>`` and the weight
    the balancer applied to it under ``weight/<name>``. Learnable parts (projections) and balancer buffers are submodules, so they
    are in ``state_dict()`` and ``parameters()``.
    """

    def __init__(self, cfg: DistillLossConfig, *, teacher: nn.Module, student: nn.Module, prune_map: PruneMap | None = None,
                 vocab_size: int | None = None):
        super().__init__()
        from .balance import LossBalancer

        self.config = cfg
        self.vocab_size = vocab_size
        ctx = ObjectiveContext(models={STUDENT: student, TEACHER: teacher}, prune_map=prune_map, config=cfg, vocab_size=vocab_size)
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

    def forward(self, features: dict[str, ModelFeatures], input_ids: torch.Tensor,
                target_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``target_mask`` [batch, seq] (bool): the logit term counts only positions predicting a True token
        (then the logit term must be the only term)."""
        if target_mask is None:
            components = {name: term(features, input_ids) for name, term in self.terms.items()}
        else:
            if list(self.terms) != ["logits"]:
                raise ValueError(f"target_mask masks the logit term only, but the objective also has {sorted(set(self.terms) - {'logits'})}")
            components = {"logits": self.terms["logits"](features, input_ids, target_mask)}
        total, logged = self.balancer(components)
        out = {f"loss/{k}": v.detach().float() for k, v in components.items()}
        for k, v in logged.items():
            if k.endswith("/weight"):
                out[f"weight/{k[: -len('/weight')]}"] = torch.as_tensor(v, dtype=torch.float32)
        return total, out


class DistillationModule(nn.Module):
    """The trainable bundle handed to accelerate: the student, its objective's learnable parts, and any peers.

    ``forward(input_ids, teacher_features)`` runs every trainable model once and returns a dict with
    ``loss`` (the sum of the models' balanced totals, differentiable) and ``components`` (detached per-term
    values). Peers (deep mutual learning, :mod:`minidistill.distill.mutual`) each have their own objective
    against the teacher, scaled by ``teacher_weight``, plus ``mutual_weight`` x ``mutual`` to the other peers;
    the student is peer 0 and logs its terms under their usual names, peer ``i`` under ``peer<i>/``. Early-exit
    heads (``exits``, :mod:`minidistill.distill.exits`) add their loss against the student's own final layer; with
    ``netaug`` (:mod:`minidistill.distill.netaug`) the student also runs inside the wider model (``netaug_ratio``).
    """

    def __init__(self, student: nn.Module, objective: DistillObjective, *, peers: list[nn.Module] | None = None,
                 peer_objectives: list[DistillObjective] | None = None, mutual: nn.Module | None = None,
                 mutual_weight: float = 1.0, teacher_weight: float = 1.0, exits: nn.Module | None = None,
                 netaug: nn.Module | None = None):
        super().__init__()
        self.student = student
        self.objective = objective
        peers, peer_objectives = list(peers or []), list(peer_objectives or [])
        if len(peers) != len(peer_objectives) or (peers and mutual is None):
            raise ValueError("each peer needs its own objective, and peers need a mutual loss")
        self.peers = nn.ModuleList(peers)
        self.peer_objectives = nn.ModuleList(peer_objectives)
        self.mutual = mutual
        self.mutual_weight, self.teacher_weight = float(mutual_weight), float(teacher_weight)
        if exits is not None and peers:
            raise ValueError("early exits train one student; they do not combine with peers")
        self.exits = exits
        """:class:`~minidistill.distill.exits.ExitHeads` on the student's intermediate layers (None: none)."""
        if netaug is not None and (peers or "logits" not in objective.terms):
            raise ValueError("netaug trains one student with a logit term")
        self.netaug = netaug
        """:class:`~minidistill.distill.netaug.AugmentedWidth`: the wider model's extra neurons (None: none)."""

    @property
    def config(self):
        """The student's config (accelerate and sharding helpers look for ``.config``)."""
        return self.student.config

    def trainable_models(self) -> list[nn.Module]:
        """The student, then each peer."""
        return [self.student, *self.peers]

    def objectives(self) -> list[DistillObjective]:
        """Each trainable model's objective against the teacher, in :meth:`trainable_models` order."""
        return [self.objective, *self.peer_objectives]

    def forward(self, input_ids: torch.Tensor, teacher_features: ModelFeatures | None, *, eval_chunk_tokens: int | None = None,
                target_mask: torch.Tensor | None = None, peer: int = 0, netaug_ratio: float | None = None) -> dict:
        """Training: ``{"loss", "components"}`` (``target_mask``: see :meth:`DistillObjective.forward`). With
        ``eval_chunk_tokens``: ``{"stats"}``, the held-out sums ``[nll, tokens, top-1 agreements with the teacher]``
        of :func:`minidistill.training.evaluation.heldout_stats` for trainable model ``peer`` (0: the student)."""
        exit_request = CaptureRequest(hidden=set(self.exits.layers)) if self.exits is not None and peer == 0 else CaptureRequest()
        if eval_chunk_tokens is not None:
            from ..training.evaluation import heldout_stats

            features = model_features(self.trainable_models()[peer], input_ids, exit_request)
            out = {"stats": heldout_stats(features, input_ids, chunk_tokens=eval_chunk_tokens, reference=teacher_features,
                                          vocab_size=self.objective.vocab_size)}
            if exit_request.hidden:
                out["exit_stats"] = {
                    layer: heldout_stats(dataclasses.replace(features, final_hidden=self.exits.exit_hidden(layer, features.hidden[layer])),
                                         input_ids, chunk_tokens=eval_chunk_tokens, reference=teacher_features,
                                         vocab_size=self.objective.vocab_size)
                    for layer in self.exits.layers
                }
            return out
        if not self.peers:
            student_features = model_features(self.student, input_ids, self.objective.request_for(STUDENT).merge(exit_request))
            total, components = self.objective({STUDENT: student_features, TEACHER: teacher_features}, input_ids, target_mask)
            if self.exits is not None:
                exit_total, exit_components = self.exits(student_features.hidden, student_features.final_hidden,
                                                         student_features.head_weight, student_features.head_bias)
                total = total + exit_total
                components.update(exit_components)
            if self.netaug is not None and netaug_ratio is not None:
                with self.netaug.active(self.student, netaug_ratio):
                    wide = model_features(self.student, input_ids, CaptureRequest())
                wide_loss = self.objective.terms["logits"]({STUDENT: wide, TEACHER: teacher_features}, input_ids)
                total = total + self.netaug.alpha * wide_loss
                components["loss/netaug"] = wide_loss.detach().float()
            return {"loss": total, "components": components}
        return self._mutual_forward(input_ids, teacher_features, target_mask)

    def _mutual_forward(self, input_ids: torch.Tensor, teacher_features: ModelFeatures | None,
                        target_mask: torch.Tensor | None) -> dict:
        objectives = self.objectives()
        feats = [model_features(m, input_ids, obj.request_for(STUDENT)) for m, obj in zip(self.trainable_models(), objectives)]
        flat = [(f.final_hidden[:, :-1].reshape(-1, f.final_hidden.shape[-1]), f.head_weight, f.head_bias) for f in feats]
        labels = input_ids[:, 1:].reshape(-1)
        total, components = None, {}
        for i, (f, obj) in enumerate(zip(feats, objectives)):
            prefix = "" if i == 0 else f"peer{i}/"
            loss = None
            if self.teacher_weight > 0:
                t_loss, comp = obj({STUDENT: f, TEACHER: teacher_features}, input_ids, target_mask)
                loss = self.teacher_weight * t_loss
                components.update({prefix + k: v for k, v in comp.items()})
            h, w, b = flat[i]
            m_loss = self.mutual(h, w, [o for j, o in enumerate(flat) if j != i], labels, head_bias=b)
            components[prefix + "loss/mutual"] = m_loss.detach().float()
            loss = self.mutual_weight * m_loss if loss is None else loss + self.mutual_weight * m_loss
            total = loss if total is None else total + loss
        return {"loss": total, "components": components}


@torch.no_grad()
def teacher_features(teacher: nn.Module, input_ids: torch.Tensor, objective: DistillObjective, *,
                     copy_head: bool = False) -> ModelFeatures | EnsembleFeatures:
    """The frozen teacher's features for one micro-batch (one forward of it, or of each ensemble member; no gradients)."""
    inner = unwrap_module(teacher)
    if isinstance(inner, EnsembleTeacher):
        return EnsembleFeatures([model_features(m, input_ids, objective.request_for(TEACHER), copy_head=copy_head)
                                 for m in inner.members])
    return model_features(teacher, input_ids, objective.request_for(TEACHER), copy_head=copy_head)


__all__ = [
    "EXTRA_SETTINGS",
    "ActivationBoundarySettings",
    "AttentionLossSettings",
    "ExtraTermSettings",
    "FeatureMMDSettings",
    "FlowSettings",
    "NSTSettings",
    "RelationalKDSettings",
    "TokenAttentionSettings",
    "WeightMatchSettings",
    "CachedTeacher",
    "CaptureRequest",
    "check_cache_compatible",
    "feature_terms",
    "DistillLossConfig",
    "DistillObjective",
    "DistillationModule",
    "EnsembleFeatures",
    "EnsembleTeacher",
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
