"""Deep mutual learning: several students trained together, each pulled towards the others' predictions.

Each peer's loss is its distillation objective against the frozen teacher, scaled by
``mutual.teacher_weight`` (0: no teacher forward for training steps, as in Zhang et al. 2018, "Deep Mutual
Learning"), plus ``mutual.weight`` times the mean over the other peers of the divergence from their
distribution (detached) to its own, with ``mutual.ce_weight`` of that term the data's next-token
cross-entropy. The peers are the student plus ``mutual.copies`` copies of it (optionally perturbed) and the
models in ``mutual.sources``; all sit in the one module accelerate prepares, so one optimizer steps them
and every parallelism sees every parameter.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn

from ..config import ConfigBase, ConfigError
from .losses.fused import FusedLogitKDLoss
from .losses.logits import Divergence

PEER_PREFIX = "peer"
"""Peer ``i >= 1`` logs its losses as ``peer<i>/...`` and is exported to ``model_peer<i>/``; peer 0 is the student."""


@dataclass
class MutualConfig(ConfigBase):
    """Students trained together with the student, each learning from the others (deep mutual learning)."""

    copies: int = 1
    """Peers made by copying the student as it starts training (after pruning)."""
    sources: list[str] = field(default_factory=list)
    """Further peers loaded from these model folders (same tokenizer as the teacher; any shape)."""
    noise: float = 0.0
    """Gaussian noise added to every weight of each copy, as a fraction of that tensor's standard deviation
    (seeded by ``train.seed`` and the peer's index); 0: exact copies, which stay identical when trained on the
    same data."""
    weight: float = 1.0
    """Weight of each peer's mutual term (the mean divergence to the other peers)."""
    teacher_weight: float = 1.0
    """Weight of each peer's objective against the frozen teacher (``loss``); 0: peers learn from the data and
    each other only."""
    divergence: Divergence = "forward_kl"
    """Divergence from another peer's distribution (the target, detached) to this peer's."""
    temperature: float = 1.0
    """Softmax temperature of both distributions in the mutual term."""
    ce_weight: float = 0.0
    """Share of the mutual term that is the data's next-token cross-entropy: ``(1 - w) * divergence + w * CE``."""
    chunk_tokens: int = 256
    """Positions per chunk of the fused head projection (memory grows with chunk_tokens x vocab)."""

    @property
    def num_peers(self) -> int:
        """Models trained together, the student included."""
        return 1 + self.copies + len(self.sources)

    def validate(self) -> None:
        if self.copies < 0:
            raise ConfigError(f"mutual.copies={self.copies}: must be >= 0")
        if self.num_peers < 2:
            raise ConfigError("mutual needs at least one peer besides the student: set mutual.copies>=1 or list mutual.sources")
        if self.noise < 0:
            raise ConfigError(f"mutual.noise={self.noise}: must be >= 0")
        if self.weight < 0 or self.teacher_weight < 0:
            raise ConfigError(f"mutual.weight={self.weight} and mutual.teacher_weight={self.teacher_weight} must be >= 0")
        if self.weight == 0 and self.teacher_weight == 0:
            raise ConfigError("mutual.weight=0 and mutual.teacher_weight=0 leave the peers nothing to learn from; set one > 0")
        if not 0.0 <= self.ce_weight <= 1.0:
            raise ConfigError(f"mutual.ce_weight={self.ce_weight}: must be in [0, 1]")
        if self.temperature <= 0:
            raise ConfigError(f"mutual.temperature={self.temperature}: must be > 0")
        if self.chunk_tokens < 1:
            raise ConfigError(f"mutual.chunk_tokens={self.chunk_tokens}: must be >= 1")


def check_mutual(*, lora: bool, on_policy: bool, teacher_cache: bool) -> None:
    """ConfigError for what mutual learning does not combine with."""
    if lora:
        raise ConfigError("mutual trains every peer's full weights; set train.lora=null (or mutual=null)")
    if on_policy:
        raise ConfigError("on_policy generates with one student; set on_policy=null to train peers with mutual")
    if teacher_cache:
        raise ConfigError("teacher_cache is not read by mutual learning runs; set teacher_cache.enabled=false (or mutual=null)")


def peer_name(index: int) -> str:
    """``student`` for peer 0, ``peer<i>`` after it."""
    return "student" if index == 0 else f"{PEER_PREFIX}{index}"


def perturbed_copy(model: nn.Module, noise: float, seed: int) -> nn.Module:
    """A deep copy of ``model`` with ``noise`` x std(w) Gaussian noise added to each floating weight ``w``."""
    twin = copy.deepcopy(model)
    if noise > 0:
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in twin.parameters():
                if p.is_floating_point() and p.numel() > 1:
                    scale = noise * float(p.detach().float().std())
                    p.add_(torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.dtype) * scale)
    return twin


class MutualLoss(nn.Module):
    """Mean over the other peers of the fused logit divergence from their detached distribution to this peer's.

    ``forward(hidden, head_weight, others, labels)``: ``hidden`` [tokens, D] is this peer's final hidden
    states at the predicting positions, ``others`` a list of ``(hidden [tokens, D_j], head_weight [V, D_j],
    head_bias)`` of the other peers (they receive no gradient), ``labels`` [tokens] the next tokens (used when
    ``ce_weight > 0``).
    """

    def __init__(self, cfg: MutualConfig, vocab_size: int | None = None):
        super().__init__()
        self.loss = FusedLogitKDLoss(cfg.divergence, temperature=cfg.temperature, ce_weight=cfg.ce_weight,
                                     chunk_tokens=cfg.chunk_tokens, vocab_size=vocab_size)

    def forward(self, hidden: torch.Tensor, head_weight: torch.Tensor, others: list[tuple], labels: torch.Tensor,
                *, head_bias: torch.Tensor | None = None) -> torch.Tensor:
        if not others:
            raise ValueError("MutualLoss needs at least one other peer")
        needs_labels = self.loss.loss_fn.needs_labels
        total = hidden.new_zeros((), dtype=torch.float32)
        for h_o, w_o, b_o in others:
            total = total + self.loss(hidden, head_weight, h_o.detach(), w_o.detach(), labels if needs_labels else None,
                                      student_head_bias=head_bias, teacher_head_bias=None if b_o is None else b_o.detach())
        return total / len(others)


__all__ = ["PEER_PREFIX", "MutualConfig", "MutualLoss", "check_mutual", "peer_name", "perturbed_copy"]
