"""End to end: the demo config (bundled teacher, budget search, distillation, report) shrunk to a few steps."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from minidistill.data import DataConfig, build_text_data
from minidistill.evaluation.perplexity import heldout_loss
from minidistill.models import load_tokenizer

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]

SHRINK = [
    "data.seq_len=64",
    "prune.calib_blocks=4",
    "prune.search.max_candidates=2",
    "prune.search.score_blocks=2",
    "train.max_steps=2",
    "train.save_every=1",
    "train.log_with=[]",
    "eval.every=0",
    "eval.max_blocks=2",
    "report_new_tokens=4",
]


def _demo(tmp_path: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", str(ROOT / "recipes" / "prune_distill.py"),
           "--config", str(ROOT / "recipes" / "configs" / "demo.yaml"), "--resume", "auto",
           f"output_root={tmp_path}", *SHRINK]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)


def test_demo_end_to_end_and_rerun_keeps_the_finished_run(tmp_path):
    proc = _demo(tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    run = tmp_path / "demo"
    for name in ("report.md", "metrics.json", "loss.png", "log.jsonl", "config.yaml",
                 "model/config.json", "model/model.safetensors", "model/prune_map.json", "model/tokenizer.json"):
        assert (run / name).is_file(), name
    metrics = json.loads((run / "metrics.json").read_text())
    report = (run / "report.md").read_text()

    # The distilled model reloads and its held-out loss is the one reported.
    model = AutoModelForCausalLM.from_pretrained(run / "model")
    tok = load_tokenizer(str(run / "model"))
    data = build_text_data(DataConfig(seq_len=64), tok)
    got = heldout_loss(model, data.heldout.batches(4, limit_blocks=2))
    assert got["loss"] == pytest.approx(metrics["models"]["distilled"]["heldout"]["loss"], rel=1e-4)

    # Every number of the quality table in report.md is the one in metrics.json: news and general prose.
    shapes = {}
    teacher = metrics["models"]["teacher"]
    assert list(teacher["heldout_sets"]) == ["bundled:wiki"]
    quality = report.split("## Held-out quality")[1].split("##")[0]
    for name in ("teacher", "pruned", "distilled"):
        m = metrics["models"][name]
        cells = []
        for h, ref in ((m["heldout"], teacher["heldout"]), (m["heldout_sets"]["bundled:wiki"], teacher["heldout_sets"]["bundled:wiki"])):
            cells.append(f"{h['perplexity']:.2f}" + ("" if name == "teacher" else f" ({h['perplexity'] / ref['perplexity']:.2f}x)"))
        agree = "-" if m["agreement"] is None else f"{m['agreement']:.2f}"
        row = f"| {name} | {cells[0]} | {cells[1]} | {agree} |"
        assert row in quality, row
        shapes[name] = m["shape"]
        assert f"| {name} | {m['shape']['num_layers']} | {m['shape']['hidden_size']:,} |" in report
        assert len(m["generations"]) == 4
    assert metrics["models"]["distilled"]["non_embedding_params"] < 0.55 * metrics["models"]["teacher"]["non_embedding_params"]
    assert shapes["pruned"] == shapes["distilled"] != shapes["teacher"]
    assert len(metrics["candidates"]) >= 2 and "## Budget search" in report  # max_candidates + axis-family bests
    assert metrics["training"]["steps"] == 2 and f"| 2 | 2 | {metrics['training']['tokens']:,} |" in report
    assert "Share of the pruned student's loss gap to the teacher closed by distillation" in report
    assert set(metrics["stage_seconds"]) >= {"load teacher", "data", "prune", "distill", "export"}
    assert re.search(r"from_pretrained\('.*model'\)", report)

    # A second demo never overwrites the finished run: it writes to demo-2.
    before = (run / "model" / "model.safetensors").read_bytes()
    proc = _demo(tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (tmp_path / "demo-2" / "report.md").is_file()
    assert (run / "model" / "model.safetensors").read_bytes() == before
    assert "is kept" in proc.stderr
