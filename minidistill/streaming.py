"""Streaming text data: sources read lazily, tokenized on the fly, packed into blocks that keep document boundaries.

Opt in with ``data.streaming: true``. Each source (``data.source`` and every ``data.mix`` entry) is a local
.txt (one document per line), .json / .jsonl or .parquet file, a folder of such files, a glob pattern, a bundled
corpus (``bundled:news``, ``bundled:wiki``) or a Hub dataset name (``data.hub_config`` / ``data.hub_split``, opened
with ``load_dataset(..., streaming=True)``; its shards stand in for files). Files are read one after the other with
``datasets.load_dataset(..., streaming=True)``, so memory does not grow with the corpus. Documents of the sources are
interleaved at random with the probabilities ``data.mix_weights`` (seeded by ``data.seed``), each source restarting
when it runs out, so the stream never ends. With ``data.shuffle_documents: N`` (default 1024) each source is read N
documents at a time and a window's documents are taken in a seeded random order, new for every window and pass.

Documents (each followed by EOS) are packed into blocks of ``data.seq_len`` tokens. A block carries
``position_ids`` that restart at 0 where a document starts and at the start of the block: transformers
derives a block-diagonal causal mask from such position ids (``find_packed_sequence_indices`` in
``masking_utils``, used when neither an attention mask nor a KV cache is given), so no token attends across
a document boundary (eager and SDPA attention alike; no 4D mask is built here).
:func:`packed_positions` hands the position ids to the models' forwards during training.

Sharding over ``W`` processes: by file when every source has at least ``W`` files (rank ``r`` reads files
``r, r + W, ...``), else by block (every rank reads the whole stream and keeps blocks ``i`` with
``i % W == r``; each rank then reads and tokenizes the whole stream). Each source's first
``data.heldout_documents`` documents are its held-out set (never trained on), packed in memory like the
non-streaming path: ``data.source``'s is ``TextData.heldout``, each ``data.mix`` source's is in
``TextData.extra_heldout``, so the report scores every domain the student trains on.

Resuming: :meth:`TokenStream.resumable_blocks` gives each block with a :class:`StreamCursor` (per source the
file and document reached (with shuffling: the window's first document, how many of the window were taken and
how many windows were finished), the mixer's draws, the blocks packed, and the document the block split with the
tokens of it already packed). Continuing from a cursor yields exactly the blocks that followed it; files
before the cursor are not opened and no consumed document is tokenized again (a resumed window is read again,
and only its untaken documents are tokenized).
"""

from __future__ import annotations

import functools
import glob
import itertools
import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from datasets import IterableDataset, load_dataset
from torch import nn
from transformers import PreTrainedTokenizerBase

from .config import ConfigError
from .corpora import NEWS_FILE, WIKI_FILE, bundled_documents, gensim_test_data
from .data import _LOCAL_BUILDERS, BUNDLED, DataConfig, DataError, TextData, TokenBlocks, _looks_like_path, bundled_name, is_bundled
from .distill.objective import unwrap_module

logger = logging.getLogger(__name__)

_TOKENIZE_BATCH = 64  # documents tokenized per tokenizer call
_MIX_DRAWS = 1024  # source choices drawn per generator call


@dataclass(frozen=True)
class StreamSource:
    """One source of the stream: its files (sorted; a Hub dataset's shards), how they are read, its mixing weight."""

    name: str
    files: tuple[Path | str, ...]
    """Local files; for a Hub dataset, a label per shard of its streaming dataset; for a bundled corpus, its file."""
    builder: str
    """The datasets builder of local files (``text``, ``json``, ``parquet``), ``hub`` or ``bundled``."""
    weight: float
    hub_config: str | None = None
    hub_split: str = "train"

    @property
    def column_fixed(self) -> bool:
        """True when the text column is always ``text`` (plain text files, bundled corpora)."""
        return self.builder in ("text", BUNDLED)


def resolve_files(source: str) -> list[Path]:
    """The files a local streaming source names: one file, the supported files of a folder, or a glob pattern (sorted)."""
    path = Path(source).expanduser()
    if any(c in source for c in "*?["):
        files = [Path(p) for p in sorted(glob.glob(str(path), recursive=True)) if Path(p).is_file()]
        what = f"pattern {source!r} matches no file"
    elif path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in _LOCAL_BUILDERS)
        what = f"folder {source} holds no .txt/.json/.jsonl/.parquet file"
    elif path.is_file():
        files = [path]
        what = ""
    else:
        raise DataError(
            f"data source {source!r}: no such file or folder; data.streaming reads a local .txt/.json/.jsonl/.parquet "
            "file, a folder of them, a glob pattern, a bundled corpus or a Hub dataset name"
        )
    if not files:
        raise DataError(f"data source {what}; give at least one .txt/.json/.jsonl/.parquet file")
    builders = {_LOCAL_BUILDERS.get(p.suffix.lower()) for p in files}
    if None in builders:
        bad = next(p for p in files if p.suffix.lower() not in _LOCAL_BUILDERS)
        raise DataError(f"{bad}: unknown file type {bad.suffix!r}; use one of {', '.join(sorted(_LOCAL_BUILDERS))}")
    if len(builders) > 1:
        raise DataError(f"data source {source!r} mixes file types ({', '.join(sorted(builders))}); give one type per source")
    return files


def is_hub_name(source: str) -> bool:
    """True for a source that is no bundled corpus, no existing path and does not look like one: a Hub dataset name."""
    return not (is_bundled(source) or Path(source).expanduser().exists() or _looks_like_path(source)
                or any(c in source for c in "*?["))


@functools.lru_cache(maxsize=8)
def hub_dataset(name: str, config: str | None, split: str) -> IterableDataset:
    """The Hub dataset ``name`` opened for streaming (its files are listed, not downloaded); DataError offline."""
    if any(os.environ.get(k, "").lower() in ("1", "true") for k in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")):
        raise DataError(
            f"data source {name!r} is no local file, and offline mode (HF_DATASETS_OFFLINE / HF_HUB_OFFLINE) forbids "
            "streaming it from the Hub; give a local file, folder or glob pattern, or a bundled corpus"
        )
    try:
        return load_dataset(name, config, split=split, streaming=True)
    except Exception as e:  # datasets raises its own error types for a missing dataset, config or split
        detail = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise DataError(f"data source {name!r} cannot be streamed from the Hub: {detail}") from e


def stream_sources(cfg: DataConfig) -> list[StreamSource]:
    """``data.source`` then every ``data.mix`` source, with their files and weights (``data.mix_weights``).

    A Hub dataset's shards stand in for files (so sources with at least as many shards as processes are split
    by shard); a bundled corpus is one file."""
    names = [cfg.source, *cfg.mix]
    weights = cfg.mix_weights if cfg.mix_weights is not None else [1.0] * len(names)
    out = []
    for name, weight in zip(names, weights):
        if is_bundled(name):
            corpus = bundled_name(name)
            try:
                path = gensim_test_data(NEWS_FILE if corpus == "news" else WIKI_FILE)
            except FileNotFoundError as e:
                raise DataError(str(e)) from None
            out.append(StreamSource(name, (path,), BUNDLED, float(weight)))
        elif is_hub_name(name):
            shards = hub_dataset(name, cfg.hub_config, cfg.hub_split).n_shards
            labels = tuple(f"{name}:{cfg.hub_split} shard {k} of {shards}" for k in range(shards))
            out.append(StreamSource(name, labels, "hub", float(weight), cfg.hub_config, cfg.hub_split))
        else:
            files = resolve_files(name)
            out.append(StreamSource(name, tuple(files), _LOCAL_BUILDERS[files[0].suffix.lower()], float(weight)))
    return out


def _rows(source: StreamSource, file: int) -> Iterable[dict]:
    """The rows of file (or shard) ``file`` of ``source``, read lazily (a bundled corpus is small and read whole)."""
    if source.builder == BUNDLED:
        return ({"text": text} for text in bundled_documents(bundled_name(source.name)))
    if source.builder == "hub":
        return hub_dataset(source.name, source.hub_config, source.hub_split).shard(num_shards=len(source.files), index=file)
    return load_dataset(source.builder, data_files=str(Path(source.files[file]).resolve()), split="train", streaming=True)


def iter_documents(source: StreamSource, file: int, column: str, *, skip: int = 0) -> Iterator[str]:
    """The non-empty documents of file (or shard) ``file`` of ``source``, read lazily, after the first ``skip`` of them."""
    where = source.files[file]
    try:
        seen = 0
        for row in _rows(source, file):
            if column not in row:
                raise DataError(f"{where}: no column {column!r}; columns are {sorted(row)}. Set data.text_column (--text_column).")
            text = row[column]
            if text is None:
                continue
            if not isinstance(text, str):
                raise DataError(
                    f"{where}: column {column!r} holds {type(text).__name__} values, not text; point data.text_column at a text column"
                )
            if not text.strip():
                continue
            seen += 1
            if seen > skip:
                yield text
    except DataError:
        raise
    except Exception as e:  # datasets wraps every parse problem in its own error types
        cause = e.__cause__ or e
        detail = (str(cause).strip().splitlines() or [type(cause).__name__])[0]
        raise DataError(f"data file {where} cannot be read as {source.builder}: {detail}") from e


def pack_documents(docs: Iterable[Sequence[int]], seq_len: int) -> Iterator[tuple[list[int], list[int]]]:
    """Blocks ``(input_ids, position_ids)`` of ``seq_len`` tokens from tokenized documents, in order.

    Positions count from 0 at each document start and at each block start (the rest of a document that
    spills over from the previous block); the incomplete last block is held back.
    """
    ids: list[int] = []
    pos: list[int] = []
    for doc in docs:
        start = 0
        while start < len(doc):
            take = min(seq_len - len(ids), len(doc) - start)
            ids.extend(doc[start : start + take])
            pos.extend(range(take))
            start += take
            if len(ids) == seq_len:
                yield ids, pos
                ids, pos = [], []


def _backbone(model: nn.Module) -> nn.Module:
    """The decoder inside ``model`` (through DDP / DeepSpeed / compile / PEFT wrappers) whose forward takes position ids."""
    inner = unwrap_module(model)
    if hasattr(inner, "get_base_model"):  # PEFT
        inner = inner.get_base_model()
    base = getattr(inner, getattr(inner, "base_model_prefix", ""), None)
    return base if isinstance(base, nn.Module) else inner


@contextmanager
def packed_positions(models: Iterable[nn.Module], position_ids: torch.Tensor):
    """Within the block, every forward of the models' decoders receives ``position_ids`` and no KV cache.

    transformers looks for packed documents in the position ids only when no attention mask and no cache
    are given; then attention is cut at every document start.
    """

    def hook(_module, args, kwargs):
        kwargs["position_ids"] = position_ids
        kwargs["use_cache"] = False
        return args, kwargs

    handles = [_backbone(m).register_forward_pre_hook(hook, with_kwargs=True) for m in models]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


class TokenStream:
    """The endless, deterministic stream of packed blocks of some sources; :meth:`blocks` gives one rank's share."""

    def __init__(self, cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, sources: list[StreamSource],
                 heldout_cuts: list[dict[int, int]]):
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.sources = sources
        self.heldout_cuts = heldout_cuts
        """Per source, documents skipped at the start of each of its files (by file index): its held-out set."""
        self.seq_len = cfg.seq_len

    def sharding(self, world: int) -> str:
        """``files`` when every source has at least ``world`` files, else ``blocks``."""
        return "files" if world > 1 and all(len(s.files) >= world for s in self.sources) else "blocks"

    def _files(self, index: int, rank: int, world: int) -> list[tuple[int, Path]]:
        """``(file index, path)`` of the files source ``index`` gives rank ``rank``, in reading order."""
        files = list(enumerate(self.sources[index].files))
        return files[rank::world] if self.sharding(world) == "files" else files

    def _texts(self, index: int, rank: int, world: int, file: int, doc: int) -> Iterator[tuple[int, int, str]]:
        """``(file, doc, text)`` of source ``index`` from document ``doc`` of the rank's file ``file`` on, endlessly
        (passes restart at the first file); ``file`` indexes the rank's files, ``doc`` counts training documents."""
        src = self.sources[index]
        files = self._files(index, rank, world)
        column = "text" if src.column_fixed else self.cfg.text_column
        fresh = file == 0 and doc == 0
        while True:
            count = 0
            for f in range(file, len(files)):
                file_index, _ = files[f]
                first = doc if f == file else 0
                skip = self.heldout_cuts[index].get(file_index, 0)
                for j, text in enumerate(iter_documents(src, file_index, column, skip=skip + first)):
                    count += 1
                    yield f, first + j, text
            if count == 0 and fresh:
                share = f"rank {rank} of {world}: its files {[str(p) for _, p in files]}" if self.sharding(world) == "files" else "its files"
                raise DataError(
                    f"data source {src.name!r}, {share} hold no non-empty training document"
                    + " beyond the held-out ones; lower data.heldout_documents or add text"
                    + (f" (sharding by file needs {world} files with text)" if self.sharding(world) == "files" else "")
                )
            file, doc, fresh = 0, 0, True

    def _encode(self, texts: list[str]) -> list[list[int]]:
        eos = self.tokenizer.eos_token_id
        return [ids + [eos] if eos is not None else ids for ids in self.tokenizer(texts, add_special_tokens=False)["input_ids"]]

    def _tokenized(self, texts: Iterator[tuple[int, int, str]]) -> Iterator[tuple[int, int, list[int]]]:
        """``(file, doc, token ids + EOS)``, tokenizing ``_TOKENIZE_BATCH`` documents per tokenizer call."""
        while True:
            batch = list(itertools.islice(texts, _TOKENIZE_BATCH))
            if not batch:
                return
            for (f, d, _), ids in zip(batch, self._encode([t for _, _, t in batch])):
                yield f, d, ids

    def _mixed(self, rank: int, world: int) -> Iterator[list[int]]:
        """The rank's tokenized documents of every source from the start, interleaved by the seeded source draws."""
        for _, _, _, ids in self._drawn(rank, world, StreamCursor.start(len(self.sources))):
            yield ids

    def _drawn(self, rank: int, world: int, cursor: StreamCursor) -> Iterator[tuple[int, int, int, list[int]]]:
        """``(source, file, doc, token ids)`` from ``cursor`` on; ``cursor`` is advanced past each document as it is given."""
        streams = [self._source_documents(i, rank, world, cursor) for i in range(len(self.sources))]
        if len(streams) == 1:
            choices: Iterator[int] = itertools.repeat(0)
        else:
            choices = self._choices(rank, world, cursor.draws)
        for choice in choices:
            f, d, ids = next(streams[choice])
            cursor.draws += len(streams) > 1
            yield choice, f, d, ids

    def _source_documents(self, index: int, rank: int, world: int, cursor: StreamCursor) -> Iterator[tuple[int, int, list[int]]]:
        """``(file, doc, token ids)`` of source ``index`` from ``cursor`` on, in file order or shuffled by windows;
        ``cursor`` is advanced past each document as it is given."""
        if self.cfg.shuffle_documents == 0:
            for f, d, ids in self._tokenized(self._texts(index, rank, world, cursor.files[index], cursor.docs[index])):
                cursor.files[index], cursor.docs[index] = f, d + 1
                yield f, d, ids
            return
        texts = self._texts(index, rank, world, cursor.files[index], cursor.docs[index])
        pending: tuple[int, int, str] | None = None
        while True:
            window, pending = self._window(texts, pending)
            seed = self.cfg.seed + 7919 * (index + 1) + 104729 * cursor.windows[index]
            if self.sharding(world) == "files":
                seed += 15485863 * (rank + 1)
            order = torch.randperm(len(window), generator=torch.Generator().manual_seed(seed)).tolist()
            rest = order[cursor.taken[index]:]
            for start in range(0, len(rest), _TOKENIZE_BATCH):
                batch = rest[start : start + _TOKENIZE_BATCH]
                for j, ids in zip(batch, self._encode([window[j][2] for j in batch])):
                    cursor.taken[index] += 1
                    yield window[j][0], window[j][1], ids
            last_file, last_doc, _ = window[-1]
            cursor.files[index], cursor.docs[index] = last_file, last_doc + 1
            cursor.taken[index] = 0
            cursor.windows[index] += 1

    def _window(self, texts: Iterator[tuple[int, int, str]], first: tuple[int, int, str] | None
                ) -> tuple[list[tuple[int, int, str]], tuple[int, int, str] | None]:
        """The next window: up to ``data.shuffle_documents`` documents ``(file, doc, text)`` of ``texts`` (after ``first``,
        a document already read), in file order, ending early where a pass over the files ends so that a window never
        holds a document twice; and the document read past its end (None: none)."""
        window = [] if first is None else [first]
        for item in texts:
            if window and item[:2] <= window[-1][:2]:  # the pass ended and restarted at the first file
                return window, item
            window.append(item)
            if len(window) == self.cfg.shuffle_documents:
                break
        return window, None

    def _choices(self, rank: int, world: int, skip: int) -> Iterator[int]:
        """The seeded source draws after the first ``skip`` (drawn again, without reading any data)."""
        weights = torch.tensor([s.weight for s in self.sources], dtype=torch.float64)
        seed = self.cfg.seed + (7919 * rank if self.sharding(world) == "files" else 0)
        gen = torch.Generator().manual_seed(seed)
        for _ in range(skip // _MIX_DRAWS):
            torch.multinomial(weights, _MIX_DRAWS, replacement=True, generator=gen)
        offset = skip % _MIX_DRAWS
        while True:
            yield from torch.multinomial(weights, _MIX_DRAWS, replacement=True, generator=gen).tolist()[offset:]
            offset = 0

    def _document(self, index: int, rank: int, world: int, file: int, doc: int) -> list[int]:
        """The token ids of one training document (the one a cursor's ``rest`` names)."""
        _, _, text = next(self._texts(index, rank, world, file, doc))
        return self._encode([text])[0]

    def blocks(self, rank: int = 0, world: int = 1) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Rank ``rank``'s blocks ``(input_ids, position_ids)`` (LongTensors [seq_len]), endlessly and in a fixed order."""
        for ids, pos, _ in self.resumable_blocks(rank, world):
            yield ids, pos

    def resumable_blocks(
        self, rank: int = 0, world: int = 1, cursor: StreamCursor | None = None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor, StreamCursor]]:
        """Rank ``rank``'s blocks from ``cursor`` on (None: the start), each with the cursor just after it.

        Continuing from a block's cursor gives exactly the blocks that follow it, without reading the
        documents before it again (beyond skipping rows of the file it stands in) or tokenizing them.
        """
        cur = StreamCursor.start(len(self.sources)) if cursor is None else cursor.copy()
        if len(cur.files) != len(self.sources):
            raise ConfigError(f"the stream cursor is for {len(cur.files)} source(s) but data names {len(self.sources)}; "
                              "resume with the data.source / data.mix of the checkpoint's run")
        by_block = self.sharding(world) == "blocks"
        pending = None
        if cur.rest is not None:
            s, f, d, offset = cur.rest
            pending = (s, f, d, self._document(s, rank, world, f, d), offset)
        docs = self._drawn(rank, world, cur)
        ids: list[int] = []
        pos: list[int] = []
        while True:
            if pending is None:
                s, f, d, doc = next(docs)
                start = 0
            else:
                (s, f, d, doc, start), pending = pending, None
            while start < len(doc):
                take = min(self.seq_len - len(ids), len(doc) - start)
                ids.extend(doc[start : start + take])
                pos.extend(range(take))
                start += take
                if len(ids) == self.seq_len:
                    index = cur.packed
                    cur.packed += 1
                    cur.rest = [s, f, d, start] if start < len(doc) else None
                    if not by_block or index % world == rank:
                        yield torch.tensor(ids, dtype=torch.long), torch.tensor(pos, dtype=torch.long), cur.copy()
                    ids, pos = [], []


@dataclass
class StreamCursor:
    """Where a rank's stream stands after a block: enough to continue it exactly (JSON-serialisable)."""

    files: list[int]
    """Per source: the rank's file (index into its files) holding the next document."""
    docs: list[int]
    """Per source: training documents of that file already taken."""
    draws: int = 0
    """Source choices the mixer has made."""
    packed: int = 0
    """Blocks packed so far (every rank's, under block sharding)."""
    rest: list[int] | None = None
    """``[source, file, doc, offset]``: the document split by the last block and the tokens of it already packed."""
    taken: list[int] = field(default_factory=list)
    """Per source, with ``data.shuffle_documents``: documents of the current window already given (the window starts
    at ``files`` / ``docs``)."""
    windows: list[int] = field(default_factory=list)
    """Per source, with ``data.shuffle_documents``: windows finished (it seeds the next window's order)."""

    def __post_init__(self) -> None:
        self.taken = list(self.taken) or [0] * len(self.files)
        self.windows = list(self.windows) or [0] * len(self.files)

    @classmethod
    def start(cls, num_sources: int) -> StreamCursor:
        return cls(files=[0] * num_sources, docs=[0] * num_sources)

    def copy(self) -> StreamCursor:
        return StreamCursor(list(self.files), list(self.docs), self.draws, self.packed, None if self.rest is None else list(self.rest),
                            list(self.taken), list(self.windows))

    def to_dict(self) -> dict:
        return {"files": list(self.files), "docs": list(self.docs), "draws": self.draws, "packed": self.packed, "rest": self.rest,
                "taken": list(self.taken), "windows": list(self.windows)}

    @classmethod
    def from_dict(cls, state: dict) -> StreamCursor:
        try:
            rest = state["rest"]
            return cls([int(x) for x in state["files"]], [int(x) for x in state["docs"]], int(state["draws"]),
                       int(state["packed"]), None if rest is None else [int(x) for x in rest],
                       [int(x) for x in state.get("taken", [])], [int(x) for x in state.get("windows", [])])
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError(f"the checkpoint's stream cursor is malformed ({e}); resume from another checkpoint") from None


def _heldout(cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, source: StreamSource) -> tuple[TokenBlocks, dict[int, int]]:
    """The first ``data.heldout_documents`` documents of ``source`` packed like the in-memory path, and how
    many documents each file gives to them."""
    column = "text" if source.column_fixed else cfg.text_column
    docs, cut = [], {}
    for file_index in range(len(source.files)):
        for text in iter_documents(source, file_index, column):
            if len(docs) == cfg.heldout_documents:
                break
            docs.append(text)
            cut[file_index] = cut.get(file_index, 0) + 1
        if len(docs) == cfg.heldout_documents:
            break
    eos = tokenizer.eos_token_id
    flat = [t for ids in tokenizer(docs, add_special_tokens=False)["input_ids"] for t in ids + ([eos] if eos is not None else [])]
    n = len(flat) // cfg.seq_len
    if n == 0:
        raise DataError(
            f"{source.name}: the first {len(docs)} document(s) (data.heldout_documents={cfg.heldout_documents}) hold "
            f"{len(flat)} tokens, less than one held-out sequence of {cfg.seq_len}; raise data.heldout_documents"
        )
    return TokenBlocks(torch.tensor(flat[: n * cfg.seq_len], dtype=torch.long).view(n, cfg.seq_len)), cut


def build_streaming_data(cfg: DataConfig, tokenizer: PreTrainedTokenizerBase) -> TextData:
    """Streaming TextData: ``stream`` for training, in-memory held-out sets (``heldout`` of ``data.source``,
    ``extra_heldout`` of each ``data.mix`` source), and the stream's first ``data.sample_blocks`` blocks as
    ``train`` (calibration and importance read them)."""
    cfg.validate()
    if not cfg.streaming:
        raise ConfigError("build_streaming_data needs data.streaming=true")
    sources = stream_sources(cfg)
    held = [_heldout(cfg, tokenizer, source) for source in sources]
    stream = TokenStream(cfg, tokenizer, sources, [cut for _, cut in held])
    heldout = held[0][0]
    sample = [ids for ids, _ in itertools.islice(stream.blocks(), cfg.sample_blocks)]
    if not sample:
        raise DataError(f"{cfg.source}: the training stream holds less than one sequence of {cfg.seq_len} tokens; use more data")
    data = TextData(train=TokenBlocks(torch.stack(sample)), heldout=heldout, config=cfg, stream=stream,
                    extra_heldout={source.name: blocks for source, (blocks, _) in zip(sources[1:], held[1:])})
    logger.info(
        "streaming data %s: %s; held-out blocks of %d tokens from the first %d documents of each source: %s",
        cfg.source, ", ".join(f"{s.name} ({len(s.files)} file(s), weight {s.weight:g})" for s in sources),
        cfg.seq_len, cfg.heldout_documents, ", ".join(f"{s.name} {len(b)}" for s, (b, _) in zip(sources, held)),
    )
    return data
