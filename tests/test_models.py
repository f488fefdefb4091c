from __future__ import annotations

import pytest
import torch
from conftest import tiny_model
from transformers import AutoModelForCausalLM

import minidistill.models as models
from minidistill.adapters import UnsupportedArchitectureError
from minidistill.config import ConfigError
from minidistill.models import ModelConfig, check_tokenizer_fits, load_model, load_model_and_tokenizer, state_dict_sha256


@pytest.mark.slow
def test_bundled_teacher_is_a_plain_float_llama():
    model, tok = load_model_and_tokenizer(ModelConfig())
    assert model.config.model_type == "llama" and not getattr(model, "is_quantized", False)
    assert getattr(model.config, "quantization_config", None) is None
    assert model.dtype == torch.float32 and model.config.num_hidden_layers == 30
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=2, do_sample=False)
    assert tok.decode(out[0, ids.shape[1] :]).strip().startswith("Paris")


def test_local_folder_roundtrip_and_trust_remote_code_is_opt_in(tmp_path, monkeypatch):
    ref = tiny_model("qwen3")
    ref.save_pretrained(tmp_path)
    seen = []
    real = AutoModelForCausalLM.from_pretrained

    def spy(*args, **kwargs):
        seen.append(kwargs.get("trust_remote_code"))
        return real(*args, **kwargs)

    monkeypatch.setattr(models.AutoModelForCausalLM, "from_pretrained", spy)
    model = load_model(str(tmp_path))
    assert seen == [False] and not model.training
    assert state_dict_sha256(model) == state_dict_sha256(ref)
    load_model(ModelConfig(source=str(tmp_path), trust_remote_code=True))
    assert seen[-1] is True


def test_hash_changes_with_weights():
    a, b = tiny_model("llama"), tiny_model("llama")
    assert state_dict_sha256(a) == state_dict_sha256(b)
    with torch.no_grad():
        b.model.norm.weight[0] += 1e-6
    assert state_dict_sha256(a) != state_dict_sha256(b)


def test_errors(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedArchitectureError, match="gpt2"):
        load_model(str(tmp_path))
    with pytest.raises(ConfigError, match="dtype"):
        ModelConfig.from_dict({"dtype": "fp8"})

    class Tok:
        def __len__(self):
            return 1000

    with pytest.raises(ValueError, match="tokenizer has 1000 tokens.*128 rows"):
        check_tokenizer_fits(tiny_model("llama"), Tok())


def test_pickled_weights_are_never_loaded(tmp_path):
    from minidistill.models import ModelError

    model = tiny_model("llama")
    model.config.save_pretrained(tmp_path / "pickled")
    torch.save(model.state_dict(), tmp_path / "pickled" / "pytorch_model.bin")  # a pickled checkpoint
    with pytest.raises(ModelError, match="safetensors only"):
        load_model(str(tmp_path / "pickled"))
    model.save_pretrained(tmp_path / "safe")
    loaded = load_model(str(tmp_path / "safe"))
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
