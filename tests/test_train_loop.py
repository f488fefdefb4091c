"""The distillation loop in-process on tiny models: schedule, data order, accumulation, checkpoints, failures."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import tiny_model
from train_scripts.tiny_setup import half_map

from minidistill.data import DataConfig, TextData, TokenBlocks
from minidistill.distill.objective import DistillLossConfig
from minidistill.prune.apply import apply_prune_map
from minidistill.training import checkpoint as ckpt
from minidistill.training.config import EvalConfig, TrainConfig
from minidistill.training.loop import Distiller, NonFiniteLossError
from minidistill.training.sampler import ResumableBlockSampler
from minidistill.training.schedule import lr_factor


def _data(num_train: int = 48, seq: int = 16) -> TextData:
    g = torch.Generator().manual_seed(123)
    return TextData(
        TokenBlocks(torch.randint(3, 128, (num_train, seq), generator=g)),
        TokenBlocks(torch.randint(3, 128, (6, seq), generator=g)),
        DataConfig(),
    )


def make_distiller(
    run_dir, *, train: dict | None = None, loss: dict | None = None, eval: dict | None = None, noise: float = 0.05
) -> Distiller:
    """A pruned tiny llama student (weights perturbed by ``noise`` x N(0, 1), seeded) and its teacher."""
    teacher = tiny_model("llama", num_layers=3)
    pmap = half_map(teacher)
    student = apply_prune_map(teacher, pmap)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(noise * torch.randn(p.shape, generator=gen))
    tc = TrainConfig.from_dict({"max_steps": 4, "batch_size": 4, "lr": 3e-3, "warmup_steps": 1, "progress_bar": False, **(train or {})})
    return Distiller(
        student=student,
        teacher=teacher,
        data=_data(),
        prune_map=pmap,
        loss=DistillLossConfig.from_dict(loss or {"hidden": {"weight": 1.0}}),
        train=tc,
        eval=EvalConfig.from_dict(eval or {}),
        run_dir=run_dir,
        config_dict={"train": tc.to_dict()},
    )


def _records(run_dir, kind="train"):
    return [r for r in map(json.loads, (run_dir / "log.jsonl").read_text().splitlines()) if r["kind"] == kind]


# ---------------------------------------------------------------------------------------------- pieces


def test_lr_schedules_match_closed_forms():
    kw = dict(max_steps=100, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_factor(0, **kw) == pytest.approx(0.1)
    assert lr_factor(9, **kw) == pytest.approx(1.0)
    for step in (10, 37, 99, 100):
        ref = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - 10) / 90))
        assert lr_factor(step, kind="cosine", **kw) == pytest.approx(ref)
    # WSD: flat until the last 20% of the steps, then linear to the floor.
    assert lr_factor(50, kind="wsd", decay_fraction=0.2, **kw) == 1.0
    assert lr_factor(79, kind="wsd", decay_fraction=0.2, **kw) == 1.0
    assert lr_factor(90, kind="wsd", decay_fraction=0.2, **kw) == pytest.approx(1 - 0.9 * 0.5)
    assert lr_factor(100, kind="wsd", decay_fraction=0.2, **kw) == pytest.approx(0.1)


def test_sampler_covers_each_epoch_resumes_and_shards():
    s = ResumableBlockSampler(10, 3, seed=5)
    epoch0 = [s.next_indices() for _ in range(3)]
    seen = torch.cat(epoch0)
    assert len(set(seen.tolist())) == 9  # 3 full micro-batches, tail dropped, no repeats
    state = s.state_dict()
    rest = [s.next_indices() for _ in range(4)]  # crosses into epoch 1 and 2
    assert not torch.equal(torch.cat(rest[:3]), seen)  # a new order each epoch
    resumed = ResumableBlockSampler(10, 3, seed=5)
    resumed.load_state_dict(json.loads(json.dumps(state)))
    assert all(torch.equal(a, b) for a, b in zip(rest, [resumed.next_indices() for _ in range(4)]))
    # Two replicas of micro-batch 1 together see what one replica of micro-batch 2 sees.
    single = ResumableBlockSampler(8, 2, seed=1)
    ranks = [ResumableBlockSampler(8, 1, num_replicas=2, rank=r, seed=1) for r in range(2)]
    for _ in range(5):
        assert single.next_indices().tolist() == [r.next_indices().item() for r in ranks]


# ---------------------------------------------------------------------------------------------- training


@pytest.mark.slow
def test_short_run_decreases_loss_and_logs_every_step(tmp_path):
    d = make_distiller(tmp_path / "run", train={"max_steps": 12, "schedule": "constant"}, eval={"every": 6})
    result = d.run()
    losses = [r["loss"] for r in _records(tmp_path / "run")]
    assert len(losses) == 12
    assert sum(losses[-3:]) < sum(losses[:3])
    evals = _records(tmp_path / "run", "eval")
    assert [e["step"] for e in evals] == [0, 6, 12]
    assert "teacher_heldout_loss" in evals[0]
    assert evals[-1]["heldout_loss"] < evals[0]["heldout_loss"]
    assert result.final_eval == {k: v for k, v in evals[-1].items() if k not in ("kind", "step")}
    rec = _records(tmp_path / "run")[0]
    for key in ("loss/logits", "loss/hidden", "weight/hidden", "lr", "grad_norm", "tokens_per_s", "mem_mb"):
        assert key in rec


def test_accumulating_two_micro_batches_equals_one_double_batch(tmp_path):
    initial = {k: v.clone() for k, v in make_distiller(tmp_path / "init").module.state_dict().items()}
    states = []
    for accum in (1, 2):
        d = make_distiller(tmp_path / f"a{accum}", train={"grad_accum_steps": accum, "max_grad_norm": 0.5})
        assert d.micro_batch == 4 // accum
        record = d.train_step(0)
        states.append((record, {k: v.detach().clone() for k, v in d.module.state_dict().items()}))
    (r1, s1), (r2, s2) = states
    assert r1["loss"] == pytest.approx(r2["loss"], rel=1e-5)
    assert r1["grad_norm"] == pytest.approx(r2["grad_norm"], rel=1e-5)
    for k in s1:
        torch.testing.assert_close(s1[k], s2[k], rtol=1e-5, atol=1e-6)
    assert sum(not torch.equal(s1[k], initial[k]) for k in s1) > 10  # the step did move the weights


def test_auto_balance_is_measured_per_optimizer_step_not_per_micro_batch(tmp_path):
    """balance=auto: 2 accumulated micro-batches give the 1-micro-batch run's losses and weights at every step."""
    runs = []
    for accum in (1, 2):
        d = make_distiller(tmp_path / f"a{accum}", train={"grad_accum_steps": accum}, loss={"hidden": {"weight": 1.0}, "balance": "auto"})
        runs.append([d.train_step(step) for step in range(3)])
    for r1, r2 in zip(*runs):
        for key in ("loss", "loss/logits", "loss/hidden", "weight/hidden"):
            assert r2[key] == pytest.approx(r1[key], rel=1e-5), key
    assert runs[0][0]["weight/hidden"] == 1.0  # the first step has no measured magnitudes yet
    assert runs[0][1]["weight/hidden"] != pytest.approx(1.0, rel=1e-2)  # later steps are rescaled


def test_non_finite_loss_stops_naming_step_and_component(tmp_path):
    d = make_distiller(tmp_path / "run", train={"max_steps": 6, "save_every": 2})
    term = d.module.objective.terms["hidden"]
    original = term.forward
    calls = {"n": 0}

    def poisoned(features, input_ids):
        calls["n"] += 1
        value = original(features, input_ids)
        return value * float("nan") if calls["n"] == 3 else value

    term.forward = poisoned
    with pytest.raises(NonFiniteLossError, match=r"optimizer step 3: loss component 'loss/hidden' is nan"):
        d.run()
    kept = ckpt.list_checkpoints(tmp_path / "run" / "checkpoints")
    assert [p.name for p in kept] == ["step-00000002"]
    assert ckpt.read_trainer_state(kept[0])["step"] == 2


@pytest.mark.slow
def test_crash_while_writing_a_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch):
    run = tmp_path / "run"
    d = make_distiller(run, train={"max_steps": 6, "save_every": 2})
    real = ckpt.save_rng_state
    calls = {"n": 0}

    def crash_on_second(folder, rank):
        calls["n"] += 1
        if calls["n"] == 2:  # model/optimizer files of step 4 are written; the state file is not
            raise OSError("disk full (simulated)")
        real(folder, rank)

    monkeypatch.setattr(ckpt, "save_rng_state", crash_on_second)
    with pytest.raises(OSError, match="simulated"):
        d.run()
    monkeypatch.setattr(ckpt, "save_rng_state", real)
    root = run / "checkpoints"
    assert [p.name for p in ckpt.list_checkpoints(root)] == ["step-00000002"]
    assert (root / ".tmp-step-00000004" / "model.safetensors").is_file()
    # The surviving checkpoint resumes, the partial one is cleaned away, and the run completes.
    resumed = make_distiller(run, train={"max_steps": 6, "save_every": 2})
    result = resumed.run(resume=ckpt.latest_checkpoint(root))
    assert result.steps == 6
    assert not (root / ".tmp-step-00000004").exists()
    assert [p.name for p in ckpt.list_checkpoints(root)] == ["step-00000004", "step-00000006"]
    assert [r["step"] for r in _records(run)] == [1, 2, 3, 4, 5, 6]


@pytest.mark.slow
def test_in_process_resume_reproduces_the_uninterrupted_losses(tmp_path):
    """Auto balancing keeps EMA buffers: they must come back from the checkpoint for the curve to match."""
    kw = dict(train={"max_steps": 4, "save_every": 2}, loss={"hidden": {"weight": 1.0}, "balance": "auto"}, eval={"max_blocks": 1})
    make_distiller(tmp_path / "full", **kw).run()
    part = make_distiller(tmp_path / "part", **kw)
    part.train_cfg.max_steps = 2
    part.run()
    make_distiller(tmp_path / "part", **kw).run(resume=tmp_path / "part" / "checkpoints" / "step-00000002")
    ref = [(r["step"], r["loss"], r["loss/hidden"], r["weight/hidden"]) for r in _records(tmp_path / "full")]
    got = [(r["step"], r["loss"], r["loss/hidden"], r["weight/hidden"]) for r in _records(tmp_path / "part")]
    assert got == ref


def test_gradient_checkpointing_gives_the_same_step(tmp_path):
    states = []
    for gc in (False, True):
        d = make_distiller(tmp_path / f"gc{gc}", train={"gradient_checkpointing": gc}, loss={"hidden": {"weight": 1.0}, "attention": {"weight": 1.0}})
        record = d.train_step(0)
        states.append((record, {k: v.detach().clone() for k, v in d.module.state_dict().items()}))
    (r1, s1), (r2, s2) = states
    assert r1["loss"] == pytest.approx(r2["loss"], rel=1e-6)
    assert r1["grad_norm"] == pytest.approx(r2["grad_norm"], rel=1e-5)
    for k in s1:
        torch.testing.assert_close(s1[k], s2[k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("amx", [True, False])
def test_auto_bf16_follows_the_cpu(tmp_path, monkeypatch, amx):
    """mixed_precision=auto_bf16 on a CPU: the explicit bf16 step where the CPU has AMX, the fp32 step elsewhere."""
    from accelerate.state import AcceleratorState

    from minidistill.training import loop

    monkeypatch.setattr(loop, "cpu_has_amx_bf16", lambda: amx)
    steps = {}
    for precision in ("auto_bf16", "bf16", "no"):
        AcceleratorState._reset_state(True)
        d = make_distiller(tmp_path / precision, train={"mixed_precision": precision}, loss={"logits": {"weight": 1.0}})
        steps[precision] = (d.accelerator.mixed_precision, d.train_step(0)["loss"])
    AcceleratorState._reset_state(True)
    expected = "bf16" if amx else "no"
    assert steps["auto_bf16"] == steps[expected]
    other = steps["no" if amx else "bf16"]
    assert steps["auto_bf16"][1] != other[1]  # bf16 autocast really changes the arithmetic


# ---------------------------------------------------------------------------------------------- train.freeze


def test_the_freeze_groups_partition_every_student_parameter(model_type):
    from minidistill.adapters import get_adapter

    model = tiny_model(model_type, num_layers=2)
    adapter = get_adapter(model)
    groups = {g: tuple(adapter.group_prefixes(model, g)) for g in ("embeddings", "attention", "mlp", "norms")}
    for name, _ in model.named_parameters():
        assert len([g for g, prefixes in groups.items() if name.startswith(prefixes)]) == 1, name


def test_frozen_groups_keep_their_values_and_the_rest_trains_as_without_freezing(tmp_path):
    """Without clipping, AdamW's first step of a parameter depends on its own gradient only, and freezing other
    weights does not change the forward: after one step the trained weights equal those of a run that freezes
    nothing, and the frozen ones their initial values."""
    kw = dict(loss={"logits": {"weight": 1.0}}, eval={"every": 0})
    train = {"max_steps": 1, "max_grad_norm": 0.0}
    full = make_distiller(tmp_path / "full", train=train, **kw)
    initial = {k: v.clone() for k, v in full.student.state_dict().items()}
    full.run()
    frozen = make_distiller(tmp_path / "frozen", train={**train, "freeze": ["embeddings", "attention"]}, **kw)
    frozen.run()
    want, got = full.student.state_dict(), frozen.student.state_dict()
    kept = [k for k in got if k.startswith(("model.embed_tokens.", "lm_head.")) or ".self_attn." in k]
    trained = [k for k in got if k not in kept]
    assert kept and trained
    for k in kept:
        assert torch.equal(got[k], initial[k]), k
        assert not torch.equal(want[k], initial[k]), k  # the unfrozen run moved it
    for k in trained:
        assert not torch.equal(got[k], initial[k]), k
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-7)
    assert len(frozen.optimizer.state) < len(full.optimizer.state)


def test_bad_freeze_settings_fail_with_the_key():
    from minidistill.config import ConfigError

    with pytest.raises(ConfigError, match=r"freeze\[0\]='embedding': choose one of"):
        TrainConfig.from_dict({"freeze": ["embedding"]})
    with pytest.raises(ConfigError, match="freezes every student weight"):
        TrainConfig.from_dict({"freeze": ["embeddings", "attention", "mlp", "norms"]}).validate()
    with pytest.raises(ConfigError, match="LoRA already keeps every base weight frozen"):
        TrainConfig.from_dict({"freeze": ["mlp"], "lora": {}}).validate()
