"""The installed ``minidistill`` command: every subcommand's ``--help`` (text from the configs' field
docstrings) and one real run of each on a tiny model, as a fresh process through the console script."""

from __future__ import annotations

import dataclasses
import json
import os
import runpy
import shutil
import subprocess
import sys
from pathlib import Path
from typing import get_type_hints

import pytest
import torch
from conftest import tiny_model
from safetensors.torch import load_file

from minidistill.cli import COMMANDS, _config_class
from minidistill.config import field_docs
from minidistill.publish.hub import HubConfig
from minidistill.models import BUNDLED, load_tokenizer
from minidistill.prune.pipeline import SearchConfig
from minidistill.prune.targets import TargetConfig
from minidistill.recipe_config import PruneDistillConfig
from minidistill.training.config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent / "minidistill"
SCRIPTS = {
    "prune": ROOT / "recipes" / "prune.py",
    "distill": ROOT / "recipes" / "prune_distill.py",
    "eval": ROOT / "eval" / "run_lm_eval.py",
    "push": ROOT / "recipes" / "push.py",
    "export-gguf": ROOT / "recipes" / "export_gguf.py",
}
FAST_PRUNE = ["--seq_len", "32", "--max_documents", "40", "--calib_blocks", "8", "--eval_blocks", "4",
              "--multiple_of", "8", "--max_candidates", "2", "importance.cache=false", "search.score_blocks=2"]

pytestmark = pytest.mark.skipif(not BIN.is_file(), reason="console script not installed: pip install -e . --no-deps")


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "MINIDISTILL_DEBUG", "RANK", "WORLD_SIZE")}
    env.update({"COLUMNS": "100", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", **extra})
    return env


def _run(cmd: list[str], cwd: Path = ROOT, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], cwd=cwd, env=_env(**env), capture_output=True, text=True, timeout=600)


def _flat(text: str) -> str:
    return " ".join(text.split())


def _keys(cls, prefix: str = "") -> list[str]:
    """Every dotted key of a config dataclass, walked here independently of the help generator."""
    from minidistill.distill.objective import TERM_SETTINGS, DistillLossConfig

    out = []
    for f in dataclasses.fields(cls):
        out.append(prefix + f.name)
        nested = _config_class(get_type_hints(cls)[f.name])
        if nested is not None:
            out += _keys(nested, f"{prefix}{f.name}.")
        if cls is DistillLossConfig and f.name == "terms":  # each registered term's settings
            for name, settings in TERM_SETTINGS.items():
                out += _keys(settings, f"{prefix}terms.{name}.")
    return out


def _doc(cls, name: str) -> str:
    return _flat(field_docs(cls)[name].replace("``", "`"))


# ---------------------------------------------------------------- --help


def test_top_level_help_lists_every_command():
    out = _run([BIN, "--help"])
    assert out.returncode == 0
    assert [line.split()[0] for line in out.stdout.splitlines() if line.startswith("  ")] == list(COMMANDS)
    bad = _run([BIN, "bogus"])
    assert bad.returncode == 2 and bad.stderr.startswith("error [config, exit 2]: unknown command 'bogus'")


@pytest.fixture(scope="module")
def helps() -> dict[str, str]:
    out = {}
    for name in COMMANDS:
        proc = _run([BIN, name, "--help"])
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert proc.stdout.startswith(f"usage: minidistill {name} ")
        out[name] = proc.stdout
    return out


def test_distill_help_lists_every_config_key_with_its_docstring(helps):
    text = helps["distill"]
    listed = [line.split()[0] for line in text.split("config keys")[1].splitlines()[1:] if line.startswith("  ") and not line.startswith("      ")]
    assert listed == _keys(PruneDistillConfig)
    flat = _flat(text)
    for cls, name in ((TrainConfig, "max_steps"), (TrainConfig, "max_minutes"), (PruneDistillConfig, "report")):
        assert _doc(cls, name) in flat, name
    assert "train.max_steps = " in text and "accelerate launch -m minidistill.cli distill" in flat


def test_option_help_comes_from_the_field_docstrings(helps):
    prune = _flat(helps["prune"])
    for cls, name in ((TargetConfig, "params"), (TargetConfig, "num_kv_heads"), (SearchConfig, "max_candidates")):
        assert _doc(cls, name).replace("%", "%") in prune, name
    assert "search.score = loss" in helps["prune"]  # the PruneConfig overrides are listed
    push = _flat(helps["push"])
    for name in ("repo_id", "private", "revision", "commit_message", "endpoint"):
        assert _doc(HubConfig, name) in push, name
    assert "f32, f16, q8_0" in helps["export-gguf"] and "NAME=SOURCE" in helps["eval"]


@pytest.mark.parametrize("name", list(COMMANDS))
def test_each_script_prints_the_same_help(name, helps, monkeypatch, capsys):
    """``python <script> --help`` is the same command: identical text below the usage lines."""
    monkeypatch.setenv("COLUMNS", "100")
    monkeypatch.setattr(sys, "argv", [str(SCRIPTS[name]), "--help"])
    with pytest.raises(SystemExit) as done:
        runpy.run_path(str(SCRIPTS[name]), run_name="__main__")
    assert done.value.code == 0
    script_help = capsys.readouterr().out

    def body(text: str) -> str:
        return text.split("\n\n", 1)[1]

    assert body(script_help) == body(helps[name])


# ---------------------------------------------------------------- one real run of each


def _untimed(value):
    """``value`` without the wall-clock entries (``seconds``, ``*_s``) that differ between two runs."""
    if isinstance(value, dict):
        return {k: _untimed(v) for k, v in value.items() if k != "seconds" and not k.endswith("_s")}
    if isinstance(value, list):
        return [_untimed(v) for v in value]
    return value


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory) -> Path:
    sys.path.insert(0, str(ROOT / "tests"))
    from train_scripts.tiny_setup import make_teacher_dir

    return make_teacher_dir(tmp_path_factory.mktemp("teacher") / "tiny", tie=True)


def test_prune_command_equals_the_recipe(teacher_dir, tmp_path):
    args = ["--model", teacher_dir, "--target_params", "0.6", *FAST_PRUNE]
    cli = _run([BIN, "prune", "--output", tmp_path / "cli", *args])
    assert cli.returncode == 0, cli.stderr[-3000:]
    script = _run([sys.executable, SCRIPTS["prune"], "--output", tmp_path / "script", *args])
    assert script.returncode == 0, script.stderr[-3000:]
    maps = [_untimed(json.loads((tmp_path / d / "prune_map.json").read_text())) for d in ("cli", "script")]
    assert maps[0] == maps[1] and maps[0]["kept_layers"]
    a, b = (load_file(tmp_path / d / "model.safetensors") for d in ("cli", "script"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    summary = json.loads((tmp_path / "cli" / "prune_summary.json").read_text())
    assert summary["params_after"] < summary["params_before"]


@pytest.mark.slow
def test_distill_under_accelerate_launch_module(teacher_dir, tmp_path):
    from train_scripts.tiny_setup import make_student_dir, tiny_overrides

    student = make_student_dir(teacher_dir, tmp_path / "student")
    overrides = tiny_overrides(tmp_path / "runs", teacher_dir, student, **{"train.max_steps": 2, "eval.max_blocks": 2})
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "minidistill.cli", "distill", *overrides]
    proc = _run(cmd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    model_dir = tmp_path / "runs" / "tiny" / "model"
    meta = json.loads((model_dir / "training_metadata.json").read_text())
    assert meta["steps"] == 2
    assert (model_dir / "model.safetensors").is_file() and "distilled model:" in proc.stderr


def test_eval_command_scores_a_folder(teacher_dir, tmp_path):
    out = tmp_path / "eval"
    proc = _run([BIN, "eval", "--model", f"tiny={teacher_dir}", "--limit", "2", "--batch_size", "2", "--output_dir", out])
    assert proc.returncode == 0, proc.stderr[-3000:]
    (row,) = json.loads((out / "lm_eval.json").read_text())["rows"]
    assert row["name"] == "tiny" and row["metrics"] and "| tiny |" in proc.stdout
    from minidistill.evaluation.lm_eval_runner import EvalTable

    assert EvalTable.from_json(json.loads((out / "lm_eval.json").read_text())).to_markdown().strip() in proc.stdout


def test_push_command_uploads_the_folder(teacher_dir, tmp_path, monkeypatch):
    from huggingface_hub import ModelCard, constants
    from hub_stub import HubStub

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    token, repo = "hf_FAKEtoken0123456789abcdefXYZ", "someone/tiny-cli"
    folder = tmp_path / "model"
    shutil.copytree(teacher_dir, folder)
    with HubStub(token=token, lfs_threshold=64 * 1024) as stub:
        proc = _run([BIN, "push", folder, "--repo_id", repo, "--endpoint", stub.url, "--teacher", "bundled"],
                    HF_TOKEN=token, HF_HUB_OFFLINE="0", HF_HUB_DISABLE_XET="1")
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert proc.stdout.strip().startswith(f"{stub.url}/{repo}/commit/")
        remote = stub.files(repo)
    for p in folder.iterdir():
        assert remote[p.name] == p.read_bytes(), p.name
    assert ModelCard(remote["README.md"].decode()).data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_export_gguf_command_writes_what_the_library_writes(tmp_path):
    import gguf

    from minidistill.publish.export_gguf import export_gguf

    tok = load_tokenizer(BUNDLED)
    folder = tmp_path / "m"
    tiny_model("llama", vocab_size=len(tok)).save_pretrained(folder)
    tok.save_pretrained(folder)
    proc = _run([BIN, "export-gguf", folder, "--outtype", "q8_0", "--output", tmp_path / "cli.gguf", "--teacher", "t"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == str(tmp_path / "cli.gguf")
    lib = export_gguf(folder, tmp_path / "lib.gguf", outtype="q8_0", teacher="t").path
    assert (tmp_path / "cli.gguf").read_bytes() == lib.read_bytes()
    assert gguf.GGUFReader(lib).get_field("general.file_type").contents() == gguf.LlamaFileType.MOSTLY_Q8_0
