"""HiddenStateLoss against a float64 reference, and ChannelProjection on a width-pruned tiny teacher."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_model
from transformers import AutoModelForCausalLM

from minidistill.distill.losses.hidden import ChannelProjection, HiddenStateLoss
from minidistill.prune.prune_map import PruneMap


def reference(s, t, mask, kind):
    """Position by position with explicit sums."""
    total, count = 0.0, 0
    for pos in range(s.shape[0]):
        if mask is not None and not bool(mask[pos]):
            continue
        sq_err = sum((s[pos, d] - t[pos, d]) ** 2 for d in range(s.shape[1]))
        if kind == "mse":
            loss = sq_err / s.shape[1]
        elif kind == "nmse":
            loss = sq_err / sum(t[pos, d] ** 2 for d in range(s.shape[1]))
        else:
            dot = sum(s[pos, d] * t[pos, d] for d in range(s.shape[1]))
            norm_s = torch.sqrt(sum(s[pos, d] ** 2 for d in range(s.shape[1])))
            norm_t = math.sqrt(sum(float(t[pos, d]) ** 2 for d in range(s.shape[1])))
            loss = 1 - dot / (norm_s * norm_t)
        total = total + loss
        count += 1
    return total / count


@pytest.mark.parametrize("use_mask", [False, True])
@pytest.mark.parametrize("kind", ["mse", "cosine", "nmse"])
def test_matches_reference(kind, use_mask):
    g = torch.Generator().manual_seed(0)
    s = torch.randn(9, 6, generator=g, dtype=torch.float64, requires_grad=True)
    t = 3.0 * torch.randn(9, 6, generator=g, dtype=torch.float64)
    mask = torch.tensor([1, 0, 1, 1, 0, 1, 1, 1, 0], dtype=torch.bool) if use_mask else None
    got = HiddenStateLoss(kind)(s, t, mask)
    want = reference(s, t, mask, kind)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(torch.autograd.grad(got, s)[0], torch.autograd.grad(want, s)[0], rtol=1e-10, atol=1e-14)
    if use_mask:
        assert torch.autograd.grad(HiddenStateLoss(kind)(s, t, mask), s)[0][~mask].abs().max() == 0


def test_batched_mask_and_teacher_detach():
    g = torch.Generator().manual_seed(1)
    s = torch.randn(2, 5, 4, generator=g, requires_grad=True)
    t = torch.randn(2, 5, 4, generator=g, requires_grad=True)
    mask = torch.rand(2, 5, generator=g) > 0.4
    loss = HiddenStateLoss("nmse")(s, t, mask)
    torch.testing.assert_close(loss, HiddenStateLoss("nmse")(s[mask], t[mask]))
    loss.backward()
    assert t.grad is None and s.grad is not None
    HiddenStateLoss("mse", detach_teacher=False)(s, t).backward()
    assert t.grad is not None
    none_counted = HiddenStateLoss("cosine")(s, t, torch.zeros(2, 5, dtype=torch.bool))
    assert float(none_counted.detach()) == 0.0


def test_scale_behaviour_of_each_kind():
    g = torch.Generator().manual_seed(2)
    s, t = torch.randn(4, 8, generator=g), torch.randn(4, 8, generator=g)
    torch.testing.assert_close(HiddenStateLoss("nmse")(10 * s, 10 * t), HiddenStateLoss("nmse")(s, t))
    torch.testing.assert_close(HiddenStateLoss("mse")(10 * s, 10 * t), 100 * HiddenStateLoss("mse")(s, t))
    torch.testing.assert_close(HiddenStateLoss("cosine")(5 * s, t), HiddenStateLoss("cosine")(s, t))
    for kind in ("mse", "cosine", "nmse"):
        assert float(HiddenStateLoss(kind)(t, t)) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("kind", ["mse", "cosine", "nmse"])
def test_zero_student_vectors_have_finite_gradients(kind):
    s = torch.zeros(3, 4, requires_grad=True)
    t = torch.randn(3, 4, generator=torch.Generator().manual_seed(3))
    loss = HiddenStateLoss(kind)(s, t)
    assert torch.isfinite(torch.autograd.grad(loss, s)[0]).all()
    want = {"mse": float(t.pow(2).mean()), "cosine": 1.0, "nmse": 1.0}[kind]
    assert float(loss.detach()) == pytest.approx(want, rel=1e-6)


def test_projection_init_is_channel_selection():
    proj = ChannelProjection(3, 5, [0, 2, 4])
    x = torch.tensor([[1.0, 2.0, 3.0]])
    torch.testing.assert_close(proj(x), torch.tensor([[1.0, 0.0, 2.0, 0.0, 3.0]]))
    eye = ChannelProjection(4, 4)
    torch.testing.assert_close(eye.weight, torch.eye(4))
    for bad in ([0, 0, 1], [0, 1, 5], [0, 1]):
        with pytest.raises(ValueError, match="kept_channels"):
            ChannelProjection(3, 5, bad)
    with pytest.raises(ValueError, match="kept_channels"):
        ChannelProjection(3, 5)


TEACHER_HIDDEN = 48  # != heads * head_dim (64), != intermediate (96), != vocab (128): hidden dims are unambiguous
KEPT = [0, 3, 4, 7, 10, 11, 15, 16, 20, 22, 23, 27, 31, 33, 34, 36, 40, 41, 44, 47] + [1, 2, 5, 6, 8, 9, 12, 13]


def _width_pruned_pair(model_type: str, exact_norms: bool):
    """A teacher whose dropped hidden channels are dead, and its student made of the kept channels."""
    kept = sorted(KEPT)
    teacher = tiny_model(model_type, hidden_size=TEACHER_HIDDEN, num_layers=3, dtype=torch.float64)
    dead = torch.tensor(sorted(set(range(TEACHER_HIDDEN)) - set(kept)))
    with torch.no_grad():
        teacher.get_input_embeddings().weight[:, dead] = 0.0
        for name, p in teacher.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):  # every write to the residual stream
                p[dead, :] = 0.0
    cfg = teacher.config.to_dict()
    cfg["hidden_size"] = len(kept)
    scale = TEACHER_HIDDEN / len(kept)
    if exact_norms:  # RMSNorm averages over fewer channels: rescale eps and weights to make it exact
        cfg["rms_norm_eps"] = teacher.config.rms_norm_eps * scale
    student = AutoModelForCausalLM.from_config(type(teacher.config).from_dict(cfg), dtype=torch.float64).eval()
    idx = torch.tensor(kept)
    state = {}
    for name, p in teacher.state_dict().items():
        for dim, size in enumerate(p.shape):
            if size == TEACHER_HIDDEN:
                p = p.index_select(dim, idx)
        if exact_norms and name.endswith("norm.weight") and p.shape == (len(kept),):
            p = p * math.sqrt(scale)
        state[name] = p
    student.load_state_dict(state)
    return teacher, student, kept


@pytest.mark.slow
@pytest.mark.parametrize("model_type", ["llama", "qwen3", "mistral"])
def test_projected_width_pruned_student_matches_teacher(model_type):
    torch.manual_seed(0)
    ids = torch.randint(3, 128, (2, 10))
    pmap = PruneMap.identity({"num_layers": 3, "hidden_size": TEACHER_HIDDEN, "num_heads": 4, "num_kv_heads": 2,
                              "head_dim": 16, "intermediate_size": 96})
    pmap.kept_hidden = sorted(KEPT)

    # Plain slicing: the embedding output is exactly the teacher's on every channel.
    teacher, student, kept = _width_pruned_pair(model_type, exact_norms=False)
    proj = ChannelProjection.from_prune_map(pmap).double()
    with torch.no_grad():
        h_t = teacher(ids, output_hidden_states=True).hidden_states
        h_s = student(ids, output_hidden_states=True).hidden_states
    assert torch.equal(proj(h_s[0]), h_t[0])
    for kind in ("mse", "nmse"):
        assert float(HiddenStateLoss(kind)(proj(h_s[0]), h_t[0]).detach()) == 0.0
    assert abs(float(HiddenStateLoss("cosine")(proj(h_s[0]), h_t[0]).detach())) < 1e-15  # rounding of the division
    # ... but deeper states differ: RMSNorm averages over fewer channels.
    assert float(HiddenStateLoss("nmse")(proj(h_s[-1]), h_t[-1]).detach()) > 1e-4

    # With RMSNorm eps and weights rescaled by H_t / H_s, every layer matches to rounding (HF RMSNorm
    # computes in float32, hence relative errors ~1e-7 to 1e-5 although the models are float64).
    teacher, student, kept = _width_pruned_pair(model_type, exact_norms=True)
    with torch.no_grad():
        out_t = teacher(ids, output_hidden_states=True)
        out_s = student(ids, output_hidden_states=True)
    for layer, (s, t) in enumerate(zip(out_s.hidden_states, out_t.hidden_states)):
        assert float(HiddenStateLoss("nmse")(proj(s), t).detach()) < 1e-8, layer
    torch.testing.assert_close(out_s.logits, out_t.logits, rtol=1e-4, atol=1e-4)
