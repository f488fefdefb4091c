"""minidistill: prune a Hugging Face causal LM, then distill it back to strength."""

import logging

__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())
