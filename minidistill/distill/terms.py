"""The registered loss terms: each says which features it needs from which role and computes its value.

Adding a term is one class and one :func:`register_loss_term` call with its settings class (a
:class:`~minidistill.distill.loss_config.TermSettings`, parsed from ``loss.terms.<name>``). A term compares its
settings' ``source`` role (trained) with its ``target`` role (detached).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..adapters import get_adapter
from ..config import ConfigError
from ..prune.prune_map import PruneMap
from .features import CachedTeacher, CaptureRequest, EnsembleFeatures, ModelFeatures, unwrap_module
from .loss_config import (
    TERM_SETTINGS,
    AttentionLossSettings,
    HiddenLossSettings,
    LayerPairing,
    LogitLossSettings,
    RelationLossSettings,
    TermSettings,
)
from .roles import STUDENT, TEACHER

logger = logging.getLogger(__name__)


def _layer_count(model: nn.Module) -> int:
    return get_adapter(model).shape(model.config)["num_layers"]


def _hidden_size(model: nn.Module) -> int:
    return get_adapter(model).shape(model.config)["hidden_size"]


# ---------------------------------------------------------------------------------------------- loss terms


@dataclass
class ObjectiveContext:
    """What a loss-term builder may look at: its settings, the models by role, the prune map.

    The prune map relates the ``student`` role to the ``teacher`` role; pairings ``prune_map`` need those two.
    """

    models: dict[str, nn.Module]
    prune_map: PruneMap | None
    settings: TermSettings
    vocab_size: int | None = None
    """Token ids of the shared tokenizer when the two heads differ by padding rows (those rows are masked)."""

    @property
    def source(self) -> nn.Module:
        """The model of the term's source role (the one trained)."""
        return self.models[self.settings.source]

    @property
    def target(self) -> nn.Module:
        """The model of the term's target role."""
        return self.models[self.settings.target]

    @property
    def key(self) -> str:
        """Where the term is configured (for messages)."""
        return self.settings.key


class LossTerm(nn.Module):
    """One named loss term: which features it needs per role, and its value from the source's and target's features."""

    def __init__(self, ctx: ObjectiveContext | None = None):
        super().__init__()
        self.source, self.target = (ctx.settings.source, ctx.settings.target) if ctx is not None else (STUDENT, TEACHER)
        self.detach_target = ctx.settings.detach_target if ctx is not None else True
        """Whether the objective hands this term its target's features detached (when the target trains)."""

    def requests(self) -> dict[str, CaptureRequest]:
        return {}

    def request(self, source: CaptureRequest, target: CaptureRequest) -> dict[str, CaptureRequest]:
        """``requests()`` for features of the source and the target role."""
        return {self.source: source, self.target: target}

    def pair(self, features: dict[str, ModelFeatures]) -> tuple[ModelFeatures, ModelFeatures]:
        """The source's and the target's features."""
        return features[self.source], features[self.target]

    def forward(self, features: dict[str, ModelFeatures], input_ids: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError


LossTermBuilder = Callable[[ObjectiveContext], LossTerm]
LOSS_TERMS: dict[str, LossTermBuilder] = {}


def register_loss_term(name: str, settings: type[TermSettings] = TermSettings) -> Callable[[LossTermBuilder], LossTermBuilder]:
    """Register a builder for the loss term ``name`` with its settings class (parsed from ``loss.terms.<name>``,
    or from an entry whose ``term`` is ``name``; the builder reads it as ``ctx.settings``)."""

    def deco(builder: LossTermBuilder) -> LossTermBuilder:
        LOSS_TERMS[name] = builder
        TERM_SETTINGS[name] = settings
        return builder

    return deco


def _pairs(ctx: ObjectiveContext, pairing: LayerPairing) -> list[tuple[int, int]]:
    """Source/target layer pairs of the term; ConfigError when none can be formed."""
    from .pairing import PairingError, pair_layers

    key = ctx.key
    ns, nt = _layer_count(ctx.source), _layer_count(ctx.target)
    prune_map = ctx.prune_map
    if pairing.strategy == "prune_map" and prune_map is None:
        raise ConfigError(
            f"{key}.pairing.strategy=prune_map but the {ctx.settings.source} has no prune map from the "
            f"{ctx.settings.target} (it was not pruned from it); set {key}.pairing.strategy=explicit with "
            f"{key}.pairing.explicit, or set {key}.weight=0"
        )
    explicit = [tuple(p) for p in pairing.explicit] if pairing.explicit is not None else None
    try:
        pairs = pair_layers(ns, nt, strategy=pairing.strategy, prune_map=prune_map, k=pairing.k, explicit=explicit)
    except PairingError as e:
        raise ConfigError(f"{key}.pairing: {e}") from None
    if pairing.student_layers is not None:
        pairs = [p for p in pairs if p[0] in set(pairing.student_layers)]
    if not pairs:
        raise ConfigError(f"{key}.pairing selects no layer pair; check {key}.pairing.student_layers")
    return [(int(s), int(t)) for s, t in pairs]


class LogitTerm(LossTerm):
    """Fused (chunked) logit distillation from final hidden states and the lm_head weights."""

    def __init__(self, ctx: ObjectiveContext):
        super().__init__(ctx)
        from .losses.fused import FusedLogitKDLoss

        cfg, vocab_size = ctx.settings, ctx.vocab_size

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
            head_precision=cfg.head_precision,
            detach_teacher=cfg.detach_target,
        )
        self.ce = self.loss.loss_fn.needs_labels
        from .losses.cached import CachedLogitKDLoss

        self.cached = CachedLogitKDLoss(chunk_tokens=cfg.chunk_tokens, vocab_size=vocab_size, ce_weight=cfg.ce_weight)

    def forward(self, features, input_ids, target_mask: torch.Tensor | None = None):
        """``target_mask`` [batch, seq] (bool): only positions predicting a True token count (None: all)."""
        s, t = self.pair(features)
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


@register_loss_term("logits", LogitLossSettings)
def _build_logits(ctx: ObjectiveContext) -> LossTerm:
    source, target = ctx.settings.source, ctx.settings.target
    rows = {role: unwrap_module(ctx.models[role]).get_output_embeddings().weight.shape[0] for role in (source, target)}
    if ctx.vocab_size is None and rows[source] != rows[target]:
        raise ConfigError(
            f"the {target}'s lm_head has {rows[target]} rows and the {source}'s {rows[source]}: pass vocab_size (the shared "
            "tokenizer's ids, see minidistill.distill.pairing.align_vocabularies) so that the padding rows are masked"
        )
    return LogitTerm(ctx)


class HiddenTerm(LossTerm):
    """Mean over layer pairs of the distance between projected student and teacher layer outputs."""

    def __init__(self, ctx: ObjectiveContext):
        super().__init__(ctx)
        from .losses.hidden import ChannelProjection, HiddenStateLoss

        cfg = ctx.settings
        self.pairs = _pairs(ctx, cfg.pairing)
        s_dim, t_dim = _hidden_size(ctx.source), _hidden_size(ctx.target)
        # Without a prune map, student channel i starts mapped onto teacher channel i.
        kept = list(ctx.prune_map.kept_hidden) if ctx.prune_map is not None else list(range(min(s_dim, t_dim)))
        self.projection = ChannelProjection(s_dim, t_dim, kept_channels=kept)
        self.loss = HiddenStateLoss(kind=cfg.kind, detach_teacher=cfg.detach_target)

    def requests(self):
        return self.request(CaptureRequest(hidden={s for s, _ in self.pairs}), CaptureRequest(hidden={t for _, t in self.pairs}))

    def forward(self, features, input_ids):
        s, t = self.pair(features)
        losses = [self.loss(self.projection(s.hidden[i]), t.hidden[j]) for i, j in self.pairs]
        return torch.stack(losses).mean()


@register_loss_term("hidden", HiddenLossSettings)
def _build_hidden(ctx: ObjectiveContext) -> LossTerm:
    return HiddenTerm(ctx)


class AttentionTerm(LossTerm):
    """Mean over layer pairs of the attention-map transfer loss (student heads against their teacher heads)."""

    def __init__(self, ctx: ObjectiveContext):
        super().__init__(ctx)
        from .losses.attention import AttentionTransferLoss
        from .pairing import pair_heads

        cfg = ctx.settings
        self.pairs = _pairs(ctx, cfg.pairing)
        self.loss = AttentionTransferLoss(chunk_queries=cfg.chunk_queries)
        self.teacher_heads: dict[int, list[int] | None] = {}
        for i, j in self.pairs:
            if ctx.prune_map is not None and ctx.prune_map.teacher_layer_of(i) == j:
                self.teacher_heads[i] = list(pair_heads(ctx.prune_map, i))
            else:
                self.teacher_heads[i] = None

    def requests(self):
        return self.request(CaptureRequest(qk={s for s, _ in self.pairs}), CaptureRequest(qk={t for _, t in self.pairs}))

    def forward(self, features, input_ids):
        s, t = self.pair(features)
        losses = []
        for i, j in self.pairs:  # scaling and sliding window as each layer's attention function was called
            s_layout, t_layout = s.attention[i], t.attention[j]
            losses.append(
                self.loss(
                    s.queries[i], s.keys[i], t.queries[j], t.keys[j],
                    student_scaling=s_layout.scaling, teacher_scaling=t_layout.scaling, teacher_heads=self.teacher_heads[i],
                    sliding_window=s_layout.sliding_window,
                )
            )
        return torch.stack(losses).mean()


@register_loss_term("attention", AttentionLossSettings)
def _build_attention(ctx: ObjectiveContext) -> LossTerm:
    return AttentionTerm(ctx)


class RelationTerm(LossTerm):
    """Mean over layer pairs of the q/k/v self-relation loss."""

    def __init__(self, ctx: ObjectiveContext):
        super().__init__(ctx)
        from .losses.relations import RelationLoss

        cfg = ctx.settings
        self.pairs = _pairs(ctx, cfg.pairing)
        self.loss = RelationLoss(cfg.num_relation_heads, relations=tuple(cfg.relations))

    def requests(self):
        s_layers, t_layers = {s for s, _ in self.pairs}, {t for _, t in self.pairs}
        return self.request(CaptureRequest(qk=s_layers, values=s_layers), CaptureRequest(qk=t_layers, values=t_layers))

    def forward(self, features, input_ids):
        s, t = self.pair(features)
        losses = [
            self.loss(
                {"q": s.queries[i], "k": s.keys[i], "v": s.values[i]},
                {"q": t.queries[j], "k": t.keys[j], "v": t.values[j]},
            )
            for i, j in self.pairs
        ]
        return torch.stack(losses).mean()


@register_loss_term("relations", RelationLossSettings)
def _build_relations(ctx: ObjectiveContext) -> LossTerm:
    return RelationTerm(ctx)


# ---------------------------------------------------------------------------------------------- knowledge-matching terms


def _check_student_layers(ctx: ObjectiveContext, pairing: LayerPairing) -> None:
    """ConfigError when ``pairing.student_layers`` names a layer the source does not have."""
    n = _layer_count(ctx.source)
    bad = [i for i in pairing.student_layers or [] if not 0 <= i < n]
    if bad:
        raise ConfigError(f"{ctx.key}.pairing.student_layers has {bad}: the {ctx.settings.source} has layers 0..{n - 1}")


def _feature_pairs(ctx: ObjectiveContext, pairing: LayerPairing) -> list[tuple[int, int]]:
    _check_student_layers(ctx, pairing)
    return _pairs(ctx, pairing)


def _kept_hidden(ctx: ObjectiveContext, why: str) -> list[int] | None:
    """Target channels compared with the source's (the prune map's kept channels; None for equal widths)."""
    if ctx.prune_map is not None:
        return list(ctx.prune_map.kept_hidden)
    s_dim, t_dim = _hidden_size(ctx.source), _hidden_size(ctx.target)
    if s_dim != t_dim:
        raise ConfigError(
            f"{ctx.key}: {why} needs equal hidden widths or a prune map ({ctx.settings.source} {s_dim}, {ctx.settings.target} {t_dim})"
        )
    return None


def _is_sharded(model: nn.Module) -> bool:
    """Whether ``model``'s parameters are FSDP2 shards (DTensor) or DeepSpeed ZeRO-3 partitions."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) or hasattr(p, "ds_id") for p in model.parameters())


def _select(x: torch.Tensor, index: list[int] | None) -> torch.Tensor:
    return x if index is None else x.index_select(-1, torch.as_tensor(index, device=x.device))


@dataclass
class WeightMatchSettings(TermSettings):
    """``weights``: L2 between source weights and the target's (through the prune map, else learned maps)."""

    pairing: LayerPairing = field(default_factory=lambda: LayerPairing(strategy="uniform"))
    """Without a prune map: which teacher layer's weights each student layer is compared with."""


class WeightMatchTerm(LossTerm):
    """Student parameters against teacher weights mapped through the prune map (or learned linear maps).

    Reads whole student parameters, so it runs unsharded (one process or DDP); FSDP2 / ZeRO-3 are refused.
    The targets are plain tensors (not buffers: they are neither checkpointed nor broadcast by DDP).
    """

    def __init__(self, ctx: ObjectiveContext):
        super().__init__(ctx)
        from .losses.weights import LinearWeightMap, WeightMatchLoss

        cfg, student, teacher = ctx.settings, ctx.source, ctx.target
        self.key = ctx.key
        self._student = (student,)  # a reference, not a submodule: the student's parameters belong to the student
        s_params = dict(student.named_parameters())
        if ctx.prune_map is not None:
            from ..prune.apply import apply_prune_map

            mapped = dict(apply_prune_map(teacher, ctx.prune_map).named_parameters())
            self.targets = {n: mapped[n].detach() for n, p in s_params.items() if n in mapped and mapped[n].shape == p.shape}
            self.map = None
        else:
            pairs = dict(_pairs(ctx, cfg.pairing))
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
            raise ConfigError(f"{ctx.key}: no {ctx.settings.source} parameter has a {ctx.settings.target} counterpart")
        self.loss = WeightMatchLoss()

    def forward(self, features, input_ids):
        if _is_sharded(self._student[0]):
            raise ConfigError(
                f"{self.key} reads whole student parameters: use it in one process or under DDP, "
                f"not FSDP2 / DeepSpeed ZeRO-3 (set {self.key} to 0 there)"
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
class FeatureMMDSettings(TermSettings):
    """``mmd``: maximum mean discrepancy between source and target activations per layer pair."""

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
        super().validate()
        if self.degree < 1:
            raise ConfigError(f"{self.key}.degree={self.degree}: must be >= 1")
        if self.sigma <= 0:
            raise ConfigError(f"{self.key}.sigma={self.sigma}: must be positive")


@dataclass
class NSTSettings(FeatureMMDSettings):
    """``nst``: neuron selectivity transfer (MMD over neurons, polynomial kernel of degree 2)."""

    kernel: Literal["linear", "polynomial", "gaussian"] = "polynomial"
    samples: Literal["neurons", "tokens"] = "neurons"


class FeatureMMDTerm(LossTerm):
    """Mean over layer pairs of the MMD between student and teacher layer outputs."""

    def __init__(self, ctx: ObjectiveContext):
        super().__init__(ctx)
        from .losses.distribution import FeatureMMDLoss

        cfg = ctx.settings
        self.pairs = _feature_pairs(ctx, cfg.pairing)
        self.kept = _kept_hidden(ctx, "samples=tokens") if cfg.samples == "tokens" else None
        self.loss = FeatureMMDLoss(cfg.kernel, samples=cfg.samples, degree=cfg.degree, coef=cfg.coef, sigma=cfg.sigma)

    def requests(self):
        return self.request(CaptureRequest(hidden={s for s, _ in self.pairs}), CaptureRequest(hidden={t for _, t in self.pairs}))

    def forward(self, features, input_ids):
        s, t = self.pair(features)
        return torch.stack([self.loss(s.hidden[i], _select(t.hidden[j], self.kept)) for i, j in self.pairs]).mean()


@dataclass
class TokenAttentionSettings(TermSettings):
    """``token_attention``: per-token attention maps (activation norms or saliency) between paired layers."""

    signal: Literal["activation", "gradient"] = "activation"
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

    def __init__(self, ctx: ObjectiveContext):
        super().__init__(ctx)
        from .losses.saliency import TokenAttentionLoss

        cfg = ctx.settings
        self.pairs = _feature_pairs(ctx, cfg.pairing)
        self.signal, self.key = cfg.signal, ctx.key
        implementation = getattr(unwrap_module(ctx.source).config, "_attn_implementation", None) or "eager"
        if cfg.signal == "gradient" and implementation != "eager":
            raise ConfigError(
                f"{ctx.key}.signal=gradient backpropagates through the {cfg.source}'s saliency (a double "
                f"backward), which {implementation!r} attention kernels do not support; set student.attn_implementation=eager"
            )
        self._teacher = (ctx.target,)  # a reference: the frozen target is not part of the objective
        self.loss = TokenAttentionLoss()

    def requests(self):
        teacher = set() if self.signal == "gradient" else {t for _, t in self.pairs}
        return self.request(CaptureRequest(hidden={s for s, _ in self.pairs}), CaptureRequest(hidden=teacher))

    def forward(self, features, input_ids):
        s, t = self.pair(features)
        if self.signal == "activation":
            return torch.stack([self.loss(s.hidden[i], t.hidden[j]) for i, j in self.pairs]).mean()
        from .losses.saliency import next_token_ce, saliency

        if not torch.is_grad_enabled() or not s.final_hidden.requires_grad:
            raise ConfigError(f"{self.key}.signal=gradient needs the student's forward graph (training only)")
        if _is_sharded(self._teacher[0]):
            raise ConfigError(
                f"{self.key}.signal=gradient runs in one process or under DDP: FSDP2 / DeepSpeed ZeRO-3 "
                "do not support its double backward and second teacher pass; use signal=activation there"
            )
        logits = F.linear(s.final_hidden, s.head_weight, s.head_bias)
        s_sal = saliency(next_token_ce(logits, input_ids), [s.hidden[i] for i, _ in self.pairs], create_graph=True)
        t_sal = _model_saliency(self._teacher[0], input_ids, [j for _, j in self.pairs])
        return torch.stack([self.loss(g, t_sal[j]) for g, (_, j) in zip(s_sal, self.pairs)]).mean()


@dataclass
class ActivationBoundarySettings(TermSettings):
    """``activation_boundary``: hinge making source MLP neurons active where the target's are."""

    margin: float = 0.25
    """How far past zero the student's gate pre-activation must be."""
    pairing: LayerPairing = field(default_factory=LayerPairing)
    """Layer pairs compared (neurons paired by the prune map's kept neurons)."""

    def validate(self) -> None:
        super().validate()
        if self.margin < 0:
            raise ConfigError(f"{self.key}.margin={self.margin}: must be >= 0")


class ActivationBoundaryTerm(LossTerm):
    """Mean over layer pairs of the activation-boundary hinge on MLP gate pre-activations."""

    def __init__(self, ctx: ObjectiveContext):
        super().__init__(ctx)
        from .losses.boundary import ActivationBoundaryLoss

        cfg = ctx.settings
        self.pairs = _feature_pairs(ctx, cfg.pairing)
        s_size = get_adapter(ctx.source).shape(ctx.source.config)["intermediate_size"]
        t_size = get_adapter(ctx.target).shape(ctx.target.config)["intermediate_size"]
        self.neurons: dict[int, list[int] | None] = {}
        for i, j in self.pairs:
            if ctx.prune_map is not None and ctx.prune_map.teacher_layer_of(i) == j:
                self.neurons[i] = list(ctx.prune_map.layers[i].kept_neurons)
            elif s_size == t_size:
                self.neurons[i] = None
            else:
                raise ConfigError(
                    f"{ctx.key}: {cfg.source} layer {i} and {cfg.target} layer {j} have {s_size} and {t_size} "
                    "MLP neurons and no prune map pairs them; pair layers with pairing.strategy=prune_map"
                )
        self.loss = ActivationBoundaryLoss(cfg.margin)

    def requests(self):
        return self.request(CaptureRequest(gates={s for s, _ in self.pairs}), CaptureRequest(gates={t for _, t in self.pairs}))

    def forward(self, features, input_ids):
        s, t = self.pair(features)
        return torch.stack([self.loss(s.gates[i], _select(t.gates[j], self.neurons[i])) for i, j in self.pairs]).mean()


@dataclass
class FlowSettings(TermSettings):
    """``fsp``: flow matrices between two layers' features, matched between paired layer pairs."""

    student_pairs: list[list[int]] | None = None
    """[[first, second], ...] student layers (each with its paired teacher layer); None: consecutive paired layers."""
    matrix: Literal["channels", "tokens"] = "channels"
    """channels: FSP [D, D] over the prune map's kept channels; tokens: Gram [T, T] (any widths)."""
    normalize: bool = True
    """L2-normalise each token's features before the product."""
    pairing: LayerPairing = field(default_factory=LayerPairing)
    """Which teacher layer each student layer is paired with."""

    def validate(self) -> None:
        super().validate()
        for k, pair in enumerate(self.student_pairs or []):
            if len(pair) != 2:
                raise ConfigError(f"{self.key}.student_pairs[{k}]={pair}: must be [first_layer, second_layer]")
            if pair[0] == pair[1]:
                raise ConfigError(
                    f"{self.key}.student_pairs[{k}]={pair} uses layer {pair[0]} twice: a flow matrix relates two different layers"
                )


class FlowTerm(LossTerm):
    """Flow (FSP / Gram) matrices of student layer pairs against those of their teacher layer pairs."""

    def __init__(self, ctx: ObjectiveContext):
        super().__init__(ctx)
        from .losses.flow import FlowLoss

        cfg, key = ctx.settings, ctx.key
        paired = dict(_feature_pairs(ctx, cfg.pairing))
        n = _layer_count(ctx.source)
        if cfg.student_pairs is None:
            layers = sorted(paired)
            pairs = [(a, b) for a, b in zip(layers, layers[1:])]
            if not pairs:
                raise ConfigError(f"{key}: the pairing gives one {cfg.source} layer; a flow matrix needs two (set student_pairs)")
        else:
            pairs = [(int(a), int(b)) for a, b in cfg.student_pairs]
        for k, (a, b) in enumerate(pairs):
            for layer in (a, b):
                if not 0 <= layer < n:
                    raise ConfigError(f"{key}.student_pairs[{k}]={[a, b]}: the {cfg.source} has layers 0..{n - 1}")
                if layer not in paired:
                    raise ConfigError(f"{key}.student_pairs[{k}]={[a, b]}: layer {layer} has no {cfg.target} layer in the pairing")
        self.pairs = [((a, b), (paired[a], paired[b])) for a, b in pairs]
        self.kept = _kept_hidden(ctx, "matrix=channels") if cfg.matrix == "channels" else None
        self.loss = FlowLoss(cfg.matrix, normalize=cfg.normalize)

    def requests(self):
        s_layers = {x for (a, b), _ in self.pairs for x in (a, b)}
        t_layers = {x for _, (a, b) in self.pairs for x in (a, b)}
        return self.request(CaptureRequest(hidden=s_layers), CaptureRequest(hidden=t_layers))

    def forward(self, features, input_ids):
        s, t = self.pair(features)
        student = [(s.hidden[a], s.hidden[b]) for (a, b), _ in self.pairs]
        teacher = [(_select(t.hidden[a], self.kept), _select(t.hidden[b], self.kept)) for _, (a, b) in self.pairs]
        return self.loss(student, teacher)


@dataclass
class RelationalKDSettings(TermSettings):
    """``rkd``: distance- and angle-wise relations between the batch's pooled sequence features."""

    distance_weight: float = 1.0
    """Weight of the distance-wise loss."""
    angle_weight: float = 2.0
    """Weight of the angle-wise loss."""
    student_layer: int | None = None
    """Student layer whose outputs are pooled (None: the final hidden states, the lm_head input)."""
    teacher_layer: int | None = None
    """Teacher layer pooled (None: final hidden states, or the prune map's layer of student_layer)."""

    def validate(self) -> None:
        super().validate()
        if self.distance_weight < 0 or self.angle_weight < 0 or self.distance_weight + self.angle_weight == 0:
            raise ConfigError(f"{self.key}.distance_weight / angle_weight: both >= 0 and not both 0")


class RelationalKDTerm(LossTerm):
    """RKD on token-averaged features of every sequence of the global micro-batch (gathered across ranks).

    The value does not depend on the process count, and the gradient is scaled so that data-parallel
    averaging gives the one-process gradient. Relations span one micro-batch of all ranks, not accumulation steps.
    """

    def __init__(self, ctx: ObjectiveContext):
        super().__init__(ctx)
        from .losses.rkd import RelationalKDLoss

        cfg, key = ctx.settings, ctx.key
        ns, nt = _layer_count(ctx.source), _layer_count(ctx.target)
        s_layer, t_layer = cfg.student_layer, cfg.teacher_layer
        if s_layer is not None and not 0 <= s_layer < ns:
            raise ConfigError(f"{key}.student_layer={s_layer}: the {cfg.source} has layers 0..{ns - 1}")
        if t_layer is not None and not 0 <= t_layer < nt:
            raise ConfigError(f"{key}.teacher_layer={t_layer}: the {cfg.target} has layers 0..{nt - 1}")
        if s_layer is not None and t_layer is None:
            if ctx.prune_map is None:
                raise ConfigError(f"{key}.student_layer is set but there is no prune map: set {key}.teacher_layer")
            t_layer = ctx.prune_map.teacher_layer_of(s_layer)
        if (s_layer is None) != (t_layer is None):
            raise ConfigError(f"{key}: set both student_layer and teacher_layer, or neither (final hidden states)")
        self.key = key
        self.student_layer, self.teacher_layer = s_layer, t_layer
        self.loss = RelationalKDLoss(cfg.distance_weight, cfg.angle_weight)

    def requests(self):
        if self.student_layer is None:
            return {}
        return self.request(CaptureRequest(hidden={self.student_layer}), CaptureRequest(hidden={self.teacher_layer}))

    def forward(self, features, input_ids):
        from .losses.rkd import MIN_SEQUENCES_PER_RANK, gather_rows, scale_gradient

        s, t = self.pair(features)
        h_s = s.final_hidden if self.student_layer is None else s.hidden[self.student_layer]
        h_t = t.final_hidden if self.teacher_layer is None else t.hidden[self.teacher_layer]
        if h_s.shape[0] < MIN_SEQUENCES_PER_RANK:
            raise ConfigError(
                f"{self.key} needs at least {MIN_SEQUENCES_PER_RANK} sequences per process in each micro-batch, "
                f"got {h_s.shape[0]}: raise train.batch_size (it is split over processes and accumulation steps)"
            )
        dtype = torch.promote_types(h_s.dtype, torch.float32)
        pooled_s = gather_rows(h_s.to(dtype).mean(1))
        with torch.no_grad():
            pooled_t = gather_rows(h_t.to(dtype).mean(1))
        return scale_gradient(self.loss(pooled_s, pooled_t))


for _name, _settings, _term in (
    ("weights", WeightMatchSettings, WeightMatchTerm),
    ("mmd", FeatureMMDSettings, FeatureMMDTerm),
    ("nst", NSTSettings, FeatureMMDTerm),
    ("token_attention", TokenAttentionSettings, TokenAttentionTerm),
    ("activation_boundary", ActivationBoundarySettings, ActivationBoundaryTerm),
    ("fsp", FlowSettings, FlowTerm),
    ("rkd", RelationalKDSettings, RelationalKDTerm),
):
    register_loss_term(_name, _settings)(_term)
del _name, _settings, _term
