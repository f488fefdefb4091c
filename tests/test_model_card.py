"""Model card: YAML metadata and model-index round-trip through huggingface_hub.ModelCard.load."""

from __future__ import annotations

import json

import pytest
from huggingface_hub import ModelCard

from minidistill.publish.model_card import UNKNOWN_LICENSE_NOTE, build_model_card, run_info_from_folder, teacher_metadata

EVAL = {
    "tasks": ["minidistill_heldout_ppl", "minidistill_lastword"],
    "settings": {"limit": None},
    "rows": [
        {"name": "teacher", "parameters": 134_515_008, "non_embedding_parameters": 106_000_000, "wall_time_s": 10.0,
         "metrics": {"minidistill_heldout_ppl": {"word_perplexity": 30.5}, "minidistill_lastword": {"acc": 0.4, "perplexity": 20.0}}, "samples": {}},
        {"name": "distilled", "parameters": 90_000_000, "non_embedding_parameters": 62_000_000, "wall_time_s": 7.0,
         "metrics": {"minidistill_heldout_ppl": {"word_perplexity": 41.25}, "minidistill_lastword": {"acc": 0.3, "perplexity": 28.0}}, "samples": {}},
    ],
}


def run_info(**extra):
    info = {
        "model_name": "someone/smol-pruned",
        "teacher": {"source": "bundled", "shape": {"num_layers": 30, "hidden_size": 576}, "parameters": 134_515_008},
        "student": {"shape": {"num_layers": 20, "hidden_size": 512}, "parameters": 90_000_000},
        "prune_map": {"teacher": {"shape": {"num_layers": 4}}, "kept_layers": [0, 1, 3], "kept_hidden": list(range(8)),
                      "layers": [{"kept_kv_groups": [0], "kept_query_heads": [0, 1], "kept_neurons": [0, 5, 7]}] * 3,
                      "importance": {"method": "activation"}},
        "losses": {"logit_kl": 1.0, "hidden_mse": 0.5},
        "tokens_seen": 1_234_567,
        "hardware": "1x CPU (2 cores)",
        "datasets": ["lee_background"],
        "before_after": [{"model": "teacher", "ppl": 30.5}, {"model": "distilled", "ppl": 41.25}],
        "eval_results": EVAL,
        "reproduce": "python recipes/prune_distill.py --config recipes/configs/demo.yaml",
    }
    info.update(extra)
    return info


def test_metadata_and_model_index_round_trip(tmp_path):
    card = build_model_card(run_info())
    path = tmp_path / "README.md"
    card.save(path)
    loaded = ModelCard.load(path)
    data = loaded.data
    assert data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert data.license == "apache-2.0"
    assert data.library_name == "transformers"
    assert data.tags == ["pruned", "distilled", "minidistill"]
    assert data.datasets == ["lee_background"]
    assert data.model_name == "someone/smol-pruned"
    got = {(r.task_name, r.metric_type): r.metric_value for r in data.eval_results}
    assert got == {
        ("minidistill_heldout_ppl", "word_perplexity"): 41.25,  # the distilled row
        ("minidistill_lastword", "acc"): 0.3,
        ("minidistill_lastword", "perplexity"): 28.0,
    }
    assert loaded.data.to_dict() == card.data.to_dict()
    text = loaded.text
    for needle in ("| num_layers | 30 | 20 |", "kept layers (3): [0, 1, 3]; dropped: [2]", "| logit_kl | 1.0 |",
                   "tokens seen: 1,234,567", "1x CPU (2 cores)", "| distilled | 41.25 |",
                   "python recipes/prune_distill.py --config recipes/configs/demo.yaml", "MLP neurons kept per layer: [3, 3, 3]"):
        assert needle in text, needle


def test_eval_model_selects_row():
    card = build_model_card(run_info(eval_model="teacher"))
    assert {r.metric_value for r in card.data.eval_results} == {30.5, 0.4, 20.0}


def test_license_from_local_teacher_card(tmp_path):
    teacher = tmp_path / "teacher"
    teacher.mkdir()
    (teacher / "README.md").write_text("---\nlicense: mit\nbase_model: org/original\n---\n# teacher\n")
    assert teacher_metadata(str(teacher)) == {"base_model": "org/original", "license": "mit"}
    card = build_model_card(run_info(teacher={"source": str(teacher)}))
    assert card.data.license == "mit" and card.data.base_model == "org/original"


def test_unknown_license_is_other_with_note(tmp_path):
    teacher = tmp_path / "teacher"
    teacher.mkdir()
    card = build_model_card(run_info(teacher={"source": str(teacher)}, eval_results=None))
    assert card.data.license == "other"
    assert card.data.base_model is None  # a local path is not a Hub id
    assert UNKNOWN_LICENSE_NOTE in card.text
    assert card.data.eval_results is None
    hub_card = build_model_card(run_info(teacher={"source": "org/some-model"}))
    assert hub_card.data.base_model == "org/some-model" and hub_card.data.license == "other"


def test_license_override():
    assert build_model_card(run_info(teacher={"source": "bundled", "license": "mit"})).data.license == "mit"


def test_teacher_is_required():
    with pytest.raises(ValueError, match="teacher"):
        build_model_card({"model_name": "x"})


def test_run_info_from_folder(tmp_path):
    run = tmp_path / "run"
    model = run / "student"
    model.mkdir(parents=True)
    (run / "prune_map.json").write_text(json.dumps({"teacher": {"source": "bundled", "shape": {"num_layers": 4}},
                                                    "student_shape": {"num_layers": 2}, "kept_layers": [0, 2]}))
    (run / "lm_eval.json").write_text(json.dumps(EVAL))
    info = run_info_from_folder(model, model_name="a/b")
    assert info["teacher"]["source"] == "bundled" and info["student"]["shape"] == {"num_layers": 2}
    assert info["eval_results"] == EVAL and info["model_name"] == "a/b"
    card = build_model_card(info)
    assert card.data.eval_results and "kept layers (2): [0, 2]; dropped: [1, 3]" in card.text
    with pytest.raises(ValueError, match="--teacher"):
        run_info_from_folder(tmp_path / "empty")


def test_card_from_a_run_folder_carries_speed_and_the_evaluations_run_with_task_versions(tmp_path):
    """The layout the recipe writes: run/model (prune_map.json), run/metrics.json, run/lm_eval/lm_eval.json."""
    run = tmp_path / "run"
    (run / "model").mkdir(parents=True)
    (run / "lm_eval").mkdir()
    (run / "model" / "prune_map.json").write_text(json.dumps({"teacher": {"source": "bundled", "shape": {"num_layers": 4}},
                                                              "student_shape": {"num_layers": 3}, "kept_layers": [0, 1, 3]}))
    evals = dict(EVAL, settings={"num_fewshot": 0, "limit": 50, "batch_size": 8,
                                 "versions": {"minidistill_heldout_ppl": 1.0, "minidistill_lastword": 2.0}})
    (run / "lm_eval" / "lm_eval.json").write_text(json.dumps(evals))
    speed = {"batch_size": 8, "seq_len": 128, "new_tokens": 32, "prompt_len": 16, "repeats": 3, "device": "cpu", "dtype": "float32"}
    (run / "metrics.json").write_text(json.dumps({"models": {
        "teacher": {"speed": dict(speed, forward_tokens_per_s=1000.0, generate_tokens_per_s=20.0)},
        "pruned": {},
        "distilled": {"speed": dict(speed, forward_tokens_per_s=1600.0, generate_tokens_per_s=30.0)}}}))
    card = build_model_card(run_info_from_folder(run / "model", model_name="me/m"))
    card.save(tmp_path / "README.md")
    loaded = ModelCard.load(tmp_path / "README.md")
    got = {(r.task_name, r.metric_type): (r.metric_value, r.dataset_args) for r in loaded.data.eval_results}
    assert got == {
        ("minidistill_heldout_ppl", "word_perplexity"): (41.25, {"lm_eval_task_version": 1.0, "num_fewshot": 0, "limit": 50}),
        ("minidistill_lastword", "acc"): (0.3, {"lm_eval_task_version": 2.0, "num_fewshot": 0, "limit": 50}),
        ("minidistill_lastword", "perplexity"): (28.0, {"lm_eval_task_version": 2.0, "num_fewshot": 0, "limit": 50}),
    }
    speed_section = loaded.text.split("## Speed")[1].split("\n## ")[0]
    assert "| teacher | 1000 | - | 20.0 | - |" in speed_section
    assert "| distilled | 1600 | 1.60x | 30.0 | 1.50x |" in speed_section
    assert "batch 8 x 128 tokens" in speed_section


def test_model_index_without_recorded_versions_has_only_the_settings():
    card = build_model_card(run_info())
    assert {str(r.dataset_args) for r in card.data.eval_results} == {"None"}  # EVAL records no settings values
    card = build_model_card(run_info(eval_results=dict(EVAL, settings={"num_fewshot": 1, "limit": None})))
    assert all(r.dataset_args == {"num_fewshot": 1} for r in card.data.eval_results)
