"""Typed config of the distillation objective: ``loss.terms`` (each term's settings class, registered with the term,
with the roles it compares), the balance, and the checks that need only the config."""

from __future__ import annotations

import dataclasses
import difflib
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from ..config import ConfigBase, ConfigError
from .losses.hidden import HiddenLossKind
from .losses.logits import Divergence
from .pairing import PairingStrategy
from .roles import STUDENT, TEACHER

LOGITS = "logits"
"""The logit term: always on, it anchors the loss balance."""

LEGACY_SECTIONS = ("logits", "hidden", "attention", "relations")
"""``loss.<name>`` sections of the earlier config form, read as ``loss.terms.<name>`` (besides ``loss.extra``)."""

LEGACY_RENAMED = {"token_attention": {"source": "signal"}}
"""Settings renamed when a term moved from ``loss.extra`` to ``loss.terms`` (``source`` now names a role)."""


@dataclass
class TermSettings(ConfigBase):
    """What every loss term has: its weight and the roles it compares. A term's own settings subclass this."""

    term: str | None = None
    """The registered loss term this entry configures (None: the entry's name under ``loss.terms``)."""
    weight: float = 1.0
    """Weight of the term (0 disables it)."""
    source: str = STUDENT
    """The trainable role whose features the term trains."""
    target: str = TEACHER
    """The role whose features it is pulled towards."""
    detach_target: bool = True
    """Read the target's features without gradient; false: a trained target learns from this term too (terms whose
    loss can send it a gradient: logits, hidden, attention, relations; a frozen target never learns)."""

    TARGET_GRADIENT: ClassVar[bool] = False
    """Whether the term's loss can send a gradient to its target (``detach_target: false``)."""

    def __post_init__(self) -> None:
        parsing = _PARSING_KEY.get()
        if parsing is not None:
            self.__dict__["_key"] = parsing

    @property
    def key(self) -> str:
        """Where this term is configured (``loss.terms.<name>``, or the earlier form's section), for messages."""
        return self.__dict__.get("_key") or f"loss.terms.{self.term or type(self).__name__}"

    def validate(self) -> None:
        if self.weight < 0:
            raise ConfigError(f"{self.key}.weight={self.weight}: must be >= 0")
        if self.source == self.target:
            raise ConfigError(f"{self.key}: source and target are both {self.source!r}; a term compares two roles")
        if not self.detach_target and not self.TARGET_GRADIENT:
            raise ConfigError(
                f"{self.key}.detach_target=false: the {self.term} loss sends no gradient to its target (logits, hidden, "
                f"attention and relations do); set {self.key}.detach_target=true"
            )


TERM_SETTINGS: dict[str, type[TermSettings]] = {}
"""Settings class of each registered loss term (filled by :func:`minidistill.distill.terms.register_loss_term`)."""


@dataclass
class LogitLossSettings(TermSettings):
    """Logit distillation from final hidden states and the output heads (the ``logits`` term anchors the balance)."""

    TARGET_GRADIENT: ClassVar[bool] = True

    divergence: Divergence = "forward_kl"
    """Divergence between the target's and the source's token distributions (see LogitKDLoss)."""
    temperature: float = 1.0
    """Softmax temperature of both distributions."""
    beta: float = 0.5
    """Mixing coefficient of skewed / symmetric divergences."""
    top_k: int | None = None
    """Restrict the target distribution to its top-k tokens (None: full vocabulary)."""
    top_p: float | None = None
    """Restrict the target distribution to its top-p nucleus (None: full vocabulary)."""
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
        super().validate()
        if self.teacher_bound_margin is not None and not self.teacher_bound_margin >= 0:
            raise ConfigError(f"{self.key}.teacher_bound_margin={self.teacher_bound_margin}: must be >= 0 (or null for off)")
        if self.temperature <= 0:
            raise ConfigError(f"{self.key}.temperature={self.temperature}: must be positive")
        if self.chunk_tokens < 1:
            raise ConfigError(f"{self.key}.chunk_tokens={self.chunk_tokens}: must be at least 1")


@dataclass
class LayerPairing(ConfigBase):
    """Which source layer is compared with which target layer."""

    strategy: PairingStrategy = "prune_map"
    """prune_map (each student layer with the teacher layer it came from), uniform, last_k or explicit."""
    k: int | None = None
    """last_k: number of final layers paired."""
    explicit: list[list[int]] | None = None
    """explicit: [[student_layer, teacher_layer], ...]."""
    student_layers: list[int] | None = None
    """Keep only pairs whose student layer is listed (None: all pairs)."""


@dataclass
class HiddenLossSettings(TermSettings):
    """Hidden-state distillation through a learnable source-to-target channel projection."""

    TARGET_GRADIENT: ClassVar[bool] = True

    kind: HiddenLossKind = "nmse"
    """Distance between projected source and target hidden states (see HiddenStateLoss)."""
    pairing: LayerPairing = field(default_factory=LayerPairing)
    """Layer pairs compared."""


@dataclass
class AttentionLossSettings(TermSettings):
    """Attention-map transfer from post-RoPE queries and keys (source heads paired with target heads)."""

    TARGET_GRADIENT: ClassVar[bool] = True

    pairing: LayerPairing = field(default_factory=LayerPairing)
    """Layer pairs compared (default: each student layer with its teacher layer, heads paired by the prune map)."""
    chunk_queries: int = 256
    """Query positions whose attention rows are built at once."""


@dataclass
class RelationLossSettings(TermSettings):
    """Self-relation (q-q, k-k, v-v) transfer, MiniLM-style, with a fixed number of relation heads."""

    TARGET_GRADIENT: ClassVar[bool] = True

    num_relation_heads: int = 4
    """Relation heads the q/k/v features are split into (must divide both models' widths)."""
    relations: list[str] = field(default_factory=lambda: ["qq", "kk", "vv"])
    """Relations compared (``xy`` with x, y in q, k, v)."""
    pairing: LayerPairing = field(default_factory=lambda: LayerPairing(strategy="last_k", k=1))
    """Layer pairs compared (default: the last layers)."""

    def validate(self) -> None:
        super().validate()
        bad = [r for r in self.relations if len(r) != 2 or set(r) - set("qkv")]
        if bad:
            raise ConfigError(f"{self.key}.relations has {bad}: each relation is two of q, k, v (e.g. qq, kk, vv, qk)")


def _default_terms() -> dict[str, TermSettings]:
    return {LOGITS: LogitLossSettings(term=LOGITS)}


@dataclass
class DistillLossConfig(ConfigBase):
    """What the trained roles are pulled towards: named loss terms, and how they are combined.

    ``terms`` maps a name to a registered term's settings (``term``: which one, default the name), so that a term
    may appear twice with other roles or settings. The ``logits`` entry is always there: it anchors the balance.
    The earlier form (``loss.logits`` / ``hidden`` / ``attention`` / ``relations`` sections and ``loss.extra``) is
    read into ``terms`` with the same meaning, and its messages name the keys as written.
    """

    terms: dict[str, TermSettings] = field(default_factory=_default_terms)
    """Loss terms by name: ``{weight, source, target, term, <the term's options>}`` (see :data:`TERM_SETTINGS`)."""
    balance: Literal["fixed", "auto"] = "fixed"
    """fixed: weighted sum; auto: feature terms rescaled to the logit term's magnitude, times their weights, with
    the magnitudes measured over each optimizer step's micro-batches and all processes (used from the next step)."""

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None, *, prefix: str = "") -> "DistillLossConfig":
        from . import terms as _registered  # noqa: F401  (fills TERM_SETTINGS; the terms module imports this one)

        data = dict(data or {})
        known = [f.name for f in dataclasses.fields(cls)] + [*LEGACY_SECTIONS, "extra"]
        unknown = [k for k in data if k not in known]
        if unknown:
            close = difflib.get_close_matches(unknown[0], known, n=1)
            hint = f"; did you mean 'loss.{close[0]}'?" if close else f"; valid keys: {', '.join(known)}"
            raise ConfigError(f"unknown config key 'loss.{unknown[0]}'{hint}")
        entries = _terms_of(data)
        parsed = {name: _parse_term(name, value, key) for name, (value, key) in entries.items()}
        obj = super().from_dict(data, prefix=prefix)
        obj.terms = parsed
        obj.validate()
        return obj

    def validate(self) -> None:
        anchor = self.terms.get(LOGITS)
        if not isinstance(anchor, LogitLossSettings):
            raise ConfigError(f"loss.terms.{LOGITS} must be a logits term: it anchors the loss balance (name other terms differently)")
        if anchor.weight <= 0:
            raise ConfigError(f"{anchor.key}.weight={anchor.weight}: must be positive (the logit term anchors the loss)")

    @classmethod
    def entry_classes(cls, field_name: str) -> dict[str, type[TermSettings]]:
        """The settings class of each registered term, for the reference of ``loss.terms`` (``--help``)."""
        from . import terms as _registered  # noqa: F401  (fills TERM_SETTINGS)

        return dict(TERM_SETTINGS) if field_name == "terms" else {}

    def weights(self) -> dict[str, float]:
        """Weight of every enabled term, by name (the logit term first)."""
        return {name: s.weight for name, s in self.terms.items() if s.weight > 0}

    def features(self) -> dict[str, TermSettings]:
        """The enabled terms besides the logit term, by name."""
        return {name: s for name, s in self.terms.items() if name != LOGITS and s.weight > 0}

    @property
    def logits(self) -> LogitLossSettings:
        """The anchoring logit term's settings."""
        return self.terms[LOGITS]


def _terms_of(data: dict[str, Any]) -> dict[str, tuple[Any, str]]:
    """Pop the terms of a ``loss`` mapping, by name: ``(settings mapping, the key it was written under)``.

    ``loss.terms.<name>`` entries, plus the earlier form's sections (hidden / attention / relations there were off
    unless their weight was set; a bare number under ``loss.extra`` was the weight)."""
    out: dict[str, tuple[Any, str]] = {LOGITS: ({}, f"loss.terms.{LOGITS}")}
    terms = data.pop("terms", None) or {}
    if not isinstance(terms, dict):
        raise ConfigError(f"loss.terms must be a mapping of term names to settings, got {terms!r}")
    for name in LEGACY_SECTIONS:
        if name in data:
            section = data.pop(name)
            if not isinstance(section, dict):
                raise ConfigError(f"loss.{name} must be a mapping of settings, got {section!r}")
            section = dict(section)
            if name != LOGITS:
                section.setdefault("weight", 0.0)
            out[name] = (section, f"loss.{name}")
    extra = data.pop("extra", None) or {}
    if not isinstance(extra, dict):
        raise ConfigError(f"loss.extra must be a mapping of term names to weights or settings, got {extra!r}")
    for name, value in extra.items():
        if name in LEGACY_SECTIONS:
            raise ConfigError(f"loss.extra.{name}: set loss.terms.{name}.weight instead")
        section = dict(value) if isinstance(value, dict) else {"weight": value}
        for old, new in LEGACY_RENAMED.get(name, {}).items():
            if old in section:
                section[new] = section.pop(old)
        out[name] = (section, f"loss.extra.{name}")
    for name, value in terms.items():
        if name in out and not out[name][1].startswith("loss.terms."):
            raise ConfigError(
                f"{out[name][1]} and loss.terms.{name} both configure the term {name!r}; write every setting under "
                f"loss.terms.{name} (the earlier form {out[name][1]} is read only when loss.terms.{name} is absent)"
            )
        out[name] = (value if isinstance(value, dict) else {"weight": value}, f"loss.terms.{name}")
    return out


_PARSING_KEY: ContextVar[str | None] = ContextVar("_PARSING_KEY", default=None)


def _parse_term(name: str, value: dict[str, Any], key: str) -> TermSettings:
    term = value.get("term") or name
    if not isinstance(term, str) or term not in TERM_SETTINGS:
        raise ConfigError(
            f"{key}: no loss term of that name is registered ({term!r}; known: {', '.join(sorted(TERM_SETTINGS))}); "
            f"name one with {key}.term"
        )
    token = _PARSING_KEY.set(key)
    try:
        settings = TERM_SETTINGS[term].from_dict({**value, "term": term}, prefix=f"{key}.")
    finally:
        _PARSING_KEY.reset(token)
    return settings


def feature_terms(cfg: DistillLossConfig) -> tuple[list[str], str | None]:
    """The enabled terms besides the logit term, and the key that turns the first of them off (None: none)."""
    features = cfg.features()
    if not features:
        return [], None
    return list(features), f"{next(iter(features.values())).key}.weight"


def check_term_roles(cfg: DistillLossConfig, *, roles: list[str], trainable: list[str]) -> None:
    """ConfigError when an enabled term names a role the run does not have, or trains a frozen one."""
    for settings in cfg.terms.values():
        if settings.weight <= 0:
            continue
        for field_name in ("source", "target"):
            role = getattr(settings, field_name)
            if role not in roles:
                raise ConfigError(f"{settings.key}.{field_name}={role!r}: no role of that name (the roles: {', '.join(roles)})")
        if settings.source not in trainable:
            raise ConfigError(
                f"{settings.key}.source={settings.source!r} is frozen, so the term would train nothing; name a trained "
                f"role ({', '.join(trainable)})"
            )


def check_cache_compatible(cfg: DistillLossConfig) -> None:
    """ConfigError when ``cfg`` needs more of the teacher than a teacher cache holds (its top-k, temperature 1)."""
    features, key = feature_terms(cfg)
    if features:
        raise ConfigError(
            f"teacher_cache.enabled=true holds only the teacher's top-k logits, but {key} asks for teacher features "
            f"({', '.join(features)}), which need a teacher forward: set {key}=0 or teacher_cache.enabled=false"
        )
    lg, default = cfg.logits, LogitLossSettings()
    for key in ("divergence", "temperature", "top_k", "top_p", "teacher_bound_margin", "token_weighting", "source", "target"):
        if getattr(lg, key) != getattr(default, key):
            raise ConfigError(
                f"teacher_cache.enabled=true trains the forward KL at temperature 1 against the cached top-k (its k sets the "
                f"truncation), but {lg.key}.{key}={getattr(lg, key)!r}: leave it at {getattr(default, key)!r} or set "
                "teacher_cache.enabled=false"
            )


__all__ = [
    "LOGITS", "TERM_SETTINGS", "AttentionLossSettings", "DistillLossConfig", "HiddenLossSettings",
    "LayerPairing", "LogitLossSettings", "RelationLossSettings", "TermSettings", "check_cache_compatible", "check_term_roles", "feature_terms",
]
