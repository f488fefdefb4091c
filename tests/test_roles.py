"""Further frozen roles (``roles.<name>``) that loss terms target: values against the same terms with that model
as the teacher, the recipe run (one process, 2-process DDP, FSDP2, ZeRO-3), and bad input."""

from __future__ import annotations

import copy
import json
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


MUTUAL_AS_TERMS = {"logits": {}, "buddy_kd": {"term": "logits", "source": "buddy"},
                   "from_buddy": {"term": "logits", "target": "buddy", "weight": 0.5},
                   "from_student": {"term": "logits", "source": "buddy", "target": "student", "weight": 0.5}}


ROLE_TERMS = {"loss.terms.kd2.term": "logits", "loss.terms.kd2.target": "teacher2", "loss.terms.kd2.weight": 0.5}
TRAINED_TERMS = {"roles.buddy.trainable": "true", **{f"loss.terms.{name}.{key}": value for name, settings in MUTUAL_AS_TERMS.items()
                                                     for key, value in settings.items()}}


def _runs(tiny_folders, tmp_path, launchers: dict) -> dict:
    """The recipe with a frozen further role (a second teacher) and a trained one (a second student of another shape)
    under each launcher: ``{name: (train records, model state, the trained role's exported state, eval records)}``."""
    from test_distributed import WRAPPER, _env, _launch, _state, _train_records

    root, teacher, student = tiny_folders
    extra = {"roles.teacher2.source": make_teacher_dir(tmp_path / "teacher2", seed=1), **ROLE_TERMS,
             "roles.buddy.source": make_teacher_dir(tmp_path / "buddy", seed=2), **TRAINED_TERMS}
    runs = {}
    for name, (launcher, sharded) in launchers.items():
        overrides = tiny_overrides(tmp_path / "runs", teacher, student, run_name=name, **{
            "train.max_steps": 4, "train.save_every": 0, "eval.max_blocks": 2, **extra})
        _launch([*launcher, str(WRAPPER), *overrides], _env(tmp_path, sharded=sharded), f"{name} run")
        run_dir = tmp_path / "runs" / name
        evals = [r for r in map(json.loads, (run_dir / "log.jsonl").read_text().splitlines()) if r["kind"] == "eval"]
        runs[name] = (_train_records(run_dir), _state(run_dir / "model"), _state(run_dir / "model_buddy"), evals)
    return runs


@pytest.mark.parametrize("trained", [False, True], ids=["frozen", "trained"])
def test_recipe_trains_against_a_further_role(tiny_folders, tmp_path, trained):
    """The command as a user runs it: each term is logged every step, the total is their weighted sum, the metadata
    names the role, and a trained role is exported next to the student, trained and loadable."""
    import json
    import subprocess

    from test_distributed import ROOT, _env, _state

    root, teacher, student = tiny_folders
    if trained:
        extra = {"roles.buddy.source": make_teacher_dir(tmp_path / "buddy", seed=2), **TRAINED_TERMS}  # another shape
        weights = {n: s.get("weight", 1.0) for n, s in MUTUAL_AS_TERMS.items()}
    else:
        extra, weights = {"roles.teacher2.source": make_teacher_dir(tmp_path / "teacher2", seed=1), **ROLE_TERMS}, {"logits": 1.0, "kd2": 0.5}
    overrides = tiny_overrides(tmp_path / "runs", teacher, student, **{"train.max_steps": 3, "train.save_every": 0,
                                                                        "eval.max_blocks": 2, **extra})
    proc = subprocess.run([sys.executable, str(ROOT / "recipes" / "prune_distill.py"), *overrides], cwd=ROOT,
                          env=_env(tmp_path, sharded=False), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = tmp_path / "runs" / "tiny"
    records = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    train = [r for r in records if r.get("kind") == "train"]
    assert len(train) == 3
    for r in train:
        assert all(r[f"loss/{name}"] > 0 for name in weights)
        assert r["loss"] == pytest.approx(sum(w * r[f"loss/{name}"] for name, w in weights.items()), rel=1e-5)
    meta = json.loads((run_dir / "model" / "training_metadata.json").read_text())
    name = "buddy" if trained else "teacher2"
    assert meta["roles"] == {name: {"source": str(extra[f"roles.{name}.source"]), "trainable": trained}}
    assert (run_dir / "model_buddy").is_dir() == trained
    if trained:
        evals = [r for r in records if r.get("kind") == "eval"]
        assert evals[-1]["buddy/heldout_perplexity"] > 0
        initial, buddy = _state(extra["roles.buddy.source"]), _state(run_dir / "model_buddy")
        assert buddy.keys() == initial.keys()
        assert all(not torch.equal(buddy[k], initial[k]) for k in ("lm_head.weight", "model.layers.2.mlp.up_proj.weight"))


@pytest.mark.slow
def test_a_run_with_further_roles_under_ddp_fsdp2_and_zero3_equals_one_process(tiny_folders, tmp_path):
    """A frozen role is placed like the teacher (a replica under DDP, sharded under FSDP2 / ZeRO-3), a trained one
    like the student: losses, each term, the held-out figures and the saved models (the trained role's too) equal
    one process's."""
    from test_distributed import LAUNCH, _accelerate, _free_port

    ddp = _accelerate("--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--main_process_port", str(_free_port()))
    fsdp2 = _accelerate("--config_file", str(LAUNCH / "fsdp2.yaml"), "--num_processes", "2", "--main_process_port", str(_free_port()))
    zero3 = _accelerate("--config_file", str(LAUNCH / "zero3.yaml"), "--num_processes", "2", "--main_process_port", str(_free_port()))
    runs = _runs(tiny_folders, tmp_path, {"single": ([sys.executable], False), "ddp": (ddp, False), "fsdp2": (fsdp2, True),
                                          "zero3": (zero3, True)})
    ref, ref_state, ref_buddy, ref_evals = runs["single"]
    eval_keys = ("heldout_loss", "top1_agreement", "buddy/heldout_loss", "buddy/top1_agreement")
    assert len(ref_evals) >= 2 and all(key in ref_evals[-1] for key in eval_keys)
    keys = ("loss", "loss/kd2", *(f"loss/{n}" for n in MUTUAL_AS_TERMS))
    assert ref[0]["loss"] != ref[-1]["loss"]
    # Weights: Adam's normalised step (lr 3e-3) on embedding rows with near-zero gradients amplifies the reduction
    # order's rounding, so they agree to 1e-4 while the losses agree to 5e-5 relative.
    for name, (loss_rtol, weight_atol) in {"ddp": (5e-5, 1e-4), "fsdp2": (5e-5, 1e-4), "zero3": (2e-4, 2e-4)}.items():
        got, state, buddy, evals = runs[name]
        for a, b in zip(ref, got, strict=True):
            for key in keys:
                assert b[key] == pytest.approx(a[key], rel=loss_rtol, abs=1e-8), (name, a["step"], key)
        for a, b in zip(ref_evals, evals, strict=True):  # the held-out figures, sharded models gathered for them
            for key in eval_keys:
                assert b[key] == pytest.approx(a[key], rel=loss_rtol, abs=1e-6), (name, a["step"], key)
        for reference, saved in ((ref_state, state), (ref_buddy, buddy)):
            for k, v in reference.items():
                assert (saved[k] - v).abs().max().item() <= weight_atol, (name, k)


# ---------------------------------------------------------------------------------------------- trained roles


def test_mutual_learning_written_as_terms_over_a_trained_role_equals_the_mutual_mode(tmp_path):
    """Two students each distilled from the teacher plus 0.5 x KL to the other (detached): as four terms over the
    trained role ``buddy`` it trains both models exactly as ``mutual`` (copies: 1, weight: 0.5) does."""
    from test_mutual import _data, _noisy

    from minidistill.distill.mutual import MutualConfig
    from minidistill.training.config import EvalConfig, TrainConfig
    from minidistill.training.loop import Distiller

    teacher = tiny_model("llama", num_layers=2)
    student = _noisy(teacher, 0.05, seed=5)
    buddy = _noisy(student, 0.05, seed=6)
    tc = TrainConfig.from_dict({"max_steps": 3, "batch_size": 4, "lr": 3e-3, "warmup_steps": 1, "progress_bar": False})
    common = dict(teacher=teacher, data=_data(), prune_map=None, train=tc, eval=EvalConfig.from_dict({"max_blocks": 2}),
                  config_dict={"train": tc.to_dict()})
    runs = {}
    for name, extra in {
        "mutual": dict(loss=DistillLossConfig(), mutual=MutualConfig.from_dict({"copies": 1, "weight": 0.5}),
                       peers=[copy.deepcopy(buddy)], peer_prune_maps=[None]),
        "roles": dict(loss=DistillLossConfig.from_dict({"terms": MUTUAL_AS_TERMS}), trained_roles={"buddy": copy.deepcopy(buddy)}),
    }.items():
        distiller = Distiller(student=copy.deepcopy(student), run_dir=tmp_path / name, **common, **extra)
        result = distiller.run()
        inner = distiller.accelerator.unwrap_model(result.module)
        runs[name] = ([r["loss"] for r in _records(tmp_path / name)], inner.student.state_dict(), inner.peers[0].state_dict(),
                      result.final_eval)
    (ref_losses, ref_s, ref_b, ref_eval), (losses, s, b, final_eval) = runs["mutual"], runs["roles"]
    assert losses == pytest.approx(ref_losses, rel=1e-5) and ref_losses[0] != ref_losses[-1]
    for ref_state, state in ((ref_s, s), (ref_b, b)):
        for k, v in ref_state.items():
            assert (state[k] - v).abs().max().item() <= 1e-6, k
    assert not torch.equal(s["lm_head.weight"], b["lm_head.weight"])  # two models, both trained
    for key in ("heldout_perplexity", "top1_agreement"):  # the trained role is evaluated under its name
        assert final_eval[f"buddy/{key}"] == pytest.approx(ref_eval[f"peer1/{key}"], rel=1e-5)
        assert final_eval[key] == pytest.approx(ref_eval[key], rel=1e-5)


def _records(run_dir):
    import json

    return [r for r in map(json.loads, (run_dir / "log.jsonl").read_text().splitlines()) if r["kind"] == "train"]


@pytest.mark.parametrize("overrides, match", [
    (["roles.buddy.source=/x", "roles.buddy.trainable=true", "loss.terms.kd.term=logits", "loss.terms.kd.target=buddy"],
     r"roles\.buddy\.trainable=true but no loss term trains it"),
    (["roles.buddy.source=/x", "loss.terms.kd.term=logits", "loss.terms.kd.source=buddy"], r"loss\.terms\.kd\.source='buddy' is frozen"),
])
def test_bad_trained_roles_are_refused_when_the_config_loads(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_recipe_config(None, overrides)




@pytest.mark.parametrize("detach", [True, False])
def test_a_trained_target_learns_from_a_term_only_when_asked(detach):
    """``from_buddy`` pulls the student towards the trained role ``buddy``: by default no gradient reaches ``buddy``
    through it; with ``detach_target: false`` buddy's head gets the float64 gradient of the same KL."""
    import torch.nn.functional as F

    teacher, _, student = _models()
    buddy = copy.deepcopy(student)
    with torch.no_grad():
        for p in buddy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    cfg = DistillLossConfig.from_dict({"terms": {"logits": {"weight": 1e-9}, "from_buddy": {"term": "logits", "target": "buddy",
                                                                                          "detach_target": detach}}})
    objective = DistillObjective(cfg, teacher=teacher, student=student, trained_roles={"buddy": buddy})
    module = DistillationModule(student, objective, peers=[buddy], peer_names=["buddy"])
    ids = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(7))
    module(ids, teacher_features(teacher, ids, objective))["loss"].backward()
    head = buddy.lm_head.weight.grad
    if detach:
        assert head is None
        return
    ref_buddy = copy.deepcopy(buddy).double()
    with torch.no_grad():
        s = copy.deepcopy(student).double()(ids).logits[:, :-1].reshape(-1, 128)
    b = ref_buddy(ids).logits[:, :-1].reshape(-1, 128)
    (F.softmax(b, -1) * (F.log_softmax(b, -1) - F.log_softmax(s, -1))).sum(-1).mean().backward()
    assert torch.allclose(head.double(), ref_buddy.lm_head.weight.grad, rtol=1e-4, atol=1e-7)
    assert head.abs().max().item() > 0


def test_detach_target_false_is_refused_where_the_loss_sends_no_gradient():
    with pytest.raises(ConfigError, match=r"loss\.terms\.mmd\.detach_target=false: the mmd loss sends no gradient to its target"):
        DistillLossConfig.from_dict({"terms": {"mmd": {"detach_target": False}}})
