"""The final model as a plain Hugging Face folder, gathered whatever the sharding, written via temp + rename.

``<run_dir>/model/`` holds ``config.json``, safetensors weights, the tokenizer, ``prune_map.json`` (when
the student has one), ``training_metadata.json`` and, with early exits, ``exits/``. LoRA adapters are merged into the weights.

The exported ``prune_map.json`` is the map of the *initial* student, marked ``"student_weights":
"trained"``: its layer / head / neuron / channel origins still pair the model with its teacher, but
:func:`minidistill.prune.save.rebuild_student` refuses it (the weights are no longer teacher slices;
the run's ``student_init/`` keeps the rebuildable map).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

from torch import nn

from ..prune.prune_map import PruneMap

logger = logging.getLogger(__name__)

METADATA_FILE = "training_metadata.json"
STUDENT_PREFIX = "student."


def swap_in(tmp: Path, out_dir: Path) -> None:
    """Make the finished folder ``tmp`` (a sibling of ``out_dir``) be ``out_dir``, replacing any old one by renames."""
    if out_dir.exists():
        old = out_dir.with_name(f".old-{out_dir.name}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out_dir)


def copy_folder(src: Path, out_dir: Path) -> None:
    """Copy the folder ``src`` to ``out_dir`` through a temporary sibling (never a half-written ``out_dir``)."""
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{out_dir.name}-", dir=out_dir.parent))
    try:
        shutil.copytree(src, tmp, dirs_exist_ok=True, symlinks=True)
        swap_in(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def export_student(
    accelerator,
    module: nn.Module,
    out_dir: str | Path,
    *,
    tokenizer,
    prune_map: PruneMap | None,
    metadata: dict[str, Any],
    peft_model: nn.Module | None = None,
    role: str = "student",
) -> Path | None:
    """Write the trained student to ``out_dir`` (a collective; returns the path on the main process).

    The full state dict comes from :func:`minidistill.training.placement.unwrap_full_state_dict`; only the
    entries of ``role`` are kept (the objective's projections stay in the checkpoints). ``role`` is the
    trainable model's path in the module: ``student``, or ``peers.<i>`` for peer ``i + 1`` of a mutual run.
    """
    from .placement import unwrap_full_state_dict

    full = unwrap_full_state_dict(accelerator, module)
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return None
    out_dir = Path(out_dir)
    unwrapped = accelerator.unwrap_model(module)
    if peft_model is not None:
        # LoRA runs are single-process or replicated: the unwrapped student holds the trained adapters.
        student = peft_model.merge_and_unload()
        state = {k: v.detach().cpu() for k, v in student.state_dict().items()}
    else:
        student = unwrapped.get_submodule(role)
        prefix = STUDENT_PREFIX if role == "student" else f"{role}."
        state = {k[len(prefix) :]: v for k, v in full.items() if k.startswith(prefix)}
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{out_dir.name}-", dir=out_dir.parent))
    try:
        student.save_pretrained(tmp, state_dict=state, safe_serialization=True)
        heads = getattr(unwrapped, "exits", None)
        if heads is not None and role == "student":  # early exits, next to the plain model
            from ..adapters import get_adapter
            from ..distill.exits import save_exits

            save_exits(heads, {k[len("exits."):]: v for k, v in full.items() if k.startswith("exits.")}, tmp,
                       final_norm=get_adapter(student).final_norm)
        tokenizer.save_pretrained(tmp)
        if prune_map is not None:
            replace(prune_map, student_weights="trained").save(tmp)
        (tmp / METADATA_FILE).write_text(json.dumps(metadata, indent=1, default=str) + "\n")
        swap_in(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("distilled model saved to %s", out_dir)
    return out_dir
