"""Be your own teacher: early-exit heads on intermediate layers, supervised by the model's final layer.

An exit after decoder layer ``l`` is a copy of the final norm applied to layer ``l``'s output, read out by the
model's own output head (weights shared, not trained by the exit loss). It is trained with the divergence from
the final layer's distribution (detached) to the exit's, plus optionally the squared distance from the exit's
normalised hidden state to the final one (Zhang et al. 2019, "Be Your Own Teacher"); the layers below an exit
receive its gradients, the rest of the model does not. The saved model stays the plain architecture; the exit
norms go to ``<model>/exits/exits.safetensors`` with ``exits.json``, and :func:`load_exit_model` builds the
model that stops at an exit as a plain Hugging Face model of ``l + 1`` layers.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from ..adapters import get_adapter
from ..config import ConfigBase, ConfigError
from .losses.fused import FusedLogitKDLoss

EXITS_DIR = "exits"
EXITS_WEIGHTS = "exits.safetensors"
EXITS_JSON = "exits.json"


@dataclass
class ExitConfig(ConfigBase):
    """Early-exit heads trained against the model's own final layer."""

    layers: list[int] = field(default_factory=list)
    """Decoder layers (0-based, below the last one) whose output gets an exit head."""
    weight: float = 1.0
    """Weight of the mean over exits of the divergence from the final distribution to the exit's."""
    hidden_weight: float = 0.0
    """Weight of the mean over exits of the squared distance to the final normalised hidden state (per channel)."""
    temperature: float = 1.0
    """Softmax temperature of both distributions in the exit term."""
    chunk_tokens: int = 256
    """Positions per chunk of the fused head projection."""

    def validate(self) -> None:
        if not self.layers:
            raise ConfigError("exits.layers is empty: list the decoder layers that get an exit, e.g. exits.layers=[3,7]")
        if any(layer < 0 for layer in self.layers) or len(set(self.layers)) != len(self.layers):
            raise ConfigError(f"exits.layers={self.layers}: give distinct layer indices >= 0")
        if self.weight < 0 or self.hidden_weight < 0 or self.weight + self.hidden_weight == 0:
            raise ConfigError(f"exits.weight={self.weight}, exits.hidden_weight={self.hidden_weight}: both >= 0, one > 0")
        if self.temperature <= 0 or self.chunk_tokens < 1:
            raise ConfigError("exits.temperature must be > 0 and exits.chunk_tokens >= 1")


def check_exit_layers(cfg: ExitConfig, num_layers: int, what: str = "the student") -> None:
    """ConfigError when an exit layer is not below the model's last layer."""
    bad = [layer for layer in cfg.layers if layer >= num_layers - 1]
    if bad:
        raise ConfigError(
            f"exits.layers: layer {bad[0]} is past what {what} allows: it has {num_layers} layers, so exits go on "
            f"layers 0..{num_layers - 2} (the last layer is the model's own output)"
        )


def check_exits(*, lora: bool, on_policy: bool, mutual: bool) -> None:
    """ConfigError for what early exits do not combine with."""
    for on, key in ((lora, "train.lora"), (on_policy, "on_policy"), (mutual, "mutual")):
        if on:
            raise ConfigError(f"exits train the full student against its own final layer; set {key}=null (or exits=null)")


class ExitHeads(nn.Module):
    """One trainable norm per exit layer (initialised from the model's final norm) and the exit loss."""

    def __init__(self, model: nn.Module, cfg: ExitConfig, vocab_size: int | None = None):
        super().__init__()
        adapter = get_adapter(model)
        check_exit_layers(cfg, adapter.shape(model.config)["num_layers"])
        self.layers = sorted(cfg.layers)
        norm = model.get_submodule(adapter.final_norm)
        self.norms = nn.ModuleDict({str(layer): copy.deepcopy(norm) for layer in self.layers})
        for p in self.norms.parameters():
            p.requires_grad_(True)
        self.weight, self.hidden_weight = float(cfg.weight), float(cfg.hidden_weight)
        self.loss = FusedLogitKDLoss("forward_kl", temperature=cfg.temperature, chunk_tokens=cfg.chunk_tokens,
                                     vocab_size=vocab_size)

    def exit_hidden(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """The exit's normalised hidden state (the output head's input) from layer ``layer``'s output."""
        return self.norms[str(layer)](hidden)

    def forward(self, hidden_by_layer: dict[int, torch.Tensor], final_hidden: torch.Tensor, head_weight: torch.Tensor,
                head_bias: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(weighted total over exits, ``loss/exit<l>`` components) from the layers' outputs [batch, seq, D] and the
        final normalised hidden states; the final layer's side and the head receive no gradient."""
        d = final_hidden.shape[-1]
        target = final_hidden[:, :-1].detach().reshape(-1, d)
        w, b = head_weight.detach(), None if head_bias is None else head_bias.detach()
        total = final_hidden.new_zeros((), dtype=torch.float32)
        components = {}
        for layer in self.layers:
            h = self.exit_hidden(layer, hidden_by_layer[layer])[:, :-1].reshape(-1, d)
            value = h.new_zeros((), dtype=torch.float32)
            if self.weight > 0:
                kd = self.loss(h, w, target, w, None, student_head_bias=b, teacher_head_bias=b)
                value = value + self.weight * kd
                components[f"loss/exit{layer}"] = kd.detach().float()
            if self.hidden_weight > 0:
                mse = (h.float() - target.float()).pow(2).mean()
                value = value + self.hidden_weight * mse
                components[f"loss/exit{layer}_hidden"] = mse.detach()
            total = total + value / len(self.layers)
        return total, components


def save_exits(heads: ExitHeads, state: dict[str, torch.Tensor], model_dir: str | Path, *, final_norm: str) -> Path:
    """Write the exit norms (``state``: the heads' full state dict) to ``<model_dir>/exits/`` with their layers."""
    from safetensors.torch import save_file

    out = Path(model_dir) / EXITS_DIR
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.contiguous() for k, v in state.items() if k.startswith("norms.")}
    save_file(tensors, str(out / EXITS_WEIGHTS))
    (out / EXITS_JSON).write_text(json.dumps({"layers": heads.layers, "final_norm": final_norm}, indent=1) + "\n")
    return out


def exit_layers(model_dir: str | Path) -> list[int]:
    """The exit layers saved with a model folder ([] when it has none)."""
    meta = Path(model_dir) / EXITS_DIR / EXITS_JSON
    return list(json.loads(meta.read_text())["layers"]) if meta.is_file() else []


def load_exit_model(model_dir: str | Path, layer: int, **load_kwargs):
    """The model of ``model_dir`` stopping at its exit after ``layer``: a plain HF causal LM of ``layer + 1`` layers
    whose final norm is the exit's (the embedding and output head are the model's)."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from ..prune.apply import apply_prune_map
    from ..prune.prune_map import PruneMap

    layers = exit_layers(model_dir)
    if layer not in layers:
        raise ConfigError(f"{model_dir} has no exit after layer {layer} (its exits: {layers or 'none'})")
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), **load_kwargs)
    adapter = get_adapter(model)
    shape = adapter.shape(model.config)
    full = PruneMap.identity(shape, teacher={"shape": dict(shape), "model_type": model.config.model_type})
    pmap = replace(full, student_shape={**shape, "num_layers": layer + 1}, kept_layers=list(range(layer + 1)),
                   layers=full.layers[: layer + 1])
    out = apply_prune_map(model, pmap)
    state = load_file(str(Path(model_dir) / EXITS_DIR / EXITS_WEIGHTS))
    prefix = f"norms.{layer}."
    out.get_submodule(adapter.final_norm).load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
    return out


__all__ = ["EXITS_DIR", "ExitConfig", "ExitHeads", "check_exit_layers", "check_exits", "exit_layers", "load_exit_model", "save_exits"]
