"""Feature capture: decoder-layer outputs and post-RoPE queries / keys / values, from the model's own forward.

How it works:

- Hidden states come from forward hooks on the selected decoder layers (``adapter.decoder_layers``);
  MLP gate pre-activations (``gates``) from forward hooks on the layer's ``gate_proj`` (the first half of
  ``gate_up_proj`` where the gate and up projections are fused).
- Queries, keys and values come from the attention function itself. In transformers 5 every supported
  attention module computes q/k/v, applies q_norm/k_norm and RoPE, then calls
  ``ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)(self, q, k, v,
  attention_mask, scaling=..., sliding_window=..., ...)``. On entry, each selected attention module gets a
  shallow copy of its config whose ``_attn_implementation`` names a wrapper registered once in
  transformers' ``AttentionInterface`` (``"minidistill_capture:<original>"``). The wrapper records the tensors,
  then calls the original implementation (SDPA, flash, flex, eager) with the module's original config, so
  the model keeps its fast attention and runs a single forward. The model-level config is never touched,
  so mask creation and every layer that is not captured are unaffected. Exit restores the original
  configs and removes the hooks, also when the body raised.

Training details:

- The teacher runs under ``torch.no_grad()``: its captured tensors carry no graph. The student's captured
  tensors are the live activations, so losses on them backpropagate into the student.
- Gradient checkpointing (non-reentrant, the transformers default) replays a layer's forward during
  backward; captures made while autograd runs a backward pass are skipped, so the tensors recorded in
  the forward stay in place. Reentrant checkpointing runs the forward without a graph and is rejected.
- FSDP2 (``fully_shard``) keeps the decoder-layer and attention modules and their forward; DeepSpeed
  ZeRO-3 gathers parameters inside the module forward. Both hand the hooks and the attention function
  ordinary activations, so capture works unchanged under either.
- Pass ``use_cache=False`` to the forward: with a cache the recorded keys/values are the cache contents.
- The recorded :class:`AttentionLayout` (scaling, sliding window, causal) is what the losses need to rebuild
  a layer's mask. Sequences packed into one row (flash attention with ``position_ids`` restarts) are not
  described by it: the losses treat each row as one causal sequence.
- Nothing is kept across steps beyond the last forward's tensors; :meth:`FeatureCapture.clear` drops them.
"""

from __future__ import annotations

import copy
import functools
import sys
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor, nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

from minidistill.adapters import get_adapter
from minidistill.distill.features import unwrap_module

WRAPPER_PREFIX = "minidistill_capture:"


class CaptureError(RuntimeError):
    """Capture cannot be set up on this model (bad layer index, unsupported attention setup)."""


@dataclass
class CaptureSpec:
    """What to record, and for which decoder layers."""

    layers: list[int]
    """Decoder-layer indices to capture (0-based, in the model's own numbering)."""
    hidden: bool = True
    """Output of each selected decoder layer, ``[B, T, D]``."""
    queries: bool = False
    """Post-RoPE (and post q_norm) queries, ``[B, H, T, hd]``."""
    keys: bool = False
    """Post-RoPE (and post k_norm) keys, ``[B, KV, T, hd]``."""
    values: bool = False
    """Values, ``[B, KV, T, hd]``."""
    gates: bool = False
    """MLP gate pre-activations (before the activation function), ``[B, T, intermediate]``."""

    @property
    def attention(self) -> bool:
        """Whether anything is recorded from inside the attention function."""
        return self.queries or self.keys or self.values


@dataclass(frozen=True)
class AttentionLayout:
    """How a captured layer turns queries and keys into attention weights (as passed to its attention function)."""

    scaling: float
    """Factor applied to ``q k^T`` before the softmax."""
    sliding_window: int | None
    """Keys with ``query_pos - key_pos >= sliding_window`` are masked (None: full causal attention)."""
    causal: bool
    """Whether keys after the query are masked."""


def _in_backward() -> bool:
    """True while autograd executes a backward pass (e.g. a checkpointed layer being recomputed)."""
    return torch._C._current_graph_task_id() != -1


@functools.lru_cache(maxsize=None)
def _modeling_attribute(module_class: type, name: str) -> Any:
    """``name`` from the modeling file that defines ``module_class`` (or a base class), else None."""
    for cls in module_class.__mro__:
        value = getattr(sys.modules.get(cls.__module__), name, None)
        if value is not None:
            return value
    return None


def _original_attention(module: nn.Module, implementation: str) -> Callable:
    """What the module itself would call for ``implementation`` (its modeling file's interface and eager code)."""
    eager = _modeling_attribute(type(module), "eager_attention_forward")
    interface = _modeling_attribute(type(module), "ALL_ATTENTION_FUNCTIONS") or ALL_ATTENTION_FUNCTIONS
    if implementation == "eager":
        if eager is None:
            raise CaptureError(f"no eager_attention_forward found for {type(module).__name__}")
        return eager
    return interface.get_interface(implementation, eager)


# Attention module -> (original config, captures recording it). Filled on __enter__, emptied on __exit__.
_ACTIVE: dict[nn.Module, tuple[Any, list["FeatureCapture"]]] = {}


def _capturing_attention(implementation: str, module: nn.Module, query, key, value, attention_mask, **kwargs):
    """Registered as ``minidistill_capture:<implementation>``: record q/k/v, then run the original function."""
    entry = _ACTIVE.get(module)
    if entry is None:  # e.g. a copy of a captured module made inside the context: just run the original
        return _original_attention(module, implementation)(module, query, key, value, attention_mask, **kwargs)
    original_config, captures = entry
    if not _in_backward():
        for capture in captures:
            capture._record_attention(module, query, key, value, kwargs)
    proxy_config = module.config
    module.config = original_config  # flash attention picks its kernel from module.config
    try:
        return _original_attention(module, implementation)(module, query, key, value, attention_mask, **kwargs)
    finally:
        module.config = proxy_config


def _wrapper_name(implementation: str) -> str:
    """Register (once) and return the capturing wrapper's name for ``implementation``."""
    name = WRAPPER_PREFIX + implementation
    if name not in ALL_ATTENTION_FUNCTIONS:
        AttentionInterface.register(name, functools.partial(_capturing_attention, implementation))
    return name


def _uses_reentrant_checkpointing(layer: nn.Module) -> bool:
    """Whether transformers checkpoints ``layer`` with ``use_reentrant=True`` (torch's default when not given)."""
    if not getattr(layer, "gradient_checkpointing", False):
        return False
    fn = getattr(layer, "_gradient_checkpointing_func", None)
    if not isinstance(fn, functools.partial):  # a custom checkpoint function: nothing to tell
        return False
    return fn.keywords.get("use_reentrant", True) is not False


class FeatureCapture:
    """Context manager recording the features in ``spec`` during forwards of ``model``.

    After a forward inside the context, ``hidden[i]``, ``queries[i]``, ``keys[i]``, ``values[i]`` hold the
    tensors of decoder layer ``i`` and ``attention[i]`` its :class:`AttentionLayout`. Each forward
    replaces the previous one's tensors. Several captures (of one model or several) may be active at once.
    """

    def __init__(self, model: nn.Module, spec: CaptureSpec):
        model = unwrap_module(model)
        self.model = model
        self.spec = spec
        self.adapter = get_adapter(model)
        layers = self.adapter.decoder_layers(model)
        bad = [i for i in spec.layers if not (isinstance(i, int) and 0 <= i < len(layers))]
        if bad:
            raise CaptureError(f"CaptureSpec.layers has {bad}: the model has decoder layers 0..{len(layers) - 1}")
        if len(set(spec.layers)) != len(spec.layers):
            raise CaptureError(f"CaptureSpec.layers has duplicates: {spec.layers}")
        self._layers = {i: layers[i] for i in spec.layers}
        self._attention = {i: self.adapter.layer_part(layers[i], "self_attn") for i in spec.layers}
        self._layer_of_attention = {id(m): i for i, m in self._attention.items()}
        self.hidden: dict[int, Tensor] = {}
        self.queries: dict[int, Tensor] = {}
        self.keys: dict[int, Tensor] = {}
        self.values: dict[int, Tensor] = {}
        self.attention: dict[int, AttentionLayout] = {}
        self.gates: dict[int, Tensor] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._attached: list[nn.Module] = []
        self._active = False

    # ------------------------------------------------------------------ context
    def __enter__(self) -> "FeatureCapture":
        if self._active:
            raise CaptureError("this FeatureCapture is already active")
        if self.spec.queries or self.spec.keys or self.spec.values:
            reentrant = [i for i, layer in self._layers.items() if _uses_reentrant_checkpointing(layer)]
            if reentrant:
                raise CaptureError(
                    f"decoder layers {reentrant} use reentrant gradient checkpointing, which runs the forward "
                    "without a graph; enable it with model.activation_checkpointing_enable({'use_reentrant': False})"
                )
        try:
            if self.spec.hidden:
                for i, layer in self._layers.items():
                    self._handles.append(layer.register_forward_hook(functools.partial(self._record_hidden, i)))
            if self.spec.gates:
                for i, layer in self._layers.items():
                    self._handles.append(self._gate_module(i, layer).register_forward_hook(functools.partial(self._record_gate, i)))
            if self.spec.attention:
                for attn in self._attention.values():
                    self._attach(attn)
        except BaseException:
            self._detach_all()
            raise
        self._active = True
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._detach_all()
        self._active = False

    def features(self, layer: int) -> dict[str, Tensor]:
        """Captured ``{"q", "k", "v"}`` of ``layer`` (those recorded), as :class:`RelationLoss` takes them."""
        found = {name: store[layer] for name, store in (("q", self.queries), ("k", self.keys), ("v", self.values)) if layer in store}
        if not found:
            raise KeyError(f"nothing captured from the attention of layer {layer}; captured layers: {sorted(self.attention)}")
        return found

    def clear(self) -> None:
        """Drop the references to captured tensors."""
        self.hidden.clear()
        self.queries.clear()
        self.keys.clear()
        self.values.clear()
        self.gates.clear()

    def _gate_module(self, index: int, layer: nn.Module) -> nn.Module:
        path = self.adapter.gate_proj or self.adapter.gate_up_proj
        module = self.adapter.get(layer, path) if path else None
        if module is None:
            raise CaptureError(f"decoder layer {index} has no MLP gate projection to capture")
        return module

    # ------------------------------------------------------------------ attach / detach
    def _attach(self, attn: nn.Module) -> None:
        entry = _ACTIVE.get(attn)
        if entry is not None:  # another capture already wraps this module: share its wrapper
            entry[1].append(self)
        else:
            original = attn.config
            implementation = original._attn_implementation or "eager"
            if implementation.startswith(WRAPPER_PREFIX):
                raise CaptureError(f"{type(attn).__name__} dispatches to {implementation!r} outside a capture")
            proxy = copy.copy(original)
            proxy._attn_implementation_internal = _wrapper_name(implementation)
            _ACTIVE[attn] = (original, [self])
            attn.config = proxy
        self._attached.append(attn)

    def _detach_all(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for attn in self._attached:
            original, captures = _ACTIVE[attn]
            captures.remove(self)
            if not captures:  # the last capture of this module restores its config
                attn.config = original
                del _ACTIVE[attn]
        self._attached.clear()

    # ------------------------------------------------------------------ recording
    def _record_hidden(self, layer_index: int, module: nn.Module, args, output) -> None:
        if _in_backward():
            return
        self.hidden[layer_index] = output[0] if isinstance(output, (tuple, list)) else output

    def _record_gate(self, layer_index: int, module: nn.Module, args, output) -> None:
        if _in_backward():
            return
        if self.adapter.gate_proj is None:  # fused [gate; up] rows: the gate is the first half
            output = output[..., : output.shape[-1] // 2]
        self.gates[layer_index] = output

    def _record_attention(self, module: nn.Module, query: Tensor, key: Tensor, value: Tensor, kwargs: dict) -> None:
        i = self._layer_of_attention[id(module)]
        if kwargs.get("softcap") is not None:
            raise CaptureError(f"layer {i} uses attention logit soft-capping, which attention maps do not model")
        scaling = kwargs.get("scaling")
        self.attention[i] = AttentionLayout(
            scaling=float(scaling if scaling is not None else module.head_dim**-0.5),
            sliding_window=kwargs.get("sliding_window"),
            causal=bool(kwargs["is_causal"] if kwargs.get("is_causal") is not None else getattr(module, "is_causal", True)),
        )
        if self.spec.queries:
            self.queries[i] = query
        if self.spec.keys:
            self.keys[i] = key
        if self.spec.values:
            self.values[i] = value

