"""Reconstruction modes on the bundled teacher; writes the section "Reconstruction modes" of bench/RESULTS.md.

For a few shapes at about 50% of the non-embedding parameters, pruned by activation importance (layers
by block influence, as the pipeline's default), the held-out perplexity before any retraining with:
no re-fit; teacher-mode re-fit of o_proj / down_proj (the teacher's inputs); sequential re-fit (the
student's own inputs, layer by layer); sequential with the input projections re-fitted too (only
differs when hidden channels were cut; teacher mode with input re-fit is shown there as well), and
the seconds each re-fit takes.

    python bench/reconstruct.py [--calib_blocks 32] [--eval_blocks 16] [--shapes L24-D576-H9-KV3-I768,...] [--no_write]
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
from minidistill.prune.targets import config_rejects_shape
from results_file import write_section  # bench/ is on sys.path when run as a script

SECTION = "## Reconstruction modes"
SHAPES = "L27-D384-H6-KV2-I1344,L30-D576-H9-KV3-I512,L24-D576-H9-KV3-I768"
VARIANTS = {
    "teacher": ReconstructionConfig(mode="teacher", refit_inputs=False),
    "teacher + inputs": ReconstructionConfig(mode="teacher", refit_inputs=True),
    "sequential": ReconstructionConfig(mode="sequential", refit_inputs=False),
    "sequential + inputs": ReconstructionConfig(mode="sequential", refit_inputs=True),
}
KEYS = {"L": "num_layers", "D": "hidden_size", "H": "num_heads", "KV": "num_kv_heads", "I": "intermediate_size"}


def parse_shape(text: str, teacher_shape: dict[str, int]) -> dict[str, int]:
    shape = dict(teacher_shape)
    for token in text.split("-"):
        key = token.rstrip("0123456789")
        if key not in KEYS:
            raise SystemExit(f"--shapes: {token!r} in {text!r}; use L<layers>-D<hidden>-H<heads>-KV<kv heads>-I<mlp>")
        shape[KEYS[key]] = int(token[len(key):])
    return shape


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calib_blocks", type=int, default=32, help="calibration blocks (importance and re-fit)")
    ap.add_argument("--eval_blocks", type=int, default=16, help="held-out blocks for perplexity")
    ap.add_argument("--batch_size", type=int, default=4)
    ap.add_argument("--seq_len", type=int, default=256, help="tokens per block")
    ap.add_argument("--shapes", default=SHAPES, help="comma-separated L-D-H-KV-I shapes")
    ap.add_argument("--no_write", action="store_true", help="print only; leave bench/RESULTS.md alone")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(0)
    t_start = time.perf_counter()

    teacher, tok = load_model_and_tokenizer(ModelConfig())
    t_shape = get_adapter(teacher).shape(teacher.config)
    shapes = [parse_shape(s, t_shape) for s in args.shapes.split(",")]
    for s in shapes:
        rejection = config_rejects_shape(teacher.config, s)
        if rejection:
            raise SystemExit(f"--shapes: {s} cannot be saved as a {teacher.config.model_type} checkpoint: {rejection}")
    data = build_text_data(DataConfig(seq_len=args.seq_len), tok)
    calib = data.train.input_ids[: args.calib_blocks]
    heldout = list(data.heldout.batches(args.batch_size, args.eval_blocks))
    calib_batches = importance_batches(calib, args.batch_size)
    teacher_ppl = heldout_loss(teacher, heldout)["perplexity"]
    ne_full = count_parameters(teacher, non_embedding=True)

    t0 = time.perf_counter()
    units, sim = compute_importance(teacher, calib, ImportanceConfig(batch_size=args.batch_size))
    importance_s = time.perf_counter() - t0
    print(f"teacher ppl {teacher_ppl:.2f}; importance {importance_s:.1f} s", flush=True)

    rows = []
    for shape in shapes:
        scores = units_for_shape(units, sim, "block_influence", t_shape, shape)
        pmap = select_units(teacher, scores, shape)
        plain = apply_prune_map(teacher, pmap)
        row = {"shape": shape, "ne_fraction": count_parameters(plain, non_embedding=True) / ne_full,
               "none": heldout_loss(plain, heldout)["perplexity"], "ppl": {}, "seconds": {}}
        del plain
        hidden_cut = shape["hidden_size"] < t_shape["hidden_size"]
        for label, cfg in VARIANTS.items():
            if cfg.refit_inputs and not hidden_cut:
                continue  # identical to the variant without input re-fit
            student = apply_prune_map(teacher, pmap)
            pmap.refit = []
            t0 = time.perf_counter()
            reconstruct(student, teacher, pmap, calib_batches, cfg)
            row["seconds"][label] = time.perf_counter() - t0
            row["ppl"][label] = heldout_loss(student, heldout)["perplexity"]
            print(shape_str(shape), label, f"ppl {row['ppl'][label]:.2f}", f"{row['seconds'][label]:.1f} s", flush=True)
            del student
        rows.append(row)
        print(shape_str(shape), f"none ppl {row['none']:.2f}", flush=True)
        # Written after every shape, so that an interrupted run leaves the shapes it finished.
        table = render(rows, teacher_ppl, importance_s, args, ne_full, time.perf_counter() - t_start)
        if not args.no_write:
            write_section(table)
    print(table)


def shape_str(s: dict[str, int]) -> str:
    return f"L{s['num_layers']} D{s['hidden_size']} H{s['num_heads']}/KV{s['num_kv_heads']} I{s['intermediate_size']}"


def render(rows, teacher_ppl, importance_s, args, ne_full, total_s) -> str:
    device = f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads), torch {torch.__version__}"
    lines = [
        SECTION,
        "",
        f"`python bench/reconstruct.py --calib_blocks {args.calib_blocks} --eval_blocks {args.eval_blocks} "
        f"--batch_size {args.batch_size} --seq_len {args.seq_len}` on {datetime.date.today().isoformat()}, {device}, "
        f"{total_s / 60:.1f} min in all. Bundled teacher SmolLM2-135M-Instruct (float32, {ne_full:,} non-embedding "
        f"parameters; held-out perplexity {teacher_ppl:.2f}), bundled corpus. Activation importance on "
        f"{args.calib_blocks} calibration blocks of {args.seq_len} tokens ({importance_s:.0f} s, on-disk cache allowed), layers by block "
        f"influence; the re-fits use the same blocks. Held-out perplexity on {args.eval_blocks} blocks, before any "
        "retraining; in brackets the seconds of the re-fit. *teacher*: o_proj / down_proj of blocks that lost "
        "heads / neurons fitted on the teacher's inputs; *sequential*: the same on the student's own inputs, layer "
        "by layer; *+ inputs*: q/k/v and gate/up of every layer re-fitted too (only when hidden channels were cut; "
        "in sequential mode o_proj / down_proj of every layer then as well). Ridge damping 0.01.",
        "",
        "| shape | non-emb. kept | no re-fit | teacher | teacher + inputs | sequential | sequential + inputs |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        cells = []
        for label in VARIANTS:
            if label in r["ppl"]:
                cells.append(f"{r['ppl'][label]:.2f} ({r['seconds'][label]:.0f} s)")
            else:
                cells.append("= without inputs")
        lines.append(f"| {shape_str(r['shape'])} | {r['ne_fraction']:.1%} | {r['none']:.2f} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
