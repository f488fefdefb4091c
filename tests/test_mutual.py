"""Deep mutual learning (``mutual``): peers trained together with the student, each learning from the others.

References: the loss and gradients written out by hand in float64 from full logits; two identical peers
(they must stay identical); an uninterrupted run (resume); one process (2-process DDP, FSDP2, ZeRO-3); the
exported peer folders against the trained module.
"""

from __future__ import annotations

import copy
import json
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_model

from minidistill.config import ConfigError
from minidistill.data import DataConfig, TextData, TokenBlocks
from minidistill.distill.mutual import MutualConfig, perturbed_copy
from minidistill.distill.objective import DistillLossConfig, teacher_features
from minidistill.models import ModelError
from minidistill.recipe_config import load_recipe_config
from minidistill.training.config import EvalConfig, TrainConfig
from minidistill.training.loop import Distiller

SEQ = 16


def _data() -> TextData:
    g = torch.Generator().manual_seed(7)
    return TextData(TokenBlocks(torch.randint(3, 128, (32, SEQ), generator=g)),
                    TokenBlocks(torch.randint(3, 128, (4, SEQ), generator=g)), DataConfig(seq_len=SEQ))


def _noisy(model, scale: float, seed: int):
    out = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in out.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))
    return out


def _distiller(run_dir, *, mutual: dict, peers=None, train: dict | None = None, loss: dict | None = None) -> Distiller:
    """A tiny llama teacher, a noisy copy of it as the student, and ``peers`` (default: one exact copy of the student)."""
    teacher = tiny_model("llama", num_layers=2)
    student = _noisy(teacher, 0.05, seed=5)
    peers = [copy.deepcopy(student)] if peers is None else peers(student)
    tc = TrainConfig.from_dict({"max_steps": 3, "batch_size": 4, "lr": 3e-3, "warmup_steps": 1, "progress_bar": False,
                                **(train or {})})
    cfg = MutualConfig.from_dict({"copies": len(peers), **mutual})
    return Distiller(
        student=student, teacher=teacher, data=_data(), prune_map=None,
        loss=DistillLossConfig.from_dict(loss or {"logits": {"ce_weight": 0.25}}), train=tc,
        eval=EvalConfig.from_dict({"max_blocks": 2}), run_dir=run_dir, config_dict={"train": tc.to_dict()},
        mutual=cfg, peers=peers, peer_prune_maps=[None] * len(peers),
    )


def _records(run_dir):
    return [r for r in map(json.loads, (run_dir / "log.jsonl").read_text().splitlines()) if r["kind"] == "train"]


def _kl(target_logits, logits):
    """Forward KL(target || model) summed over the vocabulary, per position (float64)."""
    lt, ls = F.log_softmax(target_logits, -1), F.log_softmax(logits, -1)
    return (lt.exp() * (lt - ls)).sum(-1)


# ---------------------------------------------------------------------------------------------- the loss


@pytest.mark.parametrize("teacher_weight", [1.0, 0.0])
def test_loss_and_gradients_match_a_float64_reference(tmp_path, teacher_weight):
    ce, w, tw = 0.3, 0.7, teacher_weight
    d = _distiller(tmp_path / "run", peers=lambda s: [_noisy(s, 0.05, seed=9)],
                   mutual={"weight": w, "teacher_weight": tw, "ce_weight": ce})
    ids = d.data.train.input_ids[:4]
    t_feats = teacher_features(d.teacher, ids, d._objective()) if tw > 0 else None
    out = d.module(ids, t_feats)
    out["loss"].backward()
    got = {name: [p.grad.clone() for p in m.parameters()] for name, m in (("s", d.student), ("p", d.peers[0]))}

    models = {name: copy.deepcopy(m).double() for name, m in (("s", d.student), ("p", d.peers[0]), ("t", d.teacher))}
    logits = {name: m(ids).logits[:, :-1] for name, m in models.items()}
    labels = ids[:, 1:]

    def per_model(me: str, other: str) -> torch.Tensor:
        cross = F.cross_entropy(logits[me].reshape(-1, logits[me].shape[-1]), labels.reshape(-1), reduction="none")
        kd = (1 - 0.25) * _kl(logits["t"].detach(), logits[me]).reshape(-1) + 0.25 * cross
        mutual = (1 - ce) * _kl(logits[other].detach(), logits[me]).reshape(-1) + ce * cross
        return tw * kd.mean() + w * mutual.mean()

    ref = per_model("s", "p") + per_model("p", "s")
    ref.backward()
    assert out["loss"].item() == pytest.approx(ref.item(), rel=1e-5)
    assert out["components"]["loss/mutual"].item() > 0 and "peer1/loss/mutual" in out["components"]
    assert ("loss/logits" in out["components"]) == (tw > 0)
    for name in ("s", "p"):
        for g, p in zip(got[name], models[name].parameters()):
            torch.testing.assert_close(g.double(), p.grad, rtol=2e-4, atol=1e-6)


def test_identical_peers_stay_identical(tmp_path):
    d = _distiller(tmp_path / "run", mutual={"weight": 1.0})
    d.run()
    records = _records(tmp_path / "run")
    assert records[0]["loss/mutual"] == 0.0 and records[-1]["peer1/loss/mutual"] == 0.0
    assert [r["loss/logits"] for r in records] == [r["peer1/loss/logits"] for r in records]
    moved = False
    for (name, a), b, c in zip(d.student.named_parameters(), d.peers[0].parameters(), _noisy(d.teacher, 0.05, 5).parameters()):
        assert torch.equal(a, b), name
        moved |= not torch.equal(a, c)
    assert moved  # training changed the weights, so the equality above is not the initial copies'


def test_perturbed_copies_are_seeded_and_scaled():
    model = tiny_model("llama", num_layers=2)
    a, b, c = (perturbed_copy(model, 0.01, seed=s) for s in (1, 1, 2))
    for (name, p0), pa, pb, pc in zip(model.named_parameters(), a.parameters(), b.parameters(), c.parameters()):
        assert torch.equal(pa, pb), name
        if p0.numel() > 1:
            assert not torch.equal(pa, pc)
            rel = float((pa - p0).detach().std() / p0.detach().std())
            assert 0.005 < rel < 0.02, (name, rel)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), perturbed_copy(model, 0.0, seed=3).parameters()))


def test_peers_are_evaluated_and_differ_when_their_starts_differ(tmp_path):
    d = _distiller(tmp_path / "run", peers=lambda s: [_noisy(s, 0.2, seed=9)], mutual={})
    ev = d.evaluate()
    assert ev["heldout_loss"] != ev["peer1/heldout_loss"]
    ref = tmp_path / "alone"
    alone = _distiller(ref, peers=lambda s: [_noisy(s, 0.2, seed=9)], mutual={})
    alone.module.student = alone.peers[0]  # the peer in the student's place: the student's evaluation of it
    assert alone.evaluate()["heldout_loss"] == pytest.approx(ev["peer1/heldout_loss"], rel=1e-6)


@pytest.mark.slow
def test_resumed_mutual_run_reproduces_the_uninterrupted_one(tmp_path):
    kw = dict(peers=lambda s: [_noisy(s, 0.05, seed=9)], mutual={"ce_weight": 0.5}, train={"max_steps": 4, "save_every": 2})
    full = _distiller(tmp_path / "full", **kw)
    full.run()
    part = _distiller(tmp_path / "part", **kw)
    part.train_cfg.max_steps = 2
    part.run()
    resumed = _distiller(tmp_path / "part", **kw)
    resumed.run(resume=tmp_path / "part" / "checkpoints" / "step-00000002")
    keys = ("loss", "loss/logits", "loss/mutual", "peer1/loss/logits", "peer1/loss/mutual", "grad_norm")
    assert [[r[k] for k in keys] for r in _records(tmp_path / "part")] == [[r[k] for k in keys] for r in _records(tmp_path / "full")]
    for a, b in zip(resumed.peers[0].parameters(), full.peers[0].parameters()):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------- the recipe


def _recipe_runs(tmp_path, launchers: dict[str, list[str]], **extra):
    from test_distributed import WRAPPER, _env, _launch, _state, _train_records
    from train_scripts.tiny_setup import make_student_dir, make_teacher_dir, tiny_overrides

    teacher = make_teacher_dir(tmp_path / "teacher", tie=True)
    student = make_student_dir(teacher, tmp_path / "student")
    runs = {}
    for name, (launcher, sharded) in launchers.items():
        overrides = tiny_overrides(tmp_path / "runs", teacher, student, run_name=name, **{
            "train.max_steps": 4, "train.save_every": 0, "eval.max_blocks": 2, "mutual.copies": 1, "mutual.noise": 0.02,
            "mutual.ce_weight": 0.5, **extra,
        })
        _launch([*launcher, str(WRAPPER), *overrides], _env(tmp_path, sharded=sharded), f"{name} run")
        run_dir = tmp_path / "runs" / name
        runs[name] = (_train_records(run_dir), _state(run_dir / "model"), _state(run_dir / "model_peer1"))
    return runs


@pytest.mark.slow
def test_two_process_runs_match_one_process_and_export_every_peer(tmp_path):
    from test_distributed import LAUNCH, _accelerate, _free_port

    ddp = _accelerate("--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--main_process_port", str(_free_port()))
    fsdp2 = _accelerate("--config_file", str(LAUNCH / "fsdp2.yaml"), "--num_processes", "2", "--main_process_port", str(_free_port()))
    zero3 = _accelerate("--config_file", str(LAUNCH / "zero3.yaml"), "--num_processes", "2", "--main_process_port", str(_free_port()))
    runs = _recipe_runs(tmp_path, {"single": ([sys.executable], False), "ddp": (ddp, False), "fsdp2": (fsdp2, True),
                                   "zero3": (zero3, True)})
    ref_records, ref_model, ref_peer = runs["single"]
    assert ref_records[0]["loss"] != ref_records[-1]["loss"]
    assert any(not torch.equal(ref_model[k], ref_peer[k]) for k in ref_model)  # the noisy copy stayed a different model
    for name, (loss_rtol, weight_atol) in {"ddp": (5e-5, 2e-5), "fsdp2": (5e-5, 2e-5), "zero3": (2e-4, 1e-4)}.items():
        records, model, peer = runs[name]
        for ref, got in zip(ref_records, records, strict=True):
            for key in ("loss", "loss/logits", "loss/mutual", "peer1/loss/logits", "peer1/loss/mutual"):
                assert got[key] == pytest.approx(ref[key], rel=loss_rtol, abs=1e-8), (name, ref["step"], key)
        for ref_state, state in ((ref_model, model), (ref_peer, peer)):
            assert state.keys() == ref_state.keys()
            for k, v in ref_state.items():
                assert (state[k] - v).abs().max().item() <= weight_atol, (name, k)


# ---------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "overrides, match",
    [
        (["mutual.copies=0"], r"mutual needs at least one peer besides the student"),
        (["mutual.weight=0", "mutual.teacher_weight=0"], r"nothing to learn from"),
        (["mutual.ce_weight=2"], r"mutual\.ce_weight=2\.0: must be in \[0, 1\]"),
        (["mutual.divergence=kl"], r"mutual\.divergence"),
        (["mutual.copies=1", "train.lora.r=4"], r"set train\.lora=null"),
        (["mutual.copies=1", "on_policy.fraction=0.5"], r"set on_policy=null"),
        (["mutual.copies=1", "teacher_cache.enabled=true"], r"teacher_cache\.enabled=false"),
        (["mutual.copies=0", "mutual.sources=[bundled]"], r"mutual\.sources\[0\]='bundled' is the teacher itself"),
    ],
)
def test_bad_mutual_settings_fail_at_config_load(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_recipe_config(None, overrides)


def test_a_peer_with_another_vocabulary_is_refused_before_training(tmp_path):
    from train_scripts.tiny_setup import make_student_dir, make_teacher_dir, tiny_overrides

    from minidistill.train import run_prune_distill

    teacher = make_teacher_dir(tmp_path / "teacher")
    student = make_student_dir(teacher, tmp_path / "student")
    other = make_teacher_dir(tmp_path / "other", tokenizer_shift=5)
    cfg = load_recipe_config(None, tiny_overrides(tmp_path / "runs", teacher, student, **{
        "mutual.copies": 0, "mutual.sources": f"[{other}]"}))
    with pytest.raises(ModelError, match=r"mutual\.sources\[0\]=.*other.*peers share the teacher's vocabulary"):
        run_prune_distill(cfg)
    assert not (tmp_path / "runs" / "tiny").exists() or not any((tmp_path / "runs" / "tiny").rglob("*.safetensors"))


def test_report_lists_each_peer_measured_from_its_exported_folder(tmp_path):
    from train_scripts.tiny_setup import make_student_dir, make_teacher_dir, tiny_overrides

    from minidistill.data import build_text_data
    from minidistill.evaluation.perplexity import heldout_loss
    from minidistill.models import ModelConfig, load_model, load_tokenizer
    from minidistill.train import run_prune_distill

    teacher = make_teacher_dir(tmp_path / "teacher")
    student = make_student_dir(teacher, tmp_path / "student")
    cfg = load_recipe_config(None, tiny_overrides(tmp_path / "runs", teacher, student, **{
        "train.max_steps": 2, "eval.max_blocks": 2, "report": "true", "report_new_tokens": 4, "mutual.copies": 1,
        "mutual.noise": 0.05}))
    result = run_prune_distill(cfg)
    metrics = json.loads((result.run_dir / "metrics.json").read_text())
    peer = load_model(ModelConfig(source=str(result.run_dir / "model_peer1")))
    data = build_text_data(cfg.data, load_tokenizer(str(teacher)))
    ref = heldout_loss(peer, data.heldout.batches(cfg.eval.batch_size, cfg.eval.max_blocks), chunk_tokens=cfg.eval.chunk_tokens)
    assert metrics["models"]["peer1"]["heldout"]["perplexity"] == pytest.approx(ref["perplexity"], rel=1e-4)
    assert metrics["models"]["peer1"]["heldout"]["perplexity"] != pytest.approx(metrics["models"]["distilled"]["heldout"]["perplexity"])
    module_peer = result.train.accelerator.unwrap_model(result.train.module).peers[0]
    for (name, p), q in zip(module_peer.state_dict().items(), peer.state_dict().values()):
        assert torch.equal(p, q), name
    quality = (result.run_dir / "report.md").read_text().split("## Held-out quality")[1]
    row = next(line for line in quality.splitlines() if line.startswith("| peer1 |"))
    assert f"{ref['perplexity']:.2f}" in row
