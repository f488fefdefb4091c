"""Bad-input catalogue, state part: damaged checkpoints, a SIGKILL while a checkpoint is written, bad prune maps.

Every case runs ``recipes/prune_distill.py`` as a subprocess on the tiny teacher / student of
``tests/train_scripts/tiny_setup.py`` and checks the exit code, that the message names the problem,
that no traceback is printed, and that no file outside the case's own output changed.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from train_scripts.tiny_setup import make_student_dir, make_teacher_dir, tiny_overrides
from transformers import AutoModelForCausalLM

from minidistill.errors import EXIT_CODES
from minidistill.models import state_dict_sha256

REPO = Path(__file__).resolve().parent.parent
RECIPE = REPO / "recipes" / "prune_distill.py"
TRACEBACK = "Traceback (most recent call last)"
CHECKPOINT_EXIT = EXIT_CODES["CheckpointError"][0]
PRUNE_MAP_EXIT = EXIT_CODES["PruneMapError"][0]
STEP = "step-{:08d}".format

# The recipe with write_manifest patched to SIGKILL the process on its second call: the files of the
# step-4 checkpoint are written and fsynced, its manifest is not.
KILL_IN_CHECKPOINT = """
import os, runpy, signal, sys
import torch
torch.set_num_threads(1)
from minidistill.training import checkpoint as ckpt
real, calls = ckpt.write_manifest, []
def dying(folder, **kw):
    calls.append(folder)
    if len(calls) == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    return real(folder, **kw)
ckpt.write_manifest = dying
sys.argv = [sys.argv[1], *sys.argv[2:]]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def _env() -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _run(args: list[str], *, code: str | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-c", code, str(RECIPE), *args] if code else [sys.executable, str(RECIPE), *args]
    return subprocess.run(cmd, env=_env(), cwd=REPO, capture_output=True, text=True, timeout=600)


def _run_forked(folder: Path, jobs: dict[str, list[str]]) -> dict[str, subprocess.CompletedProcess]:
    """Run the recipe once per job as a child forked after the heavy imports (tests/bad_input/runner.py)."""
    folder.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in _env().items() if k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TOKENIZERS_PARALLELISM")}
    spec = [{"name": name, "script": str(RECIPE), "argv": argv, "cwd": str(REPO), "env": env,
             "stdout": str(folder / f"{name}.out"), "stderr": str(folder / f"{name}.err")} for name, argv in jobs.items()]
    (folder / "jobs.json").write_text(json.dumps(spec))
    runner = subprocess.run([sys.executable, str(REPO / "tests" / "bad_input" / "runner.py"), str(folder / "jobs.json"),
                             str(folder / "results.json")], env=_env(), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert runner.returncode == 0, runner.stderr[-3000:]
    codes = json.loads((folder / "results.json").read_text())
    return {name: subprocess.CompletedProcess(name, codes[name], (folder / f"{name}.out").read_text(),
                                              (folder / f"{name}.err").read_text()) for name in jobs}


def _digest(root: Path, *, skip: tuple[Path, ...] = ()) -> dict[str, str]:
    """sha256 of every file under ``root`` except under ``skip``."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and not any(p.is_relative_to(s) for s in skip):
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _failed(proc: subprocess.CompletedProcess, code: int, *texts: str) -> str:
    out = proc.stdout + proc.stderr
    assert proc.returncode == code, f"exit {proc.returncode}, expected {code}:\n{out[-3000:]}"
    assert TRACEBACK not in out, out[-3000:]
    error_lines = [line for line in proc.stderr.splitlines() if line.startswith("error [")]
    assert len(error_lines) == 1, proc.stderr[-3000:]
    for t in texts:
        assert t in error_lines[0], error_lines[0]
    return error_lines[0]


def _curve(run: Path):
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    train = [(r["step"], r["loss"], r["loss/logits"], r["loss/hidden"], r["lr"]) for r in records if r["kind"] == "train"]
    evals = [(r["step"], r["heldout_loss"], r["top1_agreement"]) for r in records if r["kind"] == "eval"]
    return train, evals


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("state")
    teacher = make_teacher_dir(root / "teacher")
    return root, teacher, make_student_dir(teacher, root / "student")


# ---------------------------------------------------------------------------------------------- checkpoints


@pytest.mark.slow
def test_checkpoint_faults(tiny):
    """Uninterrupted run; SIGKILL inside a checkpoint write then --resume; damaged checkpoints (all, latest)."""
    root, teacher, student = tiny
    runs = root / "runs"
    common = tiny_overrides(runs, teacher, student, **{"train.max_steps": 10, "train.save_every": 2, "train.keep_last": 5,
                                                       "loss.hidden.weight": 1.0, "eval.every": 4})
    full = _run([*common, "run_name=full"])
    assert full.returncode == 0, full.stderr[-3000:]
    reference = _curve(runs / "full")
    assert [s for s, *_ in reference[0]] == list(range(1, 11))
    inputs = _digest(root, skip=(runs,))

    # SIGKILL while step 4 is being written: step 2 survives, step 4 is a .tmp folder; --resume continues exactly.
    killed = _run([*common, "run_name=cut"], code=KILL_IN_CHECKPOINT)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    ckpts = runs / "cut" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == [".tmp-step-00000004", STEP(2)]
    assert not (runs / "cut" / "model").exists()
    resumed = _run([*common, "run_name=cut", "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert TRACEBACK not in resumed.stderr and "resumed from" in resumed.stderr
    assert _curve(runs / "cut") == reference
    assert sorted(p.name for p in ckpts.iterdir()) == [STEP(s) for s in (2, 4, 6, 8, 10)]

    # Every checkpoint damaged in another way: one error naming each folder and its problem; nothing changed.
    dmg = runs / "dmg_all"
    shutil.copytree(runs / "full", dmg)
    shutil.rmtree(dmg / "model")
    c = dmg / "checkpoints"
    (c / STEP(2) / "rng_state_0.json").unlink()
    state = (c / STEP(4) / "trainer_state.json").read_bytes()
    (c / STEP(4) / "trainer_state.json").write_bytes(state[: len(state) // 2])
    (c / STEP(6) / "trainer_state.json").write_bytes(b"")
    (c / STEP(8) / "model.safetensors").unlink()
    weights = bytearray((c / STEP(10) / "model.safetensors").read_bytes())
    weights[-3] ^= 0xFF
    (c / STEP(10) / "model.safetensors").write_bytes(bytes(weights))
    before = _digest(root, skip=(runs / "cut", runs / "full"))
    proc = _run([*common, "run_name=dmg_all", "--resume"])
    line = _failed(
        proc, CHECKPOINT_EXIT, f"no complete checkpoint under {c}",
        f"{STEP(2)}: rng_state_0.json is missing", f"{STEP(4)}: trainer_state.json has {len(state) // 2} bytes",
        f"{STEP(6)}: trainer_state.json has 0 bytes", f"{STEP(8)}: model.safetensors is missing",
        f"{STEP(10)}: model.safetensors does not match its sha256", "--resume PATH",
    )
    assert "--num_processes" not in line
    assert _digest(root, skip=(runs / "cut", runs / "full")) == before
    # --resume PATH of a damaged checkpoint is refused, never replaced by another one.
    proc = _run([*common, "run_name=dmg_all", "--resume", str(c / STEP(8))])
    _failed(proc, CHECKPOINT_EXIT, f"{c / STEP(8)} is not a complete checkpoint: model.safetensors is missing")
    assert _digest(root, skip=(runs / "cut", runs / "full")) == before

    # The latest two damaged: a warning names them, the run resumes from step 6 and matches the reference.
    latest = runs / "dmg_latest"
    shutil.copytree(runs / "full", latest)
    shutil.rmtree(latest / "model")
    (latest / "checkpoints" / STEP(10) / "trainer_state.json").write_text('{"step": 1')
    (latest / "checkpoints" / STEP(8) / "rng_state_0.safetensors").unlink()
    proc = _run([*common, "run_name=dmg_latest", "--resume"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert TRACEBACK not in proc.stdout + proc.stderr
    warnings = [line for line in proc.stderr.splitlines() if "is damaged" in line]
    assert any(STEP(10) in w and "trainer_state.json has 10 bytes" in w for w in warnings), proc.stderr[-3000:]
    assert any(STEP(8) in w and "rng_state_0.safetensors is missing" in w for w in warnings), proc.stderr[-3000:]
    assert "previous complete one, step-00000006" in proc.stderr
    assert _curve(latest) == reference
    assert _digest(root, skip=(runs,)) == inputs  # the teacher and student folders were never written


# ---------------------------------------------------------------------------------------------- prune maps


def _map_case(student: Path, kind: str, teacher: Path, other_teacher: Path) -> tuple[Path, list[str]]:
    """Damage ``student``'s prune map (or config) in one way; returns the teacher to use and what the error names."""
    path = student / "prune_map.json"
    data = json.loads(path.read_text())
    use = teacher
    if kind == "hash":  # a map recording its teacher's hash, used with another teacher of the same shape
        t = AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32)
        data["teacher"]["sha256"] = state_dict_sha256(t)
        use, expect = other_teacher, ["was made from another teacher", data["teacher"]["sha256"][:12]]
    elif kind == "other_teacher":  # no hash recorded: the student's weights are not the other teacher's slices
        use, expect = other_teacher, ["not the teacher slices the map names"]
    elif kind == "out_of_range":
        data["kept_layers"] = [0, 3]
        expect = ["kept_layers has indices outside [0, 3): [3]"]
    elif kind == "unsorted":
        data["kept_layers"] = [2, 0]
        expect = ["kept_layers must be sorted ascending"]
    elif kind == "duplicate":
        data["kept_layers"] = [2, 2]
        expect = ["kept_layers repeats the indices [2]"]
    elif kind == "edited":  # valid indices, but not the layers the student was cut from
        data["kept_layers"] = [1, 2]
        expect = ["not the teacher slices the map names"]
    elif kind == "shape":
        config = json.loads((student / "config.json").read_text())
        (student / "config.json").write_text(json.dumps({**config, "intermediate_size": 80}))
        expect = ["student_shape contradicts", "intermediate_size: map 64, config 80"]
    elif kind == "parse":
        path.write_text(path.read_text()[:40])
        return use, [f"{path} is not valid JSON"]
    else:
        raise AssertionError(kind)
    path.write_text(json.dumps(data))
    return use, [str(path), *expect]


MAP_CASES = ["hash", "other_teacher", "out_of_range", "unsorted", "duplicate", "edited", "shape", "parse"]


def test_bad_prune_maps_are_refused_before_any_work(tiny):
    """Each kind of bad map, each as its own process (forked after one import of torch / transformers)."""
    root, teacher, _ = tiny
    other = make_teacher_dir(root / "other_teacher", seed=1)
    cases = {}
    for kind in MAP_CASES:
        case = root / "maps" / kind
        student = make_student_dir(teacher, case / "student")
        use, expect = _map_case(student, kind, teacher, other)
        cases[kind] = (case, tiny_overrides(case / "runs", use, student, **{"loss.hidden.weight": 1.0}), expect)
    before = _digest(root, skip=(root / "jobs", *(case / "runs" for case, _, _ in cases.values())))
    procs = _run_forked(root / "jobs", {kind: args for kind, (_, args, _) in cases.items()})
    for kind, (case, _, expect) in cases.items():
        _failed(procs[kind], PRUNE_MAP_EXIT, *expect)
        assert not list((case / "runs").rglob("*.safetensors")), kind  # no student or checkpoint was written
    assert _digest(root, skip=(root / "jobs", *(case / "runs" for case, _, _ in cases.values()))) == before
