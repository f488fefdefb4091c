"""The roles of a run: named models that loss terms compare (``source`` trained, ``target`` detached).

A plain run has the trained ``student`` and the frozen ``teacher``; ``roles.<name>`` in the recipe config adds
further frozen models (a second teacher), and mutual learning's trained peers are ``peer<i>``.
"""

from __future__ import annotations

import re

STUDENT, TEACHER = "student", "teacher"

ROLE_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*")
"""What a role name may be."""

PEER_ROLE = re.compile(r"peer[0-9]+")
"""The names of mutual learning's peers (reserved)."""

__all__ = ["PEER_ROLE", "ROLE_NAME", "STUDENT", "TEACHER"]
