"""A cache of the teacher's top-k next-token distribution over the training blocks.

:func:`build_teacher_cache` runs the teacher once over the token blocks and writes, per block and position
(the ``seq_len - 1`` positions that predict a next token), the top-k token ids, their log-probabilities and
``log(1 - sum of top-k probs)`` (the rest mass) as safetensors shards of ``blocks_per_shard`` blocks, plus
``manifest.json`` naming what the cache was built from: the teacher (sha256 of its weights), the tokenizer
(sha256 of its vocabulary), the data (sha256 of the token blocks), ``k`` and the dtypes.

Every file is written to a temporary name and renamed into place, so a shard either exists whole or not
at all; a killed build resumes from its completed shards (temporary leftovers are removed, never read).
A cache built for another teacher, tokenizer, data or ``k`` is refused, naming what differs.

``tail_samples = m > 0`` also keeps the tail: per position ``m`` tokens are drawn (with replacement, from a
generator seeded by ``seed`` and the shard) from the teacher's distribution outside its top-k, and stored
after the top-k as distinct ids with ``log(rest mass * count / m)``; the rest bucket is then empty (-inf).
The stored distribution sums to one and equals the teacher's in expectation, so the KL gradient the student
gets from it (``q - p_cached``) is unbiased, where the one-bucket rest teaches no tail shape at all.
:class:`TeacherCache` reads the rows of given block indices for :class:`~minidistill.distill.losses.cached.CachedLogitKDLoss`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ..config import ConfigBase, ConfigError
from ..errors import MinidistillError

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT = 1
VALUE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
KEYS = ("teacher", "tokenizer", "data", "k", "tail_samples", "seed", "dtype", "index_dtype", "vocab_size", "num_blocks",
        "seq_len", "blocks_per_shard")
KEY_DEFAULTS = {"tail_samples": 0, "seed": 0}
"""Values of keys that manifests written before the key existed lack."""


class TeacherCacheError(MinidistillError, ValueError):
    """A teacher cache cannot be used: built from other inputs, incomplete, or asked for an impossible k."""


@dataclass
class TeacherCacheConfig(ConfigBase):
    """``teacher_cache``: train the logit term from the teacher's cached top-k instead of a teacher forward per step."""

    enabled: bool = False
    """Build (or reuse) the cache before training and read the logit term's teacher from it."""
    path: str | None = None
    """Folder of the cache (None: ``<run_dir>/teacher_cache``)."""
    k: int = 32
    """Teacher tokens kept per position (the rest of its mass is one bucket, unless ``tail_samples`` is set)."""
    tail_samples: int = 32
    """Tokens drawn per position from the teacher's distribution outside its top-k (0: the rest is one bucket).
    Their distinct ids are stored after the top-k, each with its share of the rest mass, so the cached target
    is the teacher's distribution in expectation (storage: ``k + tail_samples`` entries per position; at most
    vocabulary - k draws, none when the top-k is the whole vocabulary)."""
    seed: int = 0
    """Seed of the tail draws (with the shard index, so a resumed build draws what an uninterrupted one did)."""
    dtype: Literal["float16", "bfloat16", "float32"] = "float16"
    """Stored dtype of the log-probabilities."""
    index_dtype: Literal["int32"] = "int32"
    """Stored dtype of the token ids."""
    blocks_per_shard: int = 256
    """Training blocks per safetensors shard (the unit a killed build resumes from)."""
    batch_size: int = 8
    """Blocks per teacher forward while building."""
    chunk_tokens: int = 1024
    """Positions projected to the vocabulary at once while building."""

    def validate(self) -> None:
        for key in ("k", "blocks_per_shard", "batch_size", "chunk_tokens"):
            if getattr(self, key) < 1:
                raise ConfigError(f"teacher_cache.{key}={getattr(self, key)}: must be at least 1")
        if self.tail_samples < 0:
            raise ConfigError(f"teacher_cache.tail_samples={self.tail_samples}: must be 0 (no tail draws) or more")


def _sha(parts) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p)
    return h.hexdigest()


def teacher_hash(teacher: nn.Module) -> str:
    """sha256 of the teacher's weights (names, dtypes, shapes and bytes)."""

    def parts():
        for name, t in sorted(teacher.state_dict().items()):
            t = t.detach().cpu().contiguous()
            yield f"{name}|{t.dtype}|{tuple(t.shape)}".encode()
            yield t.view(torch.uint8).numpy().tobytes() if t.numel() else b""

    return _sha(parts())


def tokenizer_hash(vocab: Mapping[str, int]) -> str:
    """sha256 of a tokenizer vocabulary (token -> id)."""
    return _sha([json.dumps(sorted(vocab.items()), ensure_ascii=False).encode()])


def data_hash(blocks: torch.Tensor) -> str:
    """sha256 of the token blocks (int64, row-major) and their shape."""
    b = blocks.detach().cpu().to(torch.int64).contiguous()
    return _sha([str(tuple(b.shape)).encode(), b.numpy().tobytes()])


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to a temporary name beside ``path``, then rename it into place."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def open_keyed_folder(path: Path, expected: dict, check: Callable[[dict, dict, Path], None]) -> None:
    """Create ``path`` with an incomplete manifest of ``expected`` keys, or ``check`` the one it has against them;
    then remove temporary leftovers of a killed writer (never read)."""
    path.mkdir(parents=True, exist_ok=True)
    manifest_path = path / MANIFEST
    if manifest_path.is_file():
        check(json.loads(manifest_path.read_text()), expected, path)
    else:
        atomic_write_text(manifest_path, json.dumps({"format": FORMAT, **expected, "complete": False}, indent=1))
    for leftover in path.glob("*.tmp"):
        leftover.unlink()


def _write_shard(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Write one shard under a temporary name, then rename it into place."""
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp))
    os.replace(tmp, path)


def _shard_name(i: int) -> str:
    return f"shard_{i:05d}.safetensors"


def sample_tail(lp: torch.Tensor, top_indices: torch.Tensor, rest: torch.Tensor, m: int,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``m`` draws per row of log-probs ``lp`` [n, V] from the mass outside ``top_indices`` [n, k], as distinct ids
    [n, m] and log-weights [n, m] (``log(rest * count / m)``; -inf in the unused slots and where ``rest`` is -inf)."""
    probs = lp.exp().scatter(-1, top_indices, 0.0)
    empty = probs.sum(-1, keepdim=True) <= 0
    probs = torch.where(empty, torch.ones_like(probs), probs)  # any ids: their weight is log(0) below
    draws = torch.multinomial(probs, m, replacement=True, generator=generator)
    counts = torch.zeros_like(probs).scatter_add_(-1, draws, torch.ones_like(draws, dtype=probs.dtype))
    count, ids = counts.topk(m, -1)
    share = torch.where(empty.squeeze(-1), torch.zeros_like(rest), rest.exp()).unsqueeze(-1)
    return ids, torch.where(count > 0, (share * count / m).log(), torch.full_like(count, float("-inf")))


@torch.no_grad()
def teacher_topk(teacher: nn.Module, input_ids: torch.Tensor, k: int, *, vocab_size: int | None = None,
                 chunk_tokens: int = 1024, tail_samples: int = 0,
                 generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The teacher's top-k ids [B, T-1, k], log-probs [B, T-1, k] (float32) and rest log-mass [B, T-1].

    One forward; logits are formed ``chunk_tokens`` positions at a time, head rows ``>= vocab_size`` at -inf.
    ``tail_samples = m``: ``m`` more columns of drawn tail ids and their log-weights (:func:`sample_tail`), and
    the rest log-mass is -inf (the draws carry it).
    """
    from .objective import CaptureRequest, model_features

    feats = model_features(teacher, input_ids, CaptureRequest())
    h = feats.final_hidden[:, :-1]
    b, t = h.shape[:2]
    h = h.reshape(b * t, -1)
    w = feats.head_weight.float()
    bias = None if feats.head_bias is None else feats.head_bias.float()
    rows = w.shape[0]
    tokens = rows if vocab_size is None else min(vocab_size, rows)
    idx, lp_top, rest = [], [], []
    for start in range(0, h.shape[0], chunk_tokens):
        logits = F.linear(h[start:start + chunk_tokens].float(), w, bias)
        if tokens < rows:
            logits = logits.masked_fill(torch.arange(rows, device=logits.device) >= tokens, float("-inf"))
        lp = F.log_softmax(logits, -1)
        top = lp.topk(k, -1)
        rest_lp = torch.logsumexp(lp.scatter(-1, top.indices, float("-inf")), -1)
        if tail_samples:
            tail_ids, tail_lp = sample_tail(lp, top.indices, rest_lp, tail_samples, generator)
            idx.append(torch.cat([top.indices, tail_ids], -1))
            lp_top.append(torch.cat([top.values, tail_lp], -1))
            rest.append(torch.full_like(rest_lp, float("-inf")))
        else:
            idx.append(top.indices)
            lp_top.append(top.values)
            rest.append(rest_lp)
    width = k + tail_samples
    return (torch.cat(idx).reshape(b, t, width), torch.cat(lp_top).reshape(b, t, width), torch.cat(rest).reshape(b, t))


def build_teacher_cache(cfg: TeacherCacheConfig, teacher: nn.Module, blocks: torch.Tensor, path: str | Path, *,
                        tokenizer_vocab: Mapping[str, int], vocab_size: int | None = None) -> "TeacherCache":
    """Build (or resume, or reuse) the cache of ``teacher`` over ``blocks`` [N, T] in ``path``; returns its reader."""
    path = Path(path)
    rows = teacher.get_output_embeddings().weight.shape[0]
    tokens = rows if vocab_size is None else min(vocab_size, rows)
    if cfg.k > tokens:
        raise TeacherCacheError(f"teacher_cache.k={cfg.k} exceeds the vocabulary ({tokens} tokens): set teacher_cache.k<={tokens}")
    tail = min(cfg.tail_samples, tokens - cfg.k)  # no more draws than tokens outside the top-k
    expected = {
        "teacher": teacher_hash(teacher), "tokenizer": tokenizer_hash(tokenizer_vocab), "data": data_hash(blocks),
        "k": cfg.k, "tail_samples": tail, "seed": cfg.seed if tail else 0, "dtype": cfg.dtype, "index_dtype": cfg.index_dtype, "vocab_size": tokens,
        "num_blocks": int(blocks.shape[0]), "seq_len": int(blocks.shape[1]), "blocks_per_shard": cfg.blocks_per_shard,
    }
    open_keyed_folder(path, expected, _check_keys)
    manifest_path = path / MANIFEST
    num_shards = -(-blocks.shape[0] // cfg.blocks_per_shard)
    device = next(teacher.parameters()).device
    value_dtype = VALUE_DTYPES[cfg.dtype]
    for s in range(num_shards):
        target = path / _shard_name(s)
        if target.is_file():
            continue
        lo, hi = s * cfg.blocks_per_shard, min((s + 1) * cfg.blocks_per_shard, blocks.shape[0])
        parts = []
        generator = None
        if tail:
            generator = torch.Generator(device=device).manual_seed(cfg.seed * 1_000_003 + s)
        for start in range(lo, hi, cfg.batch_size):
            ids = blocks[start:min(start + cfg.batch_size, hi)].to(device)
            parts.append(tuple(x.cpu() for x in teacher_topk(teacher, ids, cfg.k, vocab_size=tokens, chunk_tokens=cfg.chunk_tokens,
                                                             tail_samples=tail, generator=generator)))
        idx, lp, rest = (torch.cat(p) for p in zip(*parts))
        _write_shard({"indices": idx.to(torch.int32).contiguous(), "logprobs": lp.to(value_dtype).contiguous(),
                      "rest": rest.to(value_dtype).contiguous()}, target)
        logger.info("teacher cache: shard %d/%d written", s + 1, num_shards)
    manifest = json.loads(manifest_path.read_text())
    if not manifest.get("complete"):
        atomic_write_text(manifest_path, json.dumps({**manifest, "complete": True}, indent=1))
    return TeacherCache(path, expected)


def _check_keys(manifest: dict, expected: dict, path: Path) -> None:
    names = {"teacher": "teacher (weights sha256)", "tokenizer": "tokenizer (vocabulary sha256)", "data": "data (token blocks sha256)"}
    diff = [k for k in KEYS if manifest.get(k, KEY_DEFAULTS.get(k)) != expected.get(k, KEY_DEFAULTS.get(k))]
    if diff:
        details = "; ".join(f"{names.get(k, k)}: cache {manifest.get(k)!r}, now {expected.get(k)!r}" for k in diff)
        raise TeacherCacheError(
            f"the teacher cache in {path} was built for another {', '.join(names.get(k, k) for k in diff)} ({details}); "
            "set teacher_cache.path to a new folder, or delete this one to rebuild it"
        )


class TeacherCache:
    """Reader of a complete cache; :meth:`rows` gives the cached teacher rows of training block indices."""

    def __init__(self, path: str | Path, expected: dict | None = None):
        self.path = Path(path)
        manifest_path = self.path / MANIFEST
        if not manifest_path.is_file():
            raise TeacherCacheError(f"no teacher cache in {self.path} ({MANIFEST} is missing): build it with teacher_cache.enabled=true")
        self.manifest = json.loads(manifest_path.read_text())
        if expected is not None:
            _check_keys(self.manifest, expected, self.path)
        if not self.manifest.get("complete"):
            raise TeacherCacheError(f"the teacher cache in {self.path} is incomplete (its build was interrupted): run the build again to resume it")
        self.k, self.per_shard = int(self.manifest["k"]), int(self.manifest["blocks_per_shard"])
        self.width = self.k + int(self.manifest.get("tail_samples", 0))  # stored entries per position: top-k, then tail draws
        self._handles: dict[int, object] = {}

    def _shard(self, s: int):
        if s not in self._handles:
            self._handles[s] = safe_open(str(self.path / _shard_name(s)), framework="pt")
        return self._handles[s]

    def rows(self, block_indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Cached ``(indices [n, T-1, k] int32, logprobs [n, T-1, k], rest [n, T-1])`` of the blocks, in order."""
        out = []
        n = int(self.manifest["num_blocks"])
        for b in block_indices.reshape(-1).tolist():
            if not 0 <= b < n:
                raise TeacherCacheError(f"block {b} is outside the teacher cache's {n} blocks")
            f = self._shard(b // self.per_shard)
            o = b % self.per_shard
            out.append(tuple(f.get_slice(name)[o:o + 1] for name in ("indices", "logprobs", "rest")))
        return tuple(torch.cat(p) for p in zip(*out))

    def bytes_per_token(self) -> float:
        """Stored bytes per cached position."""
        value = torch.finfo(VALUE_DTYPES[self.manifest["dtype"]]).bits // 8
        return self.width * (4 + value) + value
