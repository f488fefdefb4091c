"""The recipe config: shipped YAML files, nested overrides, typo and value errors, resume compatibility."""

from __future__ import annotations

from pathlib import Path

import pytest

from minidistill.config import ConfigError
from minidistill.recipe_config import PruneDistillConfig, incompatible_fields, load_recipe_config

CONFIGS = sorted((Path(__file__).resolve().parent.parent / "recipes" / "configs").glob("*.yaml"))


def test_shipped_configs_exist():
    assert {p.name for p in CONFIGS} >= {"demo.yaml", "llama8b_to_4b_minitron.yaml", "qwen_fsdp2_1gpu.yaml"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_load_and_split_batches(path):
    cfg = load_recipe_config(path)
    assert cfg.student is None and cfg.prune is not None
    assert cfg.train.batch_size % cfg.train.grad_accum_steps == 0
    assert cfg.train.save_every == 0 or cfg.train.max_steps % cfg.train.save_every == 0
    if path.name == "llama8b_to_4b_minitron.yaml":  # 2 nodes x 8 GPUs
        assert cfg.train.micro_batch_size(16) == 2
        assert cfg.teacher.dtype == "bfloat16"


def test_demo_trains_for_a_time_budget_that_fits_twenty_minutes():
    cfg = load_recipe_config(CONFIGS[[p.name for p in CONFIGS].index("demo.yaml")])
    # measured (bench/RESULTS.md, `make demo`): set-up ~2-4 min, prune ~3.5 min, report ~40 s on 2 cores
    assert cfg.train.max_minutes is not None and cfg.train.max_minutes + 4 + 3.5 + 0.7 <= 20
    assert cfg.train.max_steps * cfg.train.batch_size * cfg.data.seq_len >= 60 * cfg.train.max_minutes * 200  # the steps never bind at ~200 tok/s
    assert set(cfg.loss.weights()) == {"logits"}  # feature losses hurt at this budget (quality study)
    assert cfg.prune.target.params == 0.5 and cfg.prune.target.non_embedding
    assert cfg.prune.search.reconstruct and "bundled:wiki" in cfg.data.mix


def test_mode_configs_are_the_demo_plus_their_mode():
    by_name = {p.name: p for p in CONFIGS}
    demo = load_recipe_config(by_name["demo.yaml"]).to_dict()
    modes = {"demo_mutual.yaml": "mutual", "demo_born_again.yaml": "born_again", "demo_exits.yaml": "exits",
             "demo_netaug.yaml": "netaug"}
    for name, key in modes.items():
        got = load_recipe_config(by_name[name]).to_dict()
        assert demo[key] is None and got[key] is not None, name
        changed = {k for k in got if got[k] != demo[k]}
        assert changed <= {"run_name", key, "train"}, (name, changed)
        assert {k for k in got["train"] if got["train"][k] != demo["train"][k]} <= {"max_minutes"}, name


def test_base_file_is_read_first_and_overridden_by_the_file_and_the_command_line(tmp_path):
    (tmp_path / "a.yaml").write_text("run_name: a\ntrain: {lr: 1.0e-3, batch_size: 8}\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\ntrain: {lr: 2.0e-3}\n")
    cfg = load_recipe_config(tmp_path / "b.yaml", ["train.batch_size=4"])
    assert (cfg.run_name, cfg.train.lr, cfg.train.batch_size) == ("a", 2e-3, 4)
    (tmp_path / "c.yaml").write_text("base: missing.yaml\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: base: missing\.yaml does not exist next to it"):
        load_recipe_config(tmp_path / "c.yaml")
    (tmp_path / "d.yaml").write_text("base: e.yaml\n")
    (tmp_path / "e.yaml").write_text("base: d.yaml\n")
    with pytest.raises(ConfigError, match=r"leads back to d\.yaml; remove the cycle"):
        load_recipe_config(tmp_path / "d.yaml")


def test_nested_overrides_reach_every_level():
    cfg = load_recipe_config(
        None,
        ["train.lr=1e-4", "loss.hidden.pairing.strategy=uniform", "loss.logits.top_k=20", "student.source=/tmp/s", "train.lora.r=4"],
    )
    assert cfg.train.lr == 1e-4
    assert cfg.loss.terms["hidden"].pairing.strategy == "uniform"
    assert cfg.loss.logits.top_k == 20
    assert cfg.student.source == "/tmp/s"
    assert cfg.train.lora.r == 4 and cfg.train.lora.alpha == 32.0


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.lrr=1e-4", r"unknown config key 'train\.lrr'; did you mean 'train\.lr'"),
        ("loss.hiden.weight=1", r"'loss\.hiden'; did you mean 'loss\.hidden'"),
        ("train.batch_size=6", r"train\.batch_size=6 is not divisible by train\.grad_accum_steps=4"),
        ("train.schedule=linear", r"train\.schedule='linear': choose one of"),
        ("loss.logits.weight=0", r"loss\.logits\.weight=0\.0: must be positive"),
        ("push_to_hub=true", r"push_to_hub=true needs hub\.repo_id"),
        ("train.log_with=[mlflow]", r"train\.log_with: unknown tracker 'mlflow'"),
    ],
)
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_recipe_config(None, ["train.grad_accum_steps=4", "train.batch_size=8", override])


@pytest.mark.parametrize("spelling", ["no", "off", "false"])
def test_a_choice_yaml_reads_as_a_bool_is_taken_as_spelled(spelling, tmp_path):
    # YAML 1.1 reads no / off / false as False; the choice spelled that way is meant
    assert load_recipe_config(None, [f"train.mixed_precision={spelling}"]).train.mixed_precision == "no"
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  mixed_precision: no\n")
    assert load_recipe_config(path, []).train.mixed_precision == "no"
    with pytest.raises(ConfigError, match=r"train\.schedule=False: choose one of"):  # no choice is spelled that way
        load_recipe_config(None, ["train.schedule=no"])


def test_teacher_cache_with_streaming_is_refused_before_any_work():
    with pytest.raises(ConfigError, match=r"teacher_cache\.enabled=true needs the in-memory training blocks.*data\.streaming=true"):
        load_recipe_config(None, ["teacher_cache.enabled=true", "data.streaming=true", "data.source=/tmp/corpus.txt"])


def test_micro_batch_must_split_over_processes():
    cfg = load_recipe_config(None, ["train.batch_size=12", "train.grad_accum_steps=2"])
    assert cfg.train.micro_batch_size(3) == 2
    with pytest.raises(ConfigError, match="make it a multiple of 8"):
        cfg.train.micro_batch_size(4)


def test_resume_compatibility_names_changed_fields_only():
    a = PruneDistillConfig().to_dict()
    b = load_recipe_config(None, ["train.max_steps=500", "eval.every=3", "loss.logits.temperature=2", "data.seq_len=64"]).to_dict()
    assert incompatible_fields(a, b) == ["data.seq_len", "loss.terms.logits.temperature"]


def test_a_checkpoint_config_in_the_earlier_loss_form_resumes_under_loss_terms():
    """A run saved with ``loss.logits`` / ``loss.hidden`` (weight 0) / ``loss.extra`` compares equal to the same
    terms under ``loss.terms``; a real change of a term is still named."""
    current = load_recipe_config(None, ["loss.terms.logits.ce_weight=0.5", "loss.terms.nst.weight=0.25"]).to_dict()
    saved = {**current, "loss": {"logits": {**current["loss"]["terms"]["logits"], "term": None},
                                 "hidden": {"weight": 0.0, "kind": "nmse"}, "attention": {"weight": 0.0},
                                 "extra": {"nst": {"weight": 0.25}}, "balance": "fixed"}}
    assert incompatible_fields(saved, current) == []
    saved["loss"]["extra"]["nst"]["degree"] = 3
    assert incompatible_fields(saved, current) == ["loss.terms.nst.degree"]
