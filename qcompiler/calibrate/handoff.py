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
from typing import Any

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
    """Writes the values one sweep hands off; :meth:`commit` publishes them.

    Each window goes to its own offset of the value's temporary file (positional writes,
    never truncating), so several writers — calibration shards in other processes on the
    same file system — can fill disjoint windows of one file; the driver :meth:`adopt` s
    what they wrote and commits once.
    """

    def __init__(self, handoff: Handoff) -> None:
        self.handoff = handoff
        self.files: dict[str, tuple[int, dict[str, Any]]] = {}

    def write(self, name: str, window: int, arr: np.ndarray) -> None:
        arr = np.ascontiguousarray(arr)
        if name not in self.files:
            info = {"file": _file_name(name), "dtype": arr.dtype.str, "shape": list(arr.shape)}
            fd = os.open(self.handoff.path / f".{info['file']}.tmp", os.O_WRONLY | os.O_CREAT, 0o644)
            self.files[name] = (fd, info)
        fd, info = self.files[name]
        if list(arr.shape) != info["shape"] or arr.dtype.str != info["dtype"]:
            raise ValueError(f"hand-off value '{name}' changed shape between windows: {arr.shape} vs {info['shape']}")
        data = memoryview(arr.reshape(-1).view(np.uint8))
        done = 0
        while done < len(data):
            done += os.pwrite(fd, data[done:], window * arr.nbytes + done)

    def infos(self) -> dict[str, dict[str, Any]]:
        """What was written (value → file, dtype, shape), after :meth:`flush`."""
        return {name: dict(info) for name, (_, info) in self.files.items()}

    def flush(self) -> None:
        """Close the files (a worker's part is done; the driver commits)."""
        for fd, _ in self.files.values():
            if fd >= 0:
                os.close(fd)
        self.files = {name: (-1, info) for name, (_, info) in self.files.items()}

    def adopt(self, infos: dict[str, dict[str, Any]]) -> None:
        """Take over values another writer wrote into this hand-off's temporary files."""
        for name, info in infos.items():
            have = self.files.get(name)
            if have is not None and have[1] != info:
                raise ValueError(f"hand-off value '{name}' differs between shards: {info} vs {have[1]}")
            self.files.setdefault(name, (-1, dict(info)))

    def commit(self) -> None:
        self.flush()
        for name, (_, info) in self.files.items():
            os.replace(self.handoff.path / f".{info['file']}.tmp", self.handoff.path / info["file"])
            self.handoff.index[name] = info
        self.files.clear()
        write_json(self.handoff.path / INDEX, self.handoff.index)

    def close(self) -> None:
        self.flush()
        for _, info in self.files.values():
            (self.handoff.path / f".{info['file']}.tmp").unlink(missing_ok=True)
        self.files.clear()
