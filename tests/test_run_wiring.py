"""What a recipe run writes besides the model: speed in metrics.json / report.md / the model card, the GGUF
file of ``export.gguf``, lm-eval task versions; early refusal of feature terms paired by a missing prune map."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from train_scripts.tiny_setup import make_student_dir, make_teacher_dir, tiny_overrides
from transformers import AutoModelForCausalLM, LlamaConfig

from minidistill.config import ConfigError, field_docs
from minidistill.distill.objective import TERM_SETTINGS, DistillLossConfig
from minidistill.evaluation.lm_eval_runner import LmEvalConfig
from minidistill.evaluation.tasks import LOCAL_TASKS, TASK_FORMAT_VERSION
from minidistill.models import BUNDLED, load_tokenizer
from minidistill.prune.prune_map import PruneMap
from minidistill.train import REPORT_SPEED, check_pairing_possible

ROOT = Path(__file__).resolve().parents[1]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "MINIDISTILL_DEBUG", "RANK", "WORLD_SIZE")}
    return {**env, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "COLUMNS": "100"}


def _teacher_dir(path: Path) -> Path:
    """The tiny 3-layer llama of ``tiny_setup`` with the bundled byte-level BPE tokenizer (GGUF needs one)."""
    tok = load_tokenizer(BUNDLED)
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        intermediate_size=96, vocab_size=len(tok), max_position_embeddings=256, tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
    )
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One ``recipes/prune_distill.py`` process on the tiny models with the report, lm-eval and a GGUF file."""
    root = tmp_path_factory.mktemp("wiring")
    teacher = _teacher_dir(root / "teacher")
    student = make_student_dir(teacher, root / "student")
    overrides = tiny_overrides(root / "runs", teacher, student, **{
        "train.max_steps": 2, "eval.max_blocks": 2, "report": "true", "report_new_tokens": 4, "export.gguf": "f32",
        "eval.lm_eval.limit": 2, "eval.lm_eval.batch_size": 2, "eval.lm_eval.max_lastword_items": 4,
    })
    proc = subprocess.run([sys.executable, str(ROOT / "recipes" / "prune_distill.py"), *overrides], cwd=ROOT,
                          env=_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return root / "runs" / "tiny", teacher


@pytest.mark.slow
def test_report_and_model_card_show_the_measured_speed(run):
    from minidistill.publish.model_card import build_model_card, run_info_from_folder

    run_dir, _ = run
    models = json.loads((run_dir / "metrics.json").read_text())["models"]
    assert "speed" not in models["pruned"]
    for name in ("teacher", "distilled"):
        sp = models[name]["speed"]
        assert {k: sp[k] for k in REPORT_SPEED} == REPORT_SPEED
        assert sp["forward_tokens_per_s"] > 0 and sp["generate_tokens_per_s"] > 0 and sp["dtype"] == "float32"
    report = (run_dir / "report.md").read_text()
    section = report[report.index("## Speed"):]
    for name in ("teacher", "distilled"):
        row = next(line for line in section.splitlines() if line.startswith(f"| {name} |"))
        assert f"{models[name]['speed']['forward_tokens_per_s']:.0f}" in row, row
    card = build_model_card(run_info_from_folder(run_dir / "model"))
    speed = card.text.split("## Speed")[1].split("\n## ")[0]
    (t_fwd, t_gen), (d_fwd, d_gen) = ([models[n]["speed"][k] for k in ("forward_tokens_per_s", "generate_tokens_per_s")]
                                      for n in ("teacher", "distilled"))
    assert f"| teacher | {t_fwd:.0f} | - | {t_gen:.1f} | - |" in speed
    assert f"| distilled | {d_fwd:.0f} | {d_fwd / t_fwd:.2f}x | {d_gen:.1f} | {d_gen / t_gen:.2f}x |" in speed


@pytest.mark.slow
def test_export_gguf_in_the_recipe_writes_the_model(run, tmp_path):
    import gguf

    from minidistill.publish.export_gguf import export_gguf

    run_dir, teacher = run
    path = run_dir / "model.f32.gguf"
    reader = gguf.GGUFReader(path)
    assert reader.get_field("minidistill.teacher").contents() == str(teacher)
    weights = load_file(str(run_dir / "model" / "model.safetensors"))
    tensors = {t.name: t for t in reader.tensors}
    embed = np.asarray(tensors["token_embd.weight"].data).reshape(weights["model.embed_tokens.weight"].shape)
    assert torch.equal(torch.from_numpy(embed.copy()), weights["model.embed_tokens.weight"])
    down = np.asarray(tensors["blk.1.ffn_down.weight"].data).reshape(weights["model.layers.1.mlp.down_proj.weight"].shape)
    assert torch.equal(torch.from_numpy(down.copy()), weights["model.layers.1.mlp.down_proj.weight"])
    # The same bytes as the command-line export of the finished folder.
    lib = export_gguf(run_dir / "model", tmp_path / "lib.gguf", outtype="f32", teacher=str(teacher)).path
    assert lib.read_bytes() == path.read_bytes()


@pytest.mark.slow
def test_lm_eval_task_versions_reach_the_model_card(run):
    from minidistill.publish.model_card import build_model_card, run_info_from_folder

    run_dir, _ = run
    saved = json.loads((run_dir / "lm_eval" / "lm_eval.json").read_text())
    assert saved["settings"]["versions"] == {t: TASK_FORMAT_VERSION for t in LOCAL_TASKS}
    card = build_model_card(run_info_from_folder(run_dir / "model"))
    results = card.data.eval_results
    assert {r.task_name for r in results} == set(LOCAL_TASKS)
    assert all(r.dataset_args == {"lm_eval_task_version": TASK_FORMAT_VERSION, "limit": 2}
               for r in results), [r.dataset_args for r in results]


def test_eval_help_comes_from_the_lm_eval_config():
    proc = subprocess.run([sys.executable, str(ROOT / "eval" / "run_lm_eval.py"), "--help"], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    flat = " ".join(proc.stdout.split())
    for name in ("tasks", "num_fewshot", "limit", "batch_size", "device", "output_dir"):
        assert " ".join(field_docs(LmEvalConfig)[name].replace("``", "`").split()) in flat, name


# Registered terms whose settings pair layers, and the pairing each one defaults to.
PAIRED = {name: cls().pairing.strategy for name, cls in TERM_SETTINGS.items() if hasattr(cls(), "pairing")}


def test_every_paired_term_is_checked():
    assert {"hidden", "attention", "relations", "mmd", "nst", "token_attention", "fsp", "weights"} <= set(PAIRED)


@pytest.mark.parametrize("name", sorted(PAIRED))
@pytest.mark.parametrize("form", ["terms", "extra"])
def test_term_paired_by_a_missing_prune_map_is_refused(name, form):
    """Both config forms: ``loss.terms.<name>`` and the earlier ``loss.extra.<name>`` (``loss.<name>`` for the sections)."""
    section = form if name not in ("hidden", "attention", "relations") or form == "terms" else None
    key = f"loss\\.{section}\\.{name}" if section else f"loss\\.{name}"

    def loss(value):
        return DistillLossConfig.from_dict({section: {name: value}} if section else {name: value})

    if PAIRED[name] == "prune_map":
        with pytest.raises(ConfigError, match=rf"{key} pairs layers by the prune map.*{key}\.weight=0"):
            check_pairing_possible(loss({"weight": 0.5}), None)
    else:
        check_pairing_possible(loss({"weight": 0.5}), None)
    check_pairing_possible(loss({"weight": 0.5, "pairing": {"strategy": "explicit", "explicit": [[0, 0]]}}), None)
    by_map = loss({"weight": 0.5, "pairing": {"strategy": "prune_map"}})
    with pytest.raises(ConfigError, match=rf"{key} pairs"):
        check_pairing_possible(by_map, None)
    check_pairing_possible(loss({"weight": 0.0, "pairing": {"strategy": "prune_map"}}), None)
    check_pairing_possible(by_map, PruneMap.identity({"num_layers": 2, "hidden_size": 8, "num_heads": 2,
                                                       "num_kv_heads": 1, "intermediate_size": 8, "head_dim": 4}))


def test_gguf_export_of_a_tokenizer_llama_cpp_cannot_read_is_refused_before_training(tmp_path):
    """A word-level tokenizer with export.gguf: exit 8 right after loading, no model folder written."""
    teacher = make_teacher_dir(tmp_path / "teacher")
    student = make_student_dir(teacher, tmp_path / "student")
    overrides = tiny_overrides(tmp_path / "runs", teacher, student, **{"train.max_steps": 2, "export.gguf": "f32"})
    proc = subprocess.run([sys.executable, str(ROOT / "recipes" / "prune_distill.py"), *overrides], cwd=ROOT,
                          env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 8, proc.stderr[-2000:]
    assert "export.gguf: GGUF export supports byte-level BPE tokenizers only" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "runs" / "tiny" / "model").exists()
