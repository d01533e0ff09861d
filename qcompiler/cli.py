"""``qc``: the command-line interface.

Each sub-command lives in ``qcompiler/commands/<name>.py`` and exposes
``register(subparsers)``, which adds its parser and sets ``func(args) -> int``.
Errors meant for the user (:class:`qcompiler.errors.QCError`) print one line,
``qc: error: ...``, and exit with the code of its cause (``qcompiler.errors.EXIT_CODES``,
the README's table); Ctrl-C exits 130 (SIGTERM 143) after the command's own clean-up
(outputs are atomic, so nothing half-written is left), within one ONNX Runtime node's time
even in the middle of a run (:mod:`qcompiler.interrupt`).
"""

from __future__ import annotations

import argparse
import errno
import importlib
import logging
import pkgutil
import signal
import sys
import threading

from qcompiler import __version__, interrupt
from qcompiler.errors import (
    EXIT_INTERRUPTED,
    EXIT_IO,
    EXIT_OUT_OF_MEMORY,
    EXIT_TERMINATED,
    QCError,
)

log = logging.getLogger("qcompiler")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qc",
        description="qcompiler: an ONNX graph-transform quantization compiler for LLMs",
    )
    parser.add_argument("--version", action="version", version=f"qcompiler {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    import qcompiler.commands as commands

    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda i: i.name):
        if not info.name.startswith("_"):
            importlib.import_module(f"qcompiler.commands.{info.name}").register(sub)
    return parser


def setup_logging(verbose: int, quiet: bool) -> None:
    level = logging.WARNING if quiet else (logging.DEBUG if verbose > 1 else logging.INFO)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname).1s %(name)s: %(message)s" if verbose else "%(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    logging.getLogger("qcompiler").setLevel(level)
    if not verbose:
        for noisy in ("onnx_ir", "onnxscript", "transformers", "optimum", "torch", "urllib3"):
            logging.getLogger(noisy).setLevel(logging.ERROR)


class Terminated(KeyboardInterrupt):
    """SIGTERM, turned into an exception so that outputs are cleaned up as on Ctrl-C."""


@interrupt.stops_runs  # SIGTERM also stops an ONNX Runtime run in flight (qcompiler.interrupt)
def _on_sigterm(signum: int, frame: object) -> None:
    raise Terminated()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.verbose, args.quiet)
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if in_main_thread else None
    try:
        return int(args.func(args) or 0)
    except QCError as e:
        print(f"qc: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt as e:
        print("qc: interrupted; nothing was written to the output", file=sys.stderr)
        return EXIT_TERMINATED if isinstance(e, Terminated) else EXIT_INTERRUPTED
    except MemoryError:
        print("qc: error: out of memory (try --max-memory, a smaller --calib-samples or --seq-len)", file=sys.stderr)
        return EXIT_OUT_OF_MEMORY
    except OSError as e:
        # in a failed copy the destination is filename2 (shutil names the source first)
        target = e.filename2 or e.filename or "the output"
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            print(f"qc: error: disk full while writing {target}", file=sys.stderr)
            return EXIT_IO
        if e.errno in (errno.EACCES, errno.EROFS, errno.EPERM, errno.EFBIG):
            print(f"qc: error: cannot write {target}: {e.strerror}", file=sys.stderr)
            return EXIT_IO
        raise
    finally:
        if in_main_thread and previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
