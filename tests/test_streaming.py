"""Streaming data: packing with document boundaries, sharding, mixing, bad input, exact resume, flat memory."""

from __future__ import annotations

import itertools
import json
import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import datasets
import psutil
import pytest
import test_train_loop
import torch
from conftest import tiny_model

from minidistill.config import ConfigError
from minidistill.data import DataConfig, DataError, build_text_data, check_data_source
from minidistill.streaming import StreamCursor, TokenStream, build_streaming_data, pack_documents, packed_positions, stream_sources
from minidistill.training.loop import Distiller
from minidistill.training.sampler import ResumableBlockSampler, StreamingBlockSampler


class ByteTokenizer:
    """UTF-8 bytes folded into ids 3..127 (fits the tiny models' vocabulary); EOS is 2."""

    eos_token_id = 2
    table = bytes(3 + b % 125 for b in range(256))

    def __call__(self, texts, add_special_tokens=False):
        return {"input_ids": [list(t.encode().translate(self.table)) for t in texts]}


TOK = ByteTokenizer()


def _docs(prefix: str, n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    words = ["alpha", "beta", "gamma", "delta", "river", "stone", "cloud", "paper"]
    return [f"{prefix}{i} " + " ".join(rng.choice(words) for _ in range(rng.randint(1, 12))) for i in range(n)]


def _write_txt(path, docs):
    path.write_text("\n".join(docs) + "\n")
    return path


def _flat(docs):
    return [t for ids in TOK(docs)["input_ids"] for t in ids + [TOK.eos_token_id]]


def _stream(cfg: DataConfig) -> TokenStream:
    data = build_streaming_data(cfg, TOK)
    return data.stream


def _take(it, n):
    return list(itertools.islice(it, n))


# ---------------------------------------------------------------------------------------------- packing


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_block_gives_the_logits_of_each_document_run_alone(attn):
    model = tiny_model("llama", attn_implementation=attn)
    g = torch.Generator().manual_seed(0)
    docs = [torch.randint(3, 128, (n,), generator=g).tolist() for n in (5, 9, 3, 6)]
    assert len(list(pack_documents(docs, 12))) == 1  # 23 tokens: the incomplete second block is held back
    blocks = list(pack_documents(docs, 11))  # [5 + 6 of 9], [3 of 9 + 3 + 5 of 6]
    assert [p for p in blocks[0][1]] == [0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5]
    assert [p for p in blocks[1][1]] == [0, 1, 2, 0, 1, 2, 0, 1, 2, 3, 4]
    ids = torch.tensor([b[0] for b in blocks])
    pos = torch.tensor([b[1] for b in blocks])
    with torch.no_grad(), packed_positions([model], pos):
        packed = model(input_ids=ids).logits
    with torch.no_grad():
        unpacked = model(input_ids=ids).logits
        pieces = [(0, 0, 5), (0, 5, 11), (1, 0, 3), (1, 3, 6), (1, 6, 11)]
        for row, a, b in pieces:
            alone = model(input_ids=ids[row : row + 1, a:b]).logits[0]
            torch.testing.assert_close(packed[row, a:b], alone, atol=2e-5, rtol=1e-4)
    # Without the position ids the second document attends to the first (the check can fail).
    assert (unpacked[0, 5:11] - packed[0, 5:11]).abs().max() > 1e-3


def test_stream_blocks_are_the_concatenated_training_documents_of_every_file_format(tmp_path):
    docs = _docs("doc", 60)
    _write_txt(tmp_path / "d.txt", docs)
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps({"body": d, "id": i}) for i, d in enumerate(docs)))
    datasets.Dataset.from_dict({"text": docs}).to_parquet(str(tmp_path / "d.parquet"))
    ref = _flat(docs[10:])  # the first 10 documents are held out
    n = len(ref) // 16
    out = {}
    for name, column in (("d.txt", "text"), ("d.jsonl", "body"), ("d.parquet", "text")):
        cfg = DataConfig(source=str(tmp_path / name), text_column=column, seq_len=16, streaming=True, heldout_documents=10, sample_blocks=4,
                         shuffle_documents=0)
        data = build_text_data(cfg, TOK)
        blocks = _take(data.stream.blocks(), n)
        out[name] = torch.stack([ids for ids, _ in blocks])
        assert torch.equal(data.train.input_ids, out[name][:4])
        held = _flat(docs[:10])
        assert torch.equal(data.heldout.input_ids.flatten(), torch.tensor(held[: len(held) // 16 * 16]))
    assert torch.equal(out["d.txt"].flatten(), torch.tensor(ref[: n * 16]))
    assert torch.equal(out["d.jsonl"], out["d.txt"]) and torch.equal(out["d.parquet"], out["d.txt"])
    # The stream restarts at the first training document after a pass (the held-out ones stay out).
    more = _take(_stream(DataConfig(source=str(tmp_path / "d.txt"), seq_len=16, streaming=True, heldout_documents=10, sample_blocks=4,
                                    shuffle_documents=0)).blocks(), 2 * n + 2)
    flat = torch.stack([ids for ids, _ in more]).flatten().tolist()
    assert flat == (ref + ref + ref)[: len(flat)]


# ---------------------------------------------------------------------------------------------- sharding


def test_block_sharding_splits_the_one_rank_stream_disjointly(tmp_path):
    _write_txt(tmp_path / "a.txt", _docs("a", 80))
    stream = _stream(DataConfig(source=str(tmp_path / "a.txt"), seq_len=16, streaming=True, heldout_documents=5, sample_blocks=1))
    assert stream.sharding(2) == "blocks"  # one file, two processes
    one = _take(stream.blocks(), 40)
    r0, r1 = _take(stream.blocks(0, 2), 20), _take(stream.blocks(1, 2), 20)
    for got, want in ((r0, one[0::2]), (r1, one[1::2])):
        assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(got, want, strict=True))
    # Through the sampler, micro-batch k of 2 processes x 3 blocks is the one-process stream's blocks [6k, 6k + 6).
    s0, s1 = (StreamingBlockSampler(stream, 3, num_replicas=2, rank=r) for r in (0, 1))
    for k in range(3):
        got = sorted(tuple(row.tolist()) for s in (s0, s1) for row in s.next_batch()[0])
        assert got == sorted(tuple(ids.tolist()) for ids, _ in one[6 * k : 6 * k + 6])


def test_file_sharding_gives_each_rank_its_own_files(tmp_path):
    files = {f"part-{i}.txt": _docs(f"f{i}-", 30, seed=i) for i in range(4)}
    for name, docs in files.items():
        _write_txt(tmp_path / name, docs)
    cfg = DataConfig(source=str(tmp_path / "part-*.txt"), seq_len=16, streaming=True, heldout_documents=4, sample_blocks=1,
                     shuffle_documents=0)
    stream = _stream(cfg)
    assert stream.sharding(2) == "files" and stream.sharding(5) == "blocks"
    ordered = [files[f"part-{i}.txt"] for i in range(4)]
    for rank, own in ((0, ordered[0][4:] + ordered[2]), (1, ordered[1] + ordered[3])):
        ref = _flat(own)
        got = torch.stack([ids for ids, _ in _take(stream.blocks(rank, 2), len(ref) // 16)]).flatten().tolist()
        assert got == ref[: len(got)]
    # A folder names the same files.
    assert stream_sources(DataConfig(source=str(tmp_path), streaming=True))[0].files == stream.sources[0].files


# ---------------------------------------------------------------------------------------------- mixing


def test_weighted_mixing_is_seeded_and_follows_the_weights(tmp_path):
    _write_txt(tmp_path / "a.txt", _docs("A", 50))
    _write_txt(tmp_path / "b.txt", _docs("B", 50, seed=1))
    _write_txt(tmp_path / "c.txt", _docs("C", 50, seed=2))
    base = dict(source=str(tmp_path / "a.txt"), mix=[str(tmp_path / "b.txt"), str(tmp_path / "c.txt")], seq_len=16,
                streaming=True, heldout_documents=2, sample_blocks=1)

    def sources_drawn(seed, weights, n=2000):
        stream = _stream(DataConfig(**base, seed=seed, mix_weights=weights))
        first = {TOK([c])["input_ids"][0][0]: c for c in "ABC"}
        return [first[doc[0]] for doc in _take(stream._mixed(0, 1), n)]

    a = sources_drawn(0, [3.0, 1.0, 0.0])
    assert a == sources_drawn(0, [3.0, 1.0, 0.0])
    assert a != sources_drawn(1, [3.0, 1.0, 0.0])
    assert "C" not in a
    assert abs(a.count("A") / len(a) - 0.75) < 0.04


def test_shuffle_windows_permute_the_documents_of_each_window_anew_every_pass(tmp_path):
    docs = _docs("d", 40)
    _write_txt(tmp_path / "d.txt", docs)
    train = [tuple(_flat([d])) for d in docs[4:]]  # 36 training documents: windows of 10, 10, 10 and 6 per pass
    cfg = DataConfig(source=str(tmp_path / "d.txt"), seq_len=16, streaming=True, heldout_documents=4, sample_blocks=1,
                     shuffle_documents=10)
    got = [tuple(d) for d in _take(_stream(cfg)._mixed(0, 1), 3 * len(train))]
    windows = [(0, 10), (10, 20), (20, 30), (30, 36)]
    passes = [got[i * len(train) : (i + 1) * len(train)] for i in range(3)]
    for seen in passes:
        for lo, hi in windows:  # every window holds exactly its documents of the file, in another order
            assert sorted(seen[lo:hi]) == sorted(train[lo:hi])
        assert seen != train
    assert passes[0] != passes[1] != passes[2]  # every window of every pass has its own order
    assert got == [tuple(d) for d in _take(_stream(cfg)._mixed(0, 1), 3 * len(train))]  # seeded
    assert got != [tuple(d) for d in _take(_stream(DataConfig(**{**cfg.to_dict(), "seed": 1}))._mixed(0, 1), 3 * len(train))]
    with pytest.raises(ConfigError, match="data.shuffle_documents=-1"):
        DataConfig(source=str(tmp_path / "d.txt"), streaming=True, shuffle_documents=-1).validate()


def test_every_mixed_source_has_its_own_held_out_documents_that_training_skips(tmp_path):
    a_docs, b_docs = _docs("a", 40), _docs("b", 40, seed=3)
    a, b = _write_txt(tmp_path / "a.txt", a_docs), _write_txt(tmp_path / "b.txt", b_docs)
    data = build_text_data(DataConfig(source=str(a), mix=[str(b)], seq_len=16, streaming=True, heldout_documents=6,
                                      sample_blocks=1, shuffle_documents=0), TOK)
    for blocks, docs in ((data.heldout, a_docs), (data.extra_heldout[str(b)], b_docs)):
        want = _flat(docs[:6])
        assert blocks.input_ids.flatten().tolist() == want[: len(want) // 16 * 16]
    first = {TOK(["a"])["input_ids"][0][0]: a_docs, TOK(["b"])["input_ids"][0][0]: b_docs}
    trained = _take(data.stream._mixed(0, 1), 120)  # beyond one pass over each source
    for docs in (a_docs, b_docs):
        seen = [d for d in trained if first[d[0]] is docs]
        assert seen[0] == _flat([docs[6]])  # training starts after the held-out documents
        held = {tuple(_flat([d])) for d in docs[:6]}
        assert not any(tuple(d) in held for d in seen)


def test_budget_search_runs_on_streaming_data_with_the_default_block_counts(tmp_path):
    """data.sample_blocks' default holds prune.calib_blocks' default plus the search's scoring blocks."""
    from test_prune_pipeline import prune_cfg

    from minidistill.prune.pipeline import PruneConfig, prune_model
    from minidistill.prune.targets import SearchConfig

    _write_txt(tmp_path / "a.txt", _docs("a", 400))
    data = build_text_data(DataConfig(source=str(tmp_path / "a.txt"), seq_len=16, streaming=True, heldout_documents=5), TOK)
    calib, score = PruneConfig().calib_blocks, SearchConfig().score_blocks
    assert len(data.train) >= calib + score
    teacher = tiny_model("llama", num_layers=4, num_heads=8, num_kv_heads=4, intermediate_size=128)
    res = prune_model(teacher, None, data, prune_cfg(target={"params": 0.6}, calib_blocks=calib,
                                                     search={"score_blocks": score}), teacher_source="tiny")
    assert res.prune_map.notes["search"]["scored_on"] == f"train_tail ({score} blocks)"


# ---------------------------------------------------------------------------------------------- bundled and Hub sources


def test_a_bundled_corpus_streams_its_in_memory_documents():
    from minidistill.corpora import bundled_documents

    for name in ("news", "wiki"):
        docs = bundled_documents(name)
        cfg = DataConfig(source=f"bundled:{name}", seq_len=32, streaming=True, heldout_documents=5, sample_blocks=1,
                         shuffle_documents=0)
        data = build_text_data(cfg, TOK)
        held = _flat(docs[:5])
        assert data.heldout.input_ids.flatten().tolist() == held[: len(held) // 32 * 32]
        assert _take(data.stream._mixed(0, 1), 8) == [_flat([d]) for d in docs[5:13]]


def test_a_hub_dataset_streams_by_shard_with_the_resume_of_local_files(tmp_path, monkeypatch):
    """A Hub name opens ``load_dataset(name, config, split=..., streaming=True)``; its shards stand in for files.
    Offline here, the Hub's loader is replaced by the same call on three local JSON-lines shards."""
    import minidistill.streaming as streaming

    shards = {i: _docs(f"s{i}-", 20, seed=i) for i in range(3)}
    files = []
    for i, docs in shards.items():
        files.append(str(tmp_path / f"shard-{i}.jsonl"))
        Path(files[-1]).write_text("\n".join(json.dumps({"content": d}) for d in docs))
    real = datasets.load_dataset
    opened = []

    def hub_load(name, *args, **kwargs):
        if name != "org/corpus":
            return real(name, *args, **kwargs)
        opened.append((name, args, kwargs))
        return real("json", data_files=files, split=kwargs["split"], streaming=kwargs["streaming"])

    monkeypatch.setattr(streaming, "load_dataset", hub_load)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    streaming.hub_dataset.cache_clear()
    cfg = DataConfig(source="org/corpus", hub_config="en", hub_split="train", text_column="content", seq_len=16,
                     streaming=True, heldout_documents=3, sample_blocks=1, shuffle_documents=0)
    stream = _stream(cfg)
    assert opened[0] == ("org/corpus", ("en",), {"split": "train", "streaming": True})
    assert len(stream.sources[0].files) == 3 and stream.sharding(3) == "files" and stream.sharding(4) == "blocks"
    # Held out: the first 3 documents (all in shard 0); each of 3 processes reads its own shard.
    for rank in range(3):
        own = shards[rank][3:] if rank == 0 else shards[rank]
        assert _take(stream._mixed(rank, 3), len(own)) == [_flat([d]) for d in own]
    # Shuffled, a cursor taken mid-stream continues exactly (as for local files).
    stream = _stream(DataConfig(**{**cfg.to_dict(), "shuffle_documents": 4}))
    full = _take(stream.resumable_blocks(1, 3), 60)
    resumed = _take(stream.resumable_blocks(1, 3, StreamCursor.from_dict(full[17][2].to_dict())), 42)
    assert all(torch.equal(a[0], b[0]) and a[2] == b[2] for a, b in zip(full[18:], resumed, strict=True))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    streaming.hub_dataset.cache_clear()
    with pytest.raises(DataError, match="offline mode .* forbids streaming it from the Hub"):
        check_data_source(cfg)
    streaming.hub_dataset.cache_clear()


# ---------------------------------------------------------------------------------------------- bad input


def test_bad_streaming_input_fails_early_with_one_clear_message(tmp_path):
    _write_txt(tmp_path / "a.txt", _docs("a", 20))
    src = str(tmp_path / "a.txt")
    with pytest.raises(ConfigError, match="non-negative weights with a positive sum"):
        DataConfig(source=src, mix=[src + "x"], streaming=True, mix_weights=[0.0, 0.0]).validate()
    with pytest.raises(ConfigError, match="one weight per source"):
        DataConfig(source=src, streaming=True, mix_weights=[1.0, 1.0]).validate()
    with pytest.raises(ConfigError, match="data.mix_weights applies to data.streaming"):
        DataConfig(source=src, mix_weights=[1.0]).validate()
    with pytest.raises(DataError, match="no such file or folder"):
        check_data_source(DataConfig(source=str(tmp_path / "nope.txt"), streaming=True))
    with pytest.raises(DataError, match="matches no file"):
        check_data_source(DataConfig(source=str(tmp_path / "*.parquet"), streaming=True))
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps({"body": d, "id": 1}) for d in _docs("b", 5)))
    with pytest.raises(DataError, match=r"no column 'text'; columns are \['body', 'id'\]"):
        build_text_data(DataConfig(source=str(tmp_path / "b.jsonl"), streaming=True, seq_len=8), TOK)
    # Two files for two processes shard by file; one of them holds no document, so its rank gets nothing.
    (tmp_path / "shards").mkdir()
    _write_txt(tmp_path / "shards" / "0.txt", _docs("x", 30))
    (tmp_path / "shards" / "1.txt").write_text("\n  \n\n")
    stream = _stream(DataConfig(source=str(tmp_path / "shards"), streaming=True, seq_len=8, heldout_documents=2, sample_blocks=1))
    assert len(_take(stream.blocks(0, 2), 3)) == 3
    with pytest.raises(DataError, match=r"rank 1 of 2: .*1\.txt.* hold no non-empty training document.*needs 2 files with text"):
        next(stream.blocks(1, 2))
    with pytest.raises(ConfigError, match="data.streaming=true run"):
        ResumableBlockSampler(10, 2).load_state_dict(StreamingBlockSampler(stream, 2).state_dict())
    with pytest.raises(ConfigError, match="same number of processes"):
        StreamingBlockSampler(stream, 2).load_state_dict(StreamingBlockSampler(stream, 1, num_replicas=2).state_dict())


# ---------------------------------------------------------------------------------------------- resume


def _distiller(run_dir, data, monkeypatch) -> Distiller:
    """test_train_loop's pruned tiny llama student and teacher, trained on ``data``."""
    monkeypatch.setattr(test_train_loop, "_data", lambda: data)
    return test_train_loop.make_distiller(run_dir, loss={"hidden": {"weight": 1.0}, "balance": "auto"}, eval={"max_blocks": 2})


def _records(run_dir):
    return [(r["step"], r["loss"], r["loss/hidden"], r["weight/hidden"])
            for r in map(json.loads, (run_dir / "log.jsonl").read_text().splitlines()) if r["kind"] == "train"]


def test_streaming_resume_sees_the_batches_of_an_uninterrupted_run(tmp_path, monkeypatch):
    _write_txt(tmp_path / "a.txt", _docs("a", 200))
    _write_txt(tmp_path / "b.txt", _docs("b", 200, seed=3))
    cfg = DataConfig(source=str(tmp_path / "a.txt"), mix=[str(tmp_path / "b.txt")], mix_weights=[2.0, 1.0], seq_len=16,
                     streaming=True, heldout_documents=20, sample_blocks=4)
    data = build_text_data(cfg, TOK)
    full = _distiller(tmp_path / "full", data, monkeypatch)
    full.run()
    part = _distiller(tmp_path / "part", data, monkeypatch)
    part.train_cfg.max_steps = 2  # stops early on the 4-step schedule
    part.run()
    assert part.sampler.state_dict()["stream_blocks"] == 8 and len(part.sampler.state_dict()["stream_cursor"]) == 1
    resumed = _distiller(tmp_path / "part", data, monkeypatch)
    resumed.run(resume=tmp_path / "part" / "checkpoints" / "step-00000002")
    assert _records(tmp_path / "part") == _records(tmp_path / "full")
    assert [s for s, *_ in _records(tmp_path / "full")] == [1, 2, 3, 4]
    for (name, a), b in zip(full.module.state_dict().items(), resumed.module.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert full.sampler.blocks_taken == 16 > len(data.train)  # read from the stream, not the in-memory sample


class CountingTokenizer(ByteTokenizer):
    """ByteTokenizer that counts the documents it tokenizes."""

    def __init__(self):
        self.documents = 0

    def __call__(self, texts, add_special_tokens=False):
        self.documents += len(texts)
        return super().__call__(texts, add_special_tokens)


@pytest.mark.parametrize("shuffle", [0, 7])
@pytest.mark.parametrize("layout", ["mix", "block_sharding", "file_sharding"])
def test_stream_cursor_continues_exactly_without_tokenizing_the_consumed_documents(tmp_path, layout, shuffle):
    """Also in the middle of a shuffle window (7 documents: windows end inside files and at pass ends)."""
    if layout == "file_sharding":
        for i in range(4):
            _write_txt(tmp_path / f"part-{i}.txt", _docs(f"f{i}-", 25, seed=i))
        cfg = DataConfig(source=str(tmp_path / "part-*.txt"), seq_len=16, streaming=True, heldout_documents=3, sample_blocks=1,
                         shuffle_documents=shuffle)
    else:
        _write_txt(tmp_path / "a.txt", _docs("a", 60))
        _write_txt(tmp_path / "b.txt", _docs("b", 40, seed=3))
        mix = {"mix": [str(tmp_path / "b.txt")], "mix_weights": [2.0, 1.0]} if layout == "mix" else {}
        cfg = DataConfig(source=str(tmp_path / "a.txt"), seq_len=16, streaming=True, heldout_documents=5, sample_blocks=1,
                         shuffle_documents=shuffle, **mix)
    rank, world = (0, 1) if layout == "mix" else (1, 2)
    stream = build_streaming_data(cfg, TOK).stream
    assert stream.sharding(world) == {"mix": "blocks", "block_sharding": "blocks", "file_sharding": "files"}[layout]
    counting = CountingTokenizer()
    stream.tokenizer = counting
    full, tokenized = [], []  # the uninterrupted stream, several passes over every file
    for block in itertools.islice(stream.resumable_blocks(rank, world), 1460):
        full.append(block)
        tokenized.append(counting.documents)
    assert any(c.rest is not None for _, _, c in full) and any(c.rest is None for _, _, c in full)
    bound = 64 * (len(stream.sources) + 1) + 1  # a tokenizer batch per source, and the document split by the cut
    assert tokenized[1400] > 2 * bound  # what a replay to block 1400 tokenizes
    for cut in (0, 3, 77, 1400):
        cursor = StreamCursor.from_dict(json.loads(json.dumps(full[cut][2].to_dict())))  # as a checkpoint stores it
        counting.documents = 0
        resumed = _take(stream.resumable_blocks(rank, world, cursor), 40)
        for (a_ids, a_pos, a_cur), (b_ids, b_pos, b_cur) in zip(full[cut + 1 : cut + 41], resumed, strict=True):
            assert torch.equal(a_ids, b_ids) and torch.equal(a_pos, b_pos) and a_cur == b_cur
        assert counting.documents <= bound, (cut, counting.documents)
    with pytest.raises(ConfigError, match="stream cursor is malformed"):
        StreamCursor.from_dict({"files": [0]})


def test_streaming_sampler_resumes_from_its_cursor_and_from_a_cursorless_checkpoint(tmp_path):
    _write_txt(tmp_path / "a.txt", _docs("a", 80))
    _write_txt(tmp_path / "b.txt", _docs("b", 80, seed=4))
    cfg = DataConfig(source=str(tmp_path / "a.txt"), mix=[str(tmp_path / "b.txt")], seq_len=16, streaming=True,
                     heldout_documents=5, sample_blocks=1)
    stream = build_streaming_data(cfg, TOK).stream
    ref = StreamingBlockSampler(stream, 3)
    for _ in range(5):
        ref.next_batch()
    state = json.loads(json.dumps(ref.state_dict()))
    assert state["stream_blocks"] == 15 and len(state["stream_cursor"]) == 1
    after = [ref.next_batch() for _ in range(3)]
    cursorless = {k: v for k, v in state.items() if k != "stream_cursor"}  # written before cursors existed: replayed
    for saved in (state, cursorless):
        s = StreamingBlockSampler(stream, 3)
        s.load_state_dict(saved)
        assert (s.cursor is None) == (saved is cursorless)
        for want in after:
            got = s.next_batch()
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    other = _write_txt(tmp_path / "c.txt", _docs("c", 80, seed=5))
    moved = build_streaming_data(DataConfig(source=cfg.source, mix=[str(other)], seq_len=16, streaming=True,
                                            heldout_documents=5, sample_blocks=1), TOK).stream
    with pytest.raises(ConfigError, match="same data.source / data.mix files"):
        StreamingBlockSampler(moved, 3).load_state_dict(state)
    reordered = build_streaming_data(DataConfig(**{**cfg.to_dict(), "shuffle_documents": 0}), TOK).stream
    with pytest.raises(ConfigError, match="resume with data.shuffle_documents=1024"):
        StreamingBlockSampler(reordered, 3).load_state_dict(state)


# ---------------------------------------------------------------------------------------------- memory


def _write_large(path, megabytes: int) -> int:
    rng = random.Random(0)
    words = ["alpha", "beta", "gamma", "delta", "river", "stone", "cloud", "paper", "window", "garden"]
    chunk = "\n".join(" ".join(rng.choice(words) for _ in range(rng.randint(20, 200))) for _ in range(1000)) + "\n"
    data = chunk.encode()
    with path.open("wb") as fh:
        for _ in range(megabytes * (1 << 20) // len(data) + 1):
            fh.write(data)
    return path.stat().st_size


def _rss_mb() -> float:
    return psutil.Process().memory_info().rss / (1 << 20)


def test_streaming_a_large_file_keeps_memory_flat(tmp_path):
    size = _write_large(tmp_path / "big.txt", 200)
    assert size > 200 * (1 << 20)
    _write_txt(tmp_path / "small.txt", _docs("s", 50))  # imports and first-use caches of the readers are not data
    _take(_stream(DataConfig(source=str(tmp_path / "small.txt"), seq_len=64, streaming=True, heldout_documents=10, sample_blocks=2)).blocks(), 3)
    rss0 = _rss_mb()
    cfg = DataConfig(source=str(tmp_path / "big.txt"), seq_len=1024, streaming=True, heldout_documents=10, sample_blocks=2)
    it = _stream(cfg).blocks()
    for _ in itertools.islice(it, 4000):  # about 4 MB of text
        pass
    rss1 = _rss_mb()
    for _ in itertools.islice(it, 16000):  # 16 MB more
        pass
    rss2 = _rss_mb()
    assert rss1 - rss0 < 70, (rss0, rss1)  # the reader's buffers, not the 200 MB file
    assert rss2 - rss1 < 25, (rss1, rss2)  # and reading on does not grow it


@pytest.mark.slow
def test_a_whole_pass_over_a_large_file_keeps_memory_flat(tmp_path):
    size = _write_large(tmp_path / "big.txt", 200)
    cfg = DataConfig(source=str(tmp_path / "big.txt"), seq_len=4096, streaming=True, heldout_documents=10, sample_blocks=2)
    rss = []
    for n, _ in enumerate(_stream(cfg).blocks(), 1):
        if n % 2500 == 0:  # every 10 MB
            rss.append(_rss_mb())
        if n * 4096 >= size:  # one pass (one token a byte)
            break
    assert len(rss) >= 19
    assert max(rss) - rss[0] < 40, rss  # the 200 MB file adds no more than the reader's buffers


# ---------------------------------------------------------------------------------------------- two processes

_TWO_PROCESS_SCRIPT = """
import json
import sys
from pathlib import Path

sys.path.insert(0, {tests!r})
import torch

torch.set_num_threads(1)
import test_train_loop
from test_streaming import TOK

from minidistill.data import DataConfig, build_text_data

data = build_text_data(DataConfig(source=sys.argv[2], seq_len=16, streaming=True, heldout_documents=20, sample_blocks=4), TOK)
test_train_loop._data = lambda: data
make = lambda: test_train_loop.make_distiller(Path(sys.argv[1]), loss={{"hidden": {{"weight": 1.0}}}}, eval={{"max_blocks": 2}})
d = make()
if len(sys.argv) > 3:  # stop after 2 of the 4 steps, then resume from that checkpoint through the stream cursors
    d.train_cfg.max_steps = 2
    d.run()
    ckpt = Path(sys.argv[1]) / "checkpoints" / "step-00000002"
    state = json.loads((ckpt / "trainer_state.json").read_text())["data_position"]
    assert len(state["stream_cursor"]) == d.accelerator.num_processes, state
    d = make()
    d.run(resume=ckpt)
else:
    d.run()
assert d.sampler.stream.sharding(d.accelerator.num_processes) == "blocks"
"""


@pytest.mark.slow
def test_two_processes_read_disjoint_blocks_and_reproduce_the_one_process_run(tmp_path):
    """accelerate launch, 2 CPU processes (DDP): each reads its half of the stream; the losses are one process's,
    and a 2-process run stopped after 2 steps and resumed has the uninterrupted 2-process losses."""
    tests = Path(__file__).resolve().parent
    script = tmp_path / "stream_distill.py"
    script.write_text(_TWO_PROCESS_SCRIPT.format(tests=str(tests)))
    src = _write_txt(tmp_path / "a.txt", _docs("a", 300))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(tests.parent), os.environ.get("PYTHONPATH", "")]))
    env["ACCELERATE_USE_CPU"] = "true"  # without it the two CPU processes never join one process group
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)  # left by earlier in-process tests of the same pytest worker
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
              "--main_process_port", port, "--mixed_precision", "no", "--dynamo_backend", "no"]
    for cmd, run, extra in (([sys.executable], "one", []), (launch, "two", []), (launch, "two_resumed", ["resume"])):
        proc = subprocess.run([*cmd, str(script), str(tmp_path / run), str(src), *extra], env=env, capture_output=True,
                              text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
    one, two, resumed = (_records(tmp_path / run) for run in ("one", "two", "two_resumed"))
    assert [r[0] for r in two] == [1, 2, 3, 4]
    for a, b in zip(one, two, strict=True):
        assert b[1:] == pytest.approx(a[1:], rel=5e-5)
    assert resumed == two  # each rank continued from its own cursor
