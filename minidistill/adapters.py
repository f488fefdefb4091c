"""Architecture adapter table: where each supported model type keeps what the pruner and distiller touch.

Every architecture difference lives here. Code elsewhere asks the adapter for a module or a config
field and never tests ``model_type`` itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .errors import MinidistillError


class UnsupportedArchitectureError(MinidistillError, ValueError):
    """The model type has no adapter (or is a mixture-of-experts model)."""


@dataclass(frozen=True)
class ArchAdapter:
    """Module paths (relative to the causal-LM model or to one decoder layer) and config field names.

    Fused projections: ``qkv_proj`` holds rows ``[q; k; v]`` and ``gate_up_proj`` rows ``[gate; up]``;
    when set, the separate ``q_proj``/``k_proj``/``v_proj`` (resp. ``gate_proj``/``up_proj``) are None.
    """

    model_types: tuple[str, ...]
    # Model-level paths.
    embed_tokens: str = "model.embed_tokens"
    layers: str = "model.layers"
    final_norm: str = "model.norm"
    lm_head: str = "lm_head"
    backbone: str = "model"
    # Layer-level paths.
    self_attn: str = "self_attn"
    q_proj: str | None = "self_attn.q_proj"
    k_proj: str | None = "self_attn.k_proj"
    v_proj: str | None = "self_attn.v_proj"
    qkv_proj: str | None = None
    o_proj: str = "self_attn.o_proj"
    mlp: str = "mlp"
    gate_proj: str | None = "mlp.gate_proj"
    up_proj: str | None = "mlp.up_proj"
    gate_up_proj: str | None = None
    down_proj: str = "mlp.down_proj"
    # Per-head norms over head_dim applied to queries / keys (qwen3, gemma3).
    q_norm: str | None = None
    k_norm: str | None = None
    # Norm whose output feeds attention / the MLP (hidden-channel importance is measured there).
    attn_in_norm: str = "input_layernorm"
    mlp_in_norm: str = "post_attention_layernorm"
    # Every norm over the hidden size inside a layer (all are sliced when hidden channels are pruned).
    layer_hidden_norms: tuple[str, ...] = ("input_layernorm", "post_attention_layernorm")
    # Embeddings are multiplied by sqrt(hidden_size) in forward (gemma); hidden pruning must rescale.
    embed_scaled_by_sqrt_hidden: bool = False
    # RMSNorm multiplies by (offset + weight): 0 for most models, 1 for gemma's (1 + weight).
    norm_weight_offset: float = 0.0
    # Config field names.
    hidden_size_field: str = "hidden_size"
    num_layers_field: str = "num_hidden_layers"
    num_heads_field: str = "num_attention_heads"
    num_kv_heads_field: str = "num_key_value_heads"
    intermediate_size_field: str = "intermediate_size"
    head_dim_field: str = "head_dim"
    # Config lists with one entry per layer, re-indexed when layers are dropped.
    per_layer_config_lists: tuple[str, ...] = ("layer_types",)
    # Config fields that depend on the layer count and must be clamped, e.g. max_window_layers.
    layer_count_fields: tuple[str, ...] = field(default_factory=tuple)

    # ------------------------------------------------------------------ module access
    @staticmethod
    def get(root: nn.Module, path: str | None) -> nn.Module | None:
        """Module at dotted ``path`` below ``root`` (None for a None path)."""
        if path is None:
            return None
        return root.get_submodule(path)

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.layers)

    def layer_part(self, layer: nn.Module, name: str) -> nn.Module | None:
        """A layer's part by adapter field name, e.g. ``layer_part(layer, "o_proj")``."""
        return self.get(layer, getattr(self, name))

    def group_prefixes(self, model: nn.Module, group: str) -> list[str]:
        """Parameter-name prefixes of a parameter group of ``model``: ``embeddings`` (token embeddings and output
        head), ``attention`` (each layer's attention, its per-head norms included), ``mlp`` or ``norms`` (the
        layers' hidden-size norms and the final norm)."""
        layers = range(len(self.decoder_layers(model)))
        if group == "embeddings":
            return [self.embed_tokens + ".", self.lm_head + "."]
        if group == "attention":
            return [f"{self.layers}.{i}.{self.self_attn}." for i in layers]
        if group == "mlp":
            return [f"{self.layers}.{i}.{self.mlp}." for i in layers]
        if group == "norms":
            return [f"{self.layers}.{i}.{n}." for i in layers for n in self.layer_hidden_norms] + [self.final_norm + "."]
        raise ValueError(f"unknown parameter group {group!r}")

    # ------------------------------------------------------------------ config access
    def head_dim(self, config) -> int:
        hd = getattr(config, self.head_dim_field, None)
        if hd is None:
            hd = getattr(config, self.hidden_size_field) // getattr(config, self.num_heads_field)
        return int(hd)

    def shape(self, config) -> dict[str, int]:
        """The prunable shape of a model: layers, hidden, heads, kv_heads, head_dim, intermediate."""
        heads = int(getattr(config, self.num_heads_field))
        kv = getattr(config, self.num_kv_heads_field, None)
        return {
            "num_layers": int(getattr(config, self.num_layers_field)),
            "hidden_size": int(getattr(config, self.hidden_size_field)),
            "num_heads": heads,
            "num_kv_heads": int(kv if kv is not None else heads),
            "head_dim": self.head_dim(config),
            "intermediate_size": int(getattr(config, self.intermediate_size_field)),
        }

    def set_shape(self, config, shape: dict[str, int]) -> None:
        """Write a (pruned) shape into ``config``; ``head_dim`` is always written explicitly."""
        setattr(config, self.num_layers_field, int(shape["num_layers"]))
        setattr(config, self.hidden_size_field, int(shape["hidden_size"]))
        setattr(config, self.num_heads_field, int(shape["num_heads"]))
        setattr(config, self.num_kv_heads_field, int(shape["num_kv_heads"]))
        setattr(config, self.head_dim_field, int(shape["head_dim"]))
        setattr(config, self.intermediate_size_field, int(shape["intermediate_size"]))


ADAPTERS: tuple[ArchAdapter, ...] = (
    ArchAdapter(model_types=("llama", "mistral")),
    ArchAdapter(model_types=("qwen2",), layer_count_fields=("max_window_layers",)),
    ArchAdapter(
        model_types=("qwen3",),
        q_norm="self_attn.q_norm",
        k_norm="self_attn.k_norm",
        layer_count_fields=("max_window_layers",),
    ),
    ArchAdapter(
        model_types=("phi3",),
        q_proj=None,
        k_proj=None,
        v_proj=None,
        qkv_proj="self_attn.qkv_proj",
        gate_proj=None,
        up_proj=None,
        gate_up_proj="mlp.gate_up_proj",
    ),
    ArchAdapter(
        model_types=("gemma3_text",),
        q_norm="self_attn.q_norm",
        k_norm="self_attn.k_norm",
        mlp_in_norm="pre_feedforward_layernorm",
        layer_hidden_norms=(
            "input_layernorm",
            "post_attention_layernorm",
            "pre_feedforward_layernorm",
            "post_feedforward_layernorm",
        ),
        embed_scaled_by_sqrt_hidden=True,
        norm_weight_offset=1.0,
    ),
)

_BY_TYPE: dict[str, ArchAdapter] = {t: a for a in ADAPTERS for t in a.model_types}

SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(sorted(_BY_TYPE))

_MOE_FIELDS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_intermediate_size")


def get_adapter(config_or_model) -> ArchAdapter:
    """The adapter for a model or config; a clear error for unsupported or mixture-of-experts models."""
    config = getattr(config_or_model, "config", config_or_model)
    model_type = getattr(config, "model_type", None)
    for name in _MOE_FIELDS:
        if getattr(config, name, None):
            raise UnsupportedArchitectureError(
                f"model type {model_type!r} is a mixture-of-experts model (config.{name} is set); "
                f"minidistill prunes dense decoders only: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
    try:
        return _BY_TYPE[model_type]
    except KeyError:
        raise UnsupportedArchitectureError(
            f"unsupported model type {model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}. "
            "Add an ArchAdapter entry in minidistill/adapters.py to support another dense decoder."
        ) from None


def lm_head_is_tied(model: nn.Module) -> bool:
    """True when the output projection shares its weight with the input embeddings."""
    adapter = get_adapter(model)
    emb = model.get_submodule(adapter.embed_tokens).weight
    head = model.get_submodule(adapter.lm_head).weight
    return emb.data_ptr() == head.data_ptr() or bool(getattr(model.config, "tie_word_embeddings", False))


def count_parameters(model: nn.Module, *, non_embedding: bool = False) -> int:
    """Parameter count as model sizes are quoted (a tied lm_head counted once).

    ``non_embedding`` leaves out the input embeddings and an untied lm_head.
    """
    seen: set[int] = set()
    total = 0
    adapter = get_adapter(model) if non_embedding else None
    skip: set[int] = set()
    if adapter is not None:
        skip.add(id(model.get_submodule(adapter.embed_tokens).weight))
        skip.add(id(model.get_submodule(adapter.lm_head).weight))
    for p in model.parameters():
        if id(p) in seen or id(p) in skip:
            continue
        seen.add(id(p))
        total += p.numel()
    return total


def count_parameters_for_shape(config, shape: dict[str, int], *, non_embedding: bool = False) -> int:
    """Parameter count of a model of ``config``'s type at ``shape``, without building it."""
    from transformers import AutoModelForCausalLM

    cfg = config.__class__.from_dict(config.to_dict())
    get_adapter(cfg).set_shape(cfg, shape)
    for name in get_adapter(cfg).per_layer_config_lists:
        values = getattr(cfg, name, None)
        if isinstance(values, list) and len(values) > shape["num_layers"]:
            setattr(cfg, name, values[: shape["num_layers"]])
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    return count_parameters(model, non_embedding=non_embedding)
