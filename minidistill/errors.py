"""The project's own errors and the one error path of every entry point.

Every error minidistill raises for bad input subclasses :class:`MinidistillError` (and a builtin
such as ``ValueError`` where it lives). The entry points (``recipes/*.py``, ``eval/run_lm_eval.py``)
run their ``main`` through :func:`run_cli`: a project error prints one line to stderr,
``error [<kind>, exit <code>]: <message>``, and the process exits with the kind's code
(:data:`EXIT_CODES`); ``--debug`` (or ``MINIDISTILL_DEBUG=1``) re-raises it with its traceback.
Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence

__all__ = ["EXIT_CODES", "MinidistillError", "OutputError", "error_kind", "exit_code_for", "format_error", "run_cli"]


class MinidistillError(Exception):
    """Base of minidistill's own errors: the message names the file or key at fault and the fix."""

    @property
    def exit_code(self) -> int:
        """The process exit status of this error's kind (:data:`EXIT_CODES`)."""
        return exit_code_for(self) or 1


class OutputError(MinidistillError, FileExistsError):
    """An output folder cannot be used: not empty, the source model itself, or not writable."""


# class name -> (exit code, kind, what it covers); looked up along the exception's MRO.
EXIT_CODES: dict[str, tuple[int, str, str]] = {
    "ConfigError": (2, "config", "a config key or value, a command-line option, a YAML recipe file"),
    "DataError": (3, "data", "a data file: missing, empty, not UTF-8, unreadable, missing column, too little text"),
    "TargetError": (4, "target", "a prune target that the teacher cannot reach (shape or budget)"),
    "PruneMapError": (5, "prune-map", "a prune_map.json: unreadable, malformed, or not matching its model or teacher"),
    "CheckpointError": (6, "checkpoint", "a checkpoint or run folder: missing, damaged, or from a different config"),
    "UnsupportedArchitectureError": (7, "architecture", "a model architecture without an adapter"),
    "ModelError": (8, "model", "a model source: no such folder, not a model folder, Hub id while offline, tokenizer mismatch"),
    "HubError": (9, "hub", "a Hub push: no token, offline, bad repo id, upload failed"),
    "NonFiniteLossError": (10, "non-finite-loss", "training produced a NaN / inf loss"),
    "FileExistsError": (11, "output", "an output folder: not empty, the source model itself, or not writable"),
    "TeacherCacheError": (12, "teacher-cache", "a teacher cache or teacher samples: made from another teacher, tokenizer, data, k or settings, or incomplete"),
}
INTERRUPTED = 130  # Ctrl-C, as a shell reports SIGINT


def _entry(exc: BaseException) -> tuple[int, str, str] | None:
    for cls in type(exc).__mro__:
        if cls.__name__ in EXIT_CODES:
            return EXIT_CODES[cls.__name__]
    return None


def exit_code_for(exc: BaseException) -> int | None:
    """The exit code of a project error (see :data:`EXIT_CODES`), None for anything else."""
    entry = _entry(exc)
    return entry[0] if entry else None


def error_kind(exc: BaseException) -> str | None:
    entry = _entry(exc)
    return entry[1] if entry else None


def format_error(exc: BaseException) -> str:
    """``error [<kind>, exit <code>]: <message>`` on one line."""
    code, kind, _ = _entry(exc) or (1, "error", "")
    message = " ".join(str(exc).split()) or type(exc).__name__
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    where = f" (rank {os.environ.get('RANK', '0')})" if world > 1 else ""
    return f"error [{kind}, exit {code}]{where}: {message}"


def debug_requested(argv: Sequence[str]) -> bool:
    return "--debug" in argv or os.environ.get("MINIDISTILL_DEBUG", "") not in ("", "0", "false")


def run_cli(main: Callable[[list[str]], int | None], argv: Sequence[str] | None = None) -> int:
    """Run an entry point's ``main(argv)``; a project error becomes one stderr line and its exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = debug_requested(argv)
    try:
        return int(main(argv) or 0)
    except KeyboardInterrupt:
        if debug:
            raise
        print("interrupted", file=sys.stderr, flush=True)
        return INTERRUPTED
    except Exception as exc:  # noqa: BLE001 - only the project's own errors are turned into messages
        code = exit_code_for(exc)
        if code is None or debug:
            raise
        sys.stdout.flush()
        print(format_error(exc), file=sys.stderr, flush=True)
        return code
