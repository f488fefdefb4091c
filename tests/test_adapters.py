from __future__ import annotations

import pytest
import torch
from conftest import MODEL_TYPES, tiny_config, tiny_model
from transformers import AutoModelForCausalLM, GPT2Config, MixtralConfig

from minidistill.adapters import (
    SUPPORTED_MODEL_TYPES,
    UnsupportedArchitectureError,
    count_parameters,
    count_parameters_for_shape,
    get_adapter,
    lm_head_is_tied,
)

PARTS = ("q_proj", "k_proj", "v_proj", "qkv_proj", "o_proj", "gate_proj", "up_proj", "gate_up_proj", "down_proj")


def test_every_tested_type_is_supported():
    assert set(MODEL_TYPES) == set(SUPPORTED_MODEL_TYPES)


def test_adapter_paths_resolve_with_expected_shapes(model_type):
    model = tiny_model(model_type)
    a = get_adapter(model)
    s = a.shape(model.config)
    hd, H, KV, D, I = s["head_dim"], s["num_heads"], s["num_kv_heads"], s["hidden_size"], s["intermediate_size"]
    layer = a.decoder_layers(model)[0]
    expected_out = {"q_proj": H * hd, "k_proj": KV * hd, "v_proj": KV * hd, "qkv_proj": (H + 2 * KV) * hd,
                    "o_proj": D, "gate_proj": I, "up_proj": I, "gate_up_proj": 2 * I, "down_proj": D}
    for part in PARTS:
        mod = a.layer_part(layer, part)
        if mod is not None:
            assert mod.weight.shape[0] == expected_out[part], part
    # exactly one of separate / fused projections
    assert (a.qkv_proj is None) == (a.q_proj is not None)
    assert (a.gate_up_proj is None) == (a.gate_proj is not None)
    for name in a.layer_hidden_norms + (a.attn_in_norm, a.mlp_in_norm):
        assert layer.get_submodule(name).weight.shape == (D,)
    assert model.get_submodule(a.final_norm).weight.shape == (D,)
    assert len(a.decoder_layers(model)) == s["num_layers"]


@pytest.mark.parametrize("tied", [False, True])
def test_parameter_counts(model_type, tied):
    model = tiny_model(model_type, tie_word_embeddings=tied)
    a = get_adapter(model)
    unique = {id(p): p.numel() for p in model.parameters()}
    assert count_parameters(model) == sum(unique.values())
    emb = model.get_input_embeddings().weight.numel()
    head = 0 if tied else model.get_output_embeddings().weight.numel()
    assert count_parameters(model, non_embedding=True) == count_parameters(model) - emb - head
    assert lm_head_is_tied(model) == tied
    assert count_parameters_for_shape(model.config, a.shape(model.config)) == count_parameters(model)
    smaller = dict(a.shape(model.config), num_layers=1, intermediate_size=32)
    cfg = tiny_config(model_type, tie_word_embeddings=tied, num_layers=1, intermediate_size=32)
    ref = AutoModelForCausalLM.from_config(cfg)
    assert count_parameters_for_shape(model.config, smaller) == count_parameters(ref)


def test_unsupported_and_moe_errors():
    with pytest.raises(UnsupportedArchitectureError, match="supported: .*llama"):
        get_adapter(GPT2Config())
    with pytest.raises(UnsupportedArchitectureError, match="mixture-of-experts"):
        get_adapter(MixtralConfig(num_local_experts=4))


def test_set_shape_writes_head_dim():
    cfg = tiny_config("llama")
    a = get_adapter(cfg)
    a.set_shape(cfg, dict(a.shape(cfg), num_heads=2, num_kv_heads=1))
    assert cfg.head_dim == 16 and cfg.num_attention_heads == 2
    model = AutoModelForCausalLM.from_config(cfg)
    assert model(torch.tensor([[1, 2, 3]])).logits.shape == (1, 3, 128)
