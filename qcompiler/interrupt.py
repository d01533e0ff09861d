"""Stopping ONNX Runtime runs on Ctrl-C and SIGTERM.

A Python signal handler runs in the main thread *between* bytecodes, so while that thread
sits in ``InferenceSession.run`` (C++, seconds to minutes for a calibration or AWQ window)
Ctrl-C does nothing until the run returns.  ONNX Runtime stops a run between two nodes when
its ``RunOptions.terminate`` is set, from any thread.  So:

* every run qcompiler starts goes through :func:`call` (``runtime.Session.run`` does it),
  which registers the run's ``RunOptions`` for as long as the run lasts;
* :func:`install` points the interpreter's wake-up fd (:func:`signal.set_wakeup_fd`) at a pipe
  read by a daemon *watcher* thread.  The interpreter's C-level handler writes the signal's
  number there the moment the signal arrives, whatever the main thread is doing; the watcher
  then sets ``terminate`` on every registered run, when the signal's Python handler is one
  that stops the program (:data:`signal.default_int_handler`, or one marked with
  :func:`stops_runs`, e.g. ``qc``'s SIGTERM handler);
* the run returns within one node's time with ONNX Runtime's "terminate flag" error; back in
  the main thread :func:`call` lets the pending Python handler raise
  (``KeyboardInterrupt``, ``qc``'s ``Terminated``) in place of that error, so callers see
  the same exception as for a signal between runs, and outputs are cleaned up as usual.

Nothing is installed outside the main thread; a wake-up fd set by someone else (an asyncio
loop) still receives every byte.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:  # imported where a run is made: a compile that runs no session does not load ONNX Runtime
    import onnxruntime as ort

log = logging.getLogger(__name__)

#: signals whose arrival stops in-flight runs (when their handler stops the program)
SIGNALS = (signal.SIGINT, signal.SIGTERM)

_lock = threading.Lock()
_runs: set[ort.RunOptions] = set()
_installed = False
_forward_fd = -1

F = TypeVar("F", bound=Callable[..., Any])


def stops_runs(handler: F) -> F:
    """Mark a Python signal handler as one that stops the program (it raises), so that a signal it
    handles also terminates the ONNX Runtime runs in flight."""
    handler.stops_runs = True  # type: ignore[attr-defined]
    return handler


def _stops(signum: int) -> bool:
    handler = signal.getsignal(signum)
    return handler is signal.default_int_handler or bool(getattr(handler, "stops_runs", False))


def terminate_all() -> int:
    """Set ``terminate`` on every run in flight; returns how many."""
    with _lock:
        runs = list(_runs)
    for opts in runs:
        opts.terminate = True
    return len(runs)


def _watch(fd: int) -> None:
    while True:
        try:
            data = os.read(fd, 512)
        except InterruptedError:
            continue
        except OSError:
            return
        if not data:
            return
        if _forward_fd >= 0:
            with contextlib.suppress(OSError):
                os.write(_forward_fd, data)
        if any(b in SIGNALS and _stops(b) for b in data):
            n = terminate_all()
            if n:
                log.debug("signal: terminating %d ONNX Runtime run(s)", n)


def install() -> bool:
    """Start the watcher (once, from the main thread; elsewhere a no-op).  True when it runs."""
    global _installed, _forward_fd
    if _installed:
        return True
    if threading.current_thread() is not threading.main_thread():
        return False
    r, w = os.pipe()
    os.set_blocking(w, False)
    try:
        previous = signal.set_wakeup_fd(w, warn_on_full_buffer=False)
    except (ValueError, OSError) as e:  # not the main interpreter
        log.debug("no signal watcher: %s", e)
        os.close(r)
        os.close(w)
        return False
    _forward_fd = previous
    threading.Thread(target=_watch, args=(r,), name="qc-signal-watcher", daemon=True).start()
    _installed = True
    return True


def run_options() -> ort.RunOptions:
    """``RunOptions`` for one run: ONNX Runtime's own log of a failed run off (the exception says it)."""
    import onnxruntime as ort

    opts = ort.RunOptions()
    opts.log_severity_level = 4
    return opts


def _checkpoint() -> None:
    """A Python call: the interpreter runs pending signal handlers on entering it."""


R = TypeVar("R")


def call(run: Callable[[ort.RunOptions], R], opts: ort.RunOptions | None = None) -> R:
    """``run(opts)`` with ``opts`` registered as a run in flight.  A run the watcher terminated
    raises the signal's own exception (``KeyboardInterrupt``, ``Terminated``), not ONNX Runtime's
    error.  (A plain function, not a context manager: the handler may raise in any Python frame
    the unwinding enters, and this ``finally`` must still run.)"""
    install()
    opts = opts if opts is not None else run_options()
    with _lock:
        _runs.add(opts)
    try:
        return run(opts)
    except Exception:
        if opts.terminate and threading.current_thread() is threading.main_thread():
            _checkpoint()  # the signal's handler raises here
        raise
    finally:
        with _lock:
            _runs.discard(opts)
