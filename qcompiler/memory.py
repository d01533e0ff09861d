"""Process memory measurements.

``peak_rss_mb`` reads the kernel's high-water mark of *this* address space
(``VmHWM`` in ``/proc/self/status``).  ``getrusage().ru_maxrss`` is not used on Linux
because it survives ``exec``: a process started by a large parent reports the
parent's size.
"""

from __future__ import annotations

import resource


def _status_kb(field: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return float(line.split()[1])
    except OSError:
        return None
    return None


def peak_rss_mb() -> float:
    """Peak resident memory of this process's address space so far (MiB)."""
    kb = _status_kb("VmHWM")
    if kb is None:
        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024.0
