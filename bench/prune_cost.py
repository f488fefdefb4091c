"""Pruning cost and quality on the bundled teacher; writes the section "Pruning cost and quality" of bench/RESULTS.md.

Cost: activation importance (hooks + layer statistics, one forward) as a ratio to a plain forward over
the same calibration tokens, at 1x, 2x and 4x tokens; reconstruction's extra time shown separately.
Quality: held-out perplexity before any retraining for each importance method, with and without
reconstruction, at two shapes (MLP width halved; about 50% of the non-embedding parameters).

    python bench/prune_cost.py [--base_blocks 4] [--calib_blocks 16] [--eval_blocks 8] [--no_write]
"""

from __future__ import annotations

import argparse
import datetime
import logging
import platform
import time

import torch

from minidistill.adapters import count_parameters, get_adapter
from minidistill.data import DataConfig, build_text_data
from minidistill.evaluation.perplexity import heldout_loss
from minidistill.models import ModelConfig, load_model_and_tokenizer
from minidistill.prune.apply import apply_prune_map
from minidistill.prune.importance import ImportanceConfig, compute_importance, importance_batches
from minidistill.prune.pipeline import units_for_shape
from minidistill.prune.reconstruct import ReconstructionConfig, reconstruct
from minidistill.prune.select import select_units
from results_file import write_section  # bench/ is on sys.path when run as a script

SECTION = "## Pruning cost and quality"
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base_blocks", type=int, default=4, help="1x calibration blocks for the cost table")
    ap.add_argument("--calib_blocks", type=int, default=16, help="calibration blocks for the quality table")
    ap.add_argument("--eval_blocks", type=int, default=8, help="held-out blocks for perplexity")
    ap.add_argument("--batch_size", type=int, default=4)
    ap.add_argument("--seq_len", type=int, default=256, help="tokens per block")
    ap.add_argument("--no_write", action="store_true", help="print only; leave bench/RESULTS.md alone")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(0)

    teacher, tok = load_model_and_tokenizer(ModelConfig())
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
