"""Prune a causal LM to a parameter budget or a shape: ``python recipes/prune.py --model SRC --output DIR --target_params 0.5``.

The same command as ``minidistill prune`` (:mod:`minidistill.cli`); ``--help`` lists the options and
every PruneConfig key that ``key=value`` overrides may set.
"""

from __future__ import annotations

import sys

from minidistill.cli import command, prune_config_from_args, prune_parser, run_prune

build_parser, run = prune_parser, run_prune  # the names this script has always had
__all__ = ["build_parser", "main", "prune_config_from_args", "run"]


def main(argv: list[str] | None = None) -> int:
    """The command: a bad input prints one ``error [...]`` line and returns its exit code (see README)."""
    return command("prune", argv)


if __name__ == "__main__":
    sys.exit(main())
