"""The registered loss terms: each says which features it needs from which role and computes its value.

Adding a term is one class and one :func:`register_loss_term` call (its settings class, when it has options, is
parsed from ``loss.extra.<name>``).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..adapters import get_adapter
from ..config import ConfigError
from ..prune.prune_map import PruneMap
from .features import STUDENT, TEACHER, CachedTeacher, CaptureRequest, EnsembleFeatures, ModelFeatures, unwrap_module
from .loss_config import EXTRA_SETTINGS, DistillLossConfig, ExtraTermSettings, LayerPairing, LogitLossSettings

logger = logging.getLogger(__name__)


def _attention_scaling(model: nn.Module, layer: int) -> float:
    adapter = get_adapter(model)
    attn = adapter.layer_part(adapter.decoder_layers(model)[layer], "self_attn")
    return float(getattr(attn, "scaling", adapter.head_dim(model.config) ** -0.5))


def _sliding_window(model: nn.Module, layer: int) -> int | None:
    adapter = get_adapter(model)
    attn = adapter.layer_part(adapter.decoder_layers(model)[layer], "self_attn")
    window = getattr(attn, "sliding_window", None)
    return int(window) if window else None


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
            head_precision=cfg.head_precision,
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
