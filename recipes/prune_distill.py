"""Prune a teacher and distill the student back: ``accelerate launch recipes/prune_distill.py --config X.yaml``.

Any config field can be overridden after the options, e.g. ``train.max_steps=5 data.seq_len=128``.
``--resume`` continues the run from its latest checkpoint (or ``--resume PATH`` from a given one);
``--resume auto`` resumes an unfinished run, starts a fresh one otherwise, and never overwrites a
finished run (it writes to ``<run_name>-2``, ...).
The same command runs on one CPU, one GPU, several GPUs and several nodes (the accelerate launch
config picks DDP, FSDP2 or DeepSpeed).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="recipe YAML (recipes/configs/*.yaml)")
    parser.add_argument("--resume", nargs="?", const="latest", default=None, help="resume from the latest checkpoint, from PATH, or 'auto' (resume if unfinished, else start anew without overwriting)")
    parser.add_argument("overrides", nargs="*", help="config overrides key=value, e.g. train.lr=1e-4")
    args = parser.parse_args(argv)

    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    from minidistill.config import ConfigError
    from minidistill.recipe_config import load_recipe_config
    from minidistill.train import run_prune_distill

    try:
        cfg = load_recipe_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    if args.config and cfg.config_file is None:
        cfg = cfg.replace(config_file=args.config)
    result = run_prune_distill(cfg, resume=args.resume)
    if rank == 0:
        logging.getLogger("prune_distill").info("distilled model: %s", result.model_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
