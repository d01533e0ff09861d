"""Hand-off between sweeps: the cut values of every window, on disk.

A sweep over layers ``[a, b)`` needs, per window, the values that cross into it from
earlier layers (residual stream, rotary tables, mask: the *cut*, see
:meth:`qcompiler.calibrate.graph.GraphIndex.slice`).  The sweep that computes them
writes them here, one raw file per value laid out ``window × bytes_per_window``,
with plain file writes and reads (page cache, not this process's memory).  A value
becomes visible (``index.json``) only when its sweep has finished, so a resumed run
uses complete hand-offs or recomputes from the model's inputs.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from qcompiler.artifact import write_json

INDEX = "index.json"


def _file_name(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()[:24] + ".bin"


class Handoff:
    """Cut values by name; see module docstring."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self.index: dict[str, dict[str, Any]] = json.loads((path / INDEX).read_text())
        except (OSError, ValueError):
            self.index = {}

    def has(self, names: list[str]) -> bool:
        return all(n in self.index and (self.path / self.index[n]["file"]).is_file() for n in names)

    def read(self, name: str, window: int) -> np.ndarray:
        info = self.index[name]
        dtype, shape = np.dtype(info["dtype"]), tuple(info["shape"])
        nbytes = int(np.prod(shape)) * dtype.itemsize
        with open(self.path / info["file"], "rb", buffering=0) as f:
            f.seek(window * nbytes)
            buf = f.read(nbytes)
        return np.frombuffer(buf, dtype=dtype).reshape(shape)

    def writer(self) -> HandoffWriter:
        self.path.mkdir(parents=True, exist_ok=True)
        return HandoffWriter(self)


class HandoffWriter:
    """Writes the values one sweep hands off; :meth:`commit` publishes them."""

    def __init__(self, handoff: Handoff) -> None:
        self.handoff = handoff
        self.files: dict[str, tuple[BinaryIO, dict[str, Any]]] = {}

    def write(self, name: str, window: int, arr: np.ndarray) -> None:
        arr = np.ascontiguousarray(arr)
        if name not in self.files:
            info = {"file": _file_name(name), "dtype": arr.dtype.str, "shape": list(arr.shape)}
            f = open(self.handoff.path / f".{info['file']}.tmp", "wb")  # noqa: SIM115 (closed in commit/close)
            self.files[name] = (f, info)
        f, info = self.files[name]
        if list(arr.shape) != info["shape"] or arr.dtype.str != info["dtype"]:
            raise ValueError(f"hand-off value '{name}' changed shape between windows: {arr.shape} vs {info['shape']}")
        f.seek(window * arr.nbytes)
        f.write(arr.tobytes())

    def commit(self) -> None:
        for name, (f, info) in self.files.items():
            f.close()
            os.replace(self.handoff.path / f".{info['file']}.tmp", self.handoff.path / info["file"])
            self.handoff.index[name] = info
        self.files.clear()
        write_json(self.handoff.path / INDEX, self.handoff.index)

    def close(self) -> None:
        for f, info in self.files.values():
            f.close()
            (self.handoff.path / f".{info['file']}.tmp").unlink(missing_ok=True)
        self.files.clear()
