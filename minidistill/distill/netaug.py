"""Network augmentation for a pruned student: train it also inside a wider model that shares its weights.

The wider model is the student plus some of the MLP neurons its prune map says were cut from the teacher
(Cai et al. 2022, "Network Augmentation for Tiny Deep Learning"). An MLP is a sum over its neurons, so the
wider MLP's output is the student's MLP output (its own weights, used as they are, never copied) plus the
extra neurons' ``down(act(gate x) * up x)``; the extra neurons are parameters of their own, initialised from
the teacher's rows and columns (at the student's kept hidden channels). Each step adds
``alpha x`` the logit loss of the wider model, whose width (the share of the cut neurons added) is drawn per
micro-batch from ``width_ratios``; the student's weights receive the gradients of both forwards. The saved
model is the student alone. Heads and hidden channels are not augmented.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from ..adapters import get_adapter
from ..config import ConfigBase, ConfigError
from ..prune.prune_map import PruneMap


@dataclass
class NetAugConfig(ConfigBase):
    """The wider model a pruned student is also trained inside."""

    alpha: float = 1.0
    """Weight of the wider model's logit loss."""
    width_ratios: list[float] = field(default_factory=lambda: [0.25, 0.5, 1.0])
    """Shares of each layer's cut neurons the wider model adds, one drawn per micro-batch."""
    seed: int = 0
    """Seed of the neuron order and of the per-micro-batch draws."""

    def validate(self) -> None:
        if self.alpha <= 0:
            raise ConfigError(f"netaug.alpha={self.alpha}: must be > 0 (or set netaug=null)")
        if not self.width_ratios or any(not 0 < r <= 1 for r in self.width_ratios):
            raise ConfigError(f"netaug.width_ratios={self.width_ratios}: give shares in (0, 1]")


def check_netaug(prune_map: PruneMap | None, student: str) -> None:
    """ConfigError when the wider model cannot be derived from ``prune_map`` (``student`` names the model)."""
    if prune_map is None:
        raise ConfigError(
            f"netaug builds the wider model from the neurons the student's prune map says were cut, but {student} has no "
            "prune_map.json from this teacher: prune the teacher in this run (student=null) or set netaug=null"
        )
    t = prune_map.teacher["shape"]["intermediate_size"]
    if all(len(layer.kept_neurons) == t for layer in prune_map.layers):
        raise ConfigError(f"netaug adds cut MLP neurons, but {student} kept all {t} in every layer; set netaug=null")


def check_netaug_combination(options: dict[str, bool]) -> None:
    """ConfigError naming the first option (config key -> on) that netaug does not combine with.

    The wider model's neurons are added by hooks on a plain forward of one student: no peers, exits, LoRA,
    recomputation (gradient checkpointing), compiled layers, generated batches or teacher cache.
    """
    for key, on in options.items():
        if on:
            raise ConfigError(f"netaug does not combine with {key}; turn {key} off (or set netaug=null)")


class _ExtraNeurons(nn.Module):
    """One layer's extra neurons: gate / up rows and down columns (the student's hidden channels)."""

    def __init__(self, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, gate_bias, up_bias):
        super().__init__()
        self.gate, self.up, self.down = nn.Parameter(gate), nn.Parameter(up), nn.Parameter(down)
        self.gate_bias = None if gate_bias is None else nn.Parameter(gate_bias)
        self.up_bias = None if up_bias is None else nn.Parameter(up_bias)

    def forward(self, x: torch.Tensor, act, k: int) -> torch.Tensor:
        gb = None if self.gate_bias is None else self.gate_bias[:k]
        ub = None if self.up_bias is None else self.up_bias[:k]
        h = act(nn.functional.linear(x, self.gate[:k], gb)) * nn.functional.linear(x, self.up[:k], ub)
        return nn.functional.linear(h, self.down[:, :k])


class AugmentedWidth(nn.Module):
    """The extra neurons of every student layer and the context that adds them to the student's MLPs."""

    def __init__(self, student: nn.Module, teacher: nn.Module, prune_map: PruneMap, cfg: NetAugConfig):
        super().__init__()
        a = get_adapter(student)
        if a.gate_proj is None or a.up_proj is None:
            raise ConfigError(f"netaug needs separate gate and up projections; {student.config.model_type} fuses them")
        t_layers = a.decoder_layers(teacher)
        hidden = torch.as_tensor(prune_map.kept_hidden, dtype=torch.long)
        gen = torch.Generator().manual_seed(cfg.seed)
        extra = []
        for lm, t_index in zip(prune_map.layers, prune_map.kept_layers):
            t_layer = t_layers[t_index]
            size = a.layer_part(t_layer, "gate_proj").weight.shape[0]
            kept = set(lm.kept_neurons)
            cut = torch.tensor([n for n in range(size) if n not in kept], dtype=torch.long)
            cut = cut[torch.randperm(len(cut), generator=gen)]
            g, u, d = (a.layer_part(t_layer, n) for n in ("gate_proj", "up_proj", "down_proj"))
            extra.append(_ExtraNeurons(
                g.weight.detach()[cut][:, hidden].clone(), u.weight.detach()[cut][:, hidden].clone(),
                d.weight.detach()[hidden][:, cut].clone(),
                None if g.bias is None else g.bias.detach()[cut].clone(), None if u.bias is None else u.bias.detach()[cut].clone(),
            ))
        self.extra = nn.ModuleList(extra)
        self.alpha = float(cfg.alpha)
        self.width_ratios = list(cfg.width_ratios)
        self.seed = int(cfg.seed)

    def draw(self, micro_index: int) -> float:
        """The width ratio of micro-batch ``micro_index`` (the same on every process and on resume)."""
        return random.Random(self.seed * 1_000_003 + micro_index).choice(self.width_ratios)

    @contextlib.contextmanager
    def active(self, student: nn.Module, ratio: float) -> Iterator[None]:
        """Inside, ``student``'s MLPs also run ``ratio`` of each layer's extra neurons (added to their output)."""
        a = get_adapter(student)
        handles = []
        for layer, extra in zip(a.decoder_layers(student), self.extra):
            mlp = a.layer_part(layer, "mlp")
            k = max(1, round(ratio * extra.gate.shape[0])) if extra.gate.shape[0] else 0
            if k == 0:
                continue

            def hook(module, args, output, extra=extra, k=k):
                return output + extra(args[0], module.act_fn, k)

            handles.append(mlp.register_forward_hook(hook))
        try:
            yield
        finally:
            for h in handles:
                h.remove()


__all__ = ["AugmentedWidth", "NetAugConfig", "check_netaug", "check_netaug_combination"]
