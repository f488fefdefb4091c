"""Score saved models side by side on lm-eval tasks (same as eval/lm_eval.py): see eval/README.md."""

import sys

from minidistill.evaluation.lm_eval_runner import main

if __name__ == "__main__":
    sys.exit(main())
