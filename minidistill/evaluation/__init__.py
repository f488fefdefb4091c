"""Evaluation: held-out perplexity inside training, lm-eval runners and local tasks."""
