"""Export a run's model (or any saved model folder) to a GGUF file for llama.cpp / Ollama / LM Studio.

    python recipes/export_gguf.py runs/demo --outtype f16|f32|q8_0 [--output F] [--overwrite]

The same command as ``minidistill export-gguf`` (:mod:`minidistill.cli`).
"""

import sys

from minidistill.cli import command

if __name__ == "__main__":
    sys.exit(command("export-gguf"))
