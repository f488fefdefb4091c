"""On-policy distillation (``on_policy``): the student continues corpus prefixes and is distilled on its tokens.

References: a run without ``on_policy`` (fraction 0 must equal it exactly), the teacher itself as the
student (loss 0), a float64 loss written out by hand on the generated positions, sampling without the KV
cache, an uninterrupted run (resume) and one process (2-process DDP).
"""

from __future__ import annotations

import copy
import json
import sys

import pytest
import torch
from conftest import tiny_model

from minidistill.adapters import get_adapter
from minidistill.config import ConfigError
from minidistill.data import DataConfig, TextData, TokenBlocks
from minidistill.distill.objective import DistillLossConfig
from minidistill.distill.on_policy import (
    OnPolicyConfig,
    generate_continuations,
    is_on_policy,
    sample_from_logits,
    sampling_uniforms,
)
from minidistill.recipe_config import load_recipe_config
from minidistill.training.config import EvalConfig, TrainConfig
from minidistill.training.loop import Distiller

SEQ, NEW = 16, 6


def _data(num_train: int = 32) -> TextData:
    g = torch.Generator().manual_seed(7)
    return TextData(
        TokenBlocks(torch.randint(3, 128, (num_train, SEQ), generator=g)),
        TokenBlocks(torch.randint(3, 128, (4, SEQ), generator=g)),
        DataConfig(seq_len=SEQ),
    )


def _distiller(run_dir, *, on_policy: dict | None, student=None, loss: dict | None = None, train: dict | None = None) -> Distiller:
    """A tiny llama teacher and a student (a noisy copy of it unless given), logit term only."""
    teacher = tiny_model("llama", num_layers=2)
    if student is None:
        student = copy.deepcopy(teacher)
        gen = torch.Generator().manual_seed(5)
        with torch.no_grad():
            for p in student.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
    tc = TrainConfig.from_dict({"max_steps": 4, "batch_size": 4, "lr": 3e-3, "warmup_steps": 1, "progress_bar": False, **(train or {})})
    return Distiller(
        student=student,
        teacher=teacher,
        data=_data(),
        prune_map=None,
        loss=DistillLossConfig.from_dict(loss or {"logits": {"divergence": "jsd"}}),
        train=tc,
        eval=EvalConfig.from_dict({"max_blocks": 2}),
        run_dir=run_dir,
        config_dict={"train": tc.to_dict()},
        on_policy=None if on_policy is None else OnPolicyConfig.from_dict(on_policy),
    )


def _records(run_dir):
    return [r for r in map(json.loads, (run_dir / "log.jsonl").read_text().splitlines()) if r["kind"] == "train"]


def _losses(records):
    return [(r["step"], r.get("on_policy_share"), r["loss"], r["loss/logits"], r["grad_norm"]) for r in records]


# ---------------------------------------------------------------------------------------------- pieces


def test_micro_batch_choice_is_deterministic_and_follows_the_fraction():
    cfg = OnPolicyConfig(fraction=0.3)
    chosen = [is_on_policy(cfg, 11, i) for i in range(2000)]
    assert chosen == [is_on_policy(cfg, 11, i) for i in range(2000)]
    assert 0.25 < sum(chosen) / len(chosen) < 0.35
    assert chosen != [is_on_policy(cfg, 12, i) for i in range(2000)]  # another seed, other micro-batches
    assert not any(is_on_policy(OnPolicyConfig(fraction=0.0), 11, i) for i in range(200))
    assert all(is_on_policy(OnPolicyConfig(fraction=1.0), 11, i) for i in range(200))


def test_inverse_cdf_sampling_matches_the_distribution_and_skips_padding_rows():
    logits = torch.tensor([[0.0, 1.0, 2.0, -1.0, 5.0]]).repeat(20000, 1)
    u = torch.rand(20000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ids = sample_from_logits(logits, 2.0, u, vocab_size=4)  # id 4 is a padding row
    assert int(ids.max()) <= 3
    freq = torch.bincount(ids, minlength=4).double() / len(ids)
    torch.testing.assert_close(freq, torch.softmax(logits[0, :4].double() / 2.0, -1), atol=0.015, rtol=0)


def test_kv_cache_generation_equals_sampling_with_full_forwards():
    model = tiny_model("llama", num_layers=2)
    prefix = torch.randint(3, 128, (3, 7), generator=torch.Generator().manual_seed(1))
    u = sampling_uniforms(0, 5, 3, NEW)
    got = generate_continuations(model, prefix, u, temperature=0.7)
    seq = prefix
    with torch.no_grad():
        for i in range(NEW):
            seq = torch.cat([seq, sample_from_logits(model(seq).logits[:, -1], 0.7, u[:, i]).unsqueeze(1)], 1)
    assert torch.equal(got, seq)
    assert torch.equal(got[:, :7], prefix)


# ---------------------------------------------------------------------------------------------- training


def test_fraction_zero_equals_a_run_without_on_policy(tmp_path):
    runs = {}
    for name, op in (("plain", None), ("zero", {"fraction": 0.0, "max_new_tokens": NEW})):
        d = _distiller(tmp_path / name, on_policy=op)
        d.run()
        runs[name] = (_records(tmp_path / name), {k: v.detach().clone() for k, v in d.module.state_dict().items()})
    (plain, s_plain), (zero, s_zero) = runs["plain"], runs["zero"]
    assert [x[2:] for x in _losses(plain)] == [x[2:] for x in _losses(zero)]
    assert [r["on_policy_share"] for r in zero] == [0.0] * 4
    assert s_plain.keys() == s_zero.keys() and all(torch.equal(s_plain[k], s_zero[k]) for k in s_plain)
    # All micro-batches generated: another loss from the first step on.
    d = _distiller(tmp_path / "one", on_policy={"fraction": 1.0, "max_new_tokens": NEW})
    record = d.train_step(0)
    assert record["on_policy_share"] == 1.0 and record["loss/logits"] != plain[0]["loss/logits"]


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
def test_student_equal_to_teacher_has_zero_on_policy_loss(tmp_path, divergence):
    teacher_copy = tiny_model("llama", num_layers=2)  # the same seed: the teacher's weights
    d = _distiller(tmp_path / "run", on_policy={"fraction": 1.0, "max_new_tokens": NEW, "temperature": 1.5},
                   student=teacher_copy, loss={"logits": {"divergence": divergence}})
    record = d.train_step(0)
    assert record["on_policy_share"] == 1.0
    assert abs(record["loss/logits"]) < 1e-6


def test_with_lora_the_adapted_student_generates_and_only_the_adapters_train(tmp_path):
    """After LoRA steps the on-policy continuations are the adapted student's: sampling the merged model with the
    same uniforms gives the same tokens; the base weights do not move."""
    d = _distiller(tmp_path / "run", on_policy={"fraction": 1.0, "max_new_tokens": NEW},
                   train={"lora": {"r": 4, "alpha": 8.0}, "lr": 5e-2})
    base = {k: v.detach().clone() for k, v in d.student.state_dict().items() if "lora_" not in k}
    for step in range(2):
        assert d.train_step(step)["on_policy_share"] == 1.0
    indices = d.sampler.next_indices()
    seqs, _ = d._on_policy_rows(indices, 7)
    merged = copy.deepcopy(d.peft_model).merge_and_unload()
    prefix = d.data.train.input_ids[indices][:, : SEQ - NEW]
    want = generate_continuations(merged, prefix, sampling_uniforms(d.train_cfg.seed, 7, prefix.shape[0], NEW), temperature=1.0)
    assert torch.equal(seqs, want)
    with d.peft_model.disable_adapter():  # the unadapted base
        unadapted = generate_continuations(d.peft_model.get_base_model(), prefix,
                                           sampling_uniforms(d.train_cfg.seed, 7, prefix.shape[0], NEW), temperature=1.0)
    assert not torch.equal(unadapted, want)  # the adapters changed what the student writes
    now = {k: v for k, v in d.student.state_dict().items() if "lora_" not in k}
    assert all(torch.equal(base[k], now[k]) for k in base)


def _naive_loss(student, teacher, seqs, prefix_len, divergence, beta=0.5):
    """Float64 divergence averaged over the positions predicting generated tokens, from full logits."""
    with torch.no_grad():
        lp_s = torch.log_softmax(copy.deepcopy(student).double()(seqs).logits[:, prefix_len - 1 : -1], -1)
        lp_t = torch.log_softmax(copy.deepcopy(teacher).double()(seqs).logits[:, prefix_len - 1 : -1], -1)
    p_s, p_t = lp_s.exp(), lp_t.exp()
    if divergence == "forward_kl":
        per = (p_t * (lp_t - lp_s)).sum(-1)
    elif divergence == "reverse_kl":
        per = (p_s * (lp_s - lp_t)).sum(-1)
    else:
        m = beta * p_t + (1 - beta) * p_s
        per = beta * (p_t * (lp_t - m.log())).sum(-1) + (1 - beta) * (p_s * (lp_s - m.log())).sum(-1)
    return per.mean().item()


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
def test_loss_counts_only_generated_positions(tmp_path, divergence):
    d = _distiller(tmp_path / "run", on_policy={"fraction": 1.0, "max_new_tokens": NEW}, loss={"logits": {"divergence": divergence}})
    indices = d.sampler.next_indices()
    seqs, mask = d._on_policy_rows(indices, 0)
    prefix_len = SEQ - NEW
    assert torch.equal(seqs[:, :prefix_len], d.data.train.input_ids[indices][:, :prefix_len])
    assert mask.sum().item() == seqs.shape[0] * NEW and mask[:, prefix_len:].all()
    t_feats = d._teacher_features(seqs)
    with torch.no_grad():
        loss = d.module(seqs, t_feats, target_mask=mask)["loss"].item()
    ref = _naive_loss(d.student, d.teacher, seqs, prefix_len, divergence)
    assert loss == pytest.approx(ref, rel=1e-5)
    # The teacher's states at positions predicting prompt tokens do not count; the first generated one does.
    changed = copy.copy(t_feats)
    changed.final_hidden = t_feats.final_hidden.clone()
    changed.final_hidden[:, : prefix_len - 1] += 3.0
    with torch.no_grad():
        assert d.module(seqs, changed, target_mask=mask)["loss"].item() == loss
        changed.final_hidden[:, prefix_len - 1] += 3.0
        assert d.module(seqs, changed, target_mask=mask)["loss"].item() != pytest.approx(loss, rel=1e-3)


@pytest.mark.slow
def test_compiled_layers_generate_and_train_like_eager_ones(tmp_path):
    """``train.compile`` compiles the decoder layers the student also generates with (KV cache, growing lengths):
    the generated tokens, losses and gradient norms match the eager run."""
    kw = dict(on_policy={"fraction": 1.0, "max_new_tokens": NEW}, train={"max_steps": 2})
    eager = _distiller(tmp_path / "eager", **kw)
    compiled = _distiller(tmp_path / "compiled", **{**kw, "train": {"max_steps": 2, "compile": True}})
    layers = get_adapter(compiled.student).decoder_layers(compiled.student)
    assert all(layer._compiled_call_impl is not None for layer in layers)  # nn.Module.compile() took effect
    indices = eager.sampler.next_indices()
    assert torch.equal(compiled.sampler.next_indices(), indices)
    assert torch.equal(compiled._on_policy_rows(indices, 0)[0], eager._on_policy_rows(indices, 0)[0])
    for step in range(2):
        a, b = eager.train_step(step), compiled.train_step(step)
        assert b["on_policy_share"] == a["on_policy_share"] == 1.0
        for key in ("loss", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), (step, key)


@pytest.mark.slow
def test_resumed_on_policy_run_reproduces_the_uninterrupted_one(tmp_path):
    # Seed 2 generates micro-batches 1 and 3 (of 0..3): one on each side of the checkpoint.
    kw = dict(on_policy={"fraction": 0.5, "max_new_tokens": NEW}, train={"max_steps": 4, "save_every": 2, "seed": 2})
    _distiller(tmp_path / "full", **kw).run()
    part = _distiller(tmp_path / "part", **kw)
    part.train_cfg.max_steps = 2
    part.run()
    _distiller(tmp_path / "part", **kw).run(resume=tmp_path / "part" / "checkpoints" / "step-00000002")
    full, got = _records(tmp_path / "full"), _records(tmp_path / "part")
    assert [r["on_policy_share"] for r in full] == [0.0, 1.0, 0.0, 1.0]
    assert _losses(got) == _losses(full)


# ---------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "overrides, match",
    [
        (["data.seq_len=32", "on_policy.max_new_tokens=32"], r"on_policy\.max_new_tokens=32 must be below data\.seq_len=32"),
        (["on_policy.fraction=1.5"], r"on_policy\.fraction=1\.5: must be in \[0, 1\]"),
        (["on_policy.fraction=-0.1"], r"on_policy\.fraction=-0\.1: must be in \[0, 1\]"),
        (["on_policy.max_new_tokens=0"], r"on_policy\.max_new_tokens=0: must be at least 1"),
        (["on_policy.temperature=0"], r"on_policy\.temperature=0\.0: must be positive"),
        (["on_policy.fraction=0.5", "teacher_cache.enabled=true"], r"on_policy.*teacher_cache\.enabled=false or on_policy=null"),
        (["on_policy.fraction=0.5", "loss.hidden.weight=1"], r"loss\.hidden\.weight=0 or on_policy=null"),
        (["on_policy.fraction=0.5", "loss.logits.ce_weight=0.1"], r"loss\.logits\.ce_weight"),
        (["on_policy.fraction=0.5", "data.streaming=true", "data.source=train.jsonl"], r"data\.streaming=false or on_policy=null"),
    ],
)
def test_bad_on_policy_settings_fail_at_config_load(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_recipe_config(None, overrides)


def test_on_policy_config_loads_and_the_distiller_checks_the_block_length(tmp_path):
    cfg = load_recipe_config(None, ["on_policy.fraction=0.25", "on_policy.max_new_tokens=8"])
    assert cfg.on_policy == OnPolicyConfig(fraction=0.25, max_new_tokens=8, temperature=1.0)
    assert load_recipe_config(None, []).on_policy is None
    with pytest.raises(ConfigError, match=rf"on_policy\.max_new_tokens={SEQ} must be below data\.seq_len={SEQ}"):
        _distiller(tmp_path / "run", on_policy={"max_new_tokens": SEQ})


# ---------------------------------------------------------------------------------------------- DDP


@pytest.mark.slow
@pytest.mark.parametrize("launch", ["ddp", "fsdp2", "zero3"])
def test_two_processes_match_one_process_on_policy(tmp_path, launch):
    """2-process DDP, FSDP2 with the student generating from its shards (the root's weights gathered around
    ``generate_student``) and ZeRO-3 (each layer's partitions gathered by DeepSpeed's module hooks as it runs)
    equal one process."""
    from test_distributed import LAUNCH, WRAPPER, _accelerate, _env, _free_port, _launch, _state, _train_records
    from train_scripts.tiny_setup import make_student_dir, make_teacher_dir, tiny_overrides

    teacher = make_teacher_dir(tmp_path / "teacher")
    student = make_student_dir(teacher, tmp_path / "student")
    runs = {}
    port = str(_free_port())
    two = (_accelerate("--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--main_process_port", port) if launch == "ddp"
           else _accelerate("--config_file", str(LAUNCH / f"{launch}.yaml"), "--num_processes", "2", "--main_process_port", port))
    for name, launcher in (("single", [sys.executable]), (launch, two)):
        overrides = tiny_overrides(tmp_path / "runs", teacher, student, run_name=name, **{
            "train.max_steps": 4, "train.save_every": 0, "train.seed": 2, "eval.max_blocks": 2, "loss.logits.divergence": "jsd",
            "on_policy.fraction": 0.5, "on_policy.max_new_tokens": 8, "on_policy.temperature": 1.0,
        })
        _launch([*launcher, str(WRAPPER), *overrides], _env(tmp_path, sharded=name in ("fsdp2", "zero3")), f"{name} run")
        runs[name] = (_train_records(tmp_path / "runs" / name), _state(tmp_path / "runs" / name / "model"))
    (ref, ref_state), (got, state) = runs["single"], runs[launch]
    assert [r["on_policy_share"] for r in ref] == [0.0, 1.0, 0.0, 1.0]  # seed 2 generates micro-batches 1 and 3
    assert [r["on_policy_share"] for r in got] == [r["on_policy_share"] for r in ref]
    for a, b in zip(ref, got):
        assert b["loss/logits"] == pytest.approx(a["loss/logits"], rel=5e-5, abs=1e-8), f"step {a['step']}"
    for name, w in ref_state.items():
        assert (state[name] - w).abs().max().item() <= 2e-5, name
