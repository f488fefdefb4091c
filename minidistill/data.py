"""Text data: load documents, split train / held-out deterministically, tokenize, pack to fixed length.

Sources: ``bundled`` (the Lee news corpus shipped in the gensim wheel, one article per line), a
local ``.txt`` (one document per line), ``.json`` / ``.jsonl`` or ``.parquet`` file, or a Hub dataset
name (when online). Tokenization is a batched ``datasets.map`` and is cached on disk by datasets.
Every stage (importance, search, training, evaluation) uses the same split.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from datasets import Dataset, DatasetDict, load_dataset
from transformers import PreTrainedTokenizerBase

from .config import ConfigBase, ConfigError
from .corpora import BUNDLED_CORPORA, NEWS_FILE, WIKI_FILE, bundled_documents, gensim_test_data
from .errors import MinidistillError

if TYPE_CHECKING:
    from .streaming import TokenStream

logger = logging.getLogger(__name__)

BUNDLED = "bundled"
TEACHER_SAMPLES = "teacher_samples"
"""The source name of the text the teacher writes in the run (:mod:`minidistill.distill.teacher_samples`)."""
_LOCAL_BUILDERS = {".txt": "text", ".text": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


class DataError(MinidistillError, ValueError):
    """The data cannot serve the request (missing column, too little text)."""


@dataclass
class DataConfig(ConfigBase):
    """A text corpus and how it is split and packed."""

    source: str = BUNDLED
    """``bundled`` (the Lee news corpus), ``bundled:news``, ``bundled:wiki`` (an English Wikipedia sample; both in
    the gensim wheel, see :mod:`minidistill.corpora`), ``teacher_samples`` (text the teacher writes in the run, see the
    recipe's ``teacher_samples`` section), a local .txt/.json/.jsonl/.parquet file, or a Hub dataset name."""
    mix: list[str] = field(default_factory=list)
    """More sources (same forms as ``source``, same text column) whose train documents join the training and
    calibration blocks. Each is split train / held-out like ``source``; its held-out blocks are never trained
    on and are evaluated on their own (``TextData.extra_heldout``)."""
    mix_ratio: float | None = None
    """Training blocks taken from the ``mix`` sources per block of ``source`` (a deterministic subset, at most
    what they hold); None: all of them."""
    text_column: str = "text"
    """Column holding the text."""
    hub_config: str | None = None
    """Hub dataset config name (e.g. ``wikitext-2-raw-v1``)."""
    hub_split: str = "train"
    """Hub dataset split read before our own train / held-out split."""
    seq_len: int = 256
    """Tokens per packed sequence."""
    heldout_fraction: float = 0.1
    """Fraction of documents kept out of training for evaluation (and budget-search scoring)."""
    seed: int = 0
    """Seed of the document split."""
    max_documents: int | None = None
    """Use only the first N documents (before the split); None for all."""
    num_proc: int | None = None
    """Worker processes for tokenization."""
    streaming: bool = False
    """Read the sources lazily and tokenize on the fly (:mod:`minidistill.streaming`): ``source`` and ``mix`` may
    also be folders or glob patterns, and a Hub dataset is streamed by shard; training blocks keep document
    boundaries. False: everything in memory."""
    mix_weights: list[float] | None = None
    """Streaming only: probabilities (any positive scale) of drawing the next document from ``source`` and each
    ``mix`` source, in that order; None: equal weights."""
    heldout_documents: int = 100
    """Streaming only: the first N documents of each source form its in-memory held-out set and are never trained on."""
    shuffle_documents: int = 1024
    """Streaming only: each source is read this many documents at a time (a window) and a window's documents are
    packed in a seeded random order (a new order for every window and pass), so that neighbouring blocks do not come
    from neighbouring documents of one file; resume stays exact. 0: file order."""
    sample_blocks: int = 128
    """Streaming only: the stream's first N blocks are also kept in memory as ``TextData.train`` (calibration, and
    the budget search's scoring blocks at the end: at least ``prune.calib_blocks + prune.search.score_blocks``)."""

    def validate(self) -> None:
        if self.seq_len < 2:
            raise ConfigError(f"data.seq_len={self.seq_len}: need at least 2 tokens per sequence")
        if not 0.0 < self.heldout_fraction < 1.0:
            raise ConfigError(f"data.heldout_fraction={self.heldout_fraction}: must be strictly between 0 and 1")
        if self.mix_ratio is not None and not self.mix_ratio > 0:
            raise ConfigError(f"data.mix_ratio={self.mix_ratio}: must be positive (or null for all mixed-in blocks)")
        if self.source in self.mix or len(set(self.mix)) < len(self.mix):
            raise ConfigError(f"data.mix={self.mix} repeats a source (data.source={self.source!r}); name each source once")
        if self.max_documents is not None and self.max_documents < 2:
            raise ConfigError("data.max_documents must be at least 2 (one train and one held-out document)")
        if self.streaming:
            self._validate_streaming()
        elif self.mix_weights is not None:
            raise ConfigError("data.mix_weights applies to data.streaming=true; use data.mix_ratio in memory, or set data.streaming")

    def _validate_streaming(self) -> None:
        if self.mix_ratio is not None:
            raise ConfigError("data.mix_ratio is not used with data.streaming=true; set data.mix_weights instead")
        if self.max_documents is not None:
            raise ConfigError("data.max_documents is not used with data.streaming=true; unset it (the stream has no end)")
        for name in (self.source, *self.mix):
            if name == TEACHER_SAMPLES:
                raise ConfigError(f"data.streaming reads files, bundled corpora and Hub datasets, not {name!r} (written in the "
                                  "run, it is small: keep it in memory with data.streaming=false)")
        if self.mix_weights is not None:
            n = 1 + len(self.mix)
            if len(self.mix_weights) != n:
                raise ConfigError(
                    f"data.mix_weights has {len(self.mix_weights)} value(s) but there are {n} sources (data.source and "
                    f"{len(self.mix)} data.mix); give one weight per source, data.source first"
                )
            if any(not w >= 0 for w in self.mix_weights) or not sum(self.mix_weights) > 0:
                raise ConfigError(f"data.mix_weights={self.mix_weights}: need non-negative weights with a positive sum")
        if self.heldout_documents < 1:
            raise ConfigError(f"data.heldout_documents={self.heldout_documents}: need at least 1 held-out document")
        if self.shuffle_documents < 0:
            raise ConfigError(f"data.shuffle_documents={self.shuffle_documents}: must be >= 0 (0 reads the files in order)")
        if self.sample_blocks < 1:
            raise ConfigError(f"data.sample_blocks={self.sample_blocks}: need at least 1 in-memory block")


def bundled_corpus_path() -> Path:
    """The Lee background corpus from the gensim wheel (300 news articles, one per line)."""
    return gensim_test_data(NEWS_FILE)


def _looks_like_path(source: str) -> bool:
    return Path(source).suffix.lower() in _LOCAL_BUILDERS or source.startswith(("/", ".", "~")) or source.count("/") > 1


def check_data_source(cfg: DataConfig) -> None:
    """DataError naming the file when a local source is missing, empty, unreadable, not UTF-8 or malformed JSON.

    Cheap next to loading a model (one sequential read of the file); run before the teacher is loaded.
    Every ``data.mix`` source is checked the same way. With ``data.streaming`` only the files' existence and
    types are checked (a corpus is not read twice); the stream reports bad content when it reaches it.
    """
    if cfg.streaming:
        from .streaming import stream_sources  # streaming imports this module

        stream_sources(cfg)
        return
    for source in cfg.mix:
        check_data_source(replace(cfg, source=source, mix=[]))
    if cfg.source == TEACHER_SAMPLES:  # written by the run itself
        return
    if is_bundled(cfg.source):
        try:
            gensim_test_data(NEWS_FILE if bundled_name(cfg.source) == "news" else WIKI_FILE)
        except FileNotFoundError as e:
            raise DataError(str(e)) from None
        return
    path = Path(cfg.source).expanduser()
    if not path.exists():
        if _looks_like_path(cfg.source):
            raise DataError(f"data file {cfg.source} does not exist; give an existing .txt/.json/.jsonl/.parquet file or 'bundled'")
        if os.environ.get("HF_DATASETS_OFFLINE", "").lower() in ("1", "true") or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true"):
            raise DataError(
                f"data source {cfg.source!r} is no local file, and offline mode (HF_DATASETS_OFFLINE / HF_HUB_OFFLINE) "
                "forbids fetching it as a Hub dataset; give a local file or 'bundled'"
            )
        return
    if path.is_dir():
        raise DataError(f"data source {path} is a folder; give one .txt/.json/.jsonl/.parquet file")
    suffix = path.suffix.lower()
    if suffix not in _LOCAL_BUILDERS:
        raise DataError(f"{path}: unknown file type {path.suffix!r}; use one of {', '.join(sorted(_LOCAL_BUILDERS))}")
    try:
        with path.open("rb") as fh:
            if suffix == ".parquet":
                head = fh.read(4)
                if head != b"PAR1":
                    raise DataError(f"data file {path} is not a parquet file (it does not start with PAR1)")
                return
            _check_text_file(path, fh, json_lines=_LOCAL_BUILDERS[suffix] == "json")
    except OSError as e:
        raise DataError(f"data file {path} cannot be read: {e.strerror or e}; check its permissions") from None


_JSON_CHECK_LINES = 100_000  # JSON lines parsed up front (a large file's tail is left to datasets)


def _check_text_file(path: Path, fh, *, json_lines: bool) -> None:
    import codecs
    import json

    decoder = codecs.getincrementaldecoder("utf-8")()
    offset, has_text, line_no, pending = 0, False, 0, ""
    lines: list[str] = []
    while True:
        chunk = fh.read(1 << 20)
        try:
            text = decoder.decode(chunk, final=not chunk)
        except UnicodeDecodeError as e:
            raise DataError(
                f"data file {path} is not UTF-8 text (invalid byte at offset {offset + e.start}); convert it to UTF-8"
            ) from None
        offset += len(chunk)
        has_text = has_text or bool(text.strip())
        if json_lines:
            pending += text
            *done, pending = pending.split("\n")
            lines += done
            if len(lines) > 1000 or not chunk:
                for line in lines + ([pending] if not chunk else []):
                    line_no += 1
                    if line.strip():
                        try:
                            record = json.loads(line)
                        except ValueError as e:
                            if line_no == 1 and path.suffix.lower() == ".json":
                                _check_json_document(path)
                                return
                            raise DataError(f"data file {path} line {line_no} is not valid JSON ({e.msg}); one JSON object per line") from None
                        if not isinstance(record, dict):
                            if line_no == 1 and path.suffix.lower() == ".json":
                                _check_json_document(path)
                                return
                            raise DataError(
                                f"data file {path} line {line_no} holds a JSON {type(record).__name__}, not an object; "
                                'one JSON object per line, e.g. {"text": "..."}'
                            )
                lines = []
                if line_no >= _JSON_CHECK_LINES:  # the rest is only checked for UTF-8; datasets parses it later
                    json_lines, pending = False, ""
        if not chunk:
            break
    if offset == 0:
        raise DataError(f"data file {path} is empty; need at least 2 documents (one train, one held-out)")
    if not has_text:
        raise DataError(f"data file {path} holds no non-empty document (only whitespace); need at least 2 documents (one train, one held-out)")


def _check_json_document(path: Path) -> None:
    import json

    try:
        json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise DataError(f"data file {path} is not UTF-8 text (invalid byte at offset {e.start}); convert it to UTF-8") from None
    except ValueError as e:
        raise DataError(f"data file {path} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None


def is_bundled(source: str) -> bool:
    """True for ``bundled`` and ``bundled:<corpus>`` sources."""
    return source == BUNDLED or source.startswith(BUNDLED + ":")


def bundled_name(source: str) -> str:
    """The corpus a bundled source names (``bundled`` alone is the news corpus); DataError for an unknown one."""
    name = source.partition(":")[2] or "news"
    if name not in BUNDLED_CORPORA:
        raise DataError(f"data source {source!r}: no bundled corpus {name!r}; choose one of "
                        f"{', '.join(BUNDLED + ':' + n for n in BUNDLED_CORPORA)}")
    return name


def load_documents(cfg: DataConfig) -> Dataset:
    """All documents of the source as a Dataset with one ``text`` column (empty ones dropped)."""
    check_data_source(cfg)
    if is_bundled(cfg.source):
        ds = Dataset.from_dict({"text": bundled_documents(bundled_name(cfg.source))})
    else:
        path = Path(cfg.source)
        if path.exists():
            builder = _LOCAL_BUILDERS.get(path.suffix.lower())
            if builder is None:
                raise DataError(
                    f"{path}: unknown file type {path.suffix!r}; use one of {', '.join(sorted(_LOCAL_BUILDERS))}"
                )
            try:
                ds = load_dataset(builder, data_files=str(path.resolve()), split="train")
            except Exception as e:  # datasets wraps every parse problem in its own error types
                cause = e.__cause__ or e
                detail = (str(cause).strip().splitlines() or [type(cause).__name__])[0]
                raise DataError(f"data file {path} cannot be read as {builder}: {detail}") from e
        else:
            ds = load_dataset(cfg.source, cfg.hub_config, split=cfg.hub_split)
    column = cfg.text_column if not is_bundled(cfg.source) else "text"
    if column not in ds.column_names:
        raise DataError(
            f"{cfg.source}: no column {column!r}; columns are {ds.column_names}. Set data.text_column (--text_column)."
        )
    dtype = getattr(ds.features.get(column), "dtype", None)
    if dtype not in ("string", "large_string"):
        raise DataError(
            f"{cfg.source}: column {column!r} holds {dtype or type(ds.features.get(column)).__name__} values, not text; "
            "point data.text_column (--text_column) at a text column"
        )
    if column != "text":
        ds = ds.rename_column(column, "text")
    ds = ds.select_columns(["text"]).filter(lambda b: [bool(t and t.strip()) for t in b["text"]], batched=True)
    if cfg.max_documents is not None:
        ds = ds.select(range(min(cfg.max_documents, len(ds))))
    if len(ds) < 2:
        raise DataError(f"{cfg.source}: {len(ds)} non-empty document(s); need at least 2 to split train / held-out")
    return ds


def split_documents(docs: Dataset, cfg: DataConfig) -> DatasetDict:
    """Deterministic document-level split into ``train`` and ``heldout``."""
    n_heldout = max(1, round(len(docs) * cfg.heldout_fraction))
    parts = docs.train_test_split(test_size=n_heldout, seed=cfg.seed, shuffle=True)
    return DatasetDict(train=parts["train"], heldout=parts["test"])


def _tokenize_and_pack(docs: Dataset, tokenizer: PreTrainedTokenizerBase, seq_len: int, num_proc: int | None) -> Dataset:
    """Blocks of ``seq_len`` tokens from the documents' ``text`` (or, already tokenized, ``input_ids``), each
    document followed by the EOS token."""
    eos = tokenizer.eos_token_id

    def tokenize(batch):
        ids = batch["input_ids"] if "text" not in batch else tokenizer(batch["text"], add_special_tokens=False)["input_ids"]
        return {"input_ids": [list(x) + [eos] if eos is not None else list(x) for x in ids]}

    def pack(batch):
        flat = [t for ids in batch["input_ids"] for t in ids]
        n = len(flat) // seq_len
        return {"input_ids": [flat[i * seq_len : (i + 1) * seq_len] for i in range(n)]}

    tokenized = docs.map(tokenize, batched=True, remove_columns=docs.column_names, num_proc=num_proc, desc="tokenize")
    # One packing batch spans many documents so that little is dropped at batch ends.
    return tokenized.map(pack, batched=True, batch_size=10_000, num_proc=num_proc, desc=f"pack to {seq_len}")


@dataclass
class TokenBlocks:
    """Packed token blocks of one split: ``input_ids`` is a LongTensor [num_blocks, seq_len]."""

    input_ids: torch.Tensor

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def num_tokens(self) -> int:
        return self.input_ids.numel()

    def batches(self, batch_size: int, limit_blocks: int | None = None):
        """Consecutive batches of blocks (the last may be smaller)."""
        n = len(self) if limit_blocks is None else min(limit_blocks, len(self))
        for i in range(0, n, batch_size):
            yield self.input_ids[i : min(i + batch_size, n)]


@dataclass
class TextData:
    """Train and held-out token blocks of one corpus, tokenized with one tokenizer."""

    train: TokenBlocks
    heldout: TokenBlocks
    config: DataConfig
    extra_heldout: dict[str, TokenBlocks] = field(default_factory=dict)
    """Held-out blocks of each ``data.mix`` source, by source name (``heldout`` is ``data.source``'s)."""
    stream: TokenStream | None = None
    """With ``data.streaming``: the training stream (``train`` then holds only its first blocks)."""


def _source_documents(cfg: DataConfig, generated: Mapping[str, Dataset]) -> Dataset:
    if cfg.source in generated:
        return generated[cfg.source]
    if cfg.source == TEACHER_SAMPLES:
        raise DataError(f"data source {TEACHER_SAMPLES!r} is text the teacher writes in the prune-and-distill recipe "
                        "(its teacher_samples section); elsewhere give the samples folder's files or another source")
    return load_documents(cfg)


def _split_blocks(cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, generated: Mapping[str, Dataset]) -> dict[str, TokenBlocks]:
    """Train and held-out blocks of ``cfg.source``; DataError when a split has less than one sequence."""
    splits = split_documents(_source_documents(cfg, generated), cfg)
    out = {}
    for name in ("train", "heldout"):
        packed = _tokenize_and_pack(splits[name], tokenizer, cfg.seq_len, cfg.num_proc)
        if len(packed) == 0:
            raise DataError(
                f"{cfg.source}: the {name} split holds less than one sequence of {cfg.seq_len} tokens; "
                "use more data or a smaller data.seq_len"
            )
        out[name] = TokenBlocks(torch.tensor(packed["input_ids"], dtype=torch.long))
    return out


def build_text_data(cfg: DataConfig, tokenizer: PreTrainedTokenizerBase,
                    generated: Mapping[str, Dataset] | None = None) -> TextData:
    """Load, split, tokenize and pack ``data.source`` and every ``data.mix`` source; errors early when a split
    has less than one sequence. ``generated``: already tokenized documents (an ``input_ids`` column) of sources
    made in the run, by name (``teacher_samples``). With ``mix``, the training blocks of all sources (a seeded subset of the mixed-in
    ones under ``mix_ratio``) are shuffled together with ``data.seed``. With ``streaming``, see
    :func:`minidistill.streaming.build_streaming_data`."""
    cfg.validate()
    if cfg.streaming:
        from .streaming import build_streaming_data  # streaming imports this module

        return build_streaming_data(cfg, tokenizer)
    generated = generated or {}
    main = _split_blocks(cfg, tokenizer, generated)
    train, extra_heldout = [main["train"].input_ids], {}
    for source in cfg.mix:
        blocks = _split_blocks(replace(cfg, source=source, mix=[]), tokenizer, generated)
        mixed = blocks["train"].input_ids
        if cfg.mix_ratio is not None:
            keep = min(len(mixed), max(1, round(cfg.mix_ratio * len(main["train"]) / len(cfg.mix))))
            order = torch.randperm(len(mixed), generator=torch.Generator().manual_seed(cfg.seed))
            mixed = mixed[order[:keep].sort().values]
        train.append(mixed)
        extra_heldout[source] = blocks["heldout"]
    train_ids = torch.cat(train)
    if cfg.mix:  # interleave the sources (seeded), so that the first blocks (calibration) hold every domain
        train_ids = train_ids[torch.randperm(len(train_ids), generator=torch.Generator().manual_seed(cfg.seed))]
    data = TextData(train=TokenBlocks(train_ids), heldout=main["heldout"], config=cfg, extra_heldout=extra_heldout)
    logger.info(
        "data %s%s: %d train blocks, %d held-out blocks of %d tokens%s",
        cfg.source, "".join(f" + {m}" for m in cfg.mix), len(data.train), len(data.heldout), cfg.seq_len,
        "".join(f"; {m}: {len(b)} held-out blocks" for m, b in extra_heldout.items()),
    )
    return data
