"""Score saved models side by side on lm-eval tasks: see eval/README.md.

    python eval/run_lm_eval.py --model teacher=bundled --model distilled=runs/demo/model

The same command as ``minidistill eval`` (:mod:`minidistill.cli`). (Not named ``lm_eval.py``: a
script's folder comes first on ``sys.path``, so that name would shadow the ``lm_eval`` package it runs.)
"""

import sys

from minidistill.cli import command
from minidistill.evaluation.lm_eval_runner import main  # noqa: F401 - the function the command runs

if __name__ == "__main__":
    sys.exit(command("eval"))
