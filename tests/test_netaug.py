"""Network augmentation (``netaug``): the pruned student also trained inside a wider model sharing its weights.

References: the wider model built by hand as a plain HF model (the student's MLP weights concatenated with
the extra neurons), whose float64 loss and gradients the shared weights must match as the sum of both paths;
the exported folder (the student alone).
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from train_scripts.tiny_setup import make_teacher_dir, tiny_overrides
from transformers import AutoModelForCausalLM

from minidistill.config import ConfigError
from minidistill.data import DataConfig, TextData, TokenBlocks
from minidistill.distill.netaug import NetAugConfig
from minidistill.distill.objective import DistillLossConfig, teacher_features
from minidistill.prune.prune_map import PruneMap
from minidistill.recipe_config import load_recipe_config
from minidistill.training.config import EvalConfig, TrainConfig
from minidistill.training.loop import Distiller


def _distiller(tiny_folders, run_dir, netaug: dict):
    _, teacher_dir, student_dir = tiny_folders
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32)
    student = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32)
    g = torch.Generator().manual_seed(3)
    data = TextData(TokenBlocks(torch.randint(3, 512, (16, 12), generator=g)), TokenBlocks(torch.randint(3, 512, (2, 12), generator=g)),
                    DataConfig(seq_len=12))
    tc = TrainConfig.from_dict({"max_steps": 2, "batch_size": 4, "lr": 1e-3, "warmup_steps": 1, "progress_bar": False})
    return Distiller(student=student, teacher=teacher, data=data, prune_map=PruneMap.load(student_dir),
                     loss=DistillLossConfig(), train=tc, eval=EvalConfig.from_dict({"max_blocks": 2}), run_dir=run_dir,
                     config_dict={}, netaug=NetAugConfig.from_dict(netaug))


def _wide_model(student, extra, ratio):
    """The wider model as a plain HF model: each MLP's weights with the extra neurons' rows / columns appended."""
    cfg = copy.deepcopy(student.config)
    ks = [max(1, round(ratio * e.gate.shape[0])) for e in extra]
    assert len(set(ks)) == 1
    cfg.intermediate_size = student.config.intermediate_size + ks[0]
    wide = AutoModelForCausalLM.from_config(cfg, dtype=torch.float64)
    state = {k: v.detach().double() for k, v in student.state_dict().items()}
    for i, e in enumerate(extra):
        p = f"model.layers.{i}.mlp."
        state[p + "gate_proj.weight"] = torch.cat([state[p + "gate_proj.weight"], e.gate[: ks[0]].detach().double()])
        state[p + "up_proj.weight"] = torch.cat([state[p + "up_proj.weight"], e.up[: ks[0]].detach().double()])
        state[p + "down_proj.weight"] = torch.cat([state[p + "down_proj.weight"], e.down[:, : ks[0]].detach().double()], 1)
    wide.load_state_dict(state)
    return wide, ks[0]


def _kl(t_logits, s_logits):
    lt, ls = F.log_softmax(t_logits, -1), F.log_softmax(s_logits, -1)
    return (lt.exp() * (lt - ls)).sum(-1).mean()


@pytest.mark.parametrize("ratio", [1.0, 0.5])
def test_shared_weights_get_the_sum_of_both_paths_gradients(tiny_folders, tmp_path, ratio):
    d = _distiller(tiny_folders, tmp_path / "run", {"alpha": 0.7, "width_ratios": [ratio]})
    module = d.module
    ids = d.data.train.input_ids[:4]
    t_feats = teacher_features(d.teacher, ids, d._objective())
    out = module(ids, t_feats, netaug_ratio=ratio)
    out["loss"].backward()

    student = copy.deepcopy(d.student).double()
    for p in student.parameters():
        p.grad = None
    wide, k = _wide_model(student, module.netaug.extra, ratio)
    with torch.no_grad():
        t_logits = copy.deepcopy(d.teacher).double()(ids).logits[:, :-1]
    base = _kl(t_logits, student(ids).logits[:, :-1])
    aug = _kl(t_logits, wide(ids).logits[:, :-1])
    (base + 0.7 * aug).backward()
    assert out["components"]["loss/logits"].item() == pytest.approx(base.item(), rel=1e-5)
    assert out["components"]["loss/netaug"].item() == pytest.approx(aug.item(), rel=1e-5)
    kept = student.config.intermediate_size
    wide_params = dict(wide.named_parameters())
    for name, p in d.student.named_parameters():
        ref = dict(student.named_parameters())[name].grad.clone()
        w = wide_params[name].grad
        if name.endswith(("gate_proj.weight", "up_proj.weight")):
            ref += w[:kept]
        elif name.endswith("down_proj.weight"):
            ref += w[:, :kept]
        else:
            ref += w
        torch.testing.assert_close(p.grad.double(), ref, rtol=1e-4, atol=1e-7, msg=name)
    for i, e in enumerate(module.netaug.extra):
        w = wide_params[f"model.layers.{i}.mlp.gate_proj.weight"].grad
        torch.testing.assert_close(e.gate.grad[:k].double(), w[kept:], rtol=1e-4, atol=1e-7)  # only the wide path
        assert not e.gate.grad[k:].any()  # neurons outside the drawn width are not used


def test_the_width_draw_is_seeded_per_micro_batch(tiny_folders, tmp_path):
    d = _distiller(tiny_folders, tmp_path / "run", {"width_ratios": [0.25, 0.5, 1.0], "seed": 4})
    draws = [d.module.netaug.draw(i) for i in range(40)]
    assert draws == [d.module.netaug.draw(i) for i in range(40)] and set(draws) == {0.25, 0.5, 1.0}


def test_recipe_trains_with_netaug_and_saves_the_student_alone(tiny_folders, tmp_path):
    from minidistill.train import run_prune_distill

    root, teacher, student = tiny_folders
    cfg = load_recipe_config(None, tiny_overrides(tmp_path / "runs", teacher, student, **{
        "train.max_steps": 3, "eval.max_blocks": 2, "netaug.alpha": 0.5}))
    result = run_prune_distill(cfg)
    records = [json.loads(line) for line in (result.run_dir / "log.jsonl").read_text().splitlines()]
    losses = [r["loss/netaug"] for r in records if r["kind"] == "train"]
    assert len(losses) == 3 and all(x > 0 for x in losses)
    saved = AutoModelForCausalLM.from_pretrained(result.model_dir, dtype=torch.float32)
    trained = result.train.accelerator.unwrap_model(result.train.module).student
    assert saved.state_dict().keys() == trained.state_dict().keys()
    assert saved.config.intermediate_size == trained.config.intermediate_size == 64
    for k, v in trained.state_dict().items():
        assert torch.equal(saved.state_dict()[k], v), k


def test_a_student_without_a_prune_map_is_refused_before_the_data_is_built(tiny_folders, tmp_path, monkeypatch):
    import minidistill.train as train_mod

    root, teacher, _ = tiny_folders
    other = make_teacher_dir(tmp_path / "unpruned", seed=3)
    cfg = load_recipe_config(None, tiny_overrides(tmp_path / "runs", teacher, other, **{"netaug.alpha": 1.0}))
    monkeypatch.setattr(train_mod, "build_text_data", lambda *a, **k: pytest.fail("data was built"))
    with pytest.raises(ConfigError, match=r"netaug builds the wider model .* student\.source=.*unpruned has no prune_map\.json"):
        train_mod.run_prune_distill(cfg)


@pytest.mark.parametrize(
    "overrides, match",
    [
        (["netaug.alpha=0"], r"netaug\.alpha=0\.0: must be > 0"),
        (["netaug.width_ratios=[0]"], r"netaug\.width_ratios=\[0\.0\]: give shares in \(0, 1\]"),
        (["netaug.alpha=1", "train.lora.r=4"], r"netaug does not combine with train\.lora"),
        (["netaug.alpha=1", "train.gradient_checkpointing=true"], r"netaug does not combine with train\.gradient_checkpointing"),
        (["netaug.alpha=1", "mutual.copies=1"], r"netaug does not combine with mutual"),
    ],
)
def test_bad_netaug_settings_fail_at_config_load(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_recipe_config(None, overrides)

