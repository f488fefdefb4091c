"""The prune time estimate: its count of decoder-layer passes after calibration against the passes actually run,
and the warning when a distributed prune's estimate exceeds the process group's timeout."""

from __future__ import annotations

import dataclasses
import logging
import math
from types import SimpleNamespace

import pytest
import torch
from conftest import tiny_model
from test_prune_pipeline import prune_cfg, tiny_data
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

from minidistill import train
from minidistill.prune import pipeline
from minidistill.prune.distributed import CalibrationShard
from minidistill.prune.estimate import BACKWARD_COST, LayerPasses, PruneEstimate, report_estimate
from minidistill.recipe_config import PruneDistillConfig

ESTIMATE_LOGGER = "minidistill.prune.estimate"

CONFIGS = {
    "sequential re-fit": dict(target={"params": None, "num_layers": 4, "hidden_size": 48, "num_heads": 2,
                                      "intermediate_size": 64}, reconstruction={"enabled": True}),
    "lm_loss layers, re-fit from the Gram matrices": dict(
        target={"params": None, "num_layers": 3, "num_heads": 2}, layer_method="lm_loss", reconstruction={"enabled": True}),
    "iterative layers": dict(target={"params": None, "num_layers": 2, "intermediate_size": 64}, layer_method="iterative"),
    "taylor, teacher-mode re-fit with forwards": dict(
        target={"params": None, "num_layers": 4, "hidden_size": 48, "intermediate_size": 64},
        importance={"method": "taylor"}, reconstruction={"enabled": True, "mode": "teacher"}),
    "search: kl, every candidate re-fitted": dict(
        target={"params": 0.6}, search={"score": "kl", "reconstruct": True, "max_layer_drop": 0.0},
        reconstruction={"enabled": True}),
    "search: sensitivity, winner re-fitted": dict(
        target={"params": 0.6}, search={"sensitivity": True, "max_layer_drop": 0.0}, reconstruction={"enabled": True}),
    # max_candidates above the 6 shapes in the band: the sensitivity pre-score picks the balance pre-score's set
    "search: iterative, sensitivity, short distillation": dict(
        target={"params": 0.6}, layer_method="iterative",
        search={"sensitivity": True, "max_candidates": 8, "distill_steps": 2, "distill_batch_size": 2,
                "distill_candidates": 8}),
}


def _count_layer_runs(monkeypatch) -> dict[str, int]:
    """Count every LlamaDecoderLayer run (rows of its input; ``grad``: those run with autograd on), and snapshot
    the counts when the calibration (``compute_importance``) returns."""
    counts = {"forward": 0, "grad": 0, "calibration_forward": 0, "calibration_grad": 0}
    forward, compute_importance = LlamaDecoderLayer.forward, pipeline.compute_importance

    def counting_forward(self, *args, **kwargs):
        rows = (args[0] if args else kwargs["hidden_states"]).shape[0]
        counts["forward"] += rows
        counts["grad"] += rows if torch.is_grad_enabled() else 0
        return forward(self, *args, **kwargs)

    def calibration(*args, **kwargs):
        out = compute_importance(*args, **kwargs)
        counts["calibration_forward"], counts["calibration_grad"] = counts["forward"], counts["grad"]
        return out

    monkeypatch.setattr(LlamaDecoderLayer, "forward", counting_forward)
    monkeypatch.setattr(pipeline, "compute_importance", calibration)
    return counts


@pytest.mark.parametrize("name", list(CONFIGS))
def test_estimated_passes_are_the_layer_passes_run_after_calibration(monkeypatch, name):
    counts = _count_layer_runs(monkeypatch)
    teacher = tiny_model("llama", num_layers=4)
    res = pipeline.prune_model(teacher, None, tiny_data(train=16), prune_cfg(**CONFIGS[name]), teacher_source="tiny")
    est = res.estimate
    after = counts["forward"] - counts["calibration_forward"]
    assert after > 0
    assert est.passes.forwards == after, dict(est.passes.forward)
    assert sum(est.passes.backward.values()) == counts["grad"] - counts["calibration_grad"]
    # the speed is measured on the passes the calibration ran
    assert est.calibration.forwards == counts["calibration_forward"] > 0
    assert sum(est.calibration.backward.values()) == counts["calibration_grad"]
    assert est.seconds == pytest.approx(res.timings["importance_s"] * est.passes.cost / est.calibration.cost)
    assert res.timings["estimate_after_calibration_s"] == est.seconds


@pytest.fixture(scope="module")
def measured() -> PruneEstimate:
    """The estimate of a real single-process search (measured calibration speed)."""
    teacher = tiny_model("llama", num_layers=4)
    cfg = prune_cfg(target={"params": 0.6}, search={"sensitivity": True}, reconstruction={"enabled": True})
    est = pipeline.prune_model(teacher, None, tiny_data(train=16), cfg, teacher_source="tiny").estimate
    assert est.seconds is not None and est.seconds > 0
    return est


def _records(caplog, level: int) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == ESTIMATE_LOGGER and r.levelno == level]


def test_distributed_prune_longer_than_the_timeout_warns_once_with_the_fix(caplog, measured):
    caplog.set_level(logging.INFO, logger=ESTIMATE_LOGGER)
    wait = measured.longest_wait_seconds
    assert 0 < wait < measured.seconds  # the search's scores end stretches
    timeout = wait / 2
    assert report_estimate(measured, distributed=True, timeout_s=timeout)
    (warning,) = _records(caplog, logging.WARNING)
    text = warning.getMessage()
    assert "train.process_group_timeout_minutes" in text
    assert f"estimated at {wait:.0f} s ({wait / 60:.1f} min)" in text
    assert f"timeout of {timeout:.0f} s" in text
    assert f"at least {math.ceil(1.5 * wait / 60)}," in text
    assert "student.source" in text
    (info,) = _records(caplog, logging.INFO)
    assert f"{measured.seconds:.0f} s" in info.getMessage() and f"collective {wait:.0f} s" in info.getMessage()


@pytest.mark.parametrize("distributed,factor", [(True, 2.0), (False, 0.5)])
def test_no_warning_with_a_long_timeout_or_one_process(caplog, measured, distributed, factor):
    caplog.set_level(logging.INFO, logger=ESTIMATE_LOGGER)
    assert not report_estimate(measured, distributed=distributed, timeout_s=factor * measured.longest_wait_seconds)
    assert not _records(caplog, logging.WARNING)
    assert len(_records(caplog, logging.INFO)) == 1  # the estimate is always logged


def test_the_minutes_asked_for_follow_the_estimate(caplog):
    calibration = LayerPasses({"calibration": 10})
    passes = LayerPasses()
    passes.add("candidates", 500)
    passes.collective()
    passes.add("candidates", 500)
    passes.add("distill_rank", 100, backward=True)
    passes.collective()
    est = PruneEstimate(passes, calibration, calibration_s=60.0)
    assert est.seconds == pytest.approx(6.0 * (1100 + 2 * 100))  # a backward costs two forwards
    assert est.longest_wait_seconds == pytest.approx(6.0 * (600 + 2 * 100))
    assert passes.forward == {"candidates": 1000, "distill_rank": 100}
    est = PruneEstimate(LayerPasses({"candidates": 500}, longest_stretch=1200.0), calibration, calibration_s=60.0)
    caplog.set_level(logging.INFO, logger=ESTIMATE_LOGGER)
    assert report_estimate(est, distributed=True, timeout_s=3600.0)
    assert "at least 180," in _records(caplog, logging.WARNING)[0].getMessage()  # 1.5 x 7200 s = 180 min


def test_no_estimate_without_a_measured_calibration(caplog):
    caplog.set_level(logging.INFO, logger=ESTIMATE_LOGGER)
    est = PruneEstimate(LayerPasses({"candidates": 1000}), LayerPasses(), calibration_s=0.01)
    assert est.seconds is None
    assert not report_estimate(est, distributed=True, timeout_s=1.0)
    assert not _records(caplog, logging.WARNING)
    assert "none" in _records(caplog, logging.INFO)[0].getMessage()


@dataclasses.dataclass(frozen=True)
class _LoneRankShard(CalibrationShard):
    """Rank 0 of 2 with no process group: the other rank's sums are taken to equal this one's."""

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor * self.world


@pytest.mark.parametrize("name", ["search: kl, every candidate re-fitted", "search: iterative, sensitivity, short distillation",
                                  "sequential re-fit"])
def test_the_longest_stretch_is_the_most_passes_run_between_two_collectives(monkeypatch, name):
    """On a distributed shard (scores all-reduced), the layer passes run between successive collectives after the
    calibration, counted, match the estimate's longest stretch."""
    counts = _count_layer_runs(monkeypatch)
    stretches, mark = [], {}

    class CountingShard(_LoneRankShard):
        def sum(self, tensor: torch.Tensor) -> torch.Tensor:
            if "calibration_forward" in mark:  # after the calibration: a score's all-reduce
                stretches.append(_cost(counts) - mark["at"])
                mark["at"] = _cost(counts)
            return super().sum(tensor)

    compute_importance = pipeline.compute_importance

    def calibration(*args, **kwargs):
        out = compute_importance(*args, **kwargs)
        mark["calibration_forward"], mark["at"] = True, _cost(counts)
        return out

    monkeypatch.setattr(pipeline, "compute_importance", calibration)
    teacher = tiny_model("llama", num_layers=4)
    res = pipeline.prune_model(teacher, None, tiny_data(train=16), prune_cfg(**CONFIGS[name]), teacher_source="tiny",
                               shard=CountingShard(rank=0, world=2))
    stretches.append(_cost(counts) - mark["at"])  # up to the barrier after the save
    assert res.estimate.passes.longest_stretch == max(stretches), stretches
    assert res.estimate.passes.cost == sum(stretches)


def _cost(counts: dict[str, int]) -> float:
    return counts["forward"] + BACKWARD_COST * counts["grad"]


@pytest.mark.parametrize("timeout_s,warns", [(1e-6, True), (1e6, False)])
def test_prune_model_warns_on_a_distributed_shard(caplog, timeout_s, warns):
    caplog.set_level(logging.INFO, logger=ESTIMATE_LOGGER)
    teacher = tiny_model("llama", num_layers=4)
    cfg = prune_cfg(target={"params": 0.6})
    pipeline.prune_model(teacher, None, tiny_data(train=16), cfg, teacher_source="tiny",
                         shard=_LoneRankShard(rank=0, world=2), collective_timeout_s=timeout_s)
    assert len(_records(caplog, logging.WARNING)) == int(warns)


def test_the_recipe_passes_the_process_group_timeout(monkeypatch, tmp_path):
    seen = {}

    class Stop(Exception):
        pass

    def fake_prune_model(*args, **kwargs):
        seen.update(kwargs)
        raise Stop

    monkeypatch.setattr(pipeline, "prune_model", fake_prune_model)
    cfg = PruneDistillConfig.from_dict({"train": {"process_group_timeout_minutes": 7.5}, "output_root": str(tmp_path)})
    accelerator = SimpleNamespace(num_processes=2, process_index=1, device=torch.device("cpu"), is_main_process=False)
    with pytest.raises(Stop):
        train._load_student(cfg, None, None, None, accelerator, False)
    assert seen["collective_timeout_s"] == 450.0
    assert seen["shard"].distributed
