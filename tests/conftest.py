"""Shared fixtures: tiny models of every supported architecture, built from a config (never the Hub)."""

from __future__ import annotations

import os

import pytest
import torch
from transformers import AutoModelForCausalLM, Gemma3TextConfig, LlamaConfig, MistralConfig, Phi3Config, Qwen2Config, Qwen3Config

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

_CONFIGS = {
    "llama": LlamaConfig,
    "mistral": MistralConfig,
    "qwen2": Qwen2Config,
    "qwen3": Qwen3Config,
    "phi3": Phi3Config,
    "gemma3_text": Gemma3TextConfig,
}
MODEL_TYPES = tuple(_CONFIGS)


def tiny_config(
    model_type: str = "llama",
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    head_dim: int = 16,
    intermediate_size: int = 96,
    vocab_size: int = 128,
    tie_word_embeddings: bool = False,
    **extra,
):
    """A tiny config of ``model_type`` (eager-compatible, float32)."""
    kwargs = dict(
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=head_dim,
        intermediate_size=intermediate_size,
        vocab_size=vocab_size,
        max_position_embeddings=256,
        tie_word_embeddings=tie_word_embeddings,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    if model_type == "phi3":
        kwargs.pop("head_dim")  # phi3 derives head_dim from hidden_size / heads
        kwargs["hidden_size"] = num_heads * head_dim
    if model_type == "gemma3_text":
        kwargs.update(sliding_window=16, query_pre_attn_scalar=head_dim)
    kwargs.update(extra)
    return _CONFIGS[model_type](**kwargs)


def tiny_model(model_type: str = "llama", *, seed: int = 0, dtype=torch.float32, **kw):
    """A randomly initialised tiny causal LM in eval mode."""
    torch.manual_seed(seed)
    cfg = tiny_config(model_type, **kw)
    model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    # Non-trivial norm weights so that channel selection shows in the outputs.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


@pytest.fixture(params=MODEL_TYPES)
def model_type(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def tiny_folders(tmp_path_factory):
    """(root, teacher folder, student folder): the tiny teacher of ``train_scripts.tiny_setup`` and a student pruned
    from it with its prune map, shared by a test module's recipe runs."""
    from train_scripts.tiny_setup import make_student_dir, make_teacher_dir

    root = tmp_path_factory.mktemp("tiny")
    teacher = make_teacher_dir(root / "teacher")
    return root, teacher, make_student_dir(teacher, root / "student")
