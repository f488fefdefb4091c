"""Layer and head pairing between a student and its teacher."""

from __future__ import annotations

import pytest

from minidistill.distill.pairing import PairingError, pair_heads, pair_layers
from minidistill.prune.prune_map import LayerMap, PruneMap

TEACHER_SHAPE = {"num_layers": 6, "hidden_size": 64, "num_heads": 4, "num_kv_heads": 2, "head_dim": 16, "intermediate_size": 96}


def _prune_map() -> PruneMap:
    student = dict(TEACHER_SHAPE, num_layers=3, num_heads=2, num_kv_heads=1, intermediate_size=48)
    layers = [
        LayerMap([1], [2, 3], list(range(48))),
        LayerMap([0], [0, 1], list(range(48, 96))),
        LayerMap([1], [2, 3], list(range(0, 96, 2))),
    ]
    pm = PruneMap(
        teacher={"shape": dict(TEACHER_SHAPE)},
        student_shape=student,
        kept_layers=[0, 2, 5],
        kept_hidden=list(range(64)),
        layers=layers,
    )
    pm.validate()
    return pm


def test_prune_map_pairs_each_student_layer_with_its_source():
    assert pair_layers(3, 6, prune_map=_prune_map()) == [(0, 0), (1, 2), (2, 5)]
    assert pair_layers(3, 6, prune_map=_prune_map(), teacher_shape=dict(TEACHER_SHAPE)) == [(0, 0), (1, 2), (2, 5)]


def test_prune_map_strategy_without_a_map_names_the_fix():
    with pytest.raises(PairingError, match="no explicit map"):
        pair_layers(3, 6)


def test_prune_map_from_another_teacher_is_rejected():
    with pytest.raises(PairingError, match="different teacher"):
        pair_layers(3, 8, prune_map=_prune_map())
    with pytest.raises(PairingError, match="hidden_size"):
        pair_layers(3, 6, prune_map=_prune_map(), teacher_shape=dict(TEACHER_SHAPE, hidden_size=128))
    with pytest.raises(PairingError, match="does not belong to this student"):
        pair_layers(4, 6, prune_map=_prune_map())


@pytest.mark.parametrize(
    "ls, lt, expected",
    [
        (3, 6, [1, 3, 5]),
        (4, 6, [1, 2, 4, 5]),  # 1.5 -> 2, 3, 4.5 -> 5, 6: halves round up
        (20, 30, [round(x + 0.001) - 1 for x in [(i + 1) * 1.5 for i in range(20)]]),
        (5, 5, [0, 1, 2, 3, 4]),
        (1, 30, [29]),
    ],
)
def test_uniform_spreads_evenly_and_ends_at_the_last_layer(ls, lt, expected):
    pairs = pair_layers(ls, lt, strategy="uniform")
    assert pairs == list(zip(range(ls), expected))
    teacher = [t for _, t in pairs]
    assert teacher == sorted(set(teacher)) and teacher[-1] == lt - 1


def test_uniform_rejects_a_deeper_student():
    with pytest.raises(PairingError, match="explicit"):
        pair_layers(7, 6, strategy="uniform")


def test_last_k():
    assert pair_layers(4, 10, strategy="last_k", k=2) == [(2, 8), (3, 9)]
    assert pair_layers(4, 10, strategy="last_k", k=4) == [(0, 6), (1, 7), (2, 8), (3, 9)]
    for bad in (None, 0, 5):
        with pytest.raises(PairingError, match="k in"):
            pair_layers(4, 10, strategy="last_k", k=bad)


def test_explicit_is_validated_and_sorted():
    assert pair_layers(3, 6, strategy="explicit", explicit=[(2, 5), (0, 1)]) == [(0, 1), (2, 5)]
    with pytest.raises(PairingError, match="out of range"):
        pair_layers(3, 6, strategy="explicit", explicit=[(3, 1)])
    with pytest.raises(PairingError, match="out of range"):
        pair_layers(3, 6, strategy="explicit", explicit=[(0, 6)])
    with pytest.raises(PairingError, match="duplicates"):
        pair_layers(3, 6, strategy="explicit", explicit=[(0, 1), (0, 1)])
    with pytest.raises(PairingError, match="needs explicit"):
        pair_layers(3, 6, strategy="explicit")
    with pytest.raises(PairingError, match="integers"):
        pair_layers(3, 6, strategy="explicit", explicit=[(0, 1.0)])


def test_unknown_strategy():
    with pytest.raises(PairingError, match="unknown"):
        pair_layers(3, 6, strategy="nearest")


def test_pair_heads_follows_kept_query_heads():
    pm = _prune_map()
    assert pair_heads(pm, 0) == [2, 3]
    assert pair_heads(pm, 1) == [0, 1]
    with pytest.raises(PairingError, match="outside"):
        pair_heads(pm, 3)


def test_prune_map_with_out_of_range_layers_is_rejected():
    pm = _prune_map()
    pm.kept_layers = [0, 2, 6]  # not validated: points past the teacher's last layer
    with pytest.raises(PairingError, match="outside the teacher"):
        pair_layers(3, 6, prune_map=pm)
