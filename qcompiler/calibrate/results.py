"""What ``CalibrationStats.get`` returns for observers whose result is more than an array."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class MinMax:
    min: float
    max: float

    @property
    def absmax(self) -> float:
        return max(abs(self.min), abs(self.max))


@dataclass(frozen=True)
class Hessian:
    """``xtx = Σ_t x_tᵀ x_t`` over ``rows`` rows (GPTQ uses ``H = 2·xtx/rows``)."""

    xtx: np.ndarray
    rows: int

    def mean(self) -> np.ndarray:
        return self.xtx / max(self.rows, 1)


@dataclass(frozen=True)
class Outliers:
    """``channel_rows[c]``: rows with ``|x[t, c]| ≥ threshold``; ``row_ratio``: ``max|x| / median|x|`` per row."""

    channel_rows: np.ndarray
    rows: int
    threshold: float
    row_ratio: np.ndarray

    @property
    def channel_fraction(self) -> np.ndarray:
        return self.channel_rows / max(self.rows, 1)

    def outlier_channels(self, min_fraction: float = 0.25) -> np.ndarray:
        return np.nonzero(self.channel_fraction >= min_fraction)[0]

    def massive_rows(self, ratio: float = 100.0) -> np.ndarray:
        """Indices into ``row_ratio`` (same shape) of rows whose max is ``ratio``× their median."""
        return np.argwhere(self.row_ratio >= ratio)


@dataclass(frozen=True)
class Sample:
    """At most ``sample_rows`` rows of the activation; ``index[i]`` = (window, row in window)."""

    rows: np.ndarray  # [k, C] float32
    index: np.ndarray  # [k, 2] int64
