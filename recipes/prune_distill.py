"""Prune a teacher and distill the student back: ``accelerate launch recipes/prune_distill.py --config X.yaml``.

The same command as ``minidistill distill`` (:mod:`minidistill.cli`, also
``accelerate launch -m minidistill.cli distill``); ``--help`` lists the options and every config key.
"""

from __future__ import annotations

import sys

from minidistill.cli import command, parse_distill_args

parse_args = parse_distill_args  # the name this script has always had
__all__ = ["main", "parse_args"]


def main(argv: list[str] | None = None) -> int:
    """The command: a bad input prints one ``error [...]`` line and returns its exit code (see README)."""
    return command("distill", argv)


if __name__ == "__main__":
    sys.exit(main())
