"""Errors that reach the user as one line and a non-zero exit code.

Library code raises :class:`QCError` (or a subclass) with a message that names the
problem and, where there is one, the fix.  The CLI prints ``qc: error: <message>``
and exits with ``exit_code``; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class QCError(Exception):
    """A user-facing error: bad input, bad option, an environment problem."""

    exit_code: int = 2

    def __init__(self, message: str, *, exit_code: int | None = None) -> None:
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class InputError(QCError):
    """A file or folder given by the user is missing, malformed or unsupported."""

    exit_code = 3


class OutputError(QCError):
    """The output cannot be written (exists, read-only, disk full)."""

    exit_code = 4


class UnsupportedModelError(QCError):
    """The graph does not have a structure qcompiler knows how to handle."""

    exit_code = 5


class CalibrationError(QCError):
    """Calibration data or statistics are missing, empty or non-finite."""

    exit_code = 6
