"""GGUF export: transformers' own GGUF loader reads the file back to the source model's logits, with
the tokenizer and the metadata; llama.cpp loads and runs it when llama-cpp-python is installed.

Bounds (max |logit difference| / max |logit| on a 12-token prompt): f32 exact; f16 <= 2e-3;
q8_0 <= 2e-2 (measured 3e-4 and 8e-3 on these tiny models).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import gguf
import pytest
import torch
from conftest import tiny_model
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from minidistill.adapters import UnsupportedArchitectureError, get_adapter
from minidistill.config import ConfigError
from minidistill.errors import OutputError
from minidistill.publish.export_gguf import EXPORTABLE, _pretokenizer, export_gguf, prune_map_summary
from minidistill.models import BUNDLED, ModelError, load_tokenizer, state_dict_sha256
from minidistill.prune.apply import apply_prune_map
from minidistill.prune.importance import random_importance
from minidistill.prune.save import save_student
from minidistill.prune.select import select_units

ROOT = Path(__file__).resolve().parents[1]
BOUND = {"f32": 0.0, "f16": 2e-3, "q8_0": 2e-2}
PROMPT = "The quick brown fox jumps over the lazy dog, 123 times."


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(BUNDLED)


@pytest.fixture(scope="module")
def pruned_run(tokenizer, tmp_path_factory):
    """A run folder ``run/model`` holding a llama student pruned in every dimension (tied embeddings)."""
    teacher = tiny_model("llama", num_layers=3, vocab_size=len(tokenizer), tie_word_embeddings=True)
    shape = dict(get_adapter(teacher).shape(teacher.config), num_layers=2, hidden_size=56, num_heads=2,
                 num_kv_heads=1, intermediate_size=64)
    pmap = select_units(teacher, random_importance(teacher),
                        shape, teacher_info={"source": "tiny-teacher", "sha256": state_dict_sha256(teacher)})
    student = apply_prune_map(teacher, pmap)
    run = tmp_path_factory.mktemp("run")
    save_student(student, tokenizer, pmap, run / "model")
    return run, student, pmap


def _logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits[0].double()


def _reload(path: Path, config=None):
    kwargs = {"config": config} if config is not None else {}
    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32, **kwargs).eval()


@pytest.mark.parametrize("outtype", ["f32", "f16", "q8_0"])
def test_transformers_reads_the_file_back_to_the_source_logits(pruned_run, tokenizer, outtype):
    run, student, pmap = pruned_run
    result = export_gguf(run, run / f"student.{outtype}.gguf", outtype=outtype)
    assert result.path.is_file() and result.architecture == "llama"
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    ref = _logits(student, ids)
    got = _logits(_reload(result.path), ids)
    err = ((got - ref).abs().max() / ref.abs().max()).item()
    assert err <= BOUND[outtype], f"{outtype}: relative logit error {err:.2e} > {BOUND[outtype]}"
    if outtype != "f32":
        assert err > 0  # the matrices really were stored at lower precision

    reader = gguf.GGUFReader(result.path)
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert "output.weight" not in types  # tied lm_head written once, as token_embd
    assert types["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32
    # q8_0 rows must be multiples of 32: hidden 56 falls back to f16, the MLP's 64-wide rows are q8_0
    expect = {"f32": "F32", "f16": "F16", "q8_0": "F16"}[outtype]
    assert types["blk.0.attn_q.weight"].name == expect
    assert types["blk.0.ffn_down.weight"].name == ("Q8_0" if outtype == "q8_0" else expect)


def test_tokenizer_and_metadata_are_in_the_file(pruned_run, tokenizer):
    run, student, pmap = pruned_run
    path = export_gguf(run, run / "meta.gguf", outtype="f32").path
    reader = gguf.GGUFReader(path)

    def field(key):
        return reader.get_field(key).contents()

    assert field("general.architecture") == "llama"
    assert field("llama.block_count") == 2 and field("llama.embedding_length") == 56
    assert field("llama.attention.head_count") == 2 and field("llama.attention.head_count_kv") == 1
    assert field("llama.feed_forward_length") == 64 and field("llama.attention.key_length") == 16
    assert field("minidistill.teacher") == "tiny-teacher"
    assert field("general.base_model.0.name") == "tiny-teacher"
    summary = field("minidistill.prune_map_summary")
    assert summary == prune_map_summary(json.loads((run / "model" / "prune_map.json").read_text()))
    assert f"layers kept {list(pmap.kept_layers)}" in summary and "hidden channels kept 56" in summary
    assert field("tokenizer.ggml.model") == "gpt2" and field("tokenizer.ggml.pre") == "gpt2"
    assert field("tokenizer.ggml.eos_token_id") == tokenizer.eos_token_id
    tokens = field("tokenizer.ggml.tokens")
    assert len(tokens) == len(tokenizer) and tokens[tokenizer.eos_token_id] == tokenizer.eos_token
    assert field("tokenizer.chat_template") == tokenizer.chat_template

    back = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    for text in (PROMPT, "<|im_start|>user\nhi<|im_end|>", "  spaces\tand\nnewlines 3.14"):
        assert back(text).input_ids == tokenizer(text).input_ids, text


def test_bundled_teacher_keeps_its_pretokenizer_name():
    assert _pretokenizer({"pre_tokenizer": {"type": "ByteLevel", "use_regex": True}}, BUNDLED) == "smollm"
    assert _pretokenizer({"pre_tokenizer": {"type": "ByteLevel", "use_regex": True}}, "other") == "gpt2"
    assert _pretokenizer({"pre_tokenizer": {"type": "Metaspace"}}, "other") == "default"


@pytest.mark.parametrize("model_type", [t for t in EXPORTABLE if t != "llama"])
def test_every_exportable_architecture_round_trips_exactly_in_f32(model_type, tokenizer, tmp_path):
    model = tiny_model(model_type, vocab_size=len(tokenizer))
    model.save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    path = export_gguf(tmp_path / "m", tmp_path / "m.gguf", outtype="f32").path
    # transformers' qwen3 GGUF reader does not read attention.key_length (head_dim); give it the config
    config = AutoConfig.from_pretrained(tmp_path / "m") if model_type == "qwen3" else None
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    assert torch.equal(_logits(_reload(path, config), ids), _logits(model, ids))


# ---------------------------------------------------------------- bad input


def test_unsupported_architecture_names_the_exportable_ones(tokenizer, tmp_path):
    model = tiny_model("gemma3_text", vocab_size=len(tokenizer))
    model.save_pretrained(tmp_path / "g")
    with pytest.raises(UnsupportedArchitectureError, match="gemma3_text") as err:
        export_gguf(tmp_path / "g", tmp_path / "g.gguf")
    assert "exportable: " + ", ".join(EXPORTABLE) in str(err.value)
    assert "every 6th layer global" in str(err.value)  # why: llama.cpp's fixed gemma3 layer pattern
    assert not (tmp_path / "g.gguf").exists()


def test_unknown_outtype_and_missing_folder(pruned_run, tmp_path):
    run, _, _ = pruned_run
    with pytest.raises(ConfigError, match="choose one of f32, f16, q8_0"):
        export_gguf(run, tmp_path / "x.gguf", outtype="q4_k")
    with pytest.raises(ModelError, match="no such folder"):
        export_gguf(tmp_path / "nope", tmp_path / "x.gguf")
    with pytest.raises(ModelError, match="neither a model folder"):
        export_gguf(tmp_path, tmp_path / "x.gguf")


def test_existing_output_is_refused_unless_overwrite_and_a_failed_write_leaves_nothing(pruned_run, tmp_path, monkeypatch):
    run, _, _ = pruned_run
    out = tmp_path / "m.gguf"
    out.write_bytes(b"old")
    with pytest.raises(OutputError, match="--overwrite"):
        export_gguf(run, out)
    assert out.read_bytes() == b"old"

    import minidistill.publish.export_gguf as mod

    def broken(*args, **kwargs):
        yield from ()
        raise RuntimeError("disk full")

    monkeypatch.setattr(mod, "_tensors", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        export_gguf(run, out, overwrite=True)
    assert out.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]
    monkeypatch.undo()
    export_gguf(run, out, overwrite=True, outtype="f32")
    assert gguf.GGUFReader(out).get_field("general.architecture").contents() == "llama"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]


def test_recipe_script_exit_codes(pruned_run, tmp_path):
    run, _, _ = pruned_run
    script = [sys.executable, str(ROOT / "recipes" / "export_gguf.py")]
    bad = subprocess.run(script + [str(run), "--outtype", "q4"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and bad.stderr.startswith("error [config, exit 2]: --outtype 'q4'")
    out = tmp_path / "s.gguf"
    ok = subprocess.run(script + [str(run), "--outtype", "q8_0", "--output", str(out)], capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert ok.stdout.strip() == str(out) and out.is_file()
    again = subprocess.run(script + [str(run), "--output", str(out)], capture_output=True, text=True, timeout=300)
    assert again.returncode == 11 and "exists; pass --overwrite" in again.stderr


# ---------------------------------------------------------------- llama.cpp itself


def test_llama_cpp_loads_the_file_and_generates(pruned_run, tokenizer):
    """Runs when llama-cpp-python is installed (``pip install .[gguf-runtime]``); skipped otherwise."""
    llama_cpp = pytest.importorskip("llama_cpp")
    run, student, _ = pruned_run
    path = export_gguf(run, run / "llama_cpp.f32.gguf", outtype="f32", overwrite=True).path
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, n_threads=1, logits_all=True, verbose=False)
    ids = tokenizer(PROMPT).input_ids
    assert llm.tokenize(PROMPT.encode(), add_bos=False, special=True) == ids  # same tokenizer in llama.cpp
    llm.eval(ids)
    got = torch.tensor(llm.scores[: len(ids)], dtype=torch.float64)
    ref = _logits(student, torch.tensor([ids]))
    assert ((got - ref).abs().max() / ref.abs().max()).item() <= 1e-3
    # greedy generation: llama.cpp's tokens equal transformers' greedy tokens
    new = 6
    with torch.no_grad():
        expected = student.generate(torch.tensor([ids]), max_new_tokens=new, do_sample=False, eos_token_id=None)[0, len(ids):]
    llm.reset()
    generated = []
    for token in llm.generate(ids, top_k=1, temp=0.0, reset=True):
        generated.append(token)
        if len(generated) == new:
            break
    assert generated == expected.tolist()


# ---------------------------------------------------------------- the recipe's export.gguf option


def test_recipe_option_export_gguf(pruned_run, tmp_path):
    from minidistill.publish.export_gguf import export_run
    from minidistill.recipe_config import incompatible_fields, load_recipe_config

    cfg = load_recipe_config(None, ["export.gguf=q8_0"])
    assert cfg.export.gguf == "q8_0" and load_recipe_config(None, []).export.gguf is None
    with pytest.raises(ConfigError, match=r"export\.gguf='q4'.*\['f32', 'f16', 'q8_0'\]"):
        load_recipe_config(None, ["export.gguf=q4"])
    assert incompatible_fields(load_recipe_config(None, []).to_dict(), cfg.to_dict()) == []  # a resume may add it
    run, _, _ = pruned_run
    assert export_run(load_recipe_config(None, []).export, run / "model", tmp_path, teacher="t") is None
    path = export_run(cfg.export, run / "model", tmp_path, teacher="t")
    assert path == tmp_path / "model.q8_0.gguf"
    assert gguf.GGUFReader(path).get_field("minidistill.teacher").contents() == "t"
