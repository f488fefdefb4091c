"""prune_model: planted dead units pruned exactly, budget targets across architectures and GQA ratios,
search table, prune-map records, and early errors on bad input."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model
from test_importance import plant_dead_units

from minidistill.adapters import UnsupportedArchitectureError, count_parameters
from minidistill.config import ConfigError
from minidistill.data import DataConfig, DataError, TextData, TokenBlocks
from minidistill.prune.apply import apply_prune_map
from minidistill.prune.importance import activation_importance
from minidistill.prune.pipeline import PruneConfig, prune_model
from minidistill.prune.select import select_units
from minidistill.prune.targets import TargetError


def tiny_data(vocab=128, train=10, heldout=3, seq_len=16, seed=0) -> TextData:
    g = torch.Generator().manual_seed(seed)
    return TextData(
        train=TokenBlocks(torch.randint(3, vocab, (train, seq_len), generator=g)),
        heldout=TokenBlocks(torch.randint(3, vocab, (heldout, seq_len), generator=g)),
        config=DataConfig(seq_len=seq_len),
    )


def prune_cfg(**kw) -> PruneConfig:
    base = {
        "calib_blocks": 8,
        "show_progress": False,
        "importance": {"batch_size": 4, "cache": False},
        "search": {"multiple_of": 8, "max_candidates": 2, "score_blocks": 2, "batch_size": 2, "sensitivity": False},
        "reconstruction": {"enabled": False},
    }
    for k, v in kw.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            base[k] = {**base[k], **v}
        else:
            base[k] = v
    return PruneConfig.from_dict(base)


# ---------------------------------------------------------------------------- exactness
def _planted_teacher(model_type):
    """4 layers, 8 heads in 4 KV groups, 96 neurons; per layer one dead KV group (v rows zeroed), one dead
    head in every other group (o_proj columns zeroed), 16 dead neurons (gate rows zeroed); layer 2 is an
    identity. Pruning exactly those units must leave the logits unchanged."""
    model = tiny_model(model_type, num_layers=4, num_heads=8, num_kv_heads=4, dtype=torch.float64)
    g = torch.Generator().manual_seed(3)
    dead_group, dead_head = {}, {}
    for l in range(4):
        dead_group[l] = int(torch.randint(0, 4, (1,), generator=g))
        dead_head[l] = [2 * grp + int(torch.randint(0, 2, (1,), generator=g)) for grp in range(4) if grp != dead_group[l]]
    neurons = {l: torch.randperm(96, generator=g)[:16].tolist() for l in range(4)}
    return plant_dead_units(model, dead_group=dead_group, dead_head=dead_head, dead_neurons=neurons, identity_layer=2)


PLANTED_TARGET = {"num_layers": 3, "hidden_size": 64, "num_heads": 3, "num_kv_heads": 3, "intermediate_size": 80,
                  "head_dim": 16}


def test_pruning_planted_dead_units_keeps_logits_exactly(model_type):
    teacher = _planted_teacher(model_type)
    ids = torch.randint(3, 128, (4, 12), generator=torch.Generator().manual_seed(5))
    units, _ = activation_importance(teacher, [ids], head_signal="output")
    hidden = teacher.config.hidden_size  # phi3's tiny config has 128
    pmap = select_units(teacher, units, {**PLANTED_TARGET, "hidden_size": hidden})
    assert pmap.kept_hidden == list(range(hidden))
    assert 2 not in pmap.kept_layers
    student = apply_prune_map(teacher, pmap)
    with torch.no_grad():
        want = teacher(input_ids=ids).logits
        got = student(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10 * want.abs().max().item())


def test_prune_model_explicit_shape_keeps_logits_exactly():
    teacher = _planted_teacher("qwen3")
    data = tiny_data()
    cfg = prune_cfg(target={"num_layers": 3, "num_heads": 3, "num_kv_heads": 3, "intermediate_size": 80},
                    importance={"head_signal": "output"})
    res = prune_model(teacher, None, data, cfg, teacher_source="tiny-qwen3")
    ids = data.heldout.input_ids
    with torch.no_grad():
        want, got = teacher(input_ids=ids).logits, res.student(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10 * want.abs().max().item())
    pm = res.prune_map
    assert pm.teacher["source"] == "tiny-qwen3" and pm.teacher["model_type"] == "qwen3"
    assert len(pm.teacher["sha256"]) == 64 and pm.teacher["shape"]["num_layers"] == 4
    assert pm.importance["method"] == "activation" and pm.importance["head_signal"] == "output"
    assert pm.importance["calibration_tokens"] == data.train.input_ids[:8].numel()
    assert res.params_after == count_parameters(res.student) < res.params_before
    assert res.candidates == [] and res.timings["importance_s"] > 0


# ---------------------------------------------------------------------------- budgets
@pytest.mark.parametrize("gqa,tied", [(1, False), (2, True), (4, False)])
def test_budget_target_within_two_percent(model_type, gqa, tied):
    heads = 8
    teacher = tiny_model(model_type, num_layers=4, num_heads=heads, num_kv_heads=heads // gqa,
                         intermediate_size=128, tie_word_embeddings=tied)
    non_embedding = gqa == 2
    cfg = prune_cfg(target={"params": 0.6, "non_embedding": non_embedding})
    res = prune_model(teacher, None, tiny_data(), cfg, teacher_source="tiny")
    full = res.non_embedding_params_before if non_embedding else res.params_before
    got = res.non_embedding_params_after if non_embedding else res.params_after
    best = res.candidates[0]
    if best["in_band"]:
        assert abs(got - 0.6 * full) <= 0.02 * 0.6 * full
        assert got <= res.target_params
    else:  # a single-axis shape just outside the band (search.single_axis_slack)
        assert best["family"] != "mix" and best["eligible"]
        assert 0.97 * res.target_params <= got <= 1.01 * res.target_params
    # max_candidates=2 best pre-scored, plus the best of every axis family, plus single-axis neighbours
    assert len(res.candidates) >= 2
    assert [r["rank"] for r in res.candidates] == list(range(1, len(res.candidates) + 1))
    assert res.candidates == sorted(res.candidates, key=lambda r: (not r["eligible"], r["loss"]))
    assert {k: best[k] for k in ("num_layers", "hidden_size", "num_heads", "num_kv_heads", "intermediate_size")} == {
        k: res.prune_map.student_shape[k] for k in ("num_layers", "hidden_size", "num_heads", "num_kv_heads", "intermediate_size")}
    assert res.prune_map.notes["search"]["budget"] == res.target_params
    out = res.student.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert out.shape == (1, 7)


def test_absolute_budget_and_kl_score():
    teacher = tiny_model("llama", num_layers=4, num_heads=8, num_kv_heads=4, intermediate_size=128)
    total = count_parameters(teacher)
    count = int(total * 0.7)
    res = prune_model(teacher, None, tiny_data(), prune_cfg(target={"params": count}, search={"score": "kl"}),
                      teacher_source="tiny")
    if res.candidates[0]["in_band"]:
        assert 0.98 * count <= res.params_after <= count
    else:  # a single-axis shape within search.single_axis_slack of the band
        assert 0.97 * count <= res.params_after <= 1.01 * count
    assert all(r["kl"] >= 0 for r in res.candidates)


@pytest.mark.parametrize("score_on", ["train_tail", "heldout"])
def test_search_scores_on_the_chosen_blocks_and_picks_the_naive_argmin(monkeypatch, score_on):
    """The search scores on the last training blocks (disjoint from calibration and held-out) or on the
    first held-out ones; every candidate's loss equals a float64 loss of the same shape pruned explicitly."""
    from minidistill.prune import pipeline

    scored = []
    real = pipeline.make_score_fn
    monkeypatch.setattr(pipeline, "make_score_fn", lambda t, batches, s, **kw: (scored.append(torch.cat(batches)), real(t, batches, s, **kw))[1])
    teacher = tiny_model("llama", num_layers=4, num_heads=8, num_kv_heads=4, intermediate_size=128)
    data = tiny_data(train=12)
    cfg = prune_cfg(target={"params": 0.6}, search={"score_on": score_on, "score_blocks": 3})
    res = prune_model(teacher, None, data, cfg, teacher_source="tiny")

    blocks = scored[0]
    if score_on == "train_tail":
        assert torch.equal(blocks, data.train.input_ids[-3:])
        others = torch.cat([data.train.input_ids[: cfg.calib_blocks], data.heldout.input_ids])
        assert not (blocks[:, None, :] == others[None, :, :]).all(-1).any()
    else:
        assert torch.equal(blocks, data.heldout.input_ids[:3])
    keys = ("num_layers", "hidden_size", "num_heads", "num_kv_heads", "intermediate_size")
    for row in res.candidates:
        alone = prune_model(teacher, None, data, prune_cfg(target={k: row[k] for k in keys}), teacher_source="tiny")
        logits = alone.student(blocks).logits.double()
        naive = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), blocks[:, 1:].flatten()).item()
        assert row["loss"] == pytest.approx(naive, rel=1e-4)
    eligible = [r for r in res.candidates if r["eligible"]]
    assert res.candidates[0] == min(eligible, key=lambda r: r["loss"])
    assert {k: res.prune_map.student_shape[k] for k in keys} == {k: res.candidates[0][k] for k in keys}


def test_train_tail_scoring_refuses_overlapping_blocks(monkeypatch):
    from minidistill.prune import pipeline

    monkeypatch.setattr(pipeline, "compute_importance", lambda *a, **k: (_ for _ in ()).throw(AssertionError("ran")))
    teacher = tiny_model("llama", num_layers=4, num_heads=8, num_kv_heads=4, intermediate_size=128)
    with pytest.raises(DataError, match="prune.search.score_blocks.*score_on=heldout"):
        prune_model(teacher, None, tiny_data(train=9), prune_cfg(target={"params": 0.6}), teacher_source="tiny")
    no_heldout = TextData(train=tiny_data().train, heldout=TokenBlocks(torch.zeros(0, 16, dtype=torch.long)),
                          config=DataConfig())
    with pytest.raises(DataError, match="score_on=heldout, but data.heldout is empty"):
        prune_model(teacher, None, no_heldout, prune_cfg(target={"params": 0.6}, search={"score_on": "heldout"}),
                    teacher_source="tiny")
    with pytest.raises(ConfigError, match="search.score_on"):
        prune_cfg(search={"score_on": "test"})


# ---------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "target,match",
    [
        ({"params": 2.0e9}, "exceeds the teacher"),
        ({"params": 0.001}, "smallest reachable shape"),
        ({"num_heads": 6, "num_kv_heads": 4}, "not a multiple"),
        ({"num_heads": 16}, r"must be in \[1, 8\]"),
        ({"num_heads": 6, "num_kv_heads": 2}, "query heads per KV group"),
        ({"hidden_size": 100}, r"must be in \[1, 64\]"),
    ],
)
def test_bad_targets_fail_before_calibration(tmp_path, monkeypatch, target, match):
    from minidistill.prune import pipeline

    def no_calibration(*a, **k):
        raise AssertionError("calibration ran before the target was checked")

    monkeypatch.setattr(pipeline, "compute_importance", no_calibration)
    teacher = tiny_model("llama", num_layers=4, num_heads=8, num_kv_heads=4)
    out = tmp_path / "student"
    with pytest.raises(TargetError, match=match):
        prune_model(teacher, None, tiny_data(), prune_cfg(target=target, output_dir=str(out)), teacher_source="tiny")
    assert not out.exists()


def test_bad_config_and_data_errors(tmp_path, monkeypatch):
    from minidistill.prune import pipeline

    monkeypatch.setattr(pipeline, "compute_importance", lambda *a, **k: (_ for _ in ()).throw(AssertionError("ran")))
    teacher = tiny_model("llama")
    with pytest.raises(ConfigError, match="target.params and target shape"):
        prune_cfg(target={"params": 0.5, "num_layers": 1})
    with pytest.raises(ConfigError, match="prune.layer_method"):
        prune_cfg(layer_method="cosine")
    with pytest.raises(ConfigError, match="search.score"):
        prune_cfg(search={"score": "ppl"})
    empty = TextData(train=TokenBlocks(torch.zeros(0, 16, dtype=torch.long)), heldout=tiny_data().heldout, config=DataConfig())
    with pytest.raises(DataError, match="calibration data is empty"):
        prune_model(teacher, None, empty, prune_cfg(), teacher_source="tiny")
    short = TextData(train=TokenBlocks(torch.zeros(4, 1, dtype=torch.long)), heldout=tiny_data().heldout, config=DataConfig())
    with pytest.raises(DataError, match="at least 2"):
        prune_model(teacher, None, short, prune_cfg(), teacher_source="tiny")
    out = tmp_path / "full"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="not empty"):
        prune_model(teacher, None, tiny_data(), prune_cfg(output_dir=str(out)), teacher_source="tiny")
    assert (out / "keep.txt").read_text() == "x"


def test_moe_and_unknown_architectures_are_refused():
    teacher = tiny_model("llama")
    teacher.config.num_local_experts = 4
    with pytest.raises(UnsupportedArchitectureError, match="mixture-of-experts"):
        prune_model(teacher, None, tiny_data(), prune_cfg(), teacher_source="tiny")
    teacher.config.num_local_experts = None
    teacher.config.model_type = "gpt2"
    with pytest.raises(UnsupportedArchitectureError, match="unsupported model type"):
        prune_model(teacher, None, tiny_data(), prune_cfg(), teacher_source="tiny")


# ---------------------------------------------------------------------------- recipes/prune.py
def _recipe():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "recipes" / "prune.py"
    spec = importlib.util.spec_from_file_location("prune_recipe", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


RECIPE_FAST = ["--seq_len", "32", "--max_documents", "40", "--calib_blocks", "8", "--eval_blocks", "4",
               "--multiple_of", "8", "--max_candidates", "2", "importance.cache=false", "search.score_blocks=2"]


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    from train_scripts.tiny_setup import make_teacher_dir

    return make_teacher_dir(tmp_path_factory.mktemp("teacher") / "tiny", tie=True)


def test_recipe_end_to_end(teacher_dir, tmp_path):
    import json

    from transformers import AutoModelForCausalLM

    out = tmp_path / "student"
    rc = _recipe().main(["--model", str(teacher_dir), "--output", str(out), "--target_params", "0.6", *RECIPE_FAST])
    assert rc == 0
    student, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    summary = json.loads((out / "prune_summary.json").read_text())
    assert abs(summary["params_after"] - 0.6 * summary["params_before"]) <= 0.02 * 0.6 * summary["params_before"]
    assert summary["params_after"] == count_parameters(student)
    assert summary["heldout_perplexity_after"] > 0 and summary["candidates"]
    pm = json.loads((out / "prune_map.json").read_text())
    assert pm["teacher"]["source"] == str(teacher_dir) and pm["student_shape"] == summary["shape_after"]
    assert pm["refit"], "reconstruction is on by default"
    assert not [p for p in out.parent.iterdir() if p.name != "student"], "no temporary folder left behind"


def test_recipe_explicit_shape_without_reconstruction(teacher_dir, tmp_path):
    import json

    out = tmp_path / "student"
    rc = _recipe().main(["--model", str(teacher_dir), "--output", str(out), "--num_layers", "2", "--intermediate_size", "64",
                         "--importance", "magnitude", "--no_reconstruction", *RECIPE_FAST])
    assert rc == 0
    pm = json.loads((out / "prune_map.json").read_text())
    assert pm["student_shape"]["num_layers"] == 2 and pm["student_shape"]["intermediate_size"] == 64
    assert pm["refit"] == [] and pm["importance"]["method"] == "magnitude"


# exit code of each error kind (minidistill.errors.EXIT_CODES): target 4, data 3, config 2
RECIPE_EXIT_CODES = {"exceeds the teacher": 4, "not a multiple": 4, "no column 'body'": 3, "non-empty document": 3,
                     "exclude each other": 2, "did you mean": 2}


@pytest.mark.parametrize(
    "extra,match",
    [
        (["--target_params", "5e9"], "exceeds the teacher"),
        (["--num_heads", "3"], "not a multiple"),
        (["--target_params", "0.5", "--calib_data", "{jsonl}", "--text_column", "body"], "no column 'body'"),
        (["--target_params", "0.5", "--calib_data", "{empty}"], "non-empty document"),
        (["--target_params", "0.5", "--num_layers", "2"], "exclude each other"),
        (["--target_params", "0.5", "search.scores=kl"], "did you mean"),
    ],
)
def test_recipe_bad_input_fails_clearly(teacher_dir, tmp_path, capsys, extra, match):
    import json

    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": f"doc {i} words here"}) for i in range(10)) + "\n")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    extra = [e.format(jsonl=jsonl, empty=empty) for e in extra]
    out = tmp_path / "student"
    rc = _recipe().main(["--model", str(teacher_dir), "--output", str(out), *extra, *RECIPE_FAST])
    assert rc == RECIPE_EXIT_CODES[match]
    assert match in capsys.readouterr().err
    assert not out.exists()


def test_recipe_refuses_non_empty_output_before_loading(tmp_path, capsys):
    out = tmp_path / "student"
    out.mkdir()
    (out / "model.safetensors").write_text("keep")
    rc = _recipe().main(["--model", str(tmp_path / "does-not-exist"), "--output", str(out), "--target_params", "0.5"])
    assert rc == 11 and "not empty" in capsys.readouterr().err
    assert (out / "model.safetensors").read_text() == "keep"


# ---------------------------------------------------------------------------- layer methods and the winner's re-fit
@pytest.mark.parametrize("method", ["lm_loss", "iterative"])
def test_loss_layer_methods_with_every_layer_kept_prune_like_any_other_method(method):
    """No layer is dropped, so no layer score is read: the student equals the block-influence one."""
    teacher = tiny_model("llama", num_layers=3, num_heads=4, num_kv_heads=2)
    target = {"num_layers": 3, "num_heads": 2, "num_kv_heads": 2, "intermediate_size": 64}
    got = prune_model(teacher, None, tiny_data(), prune_cfg(target=target, layer_method=method), teacher_source="tiny")
    want = prune_model(teacher, None, tiny_data(), prune_cfg(target=target), teacher_source="tiny")
    for name, value in want.student.state_dict().items():
        assert torch.equal(got.student.state_dict()[name], value), name


def test_the_winners_teacher_mode_refit_from_the_calibration_grams_equals_the_refit_by_forwards():
    """search.reconstruct=false: the winner alone is re-fitted after the search, from the calibration's Gram matrices."""
    from minidistill.prune.prune_map import PruneMap
    from minidistill.prune.reconstruct import ReconstructionConfig, reconstruct

    teacher = tiny_model("llama", num_layers=3, num_heads=4, num_kv_heads=2, dtype=torch.float64)
    data = tiny_data()
    cfg = prune_cfg(target={"params": 0.6}, reconstruction={"enabled": True, "mode": "teacher"}, search={"reconstruct": False})
    res = prune_model(teacher, None, data, cfg, teacher_source="tiny")
    assert res.prune_map.refit
    ref_map = PruneMap.from_dict({**res.prune_map.to_dict(), "refit": []})
    ref = apply_prune_map(teacher, ref_map)
    reconstruct(ref, teacher, ref_map, [data.train.input_ids[0:4], data.train.input_ids[4:8]], ReconstructionConfig(mode="teacher"))
    assert sorted(ref_map.refit) == sorted(res.prune_map.refit)
    for name, value in ref.state_dict().items():
        torch.testing.assert_close(res.student.state_dict()[name], value, rtol=1e-9, atol=1e-10)
