"""The recipe's final model: a plain HF folder that reloads with the perplexity the trainer logged; LoRA merged."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from train_scripts.tiny_setup import make_student_dir, make_teacher_dir, tiny_overrides
from transformers import AutoModelForCausalLM

from minidistill.data import build_text_data
from minidistill.evaluation.perplexity import heldout_loss
from minidistill.models import load_tokenizer
from minidistill.prune.prune_map import PruneMap
from minidistill.recipe_config import load_recipe_config
from minidistill.train import run_prune_distill


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    teacher = make_teacher_dir(root / "teacher", tie=True)
    return teacher, make_student_dir(teacher, root / "student")


@pytest.mark.slow
def test_saved_model_reloads_with_the_logged_perplexity(tiny_dirs, tmp_path):
    teacher, student = tiny_dirs
    cfg = load_recipe_config(
        None, tiny_overrides(tmp_path, teacher, student, **{"loss.attention.weight": 0.5, "train.log_with": "[tensorboard]"})
    )
    result = run_prune_distill(cfg)
    assert list((cfg.run_dir / "tb").rglob("events.out.tfevents*"))
    model_dir = result.model_dir
    assert sorted(p.name for p in tmp_path.joinpath("tiny").iterdir() if p.name.startswith(".")) == []
    for name in ("config.json", "model.safetensors", "tokenizer.json", "prune_map.json", "training_metadata.json"):
        assert (model_dir / name).is_file(), name
    assert PruneMap.load(model_dir).to_dict() == {**PruneMap.load(student).to_dict(), "student_weights": "trained"}
    meta = json.loads((model_dir / "training_metadata.json").read_text())
    assert meta["steps"] == 6 and meta["final_eval"] == result.train.final_eval

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tok = load_tokenizer(str(model_dir))
    data = build_text_data(cfg.data, tok)
    measured = heldout_loss(model, data.heldout.batches(cfg.eval.batch_size, limit_blocks=cfg.eval.max_blocks))
    logged = [json.loads(l) for l in (cfg.run_dir / "log.jsonl").read_text().splitlines()][-1]
    assert logged["kind"] == "eval" and logged["step"] == 6
    assert measured["tokens"] == logged["heldout_tokens"]
    assert measured["loss"] == pytest.approx(logged["heldout_loss"], rel=1e-6)
    # Training changed the student.
    initial = load_file(str(student / "model.safetensors"))
    final = load_file(str(model_dir / "model.safetensors"))
    assert any(not torch.equal(initial[k], final[k]) for k in initial)


@pytest.mark.slow
def test_bf16_run_reports_what_the_saved_checkpoint_scores_in_float32(tiny_dirs, tmp_path):
    """Under bf16 autocast the log's held-out numbers are bf16 ones; the report re-measures the checkpoint in float32."""
    from accelerate.state import AcceleratorState

    teacher, student = tiny_dirs
    cfg = load_recipe_config(None, tiny_overrides(tmp_path, teacher, student, **{"train.mixed_precision": "bf16", "report": "true"}))
    AcceleratorState._reset_state(True)  # earlier in-process runs set up accelerate's state in float32
    try:
        result = run_prune_distill(cfg)
    finally:
        AcceleratorState._reset_state(True)
    metrics = json.loads((cfg.run_dir / "metrics.json").read_text())
    logged = [json.loads(l) for l in (cfg.run_dir / "log.jsonl").read_text().splitlines()][-1]
    model = AutoModelForCausalLM.from_pretrained(result.model_dir, dtype=torch.float32)
    data = build_text_data(cfg.data, load_tokenizer(str(result.model_dir)))
    measured = heldout_loss(model, data.heldout.batches(cfg.eval.batch_size, limit_blocks=cfg.eval.max_blocks))
    reported = metrics["models"]["distilled"]["heldout"]
    assert reported["tokens"] == measured["tokens"] == logged["heldout_tokens"]
    assert reported["loss"] == pytest.approx(measured["loss"], rel=1e-6)
    assert abs(logged["heldout_loss"] - measured["loss"]) > 1e-6  # the bf16 evaluation differs: the re-measure matters


@pytest.mark.slow
def test_lora_run_saves_merged_plain_weights(tiny_dirs, tmp_path):
    teacher, student = tiny_dirs
    cfg = load_recipe_config(
        None, tiny_overrides(tmp_path, teacher, student, **{"train.lora.r": 4, "train.lr": 2e-2, "train.max_steps": 3})
    )
    result = run_prune_distill(cfg)
    final = load_file(str(result.model_dir / "model.safetensors"))
    initial = load_file(str(student / "model.safetensors"))
    assert not [k for k in final if "lora" in k or "base_layer" in k]
    assert set(final) == set(initial)
    for k in initial:
        assert final[k].shape == initial[k].shape
        if "q_proj" in k or "down_proj" in k:
            assert not torch.equal(final[k], initial[k]), k  # adapters merged into the targeted weights
        if "embed_tokens" in k or "norm" in k:
            assert torch.equal(final[k], initial[k]), k  # only adapters were trained
    model = AutoModelForCausalLM.from_pretrained(result.model_dir, dtype=torch.float32)
    tok = load_tokenizer(str(result.model_dir))
    data = build_text_data(cfg.data, tok)
    measured = heldout_loss(model, data.heldout.batches(cfg.eval.batch_size, limit_blocks=cfg.eval.max_blocks))
    assert measured["loss"] == pytest.approx(result.train.final_eval["heldout_loss"], rel=1e-4)


@pytest.mark.slow
def test_pruning_path_saves_the_student_with_its_map_and_resumes_from_it(tiny_dirs, tmp_path):
    """student=null: the teacher is pruned to an explicit shape, distilled, and the run resumes without re-pruning."""
    pytest.importorskip("minidistill.prune.save")
    teacher, _ = tiny_dirs
    overrides = tiny_overrides(tmp_path, teacher, "x", **{"train.max_steps": 2, "train.save_every": 1, "eval.max_blocks": 2})
    overrides = [o for o in overrides if not o.startswith("student.source=")] + [
        "student=null",
        "prune.target.num_layers=2",
        "prune.target.hidden_size=48",
        "prune.target.intermediate_size=64",
        "prune.calib_blocks=4",
        "prune.show_progress=false",
    ]
    cfg = load_recipe_config(None, overrides)
    result = run_prune_distill(cfg)
    init_dir = cfg.run_dir / "student_init"
    pmap = PruneMap.load(init_dir)
    assert pmap.student_shape["num_layers"] == 2 and pmap.student_shape["hidden_size"] == 48
    assert PruneMap.load(result.model_dir).to_dict() == {**pmap.to_dict(), "student_weights": "trained"}
    before = (init_dir / "model.safetensors").stat().st_mtime_ns
    resumed = run_prune_distill(load_recipe_config(None, [o for o in overrides if "max_steps" not in o] + ["train.max_steps=3"]), resume=True)
    assert resumed.train.steps == 3
    assert (init_dir / "model.safetensors").stat().st_mtime_ns == before  # not pruned again


@pytest.mark.slow
def test_search_candidates_read_the_run_s_teacher_cache(tiny_dirs, tmp_path, monkeypatch, caplog):
    """With teacher_cache and a short-distillation ranking the cache is built once, before pruning, and the
    candidates and the training both read it."""
    import logging

    import minidistill.train as train_module

    teacher, _ = tiny_dirs
    builds = []
    real_build = train_module.build_teacher_cache
    monkeypatch.setattr(train_module, "build_teacher_cache", lambda *a, **k: builds.append(1) or real_build(*a, **k))
    overrides = tiny_overrides(tmp_path, teacher, "x", **{"train.max_steps": 2, "train.save_every": 0, "eval.max_blocks": 2})
    overrides = [o for o in overrides if not o.startswith("student.source=")] + [
        "student=null", "prune.target.params=0.6", "prune.calib_blocks=4", "prune.show_progress=false",
        "prune.importance.cache=false", "prune.search.distill_steps=2", "prune.search.distill_batch_size=2",
        "prune.search.distill_candidates=2", "teacher_cache.enabled=true", "teacher_cache.k=8"]
    cfg = load_recipe_config(None, overrides)
    with caplog.at_level(logging.INFO, logger="minidistill.prune.distill_rank"):
        run_prune_distill(cfg)
    assert builds == [1]
    assert "teacher cache rows read once" in caplog.text
    rows = PruneMap.load(cfg.run_dir / "student_init").notes["search"]["candidates"]
    assert any("distilled_loss" in r for r in rows)
