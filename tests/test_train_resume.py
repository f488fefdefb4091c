"""SIGKILL in the middle of a recipe run, then ``--resume``: the loss curve equals an uninterrupted run's
(in-memory data, and a streamed local file)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from train_scripts.tiny_setup import make_student_dir, make_teacher_dir, tiny_overrides

from minidistill.corpora import bundled_documents

REPO = Path(__file__).resolve().parent.parent
RECIPE = REPO / "recipes" / "prune_distill.py"


def _env() -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _train_records(log: Path) -> list[dict]:
    if not log.is_file():
        return []
    out = []
    for line in log.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # a line being written
            pass
    return out


@pytest.mark.slow
@pytest.mark.parametrize("streaming, trained_role", [(False, False), (True, False), (False, True)],
                         ids=["in_memory", "streaming", "trained_role"])
def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path, streaming, trained_role):
    """``trained_role``: a second trained model (``roles.buddy.trainable``) with mutual-learning terms; its curve,
    held-out figures and exported weights resume exactly too."""
    from test_roles import TRAINED_TERMS

    teacher = make_teacher_dir(tmp_path / "teacher")
    student = make_student_dir(teacher, tmp_path / "student")
    data = {}
    if trained_role:
        data = {"roles.buddy.source": make_teacher_dir(tmp_path / "buddy", seed=2), **TRAINED_TERMS}
    if streaming:  # a local text file read lazily; the resume continues from the checkpoint's stream cursor
        corpus = tmp_path / "news.txt"
        corpus.write_text("\n".join(" ".join(d.split()) for d in bundled_documents("news")[:80]) + "\n")
        data = {"data.source": str(corpus), "data.streaming": "true", "data.max_documents": "null",
                "data.heldout_documents": 10, "data.sample_blocks": 8}
    common = tiny_overrides(
        tmp_path / "runs", teacher, student,
        **{"train.max_steps": 12, "train.save_every": 3, "loss.hidden.weight": 1.0, "loss.balance": "auto", "eval.every": 6,
           **data},
    )
    cmd = [sys.executable, str(RECIPE), *common]
    full = subprocess.run([*cmd, "run_name=full"], env=_env(), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert full.returncode == 0, full.stderr[-3000:]

    log = tmp_path / "runs" / "cut" / "log.jsonl"
    proc = subprocess.Popen([*cmd, "run_name=cut"], env=_env(), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and proc.poll() is None:
            steps = [r["step"] for r in _train_records(log) if r["kind"] == "train"]
            if steps and max(steps) >= 4:  # after the step-3 checkpoint, before the end
                os.kill(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.02)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    state = tmp_path / "runs" / "cut" / "checkpoints" / "step-00000003" / "trainer_state.json"
    assert state.is_file()
    assert ("stream_cursor" in json.loads(state.read_text())["data_position"]) == streaming
    assert not (tmp_path / "runs" / "cut" / "model").exists()

    resumed = subprocess.run([*cmd, "run_name=cut", "--resume"], env=_env(), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    def curve(name):
        records = _train_records(tmp_path / "runs" / name / "log.jsonl")
        train = [(r["step"], r["loss"], r["loss/logits"], r["loss/hidden"], r["weight/hidden"], r["lr"],
                  r.get("loss/from_buddy")) for r in records if r["kind"] == "train"]
        evals = [(r["step"], r["heldout_loss"], r["top1_agreement"], r.get("buddy/heldout_loss")) for r in records if r["kind"] == "eval"]
        return train, evals

    full_train, full_eval = curve("full")
    cut_train, cut_eval = curve("cut")
    assert [s for s, *_ in cut_train] == list(range(1, 13))
    assert cut_train == full_train  # exact: fp32 on CPU, single process
    assert cut_eval == full_eval
    assert all(e[-1] is not None for e in full_eval) == trained_role
    if trained_role:
        from safetensors.torch import load_file

        full_buddy, cut_buddy = (load_file(tmp_path / "runs" / name / "model_buddy" / "model.safetensors") for name in ("full", "cut"))
        assert full_buddy.keys() == cut_buddy.keys() and all(torch.equal(full_buddy[k], cut_buddy[k]) for k in full_buddy)
