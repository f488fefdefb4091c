"""Pruning at scale: ``prune.device``, the process-group timeout, and a prune restarted from the importance cache."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_model
from test_prune_pipeline import prune_cfg, tiny_data

from minidistill.config import ConfigError
from minidistill.models import state_dict_sha256
from minidistill.prune.pipeline import PruneConfig, prune_model, resolve_prune_device

SHAPE = {"params": None, "num_layers": 2, "num_heads": 2, "intermediate_size": 64}


# ---------------------------------------------------------------------------------------------- prune.device


@pytest.mark.parametrize("bad", ["gpu", "cuda:x", "", "tpu0"])
def test_prune_device_that_is_not_a_device_is_a_config_error(bad):
    with pytest.raises(ConfigError, match=r"prune\.device=.*is not a device: use auto, cpu"):
        PruneConfig.from_dict({"device": bad})


def test_prune_device_resolution():
    assert resolve_prune_device("cpu") == torch.device("cpu")
    assert resolve_prune_device("auto", "cpu") == torch.device("cpu")
    assert resolve_prune_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    with pytest.raises(ConfigError, match=rf"prune\.device='cuda:{count}': this machine has {count} CUDA device"):
        resolve_prune_device(f"cuda:{count}")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_prune_on_a_missing_cuda_device_fails_before_calibration():
    teacher = tiny_model("llama", num_layers=3)
    with pytest.raises(ConfigError, match=r"prune\.device='cuda': this machine has 0 CUDA device"):
        prune_model(teacher, None, tiny_data(), prune_cfg(target=SHAPE, device="cuda"), teacher_source="t")


def test_prune_on_cpu_gives_the_auto_student_and_leaves_the_teacher_alone():
    teacher = tiny_model("llama", num_layers=3)
    before = state_dict_sha256(teacher)
    results = [prune_model(teacher, None, tiny_data(), prune_cfg(target=SHAPE, device=d), teacher_source="t", device="cpu")
               for d in ("auto", "cpu")]
    assert state_dict_sha256(teacher) == before
    assert results[0].prune_map.to_dict() == results[1].prune_map.to_dict()
    assert state_dict_sha256(results[0].student) == state_dict_sha256(results[1].student)
    assert next(results[1].student.parameters()).device == torch.device("cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_prune_on_cuda_matches_cpu_and_returns_to_the_teacher_device():
    teacher = tiny_model("llama", num_layers=3)
    cfg = {"target": SHAPE, "reconstruction": {"enabled": True, "mode": "teacher"}}
    on_cpu = prune_model(teacher, None, tiny_data(), prune_cfg(**cfg, device="cpu"), teacher_source="t")
    on_gpu = prune_model(teacher, None, tiny_data(), prune_cfg(**cfg, device="cuda"), teacher_source="t")
    assert next(teacher.parameters()).device.type == "cpu"
    assert next(on_gpu.student.parameters()).device.type == "cpu"
    assert on_cpu.prune_map.to_dict()["layers"] == on_gpu.prune_map.to_dict()["layers"]
    ref = on_cpu.student.state_dict()
    for name, value in on_gpu.student.state_dict().items():
        torch.testing.assert_close(value, ref[name], rtol=1e-4, atol=1e-5)


def _recipe_cfg(tmp_path, *extra):
    from train_scripts.tiny_setup import tiny_overrides

    from minidistill.recipe_config import load_recipe_config

    overrides = [o for o in tiny_overrides(tmp_path / "runs", tmp_path / "teacher", "x") if not o.startswith("student.source=")]
    return load_recipe_config(None, [*overrides, "student=null", "prune.target.num_layers=2", *extra])


def test_a_saved_student_from_another_prune_device_is_this_runs_own(tmp_path):
    """The run folder's student_init saved with prune.device=cpu is accepted by a run with prune.device=auto."""
    from minidistill.train import _own_student_init, check_outputs_and_inputs, student_init_dir

    saved = _recipe_cfg(tmp_path, "prune.device=cpu")
    init_dir = student_init_dir(saved)
    init_dir.mkdir(parents=True)
    prune_config = saved.prune.replace(output_dir=str(init_dir), overwrite=True).to_dict()
    assert prune_config["device"] == "cpu"
    (init_dir / "prune_config.json").write_text(json.dumps(prune_config))
    (init_dir / "prune_map.json").write_text(json.dumps({"teacher": {"source": saved.teacher.source}}))
    rerun = _recipe_cfg(tmp_path)
    assert rerun.prune.device == "auto"
    assert _own_student_init(rerun, init_dir)
    check_outputs_and_inputs(rerun, None)  # not refused
    # A folder written before prune.device existed (no such key) is accepted too ...
    del prune_config["device"]
    (init_dir / "prune_config.json").write_text(json.dumps(prune_config))
    assert _own_student_init(rerun, init_dir)
    # ... while a setting that changes the student still refuses the folder.
    assert not _own_student_init(_recipe_cfg(tmp_path, "prune.calib_blocks=3"), init_dir)


# ---------------------------------------------------------------------------------------------- process-group timeout


def test_process_group_timeout_reaches_the_accelerator(tmp_path):
    from datetime import timedelta

    from minidistill.training.config import TrainConfig
    from minidistill.training.loop import build_accelerator

    assert TrainConfig().process_group_timeout_minutes == 120.0
    acc = build_accelerator(TrainConfig.from_dict({"process_group_timeout_minutes": 7.5, "progress_bar": False}), tmp_path)
    assert acc.init_handler is not None
    assert acc.init_handler.to_kwargs() == {"timeout": timedelta(minutes=7.5)}


@pytest.mark.parametrize("bad", [0, -3, float("inf"), float("nan")])
def test_process_group_timeout_must_be_positive_minutes(bad):
    from minidistill.training.config import TrainConfig

    with pytest.raises(ConfigError, match=r"process_group_timeout_minutes=.*must be a (positive|finite) number"):
        TrainConfig.from_dict({"process_group_timeout_minutes": bad})


# ---------------------------------------------------------------------------------------------- resumable prune


def test_a_stopped_prune_restarts_from_the_importance_cache(tmp_path, monkeypatch):
    """A prune killed after calibration: the re-run reads scores and Gram matrices from the cache (no teacher
    forward at all with teacher-mode re-fits from the Grams) and gives the uninterrupted run's student."""
    from minidistill.adapters import get_adapter
    from minidistill.prune.importance import GRAMS_FILE, importance_cache_dir

    monkeypatch.setenv("MINIDISTILL_CACHE", str(tmp_path / "cache"))
    teacher = tiny_model("llama", num_layers=3)
    data = tiny_data(train=8, seq_len=64)  # 512 tokens: enough for the re-fit neuron ranking (4 x 96)
    cfg = prune_cfg(target=SHAPE, layer_method="contiguous", importance={"cache": True},
                    reconstruction={"enabled": True, "mode": "teacher"})
    forwards = []
    get_adapter(teacher).decoder_layers(teacher)[0].register_forward_pre_hook(lambda *_: forwards.append(1))

    uninterrupted = prune_model(teacher, None, data, cfg.replace(importance=cfg.importance.replace(cache=False)),
                                teacher_source="t")
    assert uninterrupted.prune_map.importance["neuron_ranking"] == "refit"
    calibration_forwards = len(forwards)
    assert calibration_forwards > 0

    def killed(*args, **kwargs):
        raise KeyboardInterrupt("killed after calibration")

    with monkeypatch.context() as m:
        m.setattr("minidistill.prune.select.select_units", killed)
        with pytest.raises(KeyboardInterrupt):
            prune_model(teacher, None, data, cfg, teacher_source="t")
    entries = [p for p in importance_cache_dir().iterdir() if not p.name.startswith(".")]
    assert len(entries) == 1 and (entries[0] / GRAMS_FILE).is_file()

    forwards.clear()
    restarted = prune_model(teacher, None, data, cfg, teacher_source="t")
    assert forwards == []  # neither the calibration forward nor a re-fit forward ran again
    assert restarted.prune_map.to_dict() == uninterrupted.prune_map.to_dict()
    assert any("down_proj" in name for name in restarted.prune_map.to_dict()["refit"])  # re-fitted from cached Grams
    assert state_dict_sha256(restarted.student) == state_dict_sha256(uninterrupted.student)


def test_resume_accepts_another_prune_device_and_timeout_and_checkpoints_without_them():
    from minidistill.recipe_config import incompatible_fields

    saved = {"prune": {"device": "cpu", "calib_blocks": 64}, "train": {"process_group_timeout_minutes": 120.0, "lr": 1e-4}}
    current = {"prune": {"device": "auto", "calib_blocks": 64}, "train": {"process_group_timeout_minutes": 30.0, "lr": 1e-4}}
    assert incompatible_fields(saved, current) == []
    older = {"prune": {"calib_blocks": 64}, "train": {"lr": 1e-4}}  # a checkpoint from before these settings
    assert incompatible_fields(older, current) == []
    assert incompatible_fields(older, {**current, "train": {"lr": 3e-4}}) == ["train.lr"]


# ---------------------------------------------------------------------------------------------- memory


def _live_float_bytes() -> int:
    import gc

    seen, total = set(), 0
    for obj in gc.get_objects():
        if type(obj) in (torch.Tensor, torch.nn.Parameter) and obj.is_floating_point() and obj.device.type == "cpu":
            storage = obj.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
    return total


def test_calibration_statistics_do_not_grow_with_calibration_tokens():
    """The whole prune (calibration pass with the re-fit Grams, teacher-mode re-fit from them) at 1x and 4x
    calibration tokens: the float tensors alive during the calibration forward have the same peak size.

    (Re-fits that run their own forwards, sequential mode or teacher mode without the calibration Grams,
    hold the calibration hidden states by design: see :mod:`minidistill.prune.reconstruct`.)"""
    from minidistill.adapters import get_adapter

    peaks = {}
    for blocks in (8, 32):
        teacher = tiny_model("llama", num_layers=3)
        live: list[int] = []
        norm = teacher.get_submodule(get_adapter(teacher).final_norm)
        handle = norm.register_forward_hook(lambda *_: live.append(_live_float_bytes()))
        cfg = prune_cfg(target=SHAPE, calib_blocks=blocks, layer_method="contiguous",
                        reconstruction={"enabled": True, "mode": "teacher"})
        result = prune_model(teacher, None, tiny_data(train=blocks, seq_len=64), cfg, teacher_source="t")
        handle.remove()
        assert result.prune_map.importance["calibration_tokens"] == blocks * 64
        assert result.prune_map.to_dict()["refit"]  # re-fitted from the calibration Grams
        assert len(live) == blocks // 4  # one calibration forward (batch 4), no re-fit forward
        peaks[blocks] = max(live)
        del teacher, result  # not alive during the next size's run
    # One batch's activations are the same at both sizes; kept per-batch states would add ~3x a batch's worth.
    assert peaks[32] <= peaks[8] * 1.02 + 4096, peaks
