"""Training from the teacher cache: at k = vocab the losses of the live-teacher run, with no teacher forward per step;
a killed cached run resumed from its checkpoint equals the uninterrupted one."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_model
from train_scripts.tiny_setup import half_map

from minidistill.config import ConfigError
from minidistill.data import DataConfig, TextData, TokenBlocks
from minidistill.distill.objective import DistillLossConfig
from minidistill.distill.teacher_cache import TeacherCacheConfig, build_teacher_cache
from minidistill.prune.apply import apply_prune_map
from minidistill.training.config import EvalConfig, TrainConfig
from minidistill.training.loop import Distiller

VOCAB = {f"w{i}": i for i in range(128)}


def _data() -> TextData:
    g = torch.Generator().manual_seed(7)
    return TextData(TokenBlocks(torch.randint(3, 128, (16, 12), generator=g)),
                    TokenBlocks(torch.randint(3, 128, (2, 12), generator=g)), DataConfig())


def _distiller(run_dir, cache_k: int | None, loss: dict | None = None, train: dict | None = None):
    """A Distiller of the half-pruned tiny llama (from the cache in ``run_dir/cache`` at ``cache_k``), and the
    list that records every teacher forward after the cache is built."""
    teacher = tiny_model("llama", num_layers=3)
    pmap = half_map(teacher)
    student = apply_prune_map(teacher, pmap)
    calls = []
    teacher.register_forward_pre_hook(lambda *a: calls.append(1))
    data = _data()
    cache = None
    if cache_k is not None:
        cache = build_teacher_cache(TeacherCacheConfig(enabled=True, k=cache_k, dtype="float32", blocks_per_shard=5),
                                    teacher, data.train.input_ids, run_dir / "cache", tokenizer_vocab=VOCAB)
        calls.clear()
    tc = TrainConfig.from_dict({"max_steps": 3, "batch_size": 4, "grad_accum_steps": 2, "lr": 3e-3, "warmup_steps": 1,
                                "progress_bar": False, **(train or {})})
    d = Distiller(student=student, teacher=teacher, data=data, prune_map=pmap,
                  loss=DistillLossConfig.from_dict(loss or {}), train=tc, eval=EvalConfig(), run_dir=run_dir,
                  config_dict={}, teacher_cache=cache)
    return d, calls


def _train_records(run_dir) -> list[dict]:
    records = [json.loads(x) for x in (run_dir / "log.jsonl").read_text().splitlines()]
    return [r for r in records if r["kind"] == "train"]


def _run(run_dir, cache_k: int | None, loss: dict | None = None):
    d, calls = _distiller(run_dir, cache_k, loss)
    d.run()
    return [r["loss"] for r in _train_records(run_dir)], len(calls)


@pytest.mark.parametrize("ce_weight", [0.0, 0.5])
def test_cached_run_at_full_k_equals_the_live_run_without_teacher_forwards(tmp_path, ce_weight):
    loss = {"logits": {"ce_weight": ce_weight}}
    live, live_calls = _run(tmp_path / "live", None, loss)
    cached, cached_calls = _run(tmp_path / "cached", 128, loss)
    assert len(live) == 3
    torch.testing.assert_close(torch.tensor(cached), torch.tensor(live), rtol=1e-5, atol=1e-6)
    assert live_calls - cached_calls == 3 * 2  # one teacher forward per training micro-batch, none with the cache
    sparse, _ = _run(tmp_path / "k4", 4, loss)
    assert abs(sparse[0] - live[0]) > 1e-4  # k < vocab truncates the teacher: a different loss


def test_feature_terms_and_other_logit_settings_are_refused_with_the_cache(tmp_path):
    with pytest.raises(ConfigError, match=r"loss.hidden.weight asks for teacher features.*teacher_cache.enabled=false"):
        _run(tmp_path / "h", 8, loss={"hidden": {"weight": 1.0}})
    with pytest.raises(ConfigError, match=r"loss.logits.temperature=2.0"):
        _run(tmp_path / "t", 8, loss={"logits": {"temperature": 2.0}})


def test_recipe_builds_the_cache_and_trains_from_it(tmp_path):
    from train_scripts.tiny_setup import make_student_dir, make_teacher_dir, tiny_overrides

    from minidistill.distill.teacher_cache import MANIFEST, TeacherCache
    from minidistill.recipe_config import load_recipe_config
    from minidistill.train import run_prune_distill

    teacher = make_teacher_dir(tmp_path / "teacher")
    student = make_student_dir(teacher, tmp_path / "student")
    with pytest.raises(ConfigError, match="loss.hidden.weight asks for teacher features"):
        load_recipe_config(None, tiny_overrides(tmp_path, teacher, student, **{"teacher_cache.enabled": True, "loss.hidden.weight": 1.0}))
    cfg = load_recipe_config(None, tiny_overrides(tmp_path, teacher, student, **{
        "teacher_cache.enabled": True, "teacher_cache.k": 16, "train.max_steps": 2}))
    result = run_prune_distill(cfg)
    cache = TeacherCache(result.run_dir / "teacher_cache")
    assert cache.manifest["complete"] and cache.k == 16
    assert (result.run_dir / "teacher_cache" / MANIFEST).is_file() and result.train.steps == 2


def test_a_killed_cached_run_resumes_to_the_uninterrupted_run(tmp_path):
    """Killed in step 4 (after the step-2 checkpoint), resumed from it: the losses, learning rates and final
    weights of the uninterrupted cached run (exact: float32 on CPU, one process), over an epoch boundary."""
    train = {"max_steps": 5, "save_every": 2}
    full, _ = _distiller(tmp_path / "full", 8, train=train)
    full_state = {k: v.detach().clone() for k, v in full.run().module.state_dict().items()}

    cut, _ = _distiller(tmp_path / "cut", 8, train=train)
    real_step = cut.train_step

    def killed_in_step_4(step: int):
        if step == 3:
            raise KeyboardInterrupt
        return real_step(step)

    cut.train_step = killed_in_step_4
    with pytest.raises(KeyboardInterrupt):
        cut.run()
    assert [r["step"] for r in _train_records(tmp_path / "cut")] == [1, 2, 3]
    assert not (tmp_path / "cut" / "checkpoints" / "step-00000004").exists()

    resumed, calls = _distiller(tmp_path / "cut", 8, train=train)  # rereads the cache the killed run built
    result = resumed.run(resume=tmp_path / "cut" / "checkpoints" / "step-00000002")
    assert result.steps == 5
    want = [(r["step"], r["loss"], r["lr"], r["grad_norm"]) for r in _train_records(tmp_path / "full")]
    got = [(r["step"], r["loss"], r["lr"], r["grad_norm"]) for r in _train_records(tmp_path / "cut")]
    assert [s for s, *_ in got] == [1, 2, 3, 4, 5]
    assert got == want
    assert want[0][1] != want[-1][1]  # the weights moved, so equal weights below say something
    state = result.module.state_dict()
    assert state.keys() == full_state.keys()
    for name, value in full_state.items():
        assert torch.equal(state[name], value), name
    # The resumed steps read the cache: the one teacher forward is the final held-out evaluation's (2 blocks).
    assert len(calls) == 1
