"""Saving a pruned student (atomically, safetensors only) and rebuilding it from its teacher and map."""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..models import state_dict_sha256
from .apply import apply_prune_map
from .prune_map import PRUNE_MAP_FILENAME, PruneMap, PruneMapError

logger = logging.getLogger(__name__)

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"


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
    extra_files: dict[str, str] | None = None,
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
            (tmp / name).write_text(text)
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

    When the map records the teacher's ``sha256``, the teacher must match it.
    """
    student_dir = Path(student_dir)
    pmap = PruneMap.load(student_dir)
    expected = pmap.teacher.get("sha256")
    if expected and state_dict_sha256(teacher) != expected:
        raise PruneMapError(
            f"{student_dir} was pruned from another teacher (state-dict sha256 {expected[:12]}...); "
            "load the teacher it was made from"
        )
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
