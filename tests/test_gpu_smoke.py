"""bench/gpu_smoke.py --tiny: the GPU smoke run's whole path (random teacher written, README recipe, section) on a CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoConfig

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def _non_embedding(cfg) -> int:
    d, i, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    hd = cfg.head_dim
    attn = d * hd * (cfg.num_attention_heads * 2 + cfg.num_key_value_heads * 2)
    return L * (attn + 3 * d * i + 2 * d) + d


def test_tiny_smoke_run_prunes_distills_and_writes_its_section(tmp_path):
    results = tmp_path / "RESULTS.md"
    results.write_text("# Benchmark results\n\n## Other\n\nkept\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_smoke.py"), "--tiny", "--no-step-bench",
                           "--work-dir", str(tmp_path / "work"), "--results", str(results)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    run = tmp_path / "work" / "runs" / "gpu_smoke"
    metrics = json.loads((run / "metrics.json").read_text())
    teacher_cfg = AutoConfig.from_pretrained(tmp_path / "work" / "teacher")
    student_cfg = AutoConfig.from_pretrained(run / "model")
    # the recipe pruned the written teacher to about half of its non-embedding parameters and trained 3 steps
    ratio = _non_embedding(student_cfg) / _non_embedding(teacher_cfg)
    assert 0.35 <= ratio <= 0.55, ratio
    assert metrics["models"]["distilled"]["non_embedding_params"] == _non_embedding(student_cfg)
    assert metrics["training"]["steps"] == 3
    text = results.read_text()
    assert "## Other\n\nkept" in text  # other sections left as they are
    section = text[text.index("## GPU smoke run"):]
    assert "CPU" in section and f"{metrics['training']['steps']} steps" in section
    for name, m in metrics["models"].items():
        assert f"| {name} |" in section and f"{m['heldout']['loss']:.3f}" in section
