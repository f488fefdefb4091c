"""Pruning cost and quality on the bundled teacher; writes the section "Pruning cost and quality" of bench/RESULTS.md.

Cost: activation importance (hooks + layer statistics, one forward) as a ratio to a plain forward over
the same calibration tokens, at 1x, 2x and 4x tokens; reconstruction's extra time shown separately.
Quality: held-out perplexity before any retraining for each importance method, with and without
reconstruction, at two shapes (MLP width halved; about 50% of the non-embedding parameters).

Budget search (its own section, "Budget search: enumeration and pre-score"): time, shapes enumerated
and peak memory of the lazy enumeration + pre-scoring for a Llama-3-8B-sized config on the meta device
and for the bundled teacher; then the bundled teacher's search at ~50% of the non-embedding
parameters with per-axis sensitivity, scoring more candidates than the default ``max_candidates``,
and the Spearman rank correlation between the sensitivity pre-score and the real held-out score.

    python bench/prune_cost.py [--sections cost,quality,search] [--base_blocks 4] [--calib_blocks 16]
                               [--eval_blocks 8] [--search_candidates 12] [--no_write]
"""

from __future__ import annotations

import argparse
import datetime
import logging
import platform
import resource
import time
import tracemalloc

import torch
from transformers import LlamaConfig

from minidistill.adapters import count_parameters, get_adapter
from minidistill.data import DataConfig, build_text_data
from minidistill.evaluation.perplexity import heldout_loss
from minidistill.models import ModelConfig, load_model_and_tokenizer
from minidistill.prune.apply import apply_prune_map
from minidistill.prune.importance import ImportanceConfig, compute_importance, importance_batches
from minidistill.prune.pipeline import PruneConfig, prune_model, units_for_shape
from minidistill.prune.reconstruct import ReconstructionConfig, reconstruct
from minidistill.prune.select import select_units
from minidistill.prune.sensitivity import Sensitivity, SensitivityPoint
from minidistill.prune.targets import ParamCounter, SearchConfig, ShapeSpace, budget_params, select_candidates
from results_file import write_section  # bench/ is on sys.path when run as a script

SECTION = "## Pruning cost and quality"
SEARCH_SECTION = "## Budget search: enumeration and pre-score"
LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=8, vocab_size=128256)
# ~50% of SmolLM2-135M's non-embedding parameters, pruned in memory only: LlamaConfig would refuse to
# save it (hidden 512 is not a multiple of 6 heads), so the budget search never proposes it.
HALF_SHAPE = {"num_layers": 23, "hidden_size": 512, "num_heads": 6, "num_kv_heads": 2, "intermediate_size": 1152}


@torch.no_grad()
def plain_forward_seconds(model, batches) -> float:
    backbone = model.get_submodule(get_adapter(model).backbone)
    t0 = time.perf_counter()
    for ids in batches:
        backbone(input_ids=ids)
    return time.perf_counter() - t0


def cost_rows(model, calib: torch.Tensor, base_blocks: int, batch_size: int) -> list[dict]:
    rows = []
    for mult in (1, 2, 4):
        ids = calib[: base_blocks * mult]
        batches = importance_batches(ids, batch_size)
        plain_forward_seconds(model, batches[:1])  # warm-up
        plain = plain_forward_seconds(model, batches)
        t0 = time.perf_counter()
        compute_importance(model, ids, ImportanceConfig(batch_size=batch_size, cache=False))
        act = time.perf_counter() - t0
        rows.append({"tokens": ids.numel(), "forward_s": plain, "importance_s": act, "ratio": act / plain})
    return rows


def _synthetic_sensitivity(teacher_shape: dict) -> Sensitivity:
    """A sensitivity model with made-up increases: enough to time the pre-score on a config with no weights."""
    pts = [SensitivityPoint(axis, r, r, dict(teacher_shape), 0.0, inc * (1 - r), 0.0)
           for axis, inc in (("depth", 2.0), ("heads", 1.0), ("mlp", 1.5), ("hidden", 4.0)) for r in (0.75, 0.5, 0.25)]
    return Sensitivity(base=0.0, score="loss", reconstructed=False, points=pts)


def enumeration_row(label: str, config, fraction: float = 0.5, multiple_of: int = 64) -> dict:
    """Time, shapes and peak memory of enumerating and pre-scoring the budget band of ``config`` (no weights)."""
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    counter = ParamCounter(config, non_embedding=True)
    fit_s = time.perf_counter() - t0
    budget = budget_params(counter.count(counter.teacher_shape), fraction)
    t = counter.teacher_shape
    sens = _synthetic_sensitivity(t)
    def prescore(shape, params):
        return sens.predict(t, shape) + 1e-3 * (budget - params) / budget

    space = ShapeSpace(counter, SearchConfig(multiple_of=multiple_of))
    t0 = time.perf_counter()
    sel = select_candidates(space, budget, prescore)
    enum_s = time.perf_counter() - t0
    tracemalloc.start()  # a second pass for memory: tracemalloc slows allocation-heavy code several times
    select_candidates(ShapeSpace(counter, SearchConfig(multiple_of=multiple_of)), budget, prescore)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"config": label, "fit_s": fit_s, "enumerate_s": enum_s, "in_band": sel.in_band,
            "built": sel.shapes_built, "product": sel.product_size, "scored": len(sel.candidates),
            "families": {k: v for k, v in sel.per_family.items()}, "peak_mib": peak / 2**20,
            "rss_growth_mib": max(rss - rss0, 0) / 1024}


def search_run(teacher, data, args) -> dict:
    """The bundled teacher's budget search with sensitivity, scoring ``search_candidates`` plus family bests."""
    cfg = PruneConfig.from_dict({
        "calib_blocks": args.calib_blocks, "show_progress": False,
        "importance": {"batch_size": args.batch_size, "cache": False},
        "target": {"params": 0.5, "non_embedding": True},
        "search": {"max_candidates": args.search_candidates, "score_blocks": args.eval_blocks,
                   "batch_size": args.batch_size, "sensitivity": True},
        "reconstruction": {"enabled": False},
    })
    t0 = time.perf_counter()
    res = prune_model(teacher, None, data, cfg, teacher_source="bundled")
    notes = res.prune_map.notes
    return {"seconds": time.perf_counter() - t0, "timings": res.timings, "rows": res.candidates,
            "search": notes["search"], "sensitivity": Sensitivity(
                base=notes["sensitivity"]["base"], score=notes["sensitivity"]["score"],
                reconstructed=notes["sensitivity"]["reconstructed"],
                points=[SensitivityPoint(**p) for p in notes["sensitivity"]["points"]])}


def render_search(enum_rows: list[dict], search: dict | None, args) -> str:
    device = f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads), torch {torch.__version__}"
    lines = [
        SEARCH_SECTION,
        "",
        f"`python bench/prune_cost.py --sections search --calib_blocks {args.calib_blocks} --eval_blocks "
        f"{args.eval_blocks} --search_candidates {args.search_candidates} --seq_len {args.seq_len}` on "
        f"{datetime.date.today().isoformat()}, {device}.",
        "",
        "Enumeration at 50% of the non-embedding parameters, `multiple_of=64`, tolerance 2%, up to half the layers "
        "dropped: the MLP width range inside the band is solved in closed form per (layers, hidden, heads) triple, "
        "so only in-band shapes are built; pre-scored by a per-axis sensitivity model and reduced to the "
        "candidates to score in one pass with bounded memory (peak: Python allocations during enumeration, "
        "tracemalloc). Fit: the parameter-count polynomial from meta-device builds.",
        "",
        "| config | fit (s) | enumerate + pre-score (s) | shapes in band | shapes built | full product | to score | per family | peak (MiB) |",
        "|---|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for r in enum_rows:
        fam = ", ".join(f"{k} {v:,}" for k, v in r["families"].items())
        lines.append(f"| {r['config']} | {r['fit_s']:.2f} | {r['enumerate_s']:.2f} | {r['in_band']:,} | {r['built']:,} "
                     f"| {r['product']:,} | {r['scored']} | {fam} | {r['peak_mib']:.1f} |")
    if search is not None:
        s = search["search"]
        rho = s["prescore_spearman"]
        lines += [
            "",
            f"Bundled teacher (SmolLM2-135M-Instruct), budget {s['budget']:,} non-embedding parameters (50%), "
            f"{args.calib_blocks} calibration blocks, {args.eval_blocks} held-out blocks of {args.seq_len} tokens, no "
            f"reconstruction; {len(search['rows'])} candidates scored (`max_candidates={args.search_candidates}` best "
            f"pre-scored plus the best of each axis family and single-axis shapes next to the band), "
            f"{search['seconds']:.0f} s in all (sensitivity {search['timings'].get('sensitivity_s', 0):.0f} s, "
            f"scoring {search['timings'].get('search_s', 0):.0f} s).",
            "",
            f"**Spearman rank correlation between the sensitivity pre-score and the held-out loss: "
            f"{'n/a' if rho is None else f'{rho:.3f}'}** over the {len(search['rows'])} scored candidates.",
            "",
            search["sensitivity"].markdown().split("\n", 2)[2].strip(),
            "",
            "| rank | shape | family | non-emb. kept | in band | pre-score | held-out loss |",
            "|---:|---|---|---:|---|---:|---:|",
        ]
        for r in search["rows"]:
            shape = f"L{r['num_layers']} D{r['hidden_size']} H{r['num_heads']}/KV{r['num_kv_heads']} I{r['intermediate_size']}"
            band = "yes" if r["in_band"] else ("no (eligible)" if r["eligible"] else "no")
            lines.append(f"| {r['rank']} | {shape} | {r['family']} | {r['fraction']:.1%} | {band} | {r['prescore']:.3f} "
                         f"| {r['loss']:.3f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base_blocks", type=int, default=4, help="1x calibration blocks for the cost table")
    ap.add_argument("--calib_blocks", type=int, default=16, help="calibration blocks for the quality table")
    ap.add_argument("--eval_blocks", type=int, default=8, help="held-out blocks for perplexity")
    ap.add_argument("--batch_size", type=int, default=4)
    ap.add_argument("--seq_len", type=int, default=256, help="tokens per block")
    ap.add_argument("--no_write", action="store_true", help="print only; leave bench/RESULTS.md alone")
    ap.add_argument("--sections", default="cost,quality,search",
                    help="comma-separated: cost and quality (one RESULTS.md section), search (its own section)")
    ap.add_argument("--search_candidates", type=int, default=12, help="search: max_candidates (default config: 6)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(0)
    sections = set(args.sections.split(","))
    unknown = sections - {"cost", "quality", "search"}
    if unknown:
        ap.error(f"--sections: unknown {sorted(unknown)}; choose from cost, quality, search")

    teacher, tok = load_model_and_tokenizer(ModelConfig())
    if "search" in sections:
        logging.getLogger("minidistill.prune").setLevel(logging.INFO)  # candidate-by-candidate progress
        enum_rows = [enumeration_row("Llama-3-8B-sized (meta device)", LlamaConfig(**LLAMA3_8B)),
                     enumeration_row("bundled SmolLM2-135M", teacher.config)]
        for r in enum_rows:
            print(r, flush=True)
        data = build_text_data(DataConfig(seq_len=args.seq_len), tok)
        search = search_run(teacher, data, args)
        print({"spearman": search["search"]["prescore_spearman"], "seconds": search["seconds"]}, flush=True)
        text = render_search(enum_rows, search, args)
        print(text)
        if not args.no_write:
            write_section(text)
    if not sections & {"cost", "quality"}:
        return
    data = build_text_data(DataConfig(seq_len=args.seq_len), tok)
    calib = data.train.input_ids
    heldout = list(data.heldout.batches(args.batch_size, args.eval_blocks))
    t_shape = get_adapter(teacher).shape(teacher.config)

    cost = cost_rows(teacher, calib, args.base_blocks, args.batch_size)
    for r in cost:
        print({k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()}, flush=True)

    shapes = {
        "MLP halved": {**t_shape, "intermediate_size": t_shape["intermediate_size"] // 2},
        "~50% non-emb.": {**t_shape, **HALF_SHAPE},
    }
    base_ppl = heldout_loss(teacher, heldout)["perplexity"]
    ne_full = count_parameters(teacher, non_embedding=True)
    quality = []
    recon_s = {}
    ids = calib[: args.calib_blocks]
    calib_batches = importance_batches(ids, args.batch_size)
    for method in ("activation", "magnitude", "taylor", "random"):
        t0 = time.perf_counter()
        units, sim = compute_importance(teacher, ids, ImportanceConfig(method=method, batch_size=args.batch_size, cache=False),
                                        layer_stats=False)
        imp_s = time.perf_counter() - t0
        for label, shape in shapes.items():
            scores = units_for_shape(units, sim, "unit", t_shape, shape)
            pmap = select_units(teacher, scores, shape)
            row = {"method": method, "shape": label, "importance_s": imp_s}
            student = apply_prune_map(teacher, pmap)
            row["ne_fraction"] = count_parameters(student, non_embedding=True) / ne_full
            row["ppl"] = heldout_loss(student, heldout)["perplexity"]
            t0 = time.perf_counter()
            reconstruct(student, teacher, pmap, calib_batches, ReconstructionConfig())
            recon_s[(method, label)] = time.perf_counter() - t0
            row["ppl_recon"] = heldout_loss(student, heldout)["perplexity"]
            row["recon_s"] = recon_s[(method, label)]
            quality.append(row)
            print(row, flush=True)

    table = render(cost, quality, base_ppl, args, ne_full)
    print(table)
    if not args.no_write:
        write_section(table)


def render(cost, quality, base_ppl, args, ne_full) -> str:
    device = f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads), torch {torch.__version__}"
    lines = [
        SECTION,
        "",
        f"`python bench/prune_cost.py --seq_len {args.seq_len} --base_blocks {args.base_blocks} --calib_blocks "
        f"{args.calib_blocks} --eval_blocks {args.eval_blocks} --batch_size {args.batch_size}` on "
        f"{datetime.date.today().isoformat()}, {device}. Bundled teacher "
        f"SmolLM2-135M-Instruct (float32, {ne_full:,} non-embedding parameters), bundled corpus, blocks of {args.seq_len} tokens, "
        f"batch {args.batch_size}.",
        "",
        "Activation importance (hooks on o_proj / down_proj inputs and the hidden norms, plus layer similarity "
        "statistics) against a plain forward over the same tokens, same process:",
        "",
        "| calibration tokens | plain forward (s) | activation importance (s) | ratio |",
        "|---:|---:|---:|---:|",
    ]
    for r in cost:
        lines.append(f"| {r['tokens']:,} | {r['forward_s']:.2f} | {r['importance_s']:.2f} | {r['ratio']:.3f} |")
    lines += [
        "",
        f"Held-out perplexity before any retraining ({args.eval_blocks} held-out blocks; teacher: {base_ppl:.2f}); "
        f"importance on {args.calib_blocks} calibration blocks; layers chosen by each method's own layer score; "
        "reconstruction = least-squares re-fit of o_proj / down_proj on the calibration blocks:",
        "",
        "| shape | method | non-emb. kept | importance (s) | ppl | ppl + reconstruction | reconstruction (s) |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in sorted(quality, key=lambda r: (r["shape"], r["method"])):
        lines.append(
            f"| {r['shape']} | {r['method']} | {r['ne_fraction']:.1%} | {r['importance_s']:.1f} | {r['ppl']:.2f} "
            f"| {r['ppl_recon']:.2f} | {r['recon_s']:.1f} |"
        )
    lines.append(f"\n~50% shape: {HALF_SHAPE}.")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
