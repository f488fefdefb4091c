"""Export a run's model (or any saved model folder) to a GGUF file for llama.cpp / Ollama / LM Studio.

    python recipes/export_gguf.py runs/demo --outtype f16|f32|q8_0 [--output F] [--overwrite]
"""

import sys

from minidistill.errors import run_cli
from minidistill.export_gguf import main

if __name__ == "__main__":
    sys.exit(run_cli(main))
