"""Be your own teacher (``exits``): early-exit heads supervised by the model's own final layer.

References: the exit loss written out in float64 from the model's hidden states; the model that stops at an
exit against the full model's layer output put through the exit norm and the head; the recipe's logged exit
perplexity against the exported exit model measured again.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_model
from train_scripts.tiny_setup import make_student_dir, make_teacher_dir, tiny_overrides

from minidistill.config import ConfigError
from minidistill.distill.exits import ExitConfig, ExitHeads, exit_layers, load_exit_model, save_exits
from minidistill.recipe_config import load_recipe_config


def _heads(model, layers, **kw):
    heads = ExitHeads(model, ExitConfig(layers=layers, **kw))
    with torch.no_grad():  # exit norms unlike the final norm, so that the test sees which one is used
        for p in heads.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return heads


@pytest.mark.parametrize("hidden_weight", [0.0, 0.5])
def test_exit_loss_matches_float64_reference_and_trains_only_below_the_exit(hidden_weight):
    model = tiny_model("llama", num_layers=3)
    heads = _heads(model, [0, 1], weight=0.7, hidden_weight=hidden_weight)
    ids = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    out = model(ids, output_hidden_states=True)
    final = model.model.norm(out.hidden_states[-1])
    layer_out = {layer: out.hidden_states[layer + 1] for layer in (0, 1)}
    total, components = heads(layer_out, final, model.lm_head.weight)
    total.backward()

    m64, h64 = copy.deepcopy(model).double(), copy.deepcopy(heads).double()
    with torch.no_grad():
        hs = m64(ids, output_hidden_states=True).hidden_states
        target = F.log_softmax(m64.lm_head(m64.model.norm(hs[-1]))[:, :-1], -1)
    ref = 0.0
    for layer in (0, 1):
        h = h64.norms[str(layer)](hs[layer + 1])[:, :-1]
        lp = F.log_softmax(m64.lm_head(h), -1)
        kl = (target.exp() * (target - lp)).sum(-1).mean()
        mse = (h - m64.model.norm(hs[-1])[:, :-1]).pow(2).mean()
        ref = ref + (0.7 * kl + hidden_weight * mse) / 2
        assert components[f"loss/exit{layer}"].item() == pytest.approx(kl.item(), rel=1e-5)
    assert total.item() == pytest.approx(ref.item(), rel=1e-5)
    ref.backward()
    for name, p in heads.named_parameters():
        torch.testing.assert_close(p.grad.double(), dict(h64.named_parameters())[name].grad, rtol=1e-4, atol=1e-7)
    assert model.lm_head.weight.grad is None or not model.lm_head.weight.grad.any()  # the head is not trained by exits
    last = model.model.layers[2]
    assert all(p.grad is None or not p.grad.any() for p in last.parameters())  # nor the layer above every exit
    assert model.model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0


def test_exit_model_is_the_plain_model_stopped_at_the_exit(tmp_path):
    model = tiny_model("llama", num_layers=3)
    heads = _heads(model, [1])
    model.save_pretrained(tmp_path / "m")
    save_exits(heads, heads.state_dict(), tmp_path / "m", final_norm="model.norm")
    assert exit_layers(tmp_path / "m") == [1]
    stopped = load_exit_model(tmp_path / "m", 1)
    assert stopped.config.num_hidden_layers == 2 and len(stopped.model.layers) == 2
    ids = torch.randint(3, 128, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        h = model(ids, output_hidden_states=True).hidden_states[2]
        ref = model.lm_head(heads.norms["1"](h))
        torch.testing.assert_close(stopped(ids).logits, ref, rtol=1e-5, atol=1e-5)
    stopped.save_pretrained(tmp_path / "stopped")  # a plain HF model
    with pytest.raises(ConfigError, match=r"no exit after layer 0 \(its exits: \[1\]\)"):
        load_exit_model(tmp_path / "m", 0)


def test_recipe_trains_saves_and_reports_each_exit(tmp_path):
    from minidistill.data import build_text_data
    from minidistill.evaluation.perplexity import heldout_loss
    from minidistill.models import load_tokenizer
    from minidistill.train import run_prune_distill

    teacher = make_teacher_dir(tmp_path / "teacher")
    student = make_student_dir(teacher, tmp_path / "student")
    cfg = load_recipe_config(None, tiny_overrides(tmp_path / "runs", teacher, student, **{
        "train.max_steps": 4, "eval.max_blocks": 2, "report": "true", "report_new_tokens": 4, "exits.layers": "[0]",
        "train.lr": 1e-2}))
    result = run_prune_distill(cfg)
    records = [json.loads(line) for line in (result.run_dir / "log.jsonl").read_text().splitlines()]
    evals = [r for r in records if r["kind"] == "eval"]
    assert evals[-1]["exit0/heldout_loss"] < evals[0]["exit0/heldout_loss"]
    assert all("loss/exit0" in r for r in records if r["kind"] == "train")
    model_dir = result.model_dir
    assert exit_layers(model_dir) == [0]
    data = build_text_data(cfg.data, load_tokenizer(str(teacher)))
    stopped = load_exit_model(model_dir, 0)
    ref = heldout_loss(stopped, data.heldout.batches(cfg.eval.batch_size, cfg.eval.max_blocks), chunk_tokens=cfg.eval.chunk_tokens)
    assert evals[-1]["exit0/heldout_loss"] == pytest.approx(ref["loss"], rel=1e-5)
    metrics = json.loads((result.run_dir / "metrics.json").read_text())
    (entry,) = metrics["exits"]
    assert entry["layer"] == 0 and entry["layers_run"] == 1
    assert entry["heldout"]["perplexity"] == pytest.approx(ref["perplexity"], rel=1e-5)
    assert entry["speed"]["forward_tokens_per_s"] > 0
    section = (result.run_dir / "report.md").read_text().split("## Early exits")[1].split("\n## ")[0]
    assert f"{ref['perplexity']:.2f}" in section


@pytest.mark.parametrize(
    "overrides, match",
    [
        (["exits.layers=[]"], r"exits\.layers is empty"),
        (["exits.layers=[1,1]"], r"distinct layer indices"),
        (["exits.layers=[1]", "train.lora.r=4"], r"set train\.lora=null \(or exits=null\)"),
        (["exits.layers=[1]", "mutual.copies=1"], r"set mutual=null \(or exits=null\)"),
        (["exits.layers=[1]", "born_again.generations=1"], r"exits with born_again"),
    ],
)
def test_bad_exit_settings_fail_at_config_load(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_recipe_config(None, overrides)


def test_an_exit_past_the_student_is_refused_before_the_data_is_built(tmp_path, monkeypatch):
    import minidistill.train as train_mod

    teacher = make_teacher_dir(tmp_path / "teacher")
    student = make_student_dir(teacher, tmp_path / "student")  # 2 layers: only layer 0 can have an exit
    cfg = load_recipe_config(None, tiny_overrides(tmp_path / "runs", teacher, student, **{"exits.layers": "[1]"}))
    monkeypatch.setattr(train_mod, "build_text_data", lambda *a, **k: pytest.fail("data was built"))
    with pytest.raises(ConfigError, match=r"exits\.layers: layer 1 .*student\.source=.* has 2 layers, so exits go on layers 0\.\.0"):
        train_mod.run_prune_distill(cfg)
