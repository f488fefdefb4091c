"""Apply a :class:`PruneMap` to a teacher: a new, smaller model whose weights are slices of the teacher's.

Every student parameter is ``teacher_param.index_select(...)`` of the matching teacher parameter
(bit-exact), with two deterministic exceptions for models whose embeddings are scaled by
``sqrt(hidden_size)`` in forward (gemma) when hidden channels are pruned:

- the embedding rows are multiplied by ``sqrt(teacher_hidden / student_hidden)`` so that the scaled
  embeddings equal the teacher's on the kept channels;
- if the embedding is tied to the lm_head, the lm_head sees that factor too; the final norm's gain
  ``(offset + w)`` is divided by it so that the logits stay those of the teacher's head.

Both are exact up to float rounding. :func:`rescaled_parameter_names` lists them. What is
never exact under hidden pruning is RMSNorm itself: its mean runs over fewer channels.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel
from transformers.initialization import no_init_weights

from ..adapters import ArchAdapter, get_adapter, lm_head_is_tied
from .prune_map import PRUNABLE_SHAPE_KEYS, PruneMap, PruneMapError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ParamSlice:
    """Where a student parameter comes from: teacher parameter name, kept rows / columns (None: all)."""

    teacher_name: str
    rows: torch.Tensor | None = None
    cols: torch.Tensor | None = None

    def take(self, tensor: torch.Tensor) -> torch.Tensor:
        """The slice of ``tensor`` (a copy, bit-exact)."""
        out = tensor
        if self.rows is not None:
            out = out.index_select(0, self.rows.to(out.device))
        if self.cols is not None and out.dim() > 1:
            out = out.index_select(1, self.cols.to(out.device))
        return out


def head_rows(heads: list[int], head_dim: int) -> torch.Tensor:
    """Row indices of ``heads`` in a projection laid out head after head."""
    h = torch.as_tensor(heads, dtype=torch.long)
    return (h[:, None] * head_dim + torch.arange(head_dim)[None, :]).reshape(-1)


def student_config(teacher: PreTrainedModel, pmap: PruneMap):
    """The teacher's config at the student's shape, per-layer lists re-indexed by kept layers."""
    adapter = get_adapter(teacher)
    cfg = copy.deepcopy(teacher.config)
    adapter.set_shape(cfg, pmap.student_shape)
    for name in adapter.per_layer_config_lists:
        values = getattr(cfg, name, None)
        if isinstance(values, (list, tuple)):
            setattr(cfg, name, [values[t] for t in pmap.kept_layers])
    for name in adapter.layer_count_fields:
        value = getattr(cfg, name, None)
        if isinstance(value, int):
            # Layers are kept in order, so "the first N layers" maps to the kept layers below N.
            setattr(cfg, name, sum(1 for t in pmap.kept_layers if t < value))
    cfg.tie_word_embeddings = bool(getattr(teacher.config, "tie_word_embeddings", False))
    return cfg


def check_map_fits(teacher: PreTrainedModel, pmap: PruneMap) -> None:
    """Raise PruneMapError when the map was made for a teacher of another shape or type."""
    pmap.validate()
    adapter = get_adapter(teacher)
    shape = adapter.shape(teacher.config)
    if pmap.teacher.get("shape") != shape:
        raise PruneMapError(
            f"the prune map was made for a teacher of shape {pmap.teacher.get('shape')}, this teacher is {shape}"
        )
    model_type = pmap.teacher.get("model_type")
    if model_type is not None and model_type != teacher.config.model_type:
        raise PruneMapError(f"the prune map was made for a {model_type!r} teacher, not {teacher.config.model_type!r}")


def slice_plan(teacher: PreTrainedModel, pmap: PruneMap) -> dict[str, ParamSlice]:
    """Slicing rule of every named module parameter of the student (student name -> ParamSlice).

    Keys are ``module_path``; a module's weight uses ``rows``/``cols``, its bias ``rows``.
    """
    a = get_adapter(teacher)
    t = pmap.teacher["shape"]
    hd = t["head_dim"]
    hidden = torch.as_tensor(pmap.kept_hidden, dtype=torch.long)
    plan: dict[str, ParamSlice] = {
        a.embed_tokens: ParamSlice(a.embed_tokens, None, hidden),
        a.final_norm: ParamSlice(a.final_norm, hidden),
        a.lm_head: ParamSlice(a.lm_head, None, hidden),
    }
    for i, (layer, lm) in enumerate(zip(pmap.kept_layers, pmap.layers)):
        q = head_rows(lm.kept_query_heads, hd)
        kv = head_rows(lm.kept_kv_groups, hd)
        neurons = torch.as_tensor(lm.kept_neurons, dtype=torch.long)
        parts: dict[str | None, tuple[torch.Tensor | None, torch.Tensor | None]] = {
            a.q_proj: (q, hidden),
            a.k_proj: (kv, hidden),
            a.v_proj: (kv, hidden),
            a.o_proj: (hidden, q),
            a.gate_proj: (neurons, hidden),
            a.up_proj: (neurons, hidden),
            a.down_proj: (hidden, neurons),
            a.q_norm: (None, None),
            a.k_norm: (None, None),
        }
        if a.qkv_proj is not None:
            q_size, kv_size = t["num_heads"] * hd, t["num_kv_heads"] * hd
            parts[a.qkv_proj] = (torch.cat([q, q_size + kv, q_size + kv_size + kv]), hidden)
        if a.gate_up_proj is not None:
            parts[a.gate_up_proj] = (torch.cat([neurons, t["intermediate_size"] + neurons]), hidden)
        for norm in a.layer_hidden_norms:
            parts[norm] = (hidden, None)
        for path, (rows, cols) in parts.items():
            if path is not None:
                plan[f"{a.layers}.{i}.{path}"] = ParamSlice(f"{a.layers}.{layer}.{path}", rows, cols)
    return plan


def _param_slice(name: str, plan: dict[str, ParamSlice], a: ArchAdapter, pmap: PruneMap) -> ParamSlice:
    """The rule for parameter ``name``; unknown parameters are copied whole (shape checked by the caller)."""
    module, _, kind = name.rpartition(".")
    rule = plan.get(module)
    if rule is not None:
        teacher_name = f"{rule.teacher_name}.{kind}"
        return ParamSlice(teacher_name, rule.rows, rule.cols if kind == "weight" else None)
    prefix = f"{a.layers}."
    if name.startswith(prefix):
        index, _, rest = name[len(prefix) :].partition(".")
        return ParamSlice(f"{prefix}{pmap.kept_layers[int(index)]}.{rest}")
    return ParamSlice(name)


def build_student(teacher: PreTrainedModel, pmap: PruneMap) -> PreTrainedModel:
    """An uninitialised model of the student's config, on the teacher's device and dtype."""
    cfg = student_config(teacher, pmap)
    dtype = next(teacher.parameters()).dtype
    with no_init_weights():
        student = AutoModelForCausalLM.from_config(
            cfg, dtype=dtype, attn_implementation=teacher.config._attn_implementation
        )
    student.tie_weights()
    if getattr(teacher, "generation_config", None) is not None:
        student.generation_config = copy.deepcopy(teacher.generation_config)
    return student.to(next(teacher.parameters()).device)


def embedding_rescale(teacher: PreTrainedModel, pmap: PruneMap) -> float:
    """Factor applied to the student's embedding rows (1.0 unless gemma-style scaling and hidden pruning)."""
    a = get_adapter(teacher)
    t, s = pmap.teacher["shape"]["hidden_size"], pmap.student_shape["hidden_size"]
    return math.sqrt(t / s) if a.embed_scaled_by_sqrt_hidden and t != s else 1.0


def rescaled_parameter_names(teacher: PreTrainedModel, pmap: PruneMap) -> list[str]:
    """Student parameters that are a teacher slice times a constant (see the module docstring)."""
    if embedding_rescale(teacher, pmap) == 1.0:
        return []
    a = get_adapter(teacher)
    names = [f"{a.embed_tokens}.weight"]
    if lm_head_is_tied(teacher):
        names.append(f"{a.final_norm}.weight")
    return names


@torch.no_grad()
def apply_prune_map(teacher: PreTrainedModel, pmap: PruneMap) -> PreTrainedModel:
    """A new student model cut out of ``teacher`` by ``pmap`` (the teacher is not modified).

    Parameters are bit-exact slices of the teacher's, except :func:`rescaled_parameter_names`;
    parameters listed in ``pmap.refit`` are slices too here (:func:`rebuild_student` loads them).
    """
    check_map_fits(teacher, pmap)
    a = get_adapter(teacher)
    student = build_student(teacher, pmap)
    tied = lm_head_is_tied(teacher)
    if tied and not lm_head_is_tied(student):
        raise PruneMapError("the teacher's lm_head is tied to its embeddings but the student's is not")
    teacher_params = dict(teacher.named_parameters())
    plan = slice_plan(teacher, pmap)
    for name, param in student.named_parameters():
        rule = _param_slice(name, plan, a, pmap)
        source = teacher_params.get(rule.teacher_name)
        if source is None:
            raise PruneMapError(f"student parameter {name} has no teacher counterpart {rule.teacher_name}")
        value = rule.take(source.detach())
        if value.shape != param.shape:
            raise PruneMapError(
                f"{name}: sliced teacher tensor has shape {tuple(value.shape)}, the student needs "
                f"{tuple(param.shape)}; the adapter has no slicing rule for it (add one in adapters.py)"
            )
        param.copy_(value)
    scale = embedding_rescale(teacher, pmap)
    if scale != 1.0:
        student.get_submodule(a.embed_tokens).weight.mul_(scale)
        if tied:
            norm = student.get_submodule(a.final_norm).weight
            norm.copy_((norm.double() + a.norm_weight_offset) / scale - a.norm_weight_offset)
    logger.info(
        "pruned student: %d layers, hidden %d, %d heads / %d KV heads, MLP %d",
        *(pmap.student_shape[k] for k in PRUNABLE_SHAPE_KEYS),
    )
    return student.eval()
