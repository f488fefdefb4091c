"""Saving pruned students atomically, reloading them with plain transformers, and rebuilding from the map."""

from __future__ import annotations

import copy
import json
from dataclasses import replace

import pytest
import torch
from conftest import tiny_model
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from minidistill.adapters import get_adapter
from minidistill.models import state_dict_sha256
from minidistill.prune.apply import apply_prune_map
from minidistill.prune.importance import random_importance
from minidistill.prune.prune_map import PRUNE_MAP_FILENAME, PruneMap, PruneMapError
from minidistill.prune.reconstruct import ReconstructionConfig, reconstruct
from minidistill.prune.save import rebuild_student, save_student
from minidistill.prune.select import select_units


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    """A 128-token word-level tokenizer built locally (no Hub)."""
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, 128)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def pruned_student(model_type: str, ratio: int, tied: bool):
    """A teacher with 8 heads / 8 // ratio KV groups, and a student pruned in every dimension and re-fitted."""
    teacher = tiny_model(
        model_type, num_layers=3, num_heads=8, num_kv_heads=8 // ratio, head_dim=8, tie_word_embeddings=tied
    )
    teacher.generation_config.max_new_tokens = 7
    t = get_adapter(teacher).shape(teacher.config)
    kv = max(1, t["num_kv_heads"] // 2)
    shape = dict(t, num_layers=2, hidden_size=t["hidden_size"] - 8, num_kv_heads=kv, num_heads=kv * min(ratio, 2), intermediate_size=50)
    info = {"source": "tiny", "sha256": state_dict_sha256(teacher)}
    pmap = select_units(teacher, random_importance(teacher), shape, teacher_info=info)
    student = apply_prune_map(teacher, pmap)
    g = torch.Generator().manual_seed(0)
    calibration = [torch.randint(0, 128, (4, 16), generator=g) for _ in range(2)]
    assert reconstruct(student, teacher, pmap, calibration, ReconstructionConfig())
    return teacher, student, pmap


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("ratio", [1, 2, 4], ids=["mha", "gqa2", "gqa4"])
def test_save_reload_and_rebuild_round_trip(model_type, ratio, tied, tokenizer, tmp_path):
    teacher, student, pmap = pruned_student(model_type, ratio, tied)
    out = save_student(student, tokenizer, pmap, tmp_path / "student", extra_files={"notes.txt": "hello\n"})

    files = sorted(p.name for p in out.iterdir())
    assert PRUNE_MAP_FILENAME in files and "generation_config.json" in files and "notes.txt" in files
    assert any(f.endswith(".safetensors") for f in files)
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pth", ".pkl"))]
    assert [p.name for p in tmp_path.iterdir()] == ["student"], "no temporary folder may be left behind"
    assert json.loads((out / "generation_config.json").read_text())["max_new_tokens"] == 7
    assert PruneMap.load(out).to_dict() == pmap.to_dict()

    reloaded, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    reloaded.eval()
    a = get_adapter(reloaded)
    assert a.shape(reloaded.config) == pmap.student_shape
    assert (reloaded.get_submodule(a.lm_head).weight is reloaded.get_submodule(a.embed_tokens).weight) == tied
    ids = torch.randint(3, 128, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = student(ids).logits
        assert torch.equal(reloaded(ids).logits, want)
        generated = reloaded.generate(ids, do_sample=False, pad_token_id=0)
        assert generated.shape == (2, 17)  # max_new_tokens from the teacher's generation config
        assert torch.equal(generated, student.generate(ids, do_sample=False, pad_token_id=0))
    assert PreTrainedTokenizerFast.from_pretrained(out)("w5 w9")["input_ids"] == tokenizer("w5 w9")["input_ids"] == [5, 9]

    rebuilt = rebuild_student(teacher, out)
    rebuilt_params = dict(rebuilt.named_parameters())
    for name, value in student.named_parameters():
        assert torch.equal(rebuilt_params[name], value), name
    assert set(rebuilt_params) == set(dict(student.named_parameters()))


def test_save_refuses_non_empty_output_and_overwrites_atomically(tokenizer, tmp_path, monkeypatch):
    teacher, student, pmap = pruned_student("llama", 2, False)
    target = tmp_path / "out"
    target.mkdir()  # an empty folder is fine
    save_student(student, tokenizer, pmap, target)
    with pytest.raises(FileExistsError, match="overwrite"):
        save_student(student, tokenizer, pmap, target)

    # A crash while writing the new version leaves the old one intact and no temporary folder.
    before = {p.name: p.read_bytes() for p in target.iterdir()}

    def crash(self, folder):
        raise OSError("disk full")

    monkeypatch.setattr(PruneMap, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        save_student(student, tokenizer, pmap, target, overwrite=True)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"]

    # Overwrite replaces the whole folder (stale files disappear).
    (target / "stale.txt").write_text("old")
    pmap.notes["run"] = 2
    save_student(student, tokenizer, pmap, target, overwrite=True)
    assert not (target / "stale.txt").exists()
    assert PruneMap.load(target).notes == {"run": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


@pytest.mark.parametrize("name", ["../evil.txt", "sub/x.txt", "config.json", "model.safetensors", PRUNE_MAP_FILENAME])
def test_save_rejects_bad_extra_file_names(tokenizer, tmp_path, name):
    teacher = tiny_model("llama")
    pmap = PruneMap.identity(get_adapter(teacher).shape(teacher.config))
    with pytest.raises(ValueError, match="extra file name"):
        save_student(teacher, tokenizer, pmap, tmp_path / "x", extra_files={name: "x"})
    assert not (tmp_path / "x").exists()


def test_rebuild_refuses_another_teacher(tokenizer, tmp_path):
    teacher, student, pmap = pruned_student("qwen3", 2, False)
    out = save_student(student, None, pmap, tmp_path / "s")
    other = tiny_model("qwen3", seed=5, num_layers=3, num_heads=8, num_kv_heads=4, head_dim=8)
    with pytest.raises(PruneMapError, match="another teacher"):
        rebuild_student(other, out)


def test_rebuild_requires_the_refit_tensors(tokenizer, tmp_path):
    teacher, student, pmap = pruned_student("llama", 2, False)
    pmap.refit.append("model.layers.0.mlp.up_proj.bias")
    out = save_student(student, None, pmap, tmp_path / "s")
    with pytest.raises(PruneMapError, match="up_proj.bias"):
        rebuild_student(teacher, out)


def _trained_copy(student):
    """``student`` after a few optimiser steps' worth of change (seeded noise on every weight)."""
    trained = copy.deepcopy(student)
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    return trained


def test_rebuild_refuses_a_trained_models_map(tmp_path):
    """The exported map (student_weights='trained') is never rebuilt into teacher slices + trained tensors."""
    teacher, student, pmap = pruned_student("llama", 2, False)
    trained = _trained_copy(student)
    out = save_student(trained, None, replace(pmap, student_weights="trained"), tmp_path / "model")
    with pytest.raises(PruneMapError, match=r"initial student of a trained model .*from_pretrained"):
        rebuild_student(teacher, out)
    # An unmarked map next to trained weights (an export written before the field existed) is caught too.
    unmarked = save_student(trained, None, pmap, tmp_path / "old_export")
    with pytest.raises(PruneMapError, match="not the teacher slices the map names"):
        rebuild_student(teacher, unmarked)
    # The untrained student's folder still rebuilds bit-exactly.
    rebuilt = rebuild_student(teacher, save_student(student, None, pmap, tmp_path / "init"))
    for name, value in student.state_dict().items():
        assert torch.equal(rebuilt.state_dict()[name], value), name
