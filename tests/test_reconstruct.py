"""Least-squares reconstruction of pruned blocks: against a naive lstsq reference, and its effect on loss."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model

from minidistill.adapters import get_adapter
from minidistill.config import ConfigError
from minidistill.evaluation.perplexity import heldout_loss
from minidistill.prune.apply import apply_prune_map
from minidistill.prune.prune_map import PruneMap
from minidistill.prune.reconstruct import ReconstructionConfig, reconstruct, solve_refit
from minidistill.prune.select import select_units
from minidistill.prune.types import UnitImportance


def random_importance(model, seed: int = 0) -> UnitImportance:
    t = get_adapter(model).shape(model.config)
    g = torch.Generator().manual_seed(seed)
    L = t["num_layers"]
    return UnitImportance(
        heads=torch.rand(L, t["num_heads"], generator=g),
        kv_groups=torch.rand(L, t["num_kv_heads"], generator=g),
        neurons=torch.rand(L, t["intermediate_size"], generator=g),
        hidden=torch.rand(t["hidden_size"], generator=g),
        layers=torch.rand(L, generator=g),
    )


def capture_projection_inputs(model, batches) -> dict[tuple[int, str], torch.Tensor]:
    """Inputs of every layer's o_proj and down_proj over ``batches``, from plain full forwards."""
    a = get_adapter(model)
    seen: dict[tuple[int, str], list[torch.Tensor]] = {}
    handles = []
    for index, layer in enumerate(a.decoder_layers(model)):
        for part in ("o_proj", "down_proj"):
            def hook(module, args, key=(index, part)):
                seen.setdefault(key, []).append(args[0].reshape(-1, args[0].shape[-1]).double())

            handles.append(a.layer_part(layer, part).register_forward_pre_hook(hook))
    with torch.no_grad():
        for ids in batches:
            model(ids)
    for h in handles:
        h.remove()
    return {k: torch.cat(v) for k, v in seen.items()}


def ridge_lstsq(x_kept: torch.Tensor, target: torch.Tensor, damping: float) -> torch.Tensor:
    """Naive reference: lstsq on the system stacked with sqrt(lam) I rows (lam relative to mean diag)."""
    k = x_kept.shape[1]
    lam = damping * (x_kept * x_kept).sum(0).mean()
    a = torch.cat([x_kept, lam.sqrt() * torch.eye(k, dtype=x_kept.dtype)])
    b = torch.cat([target, torch.zeros(k, target.shape[1], dtype=target.dtype)])
    return torch.linalg.lstsq(a, b, driver="gelsd").solution.T


def calibration_batches(n: int = 6, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 128, (2, 16), generator=g) for _ in range(n)]


@pytest.mark.parametrize("damping", [0.0, 0.05])
def test_refit_matches_naive_lstsq_on_captured_activations(model_type, damping):
    teacher = tiny_model(model_type, num_layers=4, dtype=torch.float64)
    a = get_adapter(teacher)
    t = a.shape(teacher.config)
    shape = dict(t, num_layers=3, hidden_size=t["hidden_size"] - 8, num_heads=2, num_kv_heads=2, intermediate_size=40)
    pmap = select_units(teacher, random_importance(teacher), shape)
    student = apply_prune_map(teacher, pmap)
    sliced = {k: v.clone() for k, v in student.named_parameters()}
    batches = calibration_batches()
    names = reconstruct(student, teacher, pmap, batches, ReconstructionConfig(damping=damping))

    expected_names = []
    for i in range(shape["num_layers"]):
        expected_names += [f"{a.layers}.{i}.{a.o_proj}.weight", f"{a.layers}.{i}.{a.down_proj}.weight"]
    assert names == expected_names and pmap.refit == expected_names
    params = dict(student.named_parameters())
    for name, value in params.items():
        if name not in names:
            assert torch.equal(value, sliced[name]), f"{name} must stay a teacher slice"

    inputs = capture_projection_inputs(teacher, batches)
    rows = pmap.kept_hidden
    hd = t["head_dim"]
    for i, (layer, lm) in enumerate(zip(pmap.kept_layers, pmap.layers)):
        teacher_layer = a.decoder_layers(teacher)[layer]
        cols = {
            "o_proj": [h * hd + d for h in lm.kept_query_heads for d in range(hd)],
            "down_proj": lm.kept_neurons,
        }
        for part in ("o_proj", "down_proj"):
            x = inputs[(layer, part)]
            w = a.layer_part(teacher_layer, part).weight.double()[rows]
            want = ridge_lstsq(x[:, cols[part]], x @ w.T, damping)
            got = params[f"{a.layers}.{i}.{getattr(a, part)}.weight"]
            torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-9 * want.abs().max().item())
            assert not torch.equal(got, sliced[f"{a.layers}.{i}.{getattr(a, part)}.weight"])


def test_solve_refit_handles_singular_gram_without_damping():
    x = torch.randn(50, 4, dtype=torch.float64)
    x = torch.cat([x, x[:, :1]], 1)  # a duplicated column: singular Gram
    y = torch.randn(50, 3, dtype=torch.float64)
    got = solve_refit(x.T @ x, x.T @ y, 0.0)
    want = torch.linalg.lstsq(x, y, driver="gelsd").solution
    torch.testing.assert_close(x @ got, x @ want)


def test_reconstruction_only_refits_blocks_that_lost_inputs():
    teacher = tiny_model("llama", num_layers=3)
    t = get_adapter(teacher).shape(teacher.config)
    # Depth and hidden pruning only: every kept block keeps all its inputs.
    pmap = select_units(teacher, random_importance(teacher), dict(t, num_layers=2, hidden_size=48))
    student = apply_prune_map(teacher, pmap)
    assert reconstruct(student, teacher, pmap, calibration_batches(2), ReconstructionConfig()) == []
    assert pmap.refit == []
    # Neurons pruned but only o_proj allowed as a target.
    pmap = select_units(teacher, random_importance(teacher), dict(t, intermediate_size=48))
    student = apply_prune_map(teacher, pmap)
    assert reconstruct(student, teacher, pmap, calibration_batches(2), ReconstructionConfig(targets=["o_proj"])) == []
    names = reconstruct(student, teacher, pmap, calibration_batches(2), ReconstructionConfig(targets=["down_proj"]))
    assert names == [f"model.layers.{i}.mlp.down_proj.weight" for i in range(3)]


def test_reconstruction_disabled_leaves_student_alone():
    teacher = tiny_model("llama")
    t = get_adapter(teacher).shape(teacher.config)
    pmap = select_units(teacher, random_importance(teacher), dict(t, intermediate_size=48))
    student = apply_prune_map(teacher, pmap)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    assert reconstruct(student, teacher, pmap, calibration_batches(2), ReconstructionConfig(enabled=False)) == []
    assert all(torch.equal(before[k], v) for k, v in student.state_dict().items())
    assert pmap.refit == []


@pytest.mark.parametrize("values, key", [({"damping": -1.0}, "damping"), ({"targets": ["q_proj"]}, "targets")])
def test_reconstruction_config_names_the_bad_key(values, key):
    with pytest.raises(ConfigError, match=key):
        ReconstructionConfig.from_dict(values)
    with pytest.raises(ConfigError, match="did you mean 'damping'"):
        ReconstructionConfig.from_dict({"dampign": 0.1})


def test_reconstruction_needs_calibration_batches():
    teacher = tiny_model("llama")
    t = get_adapter(teacher).shape(teacher.config)
    pmap = select_units(teacher, random_importance(teacher), dict(t, intermediate_size=48))
    with pytest.raises(ValueError, match="calibration"):
        reconstruct(apply_prune_map(teacher, pmap), teacher, pmap, [], ReconstructionConfig())


# ---------------------------------------------------------------------------------------------- effect on loss
def _low_rank_(weight: torch.Tensor, rank: int, g: torch.Generator, noise: float = 0.2) -> None:
    """Replace ``weight`` by a rank-``rank`` matrix of the same scale plus ``noise`` times the old one."""
    out_f, in_f = weight.shape
    low = torch.randn(out_f, rank, generator=g) @ torch.randn(rank, in_f, generator=g)
    weight.copy_(low / low.std() * weight.std() + noise * weight)


def structured_teacher(model_type: str):
    """A tiny model with correlated units (low-rank value and MLP input projections), as trained models have."""
    model = tiny_model(model_type, num_layers=2, initializer_range=0.2)
    a = get_adapter(model)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in a.decoder_layers(model):
            for part in ("v_proj", "qkv_proj", "gate_proj", "up_proj", "gate_up_proj"):
                module = a.layer_part(layer, part)
                if module is not None:
                    _low_rank_(module.weight, 8, g)
    return model


def sample_from(model, n: int, length: int, seed: int) -> torch.Tensor:
    """Token sequences sampled from ``model`` (its own held-out distribution)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 128, (n, 1), generator=g)
    with torch.no_grad():
        for _ in range(length - 1):
            probs = torch.softmax(model(ids).logits[:, -1].double(), -1)
            ids = torch.cat([ids, torch.multinomial(probs, 1, generator=g)], 1)
    return ids


def test_reconstruction_lowers_heldout_loss_of_pruned_tiny_model(model_type):
    teacher = structured_teacher(model_type)
    t = get_adapter(teacher).shape(teacher.config)
    data = sample_from(teacher, 48, 32, seed=0)
    calibration, heldout = list(data[:32].split(8)), [data[32:]]
    pmap = select_units(teacher, random_importance(teacher, seed=2), dict(t, num_heads=2, num_kv_heads=1, intermediate_size=48))
    plain = apply_prune_map(teacher, pmap)
    refit = apply_prune_map(teacher, pmap)
    assert reconstruct(refit, teacher, pmap, calibration, ReconstructionConfig())
    loss_teacher = heldout_loss(teacher, heldout)["loss"]
    loss_plain = heldout_loss(plain, heldout)["loss"]
    loss_refit = heldout_loss(refit, heldout)["loss"]
    assert loss_teacher < loss_refit < loss_plain
    # Reconstruction recovers a real share of what pruning lost.
    assert loss_plain - loss_refit > 0.15 * (loss_plain - loss_teacher)


@pytest.mark.slow
def test_reconstruction_lowers_heldout_loss_of_bundled_teacher_at_half_mlp():
    from minidistill.data import DataConfig, build_text_data
    from minidistill.models import ModelConfig, load_model_and_tokenizer

    teacher, tok = load_model_and_tokenizer(ModelConfig())
    data = build_text_data(DataConfig(seq_len=256), tok)
    a = get_adapter(teacher)
    t = a.shape(teacher.config)
    # Neuron importance from weight norms (|down column| * |up row|): no calibration pass needed.
    neurons = torch.stack(
        [
            a.layer_part(layer, "down_proj").weight.norm(dim=0) * a.layer_part(layer, "up_proj").weight.norm(dim=1)
            for layer in a.decoder_layers(teacher)
        ]
    ).detach()
    importance = random_importance(teacher)
    importance.neurons = neurons
    pmap = select_units(teacher, importance, dict(t, intermediate_size=t["intermediate_size"] // 2))
    student = apply_prune_map(teacher, pmap)
    heldout = list(data.heldout.batches(4, limit_blocks=8))
    loss_plain = heldout_loss(student, heldout)["loss"]
    names = reconstruct(student, teacher, pmap, data.train.batches(4, limit_blocks=16), ReconstructionConfig())
    assert len(names) == t["num_layers"]
    loss_refit = heldout_loss(student, heldout)["loss"]
    assert loss_refit < loss_plain, (loss_refit, loss_plain)
    assert PruneMap.from_dict(pmap.to_dict()).refit == names
