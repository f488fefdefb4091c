"""Bad recipe input fails early with a message naming the fix, before data or training work starts."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from train_scripts.tiny_setup import make_student_dir, make_teacher_dir, tiny_overrides, tiny_tokenizer

from minidistill.config import ConfigError
from minidistill.recipe_config import load_recipe_config
from minidistill.train import CheckpointError, run_prune_distill

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    teacher = make_teacher_dir(root / "teacher")
    return teacher, make_student_dir(teacher, root / "student")


def _fail_before_data(monkeypatch):
    """Make any data loading an error, so that a check that fires later than it should is caught."""
    import minidistill.train as train_module

    def no_data(*a, **k):
        raise AssertionError("data was loaded before the input check")

    monkeypatch.setattr(train_module, "build_text_data", no_data)


def test_tokenizers_that_differ_are_refused(tiny_dirs, tmp_path, monkeypatch):
    teacher, student = tiny_dirs
    other = tmp_path / "student_other_tok"
    make_student_dir(teacher, other)
    tiny_tokenizer(shift=7).save_pretrained(other)  # same size, different words
    _fail_before_data(monkeypatch)
    cfg = load_recipe_config(None, tiny_overrides(tmp_path, teacher, other))
    with pytest.raises(ValueError, match=r"tokenizers differ.*student\.tokenizer="):
        run_prune_distill(cfg)


def test_a_head_smaller_than_the_tokenizer_is_refused(tiny_dirs, tmp_path, monkeypatch):
    teacher, _ = tiny_dirs
    student = make_student_dir(teacher, tmp_path / "student400")
    config = json.loads((student / "config.json").read_text())
    (student / "config.json").write_text(json.dumps({**config, "vocab_size": 400}))
    _fail_before_data(monkeypatch)
    cfg = load_recipe_config(None, tiny_overrides(tmp_path, teacher, student))
    with pytest.raises(ValueError, match=r"vocabularies differ: the teacher's lm_head has 512 rows, the student's 400, but "
                                         r"their shared tokenizer has ids 0\.\.511"):
        run_prune_distill(cfg)


def test_sequence_longer_than_the_model_allows(tmp_path, monkeypatch):
    teacher = make_teacher_dir(tmp_path / "short_teacher", max_positions=16)
    student = make_student_dir(teacher, tmp_path / "short_student")
    _fail_before_data(monkeypatch)
    cfg = load_recipe_config(None, tiny_overrides(tmp_path, teacher, student))  # data.seq_len=32
    with pytest.raises(ConfigError, match=r"data\.seq_len=32 exceeds the teacher's max_position_embeddings=16.*data\.seq_len<=16"):
        run_prune_distill(cfg)
    assert not (tmp_path / "tiny").exists()


def test_feature_loss_without_prune_map_needs_explicit_pairing(tiny_dirs, tmp_path, monkeypatch):
    teacher, _ = tiny_dirs
    student = make_student_dir(teacher, tmp_path / "unmapped")
    (student / "prune_map.json").unlink()
    _fail_before_data(monkeypatch)
    cfg = load_recipe_config(None, tiny_overrides(tmp_path, teacher, student, **{"loss.hidden.weight": 1.0}))
    with pytest.raises(ConfigError, match=r"loss\.hidden pairs layers by the prune map.*pairing\.strategy=explicit"):
        run_prune_distill(cfg)


def test_unknown_key_on_the_command_line(capsys):
    sys.path.insert(0, str(REPO / "recipes"))
    try:
        import prune_distill
    finally:
        sys.path.pop(0)
    assert prune_distill.main(["train.max_step=5"]) == 2
    assert "unknown config key 'train.max_step'; did you mean 'train.max_steps'?" in capsys.readouterr().err


@pytest.mark.slow
def test_resume_refuses_an_incompatible_config_and_a_missing_checkpoint(tiny_dirs, tmp_path):
    teacher, student = tiny_dirs
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        run_prune_distill(load_recipe_config(None, tiny_overrides(tmp_path, teacher, student)), resume=True)
    base = tiny_overrides(tmp_path, teacher, student, **{"train.max_steps": 2, "eval.max_blocks": 2})
    run_prune_distill(load_recipe_config(None, base))
    changed = load_recipe_config(None, base + ["loss.logits.temperature=2.0", "train.max_steps=4"])
    with pytest.raises(CheckpointError, match=r"config differs in loss\.terms\.logits\.temperature \(e\.g\. loss\.terms\.logits\.temperature: checkpoint 1\.0, now 2\.0\)"):
        run_prune_distill(changed, resume=True)
    with pytest.raises(CheckpointError, match=r"already holds checkpoints; pass --resume"):
        run_prune_distill(load_recipe_config(None, base))
    # max_steps may grow on resume: the run continues from step 2 to 4.
    result = run_prune_distill(load_recipe_config(None, base + ["train.max_steps=4"]), resume=True)
    assert result.train.steps == 4
