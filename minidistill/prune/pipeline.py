"""The pruning pipeline: checks, calibration, target or budget search, reconstruction, (optional) save.

Every check (config, architecture, target shape or budget, calibration and held-out data, output
folder) runs before the calibration pass. Calibration uses the first ``data.train`` blocks, search
scoring the last ones (``prune.search.score_on=train_tail``) or the first ``data.heldout`` blocks.

Several processes (``shard``, :class:`~.distributed.CalibrationShard`): every rank calls
:func:`prune_model` with the same teacher, data and config. The calibration pass (unit importance,
layer-similarity statistics, the o_proj / down_proj Gram matrices of teacher-mode re-fits, Taylor
gradients) is split: each rank runs its blocks ``rank::world`` and the sums are all-reduced, so every
rank holds the one-process statistics and derives the same student from them. The budget search's
scores are split the same way (:func:`~.targets.make_score_fn`: each rank scores its share of the scoring
batches, the sums are all-reduced); the other later steps (layer loss scores, re-fits, the short
distillation) run whole on every rank. Only rank 0 writes files (the student folder and the importance
cache). The later steps' time is estimated after the calibration from its measured speed (:mod:`.estimate`),
and a distributed prune warns when their longest stretch without a collective exceeds the process group's
timeout (``collective_timeout_s``).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..adapters import count_parameters, get_adapter
from ..config import ConfigBase, ConfigError
from ..data import DataError, TextData, TokenBlocks
from ..distill.teacher_cache import TeacherCache
from ..errors import OutputError
from ..models import state_dict_sha256
from .distill_rank import check_distill_data, distill_rank
from .distributed import SINGLE, CalibrationShard
from .estimate import LayerPasses, PruneEstimate, count_layer_passes, passes_after_calibration, report_estimate
from .importance import ImportanceConfig, compute_importance, importance_batches
from .layer_importance import LAYER_METHODS, LOSS_METHODS, SIMILARITY_METHODS, LayerSimilarity, layer_loss_scores, layer_scores
from .prune_map import PruneMap
from .reconstruct import ReconstructionConfig, reconstruct
from .sensitivity import SENSITIVITY_MD, SENSITIVITY_PNG, measure_sensitivity, sensitivity_shapes
from .targets import (
    SHAPE_TARGET_KEYS,
    ParamCounter,
    SearchConfig,
    ShapeSpace,
    TargetConfig,
    TargetError,
    budget_params,
    check_budget,
    config_rejects_shape,
    explicit_shape,
    format_rows,
    make_score_fn,
    score_candidates,
    select_candidates,
)
from .types import UnitImportance

logger = logging.getLogger(__name__)

PRUNE_LAYER_METHODS = (*LAYER_METHODS, "unit")


@dataclass
class PruneConfig(ConfigBase):
    """How a teacher is pruned into a student."""

    importance: ImportanceConfig = field(default_factory=ImportanceConfig)
    """Unit importance method and aggregation."""
    layer_method: str = "block_influence"
    """Layer importance for depth pruning: ``block_influence`` (ShortGPT, one-shot), ``contiguous`` (best contiguous block by angular distance, Gromov et al.; ``angular`` is the same), ``lm_loss`` (one-shot loss increase when a layer is skipped), ``iterative`` (greedy removal re-measuring the loss after each removal) or ``unit`` (the importance method's own layer scores). The prune map's ``importance.layer_method`` records it."""
    layer_loss_blocks: int = 4
    """Calibration blocks per loss evaluation for ``layer_method=lm_loss`` (one evaluation per layer) and ``iterative`` (one per remaining layer per removal)."""
    calib_blocks: int = 64
    """Training blocks used for calibration (importance and reconstruction)."""
    target: TargetConfig = field(default_factory=lambda: TargetConfig(params=0.5))
    """A parameter budget or an explicit shape."""
    search: SearchConfig = field(default_factory=SearchConfig)
    """Candidate enumeration and scoring for a budget."""
    reconstruction: ReconstructionConfig = field(default_factory=ReconstructionConfig)
    """Least-squares re-fit of the pruned output projections after selection."""
    output_dir: str | None = None
    """Save the student here (HF folder + prune_map.json); None: only return it."""
    overwrite: bool = False
    """Replace a non-empty ``output_dir``."""
    show_progress: bool = True
    """tqdm bar over the calibration batches."""
    device: str = "auto"
    """Where pruning runs (the teacher is moved there and back; the student is returned on the teacher's
    device): ``auto`` (the process's accelerator device in the recipe; elsewhere CUDA when available, else
    CPU) or a torch device string (``cpu``, ``cuda``, ``cuda:1``, ``mps``). It does not change the result
    beyond floating-point rounding, so a saved student is reused whatever device made it."""

    def validate(self) -> None:
        for section in (self.importance, self.target, self.search, self.reconstruction):
            section.validate()
        if self.layer_method not in PRUNE_LAYER_METHODS:
            raise ConfigError(f"prune.layer_method={self.layer_method!r}: choose one of {list(PRUNE_LAYER_METHODS)}")
        if self.calib_blocks < 1:
            raise ConfigError(f"prune.calib_blocks={self.calib_blocks}: must be >= 1")
        if self.layer_loss_blocks < 1:
            raise ConfigError(f"prune.layer_loss_blocks={self.layer_loss_blocks}: must be >= 1")
        if self.device != "auto":
            try:
                torch.device(self.device)
            except (RuntimeError, TypeError):
                raise ConfigError(
                    f"prune.device={self.device!r} is not a device: use auto, cpu, cuda, cuda:<index> or mps"
                ) from None


def resolve_prune_device(setting: str, default: torch.device | str | None = None) -> torch.device:
    """The device ``prune.device`` names: ``auto`` is ``default`` when given, else CUDA when available, else CPU.

    ConfigError when the named device is not available on this machine.
    """
    if setting == "auto":
        if default is not None:
            return torch.device(default)
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(setting)
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0 or (device.index is not None and device.index >= count):
            raise ConfigError(
                f"prune.device={setting!r}: this machine has {count} CUDA device(s); use auto or cpu"
                + (f", or an index below {count}" if count else "")
            )
    elif device.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ConfigError(f"prune.device={setting!r}: MPS is not available on this machine; use auto or cpu")
    return device


@dataclass
class PruneResult:
    """The pruned student and how it was made."""

    student: PreTrainedModel
    prune_map: PruneMap
    candidates: list[dict[str, Any]]
    timings: dict[str, float]
    params_before: int
    params_after: int
    non_embedding_params_before: int
    non_embedding_params_after: int
    target_params: int | None = None
    output_dir: Path | None = None
    estimate: PruneEstimate | None = None
    """The steps after calibration, counted and priced at the calibration's speed (:mod:`.estimate`)."""


def check_output_dir(
    output_dir: str | Path | None, overwrite: bool, *, sources: tuple[str | Path, ...] = ()
) -> None:
    """Refuse an output folder that cannot take the result, before any computation.

    Refused: an existing non-empty folder unless ``overwrite``; a folder that is, holds or lies
    inside one of ``sources`` (the model folders read), even with ``overwrite``; a path under a
    file; a folder that cannot be written.
    """
    if output_dir is None:
        return
    path = Path(output_dir).expanduser()
    resolved = path.resolve()
    for source in sources:
        src = Path(source).expanduser()
        if not src.exists():
            continue
        src = src.resolve()
        if resolved == src or src.is_relative_to(resolved) or resolved.is_relative_to(src):
            raise OutputError(
                f"output folder {path} is (or overlaps) the source model folder {source}; it would replace the "
                "model it reads, so it is refused even with overwrite; choose another output folder"
            )
    if path.exists() and not path.is_dir():
        raise OutputError(f"output {path} exists and is not a folder; choose another output folder")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise OutputError(f"output folder {path} exists and is not empty; pass overwrite (--overwrite) to replace it")
    check_writable(path)


def check_writable(path: str | Path) -> None:
    """OutputError when ``path`` (or the nearest existing folder above it) cannot be written."""
    path = Path(path).expanduser()
    parent = path
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise OutputError(f"output {path}: {parent} is a file, not a folder; choose another output folder")
    probe = None
    try:
        if os.access(parent, os.W_OK | os.X_OK):
            fd, probe = tempfile.mkstemp(prefix=".minidistill-write-test-", dir=parent)
            os.close(fd)
        else:
            raise PermissionError
    except OSError:
        raise OutputError(f"output {path}: folder {parent} is not writable; choose a writable output folder") from None
    finally:
        if probe is not None:
            os.unlink(probe)


def check_data(data: TextData, cfg: PruneConfig, *, searches: bool) -> None:
    """Clear errors for calibration / search-scoring data that cannot serve the run."""
    train = data.train.input_ids
    if train.ndim != 2 or train.shape[0] == 0:
        raise DataError("calibration data is empty: data.train holds no block; use more text or a smaller seq_len")
    if train.shape[1] < 2:
        raise DataError(f"calibration blocks hold {train.shape[1]} token(s); need at least 2 per sequence")
    if not searches:
        return
    search = cfg.search
    if search.score_on == "heldout":
        if len(data.heldout) == 0:
            raise DataError("prune.search.score_on=heldout, but data.heldout is empty; use score_on=train_tail "
                            "or give held-out text")
        return
    if len(data.train) < cfg.calib_blocks + search.score_blocks:
        raise DataError(
            f"prune.search.score_on=train_tail scores on the last {search.score_blocks} of data.train's "
            f"{len(data.train)} blocks, which must not overlap the first {cfg.calib_blocks} (calibration); "
            f"lower prune.calib_blocks or prune.search.score_blocks, use more training text (with data.streaming, "
            f"raise data.sample_blocks), or set prune.search.score_on=heldout")


def scoring_blocks(data: TextData, search: SearchConfig) -> TokenBlocks:
    """The blocks the budget search scores candidates on (``search.score_on``)."""
    if search.score_on == "heldout":
        return TokenBlocks(data.heldout.input_ids[: search.score_blocks])
    return TokenBlocks(data.train.input_ids[-search.score_blocks :])


def _progress(enabled: bool, desc: str):
    """A tqdm wrapper on the main process (``RANK`` 0 or unset), else None."""
    if not enabled or int(os.environ.get("RANK", "0")) != 0:
        return None
    return lambda it: tqdm(it, desc=desc, leave=False)


def prune_model(
    teacher: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase | None,
    data: TextData,
    cfg: PruneConfig,
    *,
    teacher_source: str,
    shard: CalibrationShard = SINGLE,
    device: torch.device | str | None = None,
    teacher_cache: TeacherCache | None = None,
    collective_timeout_s: float | None = None,
) -> PruneResult:
    """Prune ``teacher`` to ``cfg.target`` (a shape, or the best searched shape within a budget).

    ``shard``: this process's share of a distributed calibration (see the module docstring); only its
    rank 0 saves to ``cfg.output_dir``. ``device``: what ``prune.device=auto`` means here (the caller's
    accelerator device; None: CUDA when available, else CPU). Pruning runs on ``prune.device``; the
    teacher is moved back afterwards and the student is returned on the teacher's device.
    ``teacher_cache``: the teacher's top-k over ``data.train``, read by the short-distillation ranking
    (``search.distill_steps``) instead of teacher forwards. ``collective_timeout_s``: the process group's
    timeout; a distributed prune whose steps after calibration are estimated to take longer logs a warning.
    """
    cfg.validate()
    target = resolve_prune_device(cfg.device, device)
    home = next(teacher.parameters()).device
    if target == home:
        return _prune_model(teacher, tokenizer, data, cfg, teacher_source=teacher_source, shard=shard, teacher_cache=teacher_cache,
                            collective_timeout_s=collective_timeout_s)
    logger.info("pruning on %s (the teacher is on %s)", target, home)
    teacher.to(target)
    try:
        result = _prune_model(teacher, tokenizer, data, cfg, teacher_source=teacher_source, shard=shard,
                              teacher_cache=teacher_cache, collective_timeout_s=collective_timeout_s)
    finally:
        teacher.to(home)
    result.student.to(home)
    return result


def _prune_model(
    teacher: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase | None,
    data: TextData,
    cfg: PruneConfig,
    *,
    teacher_source: str,
    shard: CalibrationShard,
    teacher_cache: TeacherCache | None = None,
    collective_timeout_s: float | None = None,
) -> PruneResult:
    timings: dict[str, float] = {}
    t_start = time.perf_counter()
    cfg.validate()
    adapter = get_adapter(teacher)  # unsupported / MoE architectures fail here
    teacher_shape = adapter.shape(teacher.config)
    if not shard.is_main:
        cfg = cfg.replace(output_dir=None)
    check_output_dir(cfg.output_dir, cfg.overwrite)
    check_data(data, cfg, searches=cfg.target.is_budget)
    params_before = count_parameters(teacher)
    ne_before = count_parameters(teacher, non_embedding=True)

    space = None
    budget = None
    shape = None
    if cfg.target.is_budget:
        counter = ParamCounter(teacher.config, non_embedding=cfg.target.non_embedding)
        full = ne_before if cfg.target.non_embedding else params_before
        budget = budget_params(full, cfg.target.params)
        space = ShapeSpace(counter, cfg.search)
        check_budget(space, budget)
        check_distill_data(cfg.search, len(data.train))
        layer_drops = [teacher_shape["num_layers"] - space.min_layers]  # sensitivity stops at min_layers too
        logger.info("budget %s parameters%s", f"{budget:,}", " (non-embedding)" if cfg.target.non_embedding else "")
    else:
        shape = explicit_shape(teacher_shape, cfg.target)
        rejection = config_rejects_shape(teacher.config, shape)
        if rejection:
            raise TargetError(f"target shape {shape} cannot be saved as a {teacher.config.model_type} checkpoint: {rejection}")
        layer_drops = [teacher_shape["num_layers"] - shape["num_layers"]]
    timings["checks_s"] = time.perf_counter() - t_start

    # ---- calibration (one forward for activation importance and layer statistics)
    t0 = time.perf_counter()
    calibration = data.train.input_ids[: cfg.calib_blocks]
    teacher_grams: dict = {}  # o_proj / down_proj input Grams: teacher-mode re-fits of every candidate without a forward
    with count_layer_passes(teacher) as calibration_passes:
        units, similarity = compute_importance(
            teacher, calibration, cfg.importance, layer_stats=cfg.layer_method in SIMILARITY_METHODS,
            progress=_progress(cfg.show_progress, "calibration"),
            gram_out=teacher_grams if cfg.reconstruction.enabled and cfg.reconstruction.mode != "sequential" else None,
            shard=shard,
        )
    timings["importance_s"] = time.perf_counter() - t0
    t_after = time.perf_counter()
    estimate = PruneEstimate(
        _passes_after_calibration(cfg, data, teacher_shape, space, budget, shape,
                                  calib_blocks=int(calibration.shape[0]), max_drop=max(layer_drops),
                                  teacher_grams=bool(teacher_grams), teacher_cache=teacher_cache is not None, shard=shard),
        calibration_passes, timings["importance_s"])
    report_estimate(estimate, distributed=shard.distributed, timeout_s=collective_timeout_s)
    if estimate.seconds is not None:
        timings["estimate_after_calibration_s"] = estimate.seconds
    loss_increase, layer_record = None, {}
    drops = layer_drops
    if cfg.layer_method in LOSS_METHODS and any(drops):
        t0 = time.perf_counter()
        loss_increase, layer_record = layer_loss_scores(
            cfg.layer_method, teacher, importance_batches(calibration[: cfg.layer_loss_blocks], cfg.importance.batch_size),
            max_drop=max(drops))
        timings["layer_loss_s"] = time.perf_counter() - t0

    teacher_info = {"source": teacher_source, "sha256": state_dict_sha256(teacher),
                    "model_type": teacher.config.model_type, "shape": dict(teacher_shape)}
    settings = {**units.settings, "layer_method": cfg.layer_method, **layer_record}
    calib_batches = importance_batches(calibration, cfg.importance.batch_size)

    def build(target_shape: dict[str, int], with_reconstruction: bool) -> tuple[nn.Module, PruneMap]:
        from .apply import apply_prune_map
        from .select import select_units

        scores = units_for_shape(units, similarity, cfg.layer_method, teacher_shape, target_shape, loss_increase)
        pmap = select_units(teacher, scores, target_shape, teacher_info=teacher_info, importance_settings=settings)
        student = apply_prune_map(teacher, pmap)
        if with_reconstruction and cfg.reconstruction.enabled:
            reconstruct(student, teacher, pmap, calib_batches, cfg.reconstruction, teacher_grams=teacher_grams)
        return student, pmap

    rows: list[dict[str, Any]] = []
    extra_files: dict[str, str | bytes] = {}
    t0 = time.perf_counter()
    if space is not None:
        student, pmap, rows, extra_files = _search(teacher, data, cfg, space, budget, build, calib_batches, timings,
                                                   full_params=ne_before if cfg.target.non_embedding else params_before,
                                                   teacher_cache=teacher_cache, teacher_grams=teacher_grams, shard=shard)
        t0 = time.perf_counter() - timings["winner_reconstruction_s"]
    else:
        student, pmap = build(shape, True)
    timings["prune_s"] = time.perf_counter() - t0
    timings["after_calibration_s"] = time.perf_counter() - t_after
    if estimate.seconds is not None:
        logger.info("pruning steps after calibration: %.1f s (estimated %.1f s)", timings["after_calibration_s"],
                    estimate.seconds)
    student.eval()

    out_path = None
    if cfg.output_dir is not None:
        from .save import save_student

        if tokenizer is None:
            raise ValueError("saving a student needs its tokenizer")
        out_path = save_student(student, tokenizer, pmap, cfg.output_dir, overwrite=cfg.overwrite,
                                extra_files={"prune_config.json": _json(cfg.to_dict()), **extra_files})
    timings["total_s"] = time.perf_counter() - t_start
    res = PruneResult(
        student=student, prune_map=pmap, candidates=rows, timings=timings,
        params_before=params_before, params_after=count_parameters(student),
        non_embedding_params_before=ne_before, non_embedding_params_after=count_parameters(student, non_embedding=True),
        target_params=budget, output_dir=out_path, estimate=estimate,
    )
    logger.info("pruned %s -> %s: %s -> %s parameters (%s -> %s non-embedding)",
                _shape_str(teacher_shape), _shape_str(pmap.student_shape), f"{res.params_before:,}",
                f"{res.params_after:,}", f"{ne_before:,}", f"{res.non_embedding_params_after:,}")
    return res


def _passes_after_calibration(
    cfg: PruneConfig,
    data: TextData,
    teacher_shape: dict[str, int],
    space: ShapeSpace | None,
    budget: int | None,
    shape: dict[str, int] | None,
    *,
    calib_blocks: int,
    max_drop: int,
    teacher_grams: bool,
    teacher_cache: bool,
    shard: CalibrationShard = SINGLE,
) -> LayerPasses:
    """:func:`~.estimate.passes_after_calibration` for an explicit ``shape`` or a search of ``space`` within
    ``budget``; the candidates are those the balance pre-score picks (no forward: a sensitivity pre-score
    may pick others). The scoring blocks are this rank's share (:func:`~.targets.make_score_fn`)."""
    counts = {"calib_blocks": calib_blocks, "max_drop": max_drop, "teacher_grams": teacher_grams,
              "teacher_cache": teacher_cache}
    if space is None:
        return passes_after_calibration(cfg, teacher_shape, target=shape, **counts)
    search = cfg.search
    candidates = select_candidates(ShapeSpace(space.counter, search), budget, log=False).candidates
    sensitivity = [s for _, _, s in sensitivity_shapes(teacher_shape, search.sensitivity_ratios, search.multiple_of,
                                                        min_layers=space.min_layers)] if search.sensitivity else []
    return passes_after_calibration(cfg, teacher_shape, candidates=candidates, sensitivity=sensitivity,
                                    score_blocks=_rank_scoring_blocks(data, search, shard), **counts)


def _rank_scoring_blocks(data: TextData, search: SearchConfig, shard: CalibrationShard) -> int:
    """The scoring blocks in this rank's batches (batches ``rank::world`` of ``search.batch_size`` blocks)."""
    batches = list(scoring_blocks(data, search).batches(search.batch_size))
    return sum(int(b.shape[0]) for b in batches[shard.rank :: shard.world])


def _search(
    teacher: PreTrainedModel,
    data: TextData,
    cfg: PruneConfig,
    space: ShapeSpace,
    budget: int,
    build,
    calib_batches: list[torch.Tensor],
    timings: dict[str, float],
    *,
    full_params: int,
    teacher_cache: TeacherCache | None = None,
    teacher_grams: dict | None = None,
    shard: CalibrationShard = SINGLE,
) -> tuple[nn.Module, PruneMap, list[dict[str, Any]], dict[str, str | bytes]]:
    """Sensitivity, enumeration, zero-shot scoring, optional short-distillation ranking, winner's reconstruction
    (teacher mode: from the calibration's ``teacher_grams`` where they hold its inputs, without a forward)."""
    search = cfg.search
    teacher_shape = space.teacher_shape
    t0 = time.perf_counter()
    scoring = list(scoring_blocks(data, search).batches(search.batch_size))
    score_fn = make_score_fn(teacher, scoring, search, shard=shard)  # the scoring batches split over the ranks
    sens, prescore, files = None, None, {}
    if search.sensitivity:
        base = 0.0 if search.score == "kl" else score_fn(teacher)
        refit = search.reconstruct if search.sensitivity_reconstruct is None else search.sensitivity_reconstruct
        sens = measure_sensitivity(build, score_fn, teacher_shape, base=base, ratios=search.sensitivity_ratios,
                                   multiple_of=search.multiple_of, reconstruct=refit, score=search.score,
                                   min_layers=space.min_layers)
        timings["sensitivity_s"] = time.perf_counter() - t0
        logger.info("per-axis sensitivity:\n%s", sens.markdown())

        def prescore(shape: dict[str, int], params: int) -> float:
            return sens.predict(teacher_shape, shape) + 1e-3 * (budget - params) / budget

        files[SENSITIVITY_MD] = sens.markdown()
        files[SENSITIVITY_PNG] = sens.plot_png()
    t0 = time.perf_counter()
    selection = select_candidates(space, budget, prescore)
    timings["enumerate_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    result = score_candidates(teacher, selection.candidates, build, scoring, search, full_params=full_params,
                              score_fn=score_fn)
    rows, student, pmap, reconstructed = result.rows, result.best_student, result.best_map, result.best_reconstructed
    timings["search_s"] = time.perf_counter() - t0
    if search.distill_steps > 0:
        t0 = time.perf_counter()
        del student
        rows, winner = distill_rank(teacher, rows, build, data.train.input_ids, score_fn, search, cache=teacher_cache)
        # The short-distilled weights are discarded: the winner's pruned (+ reconstructed) init is returned.
        student, pmap = build({**{k: winner[k] for k in SHAPE_TARGET_KEYS}, "head_dim": teacher_shape["head_dim"]}, True)
        reconstructed = True
        timings["distill_rank_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    if cfg.reconstruction.enabled and not reconstructed:
        reconstruct(student, teacher, pmap, calib_batches, cfg.reconstruction, teacher_grams=teacher_grams)
    timings["winner_reconstruction_s"] = time.perf_counter() - t0
    pmap.notes["search"] = {
        "budget": budget, "non_embedding": cfg.target.non_embedding, "score": search.score,
        "scored_on": f"{search.score_on} ({search.score_blocks} blocks)",
        "prescore": "sensitivity" if sens is not None else "balance",
        "prescore_spearman": result.prescore_spearman,
        "in_band": selection.in_band, "per_family": selection.per_family,
        "shapes_built": selection.shapes_built, "product_size": selection.product_size,
        "enumerate_s": selection.seconds, "distill_steps": search.distill_steps,
        "candidates": rows,
    }
    if sens is not None:
        pmap.notes["sensitivity"] = sens.to_dict()
    return student, pmap, rows, files


def units_for_shape(
    units: UnitImportance,
    similarity: LayerSimilarity | None,
    layer_method: str,
    teacher_shape: dict[str, int],
    shape: dict[str, int],
    loss_increase: torch.Tensor | None = None,
) -> UnitImportance:
    """``units`` with ``layers`` scored by ``layer_method`` for dropping down to ``shape['num_layers']``.

    ``block_influence`` and ``contiguous`` / ``angular`` come from the calibration forward, ``lm_loss`` and
    ``iterative`` from ``loss_increase`` (:func:`~.layer_importance.layer_loss_scores`); ``unit`` keeps ``units.layers``
    (block influence for activation importance, the baseline's own layer score otherwise).
    """
    num_drop = teacher_shape["num_layers"] - shape["num_layers"]
    if layer_method == "unit" or num_drop == 0:  # every layer is kept: no layer score is read
        return units
    layers = layer_scores(layer_method, num_drop=num_drop, similarity=similarity, loss_increase=loss_increase)
    return dataclasses.replace(units, layers=layers)


def _shape_str(shape: dict[str, int]) -> str:
    return (f"L{shape['num_layers']} D{shape['hidden_size']} H{shape['num_heads']}/KV{shape['num_kv_heads']} "
            f"I{shape['intermediate_size']}")


def _json(obj: Any) -> str:
    import json

    return json.dumps(obj, indent=1, default=str) + "\n"


__all__ = [
    "PruneConfig", "PruneResult", "check_data", "check_output_dir", "format_rows", "prune_model", "resolve_prune_device",
    "units_for_shape",
]
