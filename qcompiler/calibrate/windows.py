"""Calibration windows: ``samples`` token windows of ``seq_len``, drawn with a seed.

The text (``.txt``, ``.jsonl`` with ``"text"`` fields, or a folder of ``.txt``) is
tokenized with the model folder's tokenizer.  With ``T`` tokens and ``n = T // L``
disjoint windows available:

* ``n ≥ samples``: ``samples`` distinct disjoint windows, chosen with
  ``default_rng(seed).choice(n, samples, replace=False)`` and kept in text order;
* ``n < samples``: window starts drawn uniformly from ``[0, T − L]`` (windows
  overlap; GPTQ's sampling), with a warning.

Fewer than ``L`` tokens is an error (no window fits).  Windows are identified by
``digest`` (SHA-256 of the token ids), which keys the statistics cache.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qcompiler.data import read_text, tokenize
from qcompiler.errors import CalibrationError, OptionError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CalibWindows:
    ids: np.ndarray  # [samples, seq_len] int64
    source: str
    text_tokens: int
    overlapping: bool

    @property
    def count(self) -> int:
        return int(self.ids.shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.ids.shape[1])

    @property
    def digest(self) -> str:
        h = hashlib.sha256(np.ascontiguousarray(self.ids, dtype=np.int64).tobytes())
        h.update(str(self.ids.shape).encode())
        return h.hexdigest()

    def describe(self) -> dict[str, object]:
        return {
            "source": self.source,
            "samples": self.count,
            "seq_len": self.seq_len,
            "text_tokens": self.text_tokens,
            "overlapping": self.overlapping,
            "digest": self.digest,
        }


def sample_windows(tokens: np.ndarray, samples: int, seq_len: int, seed: int = 0, source: str = "") -> CalibWindows:
    """Draw ``samples`` windows of ``seq_len`` tokens from ``tokens`` (see module docstring)."""
    if samples < 1:
        raise OptionError(f"--calib-samples must be at least 1, got {samples}")
    if seq_len < 2:
        raise OptionError(f"--seq-len must be at least 2, got {seq_len}")
    t = np.asarray(tokens, dtype=np.int64).reshape(-1)
    where = f"{source}: " if source else ""
    if len(t) < seq_len:
        raise CalibrationError(
            f"{where}the calibration text has {len(t)} tokens, fewer than one window of --seq-len {seq_len}; "
            "give a longer text or a smaller --seq-len"
        )
    rng = np.random.default_rng(seed)
    n = len(t) // seq_len
    if n >= samples:
        chosen = np.sort(rng.choice(n, size=samples, replace=False))
        ids = t[: n * seq_len].reshape(n, seq_len)[chosen]
        overlapping = False
    else:
        starts = rng.integers(0, len(t) - seq_len + 1, size=samples)
        ids = np.stack([t[s : s + seq_len] for s in starts])
        overlapping = True
        log.warning(
            "%sthe calibration text has %d tokens (%d disjoint windows of %d) for %d samples: windows overlap",
            where, len(t), n, seq_len, samples,
        )
    return CalibWindows(np.ascontiguousarray(ids), source, len(t), overlapping)


def load_windows(model_dir: str | os.PathLike, calib: str | os.PathLike, samples: int, seq_len: int, seed: int = 0) -> CalibWindows:
    """Read, tokenize (with ``model_dir``'s tokenizer) and sample the calibration text."""
    text = read_text(calib)  # raises InputError for a missing/empty file
    return sample_windows(tokenize(model_dir, text), samples, seq_len, seed, source=str(Path(calib)))
