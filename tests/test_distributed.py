"""Real multi-process runs of the recipe on CPU: DDP, FSDP2, DeepSpeed ZeRO-2/3 and a two-machine launch.

Every run distills the same tiny tied-embedding student (logit + hidden-state + attention losses) for a
few steps on the same global batches; each must reproduce the single-process run step by step, save a
final model that ``from_pretrained`` reloads equal to the single-process one, and (FSDP2, ZeRO-3) hold
only its shard of the teacher. Further: ``loss.balance: auto`` gives the same losses and weights in one
process, 2-process DDP and with gradient accumulation; calibration statistics summed over 2 ranks equal
one process's (``dist_scripts/prune_calibration.py``); the recipe prunes under DDP to the one-process student.

Why the CPU patch: accelerate runs CPU multi-process jobs as MULTI_CPU and then enables neither FSDP
nor DeepSpeed (DeepSpeed even starts every process as rank 0 of 1). The FSDP2 / DeepSpeed runs
therefore launch ``dist_scripts/run_recipe.py`` with ``MINIDISTILL_TEST_CPU_SHARDING=1``, which calls
:func:`minidistill.training.placement.enable_cpu_sharding_for_tests` (MULTI_GPU over gloo on the CPU device)
before the recipe starts. DDP and the two-machine run need no patch.

Tolerances, all float32 (loss components relative, weights absolute):
* DDP / FSDP2: 5e-5 on losses, 2e-5 on weights. Gradients are all-reduced (summed in another order
  than one process's batch reduction), so only rounding differs (~1e-7). Adam's first steps normalise
  every gradient element, so that rounding grows step by step; by step 4 the smallest component (the
  logit loss, ~6e-3) differs by up to ~1e-5 relative. A wrong data split or a gradient summed instead
  of averaged changes step 2 by more than 1e-2.
* DeepSpeed ZeRO-2/3: 2e-4 on losses, 1e-4 on weights. ZeRO flattens gradients into buckets,
  reduce-scatters and averages them in its own order and steps the optimizer on flat partitions, so
  rounding differs more.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
WRAPPER = ROOT / "tests" / "dist_scripts" / "run_recipe.py"
LAUNCH = ROOT / "launch"
STEPS = 4
TIMEOUT_S = 420

TIGHT = {"loss_rtol": 5e-5, "weight_atol": 2e-5}
ZERO = {"loss_rtol": 2e-4, "weight_atol": 1e-4}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A tiny tied-embedding teacher and a student pruned from it (with its prune map)."""
    from train_scripts.tiny_setup import make_student_dir, make_teacher_dir

    root = tmp_path_factory.mktemp("dist")
    teacher = make_teacher_dir(root / "teacher", tie=True)
    student = make_student_dir(teacher, root / "student")
    return root, teacher, student


def _overrides(root: Path, teacher: Path, student: Path, run_name: str) -> list[str]:
    from train_scripts.tiny_setup import tiny_overrides

    return tiny_overrides(
        root / "runs",
        teacher,
        student,
        run_name=run_name,
        **{
            "train.max_steps": STEPS,
            "train.save_every": 0,
            "loss.hidden.weight": 1.0,
            "loss.attention.weight": 0.5,
        },
    )


def _env(root: Path, *, sharded: bool, placement: Path | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        OMP_NUM_THREADS="1",
        TORCH_EXTENSIONS_DIR=str(root / "torch_extensions"),
        PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]),
    )
    env.pop("MINIDISTILL_TEST_CPU_SHARDING", None)
    env.pop("ACCELERATE_USE_CPU", None)
    if sharded:
        env["MINIDISTILL_TEST_CPU_SHARDING"] = "1"
        env["DS_ACCELERATOR"] = "cpu"
    else:
        env["ACCELERATE_USE_CPU"] = "true"
    if placement is not None:
        env["MINIDISTILL_TEST_PLACEMENT_DIR"] = str(placement)
    return env


def _check(proc: subprocess.CompletedProcess | subprocess.Popen, output: str, what: str) -> None:
    if proc.returncode != 0:
        pytest.fail(f"{what} exited with {proc.returncode}; last output:\n{output[-6000:]}")


def _launch(args: list[str], env: dict[str, str], what: str) -> None:
    proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    _check(proc, proc.stdout + proc.stderr, what)


def _start(log_path: Path, command: list[str], env: dict[str, str]) -> tuple[subprocess.Popen, Path]:
    with open(log_path, "w") as log:
        return subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT), log_path


def _wait_all(procs: list[tuple[subprocess.Popen, Path]]) -> None:
    """Wait for every machine's launcher; on a timeout kill them all."""
    try:
        for proc, _ in procs:
            proc.wait(timeout=TIMEOUT_S)
    finally:
        for proc, _ in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for machine_rank, (proc, log_path) in enumerate(procs):
        _check(proc, log_path.read_text(), f"machine {machine_rank}")


def _accelerate(*flags: str) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", *flags, "--mixed_precision", "no", "--dynamo_backend", "no"]


def _train_records(run_dir: Path) -> list[dict]:
    lines = (run_dir / "log.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines if line.strip()]
    return [r for r in records if r.get("kind") == "train"]


def _state(model_dir: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def reference(folders):
    """The single-process run (plain ``python``, no launcher): per-step losses and final weights."""
    root, teacher, student = folders
    _launch([sys.executable, str(WRAPPER), *_overrides(root, teacher, student, "single")], _env(root, sharded=False), "single run")
    run_dir = root / "runs" / "single"
    return _train_records(run_dir), _state(run_dir / "model")


def _assert_matches(reference, run_dir: Path, *, loss_rtol: float, weight_atol: float) -> None:
    ref_records, ref_state = reference
    records = _train_records(run_dir)
    assert [r["step"] for r in records] == [r["step"] for r in ref_records] == list(range(1, STEPS + 1))
    for ref, got in zip(ref_records, records):
        for key in ("loss", "loss/logits", "loss/hidden", "loss/attention"):
            assert got[key] == pytest.approx(ref[key], rel=loss_rtol, abs=1e-8), f"step {ref['step']} {key}"
    # The run must have moved the weights, or the weight comparison below proves nothing.
    assert ref_records[0]["loss"] != ref_records[-1]["loss"]
    state = _state(run_dir / "model")
    assert state.keys() == ref_state.keys()
    for name, ref in ref_state.items():
        diff = (state[name] - ref).abs().max().item()
        assert diff <= weight_atol, f"{name}: max |diff| {diff:.3g} > {weight_atol}"


def _assert_teacher_placement(placement: Path, *, sharded: bool) -> None:
    ranks = [json.loads((placement / f"rank{r}.json").read_text()) for r in range(2)]
    full = ranks[0]["full_numel"]
    local = [r["local_numel"] for r in ranks]
    if sharded:
        # Each rank stores about half; shards may be padded to equal sizes, and ZeRO-3 keeps parameters
        # under its persistence threshold (norm weights) whole on every rank.
        for n in local:
            assert 0.45 * full <= n <= 0.6 * full, f"local teacher numel {local} of {full}"
    else:
        assert local == [full, full]


def _sharded_run(folders, reference, name: str, config: str, tolerance: dict, *, teacher_sharded: bool) -> None:
    root, teacher, student = folders
    placement = root / f"placement-{name}"
    args = _accelerate("--config_file", str(LAUNCH / config), "--num_processes", "2", "--main_process_port", str(_free_port()))
    _launch(
        [*args, str(WRAPPER), *_overrides(root, teacher, student, name)],
        _env(root, sharded=True, placement=placement),
        f"{name} run",
    )
    _assert_teacher_placement(placement, sharded=teacher_sharded)
    _assert_matches(reference, root / "runs" / name, **tolerance)


def test_ddp_two_processes_match_single_process(folders, reference):
    root, teacher, student = folders
    placement = root / "placement-ddp"
    args = _accelerate("--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--main_process_port", str(_free_port()))
    _launch([*args, str(WRAPPER), *_overrides(root, teacher, student, "ddp")], _env(root, sharded=False, placement=placement), "ddp run")
    _assert_teacher_placement(placement, sharded=False)
    _assert_matches(reference, root / "runs" / "ddp", **TIGHT)


def test_fsdp2_matches_single_process_and_shards_teacher(folders, reference):
    _sharded_run(folders, reference, "fsdp2", "fsdp2.yaml", TIGHT, teacher_sharded=True)


def test_zero3_matches_single_process_and_shards_teacher(folders, reference):
    _sharded_run(folders, reference, "zero3", "zero3.yaml", ZERO, teacher_sharded=True)


def test_zero2_matches_single_process_with_teacher_replica(folders, reference):
    _sharded_run(folders, reference, "zero2", "zero2.yaml", ZERO, teacher_sharded=False)


def test_two_machines_on_one_host_match_single_process(folders, reference):
    """Two ``accelerate launch`` processes as machine 0 and 1 of a 2-machine job (one process each)."""
    root, teacher, student = folders
    port = str(_free_port())
    env = _env(root, sharded=False)
    procs = []
    for machine_rank in (0, 1):
        args = _accelerate(
            "--multi_gpu", "--num_processes", "2", "--num_machines", "2", "--machine_rank", str(machine_rank),
            "--main_process_ip", "127.0.0.1", "--main_process_port", port,
        )
        command = [*args, str(WRAPPER), *_overrides(root, teacher, student, "multinode")]
        procs.append(_start(root / f"multinode-{machine_rank}.log", command, env))
    _wait_all(procs)
    _assert_matches(reference, root / "runs" / "multinode", **TIGHT)


# ---------------------------------------------------------------------------------------------- parallel alone

TINY = ROOT / "tests" / "dist_scripts" / "tiny_distill.py"


@pytest.fixture(scope="module")
def tiny_reference(folders):
    """tiny_distill.py in one process: per-step losses and final weights of minidistill.training.placement alone."""
    root = folders[0]
    out = root / "tiny-single"
    _launch([sys.executable, str(TINY), str(out)], _env(root, sharded=False), "tiny single run")
    return json.loads((out / "result.json").read_text()), _state(out / "model")


def _assert_tiny_matches(tiny_reference, out: Path, *, loss_rtol: float, weight_atol: float) -> dict:
    ref, ref_state = tiny_reference
    got = json.loads((out / "result.json").read_text())
    assert got["num_processes"] == 2
    assert got["losses"] == pytest.approx(ref["losses"], rel=loss_rtol)
    state = _state(out / "model")
    assert state.keys() == ref_state.keys()
    for name, value in ref_state.items():
        assert (state[name] - value).abs().max().item() <= weight_atol, name
    return got


def test_parallel_alone_fsdp2_shards_teacher_and_matches(folders, tiny_reference):
    root = folders[0]
    out = root / "tiny-fsdp2"
    args = _accelerate("--config_file", str(LAUNCH / "fsdp2.yaml"), "--num_processes", "2", "--main_process_port", str(_free_port()))
    _launch([*args, str(TINY), str(out)], _env(root, sharded=True), "tiny fsdp2 run")
    got = _assert_tiny_matches(tiny_reference, out, **TIGHT)
    assert got["kind"] == "fsdp2"
    assert got["teacher_local_numel"] == [got["teacher_numel"] // 2] * 2  # even split (no padding at these sizes)


def test_parallel_alone_zero3_on_two_machines_with_multinode_config(folders, tiny_reference):
    """launch/multinode_zero3.yaml with the hostfile flags of deepspeed_multinode.sh, one process per machine."""
    root = folders[0]
    out = root / "tiny-zero3-2machines"
    hostfile = root / "hostfile"
    hostfile.write_text("127.0.0.1 slots=1\nlocalhost slots=1\n")
    port, env = str(_free_port()), _env(root, sharded=True)
    procs = []
    for machine_rank in (0, 1):
        args = _accelerate(
            "--config_file", str(LAUNCH / "multinode_zero3.yaml"), "--deepspeed_hostfile", str(hostfile),
            "--deepspeed_multinode_launcher", "standard", "--num_machines", "2", "--num_processes", "2",
            "--machine_rank", str(machine_rank), "--main_process_ip", "127.0.0.1", "--main_process_port", port,
        )
        procs.append(_start(root / f"tiny-zero3-{machine_rank}.log", [*args, str(TINY), str(out)], env))
    _wait_all(procs)
    got = _assert_tiny_matches(tiny_reference, out, **ZERO)
    assert (got["kind"], got["zero_stage"]) == ("deepspeed", 3)
    for n in got["teacher_local_numel"]:  # norms stay whole (ZeRO-3 persistence threshold)
        assert 0.45 * got["teacher_numel"] <= n <= 0.6 * got["teacher_numel"]


# ---------------------------------------------------------------------------------------------- balance: auto

def _auto_run(folders, name: str, *, processes: int, accum: int = 1) -> list[dict]:
    root, teacher, student = folders
    overrides = [*_overrides(root, teacher, student, name), "loss.balance=auto", f"train.grad_accum_steps={accum}"]
    if processes == 1:
        command = [sys.executable, str(WRAPPER), *overrides]
    else:
        flags = ("--multi_gpu", "--num_processes", str(processes), "--num_machines", "1", "--main_process_port", str(_free_port()))
        command = [*_accelerate(*flags), str(WRAPPER), *overrides]
    _launch(command, _env(root, sharded=False), f"{name} run")
    return _train_records(root / "runs" / name)


def test_auto_balance_same_losses_and_weights_for_one_process_ddp_and_accumulation(folders):
    """balance: auto measures magnitudes per optimizer step over all micro-batches and ranks (TIGHT tolerance)."""
    single = _auto_run(folders, "auto-single", processes=1)
    ddp = _auto_run(folders, "auto-ddp", processes=2)
    accum = _auto_run(folders, "auto-accum", processes=1, accum=2)
    keys = ("loss", "loss/logits", "loss/hidden", "loss/attention", "weight/hidden", "weight/attention")
    assert [r["step"] for r in single] == list(range(1, STEPS + 1))
    for other in (ddp, accum):
        assert [r["step"] for r in other] == [r["step"] for r in single]
        for ref, got in zip(single, other):
            for key in keys:
                assert got[key] == pytest.approx(ref[key], rel=TIGHT["loss_rtol"], abs=1e-8), f"step {ref['step']} {key}"
    # The weights did follow the magnitudes (else the comparison only re-tests fixed weights).
    assert single[0]["weight/hidden"] == 1.0 and single[1]["weight/hidden"] != pytest.approx(1.0, rel=1e-3)


# ---------------------------------------------------------------------------------------------- distributed calibration

PRUNE_CALIBRATION = ROOT / "tests" / "dist_scripts" / "prune_calibration.py"
STATS_RTOL = 1e-5
"""Relative to each tensor's largest entry. The ranks' forwards batch other sequences together than one
process does (float32 rounding of the per-sequence values, ~1e-7 relative, seen up to 6e-7 on the Grams);
a rank's statistics not summed over the ranks would be off by ~0.5."""


def test_two_process_calibration_equals_one_process(folders):
    """Activation sums, Grams, Taylor gradients and layer statistics summed over 2 gloo ranks = 1 process on all blocks."""
    from safetensors.torch import load_file

    root = folders[0]
    one, two = root / "calib-1", root / "calib-2"
    _launch([sys.executable, str(PRUNE_CALIBRATION), str(one)], _env(root, sharded=False), "one-process calibration")
    flags = ("--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--main_process_port", str(_free_port()))
    _launch([*_accelerate(*flags), str(PRUNE_CALIBRATION), str(two)], _env(root, sharded=False), "two-process calibration")
    ref, got = load_file(str(one / "stats.safetensors")), load_file(str(two / "stats.safetensors"))
    assert ref.keys() == got.keys()
    assert {k.split(".")[0] for k in ref} == {"activation", "similarity", "gram", "taylor", "taylor_similarity"}
    for name, value in ref.items():
        scale = value.abs().max().clamp_min(1e-30)
        assert ((got[name] - value).abs().max() / scale).item() <= STATS_RTOL, name
    assert got["similarity.layer_tokens"].item() == 10 * 48
    single = json.loads((one / "rank0.json").read_text())
    ranks = [json.loads((two / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["world"] for r in ranks] == [2, 2] and single["world"] == 1
    # The same prune map everywhere, the same student on both ranks; only rank 0 saved it.
    assert ranks[0]["prune_map"] == ranks[1]["prune_map"] == single["prune_map"]
    assert single["prune_map"]["kept_layers"] != [0, 1, 2]
    assert ranks[0]["student_sha256"] == ranks[1]["student_sha256"]
    assert [r["saved"] for r in ranks] == [True, False]
    ref_state, state = _state(one / "student"), _state(two / "student")
    for name, value in ref_state.items():
        assert (state[name] - value).abs().max().item() <= 1e-5, name
    # Budget searches: each rank scores its half of the scoring batches and the sums are all-reduced, so every
    # rank sees the one-process scores, picks the same student, and runs fewer decoder-layer rows than one process.
    for score in ("loss", "kl"):
        want, got = single[f"search_{score}"], [r[f"search_{score}"] for r in ranks]
        assert got[0]["prune_map"] == got[1]["prune_map"] == want["prune_map"]
        assert got[0]["student_sha256"] == got[1]["student_sha256"]
        assert got[0]["candidates"] == got[1]["candidates"]
        assert [c["rank"] for c in got[0]["candidates"]] == [c["rank"] for c in want["candidates"]]
        for a, b in zip(got[0]["candidates"], want["candidates"], strict=True):
            # Zero-shot scores agree to float32 rounding; the scores after the short distillation to 1e-4 (two
            # AdamW steps amplify the ~1e-7 differences of the calibration sums, seen 4e-5 on a KL of 4e-4).
            # A rank scoring only its own half of the batches would be off by percents.
            floats = {k for k, v in b.items() if isinstance(v, float)}
            assert {k: a[k] for k in floats - {"distilled_kl", "distilled_loss"}} == pytest.approx(
                {k: b[k] for k in floats - {"distilled_kl", "distilled_loss"}}, rel=1e-5), a
            assert {k: a[k] for k in floats} == pytest.approx({k: b[k] for k in floats}, rel=1e-4), a
        assert all(g["layer_rows"] < want["layer_rows"] for g in got), (score, want["layer_rows"], [g["layer_rows"] for g in got])


def test_recipe_prunes_on_every_rank_and_matches_single_process(folders):
    """student=null under 2-process DDP: the calibration is split over both ranks, rank 0 saves student_init,
    and the pruned student, its map and the training losses match the one-process run."""
    root, teacher, student = folders
    prune = ["student=null", "prune.target.num_layers=2", "prune.target.intermediate_size=64",
             "prune.target.num_heads=2", "prune.calib_blocks=8", "prune.show_progress=false",
             "prune.reconstruction.mode=teacher", "prune.layer_method=contiguous"]

    def run(name: str, processes: int) -> Path:
        overrides = [o for o in _overrides(root, teacher, student, name) if not o.startswith("student.source=")]
        env = {**_env(root, sharded=False), "MINIDISTILL_CACHE": str(root / f"cache-{name}")}
        command = [sys.executable, str(WRAPPER), *overrides, *prune]
        if processes > 1:
            flags = ("--multi_gpu", "--num_processes", str(processes), "--num_machines", "1", "--main_process_port", str(_free_port()))
            command = [*_accelerate(*flags), str(WRAPPER), *overrides, *prune]
        _launch(command, env, f"{name} run")
        return root / "runs" / name

    single, ddp = run("prune-single", 1), run("prune-ddp", 2)
    from minidistill.prune.prune_map import PruneMap

    ref_map, got_map = PruneMap.load(single / "student_init").to_dict(), PruneMap.load(ddp / "student_init").to_dict()
    assert got_map == ref_map and ref_map["refit"]
    ref_state, state = _state(single / "student_init"), _state(ddp / "student_init")
    for name, value in ref_state.items():
        assert (state[name] - value).abs().max().item() <= 1e-5, name
    for ref, got in zip(_train_records(single), _train_records(ddp)):
        assert got["loss"] == pytest.approx(ref["loss"], rel=TIGHT["loss_rtol"]), ref["step"]
