"""Errors a user can fix, kept apart from programming errors.

Everything cachekit raises because of bad input or a missing file derives from `CachekitError`, so the command line
prints those as one line and lets every other exception (a bug) keep its traceback. Each class also derives from the
built-in exception a caller would naturally catch (`ValueError`, `FileNotFoundError`, `TypeError`).
"""

from __future__ import annotations

__all__ = ["CachekitError", "UsageError"]


class CachekitError(Exception):
    """Bad input or a missing resource that the user can fix; the message says how."""


class UsageError(CachekitError, ValueError):
    """An argument or setting that cachekit cannot use (out of range, unknown name, wrong kind of file)."""
