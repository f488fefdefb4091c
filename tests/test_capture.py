"""FeatureCapture: captured features against the model's own outputs (eager attention maps, hidden states)."""

from __future__ import annotations

import copy
import gc
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from conftest import MODEL_TYPES, tiny_model

from minidistill.adapters import get_adapter
from minidistill.distill.capture import CaptureError, CaptureSpec, FeatureCapture
from minidistill.distill.losses.attention import AttentionTransferLoss

# Per type: extra config so that sliding-window layers are exercised (sequence 24 > window).
EXTRA = {
    "mistral": dict(sliding_window=8),
    "gemma3_text": dict(layer_types=["sliding_attention", "full_attention", "sliding_attention"]),
}
LENGTH = 24


def _model(model_type, **kw):
    return tiny_model(model_type, num_layers=3, **{**EXTRA.get(model_type, {}), **kw})


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 128, (2, LENGTH), generator=g)
    mask = torch.ones(2, LENGTH, dtype=torch.long)
    mask[1, :5] = 0  # left padding in the second row
    return ids, mask


def rebuilt_attention(q, k, layout, mask):
    """softmax(q k^T * scaling + causal / sliding / padding mask), GQA keys repeated; [B, H, T, T]."""
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    scores = (q @ k.transpose(-1, -2)) * layout.scaling
    pos = torch.arange(q.shape[2])
    allowed = pos[None, :] <= pos[:, None]
    if layout.sliding_window is not None:
        allowed = allowed & (pos[:, None] - pos[None, :] < layout.sliding_window)
    allowed = allowed[None, None] & mask.bool()[:, None, None, :]
    return scores.masked_fill(~allowed, float("-inf")).softmax(-1)


def _eager_copy(model):
    ref = copy.deepcopy(model)
    ref.set_attn_implementation("eager")
    return ref


def test_rebuilt_attention_maps_equal_eager_attention_weights(model_type):
    model = _model(model_type)
    assert model.config._attn_implementation == "sdpa"
    ids, mask = _inputs()
    layers = [0, 1, 2]
    with torch.no_grad(), FeatureCapture(model, CaptureSpec(layers=layers, queries=True, keys=True)) as cap:
        model(ids, attention_mask=mask, use_cache=False)
    with torch.no_grad():
        ref = _eager_copy(model)(ids, attention_mask=mask, use_cache=False, output_attentions=True)
    windows = {cap.attention[i].sliding_window for i in layers}
    if model_type in EXTRA:
        assert any(w is not None and w < LENGTH for w in windows), windows
    valid = mask.bool()
    for i in layers:
        maps = rebuilt_attention(cap.queries[i], cap.keys[i], cap.attention[i], mask)
        # Compare real query rows (padded rows are undefined / implementation specific).
        torch.testing.assert_close(maps[0], ref.attentions[i][0], atol=1e-6, rtol=0)
        torch.testing.assert_close(maps[1][:, valid[1]], ref.attentions[i][1][:, valid[1]], atol=1e-6, rtol=0)


def test_captured_qkv_under_sdpa_equal_eager_and_hidden_states_match(model_type):
    model = _model(model_type)
    ref = _eager_copy(model)
    ids, mask = _inputs(1)
    spec = CaptureSpec(layers=[0, 1, 2], queries=True, keys=True, values=True)
    with torch.no_grad():
        with FeatureCapture(model, spec) as cap:
            out = model(ids, attention_mask=mask, use_cache=False, output_hidden_states=True)
        with FeatureCapture(ref, spec) as cap_ref:
            ref(ids, attention_mask=mask, use_cache=False)
    cfg = get_adapter(model).shape(model.config)
    for i in spec.layers:
        assert cap.queries[i].shape == (2, cfg["num_heads"], LENGTH, cfg["head_dim"])
        assert cap.keys[i].shape == cap.values[i].shape == (2, cfg["num_kv_heads"], LENGTH, cfg["head_dim"])
        for got, want in ((cap.queries, cap_ref.queries), (cap.keys, cap_ref.keys), (cap.values, cap_ref.values)):
            # Padded positions differ between implementations (fully masked rows); real tokens must not.
            # Layer 0 sees identical inputs; deeper layers inherit kernel rounding differences.
            tol = dict(atol=0, rtol=0) if i == 0 else dict(atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(got[i][0], want[i][0], **tol)
            torch.testing.assert_close(got[i][1][:, 5:], want[i][1][:, 5:], **tol)
    # hidden_states[i + 1] is the output of layer i, except the last entry, taken after the final norm.
    hs = out.hidden_states
    assert len(hs) == 4
    torch.testing.assert_close(cap.hidden[0], hs[1], atol=0, rtol=0)
    torch.testing.assert_close(cap.hidden[1], hs[2], atol=0, rtol=0)
    assert not torch.allclose(cap.hidden[2], hs[3])
    final_norm = model.get_submodule(get_adapter(model).final_norm)
    torch.testing.assert_close(final_norm(cap.hidden[2]), hs[3], atol=1e-6, rtol=0)


def test_capture_leaves_the_model_as_it_was_even_on_error():
    model = _model("qwen3")
    ids, _ = _inputs()
    with torch.no_grad():
        before = model(ids, use_cache=False).logits
    configs = [layer.self_attn.config for layer in model.model.layers]
    spec = CaptureSpec(layers=[0, 2], queries=True, keys=True, values=True)
    with torch.no_grad(), FeatureCapture(model, spec):
        during = model(ids, use_cache=False).logits
        assert model.model.layers[0].self_attn.config is not model.config  # wrapped
        assert model.model.layers[1].self_attn.config is model.config  # not captured: untouched
        assert model.config._attn_implementation == "sdpa"
    torch.testing.assert_close(during, before, atol=0, rtol=0)
    with pytest.raises(RuntimeError, match="boom"):
        with FeatureCapture(model, spec):
            raise RuntimeError("boom")
    assert [layer.self_attn.config for layer in model.model.layers] == configs
    assert all(c is model.config for c in configs)
    assert all(not layer._forward_hooks for layer in model.model.layers)


def test_nested_and_overlapping_captures_of_two_models():
    teacher, student = _model("llama", seed=0), _model("llama", seed=1)
    ids, mask = _inputs()
    a = FeatureCapture(student, CaptureSpec(layers=[0, 1], queries=True))
    b = FeatureCapture(student, CaptureSpec(layers=[1], keys=True, hidden=False))
    t = FeatureCapture(teacher, CaptureSpec(layers=[2], queries=True))
    with torch.no_grad():
        a.__enter__()
        b.__enter__()
        t.__enter__()
        student(ids, attention_mask=mask, use_cache=False)
        teacher(ids, attention_mask=mask, use_cache=False)
        assert set(a.queries) == {0, 1} and set(b.keys) == {1} and not b.hidden and set(t.queries) == {2}
        assert not torch.allclose(a.queries[1], t.queries[2])
        a.__exit__(None, None, None)  # not in LIFO order: b keeps capturing
        b.clear()
        student(ids, attention_mask=mask, use_cache=False)
        assert set(b.keys) == {1}
        b.__exit__(None, None, None)
        t.__exit__(None, None, None)
    assert all(layer.self_attn.config is student.config for layer in student.model.layers)
    assert all(layer.self_attn.config is teacher.config for layer in teacher.model.layers)


def test_bad_spec_is_rejected():
    model = _model("llama")
    with pytest.raises(CaptureError, match="0..2"):
        FeatureCapture(model, CaptureSpec(layers=[3]))
    with pytest.raises(CaptureError, match="duplicates"):
        FeatureCapture(model, CaptureSpec(layers=[1, 1]))


def _distill_loss(student, teacher, ids, mask, layers=(0, 2)):
    """Attention-transfer + hidden MSE on captured features; the teacher under no_grad."""
    spec = CaptureSpec(layers=list(layers), queries=True, keys=True)
    with torch.no_grad(), FeatureCapture(teacher, spec) as t_cap:
        teacher(ids, attention_mask=mask, use_cache=False)
    with FeatureCapture(student, spec) as s_cap:
        student(ids, attention_mask=mask, use_cache=False)
    assert not t_cap.queries[layers[0]].requires_grad and t_cap.queries[layers[0]].grad_fn is None
    assert s_cap.queries[layers[0]].requires_grad
    loss_fn = AttentionTransferLoss(chunk_queries=7)
    loss = 0.0
    for i in layers:
        lay = s_cap.attention[i]
        loss = loss + loss_fn(
            s_cap.queries[i], s_cap.keys[i], t_cap.queries[i], t_cap.keys[i],
            student_scaling=lay.scaling, teacher_scaling=t_cap.attention[i].scaling,
            attention_mask=mask, sliding_window=lay.sliding_window,
        )
        loss = loss + (s_cap.hidden[i] - t_cap.hidden[i]).pow(2).mean()
    return loss, s_cap


def test_gradient_checkpointing_gives_the_same_gradients_and_keeps_forward_captures(model_type):
    teacher = _model(model_type, seed=0)
    plain = _model(model_type, seed=1).train()
    ckpt = copy.deepcopy(plain)
    ckpt.activation_checkpointing_enable()
    ids, mask = _inputs()
    grads = []
    for student in (plain, ckpt):
        loss, cap = _distill_loss(student, teacher, ids, mask)
        recorded = {i: (cap.queries[i], cap.keys[i]) for i in cap.queries}
        loss.backward()
        # The layer replay during backward does not replace what the forward recorded.
        assert all(cap.queries[i] is q and cap.keys[i] is k for i, (q, k) in recorded.items())
        grads.append({n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    adapter = get_adapter(plain)
    q_name = f"{adapter.layers}.0.{adapter.q_proj or adapter.qkv_proj}.weight"
    assert grads[0][q_name].abs().sum() > 0
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-6, rtol=1e-5)


def test_reentrant_checkpointing_is_rejected():
    model = _model("llama").train()
    model.activation_checkpointing_enable({"use_reentrant": True})
    with pytest.raises(CaptureError, match="use_reentrant"):
        FeatureCapture(model, CaptureSpec(layers=[0], queries=True)).__enter__()
    assert all(not layer._forward_hooks for layer in model.model.layers)
    model.activation_checkpointing_enable({"preserve_rng_state": False})  # use_reentrant left to torch: reentrant
    with pytest.raises(CaptureError, match="use_reentrant"):
        FeatureCapture(model, CaptureSpec(layers=[0], keys=True)).__enter__()
    model.activation_checkpointing_enable({"use_reentrant": False})
    with FeatureCapture(model, CaptureSpec(layers=[0], keys=True)):
        pass


def _is_tensor(obj) -> bool:
    try:
        return isinstance(obj, torch.Tensor)
    except Exception:  # noqa: BLE001 - some proxies raise on isinstance
        return False


def _tensor_census() -> tuple[int, int]:
    """Number of live tensors and their total storage bytes."""
    gc.collect()
    count, storages = 0, {}
    with warnings.catch_warnings():  # isinstance on some deprecated module attributes warns
        warnings.simplefilter("ignore")
        objects = gc.get_objects()
        tensors = [obj for obj in objects if _is_tensor(obj)]
    del objects
    for obj in tensors:
        count += 1
        try:
            storage = obj.untyped_storage()
        except RuntimeError:  # tensors without storage (e.g. meta or wrapper subclasses)
            continue
        storages[storage.data_ptr()] = storage.nbytes()
    return count, sum(storages.values())


@pytest.mark.slow
def test_capture_retains_nothing_across_training_steps():
    """20 training steps under captures held open: live tensors and their storage do not grow after warm-up."""
    teacher = _model("qwen2", seed=0)
    student = _model("qwen2", seed=1).train()
    student.activation_checkpointing_enable()
    opt = torch.optim.AdamW(student.parameters(), lr=1e-3)
    loss_fn = AttentionTransferLoss(chunk_queries=7)
    ids, mask = _inputs()
    spec = CaptureSpec(layers=[0, 2], queries=True, keys=True, values=True)
    census = []
    with FeatureCapture(teacher, spec) as t_cap, FeatureCapture(student, spec) as s_cap:
        for step in range(20):
            with torch.no_grad():
                teacher(ids, attention_mask=mask, use_cache=False)
            student(ids, attention_mask=mask, use_cache=False)
            loss = sum(
                loss_fn(s_cap.queries[i], s_cap.keys[i], t_cap.queries[i], t_cap.keys[i], student_scaling=0.25,
                        teacher_scaling=0.25, attention_mask=mask)
                + (s_cap.hidden[i] - t_cap.hidden[i]).pow(2).mean()
                for i in spec.layers
            )
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            del loss
            if step % 2:  # the next forward replaces the captures; clearing in between must change nothing either
                s_cap.clear()
                t_cap.clear()
            if step in (6, 12, 18):  # captures held (not cleared); a census scans every object: only a few
                census.append(_tensor_census())
    assert len(set(census)) == 1, census


FSDP_SCRIPT = textwrap.dedent(
    """
    import os, sys, torch, torch.distributed as dist
    sys.path.insert(0, sys.argv[1])
    from conftest import tiny_model
    from torch.distributed.fsdp import fully_shard
    from minidistill.distill.capture import CaptureSpec, FeatureCapture

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[2])
    dist.init_process_group("gloo", rank=0, world_size=1)
    ids = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    spec = CaptureSpec(layers=[0, 1], queries=True, keys=True)
    results = []
    for shard in (False, True):
        model = tiny_model("llama", seed=1).train()
        if shard:
            for layer in model.model.layers:
                fully_shard(layer)
            fully_shard(model)
            assert type(model.model.layers[0]).__name__.startswith("FSDP")
        with FeatureCapture(model, spec) as cap:
            model(ids, use_cache=False)
        loss = sum((cap.queries[i] @ cap.keys[i].repeat_interleave(2, 1).transpose(-1, -2)).square().mean() for i in (0, 1))
        loss = loss + cap.hidden[1].square().mean()
        loss.backward()
        grad = model.model.layers[0].self_attn.q_proj.weight.grad
        grad = grad.full_tensor() if hasattr(grad, "full_tensor") else grad
        results.append((cap.queries[1].detach().clone(), cap.hidden[1].detach().clone(), grad.clone()))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    assert results[0][2].abs().sum() > 0
    dist.destroy_process_group()
    print("FSDP2 OK")
    """
)


@pytest.mark.slow
def test_capture_under_fsdp2_fully_shard(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = tmp_path / "fsdp_capture.py"
    script.write_text(FSDP_SCRIPT)
    tests_dir = Path(__file__).parent
    proc = subprocess.run(
        [sys.executable, str(script), str(tests_dir), str(port)],
        capture_output=True, text=True, timeout=300, cwd=tests_dir.parent,
    )
    assert proc.returncode == 0 and "FSDP2 OK" in proc.stdout, proc.stdout + proc.stderr


def test_capture_through_a_ddp_like_wrapper():
    model = _model("phi3")

    class Wrapper(torch.nn.Module):  # what DDP / DeepSpeed engines look like: the model under .module, no config
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, *args, **kwargs):
            return self.module(*args, **kwargs)

    ids, mask = _inputs()
    with torch.no_grad(), FeatureCapture(Wrapper(model), CaptureSpec(layers=[1], queries=True)) as cap:
        Wrapper(model)(ids, attention_mask=mask, use_cache=False)
    assert cap.model is model and cap.queries[1].shape[2] == LENGTH
    assert cap.features(1).keys() == {"q"} and cap.features(1)["q"] is cap.queries[1]
    with pytest.raises(KeyError, match="layer 0"):
        cap.features(0)


@pytest.mark.parametrize("model_type", ["llama", "gemma3_text"])
def test_attention_loss_on_captured_features_equals_kl_of_eager_maps(model_type):
    """End to end: a 2-head student against teacher heads [2, 3] (KV group 1), with padding and sliding layers."""
    teacher = _model(model_type, seed=0)
    student = _model(model_type, seed=1, num_heads=2, num_kv_heads=1)
    teacher_heads = [2, 3]
    ids, mask = _inputs(2)
    spec = CaptureSpec(layers=[0, 1], queries=True, keys=True, hidden=False)
    with torch.no_grad():
        with FeatureCapture(teacher, spec) as t_cap:
            teacher(ids, attention_mask=mask, use_cache=False)
        with FeatureCapture(student, spec) as s_cap:
            student(ids, attention_mask=mask, use_cache=False)
        t_maps = _eager_copy(teacher)(ids, attention_mask=mask, use_cache=False, output_attentions=True).attentions
        s_maps = _eager_copy(student)(ids, attention_mask=mask, use_cache=False, output_attentions=True).attentions
    valid = mask.bool()
    loss_fn = AttentionTransferLoss(chunk_queries=5)
    for i in spec.layers:
        assert s_cap.attention[i].sliding_window == t_cap.attention[i].sliding_window
        got = loss_fn(
            s_cap.queries[i], s_cap.keys[i], t_cap.queries[i], t_cap.keys[i],
            student_scaling=s_cap.attention[i].scaling, teacher_scaling=t_cap.attention[i].scaling,
            teacher_heads=teacher_heads, attention_mask=mask, sliding_window=s_cap.attention[i].sliding_window,
        )
        p = t_maps[i][:, teacher_heads].double()
        q = s_maps[i].double()
        kl_rows = torch.where(p > 0, p * (p.log() - q.log()), 0.0).sum(-1)  # [B, 2, T]
        want = kl_rows[valid[:, None, :].expand_as(kl_rows)].mean()
        assert want > 1e-4
        torch.testing.assert_close(got.double(), want, atol=1e-8, rtol=1e-4)


@pytest.mark.slow
def test_bundled_teacher_rebuilt_maps_equal_eager_weights():
    """SmolLM2-135M (9 query heads, 3 KV heads) under SDPA: rebuilt maps equal its eager attention weights
    (deeper layers carry the rounding differences of the two kernels in earlier layers, hence atol 1e-5)."""
    from minidistill.models import ModelConfig, load_model

    model = load_model(ModelConfig())
    assert model.config._attn_implementation == "sdpa"
    ids = torch.randint(100, 40000, (1, 48), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    layers = [0, 15, 29]
    with torch.no_grad(), FeatureCapture(model, CaptureSpec(layers=layers, queries=True, keys=True, values=True)) as cap:
        model(ids, use_cache=False)
    model.set_attn_implementation("eager")
    with torch.no_grad():
        ref = model(ids, use_cache=False, output_attentions=True)
    for i in layers:
        assert cap.queries[i].shape == (1, 9, 48, 64) and cap.values[i].shape == (1, 3, 48, 64)
        maps = rebuilt_attention(cap.queries[i], cap.keys[i], cap.attention[i], mask)
        torch.testing.assert_close(maps, ref.attentions[i], atol=1e-5, rtol=0)


def test_relation_loss_on_captured_features_of_models_with_different_head_counts():
    from test_relations import naive_relation_kl

    from minidistill.distill.losses.relations import RelationLoss

    teacher = _model("qwen3", seed=0)  # 4 heads, 2 KV heads
    student = _model("qwen3", seed=1, num_heads=2, num_kv_heads=1).train()
    ids, mask = _inputs(3)
    spec = CaptureSpec(layers=[1], queries=True, keys=True, values=True, hidden=False)
    with torch.no_grad(), FeatureCapture(teacher, spec) as t_cap:
        teacher(ids, attention_mask=mask, use_cache=False)
    with FeatureCapture(student, spec) as s_cap:
        student(ids, attention_mask=mask, use_cache=False)
    loss = RelationLoss(2, chunk_queries=5)(s_cap.features(1), t_cap.features(1), attention_mask=mask)
    ref = naive_relation_kl(s_cap.features(1), t_cap.features(1), ("qq", "kk", "vv"), 2, mask)
    torch.testing.assert_close(loss.double(), ref, atol=1e-8, rtol=1e-5)
    loss.backward()
    assert student.model.layers[1].self_attn.v_proj.weight.grad.abs().sum() > 0
    assert student.model.layers[1].self_attn.q_norm.weight.grad.abs().sum() > 0
