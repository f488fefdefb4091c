"""Unit importance: activation-based (Minitron) from one forward pass, and weight-based baselines.

Activation importance (arXiv 2407.14679), measured with hooks during one forward over calibration
tokens:

- attention head ``h`` of a layer: ``||a_{t,h}||_2``, the norm of the head's slice of the o_proj input
  (``head_signal="input"``, Minitron), or ``||W_o[:, h] a_{t,h}||_2``, the norm of the head's
  contribution to the o_proj output (``head_signal="output"``; sees heads silenced by o_proj, and costs
  ``head_dim^2`` per head and token through the per-head Gram matrix ``W_o[:, h]^T W_o[:, h]``);
- KV group: the sum of the scores of its query heads;
- MLP neuron ``i``: ``x_{t,i}``, the down_proj input;
- hidden channel ``i``: ``y_{t,i}`` at the output of every attention-input norm, MLP-input norm and the
  final norm (scores summed over the norms).

Per sequence ``b`` the per-token values are aggregated over tokens (``token_agg``): ``mean_abs`` =
``mean_t |v|``, ``l2`` = ``sqrt(sum_t v^2)``. The per-sequence scores ``s_b`` are then aggregated over all
calibration sequences (``batch_agg``): ``mean`` = ``mean_b s_b``, ``l2`` = ``sqrt(sum_b s_b^2)``,
``var`` = ``mean_b s_b^2 - (mean_b s_b)^2``. Hooks keep only these per-unit sums.

Baselines: ``magnitude`` (L2 norm of the weights a unit owns), ``taylor`` (``sum |w * dL/dw|`` over the
unit's weights, gradient of the LM loss accumulated over the calibration data; LLM-Pruner's first
order), ``random`` (seeded uniform). A unit owns: head = its q rows and o_proj columns; KV group = its
k and v rows plus its heads; neuron = its gate and up rows and down_proj column; hidden channel = its
embedding and lm_head column, the input columns of q/k/v/gate/up, the output rows of o/down, and its
norm weights; layer = all of the layer's weights.

MLP neurons are then re-ranked inside each layer (``neuron_ranking="refit"``, the default) by greedy
elimination on the Gram matrix of the down_proj inputs, collected in the same forward
(:mod:`.refit_order`): the ranking that leaves the least output error after the least-squares
re-fit. On the bundled teacher at I512 (64 calibration blocks, teacher-mode re-fit) it lowered the
pruned student's held-out perplexity from 164 to 128 (news) and 336 to 279 (Wikipedia).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Sequence
import contextlib
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from ..adapters import ArchAdapter, get_adapter, lm_head_is_tied
from ..config import ConfigBase, ConfigError
from ..models import cache_root, state_dict_sha256
from .distributed import SINGLE, CalibrationShard
from .layer_importance import LayerSimilarity, layer_similarity_hooks
from .refit_order import refit_elimination_scores
from .types import UnitImportance

logger = logging.getLogger(__name__)

METHODS = ("activation", "magnitude", "taylor", "random")
TOKEN_AGGS = ("mean_abs", "l2")
BATCH_AGGS = ("mean", "l2", "var")
HEAD_SIGNALS = ("input", "output")
NEURON_RANKINGS = ("method", "refit")
REFIT_GRAM_PARTS = ("o_proj", "down_proj")
MAX_GRAM_BYTES = 4 << 30
"""Largest size of all layers' float64 o_proj + down_proj input Gram matrices held during calibration
(0.6 GiB for SmolLM2-135M, 52 GiB for Llama-3-8B, where neither the re-fit ranking nor the Gram re-fit runs)."""
MIN_REFIT_TOKENS_PER_NEURON = 4
"""Below this many calibration tokens per MLP neuron the Gram matrix is too poorly estimated for the re-fit
ranking (bundled teacher, 1,536 neurons: worse than activation ranking at 256 tokens, better at 16,384)."""


@dataclass
class ImportanceConfig(ConfigBase):
    """How unit importance is measured."""

    method: str = "activation"
    """``activation`` (Minitron, forward only), ``magnitude``, ``taylor`` (needs a backward) or ``random``."""
    token_agg: str = "mean_abs"
    """Aggregation over a sequence's tokens for ``activation``: ``mean_abs`` or ``l2``."""
    batch_agg: str = "l2"
    """Aggregation of per-sequence scores over the calibration set: ``mean``, ``l2`` or ``var``."""
    head_signal: str = "input"
    """Head activation: ``input`` (o_proj input per head, Minitron) or ``output`` (the head's o_proj contribution)."""
    batch_size: int = 4
    """Calibration sequences per forward."""
    seed: int = 0
    """Seed of the ``random`` baseline."""
    chunk_tokens: int = 2048
    """Positions projected to the vocabulary at once in the ``taylor`` loss."""
    cache: bool = True
    """Cache scores on disk under ``cache_root()/importance`` (keyed by model, data and settings)."""
    neuron_ranking: Literal["method", "refit"] = "refit"
    """How a layer's MLP neurons are ranked: ``refit`` by greedy elimination on the Gram matrix of the
    down_proj inputs (the output error left after the least-squares re-fit, :mod:`.refit_order`; holds
    ``num_layers x intermediate_size^2`` float64 during calibration), ``method`` by the method's own scores."""

    def validate(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"importance.method={self.method!r}: choose one of {list(METHODS)}")
        if self.token_agg not in TOKEN_AGGS:
            raise ConfigError(f"importance.token_agg={self.token_agg!r}: choose one of {list(TOKEN_AGGS)}")
        if self.batch_agg not in BATCH_AGGS:
            raise ConfigError(f"importance.batch_agg={self.batch_agg!r}: choose one of {list(BATCH_AGGS)}")
        if self.head_signal not in HEAD_SIGNALS:
            raise ConfigError(f"importance.head_signal={self.head_signal!r}: choose one of {list(HEAD_SIGNALS)}")
        if self.batch_size < 1:
            raise ConfigError(f"importance.batch_size={self.batch_size}: must be >= 1")
        if self.chunk_tokens < 1:
            raise ConfigError(f"importance.chunk_tokens={self.chunk_tokens}: must be >= 1")
        if self.neuron_ranking not in NEURON_RANKINGS:
            raise ConfigError(f"importance.neuron_ranking={self.neuron_ranking!r}: choose one of {list(NEURON_RANKINGS)}")

    def settings(self) -> dict:
        """The settings that change the scores (recorded in the prune map and the cache key)."""
        out = {"method": self.method, "neuron_ranking": self.neuron_ranking}
        if self.method == "activation":
            out.update(token_agg=self.token_agg, batch_agg=self.batch_agg, head_signal=self.head_signal)
        if self.method == "random":
            out["seed"] = self.seed
        return out


# ---------------------------------------------------------------------------- aggregation
class ScoreAccumulator:
    """Running ``sum_b s_b``, ``sum_b s_b^2`` and count of per-sequence scores of some units (float64).

    The sums live on the device of the first scores added (no host sync per hook).
    """

    def __init__(self, shape: tuple[int, ...]):
        self.shape = shape
        self.sum: torch.Tensor | None = None
        self.sumsq: torch.Tensor | None = None
        self.count = 0

    def add(self, per_sequence: torch.Tensor, row: int | None = None) -> None:
        """``per_sequence``: [B, *shape] scores of B sequences, or [B, *shape[1:]] for one ``row`` (layer).

        With rows, the sequence count advances on row 0 (every forward reaches every layer).
        """
        s = per_sequence.detach().double()
        if self.sum is None:
            self.sum = torch.zeros(self.shape, dtype=torch.float64, device=s.device)
            self.sumsq = torch.zeros_like(self.sum)
        target = slice(None) if row is None else row
        self.sum[target] += s.sum(0)
        self.sumsq[target] += s.pow(2).sum(0)
        if row is None or row == 0:
            self.count += s.shape[0]

    def sum_over(self, shard: CalibrationShard) -> None:
        """Sum the running sums and count over ``shard``'s ranks (every rank calls it; one with no sequence adds zeros)."""
        if not shard.distributed:
            return
        if self.sum is None:
            self.sum = torch.zeros(self.shape, dtype=torch.float64)
            self.sumsq = torch.zeros_like(self.sum)
        n = self.sum.numel()
        count = torch.tensor([float(self.count)], dtype=torch.float64, device=self.sum.device)
        packed = shard.sum(torch.cat([self.sum.reshape(-1), self.sumsq.reshape(-1), count]))
        self.sum, self.sumsq = packed[:n].reshape(self.shape), packed[n : 2 * n].reshape(self.shape)
        self.count = int(round(packed[-1].item()))

    def result(self, batch_agg: str) -> torch.Tensor:
        """Aggregated scores on the CPU (float64)."""
        if self.count == 0 or self.sum is None:
            raise ValueError("no calibration sequence reached the importance hooks")
        total, total_sq = self.sum.cpu(), self.sumsq.cpu()
        if batch_agg == "mean":
            return total / self.count
        if batch_agg == "l2":
            return total_sq.sqrt()
        if batch_agg == "var":
            mean = total / self.count
            return (total_sq / self.count - mean.pow(2)).clamp_min(0.0)
        raise ValueError(f"unknown batch_agg {batch_agg!r}")


def _wide(x: torch.Tensor) -> torch.Tensor:
    """``x`` in float32 at least (float64 stays float64)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def token_aggregate(values: torch.Tensor, token_agg: str) -> torch.Tensor:
    """[B, T, U] per-token unit values -> [B, U] per-sequence scores."""
    values = _wide(values)
    # vector_norm reduces in one pass, without an abs() / pow() copy of the activations.
    if token_agg == "mean_abs":
        return torch.linalg.vector_norm(values, ord=1, dim=1) / values.shape[1]
    if token_agg == "l2":
        return torch.linalg.vector_norm(values, ord=2, dim=1)
    raise ValueError(f"unknown token_agg {token_agg!r}")


def head_token_aggregate(
    values: torch.Tensor, num_heads: int, token_agg: str, gram: torch.Tensor | None = None
) -> torch.Tensor:
    """o_proj input [B, T, H*hd] -> [B, H] per-sequence head scores from per-token head norms.

    With ``gram`` ([H, hd, hd], ``W_o[:, h]^T W_o[:, h]``) the norm is that of the head's o_proj output.
    """
    b, t, _ = values.shape
    per_head = _wide(values).reshape(b, t, num_heads, -1)
    if gram is None:
        norms = torch.linalg.vector_norm(per_head, dim=-1)  # [B, T, H]
    else:
        norms = torch.einsum("bthd,hde,bthe->bth", per_head, gram.to(per_head.dtype), per_head).clamp_min(0.0).sqrt()
    return token_aggregate(norms, token_agg)


def o_proj_head_gram(o_proj: nn.Module, num_heads: int) -> torch.Tensor:
    """[H, hd, hd] Gram matrices ``W_o[:, h]^T W_o[:, h]`` of each head's o_proj columns."""
    w = _wide(o_proj.weight.detach())
    per_head = w.reshape(w.shape[0], num_heads, -1)  # [D, H, hd]
    return torch.einsum("dhi,dhj->hij", per_head, per_head)


# ---------------------------------------------------------------------------- activation importance
@contextmanager
def activation_hooks(model: nn.Module, token_agg: str, head_signal: str = "input"):
    """Hooks on o_proj / down_proj inputs and the hidden norms' outputs; yields the accumulators."""
    adapter = get_adapter(model)
    shape = adapter.shape(model.config)
    layers = adapter.decoder_layers(model)
    n = len(layers)
    acc = {
        "heads": ScoreAccumulator((n, shape["num_heads"])),
        "neurons": ScoreAccumulator((n, shape["intermediate_size"])),
        "hidden": ScoreAccumulator((shape["hidden_size"],)),
    }
    hidden_pending: list[torch.Tensor] = []
    handles = []

    def head_hook(i, gram):
        def hook(_m, args):
            s = head_token_aggregate(args[0], shape["num_heads"], token_agg, gram)  # [B, H]
            acc["heads"].add(s, i)
        return hook

    def neuron_hook(i):
        def hook(_m, args):
            acc["neurons"].add(token_aggregate(args[0], token_agg), i)
        return hook

    def norm_hook(final: bool):
        def hook(_m, _args, output):
            hidden_pending.append(token_aggregate(output, token_agg))
            if final:  # one per-sequence score summed over all norms of this forward
                acc["hidden"].add(torch.stack(hidden_pending).sum(0))
                hidden_pending.clear()
        return hook

    for i, layer in enumerate(layers):
        o_proj = adapter.layer_part(layer, "o_proj")
        gram = o_proj_head_gram(o_proj, shape["num_heads"]) if head_signal == "output" else None
        handles.append(o_proj.register_forward_pre_hook(head_hook(i, gram)))
        handles.append(adapter.layer_part(layer, "down_proj").register_forward_pre_hook(neuron_hook(i)))
        handles.append(adapter.layer_part(layer, "attn_in_norm").register_forward_hook(norm_hook(False)))
        handles.append(adapter.layer_part(layer, "mlp_in_norm").register_forward_hook(norm_hook(False)))
    handles.append(model.get_submodule(adapter.final_norm).register_forward_hook(norm_hook(True)))
    try:
        yield acc
    finally:
        for h in handles:
            h.remove()


def _kv_from_heads(heads: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    return heads.reshape(heads.shape[0], num_kv_heads, -1).sum(-1)


@torch.no_grad()
def activation_importance(
    model: nn.Module,
    batches: Iterable[torch.Tensor],
    *,
    token_agg: str = "mean_abs",
    batch_agg: str = "l2",
    head_signal: str = "input",
    progress: Callable[[Iterable], Iterable] | None = None,
    gram_parts: Sequence[str] = (),
    shard: CalibrationShard = SINGLE,
) -> tuple[UnitImportance, LayerSimilarity] | tuple[UnitImportance, LayerSimilarity, dict[str, list[torch.Tensor]]]:
    """Activation importance and layer similarity statistics from ONE forward over ``batches``.

    ``UnitImportance.layers`` holds the block influence of each layer. With ``gram_parts`` the same forward
    also collects those projections' input Gram matrices (:func:`projection_gram_hooks`), returned third.
    With a distributed ``shard``, ``batches`` are this rank's and every statistic is summed over the ranks.
    """
    adapter = get_adapter(model)
    shape = adapter.shape(model.config)
    backbone = model.get_submodule(adapter.backbone)
    device = next(model.parameters()).device
    sim = LayerSimilarity(shape["num_layers"])
    was_training = model.training
    model.eval()
    with contextlib.ExitStack() as stack:
        acc = stack.enter_context(activation_hooks(model, token_agg, head_signal))
        stack.enter_context(layer_similarity_hooks(model, sim))
        grams = stack.enter_context(projection_gram_hooks(model, gram_parts)) if gram_parts else None
        for ids in progress(batches) if progress else batches:
            backbone(input_ids=ids.to(device))
    model.train(was_training)
    for accumulator in acc.values():
        accumulator.sum_over(shard)
    sim.sum_over(shard)
    if grams is not None:
        sum_grams(model, grams, shard)
    heads = acc["heads"].result(batch_agg)
    units = UnitImportance(
        heads=heads,
        kv_groups=_kv_from_heads(heads, shape["num_kv_heads"]),
        neurons=acc["neurons"].result(batch_agg),
        hidden=acc["hidden"].result(batch_agg),
        layers=sim.block_influence(),
        settings={"method": "activation", "token_agg": token_agg, "batch_agg": batch_agg, "head_signal": head_signal},
    )
    return (units, sim, grams) if gram_parts else (units, sim)


@contextmanager
def projection_gram_hooks(model: nn.Module, parts: Sequence[str] = ("down_proj",)):
    """Hooks accumulating each layer's ``X^T X`` of the inputs of ``parts`` (adapter names, e.g. ``down_proj``,
    ``o_proj``); float64, each batch's product in float32 (float64 for float64 models). Yields
    ``{part: [per-layer matrix]}``."""
    adapter = get_adapter(model)
    layers = adapter.decoder_layers(model)
    device = next(model.parameters()).device
    grams: dict[str, list[torch.Tensor]] = {}
    handles = []

    def hook(store: list[torch.Tensor], i: int):
        def accumulate(_m, args):
            x = _wide(args[0].detach())
            x = x.reshape(-1, x.shape[-1])
            if store[i] is None:
                store[i] = torch.zeros(x.shape[-1], x.shape[-1], dtype=torch.float64, device=device)
            store[i].add_((x.T @ x).double())
        return accumulate

    for part in parts:
        store = grams[part] = [None] * len(layers)
        handles += [adapter.layer_part(layer, part).register_forward_pre_hook(hook(store, i)) for i, layer in enumerate(layers)]
    try:
        yield grams
    finally:
        for h in handles:
            h.remove()


def sum_grams(model: nn.Module, grams: dict[str, list[torch.Tensor | None]], shard: CalibrationShard) -> None:
    """Sum :func:`projection_gram_hooks` matrices over ``shard``'s ranks in place (a layer no batch reached adds zeros)."""
    if not shard.distributed:
        return
    adapter = get_adapter(model)
    layers = adapter.decoder_layers(model)
    device = next(model.parameters()).device
    for part, store in grams.items():
        for i, gram in enumerate(store):
            if gram is None:
                n = adapter.layer_part(layers[i], part).weight.shape[1]
                gram = torch.zeros(n, n, dtype=torch.float64, device=device)
            store[i] = shard.sum(gram)


@torch.no_grad()
def refit_neuron_scores(model: nn.Module, grams: Sequence[torch.Tensor]) -> torch.Tensor:
    """[num_layers, intermediate_size] re-fit-aware keep scores (:func:`.refit_order.refit_elimination_scores`)."""
    adapter = get_adapter(model)
    weights = [adapter.layer_part(layer, "down_proj").weight for layer in adapter.decoder_layers(model)]
    return torch.stack([refit_elimination_scores(g, w) for g, w in zip(grams, weights)])


@torch.no_grad()
def projection_grams(
    model: nn.Module, batches: Iterable[torch.Tensor], parts: Sequence[str], shard: CalibrationShard = SINGLE
) -> dict[str, list[torch.Tensor]]:
    """Each layer's input Gram matrix of ``parts`` from one forward over ``batches`` (summed over ``shard``'s ranks)."""
    adapter = get_adapter(model)
    backbone = model.get_submodule(adapter.backbone)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    with projection_gram_hooks(model, parts) as grams:
        for ids in batches:
            backbone(input_ids=ids.to(device))
    model.train(was_training)
    sum_grams(model, grams, shard)
    return grams


# ---------------------------------------------------------------------------- weight-based baselines
def _param(module: nn.Module, attr: str, fn: Callable) -> torch.Tensor | None:
    p = getattr(module, attr, None)
    return None if p is None else fn(p)


def _attention_weights(adapter: ArchAdapter, layer: nn.Module, shape: dict[str, int], fn: Callable, attr: str = "weight"):
    """``fn`` of the (q, k, v, o) tensors of a layer (``attr`` = ``weight`` or ``bias``; None where absent).

    ``fn`` sees whole parameters; a fused qkv result is split by rows afterwards.
    """
    hd = shape["head_dim"]
    if adapter.qkv_proj is not None:
        fused = _param(adapter.layer_part(layer, "qkv_proj"), attr, fn)
        sizes = [shape["num_heads"] * hd, shape["num_kv_heads"] * hd, shape["num_kv_heads"] * hd]
        q, k, v = fused.split(sizes, dim=0) if fused is not None else (None, None, None)
    else:
        q, k, v = (_param(adapter.layer_part(layer, p), attr, fn) for p in ("q_proj", "k_proj", "v_proj"))
    return q, k, v, _param(adapter.layer_part(layer, "o_proj"), attr, fn)


def _mlp_weights(adapter: ArchAdapter, layer: nn.Module, fn: Callable):
    """``fn`` of the (gate, up, down) weights of a layer; a fused gate_up result is split by rows afterwards."""
    if adapter.gate_up_proj is not None:
        gate, up = _param(adapter.layer_part(layer, "gate_up_proj"), "weight", fn).chunk(2, dim=0)
    else:
        gate, up = (_param(adapter.layer_part(layer, p), "weight", fn) for p in ("gate_proj", "up_proj"))
    return gate, up, _param(adapter.layer_part(layer, "down_proj"), "weight", fn)


def unit_weight_sums(model: nn.Module, elementwise: Callable[[torch.Tensor], torch.Tensor]) -> UnitImportance:
    """Sum of ``elementwise(param)`` over the weights each unit owns (see the module docstring); float64."""
    adapter = get_adapter(model)
    shape = adapter.shape(model.config)
    hd, nh, nkv = shape["head_dim"], shape["num_heads"], shape["num_kv_heads"]
    layers = adapter.decoder_layers(model)
    n = len(layers)
    heads = torch.zeros(n, nh, dtype=torch.float64)
    kv = torch.zeros(n, nkv, dtype=torch.float64)
    neurons = torch.zeros(n, shape["intermediate_size"], dtype=torch.float64)
    hidden = torch.zeros(shape["hidden_size"], dtype=torch.float64)
    layer_sums = torch.zeros(n, dtype=torch.float64)

    def e(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else elementwise(t).detach().double().cpu()

    with torch.no_grad():
        for i, layer in enumerate(layers):
            q, k, v, o = _attention_weights(adapter, layer, shape, e)
            qb, kb, vb, _ = _attention_weights(adapter, layer, shape, e, "bias")
            heads[i] = q.reshape(nh, hd, -1).sum((1, 2)) + o.reshape(o.shape[0], nh, hd).sum((0, 2))
            if qb is not None:
                heads[i] += qb.reshape(nh, hd).sum(1)
            kv[i] = k.reshape(nkv, hd, -1).sum((1, 2)) + v.reshape(nkv, hd, -1).sum((1, 2))
            for b in (kb, vb):
                if b is not None:
                    kv[i] += b.reshape(nkv, hd).sum(1)
            kv[i] += heads[i].reshape(nkv, -1).sum(1)
            gate, up, down = _mlp_weights(adapter, layer, e)
            neurons[i] = gate.sum(1) + up.sum(1) + down.sum(0)
            for t in (q, k, v, gate, up):
                hidden += t.sum(0)
            hidden += o.sum(1) + down.sum(1)
            for name in adapter.layer_hidden_norms:
                hidden += e(adapter.get(layer, name).weight)
            layer_sums[i] = sum(e(p).sum() for p in layer.parameters())
        hidden += e(model.get_submodule(adapter.embed_tokens).weight).sum(0)
        if not lm_head_is_tied(model):
            hidden += e(model.get_submodule(adapter.lm_head).weight).sum(0)
        hidden += e(model.get_submodule(adapter.final_norm).weight)
    return UnitImportance(heads=heads, kv_groups=kv, neurons=neurons, hidden=hidden, layers=layer_sums)


def magnitude_importance(model: nn.Module) -> UnitImportance:
    """L2 norm of the weights each unit owns."""
    sums = unit_weight_sums(model, lambda w: w.float().pow(2))
    out = UnitImportance(
        heads=sums.heads.sqrt(), kv_groups=sums.kv_groups.sqrt(), neurons=sums.neurons.sqrt(),
        hidden=sums.hidden.sqrt(), layers=sums.layers.sqrt(), settings={"method": "magnitude"},
    )
    return out


def lm_loss_backward(model: nn.Module, input_ids: torch.Tensor, chunk_tokens: int) -> float:
    """Backward of the summed next-token NLL of ``input_ids``, the vocabulary projected ``chunk_tokens`` rows at a time."""
    adapter = get_adapter(model)
    backbone = model.get_submodule(adapter.backbone)
    head = model.get_submodule(adapter.lm_head)
    hidden = backbone(input_ids=input_ids).last_hidden_state[:, :-1]
    detached = hidden.detach().requires_grad_(True)
    flat = detached.reshape(-1, detached.shape[-1])
    labels = input_ids[:, 1:].reshape(-1)
    total = 0.0
    for i in range(0, flat.shape[0], chunk_tokens):
        loss = F.cross_entropy(_wide(head(flat[i : i + chunk_tokens])), labels[i : i + chunk_tokens], reduction="sum")
        loss.backward()
        total += loss.item()
    hidden.backward(detached.grad)
    return total


def taylor_importance(
    model: nn.Module,
    batches: Iterable[torch.Tensor],
    *,
    chunk_tokens: int = 2048,
    progress: Callable[[Iterable], Iterable] | None = None,
    shard: CalibrationShard = SINGLE,
) -> UnitImportance:
    """First-order Taylor importance ``sum |w * dL/dw|`` with the LM-loss gradient summed over ``batches``
    (and over ``shard``'s ranks)."""
    device = next(model.parameters()).device
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    saved_grads = {n: p.grad for n, p in model.named_parameters()}
    was_training = model.training
    model.eval()
    try:
        for p in model.parameters():
            p.requires_grad_(True)
            p.grad = None
        for ids in progress(batches) if progress else batches:
            lm_loss_backward(model, ids.to(device), chunk_tokens)
        if shard.distributed:
            for p in model.parameters():
                p.grad = shard.sum(p.grad if p.grad is not None else torch.zeros_like(p))
        sums = unit_weight_sums(model, lambda w: (w * w.grad).abs() if w.grad is not None else torch.zeros_like(w))
    finally:
        for n, p in model.named_parameters():
            p.grad = saved_grads[n]
            p.requires_grad_(flags[n])
        model.train(was_training)
    sums.settings = {"method": "taylor"}
    return sums


def random_importance(model: nn.Module, seed: int = 0) -> UnitImportance:
    """Seeded uniform scores of the right shapes (a baseline)."""
    shape = get_adapter(model).shape(model.config)
    g = torch.Generator().manual_seed(seed)
    n = shape["num_layers"]
    heads = torch.rand(n, shape["num_heads"], generator=g, dtype=torch.float64)
    return UnitImportance(
        heads=heads,
        kv_groups=_kv_from_heads(heads, shape["num_kv_heads"]),
        neurons=torch.rand(n, shape["intermediate_size"], generator=g, dtype=torch.float64),
        hidden=torch.rand(shape["hidden_size"], generator=g, dtype=torch.float64),
        layers=torch.rand(n, generator=g, dtype=torch.float64),
        settings={"method": "random", "seed": seed},
    )


# ---------------------------------------------------------------------------- dispatch and cache
def compute_importance(
    model: nn.Module,
    calibration: torch.Tensor,
    cfg: ImportanceConfig,
    *,
    layer_stats: bool = True,
    progress: Callable[[Iterable], Iterable] | None = None,
    gram_out: dict | None = None,
    shard: CalibrationShard = SINGLE,
) -> tuple[UnitImportance, LayerSimilarity | None]:
    """Unit importance by ``cfg.method`` and layer similarity statistics over ``calibration`` ([N, T] ids).

    The layer statistics come from a forward pass: the activation pass itself, or for the baselines a
    separate one, run only when ``layer_stats`` (otherwise None is returned for them). Results are read
    from / written to the on-disk cache when ``cfg.cache``. ``gram_out`` (a dict): receives the teacher's
    o_proj / down_proj input Gram matrices of the same calibration forward (``{"o_proj": [...],
    "down_proj": [...], "tokens": n}``) for :func:`.reconstruct.reconstruct` to re-fit from without
    another forward; the cache entry then holds them too (``grams.safetensors``, float64), so a pruning
    run that stopped after calibration restarts without the calibration forward; an entry without them
    is recomputed and replaced.

    With a distributed ``shard`` (every rank calls this with the same ``calibration``), each rank runs the
    forward (and backward) on its blocks ``rank::world`` and the statistics are summed over the ranks, so
    every rank returns the one-process result; the cache is read only when every rank finds the entry
    and written by rank 0.
    """
    cfg.validate()
    if calibration.ndim != 2 or calibration.shape[0] == 0 or calibration.shape[1] < 2:
        raise ValueError(f"calibration ids must be [num_blocks >= 1, seq_len >= 2], got {tuple(calibration.shape)}")
    with_stats = layer_stats or cfg.method == "activation"
    key = importance_cache_key(model, calibration, {**cfg.settings(), "layer_stats": with_stats}) if cfg.cache else None
    rank = cfg.neuron_ranking == "refit"
    shape = get_adapter(model).shape(model.config)
    size = shape["intermediate_size"]
    if rank and calibration.numel() < MIN_REFIT_TOKENS_PER_NEURON * size:
        logger.warning("importance.neuron_ranking=refit needs >= %d calibration tokens (%d x intermediate_size); "
                       "%d given, so MLP neurons are ranked by the %s scores (raise prune.calib_blocks)",
                       MIN_REFIT_TOKENS_PER_NEURON * size, MIN_REFIT_TOKENS_PER_NEURON, calibration.numel(), cfg.method)
        rank = False
    gram_bytes = 8 * shape["num_layers"] * (size**2 + (shape["num_heads"] * shape["head_dim"]) ** 2)
    if (rank or gram_out is not None) and gram_bytes > MAX_GRAM_BYTES:
        logger.warning("the o_proj / down_proj input Gram matrices would take %.1f GiB (> %.0f GiB): MLP neurons are "
                       "ranked by the %s scores and re-fits run their own calibration forwards",
                       gram_bytes / 2**30, MAX_GRAM_BYTES / 2**30, cfg.method)
        rank, gram_out = False, None
    if key is not None:
        cached = load_cached_importance(key, with_grams=gram_out is not None)
        if shard.all(cached is not None):
            logger.info("importance read from the cache (%s)", key[:16])
            units, sim, cached_grams = cached
            if gram_out is not None:
                device = next(model.parameters()).device
                gram_out.update({part: [g.to(device) for g in store] for part, store in cached_grams.items()},
                                tokens=int(calibration.numel()))
            return units, sim
    batches = importance_batches(shard.blocks(calibration), cfg.batch_size)
    parts = REFIT_GRAM_PARTS if gram_out is not None else ("down_proj",) if rank else ()
    grams: dict[str, list[torch.Tensor]] = {}
    if cfg.method == "activation":
        out = activation_importance(
            model, batches, token_agg=cfg.token_agg, batch_agg=cfg.batch_agg, head_signal=cfg.head_signal,
            progress=progress, gram_parts=parts, shard=shard,
        )
        units, sim = out[0], out[1]
        grams = out[2] if parts else {}
    else:
        from .layer_importance import layer_similarity

        sim = layer_similarity(model, progress(batches) if progress else batches, shard) if with_stats else None
        if cfg.method == "magnitude":
            units = magnitude_importance(model)
        elif cfg.method == "taylor":
            units = taylor_importance(model, batches, chunk_tokens=cfg.chunk_tokens,
                                      progress=None if with_stats else progress, shard=shard)
        else:
            units = random_importance(model, cfg.seed)
        if parts:
            grams = projection_grams(model, batches, parts, shard)
    if rank:
        units.neurons = refit_neuron_scores(model, grams["down_proj"])
    if gram_out is not None:
        gram_out.update(grams, tokens=int(calibration.numel()))
    units.settings = {**cfg.settings(), "neuron_ranking": "refit" if rank else "method", "calibration_blocks": int(calibration.shape[0]),
                      "calibration_tokens": int(calibration.numel())}
    if key is not None and shard.is_main:
        save_cached_importance(key, units, sim, grams=grams if gram_out is not None else None)
    del grams
    return units, sim


def importance_cache_dir() -> Path:
    return cache_root() / "importance"


def importance_cache_key(model: nn.Module, calibration: torch.Tensor, settings: dict) -> str:
    """sha256 over the model's state-dict hash, the calibration token ids and the settings."""
    h = hashlib.sha256()
    h.update(state_dict_sha256(model).encode())
    ids = calibration.detach().to("cpu", torch.int64).contiguous()
    h.update(str(tuple(ids.shape)).encode())
    h.update(ids.numpy().tobytes())
    h.update(json.dumps(settings, sort_keys=True).encode())
    return h.hexdigest()


_TENSOR_FIELDS = ("heads", "kv_groups", "neurons", "hidden", "layers")
GRAMS_FILE = "grams.safetensors"


def save_cached_importance(
    key: str, units: UnitImportance, sim: LayerSimilarity | None, *, grams: dict[str, list[torch.Tensor]] | None = None
) -> Path:
    """Write ``<cache>/importance/<key>/{scores.safetensors, settings.json[, grams.safetensors]}`` atomically
    (replacing an existing entry)."""
    target = importance_cache_dir() / key
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    try:
        tensors = {k: v.contiguous() for k, v in units.to_dict()["tensors"].items()}
        if sim is not None:
            tensors.update(sim.to_tensors())
        save_file(tensors, str(tmp / "scores.safetensors"))
        if grams:
            save_file({f"{part}.{i}": g.detach().cpu().contiguous() for part, store in grams.items()
                       for i, g in enumerate(store)}, str(tmp / GRAMS_FILE))
        (tmp / "settings.json").write_text(json.dumps(units.settings, sort_keys=True, indent=1))
        if target.is_dir():
            shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / "scores.safetensors").is_file():
            raise
    return target


def load_cached_importance(
    key: str, *, with_grams: bool = False
) -> tuple[UnitImportance, LayerSimilarity | None, dict[str, list[torch.Tensor]]] | None:
    """(units, layer statistics, Gram matrices by part) of a cache entry; None when it is missing (or lacks the
    Gram matrices ``with_grams`` asks for)."""
    folder = importance_cache_dir() / key
    if not (folder / "scores.safetensors").is_file() or not (folder / "settings.json").is_file():
        return None
    grams: dict[str, list[torch.Tensor]] = {}
    if with_grams:
        if not (folder / GRAMS_FILE).is_file():
            return None
        stored = load_file(str(folder / GRAMS_FILE))
        for part in REFIT_GRAM_PARTS:
            names = sorted((k for k in stored if k.startswith(part + ".")), key=lambda k: int(k.rsplit(".", 1)[1]))
            grams[part] = [stored[k] for k in names]
    tensors = load_file(str(folder / "scores.safetensors"))
    units = UnitImportance(
        **{k: tensors.get(k) for k in _TENSOR_FIELDS},
        settings=json.loads((folder / "settings.json").read_text()),
    )
    return units, LayerSimilarity.from_tensors(tensors) if "layer_cos_sum" in tensors else None, grams


def importance_batches(calibration: torch.Tensor, batch_size: int) -> Sequence[torch.Tensor]:
    """Consecutive [batch_size, T] slices of calibration ids."""
    return [calibration[i : i + batch_size] for i in range(0, calibration.shape[0], batch_size)]
