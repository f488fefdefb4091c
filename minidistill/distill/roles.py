"""The roles of a run: named models that loss terms compare (``source`` trained, ``target`` detached).

A plain run has the trained ``student`` and the frozen ``teacher``.
"""

from __future__ import annotations

STUDENT, TEACHER = "student", "teacher"

__all__ = ["STUDENT", "TEACHER"]
