from __future__ import annotations

import json
import re

import torch
from conftest import tiny_model

from minidistill.evaluation.generation import greedy_generations
from minidistill.models import load_tokenizer
from minidistill.publish.report import render_report, write_report


def _metrics():
    shape = dict(num_layers=30, hidden_size=576, num_heads=9, num_kv_heads=3, head_dim=64, intermediate_size=1536)
    return {
        "run_name": "demo",
        "models": {
            "teacher": {"shape": shape, "params": 134515008, "non_embedding_params": 106203456,
                        "heldout": {"loss": 3.4852, "perplexity": 32.629, "tokens": 8000}, "agreement": None,
                        "generations": [{"prompt": "A", "completion": " b|c"}]},
            "distilled": {"shape": dict(shape, num_layers=20), "params": 90000000, "non_embedding_params": 61000000,
                          "heldout": {"loss": 4.01, "perplexity": 55.123, "tokens": 8000}, "agreement": 0.4321,
                          "generations": [{"prompt": "A", "completion": " d"}]},
        },
        "candidates": [{"rank": 1, "layers": 20, "score": 4.2}],
        "training": {"steps": 100, "tokens": 102400, "seconds": 600.5, "tokens_per_second": 170.5,
                     "losses": {"logits": 1.0, "hidden": 0.5}},
        "stage_seconds": {"prune": 60.0, "train": 600.5},
        "commands": {"reproduce": "make demo", "load": "AutoModelForCausalLM.from_pretrained('runs/demo/model')"},
    }


def test_report_numbers_come_from_metrics(tmp_path):
    metrics = _metrics()
    log = [{"kind": "train", "step": i, "loss": 3.0 - 0.1 * i, "loss/logits": 2.0} for i in range(5)]
    log += [{"kind": "eval", "step": 4, "heldout_perplexity": 50.0}]
    (tmp_path / "log.jsonl").write_text("\n".join(json.dumps(r) for r in log))
    report = write_report(tmp_path, metrics).read_text()
    assert json.loads((tmp_path / "metrics.json").read_text()) == metrics
    assert (tmp_path / "loss.png").stat().st_size > 1000
    assert "![loss components" in report
    for value in ("32.63", "55.12", "0.43", "134,515,008", "102,400", "170.50", "660.50", "make demo"):
        assert value in report, value
    assert re.search(r"\| teacher \| 30 \| 576 \| 9 \| 3 \| 1,536 \|", report)
    assert "b\\|c" in report  # pipes in generations escaped for the table


def test_report_without_log_has_no_plot():
    assert "![" not in render_report(_metrics(), plot_name=None)


def test_greedy_generations_match_manual_greedy_decoding():
    tok = load_tokenizer("bundled")
    model = tiny_model("llama", vocab_size=len(tok))
    prompts = ["Hello there", "A much longer prompt about the weather"]
    gens = greedy_generations(model, tok, prompts, max_new_tokens=5)
    for g in gens:
        ids = tok(g["prompt"], return_tensors="pt").input_ids
        for _ in range(5):
            nxt = model(ids).logits[0, -1].argmax()
            ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
        expected = tok.decode(ids[0, -5:], skip_special_tokens=True)
        assert g["completion"] == expected


def test_report_shows_every_heldout_set_against_the_teacher_and_the_gap_closed():
    metrics = _metrics()
    shape = metrics["models"]["teacher"]["shape"]
    metrics["data"] = {"source": "bundled", "mix": ["bundled:wiki"]}
    metrics["models"]["pruned"] = {"shape": dict(shape, num_layers=20), "params": 90000000,
                                   "non_embedding_params": 61000000, "agreement": 0.2,
                                   "heldout": {"loss": 5.0, "perplexity": 148.41, "tokens": 8000}}
    wiki = {"teacher": 3.0, "pruned": 4.5, "distilled": 3.3}
    for name, loss in wiki.items():
        metrics["models"][name]["heldout_sets"] = {"bundled:wiki": {"loss": loss, "perplexity": torch.tensor(loss).exp().item(),
                                                                    "tokens": 4096}}
    metrics["models"] = {k: metrics["models"][k] for k in ("teacher", "pruned", "distilled")}
    metrics["training"].update(planned_steps=100, stopped_by="max_minutes", max_minutes=9.0)
    report = render_report(metrics, plot_name=None)
    quality = report.split("## Held-out quality")[1]
    row = next(line for line in quality.splitlines() if line.startswith("| distilled |"))
    # news: 55.123 / 32.629 = 1.69x; wiki: exp(3.3) / exp(3.0) = exp(0.3) = 1.35x
    assert "55.12 (1.69x)" in row and f"{torch.tensor(3.3).exp().item():.2f} (1.35x)" in row
    # gap closed in loss: news (5.0 - 4.01) / (5.0 - 3.4852) = 65%; wiki (4.5 - 3.3) / (4.5 - 3.0) = 80%
    assert "bundled 65%" in report and "bundled:wiki 80%" in report
    assert "time budget (9.0 min)" in report


def test_report_shows_how_the_student_was_pruned_with_the_sensitivity_table():
    metrics = _metrics()
    shape = metrics["models"]["teacher"]["shape"]
    metrics["pruning"] = {
        "importance": "activation", "layer_method": "block_influence", "kept_layers": list(range(30)), "refit": 30,
        "sensitivity_plot": "sensitivity.png",
        "sensitivity": {"base": 3.3891, "score": "loss", "reconstructed": False, "points": [
            {"axis": "mlp", "ratio": 0.5, "keep": 0.5, "shape": dict(shape, intermediate_size=768), "score": 5.4582,
             "increase": 2.0691, "seconds": 8.2},
            {"axis": "depth", "ratio": 0.5, "keep": 0.5, "shape": dict(shape, num_layers=15), "score": 6.4592,
             "increase": 3.0701, "seconds": 6.4}]},
    }
    report = render_report(metrics, plot_name=None)
    section = report.split("## Pruning")[1].split("\n## ")[0]
    assert "importance `activation`" in section and "30 projections re-fitted" in section
    assert "(no re-fit; teacher 3.3891)" in section
    assert "| mlp | 0.500 | L30 D576 H9/KV3 I768 | 5.4582 | +2.0691 |" in section
    assert "| depth | 0.500 | L15 D576 H9/KV3 I1536 | 6.4592 | +3.0701 |" in section
    assert "![per-axis sensitivity](sensitivity.png)" in section


# ---------------------------------------------------------------- budget search plot and speed

TEACHER_PARAMS = 134_515_008


def _search_metrics(score: str = "loss", sensitivity: bool = True):
    metrics = _metrics()
    rows = [(1, 90_000_000, 4.2, True, "depth"), (2, 91_000_000, 4.5, True, "width"), (3, 99_000_000, 4.0, False, "mix")]
    metrics["candidates"] = [{"rank": r, "num_layers": 20, "params": p, "fraction": p / TEACHER_PARAMS, "family": f,
                              "eligible": e, score: s} for r, p, s, e, f in rows]
    metrics["pruning"] = {"importance": "activation", "layer_method": "block_influence",
                          "search": {"score": score, "non_embedding": False}}
    if sensitivity:
        metrics["pruning"]["sensitivity"] = {"base": 3.39, "score": score, "reconstructed": False, "points": []}
    return metrics


def test_search_view_points_picked_and_teacher_come_from_the_candidate_rows():
    from minidistill.publish.report import search_view

    view = search_view(_search_metrics())
    assert [(p["params"], p["y"], p["eligible"]) for p in view["points"]] == [
        (90_000_000, 4.2, True), (91_000_000, 4.5, True), (99_000_000, 4.0, False)]
    assert view["picked"]["params"] == 90_000_000  # rank 1, although the ineligible row scores lower
    assert view["teacher"] == {"params": TEACHER_PARAMS, "y": 3.39} and view["x_label"] == "parameters"
    # kl: the teacher's divergence from itself is 0; loss without a sensitivity base: no teacher point
    assert search_view(_search_metrics("kl", sensitivity=False))["teacher"] == {"params": TEACHER_PARAMS, "y": 0.0}
    assert search_view(_search_metrics(sensitivity=False))["teacher"] is None
    assert search_view(_metrics()) is None  # rows without params / score: nothing to plot


def test_report_plots_the_budget_search(tmp_path):
    report = write_report(tmp_path, _search_metrics()).read_text()
    assert (tmp_path / "candidates.png").stat().st_size > 5000
    section = report.split("## Budget search (ranked)")[1].split("\n## ")[0]
    assert "![budget search candidates](candidates.png)" in section
    assert "Picked: rank 1, 90,000,000 parameters, loss 4.2000 (depth); teacher: 134,515,008 parameters, loss 3.3900." in section


def test_measure_speed_counts_tokens_over_the_timed_runs(monkeypatch):
    """With a clock that advances 0.25 s per reading, every timed run lasts 0.25 s."""
    import minidistill.publish.report as report

    class Clock:
        now = 0.0

        def __call__(self):
            self.now += 0.25
            return self.now

    model = tiny_model("llama")
    monkeypatch.setattr(report.time, "perf_counter", Clock())
    sp = report.measure_speed(model, batch_size=2, seq_len=16, new_tokens=5, prompt_len=4, repeats=3)
    assert sp["forward_tokens_per_s"] == 2 * 16 / 0.25 and sp["generate_tokens_per_s"] == 5 / 0.25
    assert (sp["batch_size"], sp["seq_len"], sp["new_tokens"], sp["repeats"], sp["device"], sp["dtype"]) == (
        2, 16, 5, 3, "cpu", "float32")


def test_measure_speed_on_a_real_clock_and_the_speed_table():
    from minidistill.publish.report import measure_speed

    small, big = tiny_model("llama", num_layers=1), tiny_model("llama", num_layers=8, hidden_size=256, intermediate_size=1024,
                                                               num_heads=8, num_kv_heads=4, head_dim=32)
    fast, slow = (measure_speed(m, batch_size=4, seq_len=64, new_tokens=8, repeats=3) for m in (small, big))
    assert 0 < slow["forward_tokens_per_s"] < fast["forward_tokens_per_s"]
    assert slow["generate_tokens_per_s"] > 0 and fast["generate_tokens_per_s"] > 0
    metrics = _metrics()
    metrics["models"]["teacher"]["speed"] = dict(slow, forward_tokens_per_s=1000.0, generate_tokens_per_s=20.0)
    metrics["models"]["distilled"]["speed"] = dict(slow, forward_tokens_per_s=1500.0, generate_tokens_per_s=25.0)
    section = render_report(metrics, plot_name=None).split("## Speed")[1].split("\n## ")[0]
    assert "| teacher | 1000 | - | 20.0 | - |" in section
    assert "| distilled | 1500 | 1.50x | 25.0 | 1.25x |" in section
    assert "batch 4 x 64 tokens" in section and "8 new tokens" in section
