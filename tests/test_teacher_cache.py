"""Teacher cache: build, reread against the live teacher, refusal of other inputs, resume after a crash."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_model

from minidistill.distill import teacher_cache as tc
from minidistill.distill.losses.cached import CachedLogitKDLoss
from minidistill.distill.teacher_cache import (
    TeacherCache,
    TeacherCacheConfig,
    TeacherCacheError,
    build_teacher_cache,
    sample_tail,
    teacher_topk,
)

VOCAB = {f"w{i}": i for i in range(128)}


def _blocks(n=10, t=9, seed=0):
    return torch.randint(3, 128, (n, t), generator=torch.Generator().manual_seed(seed))


def _cfg(**kw):
    return TeacherCacheConfig.from_dict({"enabled": True, "k": 5, "tail_samples": 0, "blocks_per_shard": 4, "batch_size": 3, "chunk_tokens": 7, **kw})


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
    with pytest.raises(TeacherCacheError, match=r"another tail_samples \(tail_samples: cache 0, now 4\)"):
        build_teacher_cache(_cfg(tail_samples=4), teacher, blocks, tmp_path, tokenizer_vocab=VOCAB)
    manifest = tmp_path / tc.MANIFEST  # a manifest written before the tail draws existed reads as tail_samples 0
    keys = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({k: v for k, v in keys.items() if k not in ("tail_samples", "seed")}))
    build_teacher_cache(_cfg(), teacher, blocks, tmp_path, tokenizer_vocab=VOCAB)
    near_full = build_teacher_cache(_cfg(k=120, tail_samples=10), teacher, blocks, tmp_path / "near", tokenizer_vocab=VOCAB)
    assert near_full.width == 128  # at most the 8 tokens outside the top-120 are drawn
    full = build_teacher_cache(_cfg(k=128, tail_samples=10, dtype="float32"), teacher, blocks, tmp_path / "full",
                               tokenizer_vocab=VOCAB)
    assert full.width == 128 and full.manifest["tail_samples"] == 0  # the top-k is the whole vocabulary: no draws
    _, full_lp, full_rest = full.rows(torch.arange(3))
    torch.testing.assert_close(full_lp.exp().sum(-1), torch.ones(3, 8), rtol=1e-5, atol=1e-5)
    with pytest.raises(TeacherCacheError, match=r"teacher_cache.k=129 exceeds the vocabulary \(128 tokens\)"):
        build_teacher_cache(_cfg(k=129), teacher, blocks, tmp_path / "big", tokenizer_vocab=VOCAB)


def _with_tail(tail_samples):
    return lambda **kw: _cfg(tail_samples=tail_samples, **kw)


def _dense(idx, lp, rest, vocab):
    """The stored distribution as dense probabilities [..., vocab] (the rest bucket left out)."""
    return torch.zeros(*idx.shape[:-1], vocab, dtype=torch.float64).scatter_add_(-1, idx.long(), lp.double().exp())


def test_tail_draws_keep_the_top_k_and_equal_the_teacher_in_expectation():
    logits = torch.randn(3, 40, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2
    lp = logits.log_softmax(-1)
    top = lp.topk(4, -1)
    rest = torch.logsumexp(lp.scatter(-1, top.indices, float("-inf")), -1)
    gen = torch.Generator().manual_seed(1)
    ids, wl = sample_tail(lp, top.indices, rest, 8, gen)
    assert ids.shape == wl.shape == (3, 8)
    assert not (ids.unsqueeze(-1) == top.indices.unsqueeze(-2)).logical_and(torch.isfinite(wl).unsqueeze(-1)).any()
    one = _dense(torch.cat([top.indices, ids], -1), torch.cat([top.values, wl], -1), rest, 40)
    torch.testing.assert_close(one.sum(-1), torch.ones(3, dtype=torch.float64))  # sums to one: no bucket needed
    torch.testing.assert_close(one.gather(-1, top.indices), top.values.exp())  # the top-k exactly
    drawn = torch.isfinite(wl)
    assert len(set(ids[0][drawn[0]].tolist())) == int(drawn[0].sum())  # distinct ids, no duplicates
    mean = sum(_dense(*sample_tail(lp, top.indices, rest, 8, gen), rest, 40) for _ in range(3000)) / 3000
    want = lp.exp().scatter(-1, top.indices, 0.0)
    torch.testing.assert_close(mean, want, atol=4e-3, rtol=0)
    # a row whose top-k hold all the mass gets no draws
    only_top = torch.full_like(lp, float("-inf")).scatter(-1, top.indices, top.values).log_softmax(-1)
    no_rest = torch.logsumexp(only_top.scatter(-1, top.indices, float("-inf")), -1)
    ids, wl = sample_tail(only_top, top.indices, no_rest, 8, gen)
    assert torch.isneginf(no_rest).all() and torch.isneginf(wl).all()


def test_the_loss_on_a_cache_with_tail_draws_is_the_kl_to_the_stored_distribution(tmp_path):
    teacher, blocks = tiny_model("llama"), _blocks(n=4)
    cache = build_teacher_cache(_cfg(dtype="float32", tail_samples=6), teacher, blocks, tmp_path, tokenizer_vocab=VOCAB)
    assert cache.width == 11 and cache.bytes_per_token() == 11 * 8 + 4
    idx, lp, rest = cache.rows(torch.arange(4))
    assert idx.shape == (4, 8, 11) and torch.isneginf(rest).all()
    target = _dense(idx, lp, rest, 128)
    torch.testing.assert_close(target.sum(-1), torch.ones(4, 8, dtype=torch.float64), rtol=0, atol=1e-6)
    want_idx, want_lp, _ = teacher_topk(teacher, blocks, 5)
    assert torch.equal(idx[..., :5].long(), want_idx)
    torch.testing.assert_close(lp[..., :5], want_lp)
    h = torch.randn(4, 8, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(128, 16, dtype=torch.float64, requires_grad=True)
    got = CachedLogitKDLoss(chunk_tokens=5)(h.float(), w.float(), idx, lp, rest)
    lq = (h @ w.t()).log_softmax(-1)
    ref = torch.where(target > 0, target * (target.log() - lq), torch.zeros_like(lq)).sum(-1).mean()
    torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-5)
    got_grads = torch.autograd.grad(CachedLogitKDLoss(chunk_tokens=5)(h, w, idx, lp, rest), (h, w))
    for g, r in zip(got_grads, torch.autograd.grad(ref, (h, w))):
        torch.testing.assert_close(g, r)


@pytest.mark.parametrize("tail_samples", [0, 6])
def test_a_killed_build_resumes_to_the_same_cache(tmp_path, monkeypatch, tail_samples):
    teacher, blocks = tiny_model("llama"), _blocks()
    _cfg = _with_tail(tail_samples)
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
