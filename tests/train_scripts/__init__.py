"""Helpers and scripts the trainer tests build tiny runs with."""
