"""Export a saved model folder (or a run's ``model/``) to one GGUF file that llama.cpp loads.

Written with the ``gguf`` package's :class:`gguf.GGUFWriter` in llama.cpp's layout: ``<arch>.*``
hyper-parameters, ``blk.N.*`` tensor names (``gguf.get_tensor_name_map``), the query / key rows of
``llama`` re-ordered for llama.cpp's rotary embedding, and the tokenizer as ``tokenizer.ggml.*``
(byte-level BPE only: ``gpt2`` model, tokens padded to the embedding rows, merges, special ids, chat
template). ``minidistill.*`` keys name the teacher and summarise the prune map. The file is written
under a temporary name next to the output and renamed when complete; an existing output is refused
unless ``overwrite``.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import gguf
import numpy as np
import torch

from ..adapters import SUPPORTED_MODEL_TYPES, UnsupportedArchitectureError, get_adapter
from ..config import ConfigBase, ConfigError
from ..errors import OutputError
from ..models import BUNDLED, ModelConfig, ModelError, bundled_gguf_path, load_model, load_tokenizer

logger = logging.getLogger(__name__)

OutType = Literal["f32", "f16", "q8_0"]
OUTTYPES: tuple[str, ...] = get_args(OutType)

# model_type -> llama.cpp architecture; every other adapter-table type is refused (see EXPORTABLE).
_GGUF_ARCH: dict[str, gguf.MODEL_ARCH] = {
    "llama": gguf.MODEL_ARCH.LLAMA,
    "mistral": gguf.MODEL_ARCH.LLAMA,  # llama.cpp runs mistral as llama (no sliding window)
    "qwen2": gguf.MODEL_ARCH.QWEN2,
    "qwen3": gguf.MODEL_ARCH.QWEN3,
    "phi3": gguf.MODEL_ARCH.PHI3,  # fused qkv_proj / gate_up_proj keep their layout (attn_qkv, ffn_up)
}
EXPORTABLE: tuple[str, ...] = tuple(sorted(_GGUF_ARCH))
NOT_EXPORTABLE: tuple[str, ...] = tuple(t for t in SUPPORTED_MODEL_TYPES if t not in _GGUF_ARCH)
# Why an adapter-table type is not exported (shown in the error).
_WHY_NOT = {
    "gemma3_text": "llama.cpp fixes gemma3's sliding-window layer pattern (every 6th layer global), which a "
                   "depth-pruned student no longer follows",
}

_FILE_TYPE = {
    "f32": gguf.LlamaFileType.ALL_F32,
    "f16": gguf.LlamaFileType.MOSTLY_F16,
    "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
}
_TOKEN_NORMAL, _TOKEN_CONTROL, _TOKEN_USER, _TOKEN_UNUSED = (
    gguf.TokenType.NORMAL, gguf.TokenType.CONTROL, gguf.TokenType.USER_DEFINED, gguf.TokenType.UNUSED,
)


@dataclass
class GGUFExportConfig(ConfigBase):
    """GGUF export of the distilled model at the end of the recipe."""

    gguf: OutType | None = None
    """Write ``<run_dir>/model.<outtype>.gguf`` for llama.cpp: f32, f16 or q8_0 (null: no GGUF file)."""


@dataclass(frozen=True)
class GGUFExportResult:
    """What :func:`export_gguf` wrote."""

    path: Path
    architecture: str
    outtype: str
    tensors: int
    bytes: int


def model_folder(path: str | Path) -> Path:
    """The model folder of ``path``: the folder itself when it holds ``config.json``, else a run's ``model/``."""
    path = Path(path)
    if not path.is_dir():
        raise ModelError(f"no such folder: {path}; give a run folder (runs/<name>) or a saved model folder")
    if (path / "config.json").is_file():
        return path
    if (path / "model" / "config.json").is_file():
        return path / "model"
    raise ModelError(
        f"{path} is neither a model folder (config.json) nor a run folder (model/config.json); "
        "give the folder a recipe saved (runs/<name> or runs/<name>/model)"
    )


def check_exportable(config) -> gguf.MODEL_ARCH:
    """The llama.cpp architecture of ``config``; UnsupportedArchitectureError naming the exportable types."""
    get_adapter(config)  # unknown and mixture-of-experts models get the adapter table's error
    model_type = config.model_type
    if model_type not in _GGUF_ARCH:
        why = f" ({_WHY_NOT[model_type]})" if model_type in _WHY_NOT else ""
        raise UnsupportedArchitectureError(
            f"GGUF export does not support model type {model_type!r}{why}; exportable: {', '.join(EXPORTABLE)} "
            f"(not exportable: {', '.join(NOT_EXPORTABLE)})"
        )
    rope = dict(getattr(config, "rope_parameters", None) or {})
    if rope.get("rope_type", "default") != "default":
        raise UnsupportedArchitectureError(
            f"GGUF export supports the default rotary embedding only; this model uses rope_type="
            f"{rope['rope_type']!r} (config.json rope_parameters)"
        )
    window = getattr(config, "sliding_window", None)
    if model_type == "mistral" and window is not None and window < config.max_position_embeddings:
        raise UnsupportedArchitectureError(
            f"mistral with sliding_window={window} < max_position_embeddings={config.max_position_embeddings}: "
            "llama.cpp runs mistral as llama without a sliding window; set sliding_window to null in config.json"
        )
    return _GGUF_ARCH[model_type]


def check_output(output: str | Path, overwrite: bool) -> Path:
    """The output path; OutputError when it exists (and not ``overwrite``), is a folder, or has no parent folder."""
    out = Path(output)
    if out.is_dir():
        raise OutputError(f"--output {out} is a folder; give a file name such as {out / 'model.gguf'}")
    if (out.exists() or out.is_symlink()) and not overwrite:
        raise OutputError(f"{out} exists; pass --overwrite to replace it or choose another --output")
    if not out.parent.is_dir():
        raise OutputError(f"the folder of --output {out} does not exist; create {out.parent} first")
    return out


def _rope_theta(config) -> float:
    rope = getattr(config, "rope_parameters", None) or {}
    return float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def _permute_rotary(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of each head from HF's half-split rotary order to llama.cpp's interleaved pairs (q / k of llama)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _tensor_data(w: torch.Tensor, outtype: str) -> tuple[np.ndarray, gguf.GGMLQuantizationType]:
    """The array written for one tensor: vectors stay f32 (llama.cpp's convention), matrices take ``outtype``."""
    a = w.detach().to(torch.float32).cpu().numpy()
    if a.ndim == 1 or outtype == "f32":
        return a, gguf.GGMLQuantizationType.F32
    if outtype == "q8_0":
        block = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0]
        if a.shape[-1] % block == 0:
            return gguf.quants.quantize(a, gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0
        logger.info("row length %d is not a multiple of %d: written as f16", a.shape[-1], block)
    return a.astype(np.float16), gguf.GGMLQuantizationType.F16


def _tensors(model, arch: gguf.MODEL_ARCH, outtype: str):
    """(GGUF name, array, type) for every weight; a tied lm_head is written once (as token_embd)."""
    config = model.config
    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    shape = get_adapter(model).shape(config)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    for name, w in model.state_dict().items():
        if tied and name == "lm_head.weight":
            continue
        if "rotary_emb" in name:
            continue
        new = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if new is None:
            raise UnsupportedArchitectureError(f"GGUF export: no llama.cpp name for tensor {name!r} ({arch.name.lower()})")
        if arch == gguf.MODEL_ARCH.LLAMA and name.endswith(("q_proj.weight", "q_proj.bias")):
            w = _permute_rotary(w, shape["num_heads"])
        elif arch == gguf.MODEL_ARCH.LLAMA and name.endswith(("k_proj.weight", "k_proj.bias")):
            w = _permute_rotary(w, shape["num_kv_heads"])
        data, qtype = _tensor_data(w, outtype)
        yield new, data, qtype


def _pretokenizer(tokenizer_json: dict[str, Any], teacher: str | None) -> str:
    """llama.cpp's ``tokenizer.ggml.pre`` name for a byte-level BPE tokenizer."""
    if teacher == BUNDLED:  # the bundled teacher's own GGUF names its pre-tokenizer
        reader = gguf.GGUFReader(bundled_gguf_path())
        field = reader.get_field(gguf.Keys.Tokenizer.PRE)
        if field is not None:
            return str(field.contents())
    pre = tokenizer_json.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt2"
    logger.warning("pre-tokenizer %s has no llama.cpp name here; written as 'default'", pre.get("type"))
    return "default"


def check_tokenizer_exportable(tokenizer) -> dict:
    """The tokenizer's ``tokenizer.json`` as a dict; ModelError unless it is a byte-level BPE (llama.cpp ``gpt2``)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ModelError("GGUF export needs a fast tokenizer (tokenizer.json); this tokenizer has none")
    data = json.loads(backend.to_str())
    model = data.get("model") or {}
    decoder = data.get("decoder") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback") or decoder.get("type") != "ByteLevel":
        raise ModelError(
            f"GGUF export supports byte-level BPE tokenizers only; this one is {model.get('type')!r} with a "
            f"{decoder.get('type')!r} decoder (tokenizer.json)"
        )
    return data


def add_tokenizer(writer: gguf.GGUFWriter, tokenizer, vocab_rows: int, *, teacher: str | None) -> None:
    """``tokenizer.ggml.*``: a byte-level BPE tokenizer as llama.cpp's ``gpt2`` model, padded to ``vocab_rows``."""
    data = check_tokenizer_exportable(tokenizer)
    model = data["model"]
    by_id: dict[int, str] = {int(i): t for t, i in model["vocab"].items()}
    special: dict[int, bool] = {}
    for added in data.get("added_tokens") or []:
        by_id[int(added["id"])] = added["content"]
        special[int(added["id"])] = bool(added.get("special"))
    if max(by_id) >= vocab_rows:
        raise ModelError(f"the tokenizer has token id {max(by_id)} but the model has only {vocab_rows} embedding rows")
    tokens, types = [], []
    for i in range(vocab_rows):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(_TOKEN_UNUSED)
        else:
            tokens.append(by_id[i])
            types.append(_TOKEN_NORMAL if i not in special else (_TOKEN_CONTROL if special[i] else _TOKEN_USER))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pretokenizer(data, teacher))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for key, value in (
        (gguf.Keys.Tokenizer.BOS_ID, tokenizer.bos_token_id),
        (gguf.Keys.Tokenizer.EOS_ID, tokenizer.eos_token_id),
        (gguf.Keys.Tokenizer.UNK_ID, tokenizer.unk_token_id),
        (gguf.Keys.Tokenizer.PAD_ID, tokenizer.pad_token_id),
    ):
        if value is not None:
            writer.add_uint32(key, int(value))
    writer.add_add_bos_token(bool(getattr(tokenizer, "add_bos_token", False)))
    writer.add_add_space_prefix(False)
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str) and template:
        writer.add_chat_template(template)


def _add_hparams(writer: gguf.GGUFWriter, model, arch: gguf.MODEL_ARCH) -> None:
    config = model.config
    shape = get_adapter(model).shape(config)
    writer.add_context_length(int(config.max_position_embeddings))
    writer.add_embedding_length(shape["hidden_size"])
    writer.add_block_count(shape["num_layers"])
    writer.add_feed_forward_length(shape["intermediate_size"])
    writer.add_head_count(shape["num_heads"])
    writer.add_head_count_kv(shape["num_kv_heads"])
    writer.add_key_length(shape["head_dim"])
    writer.add_value_length(shape["head_dim"])
    rope = getattr(config, "rope_parameters", None) or {}
    writer.add_rope_dimension_count(int(shape["head_dim"] * float(rope.get("partial_rotary_factor", 1.0))))
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(int(model.get_input_embeddings().weight.shape[0]))
    if arch == gguf.MODEL_ARCH.PHI3:
        original = getattr(config, "original_max_position_embeddings", None) or config.max_position_embeddings
        writer.add_rope_scaling_orig_ctx_len(int(original))
    window = getattr(config, "sliding_window", None)
    if arch != gguf.MODEL_ARCH.LLAMA and window and getattr(config, "use_sliding_window", True):
        writer.add_sliding_window(int(window))


def _provenance(folder: Path) -> dict[str, Any]:
    """Teacher source and prune-map summary from what the run saved next to the model (may be empty)."""
    from .model_card import run_info_from_folder

    try:
        return run_info_from_folder(folder)
    except ValueError:  # no teacher recorded: a plain model folder
        return {}


def prune_map_summary(pm: dict[str, Any]) -> str:
    """One line: kept layers, hidden channels, heads and neurons of a ``prune_map.json``."""
    parts = []
    if pm.get("kept_layers") is not None:
        parts.append(f"layers kept {list(pm['kept_layers'])}")
    if pm.get("kept_hidden") is not None:
        parts.append(f"hidden channels kept {len(pm['kept_hidden'])}")
    layers = pm.get("layers") or []
    if layers:
        parts.append(f"KV groups per layer {[len(x['kept_kv_groups']) for x in layers]}")
        parts.append(f"query heads per layer {[len(x['kept_query_heads']) for x in layers]}")
        parts.append(f"MLP neurons per layer {[len(x['kept_neurons']) for x in layers]}")
    return "; ".join(parts)


def export_gguf(
    source: str | Path,
    output: str | Path | None = None,
    *,
    outtype: str = "f16",
    overwrite: bool = False,
    teacher: str | None = None,
) -> GGUFExportResult:
    """Write ``source`` (a model folder or a run folder) as GGUF; returns where and what was written.

    ``output`` defaults to ``<model folder>.<outtype>.gguf`` next to the folder. ``teacher`` names the
    teacher when the folder does not record it (``run_info.json`` / ``prune_map.json``).
    """
    if outtype not in OUTTYPES:
        raise ConfigError(f"--outtype {outtype!r}: choose one of {', '.join(OUTTYPES)}")
    folder = model_folder(source)
    from transformers import AutoConfig

    arch = check_exportable(AutoConfig.from_pretrained(folder))
    out = check_output(output or folder.parent / f"{folder.name}.{outtype}.gguf", overwrite)
    info = _provenance(folder)
    teacher = teacher or (info.get("teacher") or {}).get("source")
    model = load_model(ModelConfig(source=str(folder)))
    tokenizer = load_tokenizer(str(folder))
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    count = 0
    try:
        with torch.no_grad():
            writer = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[arch])
            writer.add_type(gguf.GGUFType.MODEL)
            writer.add_name(folder.resolve().name if folder.name != "model" else folder.resolve().parent.name)
            writer.add_file_type(_FILE_TYPE[outtype])
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
            _add_hparams(writer, model, arch)
            add_tokenizer(writer, tokenizer, int(model.get_input_embeddings().weight.shape[0]), teacher=teacher)
            if teacher:
                writer.add_string("minidistill.teacher", str(teacher))
                writer.add_base_model_count(1)
                writer.add_base_model_name(0, str(teacher))
            if info.get("prune_map"):
                writer.add_string("minidistill.prune_map_summary", prune_map_summary(info["prune_map"]))
            for name, data, qtype in _tensors(model, arch, outtype):
                writer.add_tensor(name, data, raw_dtype=qtype)
                count += 1
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
            writer.close()
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    size = out.stat().st_size
    logger.info("wrote %s (%s, %s, %d tensors, %.1f MB)", out, arch.name.lower(), outtype, count, size / 1e6)
    return GGUFExportResult(path=out, architecture=gguf.MODEL_ARCH_NAMES[arch], outtype=outtype, tensors=count, bytes=size)


def export_run(cfg: GGUFExportConfig, model_dir: str | Path, run_dir: str | Path, *, teacher: str | None) -> Path | None:
    """The recipe's ``export.gguf``: ``<run_dir>/model.<outtype>.gguf`` from the finished model (None when off)."""
    if cfg.gguf is None:
        return None
    out = Path(run_dir) / f"model.{cfg.gguf}.gguf"
    return export_gguf(model_dir, out, outtype=cfg.gguf, overwrite=True, teacher=teacher).path
