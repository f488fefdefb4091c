"""Born-again generations (``born_again``): generation g >= 1 is distilled from generation g - 1.

References: the logs themselves (generation g's teacher, measured at its step 0, is generation g - 1's final
model; a generation starting from the pruned student starts where generation 0 started), the exported
folders, and an uninterrupted run (a crash inside generation 1 resumes there and ends with the same model).
"""

from __future__ import annotations

import json

import pytest
import torch
from train_scripts.tiny_setup import tiny_overrides

from minidistill.config import ConfigError
from minidistill.distill.born_again import generation_dir
from minidistill.recipe_config import load_recipe_config
from minidistill.train import run_prune_distill
from minidistill.training.loop import Distiller


def _cfg(tiny_folders, run_name: str, **extra):
    root, teacher, student = tiny_folders
    return load_recipe_config(None, tiny_overrides(root / "runs", teacher, student, run_name=run_name, **{
        "train.max_steps": 3, "train.save_every": 0, "eval.max_blocks": 2, "born_again.generations": 2, **extra}))


def _evals(run_dir, g):
    records = [json.loads(line) for line in (generation_dir(run_dir, g) / "log.jsonl").read_text().splitlines()]
    return [r for r in records if r["kind"] == "eval"]


def _trains(run_dir, g):
    records = [json.loads(line) for line in (generation_dir(run_dir, g) / "log.jsonl").read_text().splitlines()]
    return [r for r in records if r["kind"] == "train"]


def _weights(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def test_each_generation_learns_from_the_previous_one_and_is_saved_and_measured(tiny_folders):
    cfg = _cfg(tiny_folders, "gens", report="true", report_new_tokens=4)
    result = run_prune_distill(cfg)
    run_dir = result.run_dir
    for g in (1, 2):
        before, after = _evals(run_dir, g - 1), _evals(run_dir, g)
        # generation g's teacher is generation g-1's final model; it starts from the pruned student as generation 0 did
        assert after[0]["teacher_heldout_loss"] == pytest.approx(before[-1]["heldout_loss"], rel=1e-5)
        assert after[0]["heldout_loss"] == pytest.approx(_evals(run_dir, 0)[0]["heldout_loss"], rel=1e-6)
        assert after[-1]["heldout_loss"] != pytest.approx(after[0]["heldout_loss"], rel=1e-6)
    assert _evals(run_dir, 0)[0]["teacher_heldout_loss"] != pytest.approx(_evals(run_dir, 1)[0]["teacher_heldout_loss"])
    last = _weights(generation_dir(run_dir, 2) / "model")
    published = _weights(run_dir / "model")
    assert last.keys() == published.keys() and all(torch.equal(last[k], published[k]) for k in last)
    assert not all(torch.equal(last[k], _weights(generation_dir(run_dir, 1) / "model")[k]) for k in last)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert [g["learned_from"] for g in metrics["generations"]] == ["teacher", "generation 0", "generation 1"]
    for g, entry in enumerate(metrics["generations"]):
        assert entry["heldout"]["perplexity"] == pytest.approx(_evals(run_dir, g)[-1]["heldout_perplexity"])
    assert metrics["models"]["distilled"]["heldout"]["perplexity"] == pytest.approx(metrics["generations"][2]["heldout"]["perplexity"])
    assert metrics["models"]["pruned"]["heldout"]["perplexity"] == pytest.approx(_evals(run_dir, 0)[0]["heldout_perplexity"])
    report = (run_dir / "report.md").read_text()
    section = report.split("## Born-again generations")[1].split("\n## ")[0]
    assert sum(line.startswith("| ") for line in section.splitlines()) == 4  # header + 3 generations
    assert f"{metrics['generations'][1]['heldout']['perplexity']:.2f}" in section


def test_ensemble_generation_learns_from_the_mean_of_all_earlier_ones(tiny_folders):
    from transformers import AutoModelForCausalLM

    from minidistill.data import build_text_data
    from minidistill.models import load_tokenizer

    cfg = _cfg(tiny_folders, "ensemble", **{"born_again.ensemble": "true"})
    run_dir = run_prune_distill(cfg).run_dir
    # generation 2's teacher, scored at its step 0, is the mean distribution of generations 0 and 1
    data = build_text_data(cfg.data, load_tokenizer(str(tiny_folders[1])))
    blocks = data.heldout.input_ids[: cfg.eval.max_blocks]
    lps = []
    for g in (0, 1):
        model = AutoModelForCausalLM.from_pretrained(generation_dir(run_dir, g) / "model", dtype=torch.float64)
        with torch.no_grad():
            lps.append(torch.log_softmax(model(blocks).logits[:, :-1], -1))
    mix = torch.logsumexp(torch.stack(lps), 0) - torch.log(torch.tensor(2.0, dtype=torch.float64))
    nll = -mix.gather(-1, blocks[:, 1:, None]).mean().item()
    assert _evals(run_dir, 2)[0]["teacher_heldout_loss"] == pytest.approx(nll, rel=1e-5)
    assert _evals(run_dir, 1)[0]["teacher_heldout_loss"] == pytest.approx(_evals(run_dir, 0)[-1]["heldout_loss"], rel=1e-5)
    learned = json.loads((generation_dir(run_dir, 2) / "model" / "training_metadata.json").read_text())["generation"]
    assert learned == 2


def test_init_previous_starts_each_generation_from_the_one_before(tiny_folders):
    result = run_prune_distill(_cfg(tiny_folders, "previous", **{"born_again.generations": 1, "born_again.init": "previous"}))
    before, after = _evals(result.run_dir, 0), _evals(result.run_dir, 1)
    assert after[0]["heldout_loss"] == pytest.approx(before[-1]["heldout_loss"], rel=1e-6)
    assert after[0]["top1_agreement"] == 1.0  # the student is its own teacher at the start


def test_a_crash_inside_generation_one_resumes_there(tiny_folders, monkeypatch):
    kw = {"born_again.generations": 1, "train.max_steps": 4, "train.save_every": 2}
    full = run_prune_distill(_cfg(tiny_folders, "full", **kw)).run_dir
    original = Distiller.train_step
    calls = {"n": 0}

    def crashing(self, step):
        calls["n"] += 1
        if calls["n"] == 7:  # generation 1, step 3: after its checkpoint at step 2
            raise RuntimeError("killed")
        return original(self, step)

    monkeypatch.setattr(Distiller, "train_step", crashing)
    cfg = _cfg(tiny_folders, "crash", **kw)
    with pytest.raises(RuntimeError, match="killed"):
        run_prune_distill(cfg)
    monkeypatch.setattr(Distiller, "train_step", original)
    gen0_log = (generation_dir(cfg.run_dir, 0) / "log.jsonl").read_text()
    assert not (cfg.run_dir / "model").exists()
    with pytest.raises(Exception, match="pass --resume"):
        run_prune_distill(cfg)
    run_prune_distill(cfg, resume="auto")
    assert (generation_dir(cfg.run_dir, 0) / "log.jsonl").read_text() == gen0_log  # generation 0 was not retrained
    keys = ("step", "loss", "loss/logits", "grad_norm")
    for g in (0, 1):
        assert [[r[k] for k in keys] for r in _trains(cfg.run_dir, g)] == [[r[k] for k in keys] for r in _trains(full, g)]
    a, b = _weights(cfg.run_dir / "model"), _weights(full / "model")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_generation_0_reads_the_teacher_cache_and_later_ones_learn_live(tiny_folders):
    """At k = vocabulary the cache reproduces the live teacher: every generation's losses equal the live run's, and the
    cache is built once."""
    live = run_prune_distill(_cfg(tiny_folders, "live_gens", **{"born_again.generations": 1})).run_dir
    cached = run_prune_distill(_cfg(tiny_folders, "cached_gens", **{
        "born_again.generations": 1, "teacher_cache.enabled": "true", "teacher_cache.k": 512,
        "teacher_cache.dtype": "float32"})).run_dir
    assert (cached / "teacher_cache" / "manifest.json").is_file()
    for g in (0, 1):
        a, b = _trains(live, g), _trains(cached, g)
        assert len(a) == len(b) == 3
        for x, y in zip(a, b):
            assert y["loss"] == pytest.approx(x["loss"], rel=1e-5, abs=1e-6), (g, x["step"])
    truncated = run_prune_distill(_cfg(tiny_folders, "k4_gens", **{
        "born_again.generations": 1, "teacher_cache.enabled": "true", "teacher_cache.k": 4})).run_dir
    assert _trains(truncated, 0)[0]["loss"] != pytest.approx(_trains(live, 0)[0]["loss"], rel=1e-4)  # the cache was read
    # generation 1's teacher is generation 0, not the cached teacher
    assert _evals(cached, 1)[0]["teacher_heldout_loss"] == pytest.approx(_evals(cached, 0)[-1]["heldout_loss"], rel=1e-5)


@pytest.mark.parametrize(
    "overrides, match",
    [
        (["born_again.generations=0"], r"born_again\.generations=0: must be >= 1"),
        (["born_again.generations=1", "mutual.copies=1"], r"set mutual=null \(or born_again=null\)"),
        (["born_again.generations=1", "on_policy.fraction=0.5"], r"set on_policy=null \(or born_again=null\)"),
        (["born_again.init=random"], r"born_again\.init"),
        (["born_again.ensemble=true", "loss.hidden.weight=1"], r"born_again\.ensemble=true .* set loss\.hidden\.weight=0"),
    ],
)
def test_bad_born_again_settings_fail_at_config_load(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_recipe_config(None, overrides)


def test_prune_map_pairing_is_refused_before_anything_runs(tiny_folders):
    cfg = _cfg(tiny_folders, "paired", **{"loss.hidden.weight": 1.0, "born_again.generations": 1})
    with pytest.raises(ConfigError, match=r"born_again: generations after the first .* no prune map .*loss\.hidden"):
        run_prune_distill(cfg)
    assert not cfg.run_dir.exists() or not any(cfg.run_dir.rglob("*.safetensors"))
