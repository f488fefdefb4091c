"""Knowledge-matching terms on a tiny pruned llama: objective values against float64 references from independent
hooks, weight matching at initialisation, YAML configuration, and bad input."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
import yaml
from test_match_losses import _naive_rkd
from test_objective import _pruned_pair, _step

from minidistill.adapters import get_adapter
from minidistill.config import ConfigError
from minidistill.distill.objective import DistillationModule, DistillLossConfig, DistillObjective, model_features, teacher_features
from minidistill.prune.apply import apply_prune_map, slice_plan
from train_scripts.tiny_setup import half_map
from conftest import tiny_model

IDS = torch.randint(3, 128, (3, 10), generator=torch.Generator().manual_seed(5))


def _features(model, ids=IDS):
    """Float64 copy of ``model``: every decoder layer's output, gate_proj output and the final-norm output."""
    model = copy.deepcopy(model).double()
    adapter = get_adapter(model)
    got = {"hidden": {}, "gates": {}}
    handles = []
    for i, layer in enumerate(adapter.decoder_layers(model)):
        handles.append(layer.register_forward_hook(lambda m, a, o, i=i: got["hidden"].__setitem__(i, o[0] if isinstance(o, tuple) else o)))
        handles.append(layer.mlp.gate_proj.register_forward_hook(lambda m, a, o, i=i: got["gates"].__setitem__(i, o)))
    handles.append(model.model.norm.register_forward_hook(lambda m, a, o: got.__setitem__("final", o)))
    with torch.no_grad():
        model(ids)
    for h in handles:
        h.remove()
    return got


def _term_value(cfg: dict, teacher, student, pmap, ids=IDS) -> float:
    out, _ = _step(teacher, student, DistillLossConfig.from_dict(cfg), pmap, ids)
    name = next(iter(cfg["extra"]))
    return out["components"][f"loss/{name}"].item()


@pytest.fixture(scope="module")
def pair():
    teacher, student, pmap = _pruned_pair()
    return teacher, student, pmap, _features(teacher), _features(student)


def _kept(pmap):
    return torch.tensor(pmap.kept_hidden)


# ---------------------------------------------------------------------------------------------- weights


def test_weights_zero_at_init_for_a_student_pruned_without_refit():
    teacher = tiny_model("llama", num_layers=3)
    pmap = half_map(teacher)
    student = apply_prune_map(teacher, pmap)
    assert _term_value({"extra": {"weights": 1.0}}, teacher, student, pmap) == 0.0


def test_weights_match_teacher_slices_of_the_prune_map(pair):
    teacher, student, pmap, _, _ = pair
    plan, t_params = slice_plan(teacher, pmap), dict(teacher.named_parameters())
    total = 0.0
    for name, p in student.named_parameters():
        module, _, kind = name.rpartition(".")
        rule = plan[module]
        target = t_params[f"{rule.teacher_name}.{kind}"].detach().double()
        if rule.rows is not None:
            target = target[rule.rows]
        if rule.cols is not None and kind == "weight":
            target = target[:, rule.cols]
        total += float(((p.detach().double() - target) ** 2).sum())
        if name == "model.layers.1.self_attn.o_proj.weight":
            o_target = target
    assert _term_value({"extra": {"weights": 1.0}}, teacher, student, pmap) == pytest.approx(total, rel=1e-5)
    # Gradient: 2 (W_s - target) per element (the term reads the student's parameters, not its features).
    objective = DistillObjective(DistillLossConfig.from_dict({"extra": {"weights": 1.0}}), teacher=teacher, student=student, prune_map=pmap)
    student.zero_grad()
    objective.terms["weights"]({}, IDS).backward()
    o_proj = student.model.layers[1].self_attn.o_proj.weight
    assert torch.allclose(o_proj.grad.double(), 2 * (o_proj.detach().double() - o_target), rtol=1e-5, atol=1e-7)
    student.zero_grad()


def test_weights_without_a_map_use_learned_linear_maps():
    teacher, student, _ = _pruned_pair()
    cfg = DistillLossConfig.from_dict({"extra": {"weights": {"weight": 1.0, "pairing": {"strategy": "uniform"}}}})
    objective = DistillObjective(cfg, teacher=teacher, student=student)
    term = objective.terms["weights"]
    # Student layers 0, 1 against teacher layers 1, 2 (uniform); widths 48 <- 64, 32 <- 64, 64 <- 96, 32 <- 16 ...
    assert set(term.map.maps) and all(k.startswith("s") for k in term.map.maps)
    out = DistillationModule(student, objective)(IDS, teacher_features(teacher, IDS, objective))
    t_params = dict(teacher.named_parameters())
    total = 0.0
    for name, p in student.named_parameters():
        t_name = name.replace("layers.0.", "layers.1.") if "layers.0." in name else name.replace("layers.1.", "layers.2.")
        target = t_params[t_name].detach().double()[tuple(slice(0, n) for n in p.shape)]  # truncated identity maps
        total += float(((p.detach().double() - target) ** 2).sum())
    assert out["components"]["loss/weights"].item() == pytest.approx(total, rel=1e-5)
    out["loss"].backward()
    assert all(m.grad is not None and m.grad.abs().sum() > 0 for m in term.map.maps.values())
    assert {f"objective.terms.weights.map.maps.{k}" for k in term.map.maps} <= {n for n, _ in DistillationModule(student, objective).named_parameters()}


# ---------------------------------------------------------------------------------------------- feature terms


def _mmd_ref(s, t, kernel, samples, sigma=1.0):
    if samples == "neurons":
        s, t = s.transpose(1, 2), t.transpose(1, 2)
    s, t = F.normalize(s, dim=-1), F.normalize(t, dim=-1)

    def k(a, b):
        if kernel == "polynomial":
            return torch.einsum("bid,bjd->bij", a, b).pow(2).mean((1, 2))
        return torch.exp(-torch.cdist(a, b).pow(2) / (2 * sigma**2)).mean((1, 2))

    return (k(s, s) + k(t, t) - 2 * k(s, t)).mean()


def test_mmd_and_nst_terms_match_reference(pair):
    teacher, student, pmap, tf, sf = pair
    kept = _kept(pmap)
    ref_mmd = torch.stack([_mmd_ref(sf["hidden"][i], tf["hidden"][j][..., kept], "gaussian", "tokens", 0.5) for i, j in enumerate(pmap.kept_layers)]).mean()
    got = _term_value({"extra": {"mmd": {"sigma": 0.5}}}, teacher, student, pmap)
    assert got == pytest.approx(ref_mmd.item(), rel=1e-4) and got > 1e-4
    ref_nst = torch.stack([_mmd_ref(sf["hidden"][i], tf["hidden"][j], "polynomial", "neurons") for i, j in enumerate(pmap.kept_layers)]).mean()
    got = _term_value({"extra": {"nst": 1.0}}, teacher, student, pmap)
    assert got == pytest.approx(ref_nst.item(), rel=1e-4) and got > 1e-5


def _at(x):
    return F.normalize(x.pow(2).sum(-1), dim=-1)


def test_activation_token_attention_matches_reference(pair):
    teacher, student, pmap, tf, sf = pair
    ref = torch.stack([(_at(sf["hidden"][i]) - _at(tf["hidden"][j])).pow(2).sum(-1).mean() for i, j in enumerate(pmap.kept_layers)]).mean()
    got = _term_value({"extra": {"token_attention": 1.0}}, teacher, student, pmap)
    assert got == pytest.approx(ref.item(), rel=1e-4) and got > 1e-5


def _saliency_ref(model, layers, ids=IDS, create_graph=False):
    """|dCE/dh| through ``inputs_embeds`` (a different route from the term's hooks), float64."""
    emb = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    got = {}
    handles = [
        get_adapter(model).decoder_layers(model)[i].register_forward_hook(lambda m, a, o, i=i: got.__setitem__(i, o[0] if isinstance(o, tuple) else o))
        for i in layers
    ]
    logits = model(inputs_embeds=emb).logits
    for h in handles:
        h.remove()
    ce = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum")
    grads = torch.autograd.grad(ce, [got[i] for i in layers], create_graph=create_graph)
    return [g.abs() for g in grads]


def test_gradient_token_attention_matches_reference_and_backpropagates():
    teacher, student, pmap = _pruned_pair()
    cfg = {"extra": {"token_attention": {"source": "gradient"}}}
    with pytest.raises(ConfigError, match=r"signal=gradient .* 'sdpa' attention kernels do not support; set student\.attn_implementation=eager"):
        DistillObjective(DistillLossConfig.from_dict(cfg), teacher=teacher, student=student, prune_map=pmap)
    student.set_attn_implementation("eager")
    out, objective = _step(teacher, student, DistillLossConfig.from_dict(cfg), pmap, IDS)
    assert objective.requests()["teacher"].hidden == set()  # the teacher's saliency needs its own forward
    t64, s64 = copy.deepcopy(teacher).double(), copy.deepcopy(student).double()
    t_sal = _saliency_ref(t64, pmap.kept_layers)
    s_sal = _saliency_ref(s64, [0, 1], create_graph=True)
    ref = torch.stack([(_at(a) - _at(b)).pow(2).sum(-1).mean() for a, b in zip(s_sal, t_sal)]).mean()
    assert out["components"]["loss/token_attention"].item() == pytest.approx(ref.item(), rel=1e-4)
    # Gradient of the term w.r.t. a student weight (through the double backward), against the float64 reference.
    features = {"student": model_features(student, IDS, objective.request_for("student")), "teacher": teacher_features(teacher, IDS, objective)}
    got = objective.terms["token_attention"](features, IDS)
    got.backward()
    name = "model.layers.0.mlp.down_proj.weight"
    (ref_grad,) = torch.autograd.grad(ref, dict(s64.named_parameters())[name])
    g = dict(student.named_parameters())[name].grad
    assert got.item() > 1e-5
    assert torch.allclose(g.double(), ref_grad, rtol=1e-3, atol=1e-6 * ref_grad.abs().max().item())


def test_activation_boundary_term_matches_reference(pair):
    teacher, student, pmap, tf, sf = pair
    m = 0.3
    refs = []
    for i, j in enumerate(pmap.kept_layers):
        s, t = sf["gates"][i], tf["gates"][j][..., torch.tensor(pmap.layers[i].kept_neurons)]
        refs.append(torch.where(t > 0, F.relu(m - s), F.relu(m + s)).pow(2).mean())
    got = _term_value({"extra": {"activation_boundary": {"margin": m}}}, teacher, student, pmap)
    assert got == pytest.approx(torch.stack(refs).mean().item(), rel=1e-4) and got > 1e-4


def _fsp(a, b, kept=None):
    if kept is not None:
        a, b = a[..., kept], b[..., kept]
    a, b = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
    return torch.einsum("btc,btd->bcd", a, b) / a.shape[1]


def test_fsp_term_matches_reference(pair):
    teacher, student, pmap, tf, sf = pair
    # Default: consecutive paired student layers (0, 1), whose teacher layers are (0, 2).
    ref = (_fsp(sf["hidden"][0], sf["hidden"][1]) - _fsp(tf["hidden"][0], tf["hidden"][2], _kept(pmap))).pow(2).mean()
    got = _term_value({"extra": {"fsp": 1.0}}, teacher, student, pmap)
    assert got == pytest.approx(ref.item(), rel=1e-4) and got > 1e-7
    g = lambda a, b: torch.einsum("btc,bsc->bts", F.normalize(a, dim=-1), F.normalize(b, dim=-1))  # noqa: E731
    ref = (g(sf["hidden"][0], sf["hidden"][1]) - g(tf["hidden"][0], tf["hidden"][2])).pow(2).mean()
    got = _term_value({"extra": {"fsp": {"matrix": "tokens", "student_pairs": [[0, 1]]}}}, teacher, student, pmap)
    assert got == pytest.approx(ref.item(), rel=1e-4)


def test_rkd_term_matches_reference(pair):
    teacher, student, pmap, tf, sf = pair
    ref = _naive_rkd(sf["final"].mean(1), tf["final"].mean(1), 1.0, 2.0)
    got = _term_value({"extra": {"rkd": 1.0}}, teacher, student, pmap)
    assert got == pytest.approx(float(ref), rel=1e-4) and got > 1e-4
    ref = _naive_rkd(sf["hidden"][1].mean(1), tf["hidden"][2].mean(1), 0.0, 1.0)
    got = _term_value({"extra": {"rkd": {"student_layer": 1, "distance_weight": 0.0, "angle_weight": 1.0}}}, teacher, student, pmap)
    assert got == pytest.approx(float(ref), rel=1e-4)


# ---------------------------------------------------------------------------------------------- YAML and bad input

YAML = """
logits: {temperature: 2.0, teacher_bound_margin: 0.1, token_weighting: entropy}
extra:
  weights: 0.5
  nst: {weight: 2.0}
  mmd: {kernel: polynomial, degree: 3, coef: 1.0, pairing: {strategy: explicit, explicit: [[1, 2]]}}
  token_attention: {pairing: {strategy: last_k, k: 1}}
  activation_boundary: {margin: 0.5, pairing: {student_layers: [1]}}
  fsp: {student_pairs: [[1, 0]]}
  rkd: {weight: 3, angle_weight: 0.0}
"""


def test_all_terms_configured_from_yaml_train_one_step():
    teacher, student, pmap = _pruned_pair()
    cfg = DistillLossConfig.from_dict(yaml.safe_load(YAML))
    assert cfg.weights() == {"logits": 1.0, "weights": 0.5, "nst": 2.0, "mmd": 1.0, "token_attention": 1.0,
                             "activation_boundary": 1.0, "fsp": 1.0, "rkd": 3.0}
    assert cfg.terms["mmd"].degree == 3 and cfg.terms["fsp"].student_pairs == [[1, 0]]
    objective = DistillObjective(cfg, teacher=teacher, student=student, prune_map=pmap)
    assert objective.terms["mmd"].pairs == [(1, 2)] and objective.terms["token_attention"].pairs == [(1, 2)]
    assert objective.terms["activation_boundary"].pairs == [(1, 2)] and objective.terms["fsp"].pairs == [((1, 0), (2, 0))]
    module = DistillationModule(student, objective)
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
    out = module(IDS, teacher_features(teacher, IDS, objective))
    c = out["components"]
    expected = sum(w * c[f"loss/{name}"].item() for name, w in cfg.weights().items())
    assert out["loss"].item() == pytest.approx(expected, rel=1e-5)
    before = student.model.layers[0].mlp.gate_proj.weight.detach().clone()
    out["loss"].backward()
    optimizer.step()
    assert not torch.equal(before, student.model.layers[0].mlp.gate_proj.weight)


@pytest.mark.parametrize(
    "extra,pattern",
    [
        ({"mmd": {"pairing": {"strategy": "explicit", "explicit": [[0, 5]]}}}, r"loss\.extra\.mmd\.pairing: explicit pair \(0, 5\) is out of range"),
        ({"nst": {"pairing": {"student_layers": [4]}}}, r"loss\.extra\.nst\.pairing\.student_layers has \[4\]: the student has layers 0\.\.1"),
        ({"activation_boundary": {"pairing": {"strategy": "explicit", "explicit": [[2, 0]]}}}, r"loss\.extra\.activation_boundary\.pairing: explicit pair \(2, 0\)"),
        ({"fsp": {"student_pairs": [[0, 3]]}}, r"loss\.extra\.fsp\.student_pairs\[0\]=\[0, 3\]: the student has layers 0\.\.1"),
        ({"rkd": {"student_layer": 2}}, r"loss\.extra\.rkd\.student_layer=2: the student has layers 0\.\.1"),
        ({"rkd": {"student_layer": 0, "teacher_layer": 3}}, r"loss\.extra\.rkd\.teacher_layer=3: the teacher has layers 0\.\.2"),
    ],
)
def test_terms_on_layers_the_models_do_not_have(extra, pattern):
    teacher, student, pmap = _pruned_pair()
    with pytest.raises(ConfigError, match=pattern):
        DistillObjective(DistillLossConfig.from_dict({"extra": extra}), teacher=teacher, student=student, prune_map=pmap)


@pytest.mark.parametrize(
    "extra,pattern",
    [
        ({"fsp": {"student_pairs": [[1, 1]]}}, r"loss\.extra\.fsp\.student_pairs\[0\]=\[1, 1\] uses layer 1 twice"),
        ({"mmd": {"kernel": "laplace"}}, r"loss\.extra\.mmd\.kernel='laplace': choose one of \['linear', 'polynomial', 'gaussian'\]"),
        ({"nst": {"kernal": "linear"}}, r"unknown config key 'loss\.extra\.nst\.kernal'; did you mean 'loss\.extra\.nst\.kernel'"),
        ({"mmd": {"sigma": 0}}, r"loss\.extra\.mmd\.sigma=0\.0: must be positive"),
        ({"rkd": {"weight": -1}}, r"loss\.extra\.rkd\.weight=-1\.0: must be >= 0"),
        ({"token_attention": {"source": "hessian"}}, r"loss\.extra\.token_attention\.signal='hessian': choose one of \['activation', 'gradient'\]"),
    ],
)
def test_bad_term_settings_name_the_key(extra, pattern):
    with pytest.raises(ConfigError, match=pattern):
        DistillLossConfig.from_dict({"extra": extra})


def test_rkd_with_one_sequence_per_rank_says_the_minimum():
    teacher, student, pmap = _pruned_pair()
    with pytest.raises(ConfigError, match=r"loss\.extra\.rkd needs at least 2 sequences per process in each micro-batch, got 1"):
        _term_value({"extra": {"rkd": 1.0}}, teacher, student, pmap, ids=IDS[:1])


def test_channel_matching_without_map_needs_equal_widths():
    teacher, student, _ = _pruned_pair()
    pairing = {"strategy": "explicit", "explicit": [[0, 0], [1, 2]]}
    with pytest.raises(ConfigError, match=r"loss\.extra\.mmd: samples=tokens needs equal hidden widths or a prune map \(student 48, teacher 64\)"):
        DistillObjective(DistillLossConfig.from_dict({"extra": {"mmd": {"pairing": pairing}}}), teacher=teacher, student=student)
    with pytest.raises(ConfigError, match=r"loss\.extra\.activation_boundary: student layer 0 and teacher layer 0 have 64 and 96"):
        DistillObjective(DistillLossConfig.from_dict({"extra": {"activation_boundary": {"pairing": pairing}}}), teacher=teacher, student=student)
    # Neuron-level NST and token Gram flow matrices work across widths without a map.
    cfg = {"extra": {"nst": {"pairing": pairing}, "fsp": {"matrix": "tokens", "pairing": pairing}}}
    DistillObjective(DistillLossConfig.from_dict(cfg), teacher=teacher, student=student)


def test_recipe_yaml_and_overrides_reach_the_term_settings(tmp_path):
    from minidistill.config import load_config
    from minidistill.recipe_config import PruneDistillConfig

    path = tmp_path / "recipe.yaml"
    path.write_text("loss:\n  extra:\n    nst: 0.5\n    rkd: {weight: 2.0, angle_weight: 1.0}\n")
    cfg = load_config(PruneDistillConfig, path, ["loss.extra.rkd.distance_weight=0.25", "loss.extra.mmd.kernel=linear"])
    assert cfg.loss.weights() == {"logits": 1.0, "nst": 0.5, "rkd": 2.0, "mmd": 1.0}
    rkd = cfg.loss.terms["rkd"]
    assert (rkd.weight, rkd.distance_weight, rkd.angle_weight) == (2.0, 0.25, 1.0)
    assert cfg.loss.terms["mmd"].kernel == "linear"
    with pytest.raises(ConfigError, match=r"loss\.extra\.mmd\.kernel='rbf': choose one of"):
        load_config(PruneDistillConfig, path, ["loss.extra.mmd.kernel=rbf"])


IDENTITY_TERMS = {
    "weights": 1.0,
    "mmd": 1.0,
    "nst": 1.0,
    "token_attention": 1.0,
    "activation_boundary": {"margin": 0.0},
    "fsp": 1.0,
    "rkd": {"student_layer": 1},
}


def test_identity_student_scores_zero_on_every_term_and_architecture(model_type):
    """A student equal to its teacher (identity map) scores ~0 on every new term; gates are captured on fused
    gate_up projections (phi3) as on separate ones."""
    from minidistill.prune.prune_map import PruneMap

    teacher = tiny_model(model_type, num_layers=2)
    student = copy.deepcopy(teacher)
    pmap = PruneMap.identity(get_adapter(teacher).shape(teacher.config))
    out, objective = _step(teacher, student, DistillLossConfig.from_dict({"extra": IDENTITY_TERMS}), pmap, IDS)
    for name in IDENTITY_TERMS:
        assert abs(out["components"][f"loss/{name}"].item()) < 1e-5, (name, out["components"][f"loss/{name}"].item())
    # The captured gates are the gate projection's output (the first half of a fused gate_up projection).
    adapter = get_adapter(teacher)
    mlp = adapter.decoder_layers(teacher)[1].get_submodule(adapter.mlp)
    got = {}
    hook = (mlp.gate_proj if adapter.gate_proj else mlp.gate_up_proj).register_forward_hook(lambda m, a, o: got.__setitem__("g", o))
    feats = teacher_features(teacher, IDS, objective)
    hook.remove()
    gate = got["g"] if adapter.gate_proj else got["g"][..., : got["g"].shape[-1] // 2]
    assert feats.gates[1].shape[-1] == teacher.config.intermediate_size
    assert torch.equal(feats.gates[1], gate)


# ---------------------------------------------------------------------------------------------- gradients on the tiny model


def _grad_refs(pmap):
    """Reference loss of each term from hook-captured float64 features (``sf`` with graph, ``tf`` without)."""
    kept, pairs = _kept(pmap), list(enumerate(pmap.kept_layers))

    def boundary(sf, tf):
        return torch.stack([
            torch.where(tf["gates"][j][..., torch.tensor(pmap.layers[i].kept_neurons)] > 0, F.relu(0.3 - sf["gates"][i]), F.relu(0.3 + sf["gates"][i])).pow(2).mean()
            for i, j in pairs
        ]).mean()

    return {
        "mmd": ({"sigma": 0.5}, lambda sf, tf: torch.stack([_mmd_ref(sf["hidden"][i], tf["hidden"][j][..., kept], "gaussian", "tokens", 0.5) for i, j in pairs]).mean()),
        "nst": (1.0, lambda sf, tf: torch.stack([_mmd_ref(sf["hidden"][i], tf["hidden"][j], "polynomial", "neurons") for i, j in pairs]).mean()),
        "token_attention": (1.0, lambda sf, tf: torch.stack([(_at(sf["hidden"][i]) - _at(tf["hidden"][j])).pow(2).sum(-1).mean() for i, j in pairs]).mean()),
        "activation_boundary": ({"margin": 0.3}, boundary),
        "fsp": (1.0, lambda sf, tf: (_fsp(sf["hidden"][0], sf["hidden"][1]) - _fsp(tf["hidden"][0], tf["hidden"][2], kept)).pow(2).mean()),
        "rkd": (1.0, lambda sf, tf: _naive_rkd(sf["final"].mean(1), tf["final"].mean(1), 1.0, 2.0)),
    }


@pytest.mark.parametrize("name", ["mmd", "nst", "token_attention", "activation_boundary", "fsp", "rkd"])
def test_term_gradients_match_float64_reference(name):
    """The term's gradient w.r.t. student weights (objective on float64 models) equals the reference's."""
    teacher, student, pmap = _pruned_pair()
    teacher, student = teacher.double(), student.double()
    settings, reference = _grad_refs(pmap)[name]
    objective = DistillObjective(DistillLossConfig.from_dict({"extra": {name: settings}}), teacher=teacher, student=student, prune_map=pmap)
    features = {"student": model_features(student, IDS, objective.request_for("student")), "teacher": teacher_features(teacher, IDS, objective)}
    value = objective.terms[name](features, IDS)
    params = [p for n, p in student.named_parameters() if "layers.0." in n and n.endswith("proj.weight")]
    grads = torch.autograd.grad(value, params)

    twin = copy.deepcopy(student)
    got = {"hidden": {}, "gates": {}}
    for i, layer in enumerate(get_adapter(twin).decoder_layers(twin)):
        layer.register_forward_hook(lambda m, a, o, i=i: got["hidden"].__setitem__(i, o[0] if isinstance(o, tuple) else o))
        layer.mlp.gate_proj.register_forward_hook(lambda m, a, o, i=i: got["gates"].__setitem__(i, o))
    twin.model.norm.register_forward_hook(lambda m, a, o: got.__setitem__("final", o))
    twin(IDS)
    ref = reference(got, _features(teacher))
    ref_grads = torch.autograd.grad(ref, [p for n, p in twin.named_parameters() if "layers.0." in n and n.endswith("proj.weight")])
    assert value.item() == pytest.approx(ref.item(), rel=1e-9)
    assert len(grads) == 7
    for g, r in zip(grads, ref_grads):
        assert torch.allclose(g, r, rtol=1e-7, atol=1e-12 + 1e-9 * r.abs().max().item())
    assert sum(r.abs().sum() for r in ref_grads) > 0
