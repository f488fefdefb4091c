"""Training checkpoints: written to a temporary folder and renamed, the last K kept, exact resume.

A checkpoint folder ``<run_dir>/checkpoints/step-00000042/`` holds what ``accelerator.save_state``
writes (model weights as safetensors, optimizer and scheduler state; the optimizer files are
``torch.save`` files, sharded under FSDP / DeepSpeed as accelerate lays them out), every rank's RNG
states (``rng_state_<rank>.json`` + ``.safetensors``: python, numpy, torch, cuda) and, written last,
``trainer_state.json`` (step, data position, resolved config). A folder without that file is not a
checkpoint; a crash while writing leaves only a ``.tmp-*`` folder and the previous checkpoints intact.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

logger = logging.getLogger(__name__)

STATE_FILE = "trainer_state.json"
_NAME = re.compile(r"^step-(\d{8})$")
_ACCELERATE_RNG = re.compile(r"^random_states_\d+\.pkl$")


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete or does not fit the run resuming from it."""


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _NAME.match(p.name) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))


def latest_checkpoint(root: str | Path) -> Path | None:
    found = list_checkpoints(root)
    return found[-1] if found else None


def read_trainer_state(path: str | Path) -> dict[str, Any]:
    """The JSON state of a checkpoint folder; CheckpointError when it is not a complete checkpoint."""
    file = Path(path) / STATE_FILE
    if not file.is_file():
        raise CheckpointError(f"{path} is not a complete checkpoint (no {STATE_FILE}); pass a step-* folder")
    return json.loads(file.read_text())


# ---------------------------------------------------------------------------------------------- RNG


def _rng_state() -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    py = random.getstate()
    np_state = np.random.get_state()
    meta = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = s
    return meta, tensors


def save_rng_state(folder: Path, rank: int) -> None:
    """This rank's python / numpy / torch / cuda RNG states as JSON + safetensors."""
    meta, tensors = _rng_state()
    (folder / f"rng_state_{rank}.json").write_text(json.dumps(meta))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / f"rng_state_{rank}.safetensors"))


def load_rng_state(folder: Path, rank: int) -> None:
    meta_file, tensor_file = folder / f"rng_state_{rank}.json", folder / f"rng_state_{rank}.safetensors"
    if not meta_file.is_file() or not tensor_file.is_file():
        raise CheckpointError(
            f"{folder} has no RNG state for rank {rank}; resume with the number of processes it was saved with"
        )
    meta = json.loads(meta_file.read_text())
    version, state, gauss = meta["python"]
    random.setstate((version, tuple(state), gauss))
    kind, keys, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    tensors = load_file(str(tensor_file))
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("cuda.")), key=lambda k: int(k[5:]))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


# ---------------------------------------------------------------------------------------------- save / load


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


def save_checkpoint(accelerator, root: str | Path, step: int, trainer_state: dict[str, Any], *, keep_last: int) -> Path:
    """Write a checkpoint of ``step`` (a collective: every rank calls it) and keep the last ``keep_last``.

    Everything is written into ``root/.tmp-step-N``; the main process writes ``trainer_state.json``
    last and renames the folder, then deletes the oldest complete checkpoints beyond ``keep_last``.
    """
    root = Path(root)
    final = root / checkpoint_name(step)
    tmp = root / f".tmp-{checkpoint_name(step)}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    for f in tmp.iterdir():  # accelerate's pickled RNG states; rng_state_<rank>.* replace them
        if _ACCELERATE_RNG.match(f.name) and f.name.endswith(f"_{accelerator.process_index}.pkl"):
            f.unlink()
    save_rng_state(tmp, accelerator.process_index)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _write_json(tmp / STATE_FILE, {**trainer_state, "step": step, "num_processes": accelerator.num_processes})
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in list_checkpoints(root)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        logger.info("checkpoint saved: %s", final)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator, path: str | Path) -> dict[str, Any]:
    """Restore model, optimizer, scheduler and RNG states from ``path``; returns its trainer state."""
    path = Path(path)
    state = read_trainer_state(path)
    saved_procs = state.get("num_processes", accelerator.num_processes)
    if saved_procs != accelerator.num_processes:
        raise CheckpointError(
            f"{path} was written by {saved_procs} processes; resume with --num_processes {saved_procs}"
        )
    accelerator.load_state(str(path))
    load_rng_state(path, accelerator.process_index)
    return state


def clean_partial_checkpoints(root: str | Path) -> None:
    """Delete ``.tmp-*`` folders left by an interrupted save (main process only)."""
    root = Path(root)
    if root.is_dir():
        for p in root.glob(".tmp-step-*"):
            shutil.rmtree(p, ignore_errors=True)
