"""Training checkpoints: written to a temporary folder, sealed by a manifest, renamed; verified before loading.

A checkpoint folder ``<run_dir>/checkpoints/step-00000042/`` holds what ``accelerator.save_state``
writes (the model as safetensors; optimizer and scheduler state as ``torch.save`` files, sharded under
FSDP / DeepSpeed as accelerate lays them out), every rank's RNG states (``rng_state_<rank>.json`` +
``.safetensors``: python, numpy, torch, cuda), ``trainer_state.json`` (step, data position, resolved
config) and, written last, ``manifest.json``: every file of the folder with its size, and the sha256
of the safetensors files and of every small file (under 1 MiB). Each file and the folder are fsynced
before the manifest is written, and the folder is renamed into place only after it.

A folder counts as a checkpoint only with a manifest that matches its files
(:func:`checkpoint_problems`): a crash while writing leaves a ``.tmp-*`` folder, and deleting an old
checkpoint removes its manifest first, so a half-written or half-deleted folder never looks complete.
Resuming the latest checkpoint (:func:`resumable_checkpoint`) skips a damaged one with a warning that
names what is wrong, and falls back to the previous complete one. Checkpoints written before manifests
existed are refused (the message says so): their completeness cannot be told.

Security: accelerate's optimizer / scheduler files and DeepSpeed's ``*_optim_states.pt`` /
``*_model_states.pt`` are pickles (accelerate reads its own with ``torch.load(weights_only=True)``,
DeepSpeed reads its files with full unpickling). A pickle can run code when loaded: resume only from
checkpoint folders you (or your own jobs) wrote. The manifest detects damage, not tampering by someone
who can also rewrite it. Model weights are always safetensors.
"""

from __future__ import annotations

import hashlib
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

from ..errors import MinidistillError

logger = logging.getLogger(__name__)

STATE_FILE = "trainer_state.json"
MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = "minidistill-checkpoint"
MANIFEST_VERSION = 1
HASH_BELOW_BYTES = 1 << 20
"""Files smaller than this are hashed in the manifest (besides every ``*.safetensors`` file)."""
STATE_KEYS = ("step", "tokens", "elapsed_s", "data_position", "config", "num_processes")
_NAME = re.compile(r"^step-(\d{8})$")
_ACCELERATE_RNG = re.compile(r"^random_states_\d+\.pkl$")
_MODEL_WEIGHTS = re.compile(r"^(model(_\d+)?\.safetensors|pytorch_model_fsdp.*|pytorch_model/.+)$")


class CheckpointError(MinidistillError, ValueError):
    """A checkpoint is missing, incomplete, damaged or does not fit the run resuming from it."""


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def _step_folders(root: str | Path) -> list[Path]:
    """Every ``step-N`` folder under ``root`` (complete or not), oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _NAME.match(p.name)]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))


def list_checkpoints(root: str | Path) -> list[Path]:
    """Checkpoints under ``root`` sealed by a manifest, oldest first (cheap: contents not verified)."""
    return [p for p in _step_folders(root) if (p / MANIFEST_FILE).is_file()]


def latest_checkpoint(root: str | Path) -> Path | None:
    """The newest ``step-N`` folder, complete or not (see :func:`resumable_checkpoint` to resume)."""
    found = _step_folders(root)
    return found[-1] if found else None


def _read_json(file: Path, what: str) -> Any:
    if not file.is_file():
        raise CheckpointError(f"{file} is missing ({what})")
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        size = file.stat().st_size
        raise CheckpointError(f"{file} is not valid JSON ({'empty' if size == 0 else f'{size} bytes, {e}'}): {what} is damaged") from None


def read_trainer_state(path: str | Path) -> dict[str, Any]:
    """The parsed ``trainer_state.json`` of a checkpoint folder; CheckpointError naming the file otherwise."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a checkpoint folder; pass a checkpoints/step-* folder")
    state = _read_json(path / STATE_FILE, "the checkpoint's trainer state")
    if not isinstance(state, dict):
        raise CheckpointError(f"{path / STATE_FILE} holds {type(state).__name__}, not a JSON object: the checkpoint is damaged")
    return state


# ---------------------------------------------------------------------------------------------- durability


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(folder: Path) -> None:
    """fsync every file and folder under ``folder`` (and the folder itself)."""
    for dirpath, _dirs, files in os.walk(folder):
        for name in files:
            _fsync_path(Path(dirpath) / name)
        _fsync_path(Path(dirpath))


def write_json_durably(path: Path, data: Any) -> None:
    """Write JSON to ``path`` through a temporary file: written, fsynced, renamed, folder fsynced."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(json.dumps(data, indent=1) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_path(path.parent)


def _sha256(file: Path) -> str:
    h = hashlib.sha256()
    with open(file, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _hashed(rel: str, size: int) -> bool:
    return rel.endswith(".safetensors") or size < HASH_BELOW_BYTES


def _folder_files(folder: Path) -> dict[str, int]:
    """Relative path -> size of every regular file under ``folder`` (the manifest excluded)."""
    out = {}
    for dirpath, _dirs, files in os.walk(folder):
        for name in files:
            p = Path(dirpath) / name
            rel = p.relative_to(folder).as_posix()
            if rel != MANIFEST_FILE:
                out[rel] = p.stat().st_size
    return out


def write_manifest(folder: Path, *, step: int, num_processes: int) -> dict[str, Any]:
    """fsync every file of ``folder``, then write (and fsync) ``manifest.json`` listing them."""
    _fsync_tree(folder)
    files = {}
    for rel, size in sorted(_folder_files(folder).items()):
        entry: dict[str, Any] = {"size": size}
        if _hashed(rel, size):
            entry["sha256"] = _sha256(folder / rel)
        files[rel] = entry
    manifest = {"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "step": step, "num_processes": num_processes, "files": files}
    write_json_durably(folder / MANIFEST_FILE, manifest)
    return manifest


# ---------------------------------------------------------------------------------------------- verification

_verified: dict[str, tuple] = {}  # folder -> stat fingerprint of a folder that verified clean


def _fingerprint(folder: Path) -> tuple:
    out = []
    for dirpath, _dirs, files in os.walk(folder):
        for name in sorted(files):
            st = (Path(dirpath) / name).stat()
            out.append((dirpath, name, st.st_size, st.st_mtime_ns, st.st_ino))
    return tuple(sorted(out))


def checkpoint_problems(path: str | Path) -> list[str]:
    """What makes ``path`` not a complete checkpoint (empty when it is one).

    Checks the manifest (present, parseable), every file it lists (present, same size, same sha256
    where recorded), ``trainer_state.json`` (parseable, with its keys, the manifest's step), the model
    weights and one RNG state pair per process that wrote the checkpoint.
    """
    path = Path(path)
    if not path.is_dir():
        return [f"{path} is not a folder"]
    key = str(path.resolve())
    fingerprint = _fingerprint(path)
    if _verified.get(key) == fingerprint:
        return []
    manifest_file = path / MANIFEST_FILE
    if not manifest_file.is_file():
        legacy = (path / STATE_FILE).is_file()
        return [
            f"no {MANIFEST_FILE}: "
            + ("written by a minidistill before checkpoint manifests, or interrupted while being deleted; its completeness cannot be checked"
               if legacy else "the checkpoint was interrupted while being written or deleted")
        ]
    try:
        manifest = json.loads(manifest_file.read_text(encoding="utf-8"))
        files = manifest["files"]
        if manifest.get("format") != MANIFEST_FORMAT or not isinstance(files, dict):
            raise ValueError("not a checkpoint manifest")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        return [f"{MANIFEST_FILE} is damaged ({e})"]
    problems = []
    for rel, entry in files.items():
        file = path / rel
        if not file.is_file():
            problems.append(f"{rel} is missing")
            continue
        size = file.stat().st_size
        if size != entry.get("size"):
            problems.append(f"{rel} has {size} bytes, the manifest says {entry.get('size')} (truncated or overwritten)")
        elif "sha256" in entry and _sha256(file) != entry["sha256"]:
            problems.append(f"{rel} does not match its sha256 in the manifest (the file is damaged)")
    if not any(_MODEL_WEIGHTS.match(rel) for rel in files):
        problems.append("the manifest lists no model weights (model.safetensors)")
    if STATE_FILE not in files:
        problems.append(f"the manifest lists no {STATE_FILE}")
    elif not any(p.startswith(STATE_FILE) for p in problems):
        try:
            state = read_trainer_state(path)
            missing = [k for k in STATE_KEYS if k not in state]
            if missing:
                problems.append(f"{STATE_FILE} lacks {missing}")
            elif state["step"] != manifest.get("step"):
                problems.append(f"{STATE_FILE} is for step {state['step']}, the manifest for step {manifest.get('step')}")
        except CheckpointError as e:
            problems.append(str(e))
    procs = manifest.get("num_processes")
    if not isinstance(procs, int) or procs < 1:
        problems.append(f"the manifest's num_processes is {procs!r}")
    else:
        for rank in range(procs):
            for suffix in ("json", "safetensors"):
                rel = f"rng_state_{rank}.{suffix}"
                if rel not in files:
                    problems.append(f"{rel} is missing (the checkpoint was written by {procs} processes)")
    if not problems:
        _verified[key] = fingerprint
    return problems


def verify_checkpoint(path: str | Path) -> dict[str, Any]:
    """The trainer state of a complete checkpoint; CheckpointError naming the folder and what is wrong."""
    path = Path(path)
    problems = checkpoint_problems(path)
    if problems:
        raise CheckpointError(
            f"{path} is not a complete checkpoint: {'; '.join(problems)}. "
            "Resume from another checkpoint (--resume PATH), or start the run again under a new run_name"
        )
    return read_trainer_state(path)


def resumable_checkpoint(root: str | Path) -> Path:
    """The newest complete checkpoint under ``root``; damaged newer ones are skipped with a warning.

    CheckpointError when there is none, naming every damaged folder and what is wrong with it.
    """
    root = Path(root)
    damaged: list[tuple[Path, list[str]]] = []
    for folder in reversed(_step_folders(root)):
        problems = checkpoint_problems(folder)
        if not problems:
            for bad, why in damaged:
                logger.warning("checkpoint %s is damaged (%s); resuming from the previous complete one, %s",
                               bad, "; ".join(why), folder.name)
            return folder
        damaged.append((folder, problems))
    if not damaged:
        raise CheckpointError(f"--resume: no complete checkpoint under {root} (the run saved none yet); start it without --resume")
    listing = "; ".join(f"{folder.name}: {', '.join(why)}" for folder, why in damaged)
    raise CheckpointError(
        f"--resume: no complete checkpoint under {root}: {listing}. Restore an intact copy and pass --resume PATH, "
        "or start the run again under a new run_name"
    )


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
    """This rank's python / numpy / torch / cuda RNG states as JSON + safetensors (both fsynced)."""
    meta, tensors = _rng_state()
    write_json_durably(folder / f"rng_state_{rank}.json", meta)
    tensor_file = folder / f"rng_state_{rank}.safetensors"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tensor_file))
    _fsync_path(tensor_file)


def load_rng_state(folder: Path, rank: int) -> None:
    meta_file, tensor_file = folder / f"rng_state_{rank}.json", folder / f"rng_state_{rank}.safetensors"
    for file in (meta_file, tensor_file):
        if not file.is_file():
            raise CheckpointError(f"{file} is missing: the checkpoint {folder} is damaged (it has no RNG state for rank {rank})")
    meta = _read_json(meta_file, f"the RNG state of rank {rank}")
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


def remove_checkpoint(folder: Path) -> None:
    """Delete a checkpoint so that no interruption leaves it looking complete: manifest first, then the rest."""
    manifest = folder / MANIFEST_FILE
    if manifest.exists():
        manifest.unlink()
        _fsync_path(folder)
    doomed = folder.with_name(f".tmp-del-{folder.name}")
    shutil.rmtree(doomed, ignore_errors=True)
    os.replace(folder, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def save_checkpoint(accelerator, root: str | Path, step: int, trainer_state: dict[str, Any], *, keep_last: int) -> Path:
    """Write a checkpoint of ``step`` (a collective: every rank calls it) and keep the last ``keep_last``.

    Everything is written into ``root/.tmp-step-N``; the main process writes ``trainer_state.json``,
    fsyncs every file, writes ``manifest.json`` last and renames the folder, then deletes the oldest
    complete checkpoints beyond ``keep_last`` (each manifest first).
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
        write_json_durably(tmp / STATE_FILE, {**trainer_state, "step": step, "num_processes": accelerator.num_processes})
        write_manifest(tmp, step=step, num_processes=accelerator.num_processes)
        if final.exists():
            remove_checkpoint(final)
        os.replace(tmp, final)
        _fsync_path(root)
        for old in list_checkpoints(root)[:-keep_last]:
            remove_checkpoint(old)
        logger.info("checkpoint saved: %s", final)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator, path: str | Path) -> dict[str, Any]:
    """Verify ``path`` (:func:`verify_checkpoint`), then restore model, optimizer, scheduler and RNG states.

    Returns its trainer state.
    """
    path = Path(path)
    state = verify_checkpoint(path)
    saved_procs = state["num_processes"]
    if saved_procs != accelerator.num_processes:
        raise CheckpointError(
            f"{path} was written by {saved_procs} processes, this run has {accelerator.num_processes}; "
            f"resume with --num_processes {saved_procs}"
        )
    accelerator.load_state(str(path))
    load_rng_state(path, accelerator.process_index)
    return state


def clean_partial_checkpoints(root: str | Path) -> None:
    """Delete ``.tmp-*`` folders left by an interrupted save or delete (main process only)."""
    root = Path(root)
    if root.is_dir():
        for p in root.glob(".tmp-*step-*"):
            shutil.rmtree(p, ignore_errors=True)
