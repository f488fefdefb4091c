"""Prune a causal LM to a parameter budget or a shape: ``python recipes/prune.py --model SRC --output DIR --target_params 0.5``.

Shape targets: ``--num_layers --hidden_size --num_heads --num_kv_heads --intermediate_size`` (unset
dimensions are kept). Any other PruneConfig field can be set with ``key=value`` overrides after the
options, e.g. ``search.score=kl importance.batch_agg=mean``. The output folder holds the student
(safetensors, loadable with ``AutoModelForCausalLM.from_pretrained``), its tokenizer,
``prune_map.json``, ``prune_config.json`` and ``prune_summary.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

logger = logging.getLogger("prune")

SHAPE_OPTIONS = ("num_layers", "hidden_size", "num_heads", "num_kv_heads", "intermediate_size")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="bundled", help="teacher: a local HF folder, a Hub id, or 'bundled'")
    p.add_argument("--output", required=True, help="folder for the pruned student (refused if not empty)")
    p.add_argument("--target_params", type=float, help="budget: fraction of the teacher (0 < x <= 1) or a count (> 1)")
    for name in SHAPE_OPTIONS:
        p.add_argument(f"--{name}", type=int, help=f"explicit target {name}")
    p.add_argument("--non_embedding", action="store_true", help="count only non-embedding parameters for the budget")
    p.add_argument("--importance", choices=("activation", "magnitude", "taylor", "random"), default="activation")
    p.add_argument("--layer_method", default=None, help="block_influence (default), contiguous (= angular), lm_loss, iterative or unit")
    p.add_argument("--no_reconstruction", action="store_true", help="skip the least-squares re-fit after pruning")
    p.add_argument("--calib_data", default="bundled", help="'bundled', a local .txt/.json/.jsonl/.parquet file or a dataset")
    p.add_argument("--text_column", default="text", help="text column of --calib_data")
    p.add_argument("--max_documents", type=int, default=None, help="use only the first N documents of --calib_data")
    p.add_argument("--tokenizer", default=None, help="tokenizer source when the model folder has none (e.g. 'bundled')")
    p.add_argument("--trust_remote_code", action="store_true", help="allow custom modelling code from --model")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --output")
    p.add_argument("--seq_len", type=int, default=256, help="tokens per calibration / evaluation block")
    p.add_argument("--calib_blocks", type=int, default=64, help="training blocks used for calibration")
    p.add_argument("--max_candidates", type=int, default=None, help="budget search: candidate shapes scored")
    p.add_argument("--multiple_of", type=int, default=None, help="budget search: hidden / MLP widths are multiples of this")
    p.add_argument("--eval_blocks", type=int, default=16, help="held-out blocks for the perplexity summary")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    p.add_argument("overrides", nargs="*", help="PruneConfig overrides key=value, e.g. search.score=kl")
    return p


def prune_config_from_args(args):
    """PruneConfig from the options (and key=value overrides); ConfigError on bad values."""
    from minidistill.config import merge_dicts, parse_overrides
    from minidistill.prune.pipeline import PruneConfig

    shape = {k: getattr(args, k) for k in SHAPE_OPTIONS if getattr(args, k) is not None}
    target = dict(shape, non_embedding=args.non_embedding)
    if args.target_params is not None:
        target["params"] = args.target_params
    data = {
        "importance": {"method": args.importance},
        "calib_blocks": args.calib_blocks,
        "target": target,
        "reconstruction": {"enabled": not args.no_reconstruction},
        "overwrite": args.overwrite,
    }
    if args.layer_method:
        data["layer_method"] = args.layer_method
    search = {k: getattr(args, k) for k in ("max_candidates", "multiple_of") if getattr(args, k) is not None}
    if search:
        data["search"] = search
    return PruneConfig.from_dict(merge_dicts(data, parse_overrides(args.overrides)))


def run(args) -> dict:
    """Prune as the options say; returns the summary written to ``prune_summary.json``."""
    from minidistill.adapters import get_adapter
    from minidistill.data import DataConfig, build_text_data, check_data_source
    from minidistill.evaluation.perplexity import heldout_loss
    from minidistill.models import ModelConfig, load_model_and_tokenizer
    from minidistill.prune.pipeline import check_output_dir, prune_model
    from minidistill.prune.save import save_student

    cfg = prune_config_from_args(args)
    data_cfg = DataConfig.from_dict(
        {"source": args.calib_data, "text_column": args.text_column, "seq_len": args.seq_len,
         "max_documents": args.max_documents}
    )
    # Everything that can fail on the input fails here, before the teacher is loaded.
    check_output_dir(args.output, args.overwrite, sources=tuple(s for s in (args.model, args.tokenizer) if s))
    check_data_source(data_cfg)
    teacher, tokenizer = load_model_and_tokenizer(
        ModelConfig(source=args.model, tokenizer=args.tokenizer, trust_remote_code=args.trust_remote_code)
    )
    data = build_text_data(data_cfg, tokenizer)

    def ppl(model) -> dict:
        return heldout_loss(model, data.heldout.batches(cfg.search.batch_size, args.eval_blocks))

    before = ppl(teacher)
    result = prune_model(teacher, tokenizer, data, cfg, teacher_source=args.model)
    after = ppl(result.student)
    adapter = get_adapter(teacher)
    summary = {
        "teacher": args.model,
        "shape_before": adapter.shape(teacher.config),
        "shape_after": adapter.shape(result.student.config),
        "params_before": result.params_before,
        "params_after": result.params_after,
        "non_embedding_params_before": result.non_embedding_params_before,
        "non_embedding_params_after": result.non_embedding_params_after,
        "target_params": result.target_params,
        "heldout_perplexity_before": before["perplexity"],
        "heldout_perplexity_after": after["perplexity"],
        "heldout_tokens": after["tokens"],
        "importance": result.prune_map.importance,
        "refit": list(result.prune_map.refit),
        "timings_s": result.timings,
        "candidates": result.candidates,
    }
    out = save_student(
        result.student, tokenizer, result.prune_map, args.output, overwrite=args.overwrite,
        extra_files={
            "prune_config.json": json.dumps(cfg.to_dict(), indent=1) + "\n",
            "prune_summary.json": json.dumps(summary, indent=1, default=str) + "\n",
        },
    )
    _log_summary(summary, out)
    return summary


def _log_summary(s: dict, out) -> None:
    def shape(d):
        return ", ".join(f"{k}={d[k]}" for k in ("num_layers", "hidden_size", "num_heads", "num_kv_heads", "intermediate_size"))

    logger.info(
        "pruned student saved to %s\n"
        "  shape       %s\n"
        "           -> %s\n"
        "  parameters  %s -> %s (%.1f%%); non-embedding %s -> %s (%.1f%%)\n"
        "  held-out perplexity %.2f -> %.2f (%d tokens, before any retraining)",
        out, shape(s["shape_before"]), shape(s["shape_after"]),
        f"{s['params_before']:,}", f"{s['params_after']:,}", 100 * s["params_after"] / s["params_before"],
        f"{s['non_embedding_params_before']:,}", f"{s['non_embedding_params_after']:,}",
        100 * s["non_embedding_params_after"] / s["non_embedding_params_before"],
        s["heldout_perplexity_before"], s["heldout_perplexity_after"], s["heldout_tokens"],
    )


def _main(argv: list[str]) -> int:
    args = build_parser().parse_intermixed_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    run(args)
    return 0


def main(argv: list[str] | None = None) -> int:
    """The command: a bad input prints one ``error [...]`` line and returns its exit code (see README)."""
    from minidistill.errors import run_cli

    return run_cli(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
