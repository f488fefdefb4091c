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
import re
import sys


_OVERRIDE = re.compile(r"^-{0,2}[A-Za-z_][\w.]*=")


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Options and ``key=value`` overrides; ``--resume key=value`` is ``--resume`` followed by an override."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="recipe YAML (recipes/configs/*.yaml)")
    parser.add_argument("--resume", nargs="?", const="latest", default=None, help="resume from the latest checkpoint, from PATH, or 'auto' (resume if unfinished, else start anew without overwriting)")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    parser.add_argument("overrides", nargs="*", help="config overrides key=value, e.g. train.lr=1e-4")
    args = parser.parse_intermixed_args(argv)
    if args.resume is not None and _OVERRIDE.match(args.resume) and not os.path.exists(args.resume):
        args.overrides.insert(0, args.resume)
        args.resume = "latest"
    return args


def _main(argv: list[str]) -> int:
    args = parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    from minidistill.recipe_config import load_recipe_config
    from minidistill.train import run_prune_distill

    cfg = load_recipe_config(args.config, args.overrides)
    if args.config and cfg.config_file is None:
        cfg = cfg.replace(config_file=args.config)
    result = run_prune_distill(cfg, resume=args.resume)
    if rank == 0:
        logging.getLogger("prune_distill").info("distilled model: %s", result.model_dir)
    return 0


def main(argv: list[str] | None = None) -> int:
    """The command: a bad input prints one ``error [...]`` line and returns its exit code (see README)."""
    from minidistill.errors import run_cli

    return run_cli(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
