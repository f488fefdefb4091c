"""Teacher correction: LoRA and full fine-tunes lower the teacher's LM loss, merged LoRA equals peft's forward,
bad target modules fail before training, and the recipe stage saves, records and reloads the corrected teacher."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_model
from torch import nn

from minidistill import teacher_correction as tc
from minidistill.config import ConfigError
from minidistill.data import DataConfig, TextData, TokenBlocks
from minidistill.evaluation.perplexity import heldout_loss
from minidistill.models import state_dict_sha256
from minidistill.teacher_correction import (
    TeacherCorrectionConfig,
    add_lora,
    correct_teacher,
    merge_lora,
    run_teacher_correction,
    train_lm,
)


def _blocks(n=8, t=16, vocab=128, seed=0):
    """Blocks with structure a few steps can learn: a short repeated pattern per block plus noise."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randint(3, vocab, (n, 4), generator=g).repeat(1, t // 4)
    noise = torch.rand(n, t, generator=g) < 0.1
    return torch.where(noise, torch.randint(3, vocab, (n, t), generator=g), base)


def _loss(model, blocks):
    return heldout_loss(model, [blocks])["loss"]


def _cfg(**kw):
    return TeacherCorrectionConfig.from_dict({"steps": 8, "batch_size": 4, "lr": 1e-2, **kw})


@pytest.mark.parametrize("method", ["lora", "full"])
def test_correction_lowers_the_lm_loss_and_leaves_a_plain_model(method):
    model = tiny_model("llama", num_layers=2)
    blocks = _blocks()
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    before_sd = {k: v.clone() for k, v in model.state_dict().items()}
    before = _loss(model, blocks)
    corrected, result = correct_teacher(model, blocks, _cfg(method=method))
    assert corrected is model
    after = _loss(corrected, blocks)
    assert after < before - 0.1, (before, after)
    assert len(result.losses) == 8 and result.losses[-1] < result.losses[0]
    # A plain model: the same parameter names, no peft modules, flags restored, eval mode.
    assert set(corrected.state_dict()) == set(before_sd)
    assert not any("lora" in n for n, _ in corrected.named_modules())
    assert all(type(m) is nn.Linear for n, m in corrected.named_modules() if n.endswith(("q_proj", "down_proj")))
    assert {n: p.requires_grad for n, p in corrected.named_parameters()} == flags
    assert not corrected.training
    changed = {k for k, v in corrected.state_dict().items() if not torch.equal(v, before_sd[k])}
    if method == "lora":  # only the adapted projections change
        assert changed and all(k.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight",
                                           "gate_proj.weight", "up_proj.weight", "down_proj.weight")) for k in changed)
        assert result.target_modules == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
        r = 16  # r x (in + out) per adapted projection
        want = sum(r * (m.in_features + m.out_features) for n, m in model.named_modules()
                   if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in result.target_modules)
        assert result.trainable_params == want
    else:
        assert "model.embed_tokens.weight" in changed and "lm_head.weight" in changed
        assert result.trainable_params == sum(p.numel() for p in model.parameters())


def test_merged_weights_give_peft_logits():
    model = tiny_model("llama", num_layers=2, dtype=torch.float64)
    blocks = _blocks()
    original = model(input_ids=blocks).logits.detach()
    cfg = _cfg(steps=4, target_modules=["q_proj", "v_proj", "down_proj"])
    peft_model = add_lora(model, cfg)
    train_lm(peft_model.get_base_model(), blocks, cfg)
    peft_model.eval()
    with torch.no_grad():
        want = peft_model(input_ids=blocks).logits
    merged = merge_lora(peft_model)
    with torch.no_grad():
        got = merged(input_ids=blocks).logits
    assert not any("lora" in n for n in merged.state_dict())
    assert (want - original).abs().max() > 1e-3  # the adapters did change the model
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


def test_unknown_lora_target_names_the_modules_the_model_has():
    model = tiny_model("llama", num_layers=2)
    sha = state_dict_sha256(model)
    with pytest.raises(ConfigError) as e:
        correct_teacher(model, _blocks(), _cfg(target_modules=["q_proj", "qkv_proj"]))
    msg = str(e.value)
    assert "teacher_correction.target_modules" in msg and "'qkv_proj'" in msg
    for have in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"):
        assert have in msg
    assert state_dict_sha256(model) == sha  # nothing was trained
    assert not any("lora" in n for n, _ in model.named_modules())
    # phi3's fused projections are found by the default (None: every decoder projection).
    phi = tiny_model("phi3", num_layers=1)
    assert tc.resolve_target_modules(phi, TeacherCorrectionConfig()) == ["down_proj", "gate_up_proj", "o_proj", "qkv_proj"]


def test_config_validation():
    with pytest.raises(ConfigError, match="teacher_correction.method"):
        TeacherCorrectionConfig.from_dict({"method": "qlora"}, prefix="teacher_correction.")
    with pytest.raises(ConfigError, match="teacher_correction.steps"):
        TeacherCorrectionConfig.from_dict({"steps": 0})


def _data(blocks):
    return TextData(train=TokenBlocks(blocks), heldout=TokenBlocks(_blocks(n=4, seed=9)), config=DataConfig(seq_len=16))


def test_stage_saves_records_and_reloads_the_corrected_teacher(tmp_path, monkeypatch):
    cfg = _cfg(steps=4, eval_blocks=4)
    data = _data(_blocks())
    teacher = tiny_model("llama", num_layers=2)
    record = run_teacher_correction(cfg, teacher, None, data, tmp_path, teacher_source="tiny")
    folder = tmp_path / tc.CORRECTED_DIR
    assert (folder / "model.safetensors").is_file() and (folder / "config.json").is_file()
    assert record == json.loads((folder / tc.RECORD_FILE).read_text())
    assert record["sha256"] == state_dict_sha256(teacher)
    assert record["heldout_loss_after"] < record["heldout_loss_before"]
    assert record["config"] == cfg.to_dict() and len(record["losses"]) == 4
    # A second run (e.g. a resume) reloads the saved weights into a fresh teacher instead of training.
    monkeypatch.setattr(tc, "correct_teacher", lambda *a, **k: pytest.fail("trained again"))
    fresh = tiny_model("llama", num_layers=2)
    run_teacher_correction(cfg, fresh, None, data, tmp_path, teacher_source="tiny")
    assert state_dict_sha256(fresh) == record["sha256"]
    # Other settings train again.
    monkeypatch.undo()
    other = tiny_model("llama", num_layers=2)
    rec2 = run_teacher_correction(cfg.replace(steps=2), other, None, data, tmp_path, teacher_source="tiny")
    assert len(rec2["losses"]) == 2 and rec2["sha256"] != record["sha256"]
    # A tampered folder is refused.
    from safetensors.torch import load_file, save_file

    weights = load_file(folder / "model.safetensors")
    weights["lm_head.weight"] += 1.0
    save_file(weights, folder / "model.safetensors")
    with pytest.raises(ValueError, match="sha256"):
        run_teacher_correction(cfg.replace(steps=2), tiny_model("llama", num_layers=2), None, data, tmp_path,
                               teacher_source="tiny")


def test_recipe_runs_teacher_correction_before_pruning(tmp_path):
    from train_scripts.tiny_setup import make_student_dir, make_teacher_dir, tiny_overrides

    from minidistill.models import load_model
    from minidistill.recipe_config import load_recipe_config
    from minidistill.train import run_prune_distill

    teacher_dir = make_teacher_dir(tmp_path / "teacher")
    student_dir = make_student_dir(teacher_dir, tmp_path / "student")
    overrides = tiny_overrides(tmp_path / "runs", teacher_dir, student_dir, **{
        "student": "null", "prune.target.num_layers": 2, "prune.target.intermediate_size": 64,
        "prune.calib_blocks": 8, "prune.show_progress": False, "prune.reconstruction.enabled": False,
        "train.max_steps": 2, "teacher_correction.steps": 3, "teacher_correction.lr": 1e-2,
        "teacher_correction.eval_blocks": 4})
    overrides = [o for o in overrides if not o.startswith("student.source=")]
    cfg = load_recipe_config(None, overrides)
    assert cfg.teacher_correction is not None and cfg.teacher_correction.steps == 3
    result = run_prune_distill(cfg)
    run_dir = result.run_dir
    record = json.loads((run_dir / tc.CORRECTED_DIR / tc.RECORD_FILE).read_text())
    corrected = load_model(str(run_dir / tc.CORRECTED_DIR))
    assert state_dict_sha256(corrected) == record["sha256"]
    original = load_model(str(teacher_dir))
    assert state_dict_sha256(original) != record["sha256"]
    # The pruned student was cut from the corrected teacher, and distillation used it.
    pmap = json.loads((run_dir / "student_init" / "prune_map.json").read_text())
    assert pmap["teacher"]["sha256"] == record["sha256"]
    saved = json.loads((run_dir / "model" / "training_metadata.json").read_text())
    assert saved["config"]["teacher_correction"]["steps"] == 3


def test_recipe_refuses_correction_with_an_already_pruned_student():
    from minidistill.recipe_config import load_recipe_config

    with pytest.raises(ConfigError, match="student=null"):
        load_recipe_config(None, ["student.source=some/pruned", "teacher_correction.steps=2"])
    cfg = load_recipe_config(None, ["student.source=some/pruned", "teacher_correction.enabled=false"])
    assert cfg.teacher_correction.enabled is False
