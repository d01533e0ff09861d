"""Errors that reach the user as one line and a non-zero exit code.

Library code raises :class:`QCError` (or a subclass) with a message that names the
problem and, where there is one, the fix.  The CLI prints ``qc: error: <message>``
and exits with ``exit_code``; anything else is a bug and keeps its traceback.

Every command uses one table of exit codes by cause (:data:`EXIT_CODES`, also in the
README): the exception class says the cause, the class says the code.
"""

from __future__ import annotations

EXIT_OK = 0
#: ``qc check --strict`` / ``qc deploy``: the command ran and found problems in the model.
EXIT_FINDINGS = 1
EXIT_BAD_OPTION = 2
EXIT_BAD_INPUT = 3
EXIT_IO = 4
EXIT_UNSUPPORTED = 5
EXIT_INTERRUPTED = 130
EXIT_OUT_OF_MEMORY = 137
EXIT_TERMINATED = 143

#: exit code → cause (the README's table is checked against this one).
EXIT_CODES: dict[int, str] = {
    EXIT_OK: "success",
    EXIT_FINDINGS: "the command ran and found problems (`qc check --strict`, `qc deploy`)",
    EXIT_BAD_OPTION: "bad option or usage: an unknown, invalid, conflicting or unused option value "
    "(also argparse's own errors)",
    EXIT_BAD_INPUT: "bad input: a model, weight (NaN/Inf), external-data, GGUF, tokenizer, text or "
    "config file that is missing, malformed or unusable",
    EXIT_IO: "output: the output may not be written (exists, is or overlaps an input, not qcompiler's) "
    "or cannot be (read-only, permission, disk full)",
    EXIT_UNSUPPORTED: "unsupported model: an opset, op pattern or structure qcompiler does not handle",
    EXIT_INTERRUPTED: "interrupted (Ctrl-C); nothing was written to the output",
    EXIT_OUT_OF_MEMORY: "out of memory",
    EXIT_TERMINATED: "terminated (SIGTERM); nothing was written to the output",
}


class QCError(Exception):
    """A user-facing error; by default a bad option or usage (exit 2)."""

    exit_code: int = EXIT_BAD_OPTION

    def __init__(self, message: str, *, exit_code: int | None = None) -> None:
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class OptionError(QCError):
    """An option value that is invalid, conflicting, or not used by the chosen recipe."""

    exit_code = EXIT_BAD_OPTION


class InputError(QCError):
    """A file or folder given by the user is missing, malformed or unsupported."""

    exit_code = EXIT_BAD_INPUT


class OutputError(QCError):
    """The output may not or cannot be written (exists, overlaps an input, read-only, disk full)."""

    exit_code = EXIT_IO


class UnsupportedModelError(QCError):
    """The graph does not have a structure qcompiler knows how to handle."""

    exit_code = EXIT_UNSUPPORTED


class CalibrationError(InputError):
    """Calibration data or statistics are missing, empty or non-finite (bad input, exit 3)."""
