"""Further frozen roles (``roles.<name>``) that loss terms target: values against the same terms with that model
as the teacher, the recipe run (one process, 2-process DDP, FSDP2, ZeRO-3), and bad input."""

from __future__ import annotations

import sys

import pytest
import torch
from conftest import tiny_model
from train_scripts.tiny_setup import half_map, make_teacher_dir, tiny_overrides

from minidistill.config import ConfigError
from minidistill.distill.objective import DistillationModule, DistillLossConfig, DistillObjective, teacher_features
from minidistill.prune.apply import apply_prune_map
from minidistill.recipe_config import load_recipe_config

EXPLICIT = {"strategy": "explicit", "explicit": [[0, 0], [1, 2]]}
TERMS = {"logits": {}, "kd2": {"term": "logits", "target": "teacher2", "weight": 0.5},
         "h2": {"term": "hidden", "target": "teacher2", "weight": 0.25, "pairing": EXPLICIT}}


def _models():
    teacher, teacher2 = tiny_model("llama", num_layers=3, seed=0), tiny_model("llama", num_layers=3, seed=1)
    student = apply_prune_map(teacher, half_map(teacher))
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return teacher, teacher2, student


def _loss(student, teacher, cfg, ids, *, roles=None, prune_map=None):
    objective = DistillObjective(DistillLossConfig.from_dict(cfg), teacher=teacher, student=student, prune_map=prune_map,
                                 roles=roles)
    role_features = {name: teacher_features(m, ids, objective, role=name) for name, m in (roles or {}).items()}
    return DistillationModule(student, objective)(ids, teacher_features(teacher, ids, objective), role_features=role_features)


def test_terms_against_a_further_role_equal_the_same_terms_with_it_as_teacher():
    """Each term that targets ``teacher2`` has the value it has when ``teacher2`` is the run's teacher; the total is the
    weighted sum; only the student (and the hidden term's projection) get gradients."""
    teacher, teacher2, student = _models()
    ids = torch.randint(3, 128, (2, 10), generator=torch.Generator().manual_seed(0))
    out = _loss(student, teacher, {"terms": TERMS}, ids, roles={"teacher2": teacher2}, prune_map=half_map(teacher))
    c = out["components"]
    plain = _loss(student, teacher, {}, ids)["loss"].item()
    as_teacher = _loss(student, teacher2, {"terms": {"logits": {}, "hidden": {"pairing": EXPLICIT}}}, ids)["components"]
    assert c["loss/logits"].item() == pytest.approx(plain, rel=1e-6)
    assert c["loss/kd2"].item() == pytest.approx(as_teacher["loss/logits"].item(), rel=1e-6)
    assert c["loss/h2"].item() == pytest.approx(as_teacher["loss/hidden"].item(), rel=1e-6)
    assert c["loss/kd2"].item() != pytest.approx(c["loss/logits"].item(), rel=1e-3)  # another model really is read
    expected = c["loss/logits"].item() + 0.5 * c["loss/kd2"].item() + 0.25 * c["loss/h2"].item()
    assert out["loss"].item() == pytest.approx(expected, rel=1e-6)
    out["loss"].backward()
    assert all(p.grad is None for p in (*teacher.parameters(), *teacher2.parameters()))
    assert all(p.grad is not None for p in student.parameters())


@pytest.mark.parametrize("overrides, match", [
    (["roles.teacher2.source=/x"], r"roles\.teacher2 is the target of no loss term.*loss\.terms\.teacher2_kd"),
    (["roles.peer1.source=/x", "loss.terms.kd.term=logits", "loss.terms.kd.target=peer1"], r"roles\.peer1: a role name is"),
    (["roles.teacher.source=/x"], r"roles\.teacher: a role name is"),
    (["roles.t2.source=/x", "loss.terms.kd.term=logits", "loss.terms.kd.target=t2", "mutual.copies=1"],
     r"mutual is not combined with it: set mutual=null"),
    (["roles.t2.source=/x", "loss.terms.kd.term=logits", "loss.terms.kd.target=t2", "train.lora.r=4"],
     r"train\.lora is not combined with it"),
    (["roles.t2.source=/x", "loss.terms.kd.term=logits", "loss.terms.kd.source=t2", "loss.terms.kd.target=teacher"],
     r"loss\.terms\.kd\.source='t2' is frozen"),
])
def test_bad_roles_are_refused_when_the_config_loads(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_recipe_config(None, overrides)


ROLE_TERMS = {"loss.terms.kd2.term": "logits", "loss.terms.kd2.target": "teacher2", "loss.terms.kd2.weight": 0.5}


def _runs(tiny_folders, tmp_path, launchers: dict) -> dict:
    """The recipe with a further role under each launcher: ``{name: (train records, model state)}``."""
    from test_distributed import WRAPPER, _env, _launch, _state, _train_records

    root, teacher, student = tiny_folders
    teacher2 = make_teacher_dir(tmp_path / "teacher2", seed=1)  # same shape and tokenizer, other weights
    runs = {}
    for name, (launcher, sharded) in launchers.items():
        overrides = tiny_overrides(tmp_path / "runs", teacher, student, run_name=name, **{
            "train.max_steps": 4, "train.save_every": 0, "eval.max_blocks": 2, "roles.teacher2.source": teacher2, **ROLE_TERMS})
        _launch([*launcher, str(WRAPPER), *overrides], _env(tmp_path, sharded=sharded), f"{name} run")
        run_dir = tmp_path / "runs" / name
        runs[name] = (_train_records(run_dir), _state(run_dir / "model"))
    return runs


def test_recipe_trains_against_a_further_role(tiny_folders, tmp_path):
    """The command as a user runs it: the further role's term is logged every step and the metadata names the role."""
    import json
    import subprocess

    from test_distributed import ROOT, _env

    root, teacher, student = tiny_folders
    teacher2 = make_teacher_dir(tmp_path / "teacher2", seed=1)
    overrides = tiny_overrides(tmp_path / "runs", teacher, student, **{"train.max_steps": 3, "train.save_every": 0,
                                                                        "eval.max_blocks": 2, "roles.teacher2.source": teacher2,
                                                                        **ROLE_TERMS})
    proc = subprocess.run([sys.executable, str(ROOT / "recipes" / "prune_distill.py"), *overrides], cwd=ROOT,
                          env=_env(tmp_path, sharded=False), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "runs" / "tiny" / "log.jsonl").read_text().splitlines()]
    train = [r for r in records if r.get("kind") == "train"]
    assert len(train) == 3 and all(r["loss/kd2"] > 0 for r in train)
    for r in train:
        assert r["loss"] == pytest.approx(r["loss/logits"] + 0.5 * r["loss/kd2"], rel=1e-5)
    meta = json.loads((tmp_path / "runs" / "tiny" / "model" / "training_metadata.json").read_text())
    assert meta["roles"] == {"teacher2": str(teacher2)}


@pytest.mark.slow
def test_a_run_with_a_further_role_under_ddp_fsdp2_and_zero3_equals_one_process(tiny_folders, tmp_path):
    """The further role is placed like the teacher (a replica under DDP, sharded under FSDP2 / ZeRO-3): losses, the
    role's term and the saved model equal one process's."""
    from test_distributed import LAUNCH, _accelerate, _free_port

    ddp = _accelerate("--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--main_process_port", str(_free_port()))
    fsdp2 = _accelerate("--config_file", str(LAUNCH / "fsdp2.yaml"), "--num_processes", "2", "--main_process_port", str(_free_port()))
    zero3 = _accelerate("--config_file", str(LAUNCH / "zero3.yaml"), "--num_processes", "2", "--main_process_port", str(_free_port()))
    runs = _runs(tiny_folders, tmp_path, {"single": ([sys.executable], False), "ddp": (ddp, False), "fsdp2": (fsdp2, True),
                                          "zero3": (zero3, True)})
    ref, ref_state = runs["single"]
    assert ref[0]["loss"] != ref[-1]["loss"]
    # Weights: Adam's normalised step (lr 3e-3) on embedding rows with near-zero gradients amplifies the reduction
    # order's rounding, so they agree to 1e-4 while the losses agree to 5e-5 relative.
    for name, (loss_rtol, weight_atol) in {"ddp": (5e-5, 1e-4), "fsdp2": (5e-5, 1e-4), "zero3": (2e-4, 2e-4)}.items():
        got, state = runs[name]
        for a, b in zip(ref, got, strict=True):
            for key in ("loss", "loss/logits", "loss/kd2"):
                assert b[key] == pytest.approx(a[key], rel=loss_rtol, abs=1e-8), (name, a["step"], key)
        for k, v in ref_state.items():
            assert (state[k] - v).abs().max().item() <= weight_atol, (name, k)
