"""Heads that differ by padding rows: masked out of the distributions (float64 reference on the unpadded heads)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_model

from minidistill.config import ConfigError
from minidistill.distill.losses.fused import FusedLogitKDLoss
from minidistill.distill.losses.logits import DIVERGENCES, LogitKDLoss
from minidistill.distill.objective import STUDENT, TEACHER, DistillLossConfig, DistillObjective, model_features
from minidistill.distill.pairing import PairingError, align_vocabularies

N, TOKENS, ROWS_T, ROWS_S, D_S, D_T = 29, 90, 128, 96, 12, 20


def _heads(seed=0):
    g = torch.Generator().manual_seed(seed)
    h_s = torch.randn(N, D_S, generator=g, dtype=torch.float64)
    w_s = torch.randn(ROWS_S, D_S, generator=g, dtype=torch.float64) / D_S**0.5
    h_t = torch.randn(N, D_T, generator=g, dtype=torch.float64)
    w_t = 1.5 * torch.randn(ROWS_T, D_T, generator=g, dtype=torch.float64) / D_T**0.5
    w_s[TOKENS:] += 3.0  # padding rows with large logits: any leak shows
    w_t[TOKENS:] += 3.0
    labels = torch.randint(0, TOKENS, (N,), generator=g)
    labels[::4] = -100
    return h_s, w_s, h_t, w_t, labels


SETTINGS = {
    "plain": dict(),
    "top_k_ce": dict(top_k=5, ce_weight=0.3),
    "top_p_temp": dict(top_p=0.7, temperature=2.0),
    "entropy_bound": dict(token_weighting="entropy", bound_margin=0.1),
    "confidence": dict(token_weighting="confidence"),
}


@pytest.mark.parametrize("setting", list(SETTINGS))
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_padded_heads_equal_the_unpadded_heads(divergence, setting):
    kwargs = dict(SETTINGS[setting], divergence=divergence)
    h_s, w_s, h_t, w_t, labels = _heads(seed=len(setting))
    # Reference: float64 logits of the token rows only.
    ref_w = w_s[:TOKENS].clone().requires_grad_(True)
    ref_h = h_s.clone().requires_grad_(True)
    want = LogitKDLoss(**kwargs)(ref_h @ ref_w.T, h_t @ w_t[:TOKENS].T, labels)
    want_h, want_w = torch.autograd.grad(want, [ref_h, ref_w])
    w = w_s.float().requires_grad_(True)
    h = h_s.float().requires_grad_(True)
    got = FusedLogitKDLoss(**kwargs, chunk_tokens=8, vocab_size=TOKENS)(h, w, h_t.float(), w_t.float(), labels)
    got_h, got_w = torch.autograd.grad(got, [h, w])
    assert torch.isfinite(got) and torch.isfinite(got_w).all() and torch.isfinite(got_h).all()
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_h.double(), want_h, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(got_w[:TOKENS].double(), want_w, rtol=1e-4, atol=1e-6)
    assert got_w[TOKENS:].abs().max() == 0  # padding rows get no gradient
    # Unmasked, the padding rows would change the loss: the test can fail.
    leaky = LogitKDLoss(**kwargs)(h_s @ w_s.T, h_t @ w_t[:ROWS_S].T, labels)
    assert abs(float(leaky.detach()) - float(want.detach())) > 1e-3


def test_student_head_larger_than_the_teacher_head():
    h_s, w_s, h_t, w_t, labels = _heads(seed=3)
    w_t_small = torch.cat([w_t[:TOKENS], w_t[TOKENS:TOKENS + 2]])  # 92 rows: fewer than the student's 96
    want = LogitKDLoss()(h_s @ w_s[:TOKENS].T, h_t @ w_t[:TOKENS].T)
    got = FusedLogitKDLoss(chunk_tokens=7, vocab_size=TOKENS)(h_s.float(), w_s.float(), h_t.float(), w_t_small.float())
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


def test_heads_smaller_than_vocab_size_are_refused():
    h_s, w_s, h_t, w_t, _ = _heads()
    with pytest.raises(ValueError, match=r"smaller than vocab_size=100"):
        FusedLogitKDLoss(vocab_size=100)(h_s, w_s[:95], h_t, w_t)


def _vocab(n, shift=0):
    return {f"w{i + shift}": i for i in range(n)}


def test_align_vocabularies_accepts_padding_and_refuses_other_mismatches():
    a = align_vocabularies(128, 96, _vocab(90), _vocab(90))
    assert (a.vocab_size, a.mask_from) == (90, 90)
    assert align_vocabularies(96, 96, _vocab(90), _vocab(90)).mask_from is None
    with pytest.raises(PairingError, match=r"tokenizers differ: the teacher's has 90 tokens \(ids 0\.\.89\), the student's 80 "
                                           r"\(ids 0\.\.79\), 10 teacher token\(s\) missing.*lm_head rows: teacher 128, student 96"
                                           r".*student\.tokenizer="):
        align_vocabularies(128, 96, _vocab(90), _vocab(80))
    with pytest.raises(PairingError, match=r"tokenizers differ.*90 teacher token"):
        align_vocabularies(128, 96, _vocab(90), _vocab(90, shift=7))
    with pytest.raises(PairingError, match=r"lm_head has 128 rows, the student's 80, but their shared tokenizer has ids 0\.\.89"):
        align_vocabularies(128, 80, _vocab(90), _vocab(90))


def test_objective_masks_padding_rows_of_models_with_different_heads():
    teacher = tiny_model("llama", vocab_size=ROWS_T, seed=0)
    student = tiny_model("llama", vocab_size=ROWS_S, seed=1, num_layers=1)
    cfg = DistillLossConfig()
    with pytest.raises(ConfigError, match="128 rows and the student's 96: pass vocab_size"):
        DistillObjective(cfg, teacher=teacher, student=student)
    objective = DistillObjective(cfg, teacher=teacher, student=student, vocab_size=TOKENS)
    ids = torch.randint(3, TOKENS, (2, 9), generator=torch.Generator().manual_seed(0))
    feats = {STUDENT: model_features(student, ids, objective.request_for(STUDENT)),
             TEACHER: model_features(teacher, ids, objective.request_for(TEACHER))}
    total, _ = objective(feats, ids)
    with torch.no_grad():
        lp_s = F.log_softmax(student(ids).logits[:, :-1, :TOKENS].double(), -1)
        lp_t = F.log_softmax(teacher(ids).logits[:, :-1, :TOKENS].double(), -1)
    want = (lp_t.exp() * (lp_t - lp_s)).sum(-1).mean()
    torch.testing.assert_close(total.detach().double(), want, rtol=1e-5, atol=1e-6)


def test_recipe_trains_a_student_whose_head_has_padding_rows(tmp_path):
    import json

    from train_scripts.tiny_setup import make_student_dir, make_teacher_dir, tiny_overrides
    from transformers import AutoModelForCausalLM

    from minidistill.recipe_config import load_recipe_config
    from minidistill.train import run_prune_distill

    teacher = make_teacher_dir(tmp_path / "teacher")  # 512 rows, tokenizer ids 0..511
    student = make_student_dir(teacher, tmp_path / "student")
    model = AutoModelForCausalLM.from_pretrained(student)
    model.resize_token_embeddings(576, mean_resizing=False)  # 64 padding rows
    model.save_pretrained(student)
    (student / "prune_map.json").unlink()  # the padded head is no slice of the teacher's
    assert json.loads((student / "config.json").read_text())["vocab_size"] == 576
    result = run_prune_distill(load_recipe_config(None, tiny_overrides(tmp_path, teacher, student, **{"train.max_steps": 2})))
    logs = [json.loads(x) for x in (result.run_dir / "log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in logs if r["kind"] == "train"]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))


def test_heldout_evaluation_scores_only_the_tokenizer_rows():
    """Held-out NLL and top-1 agreement with padded heads equal a float64 reference on the unpadded heads."""
    from types import SimpleNamespace

    from minidistill.training.evaluation import heldout_stats

    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, TOKENS, (2, 15), generator=g)
    h_s = torch.randn(2, 15, D_S, generator=g, dtype=torch.float64)
    h_t = torch.randn(2, 15, D_T, generator=g, dtype=torch.float64)
    w_s = torch.randn(ROWS_S, D_S, generator=g, dtype=torch.float64)
    w_t = torch.randn(ROWS_T, D_T, generator=g, dtype=torch.float64)
    w_s[TOKENS:] += 5.0  # padding rows that would win every argmax and take most of the mass
    w_t[TOKENS:] += 5.0
    student = SimpleNamespace(final_hidden=h_s, head_weight=w_s, head_bias=None)
    teacher = SimpleNamespace(final_hidden=h_t, head_weight=w_t, head_bias=None)
    got = heldout_stats(student, ids, chunk_tokens=7, reference=teacher, vocab_size=TOKENS)

    logits_s = h_s[:, :-1] @ w_s[:TOKENS].T
    logits_t = h_t[:, :-1] @ w_t[:TOKENS].T
    labels = ids[:, 1:]
    nll = F.cross_entropy(logits_s.reshape(-1, TOKENS), labels.reshape(-1), reduction="sum")
    agree = (logits_s.argmax(-1) == logits_t.argmax(-1)).sum()
    torch.testing.assert_close(got, torch.tensor([nll.item(), labels.numel(), agree.item()], dtype=torch.float64))
    leaky = heldout_stats(student, ids, chunk_tokens=7, reference=teacher)
    assert leaky[0] > got[0] + 1.0  # without vocab_size the padding rows change the result: the test can fail
