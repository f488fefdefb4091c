"""Per-axis sensitivity: each value equals pruning that axis alone through the explicit-shape path and
scoring it; the table, plot and prune-map record; the interpolation that feeds the pre-score."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_model
from test_prune_pipeline import prune_cfg, tiny_data

from minidistill.config import ConfigError
from minidistill.evaluation.perplexity import heldout_loss
from minidistill.prune.pipeline import prune_model, scoring_blocks
from minidistill.prune.sensitivity import Sensitivity, SensitivityPoint, axis_shape, sensitivity_shapes
from minidistill.prune.targets import SHAPE_TARGET_KEYS, SearchConfig

TEACHER = {"num_layers": 6, "hidden_size": 64, "num_heads": 8, "num_kv_heads": 4, "head_dim": 16, "intermediate_size": 96}


def test_axis_shapes_are_the_nearest_hardware_friendly_sizes():
    assert axis_shape(TEACHER, "depth", 0.5, 16)["num_layers"] == 3
    assert axis_shape(TEACHER, "mlp", 0.5, 16)["intermediate_size"] == 48
    assert axis_shape(TEACHER, "mlp", 0.25, 64)["intermediate_size"] == 64
    assert axis_shape(TEACHER, "hidden", 0.75, 16)["hidden_size"] == 48
    h = axis_shape(TEACHER, "heads", 0.75, 16)
    assert (h["num_heads"], h["num_kv_heads"]) == (6, 3)  # whole KV groups, more groups on ties
    assert {k: v for k, v in axis_shape(TEACHER, "mlp", 0.5, 16).items() if k != "intermediate_size"} == \
        {k: v for k, v in TEACHER.items() if k != "intermediate_size"}
    shapes = sensitivity_shapes(TEACHER, [0.75, 0.5, 0.25], 16, min_layers=3)
    assert [s["num_layers"] for a, _, s in shapes if a == "depth"] == [4, 3]  # 0.75 -> 4 (4.5 rounds to 4), 0.25 clipped to 3
    keys = [tuple(s[k] for k in SHAPE_TARGET_KEYS) for _, _, s in shapes]
    assert len(keys) == len(set(keys))


def test_interpolation_and_prediction():
    sens = Sensitivity(base=2.0, score="loss", reconstructed=False, points=[
        SensitivityPoint("depth", 0.5, 0.5, {}, 3.0, 1.0, 0.0),
        SensitivityPoint("depth", 0.25, 0.25, {}, 5.0, 3.0, 0.0),
        SensitivityPoint("mlp", 0.5, 0.5, {}, 2.2, 0.2, 0.0),
    ])
    assert sens.increase("depth", 1.0) == 0.0
    assert math.isclose(sens.increase("depth", 0.75), 0.5)
    assert math.isclose(sens.increase("depth", 0.375), 2.0)
    assert math.isclose(sens.increase("depth", 0.0), 5.0)  # extrapolated along the last segment
    assert sens.increase("hidden", 0.5) == 0.0  # not measured: no increase predicted
    shape = {**TEACHER, "num_layers": 3, "intermediate_size": 72}
    assert math.isclose(sens.predict(TEACHER, shape), 1.0 + 0.1)


def test_sensitivity_equals_pruning_each_axis_alone_via_the_explicit_shape(tmp_path):
    # hidden 96: every pruned hidden width (72, 48) is a multiple of every head count, so the explicit-shape
    # reference path accepts each measured shape
    teacher = tiny_model("llama", num_layers=4, hidden_size=96, num_heads=8, num_kv_heads=4, intermediate_size=128)
    data = tiny_data()
    out = tmp_path / "student"
    cfg = prune_cfg(target={"params": 0.6}, output_dir=str(out),
                    search={"sensitivity": True, "sensitivity_ratios": [0.75, 0.5], "max_layer_drop": 0.5})
    class Tok:  # a stub tokenizer: save_student only asks it to save itself
        def save_pretrained(self, path):
            (path / "tokenizer_config.json").write_text("{}")

    res = prune_model(teacher, Tok(), data, cfg, teacher_source="tiny")
    notes = res.prune_map.notes["sensitivity"]
    scoring = [data.train.input_ids[-cfg.search.score_blocks :]]  # search.score_on=train_tail
    assert torch.equal(scoring_blocks(data, cfg.search).input_ids, scoring[0])
    base = heldout_loss(teacher, scoring)["loss"]
    assert math.isclose(notes["base"], base, rel_tol=1e-12) and notes["reconstructed"] is False
    axes = {p["axis"] for p in notes["points"]}
    assert axes == {"depth", "heads", "mlp", "hidden"} and len(notes["points"]) >= 6
    for p in notes["points"]:
        target = {k: p["shape"][k] for k in SHAPE_TARGET_KEYS if p["shape"][k] != res.prune_map.teacher["shape"][k]}
        ref = prune_model(teacher, None, data, prune_cfg(target=target), teacher_source="tiny")
        want = heldout_loss(ref.student, scoring)["loss"]
        assert math.isclose(p["score"], want, rel_tol=1e-6), p
        assert math.isclose(p["increase"], want - base, rel_tol=1e-6, abs_tol=1e-9)
    table = (out / "sensitivity.md").read_text()
    assert table.count("\n| ") == len(notes["points"]) + 1 and "no reconstruction" in table
    png = (out / "sensitivity.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000
    search = res.prune_map.notes["search"]
    assert search["prescore"] == "sensitivity"
    assert search["prescore_spearman"] is None or -1.0 <= search["prescore_spearman"] <= 1.0


def test_sensitivity_config_errors():
    with pytest.raises(ConfigError, match="search.sensitivity_ratios"):
        SearchConfig.from_dict({"sensitivity_ratios": [1.5]})
    with pytest.raises(ConfigError, match="search.sensitivity_ratios"):
        SearchConfig.from_dict({"sensitivity_ratios": []})


def test_sensitivity_can_skip_the_refit_that_scored_candidates_get():
    """search.reconstruct re-fits every candidate; sensitivity_reconstruct=false keeps sensitivity un-fitted."""
    teacher = tiny_model("llama", num_layers=4, hidden_size=96, num_heads=8, num_kv_heads=4, intermediate_size=128)
    data = tiny_data()
    search = {"sensitivity": True, "sensitivity_ratios": [0.5], "max_layer_drop": 0.5, "reconstruct": True,
              "max_candidates": 1}
    recon = {"enabled": True, "mode": "teacher"}
    # Neurons ranked by activation: the re-fit then has removed neurons' output to take over.
    importance = {"batch_size": 4, "cache": False, "neuron_ranking": "method"}
    plain = prune_model(teacher, None, data, prune_cfg(target={"params": 0.6}, reconstruction=recon, importance=importance,
                                                       search={**search, "sensitivity_reconstruct": False}),
                        teacher_source="tiny")
    refit = prune_model(teacher, None, data, prune_cfg(target={"params": 0.6}, reconstruction=recon, importance=importance,
                                                       search=search),
                        teacher_source="tiny")
    assert plain.prune_map.notes["sensitivity"]["reconstructed"] is False
    assert refit.prune_map.notes["sensitivity"]["reconstructed"] is True
    by_shape = {str(p["shape"]): p["score"] for p in plain.prune_map.notes["sensitivity"]["points"]}
    mlp = next(p for p in refit.prune_map.notes["sensitivity"]["points"] if p["axis"] == "mlp")
    assert mlp["score"] < by_shape[str(mlp["shape"])]  # the re-fit lowers the loss of the MLP-pruned shape
    # candidates are re-fitted in both runs, so they score the same
    assert plain.candidates[0]["loss"] == pytest.approx(refit.candidates[0]["loss"])
