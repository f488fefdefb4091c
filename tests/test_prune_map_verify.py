"""A student's prune_map.json is verified wherever it is used: parse, teacher, student config, student weights."""

from __future__ import annotations

import copy
import json
from dataclasses import replace

import pytest
import torch
from conftest import tiny_model
from train_scripts.tiny_setup import half_map

from minidistill import models
from minidistill.errors import MinidistillError
from minidistill.models import state_dict_sha256
from minidistill.prune import save as save_module
from minidistill.prune.apply import apply_prune_map
from minidistill.prune.prune_map import PRUNE_MAP_FILENAME, PruneMap, PruneMapError
from minidistill.prune.save import save_student, teacher_sha256, verify_student_map, weight_mismatches
from minidistill.train import _prune_map_for


@pytest.fixture(scope="module")
def teacher():
    return tiny_model("llama", num_layers=3)


@pytest.fixture
def student_dir(teacher, tmp_path):
    """The half-size student of ``teacher`` saved with a map that records the teacher's hash."""
    pmap = half_map(teacher)
    pmap.teacher = {**pmap.teacher, "sha256": state_dict_sha256(teacher), "model_type": "llama"}
    return save_student(apply_prune_map(teacher, pmap), None, pmap, tmp_path / "student")


def _edit_map(folder, **changes):
    path = folder / PRUNE_MAP_FILENAME
    data = json.loads(path.read_text())
    for dotted, value in changes.items():
        target = data
        *parents, last = dotted.split("__")
        for p in parents:
            target = target[int(p)] if isinstance(target, list) else target[p]
        target[last] = value
    path.write_text(json.dumps(data))
    return path


def _refused(teacher, folder, *patterns):
    with pytest.raises(PruneMapError) as info:
        verify_student_map(teacher, folder)
    message = str(info.value)
    assert str(folder / PRUNE_MAP_FILENAME) in message or str(folder / "config.json") in message, message
    for p in patterns:
        assert p in message, message
    assert isinstance(info.value, MinidistillError)
    return message


def test_the_right_map_is_accepted_and_equals_the_saved_one(teacher, student_dir):
    pmap = verify_student_map(teacher, student_dir)
    assert pmap.to_dict() == PruneMap.load(student_dir).to_dict()
    assert weight_mismatches(teacher, pmap, student_dir) == []
    assert _prune_map_for(str(student_dir), teacher).to_dict() == pmap.to_dict()


def test_another_teacher_of_the_same_shape_is_refused_by_hash(teacher, student_dir):
    other = tiny_model("llama", num_layers=3, seed=1)
    _refused(other, student_dir, "was made from another teacher", f"{state_dict_sha256(teacher)[:12]}...",
             f"{state_dict_sha256(other)[:12]}...", "delete")
    with pytest.raises(PruneMapError, match="made from another teacher"):
        _prune_map_for(str(student_dir), other)


def test_another_teacher_without_a_recorded_hash_is_refused_by_the_weights(teacher, student_dir):
    _edit_map(student_dir, teacher__sha256=None)
    other = tiny_model("llama", num_layers=3, seed=1)
    _refused(other, student_dir, "not the teacher slices the map names", "model.")
    assert verify_student_map(teacher, student_dir).teacher["sha256"] is None  # the right teacher still passes


def test_a_teacher_of_another_shape_is_refused(student_dir):
    wider = tiny_model("llama", num_layers=4)
    _refused(wider, student_dir, "made for a teacher of shape", "delete")


@pytest.mark.parametrize(
    "edit,expected",
    [
        ({"kept_layers": [0, 3]}, "kept_layers has indices outside [0, 3): [3]"),
        ({"kept_layers": [2, 0]}, "kept_layers must be sorted ascending"),
        ({"kept_layers": [2, 2]}, "kept_layers repeats the indices [2]"),
        ({"kept_layers": [0, "2"]}, "kept_layers must be a list of integers"),
        ({"layers__0__kept_neurons": list(range(64, 96)) + list(range(64, 96))}, "repeats the indices"),
    ],
    ids=["out_of_range", "unsorted", "duplicate", "not_int", "duplicate_neurons"],
)
def test_edited_indices_are_refused_naming_the_file(teacher, student_dir, edit, expected):
    _edit_map(student_dir, **edit)
    message = _refused(teacher, student_dir, expected, "edited or damaged", "recipes/prune.py")
    assert message.startswith(str(student_dir / PRUNE_MAP_FILENAME))


@pytest.mark.parametrize(
    "edit",
    [{"kept_layers": [1, 2]}, {"kept_hidden": list(range(1, 49))}, {"layers__1__kept_neurons": list(range(64))},
     {"layers__0__kept_kv_groups": [0], "layers__0__kept_query_heads": [0, 1]}],
    ids=["layers", "hidden", "neurons", "heads"],
)
def test_valid_but_edited_indices_are_caught_by_the_student_weights(teacher, student_dir, edit):
    _edit_map(student_dir, **edit)
    _refused(teacher, student_dir, "not the teacher slices the map names", "edited")


def test_student_shape_that_contradicts_config_json(teacher, student_dir):
    config = json.loads((student_dir / "config.json").read_text())
    (student_dir / "config.json").write_text(json.dumps({**config, "intermediate_size": 80}))
    _refused(teacher, student_dir, "student_shape contradicts", "intermediate_size: map 64, config 80")


@pytest.mark.parametrize(
    "content,expected",
    [(b'{"version": 1, "teacher": ', "is not valid JSON (Expecting value at line 1"), (b"\xff\xfe{}", "is not UTF-8"),
     (b"[1, 2]", "a JSON object is expected"), (b'{"version": 1}', "the key 'layers' is missing"), (b"", "is not valid JSON")],
    ids=["truncated", "not_utf8", "list", "missing_key", "empty"],
)
def test_parse_errors_name_the_file(teacher, student_dir, content, expected):
    (student_dir / PRUNE_MAP_FILENAME).write_bytes(content)
    message = _refused(teacher, student_dir, expected)
    assert message.startswith(str(student_dir / PRUNE_MAP_FILENAME))


def test_a_trained_student_passes_only_with_a_map_that_says_so(teacher, student_dir):
    weights = save_module._safetensors_files(student_dir)
    from safetensors.torch import load_file, save_file

    file = next(iter(set(weights.values())))
    tensors = load_file(file)
    g = torch.Generator().manual_seed(3)
    save_file({k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in tensors.items()}, str(file), metadata={"format": "pt"})
    _refused(teacher, student_dir, "not the teacher slices the map names", '"student_weights": "trained"')
    path = _edit_map(student_dir, student_weights="trained")
    pmap = verify_student_map(teacher, student_dir)  # the teacher hash still holds; the weights are not compared
    assert pmap.student_weights == "trained" and PruneMap.load(path).student_weights == "trained"
    _refused(tiny_model("llama", num_layers=3, seed=1), student_dir, "made from another teacher")
    _edit_map(student_dir, student_weights="finetuned")
    _refused(teacher, student_dir, "student_weights='finetuned'")


def test_map_without_student_weights_reads_as_pruned(teacher, student_dir):
    data = json.loads((student_dir / PRUNE_MAP_FILENAME).read_text())
    del data["student_weights"]
    (student_dir / PRUNE_MAP_FILENAME).write_text(json.dumps(data))
    assert verify_student_map(teacher, student_dir).student_weights == "pruned"


def test_teacher_hash_is_computed_once_per_unchanged_model(monkeypatch):
    model = tiny_model("llama", num_layers=2, seed=4)
    calls = []
    real = models.state_dict_sha256

    def counting(m):
        calls.append(1)
        return real(m)

    monkeypatch.setattr(save_module, "state_dict_sha256", counting)
    first = teacher_sha256(model)
    assert teacher_sha256(model) == first == real(model) and len(calls) == 1
    with torch.no_grad():
        next(model.parameters()).add_(1.0)  # in place: the cached hash is stale
    assert teacher_sha256(model) == real(model) != first and len(calls) == 2


def test_student_without_a_map_has_none(teacher, student_dir):
    (student_dir / PRUNE_MAP_FILENAME).unlink()
    assert _prune_map_for(str(student_dir), teacher) is None


def test_sampled_comparison_tolerates_a_teacher_in_another_dtype(teacher, student_dir):
    _edit_map(student_dir, teacher__sha256=None)
    bf16 = copy.deepcopy(teacher).to(torch.bfloat16)
    assert weight_mismatches(bf16, replace(PruneMap.load(student_dir)), student_dir) == []
