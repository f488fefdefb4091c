"""bench/quality_match.py: every objective of the "match (equal tokens)" comparison builds and trains one step."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from test_objective import _pruned_pair

from minidistill.distill.objective import DistillationModule, DistillLossConfig, DistillObjective, teacher_features

ROOT = Path(__file__).resolve().parents[1]


def _load():
    spec = importlib.util.spec_from_file_location("quality_match", ROOT / "bench" / "quality_match.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


QM = _load()


def test_every_new_term_and_logit_option_has_a_row():
    extras = {name for cfg in QM.OBJECTIVES.values() for name in cfg.get("extra", {})}
    assert extras == {"weights", "mmd", "nst", "token_attention", "activation_boundary", "fsp", "rkd"}
    logit_options = [cfg["logits"] for cfg in QM.OBJECTIVES.values() if "logits" in cfg]
    assert any("teacher_bound_margin" in o for o in logit_options)
    assert {o.get("token_weighting") for o in logit_options} >= {"confidence", "entropy"}
    assert QM.OBJECTIVES[QM.BASELINE] == {}


@pytest.mark.parametrize("name", list(QM.OBJECTIVES))
def test_objective_builds_and_trains_one_step(name):
    teacher, student, pmap = _pruned_pair()
    cfg = DistillLossConfig.from_dict(QM.OBJECTIVES[name])
    objective = DistillObjective(cfg, teacher=teacher, student=student, prune_map=pmap)
    module = DistillationModule(student, objective)
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-3)
    ids = torch.randint(3, 128, (2, 16), generator=torch.Generator().manual_seed(3))
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    out = module(ids, teacher_features(teacher, ids, objective))
    assert torch.isfinite(out["loss"])
    assert set(out["components"]) >= {f"loss/{term}" for term in cfg.weights()}
    out["loss"].backward()
    optimizer.step()
    moved = [n for n, p in student.named_parameters() if not torch.equal(before[n], p)]
    assert len(moved) == len(before)
    second = module(ids, teacher_features(teacher, ids, objective))
    assert torch.isfinite(second["loss"]) and second["loss"].item() != out["loss"].item()


def test_distiller_runs_every_term_and_logs_each_component(tmp_path):
    import json

    from test_train_loop import make_distiller

    extra = {name: 0.5 for cfg in QM.OBJECTIVES.values() for name in cfg.get("extra", {})}
    loss = {"extra": extra, "logits": {"teacher_bound_margin": 0.1, "token_weighting": "confidence"}}
    d = make_distiller(tmp_path / "run", train={"max_steps": 6, "schedule": "constant"}, loss=loss)
    d.run()
    records = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    assert len(train) == 6
    for name in ("logits", *extra):
        assert all(f"loss/{name}" in r for r in train), name
    assert train[-1]["loss"] < train[0]["loss"]
