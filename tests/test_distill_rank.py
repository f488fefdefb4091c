"""Short-distillation ranking: teacher work shared across candidates gives the losses of a naive loop
with a teacher forward per candidate and full logits; ranking by held-out score after the steps; the
winner returned as its pruned init; too many steps for the data fails before pruning."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_model
from test_prune_pipeline import prune_cfg, tiny_data

from minidistill.config import ConfigError
from minidistill.evaluation.perplexity import heldout_loss
from minidistill.prune.distill_rank import check_distill_data, distill_batches, distill_rank, short_distill
from minidistill.prune.pipeline import prune_model
from minidistill.prune.targets import SHAPE_TARGET_KEYS, SearchConfig, teacher_hidden_states


def naive_distill(student, teacher, batches, *, lr, seed, predicting_only: bool = False):
    """Reference: per step a teacher forward and full-vocabulary logits, forward KL by F.kl_div (``predicting_only``:
    over the positions that predict a next token, as the teacher cache holds them)."""
    torch.manual_seed(seed)
    opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=lr)
    losses = []
    student.train()
    for ids in batches:
        with torch.no_grad():
            t_logp = F.log_softmax(teacher(input_ids=ids).logits.double(), -1)
        s_logp = F.log_softmax(student(input_ids=ids).logits.double(), -1)
        if predicting_only:
            t_logp, s_logp = t_logp[:, :-1], s_logp[:, :-1]
        loss = F.kl_div(s_logp.reshape(-1, s_logp.shape[-1]), t_logp.reshape(-1, t_logp.shape[-1]),
                        log_target=True, reduction="batchmean")
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    student.eval()
    return losses


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_shared_teacher_states_give_the_naive_losses(model_type):
    teacher = tiny_model(model_type, dtype=torch.float64)
    students = [tiny_model(model_type, seed=s, dtype=torch.float64, intermediate_size=48) for s in (1, 2)]
    train = torch.randint(3, 128, (6, 10), generator=torch.Generator().manual_seed(0))
    search = SearchConfig(distill_steps=3, distill_batch_size=2)
    batches = distill_batches(train, search)
    assert [b.shape[0] for b in batches] == [2, 2, 2]
    shared = teacher_hidden_states(teacher, batches)  # once, for every candidate
    head = teacher.get_submodule("lm_head")
    for student in students:
        ref = copy.deepcopy(student)
        got = short_distill(student, head, shared, batches, lr=1e-3, seed=0, chunk_tokens=7)
        want = naive_distill(ref, teacher, batches, lr=1e-3, seed=0)
        assert got == pytest.approx(want, rel=1e-9)
        assert got[-1] < got[0]
        for (n, p), (_, q) in zip(student.named_parameters(), ref.named_parameters()):
            torch.testing.assert_close(p, q, rtol=1e-8, atol=1e-10, msg=n)


def test_distill_rank_reranks_and_shares_one_teacher_forward(monkeypatch):
    teacher = tiny_model("llama")
    t_shape = {"num_layers": 2, "hidden_size": 64, "num_heads": 4, "num_kv_heads": 2, "head_dim": 16}
    pool = {96: tiny_model("llama", seed=3), 64: tiny_model("llama", seed=4, intermediate_size=64),
            32: tiny_model("llama", seed=5, intermediate_size=32)}
    rows = [{**t_shape, "intermediate_size": i, "family": "mlp", "eligible": True, "loss": float(k), "rank": k + 1}
            for k, i in enumerate((96, 64, 32))]
    built = []

    def build(shape, with_reconstruction):
        built.append((shape["intermediate_size"], with_reconstruction))
        return copy.deepcopy(pool[shape["intermediate_size"]]), None

    calls = {"n": 0}
    backbone = teacher.get_submodule("model")
    orig = backbone.forward

    def counting(*a, **k):
        calls["n"] += 1
        return orig(*a, **k)

    monkeypatch.setattr(backbone, "forward", counting)
    heldout = [torch.randint(3, 128, (2, 8), generator=torch.Generator().manual_seed(1))]
    train = torch.randint(3, 128, (8, 8), generator=torch.Generator().manual_seed(2))
    search = SearchConfig(distill_steps=2, distill_batch_size=2, distill_candidates=2, distill_lr=1e-3)
    score = lambda m: heldout_loss(m, heldout)["loss"]  # noqa: E731
    out, winner = distill_rank(teacher, [dict(r) for r in rows], build, train, score, search)
    assert calls["n"] == search.distill_steps  # one teacher forward per batch for all candidates
    assert built == [(96, True), (64, True)]  # top-2 zero-shot, built as the recipe starts (reconstructed)
    distilled = [r for r in out if "distilled_loss" in r]
    assert len(distilled) == 2 and out[2]["intermediate_size"] == 32 and "distilled_loss" not in out[2]
    assert distilled[0]["distilled_loss"] <= distilled[1]["distilled_loss"] and winner is distilled[0]
    for r in distilled:  # the reference: the same steps run by hand
        ref = copy.deepcopy(pool[r["intermediate_size"]])
        naive_distill(ref, teacher, distill_batches(train, search), lr=1e-3, seed=0)
        assert math.isclose(r["distilled_loss"], score(ref), rel_tol=1e-4)
        assert r["distill_s"] > 0 and r["zero_shot_rank"] in (1, 2)
    assert [r["rank"] for r in out] == [1, 2, 3]


def test_candidates_read_the_teacher_cache_instead_of_running_the_teacher(tmp_path, monkeypatch):
    """With the run's cache at k = vocabulary the short distillation gives the naive losses over the predicting
    positions, and the teacher never runs."""
    from minidistill.distill.teacher_cache import TeacherCacheConfig, build_teacher_cache

    teacher = tiny_model("llama", dtype=torch.float64)
    student = tiny_model("llama", seed=1, dtype=torch.float64, intermediate_size=48)
    train = torch.randint(3, 128, (6, 10), generator=torch.Generator().manual_seed(0))
    cache = build_teacher_cache(TeacherCacheConfig(enabled=True, k=128, dtype="float32"), teacher, train, tmp_path / "c",
                                tokenizer_vocab={f"w{i}": i for i in range(128)})
    search = SearchConfig(distill_steps=3, distill_batch_size=2, distill_candidates=1, distill_lr=1e-3)
    want = naive_distill(copy.deepcopy(student), teacher, distill_batches(train, search), lr=1e-3, seed=0, predicting_only=True)
    for module in (teacher, teacher.get_submodule("model")):
        monkeypatch.setattr(module, "forward", lambda *a, **k: pytest.fail("the teacher ran"))
    row = {"num_layers": 2, "hidden_size": 64, "num_heads": 4, "num_kv_heads": 2, "head_dim": 16, "intermediate_size": 48,
           "family": "mlp", "eligible": True, "loss": 1.0, "rank": 1}
    out, winner = distill_rank(teacher, [row], lambda shape, rec: (copy.deepcopy(student), None), train,
                               lambda m: 0.0, search, cache=cache)
    assert winner["distill_losses"] == pytest.approx([want[0], want[-1]], rel=1e-5)


def test_pipeline_distill_ranking_returns_the_pruned_init():
    teacher = tiny_model("llama", num_layers=4, num_heads=8, num_kv_heads=4, intermediate_size=128)
    data = tiny_data(train=10)
    cfg = prune_cfg(target={"params": 0.6}, search={"distill_steps": 2, "distill_batch_size": 2, "distill_candidates": 2})
    res = prune_model(teacher, None, data, cfg, teacher_source="tiny")
    rows = res.candidates
    assert "distilled_loss" in rows[0] and "distilled_loss" in rows[1] and "distilled_loss" not in rows[-1]
    assert rows[0]["distilled_loss"] <= rows[1]["distilled_loss"]
    win = {k: rows[0][k] for k in SHAPE_TARGET_KEYS}
    assert {k: res.prune_map.student_shape[k] for k in SHAPE_TARGET_KEYS} == win
    # the returned student is the winner's pruned init, not its short-distilled weights
    ref = prune_model(teacher, None, data, prune_cfg(target=win), teacher_source="tiny")
    for (n, p), (_, q) in zip(res.student.named_parameters(), ref.student.named_parameters()):
        assert torch.equal(p, q), n
    assert res.prune_map.notes["search"]["distill_steps"] == 2


def test_too_many_distill_steps_fail_before_pruning(monkeypatch):
    from minidistill.prune import pipeline

    def no_calibration(*a, **k):
        raise AssertionError("calibration ran before the distill steps were checked")

    monkeypatch.setattr(pipeline, "compute_importance", no_calibration)
    teacher = tiny_model("llama", num_layers=4, num_heads=8, num_kv_heads=4)
    cfg = prune_cfg(target={"params": 0.6}, calib_blocks=4, search={"distill_steps": 4, "distill_batch_size": 2})
    with pytest.raises(ConfigError, match=r"search.distill_steps=4 x search.distill_batch_size=2 needs 8 training "
                                          r"blocks but data.train holds 8, 6 before the search's 2 scoring blocks; "
                                          r"set search.distill_steps <= 3"):
        prune_model(teacher, None, tiny_data(train=8), cfg, teacher_source="tiny")
    heldout_scored = cfg.replace(search=cfg.search.replace(score_on="heldout", distill_steps=5))
    with pytest.raises(ConfigError, match=r"needs 10 training blocks but data.train holds 8; set search.distill_steps <= 4"):
        prune_model(teacher, None, tiny_data(train=8), heldout_scored, teacher_source="tiny")
    check_distill_data(SearchConfig(distill_steps=4, distill_batch_size=2, score_on="heldout"), 8)
    check_distill_data(SearchConfig(distill_steps=3, distill_batch_size=2, score_blocks=2), 8)
    with pytest.raises(ConfigError, match="search.distill_steps=-1"):
        SearchConfig.from_dict({"distill_steps": -1})
