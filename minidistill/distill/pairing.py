"""Which student layer / head is compared with which teacher layer / head in feature losses, and how the
two output vocabularies line up (:func:`align_vocabularies`)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from minidistill.prune.prune_map import SHAPE_KEYS, PruneMap

PairingStrategy = Literal["prune_map", "uniform", "last_k", "explicit"]


class PairingError(ValueError):
    """Student and teacher layers / heads cannot be paired as asked; the message names the fix."""


def pair_layers(
    num_student_layers: int,
    num_teacher_layers: int,
    *,
    strategy: PairingStrategy = "prune_map",
    prune_map: PruneMap | None = None,
    k: int | None = None,
    explicit: list[tuple[int, int]] | None = None,
    teacher_shape: dict[str, int] | None = None,
) -> list[tuple[int, int]]:
    """``(student_layer, teacher_layer)`` pairs, sorted by student layer.

    - ``"prune_map"``: student layer ``i`` with ``prune_map.kept_layers[i]``; ``teacher_shape`` (optional, the
      teacher's :meth:`ArchAdapter.shape`) is checked against the map's teacher shape.
    - ``"uniform"``: student layer ``i`` with teacher layer ``round((i + 1) * Lt / Ls) - 1`` (halves round up):
      evenly spread, the last layers paired.
    - ``"last_k"``: the last ``k`` student layers with the last ``k`` teacher layers.
    - ``"explicit"``: ``explicit``, checked for range and duplicates.
    """
    if num_student_layers < 1 or num_teacher_layers < 1:
        raise PairingError(f"layer counts must be positive, got student {num_student_layers}, teacher {num_teacher_layers}")
    ls, lt = num_student_layers, num_teacher_layers
    if strategy == "prune_map":
        if prune_map is None:
            raise PairingError(
                "layer pairing 'prune_map' needs the student's prune map: the student is not from this teacher "
                "and no explicit map was given; use strategy 'uniform' or 'last_k', or 'explicit' with pairs"
            )
        map_teacher = prune_map.teacher.get("shape") or {}
        if map_teacher.get("num_layers") != lt:
            raise PairingError(
                f"the prune map's teacher has {map_teacher.get('num_layers')} layers but the teacher has {lt}: "
                "the student was pruned from a different teacher; load that teacher or pair 'uniform'/'explicit'"
            )
        if teacher_shape is not None:
            diff = {key: (map_teacher.get(key), teacher_shape.get(key)) for key in SHAPE_KEYS if map_teacher.get(key) != teacher_shape.get(key)}
            if diff:
                raise PairingError(
                    f"the prune map's teacher shape differs from the teacher's (map, teacher): {diff}; "
                    "the student was pruned from a different teacher"
                )
        if len(prune_map.kept_layers) != ls:
            raise PairingError(
                f"the prune map keeps {len(prune_map.kept_layers)} layers but the student has {ls}: "
                "the map does not belong to this student"
            )
        pairs = list(enumerate(prune_map.kept_layers))
    elif strategy == "uniform":
        if ls > lt:
            raise PairingError(f"'uniform' pairing needs a student no deeper than its teacher ({ls} > {lt}); use 'explicit'")
        pairs = [(i, ((i + 1) * lt * 2 + ls) // (2 * ls) - 1) for i in range(ls)]
    elif strategy == "last_k":
        if k is None or not 1 <= k <= min(ls, lt):
            raise PairingError(f"'last_k' pairing needs k in [1, {min(ls, lt)}], got k={k}")
        pairs = [(ls - k + j, lt - k + j) for j in range(k)]
    elif strategy == "explicit":
        if not explicit:
            raise PairingError("'explicit' pairing needs explicit=[(student_layer, teacher_layer), ...]")
        pairs = []
        for item in explicit:
            if len(item) != 2 or not all(isinstance(x, int) and not isinstance(x, bool) for x in item):
                raise PairingError(f"explicit pair {item!r} must be (student_layer, teacher_layer) integers")
            s, t = item
            if not 0 <= s < ls or not 0 <= t < lt:
                raise PairingError(f"explicit pair {(s, t)} is out of range: student layers 0..{ls - 1}, teacher 0..{lt - 1}")
            pairs.append((s, t))
        if len(set(pairs)) != len(pairs):
            raise PairingError(f"explicit pairs contain duplicates: {explicit}")
        pairs.sort()
    else:
        raise PairingError(f"unknown layer pairing strategy {strategy!r}; choose prune_map, uniform, last_k or explicit")
    bad = [(s, t) for s, t in pairs if not 0 <= t < lt]
    if bad:
        raise PairingError(f"pairs {bad} point outside the teacher's {lt} layers")
    return pairs


def pair_heads(prune_map: PruneMap, student_layer: int) -> list[int]:
    """Teacher query head of each student query head of ``student_layer`` (``kept_query_heads``, in order)."""
    if not 0 <= student_layer < len(prune_map.layers):
        raise PairingError(f"student layer {student_layer} is outside the prune map's {len(prune_map.layers)} layers")
    return list(prune_map.layers[student_layer].kept_query_heads)


@dataclass(frozen=True)
class VocabAlignment:
    """How the teacher's and the student's output rows line up: the shared tokenizer's tokens, then padding.

    Rows ``>= vocab_size`` of either head belong to no token; when the heads differ in rows, logit losses
    set those rows to -inf before the softmax (:attr:`mask_from`).
    """

    teacher_rows: int
    student_rows: int
    vocab_size: int
    """Rows the shared tokenizer needs: its largest token id + 1."""

    @property
    def mask_from(self) -> int | None:
        """First padding row to mask (``vocab_size``) when the heads differ in rows; None when they match."""
        return None if self.teacher_rows == self.student_rows else self.vocab_size


def _token_rows(vocab: Mapping[str, int]) -> int:
    return max(vocab.values()) + 1 if vocab else 0


def align_vocabularies(
    teacher_rows: int, student_rows: int, teacher_vocab: Mapping[str, int], student_vocab: Mapping[str, int]
) -> VocabAlignment:
    """Pair the output heads of teacher and student through their tokenizers' vocabularies (token -> id).

    Heads may differ only in padding rows past the shared tokenizer's ids. Raises :class:`PairingError`
    naming both head sizes and the tokenizer difference otherwise.
    """
    t_tokens, s_tokens = _token_rows(teacher_vocab), _token_rows(student_vocab)
    if teacher_vocab != student_vocab:
        differing = sum(1 for tok, i in teacher_vocab.items() if student_vocab.get(tok) != i)
        raise PairingError(
            f"teacher and student tokenizers differ: the teacher's has {len(teacher_vocab)} tokens (ids 0..{t_tokens - 1}), "
            f"the student's {len(student_vocab)} (ids 0..{s_tokens - 1}), {differing} teacher token(s) missing or "
            f"renumbered in the student's; lm_head rows: teacher {teacher_rows}, student {student_rows}. Logit "
            "distillation needs one tokenizer: use the teacher's tokenizer for the student (student.tokenizer=<teacher source>)"
        )
    if teacher_rows < t_tokens or student_rows < t_tokens:
        raise PairingError(
            f"teacher and student vocabularies differ: the teacher's lm_head has {teacher_rows} rows, the student's "
            f"{student_rows}, but their shared tokenizer has ids 0..{t_tokens - 1} ({t_tokens} rows needed); heads may "
            "differ only by padding rows past the tokenizer's ids: give a student whose lm_head covers the tokenizer "
            "(prune the student from this teacher)"
        )
    return VocabAlignment(int(teacher_rows), int(student_rows), t_tokens)
