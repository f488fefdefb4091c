"""Saving a pruned student (atomically, safetensors only), verifying a student's map, rebuilding from the teacher.

:func:`verify_student_map` is the check every user of a student's ``prune_map.json`` goes through
(the distiller's feature pairing, :func:`rebuild_student`): the map parses and is consistent, fits
this teacher (shape, type, state-dict sha256), its ``student_shape`` agrees with the student's
``config.json``, and, for an untrained student (``student_weights="pruned"``), sampled rows of every
student tensor equal the teacher slices the map names. Any mismatch is a :class:`PruneMapError`
naming the file and the fix.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import weakref
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from transformers import AutoConfig, PreTrainedModel, PreTrainedTokenizerBase

from ..adapters import get_adapter
from ..models import state_dict_sha256
from .apply import _param_slice, apply_prune_map, check_map_fits, rescaled_parameter_names, slice_plan
from .prune_map import PRUNE_MAP_FILENAME, PruneMap, PruneMapError

logger = logging.getLogger(__name__)

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
SAMPLED_ROWS = 4
"""Rows of each student tensor compared with the teacher slice the map names (all of a 1-D tensor)."""

_sha_cache: "weakref.WeakKeyDictionary[nn.Module, tuple[tuple, str]]" = weakref.WeakKeyDictionary()


def _check_extra_files(extra_files: dict[str, str]) -> None:
    reserved = {PRUNE_MAP_FILENAME, "config.json", "generation_config.json", SAFETENSORS_SINGLE, SAFETENSORS_INDEX}
    for name in extra_files:
        if not name or Path(name).name != name or name in (".", ".."):
            raise ValueError(f"extra file name {name!r} must be a plain file name (no folders)")
        if name in reserved or name.endswith(".safetensors"):
            raise ValueError(f"extra file name {name!r} would overwrite a file of the checkpoint")


def save_student(
    student: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase | None,
    pmap: PruneMap,
    output_dir: str | Path,
    *,
    overwrite: bool = False,
    extra_files: dict[str, str | bytes] | None = None,
) -> Path:
    """Write the student (safetensors), tokenizer, ``prune_map.json``, generation config and ``extra_files``.

    Everything is written to a temporary folder next to ``output_dir`` and renamed into place, so a
    crash never leaves a half-written output. An existing non-empty ``output_dir`` is refused
    unless ``overwrite``; then the old folder is replaced only once the new one is complete.
    """
    output_dir = Path(output_dir)
    extra_files = dict(extra_files or {})
    _check_extra_files(extra_files)
    pmap.validate()
    exists = output_dir.exists()
    if exists and not output_dir.is_dir():
        raise FileExistsError(f"{output_dir} exists and is not a folder")
    non_empty = exists and any(output_dir.iterdir())
    if non_empty and not overwrite:
        raise FileExistsError(f"{output_dir} is not empty; pass overwrite=True (or choose another output folder)")
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.tmp-", dir=output_dir.parent))
    try:
        student.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        pmap.save(tmp)
        for name, text in extra_files.items():
            (tmp / name).write_bytes(text) if isinstance(text, bytes) else (tmp / name).write_text(text)
        leftovers = [p.name for p in tmp.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".pkl")]
        if leftovers:
            raise RuntimeError(f"refusing to publish pickled files {leftovers}; safetensors only")
        if non_empty:
            old = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.old-", dir=output_dir.parent))
            os.replace(output_dir, old / output_dir.name)
            os.replace(tmp, output_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, output_dir)  # also replaces an empty folder
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("saved pruned student to %s", output_dir)
    return output_dir


def _safetensors_files(folder: Path) -> dict[str, Path]:
    """Tensor name -> safetensors file holding it, for a single or sharded checkpoint."""
    index = folder / SAFETENSORS_INDEX
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: folder / file for name, file in weight_map.items()}
    single = folder / SAFETENSORS_SINGLE
    if not single.is_file():
        raise FileNotFoundError(f"{folder} has no {SAFETENSORS_SINGLE} or {SAFETENSORS_INDEX}")
    with safe_open(single, framework="pt") as f:
        return {name: single for name in f.keys()}


def load_tensors(folder: str | Path, names: list[str]) -> dict[str, torch.Tensor]:
    """Read the named tensors from a safetensors checkpoint folder."""
    files = _safetensors_files(Path(folder))
    missing = [n for n in names if n not in files]
    if missing:
        raise PruneMapError(f"{folder} lacks the re-fitted tensors {missing} listed in its prune map")
    out: dict[str, torch.Tensor] = {}
    for path in sorted({files[n] for n in names}):
        with safe_open(path, framework="pt") as f:
            for n in names:
                if files[n] == path:
                    out[n] = f.get_tensor(n)
    return out


@torch.no_grad()
def rebuild_student(teacher: PreTrainedModel, student_dir: str | Path) -> PreTrainedModel:
    """The student of ``student_dir`` rebuilt from ``teacher``: the map applied, re-fitted tensors loaded.

    The map is verified first (:func:`verify_student_map`: teacher shape and ``sha256``, student shape,
    the folder's weights against the slices);
    the map of a trained model (``student_weights="trained"``, e.g. a distilled run's ``model/``) is
    refused, since rebuilding it would put teacher slices where the weights were trained.
    """
    student_dir = Path(student_dir)
    pmap = PruneMap.load(student_dir)
    if pmap.student_weights == "trained":
        raise PruneMapError(
            f"{student_dir / PRUNE_MAP_FILENAME} is the map of the initial student of a trained model "
            "(student_weights='trained'): rebuilding from the teacher would mix teacher slices with trained weights. "
            f"Load {student_dir} with from_pretrained instead; to rebuild the initial student, use the run's "
            "student_init/ folder"
        )
    pmap = verify_student_map(teacher, student_dir)  # also catches an older trained model's unmarked map
    student = apply_prune_map(teacher, pmap)
    params = dict(student.named_parameters())
    unknown = [n for n in pmap.refit if n not in params]
    if unknown:
        raise PruneMapError(f"prune map lists re-fitted parameters the student does not have: {unknown}")
    for name, value in load_tensors(student_dir, pmap.refit).items():
        param = params[name]
        if value.shape != param.shape:
            raise PruneMapError(f"{name}: checkpoint has shape {tuple(value.shape)}, the map gives {tuple(param.shape)}")
        param.copy_(value.to(param.device, param.dtype))
    return student


# ---------------------------------------------------------------------------------------------- verification


def teacher_sha256(model: nn.Module) -> str:
    """:func:`~minidistill.models.state_dict_sha256` of ``model``, computed once while its tensors are unchanged.

    The hash reads every byte of the model (about 0.7 s for the 135M bundled teacher on 2 cores); it is
    cached per model object and recomputed when a tensor is replaced or modified in place.
    """
    key = tuple((t.data_ptr(), t._version) for t in model.state_dict().values())
    hit = _sha_cache.get(model)
    if hit is not None and hit[0] == key:
        return hit[1]
    digest = state_dict_sha256(model)
    _sha_cache[model] = (key, digest)
    return digest


@torch.no_grad()
def weight_mismatches(teacher: PreTrainedModel, pmap: PruneMap, student_dir: str | Path, *, limit: int = 3) -> list[str]:
    """Student tensors of ``student_dir`` whose sampled rows are not the teacher slices ``pmap`` names.

    Re-fitted (``pmap.refit``) and rescaled tensors are skipped. Cheap: :data:`SAMPLED_ROWS` rows per
    tensor are read from the safetensors files; same-dtype slices must be bit-exact, others equal to
    1e-2 relative.
    """
    folder = Path(student_dir)
    try:
        files = _safetensors_files(folder)
    except FileNotFoundError:
        return []  # no weights to compare (loading the student reports that)
    a = get_adapter(teacher)
    plan = slice_plan(teacher, pmap)
    skip = set(pmap.refit) | set(rescaled_parameter_names(teacher, pmap))
    teacher_tensors = dict(teacher.named_parameters())
    bad: list[str] = []
    handles: dict[Path, object] = {}
    try:
        for name, path in files.items():
            if name in skip:
                continue
            rule = _param_slice(name, plan, a, pmap)
            source = teacher_tensors.get(rule.teacher_name)
            if source is None:
                bad.append(f"{name} (the teacher has no {rule.teacher_name})")
                continue
            if path not in handles:
                handles[path] = safe_open(path, framework="pt")
            sl = handles[path].get_slice(name)
            shape = sl.get_shape()
            source = source.detach().to("cpu")
            if len(shape) == 0:
                continue
            n = shape[0]
            picks = sorted({round(i * (n - 1) / max(SAMPLED_ROWS - 1, 1)) for i in range(SAMPLED_ROWS)}) if len(shape) > 1 else list(range(n))
            got = torch.cat([sl[i : i + 1] for i in picks]) if len(shape) > 1 else sl[:]
            rows = torch.as_tensor(picks, dtype=torch.long)
            if rule.rows is not None:
                if n != len(rule.rows):
                    bad.append(f"{name} (shape {tuple(shape)}, the map gives {len(rule.rows)} rows)")
                    continue
                rows = rule.rows[rows]
            if int(rows.max()) >= source.shape[0]:
                bad.append(f"{name} (rows beyond the teacher's {rule.teacher_name})")
                continue
            want = source.index_select(0, rows)
            if rule.cols is not None and want.dim() > 1:
                want = want.index_select(1, rule.cols)
            if want.shape != got.shape:
                bad.append(f"{name} (shape {tuple(shape)} does not fit the map)")
            elif got.dtype == want.dtype:
                if not torch.equal(got, want):
                    bad.append(name)
            elif not torch.allclose(got.float(), want.float(), rtol=1e-2, atol=1e-6):
                bad.append(name)
            if len(bad) >= limit:
                break
    finally:
        handles.clear()
    return bad


def verify_student_map(
    teacher: PreTrainedModel, student_dir: str | Path, *, check_weights: bool = True, trust_remote_code: bool = False
) -> PruneMap:
    """The verified ``prune_map.json`` of ``student_dir`` for distilling from (or rebuilding with) ``teacher``.

    Raises :class:`PruneMapError` naming the file and the fix when the map does not parse or is
    inconsistent, was made for a teacher of another shape, type or state-dict hash, gives a student
    shape that contradicts the student's ``config.json``, or (``student_weights="pruned"`` and
    ``check_weights``) the student's weights are not the slices it names.
    """
    folder = Path(student_dir)
    path = folder / PRUNE_MAP_FILENAME
    pmap = PruneMap.load(path)
    other_teacher = (
        f"distill against the teacher this student was pruned from, or delete {path} to use the student "
        "without a map (feature losses then need loss.<term>.pairing.strategy=uniform, last_k or explicit)"
    )
    try:
        check_map_fits(teacher, pmap)
    except PruneMapError as e:
        raise PruneMapError(f"{path}: {e}; {other_teacher}") from None
    config_file = folder / "config.json"
    if config_file.is_file():
        try:
            config = AutoConfig.from_pretrained(str(folder), trust_remote_code=trust_remote_code)
            shape = get_adapter(config).shape(config)
        except (OSError, ValueError, KeyError) as e:
            raise PruneMapError(f"cannot read the student shape from {config_file}: {e}") from None
        differ = {k: (pmap.student_shape.get(k), v) for k, v in shape.items() if pmap.student_shape.get(k) != v}
        if differ:
            listing = ", ".join(f"{k}: map {m}, config {c}" for k, (m, c) in differ.items())
            raise PruneMapError(
                f"{path}: student_shape contradicts {config_file} ({listing}); the map belongs to another student "
                f"or was edited: put the student's own prune_map.json back, or delete {path} to use the student without a map"
            )
    expected = pmap.teacher.get("sha256")
    if expected:
        actual = teacher_sha256(teacher)
        if actual != expected:
            raise PruneMapError(
                f"{path} was made from another teacher: its teacher sha256 is {expected[:12]}..., this teacher's "
                f"{actual[:12]}... (same shape, other weights, or loaded in another dtype than at pruning); {other_teacher}"
            )
    elif check_weights and pmap.student_weights == "trained":
        logger.warning("%s records no teacher sha256 and the student was trained: its teacher cannot be verified", path)
    if check_weights and pmap.student_weights == "pruned":
        bad = weight_mismatches(teacher, pmap, folder)
        if bad:
            raise PruneMapError(
                f"{path}: the student's weights are not the teacher slices the map names ({', '.join(bad)}): "
                "its kept layers / heads / neurons / channels were edited, or it belongs to another student or teacher. "
                "Re-create the map by pruning again (recipes/prune.py); for a student trained after pruning set "
                '"student_weights": "trained" in the map'
            )
    return pmap
