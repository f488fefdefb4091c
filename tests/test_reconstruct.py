"""Least-squares reconstruction of pruned blocks: against a naive lstsq reference, and its effect on loss."""

from __future__ import annotations

import functools

import pytest
import torch
from conftest import tiny_model

from minidistill.adapters import get_adapter
from minidistill.config import ConfigError
from minidistill.evaluation.perplexity import heldout_loss
from minidistill.prune.apply import apply_prune_map
from minidistill.prune.prune_map import PruneMap
from minidistill.prune.reconstruct import ReconstructionConfig, ReconstructionReport, reconstruct, solve_refit
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


def capture_parts(model, batches, parts: dict[str, str]) -> dict[tuple[int, str], torch.Tensor]:
    """Per layer: the input (``"in"``) or output (``"out"``) of adapter parts over ``batches``, from plain full forwards."""
    a = get_adapter(model)
    seen: dict[tuple[int, str], list[torch.Tensor]] = {}
    handles = []
    for index, layer in enumerate(a.decoder_layers(model)):
        for part, kind in parts.items():
            module = a.layer_part(layer, part)
            if module is None:
                continue
            if kind == "in":
                def hook(module, args, key=(index, part)):
                    seen.setdefault(key, []).append(args[0].reshape(-1, args[0].shape[-1]).double())

                handles.append(module.register_forward_pre_hook(hook))
            else:
                def hook(module, args, out, key=(index, part)):
                    seen.setdefault(key, []).append(out.reshape(-1, out.shape[-1]).double())

                handles.append(module.register_forward_hook(hook))
    with torch.no_grad():
        for ids in batches:
            model(ids)
    for h in handles:
        h.remove()
    return {k: torch.cat(v) for k, v in seen.items()}


def capture_projection_inputs(model, batches) -> dict[tuple[int, str], torch.Tensor]:
    """Inputs of every layer's o_proj and down_proj over ``batches``, from plain full forwards."""
    return capture_parts(model, batches, {"o_proj": "in", "down_proj": "in"})


def ridge_lstsq(x_kept: torch.Tensor, target: torch.Tensor, damping: float, bias: bool = False):
    """Naive reference: lstsq on the system stacked with sqrt(lam) I rows (lam relative to mean diag).

    Returns the weight ``[out, in]``, or (weight, bias) with an unpenalised constant column when ``bias``.
    """
    k = x_kept.shape[1]
    lam = damping * (x_kept * x_kept).sum(0).mean()
    reg = lam.sqrt() * torch.eye(k, dtype=x_kept.dtype)
    if bias:
        x_kept = torch.cat([x_kept, torch.ones(x_kept.shape[0], 1, dtype=x_kept.dtype)], 1)
        reg = torch.cat([reg, torch.zeros(k, 1, dtype=reg.dtype)], 1)
    a = torch.cat([x_kept, reg])
    b = torch.cat([target, torch.zeros(k, target.shape[1], dtype=target.dtype)])
    sol = torch.linalg.lstsq(a, b, driver="gelsd").solution
    return (sol[:k].T, sol[k]) if bias else sol.T


def calibration_batches(n: int = 6, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 128, (2, 16), generator=g) for _ in range(n)]


def half_shape(t: dict[str, int], **over) -> dict[str, int]:
    """One layer, 8 hidden channels, half the heads and a part of the MLP cut."""
    return dict(t, num_layers=t["num_layers"] - 1, hidden_size=t["hidden_size"] - 8, num_heads=2, num_kv_heads=2,
                intermediate_size=40, **over)


def pruned_pair(model_type: str, shape_fn=half_shape, seed: int = 0):
    teacher = tiny_model(model_type, num_layers=4, dtype=torch.float64)
    t = get_adapter(teacher).shape(teacher.config)
    pmap = select_units(teacher, random_importance(teacher, seed), shape_fn(t))
    return teacher, pmap, apply_prune_map(teacher, pmap)


def input_rows(a, teacher_shape, lm) -> dict[str, list[int]]:
    """Teacher output rows kept by each input projection of one layer (fused layouts included)."""
    hd = teacher_shape["head_dim"]
    q = [h * hd + d for h in lm.kept_query_heads for d in range(hd)]
    kv = [h * hd + d for h in lm.kept_kv_groups for d in range(hd)]
    n, inter = lm.kept_neurons, teacher_shape["intermediate_size"]
    q_size, kv_size = teacher_shape["num_heads"] * hd, teacher_shape["num_kv_heads"] * hd
    return {
        "q_proj": q, "k_proj": kv, "v_proj": kv, "gate_proj": n, "up_proj": n,
        "qkv_proj": q + [q_size + r for r in kv] + [q_size + kv_size + r for r in kv],
        "gate_up_proj": n + [inter + r for r in n],
    }


def attn_parts(a) -> list[str]:
    return ["qkv_proj"] if a.qkv_proj is not None else ["q_proj", "k_proj", "v_proj"]


def mlp_parts(a) -> list[str]:
    return ["gate_up_proj"] if a.gate_up_proj is not None else ["gate_proj", "up_proj"]


def assert_fit(params, name: str, x: torch.Tensor, y: torch.Tensor, damping: float) -> None:
    """The student parameter ``name`` (+ its bias if re-fitted) is the ridge solution of x -> y."""
    bias = name.replace(".weight", ".bias")
    want = ridge_lstsq(x, y, damping, bias=bias in params)
    want_w, want_b = want if bias in params else (want, None)
    torch.testing.assert_close(params[name], want_w, rtol=1e-7, atol=1e-8 * want_w.abs().max().item())
    if want_b is not None:
        torch.testing.assert_close(params[bias], want_b, rtol=1e-7, atol=1e-8 * want_b.abs().max().item())


@pytest.mark.parametrize("damping", [0.0, 0.05])
def test_teacher_mode_refit_matches_naive_lstsq_on_captured_activations(model_type, damping):
    teacher, pmap, student = pruned_pair(model_type)
    a = get_adapter(teacher)
    t = a.shape(teacher.config)
    shape = pmap.student_shape
    sliced = {k: v.clone() for k, v in student.named_parameters()}
    batches = calibration_batches()
    cfg = ReconstructionConfig(mode="teacher", refit_inputs=False, damping=damping)
    names = reconstruct(student, teacher, pmap, batches, cfg)

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


def test_teacher_mode_input_refit_matches_naive_lstsq(model_type):
    """q/k/v and gate/up from the student's norm of the teacher's residual (kept channels) to the teacher's outputs."""
    teacher, pmap, student = pruned_pair(model_type)
    a = get_adapter(teacher)
    t = a.shape(teacher.config)
    batches = calibration_batches()
    names = reconstruct(student, teacher, pmap, batches, ReconstructionConfig(mode="teacher", refit_inputs=True, damping=0.05))
    params = dict(student.named_parameters())
    parts = {"attn_in_norm": "in", "mlp_in_norm": "in", **{p: "out" for p in attn_parts(a) + mlp_parts(a)}}
    seen = capture_parts(teacher, batches, parts)
    rows = pmap.kept_hidden
    biases = 0
    for i, (layer, lm) in enumerate(zip(pmap.kept_layers, pmap.layers)):
        keep = input_rows(a, t, lm)
        s_layer = a.decoder_layers(student)[i]
        for norm, group in (("attn_in_norm", attn_parts(a)), ("mlp_in_norm", mlp_parts(a))):
            with torch.no_grad():
                x = a.layer_part(s_layer, norm)(seen[(layer, norm)][:, rows])
            for part in group:
                name = f"{a.layers}.{i}.{getattr(a, part)}.weight"
                assert name in names
                biases += name.replace(".weight", ".bias") in names
                assert_fit(params, name, x, seen[(layer, part)][:, keep[part]], 0.05)
    # qwen2's q/k/v biases are re-fitted with a constant input column; the others have none.
    assert biases == (3 * pmap.student_shape["num_layers"] if model_type == "qwen2" else 0)


def test_sequential_refit_matches_naive_lstsq_on_the_students_own_inputs(model_type):
    """Every re-fit of the sequential mode solves the ridge problem from the final student's own inputs.

    Within a layer the order is q/k/v, o_proj, gate/up, down_proj, and layers go bottom up, so a plain
    forward of the re-fitted student reproduces exactly the inputs each re-fit saw.
    """
    teacher, pmap, student = pruned_pair(model_type)
    a = get_adapter(teacher)
    t = a.shape(teacher.config)
    batches = calibration_batches()
    names = reconstruct(student, teacher, pmap, batches, ReconstructionConfig(mode="sequential", refit_inputs=True, damping=0.05))
    params = dict(student.named_parameters())
    order = attn_parts(a) + ["o_proj"] + mlp_parts(a) + ["down_proj"]
    expected = []
    for i in range(pmap.student_shape["num_layers"]):
        for part in order:
            expected.append(f"{a.layers}.{i}.{getattr(a, part)}.weight")
            if model_type == "qwen2" and part in ("q_proj", "k_proj", "v_proj"):
                expected.append(f"{a.layers}.{i}.{getattr(a, part)}.bias")
    assert names == expected

    first = {"attn": attn_parts(a)[0], "mlp": mlp_parts(a)[0]}
    inputs = capture_parts(student, batches, {first["attn"]: "in", "o_proj": "in", first["mlp"]: "in", "down_proj": "in"})
    targets = capture_parts(teacher, batches, {p: "out" for p in order})
    rows = pmap.kept_hidden
    for i, (layer, lm) in enumerate(zip(pmap.kept_layers, pmap.layers)):
        keep = {**input_rows(a, t, lm), "o_proj": rows, "down_proj": rows}
        for part in order:
            source = first["attn"] if part in attn_parts(a) else first["mlp"] if part in mlp_parts(a) else part
            assert_fit(params, f"{a.layers}.{i}.{getattr(a, part)}.weight", inputs[(i, source)],
                       targets[(layer, part)][:, keep[part]], 0.05)


def test_sequential_equals_teacher_mode_on_the_first_pruned_layer():
    """With nothing pruned upstream the student's inputs at the first layer are the teacher's: same re-fit."""
    teacher = tiny_model("llama", num_layers=3, dtype=torch.float64)
    t = get_adapter(teacher).shape(teacher.config)
    # down_proj: heads kept, so that the attention below it in the same layer is the teacher's.
    for target, heads in (("o_proj", 2), ("down_proj", t["num_heads"])):
        kv = 1 if heads == 2 else t["num_kv_heads"]
        pmap = select_units(teacher, random_importance(teacher), dict(t, num_heads=heads, num_kv_heads=kv, intermediate_size=40))
        got = {}
        for mode in ("teacher", "sequential"):
            student = apply_prune_map(teacher, pmap)
            reconstruct(student, teacher, pmap, calibration_batches(), ReconstructionConfig(mode=mode, targets=[target]))
            got[mode] = dict(student.named_parameters())
        name = f"model.layers.0.{getattr(get_adapter(teacher), target)}.weight"
        torch.testing.assert_close(got["sequential"][name], got["teacher"][name], rtol=1e-9, atol=1e-12)
        # Further up the student's own inputs differ from the teacher's: the re-fits differ.
        name = name.replace("layers.0", "layers.2")
        assert not torch.allclose(got["sequential"][name], got["teacher"][name], rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("mode", ["teacher", "sequential"])
def test_reconstruction_statistics_do_not_grow_with_tokens(mode):
    teacher, pmap, _ = pruned_pair("llama")
    reports = []
    for n in (2, 8):
        report = ReconstructionReport()
        student = apply_prune_map(teacher, pmap)
        reconstruct(student, teacher, pmap, calibration_batches(n), ReconstructionConfig(mode=mode), report=report)
        reports.append(report)
    assert reports[1].tokens == 4 * reports[0].tokens
    assert reports[0].peak_stat_bytes > 0 and reports[1].peak_stat_bytes == reports[0].peak_stat_bytes
    assert reports[1].groups == reports[0].groups > 0


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
    for mode in ("teacher", "sequential"):
        cfg = ReconstructionConfig(mode=mode, refit_inputs=False)
        assert reconstruct(student, teacher, pmap, calibration_batches(2), cfg) == []
    assert pmap.refit == []
    # Hidden channels were cut: the input projections of every layer are re-fitted when asked.
    names = reconstruct(student, teacher, pmap, calibration_batches(2), ReconstructionConfig(mode="teacher", refit_inputs=True))
    parts = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj")
    assert names == [f"model.layers.{i}.{p}.weight" for i in range(2) for p in parts]
    # Neurons pruned but only o_proj allowed as a target.
    pmap = select_units(teacher, random_importance(teacher), dict(t, intermediate_size=48))
    student = apply_prune_map(teacher, pmap)
    for mode in ("teacher", "sequential"):
        assert reconstruct(student, teacher, pmap, calibration_batches(2), ReconstructionConfig(mode=mode, targets=["o_proj"])) == []
        names = reconstruct(student, teacher, pmap, calibration_batches(2), ReconstructionConfig(mode=mode, targets=["down_proj"]))
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


@functools.lru_cache(maxsize=None)
def loss_setup(model_type: str):
    """A structured tiny teacher, 32 calibration and 16 held-out sequences sampled from it, its held-out loss."""
    teacher = structured_teacher(model_type)
    data = sample_from(teacher, 48, 32, seed=0)
    calibration, heldout = list(data[:32].split(8)), [data[32:]]
    return teacher, calibration, heldout, heldout_loss(teacher, heldout)["loss"]


def test_each_mode_lowers_heldout_loss_of_pruned_tiny_model(model_type):
    teacher, calibration, heldout, loss_teacher = loss_setup(model_type)
    t = get_adapter(teacher).shape(teacher.config)
    pmap = select_units(teacher, random_importance(teacher, seed=2), dict(t, num_heads=2, num_kv_heads=1, intermediate_size=48))
    loss_plain = heldout_loss(apply_prune_map(teacher, pmap), heldout)["loss"]
    for mode in ("teacher", "sequential"):
        refit = apply_prune_map(teacher, pmap)
        assert reconstruct(refit, teacher, pmap, calibration, ReconstructionConfig(mode=mode))
        loss_refit = heldout_loss(refit, heldout)["loss"]
        assert loss_teacher < loss_refit < loss_plain, mode
        # Reconstruction recovers a real share of what pruning lost.
        assert loss_plain - loss_refit > 0.15 * (loss_plain - loss_teacher), mode


def test_input_refit_lowers_heldout_loss_when_hidden_channels_are_cut():
    teacher, calibration, heldout, loss_teacher = loss_setup("llama")
    t = get_adapter(teacher).shape(teacher.config)
    pmap = select_units(teacher, random_importance(teacher, seed=2), dict(t, hidden_size=40, intermediate_size=64))
    loss_plain = heldout_loss(apply_prune_map(teacher, pmap), heldout)["loss"]
    for mode in ("teacher", "sequential"):
        loss = {}
        for inputs in (False, True):
            student = apply_prune_map(teacher, pmap)
            reconstruct(student, teacher, pmap, calibration, ReconstructionConfig(mode=mode, refit_inputs=inputs))
            loss[inputs] = heldout_loss(student, heldout)["loss"]
        # (teacher mode's down_proj re-fit alone can be neutral here: its inputs ignore the cut channels)
        assert loss_teacher < loss[True] < min(loss[False], loss_plain), (mode, loss, loss_plain)


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


def test_auto_mode_is_sequential_with_input_refit_when_hidden_channels_are_cut():
    teacher, pmap, _ = pruned_pair("llama")  # hidden cut
    t = get_adapter(teacher).shape(teacher.config)
    narrow = select_units(teacher, random_importance(teacher), dict(t, num_heads=2, num_kv_heads=2, intermediate_size=40))
    for pm, inputs, same_as in ((pmap, True, "sequential"), (pmap, False, "teacher"), (narrow, True, "teacher")):
        got = {}
        for mode in ("auto", same_as):
            student = apply_prune_map(teacher, pm)
            reconstruct(student, teacher, pm, calibration_batches(2), ReconstructionConfig(mode=mode, refit_inputs=inputs))
            got[mode] = student.state_dict()
        assert all(torch.equal(got["auto"][k], got[same_as][k]) for k in got["auto"]), (inputs, same_as)


def test_teacher_mode_from_calibration_grams_equals_the_forward_refit(model_type):
    """The re-fit solved from compute_importance's Gram matrices equals the one that runs the teacher, and
    runs no model forward; a cut of hidden channels (input re-fits) still takes the forward path."""
    from minidistill.prune.importance import ImportanceConfig, compute_importance, importance_batches

    teacher = tiny_model(model_type, num_layers=4, dtype=torch.float64)
    t = get_adapter(teacher).shape(teacher.config)
    shape = dict(t, num_layers=t["num_layers"] - 1, num_heads=2, num_kv_heads=2, intermediate_size=40)
    pmap = select_units(teacher, random_importance(teacher), shape)
    calibration = torch.cat(calibration_batches())
    grams: dict = {}
    compute_importance(teacher, calibration, ImportanceConfig(batch_size=2, cache=False, neuron_ranking="method"),
                       gram_out=grams)
    assert set(grams) == {"o_proj", "down_proj", "tokens"} and grams["tokens"] == calibration.numel()
    batches = importance_batches(calibration, 2)
    cfg = ReconstructionConfig(mode="teacher", damping=0.01)
    by_forward, by_grams = apply_prune_map(teacher, pmap), apply_prune_map(teacher, pmap)
    names = reconstruct(by_forward, teacher, pmap, batches, cfg)
    calls = []
    handle = get_adapter(teacher).decoder_layers(teacher)[0].register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        assert reconstruct(by_grams, teacher, pmap, batches, cfg, teacher_grams=grams) == names
    finally:
        handle.remove()
    assert not calls and names
    want, got = dict(by_forward.named_parameters()), dict(by_grams.named_parameters())
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-9, atol=1e-10)
    cut = select_units(teacher, random_importance(teacher), dict(shape, hidden_size=t["hidden_size"] - 8))
    handle = get_adapter(teacher).decoder_layers(teacher)[0].register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        reconstruct(apply_prune_map(teacher, cut), teacher, cut, batches, cfg, teacher_grams=grams)
    finally:
        handle.remove()
    assert calls  # the input projections need the forward


def test_gram_matrices_are_collected_even_when_the_scores_are_cached(tmp_path, monkeypatch):
    from minidistill.prune.importance import ImportanceConfig, compute_importance

    monkeypatch.setenv("MINIDISTILL_CACHE", str(tmp_path))
    teacher = tiny_model("llama", num_layers=2, dtype=torch.float64)
    calibration = torch.cat(calibration_batches())
    cfg = ImportanceConfig(batch_size=2, neuron_ranking="method")
    first, _ = compute_importance(teacher, calibration, cfg)
    assert list((tmp_path / "importance").iterdir())  # cached
    grams: dict = {}
    again, _ = compute_importance(teacher, calibration, cfg, gram_out=grams)
    assert set(grams) == {"o_proj", "down_proj", "tokens"}
    assert torch.equal(first.neurons, again.neurons) and torch.equal(first.heads, again.heads)
