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


_UNITS = {"": 1, "B": 1, "K": 2**10, "KB": 2**10, "KIB": 2**10, "M": 2**20, "MB": 2**20, "MIB": 2**20,
          "G": 2**30, "GB": 2**30, "GIB": 2**30, "T": 2**40, "TB": 2**40, "TIB": 2**40}


def parse_size(text: str) -> int:
    """``"8G"``, ``"512M"``, ``"1.5GiB"``, ``"1000000"`` → bytes (binary units: 1G = 2^30)."""
    import re

    from qcompiler.errors import OptionError

    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
    unit = m.group(2).upper() if m else ""
    if not m or unit not in _UNITS:
        raise OptionError(f"--max-memory '{text}' is not a size (e.g. 8G, 512M, 1.5GiB)")
    value = int(float(m.group(1)) * _UNITS[unit])
    if value <= 0:
        raise OptionError(f"--max-memory '{text}' must be positive")
    return value
