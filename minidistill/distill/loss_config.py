"""Typed config of the distillation objective: ``loss.logits`` / ``hidden`` / ``attention`` / ``relations``, the
``loss.extra`` terms' settings, and the checks that need only the config."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from ..config import ConfigBase, ConfigError
from .pairing import PairingStrategy

FEATURE_SECTIONS = ("hidden", "attention", "relations")
"""The feature terms with a section of their own under ``loss`` (the others are under ``loss.extra``)."""

@dataclass
class ExtraTermSettings(ConfigBase):
    """Settings of a term under ``loss.extra.<name>``; a bare number there sets only the weight."""

    weight: float = 1.0
    """Weight of the term (0 disables it)."""


EXTRA_SETTINGS: dict[str, type[ExtraTermSettings]] = {}
"""Settings class of each extra term that has options (parsed from ``loss.extra.<name>``)."""


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
    head_precision: Literal["float32", "autocast"] = "float32"
    """Precision of the lm_head matmuls of the fused loss: float32 always, or, under mixed precision, autocast's
    dtype like every other linear layer (bf16 logits rounded before the float32 softmax, as HF models under autocast
    compute them; the divergence and gradient sums stay float32)."""
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
            if name in ("logits", *FEATURE_SECTIONS):
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
        for name in FEATURE_SECTIONS:
            w = getattr(self, name).weight
            if w > 0:
                out[name] = w
        out.update({name: self.extra_weight(name) for name in self.extra if self.extra_weight(name) > 0})
        return out


def feature_terms(cfg: DistillLossConfig) -> tuple[list[str], str | None]:
    """The enabled terms besides the logit term, and the config key that enables the first of them (None: none)."""
    features = [n for n in cfg.weights() if n != "logits"]
    if not features:
        return features, None
    return features, f"loss.{features[0]}.weight" if features[0] in FEATURE_SECTIONS else f"loss.extra.{features[0]}"


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


__all__ = [
    "EXTRA_SETTINGS", "FEATURE_SECTIONS", "AttentionLossSettings", "DistillLossConfig", "ExtraTermSettings", "HiddenLossSettings", "LayerPairing",
    "LogitLossSettings", "RelationLossSettings", "check_cache_compatible", "feature_terms",
]
