"""Pruning: importance, width and depth pruning, reconstruction, targets and search."""
