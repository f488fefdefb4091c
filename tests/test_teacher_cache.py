"""Teacher cache: build, reread against the live teacher, refusal of other inputs, resume after a crash."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model

from minidistill.distill import teacher_cache as tc
from minidistill.distill.teacher_cache import TeacherCache, TeacherCacheConfig, TeacherCacheError, build_teacher_cache, teacher_topk

VOCAB = {f"w{i}": i for i in range(128)}


def _blocks(n=10, t=9, seed=0):
    return torch.randint(3, 128, (n, t), generator=torch.Generator().manual_seed(seed))


def _cfg(**kw):
    return TeacherCacheConfig.from_dict({"enabled": True, "k": 5, "blocks_per_shard": 4, "batch_size": 3, "chunk_tokens": 7, **kw})


def test_reread_equals_live_teacher_topk(tmp_path):
    teacher, blocks = tiny_model("llama"), _blocks()
    cache = build_teacher_cache(_cfg(dtype="float32"), teacher, blocks, tmp_path / "c", tokenizer_vocab=VOCAB)
    order = torch.tensor([7, 0, 9, 4])
    idx, lp, rest = cache.rows(order)
    want_idx, want_lp, want_rest = teacher_topk(teacher, blocks[order], 5)
    assert idx.dtype == torch.int32 and torch.equal(idx.long(), want_idx)
    torch.testing.assert_close(lp, want_lp)
    torch.testing.assert_close(rest, want_rest)
    # rest is log(1 - sum of top-k probs)
    torch.testing.assert_close(rest.exp(), 1 - lp.exp().sum(-1), rtol=1e-4, atol=1e-5)
    half = build_teacher_cache(_cfg(), teacher, blocks, tmp_path / "h", tokenizer_vocab=VOCAB)
    assert half.rows(order)[1].dtype == torch.float16
    torch.testing.assert_close(half.rows(order)[1].float(), want_lp, rtol=2e-3, atol=2e-3)
    assert half.bytes_per_token() == 5 * 6 + 2


def test_cache_of_other_inputs_is_refused(tmp_path):
    teacher, blocks = tiny_model("llama"), _blocks()
    build_teacher_cache(_cfg(), teacher, blocks, tmp_path, tokenizer_vocab=VOCAB)
    with pytest.raises(TeacherCacheError, match=r"another teacher \(weights sha256\)"):
        build_teacher_cache(_cfg(), tiny_model("llama", seed=1), blocks, tmp_path, tokenizer_vocab=VOCAB)
    with pytest.raises(TeacherCacheError, match=r"another data \(token blocks sha256\)"):
        build_teacher_cache(_cfg(), teacher, _blocks(seed=1), tmp_path, tokenizer_vocab=VOCAB)
    with pytest.raises(TeacherCacheError, match=r"another tokenizer \(vocabulary sha256\)"):
        build_teacher_cache(_cfg(), teacher, blocks, tmp_path, tokenizer_vocab={**VOCAB, "x": 128})
    with pytest.raises(TeacherCacheError, match=r"another k \(k: cache 5, now 6\)"):
        build_teacher_cache(_cfg(k=6), teacher, blocks, tmp_path, tokenizer_vocab=VOCAB)
    with pytest.raises(TeacherCacheError, match=r"teacher_cache.k=129 exceeds the vocabulary \(128 tokens\)"):
        build_teacher_cache(_cfg(k=129), teacher, blocks, tmp_path / "big", tokenizer_vocab=VOCAB)


def test_a_killed_build_resumes_to_the_same_cache(tmp_path, monkeypatch):
    teacher, blocks = tiny_model("llama"), _blocks()
    whole = build_teacher_cache(_cfg(), teacher, blocks, tmp_path / "whole", tokenizer_vocab=VOCAB)
    real, calls = tc._write_shard, []

    def crash_on_second(tensors, path):
        calls.append(path.name)
        if len(calls) == 2:  # a half-written temporary file, then the process dies
            path.with_name(path.name + ".tmp").write_bytes(b"partial")
            raise KeyboardInterrupt
        real(tensors, path)

    monkeypatch.setattr(tc, "_write_shard", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        build_teacher_cache(_cfg(), teacher, blocks, tmp_path / "c", tokenizer_vocab=VOCAB)
    assert sorted(p.name for p in (tmp_path / "c").glob("shard_*")) == ["shard_00000.safetensors", "shard_00001.safetensors.tmp"]
    with pytest.raises(TeacherCacheError, match="incomplete"):
        TeacherCache(tmp_path / "c")
    monkeypatch.setattr(tc, "_write_shard", real)
    written = []
    monkeypatch.setattr(tc, "_write_shard", lambda t, p: (written.append(p.name), real(t, p)))
    resumed = build_teacher_cache(_cfg(), teacher, blocks, tmp_path / "c", tokenizer_vocab=VOCAB)
    assert written == ["shard_00001.safetensors", "shard_00002.safetensors"]  # the completed shard is kept
    assert not list((tmp_path / "c").glob("*.tmp"))
    all_blocks = torch.arange(len(blocks))
    for a, b in zip(resumed.rows(all_blocks), whole.rows(all_blocks)):
        assert torch.equal(a, b)
