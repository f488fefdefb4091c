"""Push a finished run folder to the Hugging Face Hub in one commit, with a generated model card.

The folder is checked (a ``config.json`` and safetensors weights, no pickles) and a token is found
before any network call; only regular files inside the folder are uploaded (a symlink is followed
only when its target is a regular file inside the folder, a link out of it is refused). The token comes from the ``token`` argument, else ``HF_TOKEN``, else the
login cache (``huggingface_hub.get_token()``); it is never printed or logged. The model card is
uploaded as ``README.md`` through the commit itself; the local folder is never written to.
"""

from __future__ import annotations

import json
import logging
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

import httpx2
from huggingface_hub import CommitOperationAdd, HfApi, ModelCard, constants, get_token
from huggingface_hub.errors import HfHubHTTPError

from ..config import ConfigBase, ConfigError
from ..errors import MinidistillError

logger = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class HubError(MinidistillError, RuntimeError):
    """A push could not start or did not complete; the message says why and what to do."""


@dataclass
class HubConfig(ConfigBase):
    """Where and how a run folder is pushed to the Hub."""

    repo_id: str | None = None
    """Target model repo ``user/name`` (or ``org/name``); created when missing."""
    private: bool = False
    """Create the repo private (an existing repo keeps its visibility)."""
    revision: str | None = None
    """Branch to commit to (created from the default branch when missing); None for ``main``."""
    commit_message: str = "Upload pruned and distilled model"
    """Message of the upload commit."""
    endpoint: str | None = None
    """Hub endpoint URL (None: ``HF_ENDPOINT`` or https://huggingface.co)."""

    def validate(self) -> None:
        if self.repo_id is not None and not _REPO_ID.match(self.repo_id):
            raise ConfigError(f"hub.repo_id={self.repo_id!r}: expected 'user/name' (letters, digits, '-', '_', '.')")
        if not self.commit_message.strip():
            raise ConfigError("hub.commit_message is empty")
        if self.revision is not None and not self.revision.strip():
            raise ConfigError("hub.revision is empty; leave it unset for main")
        if self.endpoint is not None and not self.endpoint.startswith(("http://", "https://")):
            raise ConfigError(f"hub.endpoint={self.endpoint!r}: must be an http(s) URL")


def _regular_files(folder: Path) -> list[Path]:
    """Relative paths of the regular files under ``folder`` (hidden entries skipped), symlinks checked.

    A symlink to a regular file inside ``folder`` is kept (its content is uploaded under the link's
    name); a symlink that leaves the folder, a symlinked folder, or a special file is a HubError.
    """
    root = folder.resolve()
    out: list[Path] = []
    for dirpath, dirs, names in os.walk(folder, followlinks=False):
        here = Path(dirpath)
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for d in dirs:
            if (here / d).is_symlink():
                raise HubError(
                    f"{here / d} is a symlink to a folder ({os.readlink(here / d)}); the push uploads only regular "
                    "files inside the folder: replace it with a real folder"
                )
        for name in sorted(names):
            if name.startswith("."):
                continue
            path = here / name
            rel = path.relative_to(folder)
            if path.is_symlink():
                target = path.resolve()
                if not target.is_relative_to(root):
                    raise HubError(
                        f"{path} is a symlink to {target}, outside {folder}; the push never follows a link out of the "
                        "folder it publishes: replace the link with a copy of the file (or remove it)"
                    )
                if not target.is_file():
                    raise HubError(f"{path} is a symlink to {target}, which is not a regular file: remove it")
            elif not stat.S_ISREG(path.lstat().st_mode):
                raise HubError(f"{path} is not a regular file (a FIFO, socket or device): remove it")
            out.append(rel)
    return sorted(out)


def run_folder_files(folder: str | Path) -> list[Path]:
    """Files of a finished run folder to upload (relative paths, sorted); refuses anything else.

    Requires ``config.json`` and at least one ``*.safetensors`` file (every shard named by a
    ``*.safetensors.index.json`` must exist), refuses pickle checkpoints, half-written (``.tmp-*``)
    entries and symlinks that leave the folder, and skips hidden files and folders.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise HubError(f"{folder} is not a folder; pass the run's output folder (the one holding config.json)")
    if not (folder / "config.json").is_file():
        raise HubError(f"{folder} has no config.json: not a finished run (point at the folder the run saved the model to)")
    files = _regular_files(folder)
    pickles = [str(p) for p in files if p.suffix in PICKLE_SUFFIXES]
    if pickles:
        raise HubError(f"{folder} holds pickle files {pickles}; only safetensors weights are pushed (remove them)")
    weights = [p for p in files if p.name.endswith(".safetensors")]
    if not weights:
        raise HubError(f"{folder} has no *.safetensors weights: not a finished run (did saving complete?)")
    for index in folder.glob("*.safetensors.index.json"):
        shards = set(json.loads(index.read_text()).get("weight_map", {}).values())
        missing = sorted(s for s in shards if not (folder / s).is_file())
        if missing:
            raise HubError(f"{index.name} names missing shards {missing}: the run did not finish saving")
    if any(p.name.startswith(".tmp") for p in folder.iterdir()):
        raise HubError(f"{folder} holds a half-written .tmp* entry: the run is still saving or was interrupted")
    return files


def resolve_token(token: str | None = None) -> str:
    """The token to push with: ``token``, else ``HF_TOKEN``, else the login cache; a clear error if none."""
    token = token or get_token()
    if not token:
        raise HubError(
            "no Hugging Face token found: set the HF_TOKEN environment variable, run `hf auth login` "
            "(`huggingface-cli login`), or pass token=..."
        )
    return token


def _describe(err: BaseException, token: str) -> str:
    """First lines of an exception and its causes (outermost first), with the token redacted."""
    parts = []
    while err is not None and len(parts) < 4:
        lines = str(err).strip().splitlines()
        line = lines[0].rstrip(".") if lines else ""
        if not parts or not parts[-1].endswith(line):
            parts.append(f"{type(err).__name__}: {line}" if line else type(err).__name__)
        err = err.__cause__ or err.__context__
    text = " <- ".join(parts)
    return text.replace(token, "<redacted>") if token else text


def default_card(folder: Path, repo_id: str) -> ModelCard | None:
    """The card for a push without one: generated from what the run saved, else the folder's own
    README.md (None); an error naming the fix when there is neither."""
    from .model_card import build_model_card, run_info_from_folder

    try:
        return build_model_card(run_info_from_folder(folder, model_name=repo_id))
    except ValueError as err:
        if (folder / "README.md").is_file():
            logger.info("pushing the folder's own README.md as the model card (%s)", err)
            return None
        raise HubError(
            f"cannot build a model card for {folder}: {err}. Pass card=build_model_card(...) "
            "(recipes/push.py --teacher SOURCE), or add run_info.json / prune_map.json"
        ) from err


def push_to_hub(folder: str | Path, cfg: HubConfig, *, card: ModelCard | None = None, token: str | None = None) -> str:
    """Upload ``folder`` to ``cfg.repo_id`` in one commit with a model card as README.md; returns the commit URL.

    Without ``card`` one is generated from the run's ``run_info.json`` / ``prune_map.json`` /
    ``lm_eval.json`` (see :func:`minidistill.publish.model_card.run_info_from_folder`). Creates the repo (and
    the branch ``cfg.revision``) when missing. On failure nothing local is changed and the same call
    can be repeated; files the server already holds are not sent again.
    """
    cfg.validate()
    if not cfg.repo_id:
        raise ConfigError("hub.repo_id is not set: pass --repo_id user/name")
    folder = Path(folder)
    files = run_folder_files(folder)
    token = resolve_token(token)
    if card is None:
        card = default_card(folder, cfg.repo_id)
    if constants.is_offline_mode():
        raise HubError("HF_HUB_OFFLINE is set: unset it (and HF_DATASETS_OFFLINE if needed) to push to the Hub")
    operations = [  # resolved: a link inside the folder uploads its (checked) target
        CommitOperationAdd(path_in_repo=rel.as_posix(), path_or_fileobj=str((folder / rel).resolve()))
        for rel in files
        if not (card is not None and rel.as_posix() == "README.md")
    ]
    if card is not None:
        operations.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=str(card).encode("utf-8")))
    api = HfApi(endpoint=cfg.endpoint, token=token)
    target = f"{cfg.repo_id}@{cfg.revision}" if cfg.revision else cfg.repo_id
    logger.info("pushing %d files from %s to %s", len(operations), folder, target)
    try:
        api.create_repo(cfg.repo_id, private=cfg.private, exist_ok=True, repo_type="model")
        if cfg.revision and cfg.revision != constants.DEFAULT_REVISION:
            api.create_branch(cfg.repo_id, branch=cfg.revision, exist_ok=True, repo_type="model")
        info = api.create_commit(
            cfg.repo_id,
            operations=operations,
            commit_message=cfg.commit_message,
            revision=cfg.revision,
            repo_type="model",
        )
    except (HfHubHTTPError, httpx2.HTTPError, OSError, RuntimeError, ValueError) as err:
        raise HubError(
            f"push of {folder} to {target} failed: {_describe(err, token)}. "
            "Nothing local was changed; run the same command again to retry (files already uploaded are skipped)."
        ) from err
    logger.info("pushed %s: %s", target, info.commit_url)
    return info.commit_url


__all__ = ["HubConfig", "HubError", "push_to_hub", "resolve_token", "run_folder_files"]
