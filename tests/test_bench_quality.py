"""bench/quality.py --quick: every comparison of the quality study runs and measures what it says."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def rows(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("quality")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "quality.py"), "--quick", "--json", str(out / "rows.json"),
         "--work-dir", str(out / "work")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=2400,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "## Quality study" in proc.stdout
    return json.loads((out / "rows.json").read_text())


def _by_group(rows: list[dict]) -> dict[str, dict[str, dict]]:
    groups: dict[str, dict[str, dict]] = {}
    for r in rows:
        groups.setdefault(r["group"], {})[r["name"]] = r
    return groups


def test_every_comparison_has_its_rows(rows):
    g = _by_group(rows)
    assert set(g["1. importance (no retraining)"]) == {"activation", "activation, neurons by activation", "magnitude",
                                                      "taylor", "random"}
    assert set(g["2. objective (equal tokens)"]) == {
        "LM loss only", "logit KD", "KD + hidden + attention", "KD + hidden + attention + relations"}
    assert set(g["3. width vs depth (equal params)"]) == {"width only", "depth only", "width + depth"}
    assert set(g["4. initialisation (equal tokens)"]) == {"pruned, distilled", "random init, distilled"}
    sys.path.insert(0, str(ROOT / "bench"))
    import quality_match

    assert set(g["5. match (equal tokens)"]) == set(quality_match.OBJECTIVES)
    assert set(g["6. pruning options (no retraining)"]) == {
        "searched shape, no re-fit", "searched shape, teacher-mode re-fit", "searched shape, sequential re-fit",
        "depth only (half the layers), block_influence", "depth only (half the layers), contiguous",
        "depth only (half the layers), iterative"}
    for r in rows:
        assert math.isfinite(r["perplexity"]) and r["perplexity"] > 1, r
        assert set(r["lm_eval"]) == {"minidistill_heldout_ppl", "minidistill_lastword"}, r


def test_shapes_and_budgets_are_what_the_comparisons_claim(rows):
    g = _by_group(rows)
    teacher = g["teacher"]["teacher"]["shape"]
    both = g["1. importance (no retraining)"]["activation"]["shape"]
    for r in list(g["1. importance (no retraining)"].values()) + list(g["2. objective (equal tokens)"].values()):
        assert r["shape"] == both  # one shape for every method and objective
        assert 0.48 <= r["non_embedding_fraction"] <= 0.5
    width, depth = g["3. width vs depth (equal params)"]["width only"], g["3. width vs depth (equal params)"]["depth only"]
    assert width["shape"]["num_layers"] == teacher["num_layers"]
    assert width["shape"]["hidden_size"] < teacher["hidden_size"] or width["shape"]["intermediate_size"] < teacher["intermediate_size"]
    assert {k: v for k, v in depth["shape"].items() if k != "num_layers"} == {k: v for k, v in teacher.items() if k != "num_layers"}
    assert depth["shape"]["num_layers"] == teacher["num_layers"] // 2
    # the search's pick cuts depth and a width axis (hidden channels or MLP neurons)
    assert both["num_layers"] < teacher["num_layers"]
    assert both["hidden_size"] < teacher["hidden_size"] or both["intermediate_size"] < teacher["intermediate_size"]
    fractions = [r["non_embedding_fraction"] for r in g["3. width vs depth (equal params)"].values()]
    assert max(fractions) - min(fractions) <= 0.021  # equal parameters, within the search tolerance


def test_training_rows_see_equal_tokens(rows):
    trained = [r for r in rows if r["group"][0] in "2345"]
    tokens = {r["tokens"] for r in trained}
    assert tokens == {2 * 2 * 64}  # --quick: 2 steps of 2 x 64 tokens each


def test_measurements_separate_informed_from_uninformed_choices(rows):
    """Gaps of orders of magnitude, far beyond what 2 steps or 4 calibration blocks can blur."""
    g = _by_group(rows)
    imp = g["1. importance (no retraining)"]
    assert imp["activation"]["perplexity"] * 100 < imp["random"]["perplexity"]
    init = g["4. initialisation (equal tokens)"]
    assert init["pruned, distilled"]["perplexity"] * 3 < init["random init, distilled"]["perplexity"]
    # Every objective starts from the activation-pruned student of group 1, and training moves it.
    for r in [*g["2. objective (equal tokens)"].values(), *g["5. match (equal tokens)"].values()]:
        assert r["extra"]["start_perplexity"] == pytest.approx(imp["activation"]["perplexity"], rel=1e-6)
        assert r["perplexity"] != pytest.approx(r["extra"]["start_perplexity"], rel=1e-6)
    assert "top1_agreement" not in g["teacher"]["teacher"]["extra"]
    for r in rows:
        if r["group"] != "teacher":
            assert 0.0 <= r["extra"]["top1_agreement"] <= 1.0
    assert g["teacher"]["teacher"]["perplexity"] < min(r["perplexity"] for r in rows if r["group"] != "teacher")
    # Each re-fit option reaches the pipeline: the same shape, other weights (at --quick's 256 calibration
    # tokens the re-fit need not help; the full-size study measures that).
    pruning = g["6. pruning options (no retraining)"]
    refit_ppl = [pruning[f"searched shape, {m}"]["perplexity"] for m in ("no re-fit", "teacher-mode re-fit", "sequential re-fit")]
    assert len({round(p, 6) for p in refit_ppl}) == 3, refit_ppl
    shapes = {r["name"]: r["shape"] for r in pruning.values()}
    assert shapes["searched shape, no re-fit"] == imp["activation"]["shape"]


def test_groups_option_runs_only_the_comparisons_named(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    bad = subprocess.run([sys.executable, str(ROOT / "bench" / "quality.py"), "--quick", "--groups", "nope"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "choose from importance" in bad.stderr
    partial = subprocess.run([sys.executable, str(ROOT / "bench" / "quality.py"), "--quick", "--groups", "pruning",
                              "--write"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert partial.returncode == 2 and "--write replaces a whole table" in partial.stderr


def test_modes_group_trains_every_peer_on_the_same_tokens(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "quality.py"), "--quick", "--groups", "modes", "--json",
                           str(tmp_path / "rows.json"), "--work-dir", str(tmp_path / "work")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "## Quality study: training modes" in proc.stdout
    g = _by_group(json.loads((tmp_path / "rows.json").read_text()))["training modes (equal tokens per model)"]
    exit_rows = {n for n in g if n.startswith("exit after layer")}
    assert set(g) - exit_rows == {
        "one student, logit KD", "one student, LM loss only", "mutual, 2 peers + teacher: student",
        "mutual, 2 peers + teacher: peer 1", "mutual, 2 peers, no teacher: student", "mutual, 2 peers, no teacher: peer 1",
        "born-again: generation 1 (from the one-student logit KD model)",
        "netaug (the student's weights also trained inside a wider model)"}
    assert len(exit_rows) == 2
    assert {r["tokens"] for r in g.values()} == {2 * 2 * 64}
    starts = {r["extra"]["start_perplexity"] for r in g.values()}
    assert len(starts) == 1  # every row starts from the same pruned student
    kd = g["one student, logit KD"]
    for name in ("mutual, 2 peers + teacher", "mutual, 2 peers, no teacher"):
        # the peer is a perturbed copy, trained: neither the student nor its start
        assert g[f"{name}: peer 1"]["perplexity"] != pytest.approx(g[f"{name}: student"]["perplexity"], rel=1e-6)
        assert g[f"{name}: student"]["perplexity"] != pytest.approx(kd["perplexity"], rel=1e-6)
    for name in ("born-again: generation 1 (from the one-student logit KD model)",
                 "netaug (the student's weights also trained inside a wider model)"):
        assert g[name]["perplexity"] != pytest.approx(kd["perplexity"], rel=1e-6)
        assert g[name]["shape"] == kd["shape"]
    full, stopped = sorted(exit_rows, key=lambda n: n.endswith("stopped at the exit"))
    assert g[stopped]["shape"]["num_layers"] < g[full]["shape"]["num_layers"] == kd["shape"]["num_layers"]
