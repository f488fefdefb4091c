"""DistillObjective against references: float64 logit KL, hook-captured hidden states, identity students."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_model
from train_scripts.tiny_setup import half_map

from minidistill.adapters import get_adapter
from minidistill.config import ConfigError
from minidistill.distill.losses.hidden import ChannelProjection, HiddenStateLoss
from minidistill.distill.objective import (
    LOSS_TERMS,
    TERM_SETTINGS,
    DistillationModule,
    DistillLossConfig,
    DistillObjective,
    LossTerm,
    register_loss_term,
    teacher_features,
)
from minidistill.prune.apply import apply_prune_map
from minidistill.prune.prune_map import PruneMap

ALL_TERMS = {
    "hidden": {"weight": 1.0},
    "attention": {"weight": 1.0, "pairing": {"strategy": "prune_map"}},
    "relations": {"weight": 1.0, "num_relation_heads": 2, "pairing": {"strategy": "prune_map"}},
}


def _step(teacher, student, cfg, pmap, ids):
    objective = DistillObjective(cfg, teacher=teacher, student=student, prune_map=pmap)
    module = DistillationModule(student, objective)
    out = module(ids, teacher_features(teacher, ids, objective))
    return out, objective


def test_identity_student_has_zero_loss_everywhere(model_type):
    """A student equal to its teacher (identity map) scores ~0 on every term, on every architecture."""
    teacher = tiny_model(model_type, num_layers=2)
    student = copy.deepcopy(teacher)
    pmap = PruneMap.identity(get_adapter(teacher).shape(teacher.config))
    cfg = DistillLossConfig.from_dict(ALL_TERMS)
    ids = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    out, _ = _step(teacher, student, cfg, pmap, ids)
    comps = out["components"]
    assert set(comps) >= {"loss/logits", "loss/hidden", "loss/attention", "loss/relations"}
    for name in ("loss/logits", "loss/hidden", "loss/attention", "loss/relations"):
        assert abs(comps[name].item()) < 1e-5, (name, comps[name].item())


def _pruned_pair():
    teacher = tiny_model("llama", num_layers=3)
    pmap = half_map(teacher)
    student = apply_prune_map(teacher, pmap)
    with torch.no_grad():  # move the student away from its teacher so that every term is non-zero
        for p in student.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return teacher, student, pmap


def test_logit_term_matches_float64_forward_kl():
    teacher, student, pmap = _pruned_pair()
    ids = torch.randint(3, 128, (3, 10), generator=torch.Generator().manual_seed(1))
    cfg = DistillLossConfig.from_dict({"logits": {"temperature": 2.0, "chunk_tokens": 7}})
    out, _ = _step(teacher, student, cfg, pmap, ids)
    with torch.no_grad():
        s = student.double()(ids).logits[:, :-1].reshape(-1, 128) / 2.0
        t = teacher.double()(ids).logits[:, :-1].reshape(-1, 128) / 2.0
    p_t = F.softmax(t, -1)
    ref = (p_t * (F.log_softmax(t, -1) - F.log_softmax(s, -1))).sum(-1).mean()
    got = out["components"]["loss/logits"].item()
    assert got == pytest.approx(4.0 * ref.item(), rel=1e-5)  # times temperature**2 (Hinton)
    assert out["loss"].item() == pytest.approx(got, rel=1e-6)


def test_hidden_term_matches_hook_reference():
    teacher, student, pmap = _pruned_pair()
    ids = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(2))
    cfg = DistillLossConfig.from_dict({"hidden": {"weight": 0.5}})
    out, objective = _step(teacher, student, cfg, pmap, ids)

    def layer_outputs(model):
        got = {}
        handles = [
            layer.register_forward_hook(lambda m, a, o, i=i: got.__setitem__(i, o[0] if isinstance(o, tuple) else o))
            for i, layer in enumerate(get_adapter(model).decoder_layers(model))
        ]
        with torch.no_grad():
            model(ids)
        for h in handles:
            h.remove()
        return got

    s_h, t_h = layer_outputs(student), layer_outputs(teacher)
    proj = ChannelProjection(48, 64, kept_channels=pmap.kept_hidden)
    loss = HiddenStateLoss(kind="nmse")
    with torch.no_grad():
        ref = torch.stack([loss(proj(s_h[i]), t_h[pmap.kept_layers[i]]) for i in range(2)]).mean()
    assert out["components"]["loss/hidden"].item() == pytest.approx(ref.item(), rel=1e-5)
    assert out["loss"].item() == pytest.approx(
        out["components"]["loss/logits"].item() + 0.5 * ref.item(), rel=1e-5
    )
    # The projection is learnable and reaches the optimizer through the module's parameters.
    out["loss"].backward()
    assert objective.terms["hidden"].projection.weight.grad is not None
    assert objective.terms["hidden"].projection.weight.grad.abs().sum() > 0


def test_one_forward_per_model_and_layer():
    teacher, student, pmap = _pruned_pair()
    calls = {"teacher": 0, "student": 0, "teacher_layers": 0, "student_layers": 0}
    teacher.register_forward_hook(lambda *a: calls.__setitem__("teacher", calls["teacher"] + 1))
    student.register_forward_hook(lambda *a: calls.__setitem__("student", calls["student"] + 1))
    for role, model in (("teacher", teacher), ("student", student)):
        for layer in get_adapter(model).decoder_layers(model):
            layer.register_forward_hook(lambda *a, r=role: calls.__setitem__(f"{r}_layers", calls[f"{r}_layers"] + 1))
    ids = torch.randint(3, 128, (2, 8))
    out, _ = _step(teacher, student, DistillLossConfig.from_dict(ALL_TERMS), pmap, ids)
    out["loss"].backward()
    assert calls == {"teacher": 1, "student": 1, "teacher_layers": 3, "student_layers": 2}


def test_feature_terms_without_prune_map_need_explicit_pairing():
    teacher, student, _ = _pruned_pair()
    with pytest.raises(ConfigError, match=r"loss\.hidden\.pairing\.strategy=explicit"):
        DistillObjective(DistillLossConfig.from_dict({"hidden": {"weight": 1.0}}), teacher=teacher, student=student)
    cfg = DistillLossConfig.from_dict(
        {"hidden": {"weight": 1.0, "pairing": {"strategy": "explicit", "explicit": [[0, 0], [1, 2]]}}}
    )
    objective = DistillObjective(cfg, teacher=teacher, student=student)
    assert objective.terms["hidden"].pairs == [(0, 0), (1, 2)]


def test_registered_extra_term_is_built_and_weighted():
    class MeanSquareHidden(LossTerm):
        """Mean square of the student's final hidden states (a stand-in for a new feature loss)."""

        def forward(self, features, input_ids):
            return features["student"].final_hidden.pow(2).mean()

    register_loss_term("final_hidden_l2")(lambda ctx: MeanSquareHidden())
    try:
        teacher, student, pmap = _pruned_pair()
        ids = torch.randint(3, 128, (2, 8))
        out, _ = _step(teacher, student, DistillLossConfig.from_dict({"extra": {"final_hidden_l2": 0.25}}), pmap, ids)
        c = out["components"]
        assert out["loss"].item() == pytest.approx(c["loss/logits"].item() + 0.25 * c["loss/final_hidden_l2"].item(), rel=1e-6)
        with pytest.raises(ConfigError, match="no loss term of that name"):
            DistillObjective(DistillLossConfig.from_dict({"extra": {"nope": 1.0}}), teacher=teacher, student=student)
    finally:
        LOSS_TERMS.pop("final_hidden_l2", None)
        TERM_SETTINGS.pop("final_hidden_l2", None)


# ---------------------------------------------------------------------------------------------- loss.terms


def test_terms_form_equals_the_earlier_sections():
    """``loss.terms`` and the earlier ``loss.<section>`` / ``loss.extra`` form parse to the same settings and loss."""
    earlier = DistillLossConfig.from_dict({"logits": {"temperature": 2.0}, "hidden": {"weight": 0.5, "kind": "mse"},
                                           "extra": {"mmd": {"weight": 0.25, "kernel": "linear"}}})
    terms = DistillLossConfig.from_dict({"terms": {"logits": {"temperature": 2.0}, "hidden": {"weight": 0.5, "kind": "mse"},
                                                   "mmd": {"weight": 0.25, "kernel": "linear"}}})
    assert terms == earlier and terms.weights() == {"logits": 1.0, "hidden": 0.5, "mmd": 0.25}
    assert [s.key for s in earlier.terms.values()] == ["loss.logits", "loss.hidden", "loss.extra.mmd"]
    assert [s.key for s in terms.terms.values()] == ["loss.terms.logits", "loss.terms.hidden", "loss.terms.mmd"]
    assert DistillLossConfig.from_dict(terms.to_dict()) == terms  # what a run saves reads back the same
    teacher, student, pmap = _pruned_pair()
    ids = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(3))
    a, _ = _step(teacher, student, earlier, pmap, ids)
    b, _ = _step(teacher, student, terms, pmap, ids)
    assert a["loss"].item() == b["loss"].item() > 0


def test_a_term_twice_adds_its_weighted_values():
    """A second logit term (``term: logits``) at another temperature adds weight x the value a lone term of that
    temperature computes."""
    teacher, student, pmap = _pruned_pair()
    ids = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(4))
    cfg = DistillLossConfig.from_dict({"terms": {"logits": {}, "soft": {"term": "logits", "temperature": 3.0, "weight": 0.5}}})
    out, objective = _step(teacher, student, cfg, pmap, ids)
    alone, _ = _step(teacher, student, DistillLossConfig.from_dict({"terms": {"logits": {"temperature": 3.0}}}), pmap, ids)
    plain, _ = _step(teacher, student, DistillLossConfig(), pmap, ids)
    c = out["components"]
    assert c["loss/soft"].item() == pytest.approx(alone["loss"].item(), rel=1e-6)
    assert c["loss/logits"].item() == pytest.approx(plain["loss"].item(), rel=1e-6)
    assert out["loss"].item() == pytest.approx(plain["loss"].item() + 0.5 * alone["loss"].item(), rel=1e-6)
    assert c["loss/soft"].item() != pytest.approx(c["loss/logits"].item(), rel=1e-3)
    assert isinstance(objective.terms["soft"], type(objective.terms["logits"]))


@pytest.mark.parametrize("loss, match", [
    ({"terms": {"kd": {"term": "logits", "target": "peer"}}}, r"loss\.terms\.kd\.target='peer': no role of that name \(the roles: student, teacher\)"),
    ({"terms": {"hidden": {"source": "teacher", "target": "student"}}}, r"loss\.terms\.hidden\.source='teacher' is frozen"),
    ({"terms": {"hidden": {"source": "teacher"}}}, r"loss\.terms\.hidden: source and target are both 'teacher'"),
    ({"terms": {"hiden": 1.0}}, r"loss\.terms\.hiden: no loss term of that name is registered \('hiden'; known: .*hidden"),
    ({"terms": {"logits": {"temperature": 2.0}}, "logits": {"ce_weight": 0.5}},
     r"loss\.logits and loss\.terms\.logits both configure the term 'logits'; write every setting under loss\.terms\.logits"),
    ({"terms": {"logits": {"weight": 0}}}, r"loss\.terms\.logits\.weight=0\.0: must be positive"),
    ({"terms": {"logits": {"term": "hidden"}}}, r"loss\.terms\.logits must be a logits term"),
    ({"terms": {"logits": {"divergence": "kl"}}}, r"loss\.terms\.logits\.divergence='kl': choose one of"),
    ({"terms": {"relations": {"relations": ["qx"]}}}, r"loss\.terms\.relations\.relations has \['qx'\]"),
])
def test_bad_terms_are_refused_naming_the_key(loss, match):
    from minidistill.recipe_config import PruneDistillConfig

    with pytest.raises(ConfigError, match=match):
        PruneDistillConfig.from_dict({"loss": loss})


def test_attention_term_reads_each_layers_layout_from_the_features():
    """The features carry each captured layer's attention layout (as its attention function was called); the attention
    term applies it: on a sliding-window model it equals the transfer loss with the captured window and scaling, and
    differs from full causal attention."""
    from minidistill.distill.capture import CaptureSpec, FeatureCapture
    from minidistill.distill.features import CaptureRequest, model_features
    from minidistill.distill.losses.attention import AttentionTransferLoss

    teacher = tiny_model("mistral", num_layers=2, sliding_window=3)
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.05 * torch.randn_like(p))
    pmap = PruneMap.identity(get_adapter(teacher).shape(teacher.config))
    ids = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(5))
    feats = model_features(student, ids, CaptureRequest(qk={0, 1}))
    with FeatureCapture(student, CaptureSpec(layers=[0, 1], queries=True, keys=True)) as cap, torch.no_grad():
        student(ids)
    assert feats.attention == cap.attention and {lay.sliding_window for lay in feats.attention.values()} == {3}
    out, _ = _step(teacher, student, DistillLossConfig.from_dict({"terms": {"attention": {"pairing": {"strategy": "prune_map"}}}}),
                   pmap, ids)
    t = model_features(teacher, ids, CaptureRequest(qk={0, 1}))
    loss = AttentionTransferLoss()

    def reference(window):
        return torch.stack([loss(feats.queries[i], feats.keys[i], t.queries[i], t.keys[i],
                                 student_scaling=feats.attention[i].scaling, teacher_scaling=t.attention[i].scaling,
                                 sliding_window=window) for i in (0, 1)]).mean().item()

    got = out["components"]["loss/attention"].item()
    assert got == pytest.approx(reference(3), rel=1e-5) and got != pytest.approx(reference(None), rel=1e-3)
