"""Teacher-generated training text (sequence-level KD): the teacher writes it once, the data reads it as a source.

:func:`write_teacher_samples` samples ``num_samples`` continuations from the teacher (batched ``generate`` with
its KV cache) and writes them as parquet shards of ``samples_per_shard`` rows (``input_ids``: prompt plus
continuation, without the end-of-sequence token; ``prompt_len``; ``text``) plus ``manifest.json`` naming what they
were made from: the teacher (sha256 of its weights), the tokenizer (sha256 of its vocabulary), the prompts (sha256
of their token ids) and the sampling settings. Shard ``s`` is sampled with seeds derived from ``seed`` and ``s``
only, so the samples are the same whether one process or several (shard ``s`` on rank ``s % world``) write them.
Every file is written under a temporary name and renamed into place: a killed run resumes from its complete
shards, and samples made from other inputs are refused, naming what differs.

The data names them ``teacher_samples`` (``data.source`` or an entry of ``data.mix``); their token ids are
packed as they are (never decoded and re-tokenized), and split train / held-out like any other source.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from datasets import Dataset, concatenate_datasets
from torch import nn
from transformers import PreTrainedTokenizerBase

from ..config import ConfigBase, ConfigError
from ..data import TEACHER_SAMPLES, DataConfig, load_documents, split_documents
from .teacher_cache import MANIFEST, TeacherCacheError, atomic_write_text, open_keyed_folder, teacher_hash, tokenizer_hash

logger = logging.getLogger(__name__)

CORPUS, UNCONDITIONAL = "corpus", "none"
SETTINGS = ("num_samples", "max_new_tokens", "temperature", "top_p", "top_k", "batch_size", "samples_per_shard", "seed")


class TeacherSamplesError(TeacherCacheError):
    """Teacher samples cannot be used: made from other inputs, incomplete, or without prompts (exit code of a cache)."""


@dataclass
class TeacherSamplesConfig(ConfigBase):
    """``teacher_samples``: text sampled from the teacher once, read by the data source ``teacher_samples``."""

    prompts: str = CORPUS
    """``corpus``: the first ``prompt_tokens`` tokens of the training documents of the data's other sources (never a
    held-out one); ``none``: unconditional, from the tokenizer's BOS (else EOS) token; or a .txt file, one prompt per line."""
    prompt_tokens: int = 16
    """Tokens of each corpus prompt (documents shorter than this are not used as prompts)."""
    num_samples: int = 256
    """Samples written (prompts are reused in turn when there are fewer)."""
    max_new_tokens: int = 256
    """Tokens sampled per prompt at most (a sample ends earlier at the end-of-sequence token)."""
    temperature: float = 1.0
    """Sampling temperature."""
    top_p: float = 1.0
    """Nucleus sampling: the smallest set of tokens holding this probability mass (1.0: off)."""
    top_k: int = 0
    """Sample among the k most likely tokens only (0: off)."""
    batch_size: int = 16
    """Prompts per ``generate`` call."""
    samples_per_shard: int = 64
    """Samples per parquet shard (the unit a killed run resumes from, and the unit spread over processes)."""
    seed: int = 0
    """Seed of the prompt order and the sampling."""
    path: str | None = None
    """Folder of the samples (None: ``<run_dir>/teacher_samples``); reused when it was made from the same inputs."""

    def validate(self) -> None:
        for key in ("prompt_tokens", "max_new_tokens", "batch_size", "samples_per_shard"):
            if getattr(self, key) < 1:
                raise ConfigError(f"teacher_samples.{key}={getattr(self, key)}: must be at least 1")
        if self.num_samples < 2:
            raise ConfigError(f"teacher_samples.num_samples={self.num_samples}: need at least 2 (one train and one held-out sample)")
        if not self.temperature > 0:
            raise ConfigError(f"teacher_samples.temperature={self.temperature}: must be positive")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"teacher_samples.top_p={self.top_p}: must be in (0, 1]")
        if self.top_k < 0:
            raise ConfigError(f"teacher_samples.top_k={self.top_k}: must be 0 (off) or positive")
        if self.prompts not in (CORPUS, UNCONDITIONAL):
            path = Path(self.prompts).expanduser()
            if path.suffix.lower() != ".txt":
                raise ConfigError(f"teacher_samples.prompts={self.prompts!r}: give 'corpus', 'none' or a .txt file of prompts, one per line")
            if not path.is_file():
                raise ConfigError(f"teacher_samples.prompts={self.prompts!r}: the file does not exist")


def names_teacher_samples(sources: Sequence[str]) -> bool:
    """Whether a data source list names the teacher samples."""
    return TEACHER_SAMPLES in sources


def corpus_prompts(documents: Sequence[Sequence[str]], tokenizer: PreTrainedTokenizerBase, prompt_tokens: int,
                   seed: int) -> list[list[int]]:
    """The first ``prompt_tokens`` token ids of each document long enough, sources interleaved in turn, each
    source's documents in a seeded order."""
    g = torch.Generator().manual_seed(seed)
    orders = [[docs[i] for i in torch.randperm(len(docs), generator=g).tolist()] for docs in documents]
    prompts = []
    for turn in range(max((len(o) for o in orders), default=0)):
        for order in orders:
            if turn < len(order):
                ids = tokenizer(order[turn], add_special_tokens=False)["input_ids"]
                if len(ids) >= prompt_tokens:
                    prompts.append(ids[:prompt_tokens])
    return prompts


def file_prompts(path: str | Path, tokenizer: PreTrainedTokenizerBase) -> list[list[int]]:
    """Token ids of each non-empty line of a prompt file."""
    path = Path(path).expanduser()
    try:
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    except UnicodeDecodeError as e:
        raise TeacherSamplesError(f"teacher_samples.prompts={path}: not UTF-8 text (byte {e.start}); save it as UTF-8") from None
    prompts = [tokenizer(line, add_special_tokens=False)["input_ids"] for line in lines if line]
    return [p for p in prompts if p]


def unconditional_prompt(tokenizer: PreTrainedTokenizerBase) -> list[list[int]]:
    """One prompt holding the tokenizer's BOS token (its EOS token when it has none)."""
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if start is None:
        raise TeacherSamplesError("teacher_samples.prompts=none needs a BOS or EOS token, and the tokenizer has neither; give prompts")
    return [[int(start)]]


def prompts_for(cfg: TeacherSamplesConfig, data: DataConfig, tokenizer: PreTrainedTokenizerBase) -> list[list[int]]:
    """The prompts ``cfg.prompts`` names, as token ids; corpus prompts come from the train split of every other
    source of ``data`` (the split the data itself uses, so no held-out document is a prompt)."""
    if cfg.prompts == UNCONDITIONAL:
        return unconditional_prompt(tokenizer)
    if cfg.prompts != CORPUS:
        return file_prompts(cfg.prompts, tokenizer)
    documents = []
    for source in (data.source, *data.mix):
        if source != TEACHER_SAMPLES:
            one = replace(data, source=source, mix=[], mix_ratio=None)
            documents.append(split_documents(load_documents(one), one)["train"]["text"])
    return corpus_prompts(documents, tokenizer, cfg.prompt_tokens, cfg.seed)


def _sha_prompts(prompts: list[list[int]]) -> str:
    return hashlib.sha256(json.dumps(prompts).encode()).hexdigest()


def _mixed_seed(seed: int, shard: int, batch: int) -> int:
    return (seed * 0x9E3779B97F4A7C15 + shard * 0xBF58476D1CE4E5B9 + batch * 0x94D049BB133111EB + 1) % (2**63)


def _shard_name(s: int) -> str:
    return f"shard_{s:05d}.parquet"


def _stop_ids(teacher: nn.Module, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    ids = {tokenizer.eos_token_id}
    configured = getattr(getattr(teacher, "generation_config", None), "eos_token_id", None)
    ids.update(configured if isinstance(configured, (list, tuple)) else [configured])
    return sorted(i for i in ids if i is not None)


@torch.no_grad()
def sample_batch(teacher: nn.Module, prompts: list[list[int]], cfg: TeacherSamplesConfig, *, seed: int,
                 stop_ids: list[int], pad_id: int) -> list[list[int]]:
    """Each prompt followed by its sampled continuation, cut before the first stop token (left-padded batch)."""
    device = next(teacher.parameters()).device
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):] = torch.tensor(p)
        mask[row, width - len(p):] = 1
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        out = teacher.generate(
            input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=True, temperature=cfg.temperature,
            top_p=cfg.top_p, top_k=cfg.top_k, max_new_tokens=cfg.max_new_tokens, min_new_tokens=0,
            eos_token_id=stop_ids, pad_token_id=pad_id,
        ).cpu()
    samples = []
    stop = torch.tensor(stop_ids)
    for row, p in enumerate(prompts):
        new = out[row, width:]
        ends = torch.isin(new, stop).nonzero()
        n = int(ends[0]) if len(ends) else len(new)
        samples.append(list(p) + new[:n].tolist())
    return samples


def _expected(cfg: TeacherSamplesConfig, teacher: nn.Module, vocab: Mapping[str, int], prompts: list[list[int]]) -> dict:
    return {"teacher": teacher_hash(teacher), "tokenizer": tokenizer_hash(vocab), "prompts": _sha_prompts(prompts),
            "num_prompts": len(prompts), **{k: getattr(cfg, k) for k in SETTINGS}}


def _check_keys(manifest: dict, expected: dict, path: Path) -> None:
    names = {"teacher": "teacher (weights sha256)", "tokenizer": "tokenizer (vocabulary sha256)", "prompts": "prompts (token ids sha256)"}
    diff = [k for k in expected if manifest.get(k) != expected[k]]
    if diff:
        details = "; ".join(f"{names.get(k, k)}: samples {manifest.get(k)!r}, now {expected[k]!r}" for k in diff)
        raise TeacherSamplesError(
            f"the teacher samples in {path} were made from another {', '.join(names.get(k, k) for k in diff)} ({details}); "
            "set teacher_samples.path to a new folder, or delete this one to sample again"
        )


def open_samples_folder(cfg: TeacherSamplesConfig, teacher: nn.Module, tokenizer: PreTrainedTokenizerBase,
                        prompts: list[list[int]], path: str | Path) -> dict:
    """Check (or start) the manifest of ``path`` for these inputs and remove temporary leftovers; run on one process.

    Returns the expected manifest keys, to pass to :func:`write_teacher_samples` on every process.
    """
    if not prompts:
        raise TeacherSamplesError(f"teacher_samples.prompts={cfg.prompts!r} gives no prompt: with 'corpus', no training document "
                                  f"has teacher_samples.prompt_tokens={cfg.prompt_tokens} tokens (lower it); with a file, it has no text")
    expected = _expected(cfg, teacher, tokenizer.get_vocab(), prompts)
    open_keyed_folder(Path(path), expected, _check_keys)
    return expected


def num_shards(cfg: TeacherSamplesConfig) -> int:
    return -(-cfg.num_samples // cfg.samples_per_shard)


def write_teacher_samples(cfg: TeacherSamplesConfig, teacher: nn.Module, tokenizer: PreTrainedTokenizerBase,
                          prompts: list[list[int]], path: str | Path, *, rank: int = 0, world: int = 1) -> None:
    """Sample and write the missing shards ``s`` with ``s % world == rank`` (after :func:`open_samples_folder`)."""
    path = Path(path)
    stop_ids = _stop_ids(teacher, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]
    was_training = teacher.training
    teacher.eval()
    try:
        for s in range(rank, num_shards(cfg), world):
            target = path / _shard_name(s)
            if target.is_file():
                continue
            start = time.perf_counter()
            lo, hi = s * cfg.samples_per_shard, min((s + 1) * cfg.samples_per_shard, cfg.num_samples)
            rows, prompt_lens = [], []
            for b, first in enumerate(range(lo, hi, cfg.batch_size)):
                batch = [prompts[i % len(prompts)] for i in range(first, min(first + cfg.batch_size, hi))]
                rows += sample_batch(teacher, batch, cfg, seed=_mixed_seed(cfg.seed, s, b), stop_ids=stop_ids, pad_id=pad_id)
                prompt_lens += [len(p) for p in batch]
            seconds = time.perf_counter() - start
            new_tokens = sum(len(r) - n for r, n in zip(rows, prompt_lens))
            ds = Dataset.from_dict({"input_ids": rows, "prompt_len": prompt_lens,
                                    "text": tokenizer.batch_decode(rows, skip_special_tokens=False)})
            tmp = target.with_name(target.name + ".tmp")
            ds.to_parquet(str(tmp))
            atomic_write_text(path / f"shard_{s:05d}.json", json.dumps({"new_tokens": new_tokens, "seconds": seconds}))
            os.replace(tmp, target)
            logger.info("teacher samples: shard %d/%d, %d new tokens at %.0f tokens/s", s + 1, num_shards(cfg), new_tokens,
                        new_tokens / max(seconds, 1e-9))
    finally:
        teacher.train(was_training)


def finish_samples_folder(cfg: TeacherSamplesConfig, path: str | Path) -> dict:
    """Mark the folder complete once every shard exists, with the generation throughput; returns the manifest."""
    path = Path(path)
    missing = [s for s in range(num_shards(cfg)) if not (path / _shard_name(s)).is_file()]
    if missing:
        raise TeacherSamplesError(f"the teacher samples in {path} lack shard(s) {missing}: run again to write them")
    manifest = json.loads((path / MANIFEST).read_text())
    if not manifest.get("complete"):
        stats = [json.loads((path / f"shard_{s:05d}.json").read_text()) for s in range(num_shards(cfg))]
        tokens, seconds = sum(x["new_tokens"] for x in stats), sum(x["seconds"] for x in stats)
        manifest.update(complete=True, new_tokens=tokens, seconds=seconds, tokens_per_second=tokens / max(seconds, 1e-9))
        atomic_write_text(path / MANIFEST, json.dumps(manifest, indent=1))
    return manifest


def read_teacher_samples(path: str | Path, expected: dict | None = None) -> Dataset:
    """The samples of a complete folder as a Dataset with an ``input_ids`` column, shards in order."""
    path = Path(path)
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise TeacherSamplesError(f"no teacher samples in {path} ({MANIFEST} is missing): write them with a teacher_samples section")
    manifest = json.loads(manifest_path.read_text())
    if expected is not None:
        _check_keys(manifest, expected, path)
    if not manifest.get("complete"):
        raise TeacherSamplesError(f"the teacher samples in {path} are incomplete (their run was interrupted): run again to finish them")
    n = -(-int(manifest["num_samples"]) // int(manifest["samples_per_shard"]))
    shards = [Dataset.from_parquet(str(path / _shard_name(s)), keep_in_memory=True) for s in range(n)]
    return concatenate_datasets(shards).select_columns(["input_ids"])


__all__ = [
    "TEACHER_SAMPLES",
    "TeacherSamplesConfig",
    "TeacherSamplesError",
    "corpus_prompts",
    "file_prompts",
    "finish_samples_folder",
    "names_teacher_samples",
    "open_samples_folder",
    "prompts_for",
    "read_teacher_samples",
    "sample_batch",
    "unconditional_prompt",
    "write_teacher_samples",
]
