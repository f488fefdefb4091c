"""Reconstruction: re-fit projections of the pruned student by ridge least squares on calibration data.

Every re-fit solves, in float64, for a projection with student inputs ``X`` (rows = tokens) and
targets ``Y`` (the teacher's values on the kept output rows)

    min_W ||X W^T - Y||^2 + lam ||W||^2,   lam = damping * mean(diag(X^T X))
    =>  W^T = (X^T X + lam I)^{-1} X^T Y

from the Gram matrices ``X^T X`` and ``X^T Y`` only, accumulated batch by batch in float64 (each
batch's products in float32, or float64 for float64 models), so memory does not grow with
calibration tokens. A projection with a bias is fitted with an extra constant input column
(the bias is re-fitted too and is not penalised).

Two modes (``ReconstructionConfig.mode``):

- ``teacher``: inputs come from the teacher. ``o_proj`` / ``down_proj`` of a block whose input units
  were removed (query heads, MLP neurons) use the teacher's own input ``X`` to that projection: with
  ``K`` the kept input columns, ``R`` the kept hidden rows and ``W`` the teacher weight, ``X_K`` is
  fitted to ``X W_R^T``. The input projections (``refit_inputs``) see the student's input norm applied
  to the teacher's residual stream restricted to the kept hidden channels.
- ``sequential``: inputs come from the student itself. Student layer ``i`` (teacher layer
  ``kept_layers[i]``) is re-fitted on the student's own hidden states, propagated through the
  already re-fitted student layers below it, against the teacher's projection outputs computed on
  the teacher's own stream; inside a layer the order is q/k/v, o_proj (on the attention output of
  the re-fitted q/k/v), gate/up (on the student's post-attention normalised input), down_proj. Each
  layer so corrects the error of the layers below it.

``refit_inputs``: when hidden channels were cut, the input projections of every layer (``q/k/v`` or
``qkv``, ``gate/up`` or ``gate_up``) are re-fitted from what they actually see in the student (the
output of its re-normalised input norm over the kept channels) to the teacher's projection outputs
on the kept heads / neurons; in sequential mode ``o_proj`` and ``down_proj`` of every layer are then
re-fitted too (their inputs changed). Per-head query/key norms (qwen3, gemma3) come after ``q/k`` and
are left alone; gemma3's extra post-attention / post-feedforward norms stay teacher slices (the
re-fit targets are the projection outputs before those norms).

Memory: the calibration hidden states (``tokens x hidden`` of each stream) plus one layer's
activations for one batch, plus one projection group's Gram matrices at a time. Cost: teacher mode
about two teacher forwards; sequential mode about one teacher and one student forward per re-fitted
projection group (each stopped right after the projection it needs), plus the Gram products.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from ..adapters import ArchAdapter, get_adapter
from ..config import ConfigBase, ConfigError
from .apply import head_rows
from .prune_map import PruneMap

logger = logging.getLogger(__name__)

REFIT_TARGETS = ("o_proj", "down_proj")


@dataclass
class ReconstructionConfig(ConfigBase):
    """Least-squares re-fit of the pruned student's projections (see the module docstring).

    The defaults measured best on the bundled teacher (section "Reconstruction modes" of
    bench/RESULTS.md): with hidden channels cut, sequential with input re-fit; otherwise teacher mode
    (sequential o_proj / down_proj re-fits alone generalised worse there).
    """

    enabled: bool = True
    """Re-fit after pruning; off keeps the plain teacher slices."""
    mode: Literal["auto", "teacher", "sequential"] = "auto"
    """Where re-fit inputs come from: the teacher's activations, or the student's own, layer by layer;
    ``auto``: sequential when hidden channels were cut and ``refit_inputs`` is on, teacher otherwise."""
    refit_inputs: bool = True
    """When hidden channels were cut, also re-fit every layer's input projections (q/k/v, gate/up)."""
    damping: float = 1e-2
    """Ridge strength relative to the mean diagonal of the inputs' Gram matrix."""
    targets: list[str] = field(default_factory=lambda: list(REFIT_TARGETS))
    """Output projections that may be re-fitted: ``o_proj`` (heads removed), ``down_proj`` (neurons)."""

    def validate(self) -> None:
        if not self.damping >= 0.0:
            raise ConfigError(f"reconstruction.damping={self.damping}: must be >= 0")
        if self.mode not in ("auto", "teacher", "sequential"):
            raise ConfigError(f"reconstruction.mode={self.mode!r}: choose 'auto', 'teacher' or 'sequential'")
        unknown = [t for t in self.targets if t not in REFIT_TARGETS]
        if unknown:
            raise ConfigError(
                f"reconstruction.targets has {unknown}; choose from {list(REFIT_TARGETS)} "
                "(input projections are re-fitted with reconstruction.refit_inputs)"
            )


@dataclass
class ReconstructionReport:
    """What a reconstruction did: calibration tokens and the largest statistics held at once (bytes)."""

    tokens: int = 0
    peak_stat_bytes: int = 0
    groups: int = 0

    def note(self, stats: Iterable["GramStats | ProjectionStats"]) -> None:
        self.peak_stat_bytes = max(self.peak_stat_bytes, sum(s.nbytes for s in stats))


def solve_refit(gram: torch.Tensor, cross: torch.Tensor, damping: float, unpenalized: int = 0) -> torch.Tensor:
    """``(gram + lam D)^{-1} cross`` in float64 with ``lam = damping * mean(diag(gram))``.

    ``D`` is the identity except for the last ``unpenalized`` entries (bias columns), which are 0;
    ``lam`` averages the penalised diagonal only.
    """
    gram, cross = gram.double(), cross.double()
    n = gram.shape[0]
    penal = torch.ones(n, dtype=gram.dtype, device=gram.device)
    if unpenalized:
        penal[n - unpenalized :] = 0.0
    diag = gram.diagonal()[: n - unpenalized] if unpenalized else gram.diagonal()
    lam = damping * diag.mean().clamp_min(torch.finfo(torch.float64).tiny)
    a = gram + torch.diag(lam * penal)
    chol, info = torch.linalg.cholesky_ex(a)
    if int(info) == 0:
        return torch.cholesky_solve(cross, chol)
    # Singular (damping 0 with dependent inputs): the minimum-norm least-squares solution.
    return torch.linalg.pinv(a, hermitian=True) @ cross


def _work_dtype(x: torch.Tensor) -> torch.dtype:
    """Per-batch products run in float32 (float64 inputs stay float64); the sums are kept in float64."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


class ProjectionStats:
    """Teacher mode: accumulates ``X_K^T X_K`` and ``X_K^T X W_R^T`` (float64) from a projection's inputs."""

    def __init__(self, weight: torch.Tensor, kept_cols: torch.Tensor, kept_rows: torch.Tensor) -> None:
        device = weight.device
        self.cols = kept_cols.to(device)
        self.target_weight = weight.detach().index_select(0, kept_rows.to(device))  # [R, N]
        self.target_weight = self.target_weight.to(_work_dtype(self.target_weight))
        k = self.cols.numel()
        self.gram = torch.zeros(k, k, dtype=torch.float64, device=device)
        self.cross = torch.zeros(k, self.target_weight.shape[0], dtype=torch.float64, device=device)
        self.tokens = 0

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.gram, self.cross, self.target_weight))

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).to(self.target_weight.dtype)
        xk = x.index_select(1, self.cols)
        self.gram += (xk.T @ xk).double()
        self.cross += (xk.T @ (x @ self.target_weight.T)).double()
        self.tokens += x.shape[0]

    def solve(self, damping: float) -> tuple[torch.Tensor, None]:
        return solve_refit(self.gram, self.cross, damping).T, None


class GramStats:
    """Accumulates ``X^T X`` and ``X^T Y`` (float64) of inputs ``X`` and targets ``Y``; optional bias column."""

    def __init__(self, in_features: int, out_features: int, *, bias: bool, device: torch.device) -> None:
        k = in_features + int(bias)
        self.bias = bias
        self.gram = torch.zeros(k, k, dtype=torch.float64, device=device)
        self.cross = torch.zeros(k, out_features, dtype=torch.float64, device=device)
        self.tokens = 0

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.gram, self.cross))

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        dtype = _work_dtype(x)
        x = x.reshape(-1, x.shape[-1]).to(dtype)
        y = y.reshape(-1, y.shape[-1]).to(dtype)
        if self.bias:
            x = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype, device=x.device)], 1)
        self.gram += (x.T @ x).double()
        self.cross += (x.T @ y).double()
        self.tokens += x.shape[0]

    def solve(self, damping: float) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(weight ``[out, in]``, bias ``[out]`` or None)."""
        sol = solve_refit(self.gram, self.cross, damping, unpenalized=int(self.bias))
        if self.bias:
            return sol[:-1].T, sol[-1]
        return sol.T, None


class _StopForward(Exception):
    """Raised by a hook to end a forward pass early."""


@dataclass
class _CalibrationBatch:
    hidden: torch.Tensor
    layer_args: dict[int, tuple[tuple, dict[str, Any]]]


def _layer_output(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def _first_input(args: tuple, kwargs: dict) -> torch.Tensor:
    if args:
        return args[0]
    return kwargs.get("hidden_states", kwargs.get("input", next(iter(kwargs.values()), None)))


def capture_layer_inputs(model: nn.Module, batches: Iterable[torch.Tensor], last_layer: int) -> list[_CalibrationBatch]:
    """Per batch: the first decoder layer's input and each layer's other arguments up to ``last_layer``."""
    a = get_adapter(model)
    layers = a.decoder_layers(model)
    backbone = model.get_submodule(a.backbone)
    device = next(model.parameters()).device
    captured: list[_CalibrationBatch] = []
    current: dict[str, Any] = {}

    def make_hook(index: int):
        def hook(module, args, kwargs):
            hidden, rest = (args[0], args[1:]) if args else (kwargs["hidden_states"], ())
            kwargs = {k: v for k, v in kwargs.items() if k != "hidden_states"}
            if index == 0:
                current["hidden"] = hidden.detach()
            current["args"][index] = (rest, kwargs)
            if index == last_layer:
                raise _StopForward

        return hook

    handles = [layer.register_forward_pre_hook(make_hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        for input_ids in batches:
            current.clear()
            current["args"] = {}
            try:
                backbone(input_ids=input_ids.to(device), use_cache=False)
            except _StopForward:
                pass
            else:
                raise RuntimeError("the backbone finished without reaching the last layer to re-fit")
            captured.append(_CalibrationBatch(current["hidden"], current["args"]))
    finally:
        for h in handles:
            h.remove()
    if not captured:
        raise ValueError("reconstruction needs calibration batches; got none")
    return captured


class _Recorder:
    """Hooks recording the input (``"in"``) or output (``"out"``) of named modules of one layer.

    With ``stop``, the layer's forward is ended as soon as everything is recorded.
    """

    def __init__(self, specs: dict[str, tuple[nn.Module, str]], *, stop: bool) -> None:
        self.values: dict[str, torch.Tensor] = {}
        self.wanted = len(specs)
        self.stop = stop
        self.handles = []
        for name, (module, kind) in specs.items():
            if kind == "in":
                self.handles.append(module.register_forward_pre_hook(self._pre(name), with_kwargs=True))
            else:
                self.handles.append(module.register_forward_hook(self._post(name)))

    def _done(self) -> None:
        if self.stop and len(self.values) == self.wanted:
            raise _StopForward

    def _pre(self, name: str):
        def hook(module, args, kwargs):
            self.values[name] = _first_input(args, kwargs).detach()
            self._done()

        return hook

    def _post(self, name: str):
        def hook(module, args, out):
            self.values[name] = _layer_output(out).detach()
            self._done()

        return hook

    def run(self, layer: nn.Module, hidden: torch.Tensor, rest: tuple, kwargs: dict) -> tuple[dict[str, torch.Tensor], Any]:
        """(recorded values, the layer's output or None when stopped early)."""
        self.values = {}
        out = None
        try:
            out = _layer_output(layer(hidden, *rest, **kwargs))
        except _StopForward:
            pass
        if len(self.values) != self.wanted:
            raise RuntimeError(f"reconstruction: the layer's forward did not reach {sorted(self.values)} of {self.wanted}")
        return self.values, out

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


# ---------------------------------------------------------------------------------------------- planning
@dataclass
class _Group:
    """Projections re-fitted together from one input: adapter part names, the teacher's kept output rows."""

    kind: Literal["attn_in", "o_proj", "mlp_in", "down_proj"]
    parts: list[str]
    rows: list[torch.Tensor]
    cols: torch.Tensor | None = None  # teacher mode o_proj / down_proj: kept input columns


def _attn_parts(a: ArchAdapter, lm, t: dict[str, int]) -> tuple[list[str], list[torch.Tensor]]:
    hd = t["head_dim"]
    q, kv = head_rows(lm.kept_query_heads, hd), head_rows(lm.kept_kv_groups, hd)
    if a.qkv_proj is not None:
        q_size, kv_size = t["num_heads"] * hd, t["num_kv_heads"] * hd
        return ["qkv_proj"], [torch.cat([q, q_size + kv, q_size + kv_size + kv])]
    return ["q_proj", "k_proj", "v_proj"], [q, kv, kv]


def _mlp_parts(a: ArchAdapter, lm, t: dict[str, int]) -> tuple[list[str], list[torch.Tensor]]:
    n = torch.as_tensor(lm.kept_neurons, dtype=torch.long)
    if a.gate_up_proj is not None:
        return ["gate_up_proj"], [torch.cat([n, t["intermediate_size"] + n])]
    return ["gate_proj", "up_proj"], [n, n]


def _refit_plan(a: ArchAdapter, pmap: PruneMap, cfg: ReconstructionConfig) -> dict[int, list[_Group]]:
    """Student layer -> the projection groups to re-fit, in the order they are fitted."""
    t = pmap.teacher["shape"]
    hidden_cut = len(pmap.kept_hidden) < t["hidden_size"]
    inputs = cfg.refit_inputs and hidden_cut
    kept_hidden = torch.as_tensor(pmap.kept_hidden, dtype=torch.long)
    plan: dict[int, list[_Group]] = {}
    for i, lm in enumerate(pmap.layers):
        groups = []
        every = inputs and cfg.mode == "sequential"
        if inputs:
            groups.append(_Group("attn_in", *_attn_parts(a, lm, t)))
        if "o_proj" in cfg.targets and (every or len(lm.kept_query_heads) < t["num_heads"]):
            groups.append(_Group("o_proj", ["o_proj"], [kept_hidden], head_rows(lm.kept_query_heads, t["head_dim"])))
        if inputs:
            groups.append(_Group("mlp_in", *_mlp_parts(a, lm, t)))
        if "down_proj" in cfg.targets and (every or len(lm.kept_neurons) < t["intermediate_size"]):
            groups.append(_Group("down_proj", ["down_proj"], [kept_hidden], torch.as_tensor(lm.kept_neurons, dtype=torch.long)))
        if groups:
            plan[i] = groups
    return plan


# ---------------------------------------------------------------------------------------------- solving
def _group_stats(a: ArchAdapter, student_layer: nn.Module, group: _Group, device) -> GramStats:
    modules = [a.layer_part(student_layer, p) for p in group.parts]
    biased = [m.bias is not None for m in modules]
    return GramStats(modules[0].weight.shape[1], sum(m.weight.shape[0] for m in modules), bias=all(biased), device=device)


def _group_target(a: ArchAdapter, student_layer: nn.Module, group: _Group, values: dict[str, torch.Tensor], bias: bool) -> torch.Tensor:
    """The teacher's outputs of the group's projections on the kept rows, side by side.

    Without a bias column, a student bias that exists is kept (subtracted from the target).
    """
    out = []
    for part, rows in zip(group.parts, group.rows):
        y = values[part].index_select(-1, rows.to(values[part].device))
        b = a.layer_part(student_layer, part).bias
        if b is not None and not bias:
            y = y - b.to(y.dtype)
        out.append(y)
    return torch.cat(out, -1) if len(out) > 1 else out[0]


def _write(a: ArchAdapter, student_layer: nn.Module, index: int, group: _Group, weight: torch.Tensor,
           bias: torch.Tensor | None) -> list[str]:
    """Copy the solution into the student's parameters; the re-fitted parameter names."""
    names = []
    start = 0
    for part in group.parts:
        module = a.layer_part(student_layer, part)
        rows = module.weight.shape[0]
        path = f"{a.layers}.{index}.{getattr(a, part)}"
        w = weight[start : start + rows]
        if w.shape != module.weight.shape:
            raise ValueError(f"{path}.weight: re-fit has shape {tuple(w.shape)}, parameter {tuple(module.weight.shape)}")
        module.weight.copy_(w.to(module.weight.device, module.weight.dtype))
        names.append(f"{path}.weight")
        if bias is not None:
            module.bias.copy_(bias[start : start + rows].to(module.bias.device, module.bias.dtype))
            names.append(f"{path}.bias")
        start += rows
    return names


# ---------------------------------------------------------------------------------------------- modes
def _reconstruct_teacher(a, student, teacher, pmap, batches, cfg, plan, report) -> list[str]:
    """Teacher mode: one pass over the teacher layers, every projection fitted on teacher-derived inputs."""
    student_layers = a.decoder_layers(student)
    teacher_layers = a.decoder_layers(teacher)
    by_teacher = {pmap.kept_layers[i]: i for i in plan}
    last = max(by_teacher)
    kept_rows = torch.as_tensor(pmap.kept_hidden, dtype=torch.long)
    calibration = capture_layer_inputs(teacher, batches, last)
    report.tokens = sum(b.hidden.shape[0] * b.hidden.shape[1] for b in calibration)
    logger.info("reconstruction (teacher inputs): %d layers on %d calibration tokens", len(plan), report.tokens)
    refit: list[str] = []
    norm_of = {"attn_in": "attn_in_norm", "mlp_in": "mlp_in_norm"}
    for index in range(last + 1):
        layer = teacher_layers[index]
        i = by_teacher.get(index)
        groups = plan.get(i, []) if i is not None else []
        specs: dict[str, tuple[nn.Module, str]] = {}
        stats = []
        for g in groups:
            if g.kind in norm_of:
                specs[norm_of[g.kind]] = (a.layer_part(layer, norm_of[g.kind]), "in")
                for p in g.parts:
                    specs[p] = (a.layer_part(layer, p), "out")
                stats.append(_group_stats(a, student_layers[i], g, kept_rows.device))
            else:
                specs[g.kind] = (a.layer_part(layer, g.kind), "in")
                stats.append(ProjectionStats(a.layer_part(layer, g.kind).weight, g.cols, kept_rows))
        report.note(stats)
        recorder = _Recorder(specs, stop=False)
        try:
            for batch in calibration:
                rest, kwargs = batch.layer_args[index]
                values, out = recorder.run(layer, batch.hidden, rest, kwargs)
                if index < last:
                    batch.hidden = out
                for g, s in zip(groups, stats):
                    if g.kind in norm_of:
                        residual = values[norm_of[g.kind]]
                        norm = a.layer_part(student_layers[i], norm_of[g.kind])
                        x = norm(residual.index_select(-1, kept_rows.to(residual.device)))
                        s.add(x, _group_target(a, student_layers[i], g, values, s.bias))
                    else:
                        s.add(values[g.kind])
        finally:
            recorder.close()
        for g, s in zip(groups, stats):
            refit += _write(a, student_layers[i], i, g, *s.solve(cfg.damping))
            report.groups += 1
        del stats
    return refit


def _grams_cover(plan: dict[int, list[_Group]], pmap: PruneMap, grams: dict | None) -> bool:
    """Whether ``grams`` (teacher input Grams by part and teacher layer) hold every group of ``plan``."""
    if not grams:
        return False
    for i, groups in plan.items():
        for g in groups:
            per_layer = grams.get(g.kind)
            if g.cols is None or per_layer is None or per_layer[pmap.kept_layers[i]] is None:
                return False
    return True


def _reconstruct_from_grams(a, student, teacher, pmap, grams, cfg, plan, report) -> list[str]:
    """Teacher mode from the teacher's input Gram matrices ``X^T X`` of the calibration pass, no forward.

    With ``G`` the Gram of the full projection input, ``K`` the kept columns and ``W_R`` the teacher weight
    on the kept rows, the statistics of :class:`ProjectionStats` are ``G[K, K]`` and ``G[K, :] W_R^T``.
    """
    student_layers = a.decoder_layers(student)
    teacher_layers = a.decoder_layers(teacher)
    kept_rows = torch.as_tensor(pmap.kept_hidden, dtype=torch.long)
    report.tokens = int(grams.get("tokens", 0))
    logger.info("reconstruction (teacher inputs, from the calibration Gram matrices): %d layers", len(plan))
    refit: list[str] = []
    for i, groups in plan.items():
        for g in groups:
            gram = grams[g.kind][pmap.kept_layers[i]]
            cols = g.cols.to(gram.device)
            weight = a.layer_part(teacher_layers[pmap.kept_layers[i]], g.kind).weight.detach()
            target = weight.index_select(0, kept_rows.to(weight.device)).to(gram.device, torch.float64)  # [R, N]
            gram_k = gram.index_select(0, cols)
            cross = gram_k @ target.T  # [K, R]
            report.peak_stat_bytes = max(report.peak_stat_bytes, gram_k.numel() * 8 + cross.numel() * 8)
            refit += _write(a, student_layers[i], i, g, solve_refit(gram_k.index_select(1, cols), cross, cfg.damping).T, None)
            report.groups += 1
    return refit


def _reconstruct_sequential(a, student, teacher, pmap, batches, cfg, plan, report) -> list[str]:
    """Sequential mode: student layer by student layer, on the student's own (already re-fitted) stream."""
    student_layers = a.decoder_layers(student)
    teacher_layers = a.decoder_layers(teacher)
    last = max(plan)
    batches = list(batches)
    t_cal = capture_layer_inputs(teacher, batches, pmap.kept_layers[last])
    s_cal = capture_layer_inputs(student, batches, last)
    report.tokens = sum(b.hidden.shape[0] * b.hidden.shape[1] for b in s_cal)
    logger.info("reconstruction (sequential): %d layers on %d calibration tokens", len(plan), report.tokens)
    device = next(student.parameters()).device
    student_input = {"attn_in": "q_proj" if a.q_proj is not None else "qkv_proj",
                     "mlp_in": "gate_proj" if a.gate_proj is not None else "gate_up_proj",
                     "o_proj": "o_proj", "down_proj": "down_proj"}
    refit: list[str] = []
    t_index = 0  # next teacher layer to run on the teacher stream
    for i in range(last + 1):
        j = pmap.kept_layers[i]
        for index in range(t_index, j):  # teacher layers dropped from the student
            _advance(teacher_layers[index], t_cal, index)
        s_layer, t_layer = student_layers[i], teacher_layers[j]
        groups = plan.get(i, [])
        teacher_advanced = False
        for k, g in enumerate(groups):
            stats = _group_stats(a, s_layer, g, device)
            report.note([stats])
            # The last group's teacher pass runs the whole layer and advances the teacher stream.
            advance = k == len(groups) - 1 and i < last
            t_rec = _Recorder({p: (a.layer_part(t_layer, p), "out") for p in g.parts}, stop=not advance)
            s_rec = _Recorder({"x": (a.layer_part(s_layer, student_input[g.kind]), "in")}, stop=True)
            try:
                for tb, sb in zip(t_cal, s_cal):
                    values, t_out = t_rec.run(t_layer, tb.hidden, *tb.layer_args[j])
                    if advance:
                        tb.hidden = t_out
                    x, _ = s_rec.run(s_layer, sb.hidden, *sb.layer_args[i])
                    stats.add(x["x"], _group_target(a, s_layer, g, values, stats.bias))
            finally:
                t_rec.close()
                s_rec.close()
            refit += _write(a, s_layer, i, g, *stats.solve(cfg.damping))
            report.groups += 1
            teacher_advanced = advance
            del stats
        if i < last:
            _advance(s_layer, s_cal, i)
            if not teacher_advanced:
                _advance(t_layer, t_cal, j)
        t_index = j + 1
    return refit


def _advance(layer: nn.Module, calibration: list[_CalibrationBatch], index: int) -> None:
    for batch in calibration:
        rest, kwargs = batch.layer_args[index]
        batch.hidden = _layer_output(layer(batch.hidden, *rest, **kwargs))


@torch.no_grad()
def reconstruct(
    student: nn.Module,
    teacher: nn.Module,
    pmap: PruneMap,
    batches: Iterable[torch.Tensor],
    cfg: ReconstructionConfig,
    *,
    report: ReconstructionReport | None = None,
    teacher_grams: dict | None = None,
) -> list[str]:
    """Re-fit the student's pruned projections in place (see the module docstring).

    ``batches`` yields ``input_ids``. Returns the re-fitted parameter names, also appended to
    ``pmap.refit``; ``report`` (optional) receives the token count and the statistics' peak size.
    ``teacher_grams``: the teacher's o_proj / down_proj input Gram matrices of the same calibration
    batches (``compute_importance(..., gram_out=...)``); a teacher-mode re-fit that only touches those
    projections is then solved from them without running the models.
    """
    cfg.validate()
    if not cfg.enabled:
        return []
    a = get_adapter(teacher)
    if cfg.mode == "auto":
        hidden_cut = len(pmap.kept_hidden) < pmap.teacher["shape"]["hidden_size"]
        cfg = dataclasses.replace(cfg, mode="sequential" if hidden_cut and cfg.refit_inputs else "teacher")
        logger.info("reconstruction: mode auto -> %s", cfg.mode)
    plan = _refit_plan(a, pmap, cfg)
    if not plan:
        logger.info("reconstruction: no block lost input units; nothing to re-fit")
        return []
    report = report if report is not None else ReconstructionReport()
    run = _reconstruct_sequential if cfg.mode == "sequential" else _reconstruct_teacher
    if cfg.mode == "teacher" and _grams_cover(plan, pmap, teacher_grams):
        def run(a, student, teacher, pmap, batches, cfg, plan, report):
            return _reconstruct_from_grams(a, student, teacher, pmap, teacher_grams, cfg, plan, report)
    was_training = (teacher.training, student.training)
    teacher.eval()
    student.eval()
    try:
        refit = run(a, student, teacher, pmap, batches, cfg, plan, report)
    finally:
        teacher.train(was_training[0])
        student.train(was_training[1])
    pmap.refit.extend(n for n in refit if n not in pmap.refit)
    return refit
