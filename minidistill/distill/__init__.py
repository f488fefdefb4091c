"""Distillation: losses, feature capture, and teacher/student pairing."""
