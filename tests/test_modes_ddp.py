"""Early exits, network augmentation, teacher samples and frozen parameter groups under 2-process DDP: the recipe's losses and model (and the
samples, written half by each process) equal one process's."""

from __future__ import annotations

import sys

import pytest
import torch
from train_scripts.tiny_setup import tiny_overrides


FREEZE = {"train.freeze": "[embeddings,attention]"}
SAMPLES = {"data.mix": "[teacher_samples]", "teacher_samples.num_samples": 8, "teacher_samples.samples_per_shard": 2,
           "teacher_samples.batch_size": 2, "teacher_samples.max_new_tokens": 48}


@pytest.mark.slow
@pytest.mark.parametrize("mode", [{"netaug.alpha": 0.5, "netaug.width_ratios": "[0.5,1.0]"}, {"exits.layers": "[0]"}, SAMPLES,
                                  FREEZE], ids=["netaug", "exits", "teacher_samples", "freeze"])
def test_two_process_ddp_matches_one_process(tiny_folders, tmp_path, mode):
    from test_distributed import WRAPPER, _accelerate, _env, _free_port, _launch, _state, _train_records

    root, teacher, student = tiny_folders
    ddp = _accelerate("--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--main_process_port", str(_free_port()))
    runs = {}
    for name, launcher in (("single", [sys.executable]), ("ddp", ddp)):
        overrides = tiny_overrides(tmp_path / "runs", teacher, student, run_name=name, **{
            "train.max_steps": 4, "train.save_every": 0, "eval.max_blocks": 2, **mode})
        _launch([*launcher, str(WRAPPER), *overrides], _env(tmp_path, sharded=False), f"{name} run")
        run_dir = tmp_path / "runs" / name
        runs[name] = (_train_records(run_dir), _state(run_dir / "model"), sorted(p.name for p in (run_dir / "model").rglob("*")))
    (ref, ref_state, ref_files), (got, state, files) = runs["single"], runs["ddp"]
    extra = {"netaug.alpha": "loss/netaug", "exits.layers": "loss/exit0"}.get(next(iter(mode)), "loss/logits")
    if mode is SAMPLES:
        from minidistill.distill.teacher_samples import read_teacher_samples

        one, two = (read_teacher_samples(tmp_path / "runs" / name / "teacher_samples")["input_ids"] for name in ("single", "ddp"))
        assert len(one) == 8 and one == two
    assert ref[0]["loss"] != ref[-1]["loss"] and files == ref_files
    for a, b in zip(ref, got, strict=True):
        for key in ("loss", "loss/logits", extra):
            assert b[key] == pytest.approx(a[key], rel=5e-5, abs=1e-8), (a["step"], key)
    for k, v in ref_state.items():
        assert (state[k] - v).abs().max().item() <= 2e-5, k
    if mode is FREEZE:
        _assert_frozen_groups_kept(ref_state, student)


def _single_and_sharded(tiny_folders, tmp_path, config: str, mode: dict, read_extra):
    """The recipe on one process and on 2 processes under ``launch/<config>``: ``(train records, model state,
    read_extra(run_dir))`` of each."""
    from test_distributed import LAUNCH, WRAPPER, _accelerate, _env, _free_port, _launch, _state, _train_records

    root, teacher, student = tiny_folders
    sharded = _accelerate("--config_file", str(LAUNCH / config), "--num_processes", "2", "--main_process_port", str(_free_port()))
    runs = {}
    for name, launcher, env in (("single", [sys.executable], _env(tmp_path, sharded=False)),
                                ("sharded", sharded, _env(tmp_path, sharded=True))):
        overrides = tiny_overrides(tmp_path / "runs", teacher, student, run_name=name, **{
            "train.max_steps": 4, "train.save_every": 0, "eval.max_blocks": 2, **mode})
        _launch([*launcher, str(WRAPPER), *overrides], env, f"{name} run")
        run_dir = tmp_path / "runs" / name
        runs[name] = (_train_records(run_dir), _state(run_dir / "model"), read_extra(run_dir))
    return runs["single"], runs["sharded"]


def _saved_exits(run_dir) -> dict:
    from safetensors.torch import load_file

    path = run_dir / "model" / "exits" / "exits.safetensors"
    return load_file(path) if path.is_file() else {}


@pytest.mark.slow
@pytest.mark.parametrize("config", ["fsdp2.yaml", "zero3.yaml"], ids=["fsdp2", "zero3"])
@pytest.mark.parametrize("mode", [{"netaug.alpha": 0.5, "netaug.width_ratios": "[0.5,1.0]"}, {"exits.layers": "[0]"}],
                         ids=["netaug", "exits"])
def test_exits_and_netaug_under_sharded_launches_equal_one_process(tiny_folders, tmp_path, mode, config):
    """Under FSDP2 and ZeRO-3 (student and teacher sharded) the exit heads and the wider model's extra neurons are
    sharded with the student: losses, the saved model and the saved exits equal one process's."""
    (ref, ref_state, ref_exits), (got, state, exits) = _single_and_sharded(tiny_folders, tmp_path, config, mode, _saved_exits)
    extra = "loss/netaug" if "netaug.alpha" in mode else "loss/exit0"
    assert ref[0]["loss"] != ref[-1]["loss"] and ref_exits.keys() == exits.keys()
    assert bool(ref_exits) == ("exits.layers" in mode)  # the exit norms were saved (and only with exits)
    for a, b in zip(ref, got, strict=True):
        for key in ("loss", extra):
            assert b[key] == pytest.approx(a[key], rel=2e-4, abs=1e-8), (a["step"], key)
    for k, v in ref_state.items():
        assert (state[k] - v).abs().max().item() <= 1e-4, k
    for k, v in ref_exits.items():
        assert (exits[k] - v).abs().max().item() <= 1e-4, k


@pytest.mark.slow
@pytest.mark.parametrize("config, tolerance", [("fsdp2.yaml", {"loss": 5e-5, "weight": 2e-5}),
                                               ("zero3.yaml", {"loss": 2e-4, "weight": 1e-4})], ids=["fsdp2", "zero3"])
def test_teacher_samples_under_sharded_launches_equal_one_process(tiny_folders, tmp_path, config, tolerance):
    """The samples are generated before the teacher is sharded: each process writes its shards with the whole
    teacher, and the sharded run trains on the same documents as one process."""
    from minidistill.distill.teacher_samples import read_teacher_samples

    (ref, ref_state, ref_samples), (got, state, samples) = _single_and_sharded(
        tiny_folders, tmp_path, config, SAMPLES, lambda run_dir: read_teacher_samples(run_dir / "teacher_samples"))
    assert len(ref_samples["input_ids"]) == 8 and samples["input_ids"] == ref_samples["input_ids"]
    assert ref[0]["loss"] != ref[-1]["loss"]
    for a, b in zip(ref, got, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=tolerance["loss"], abs=1e-8), a["step"]
    for k, v in ref_state.items():
        assert (state[k] - v).abs().max().item() <= tolerance["weight"], k


def _assert_frozen_groups_kept(state: dict, student_dir) -> None:
    """The embeddings and attention weights of ``state`` are the initial student's; every other weight moved."""
    from test_distributed import _state

    initial = _state(student_dir)
    for k, v in state.items():
        frozen = k.startswith(("model.embed_tokens.", "lm_head.")) or ".self_attn." in k
        assert torch.equal(v, initial[k]) == frozen, k


@pytest.mark.slow
@pytest.mark.parametrize("config", ["fsdp2.yaml", "zero3.yaml"], ids=["fsdp2", "zero3"])
def test_frozen_groups_under_sharded_launches_equal_one_process(tiny_folders, tmp_path, config):
    """train.freeze under FSDP2 and ZeRO-3 (DDP: the test above): losses and the saved model equal one process's,
    and the frozen weights (embeddings and attention) are the initial student's."""
    (ref, ref_state, _), (got, state, _) = _single_and_sharded(tiny_folders, tmp_path, config, FREEZE, lambda run_dir: None)
    assert ref[0]["loss"] != ref[-1]["loss"]
    for a, b in zip(ref, got, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=2e-4, abs=1e-8), a["step"]
    for k, v in ref_state.items():
        assert (state[k] - v).abs().max().item() <= 1e-4, k
    _assert_frozen_groups_kept(ref_state, tiny_folders[2])
