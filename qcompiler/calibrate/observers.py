"""Observers: statistics of one activation, reduced batch by batch (raw values never kept).

An activation ``x`` is viewed as rows × channels: channels are its last axis, rows all
the axes before it (the tokens of a ``[batch, seq, hidden]`` value).  Per batch each
observer folds ``X[rows, C]`` into a fixed-size state:

=====================  ==========================================================  ==============
observer               state / what ``CalibrationStats.get`` returns               memory
=====================  ==========================================================  ==============
``minmax``             ``MinMax(min, max)`` over everything                         16 B
``absmax_channel``     ``max_t |x[t, c]|`` per channel → ``float32[C]``             4·C
``mean_abs_channel``   ``mean_t |x[t, c]|`` per channel → ``float32[C]``            8·C
``absmax_token``       ``max_c |x[t, c]|`` per row → ``float32[batches, rows]``     4·rows in all
``histogram``          :class:`~qcompiler.calibrate.histogram.Histogram` of ``x``   8·bins
``hessian``            ``Hessian(xtx = XᵀX = Σ_t x_tᵀx_t, rows)``                   4·C² (8·C²)
``outliers``           ``Outliers``: rows with ``|x| ≥ threshold`` per channel, and  8·C + 4·rows
                       per row ``max|x| / median|x|`` (massive activations)
``sample``             ``Sample``: a seeded uniform subset of at most                ``sample_rows``·C·4
                       ``sample_rows`` rows, the *same* rows for every value
``log_histogram``      :class:`~qcompiler.calibrate.histogram.LogHistogram`: count,     40 KiB
                       Σ|x|, Σx² per sign and geometric bin of ``|x|`` (8 per
                       octave): any static quantizer's error, bounded memory
=====================  ==========================================================  ==============

``absmax_channel_window`` is ``absmax_channel`` per calibration window (``WindowAbsMax``,
4·C bytes per window), for leave-one-window-out estimates of how a range generalizes.

``hessian`` accumulates with BLAS ``syrk`` (``C ← XᵀX + C``, upper triangle) in
float32 by default (``hessian_dtype="float64"`` for long runs) over one *shard* of
``shard_windows`` windows, and adds each shard's sum into a float64 total; the result
matches float64 ``XᵀX`` to ~1e-7 relative.

**Merging.**  Every observer has an exact :meth:`Observer.merge`: ``a.merge(b)``, with
``b`` observed on windows after ``a``'s, leaves ``a`` equal to one observer that saw
both.  Calibration windows are cut into shards of ``ObserverConfig.shard_windows``
consecutive windows (boundaries depend only on the window index):

* order-free statistics merge bit for bit for *any* split: min/max and abs-max
  (``min``/``max``), integer counts (``+``), histograms (power-of-two bin widths,
  :mod:`~qcompiler.calibrate.histogram`), per-window and per-row lists (concatenated in
  window order), the seeded row sample (the ``sample_rows`` smallest priorities of the
  union);
* floating-point sums (``mean_abs_channel``'s Σ|x| in float64, ``hessian``'s XᵀX) are
  summed per shard and the shard sums added into a float64 total in shard order
  (:meth:`Observer.end_shard`).  One process and any number of workers, each observing
  whole shards that are merged in shard order, perform the same additions in the same
  order: bit-identical.  Merging arbitrary splits instead agrees to float64 rounding
  (relative 1e-12 for Σ|x|, the float32 accumulation's 1e-6 for ``hessian``).  ``sample`` gives row ``r`` of window ``w`` the priority
``u = default_rng([seed, w]).random(rows)[r]`` and keeps the ``sample_rows`` smallest:
a uniform sample without replacement, independent of batching, groups and resumes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Any, ClassVar

import numpy as np
from scipy.linalg import blas

from qcompiler.calibrate.histogram import LOG_BINS, Histogram, LogHistogram, StreamingHistogram, log_bin_index
from qcompiler.calibrate.results import Hessian, MinMax, Outliers, Sample


@dataclass(frozen=True)
class ObserverConfig:
    """Parameters that change what observers compute (part of the cache key)."""

    histogram_bins: int = 4096
    sample_rows: int = 4096
    outlier_threshold: float = 6.0
    hessian_dtype: str = "float32"  # accumulator: float32 | float64
    seed: int = 0
    shard_windows: int = 8  # windows per shard: float sums are added per shard, shards in order (merging)

    def __post_init__(self) -> None:
        if self.histogram_bins < 8 or self.histogram_bins & (self.histogram_bins - 1):
            raise ValueError(f"histogram_bins must be a power of two >= 8, got {self.histogram_bins}")
        if self.sample_rows < 1:
            raise ValueError(f"sample_rows must be positive, got {self.sample_rows}")
        if self.hessian_dtype not in ("float32", "float64"):
            raise ValueError(f"hessian_dtype must be float32 or float64, got {self.hessian_dtype}")
        if self.shard_windows < 1:
            raise ValueError(f"shard_windows must be positive, got {self.shard_windows}")


class BatchView:
    """One batch of one activation as ``X[rows, C]`` float32, with shared reductions cached."""

    def __init__(self, x: np.ndarray, window: int) -> None:
        x = np.asarray(x)
        if x.dtype != np.float32:
            x = x.astype(np.float32)
        self.x2 = x.reshape(-1, x.shape[-1] if x.ndim else 1)
        self.window = window

    @property
    def rows(self) -> int:
        return self.x2.shape[0]

    @property
    def channels(self) -> int:
        return self.x2.shape[1]

    @cached_property
    def colmax(self) -> np.ndarray:
        return self.x2.max(axis=0)

    @cached_property
    def colmin(self) -> np.ndarray:
        return self.x2.min(axis=0)

    @cached_property
    def col_absmax(self) -> np.ndarray:
        return np.maximum(self.colmax, -self.colmin)

    @cached_property
    def absmax(self) -> float:
        return float(self.col_absmax.max()) if self.x2.size else 0.0

    @cached_property
    def absx(self) -> np.ndarray:
        return np.abs(self.x2)

    @cached_property
    def row_absmax(self) -> np.ndarray:
        return self.absx.max(axis=1)

    def is_finite(self) -> bool:
        """NaN propagates through max/min and ±Inf shows in them: two cheap reductions decide."""
        if self.x2.size == 0:
            return True
        return bool(np.isfinite(self.colmax).all() and np.isfinite(self.colmin).all())

    def release(self) -> None:
        """Drop the batch-sized arrays (the activation and ``|x|``) once every observer has seen them,
        so a sweep holds one copy per value (ORT's output), not two; small reductions stay."""
        self.__dict__.pop("absx", None)
        self.x2 = np.empty((0, self.x2.shape[1]), np.float32)

    def priorities(self, seed: int) -> np.ndarray:
        return np.random.default_rng([seed, self.window]).random(self.rows)


class Observer:
    """Base class: ``update`` per batch, ``merge`` another observer's later data, ``end_shard`` at a
    shard boundary, ``state`` → arrays saved in .npz, ``result`` ← arrays (module docstring)."""

    name: ClassVar[str] = ""
    #: merge equals one pass bit for bit for any split (False: float sums, exact for shard-aligned splits)
    exact_merge: ClassVar[bool] = True

    def __init__(self, cfg: ObserverConfig, channels: int) -> None:
        self.cfg = cfg
        self.channels = channels

    def update(self, b: BatchView) -> None:
        raise NotImplementedError

    def merge(self, other: Observer) -> None:
        """Fold ``other`` (the same observer on later windows; shards ended) into this one."""
        raise NotImplementedError

    def end_shard(self) -> None:
        """Close the current shard: add its float sums into the total (no-op for order-free statistics)."""

    def _check(self, other: Observer) -> None:
        if type(other) is not type(self) or other.channels != self.channels or other.cfg != self.cfg:
            raise ValueError(f"cannot merge {type(other).__name__}({other.channels}) into "
                             f"{type(self).__name__}({self.channels}) with other settings")

    def state(self) -> dict[str, np.ndarray]:
        raise NotImplementedError

    @staticmethod
    def result(state: Mapping[str, np.ndarray]) -> Any:
        raise NotImplementedError

    @staticmethod
    def nbytes(cfg: ObserverConfig, channels: int, rows_total: int) -> int:
        """Memory of the state after ``rows_total`` rows (for planning sweeps)."""
        raise NotImplementedError


OBSERVERS: dict[str, type[Observer]] = {}


def _register(cls: type[Observer]) -> type[Observer]:
    OBSERVERS[cls.name] = cls
    return cls


@_register
class MinMaxObserver(Observer):
    name = "minmax"

    def __init__(self, cfg: ObserverConfig, channels: int) -> None:
        super().__init__(cfg, channels)
        self.lo, self.hi = np.inf, -np.inf

    def update(self, b: BatchView) -> None:
        if b.x2.size:
            self.lo = min(self.lo, float(b.colmin.min()))
            self.hi = max(self.hi, float(b.colmax.max()))

    def merge(self, other: Observer) -> None:
        self._check(other)
        assert isinstance(other, MinMaxObserver)
        self.lo, self.hi = min(self.lo, other.lo), max(self.hi, other.hi)

    def state(self) -> dict[str, np.ndarray]:
        return {"min": np.array(self.lo), "max": np.array(self.hi)}

    @staticmethod
    def result(state: Mapping[str, np.ndarray]) -> MinMax:
        return MinMax(float(state["min"]), float(state["max"]))

    @staticmethod
    def nbytes(cfg: ObserverConfig, channels: int, rows_total: int) -> int:
        return 16


@_register
class AbsMaxChannelObserver(Observer):
    name = "absmax_channel"

    def __init__(self, cfg: ObserverConfig, channels: int) -> None:
        super().__init__(cfg, channels)
        self.acc = np.zeros(channels, dtype=np.float32)

    def update(self, b: BatchView) -> None:
        np.maximum(self.acc, b.col_absmax, out=self.acc)

    def merge(self, other: Observer) -> None:
        self._check(other)
        assert isinstance(other, AbsMaxChannelObserver)
        np.maximum(self.acc, other.acc, out=self.acc)

    def state(self) -> dict[str, np.ndarray]:
        return {"absmax": self.acc}

    @staticmethod
    def result(state: Mapping[str, np.ndarray]) -> np.ndarray:
        return np.asarray(state["absmax"])

    @staticmethod
    def nbytes(cfg: ObserverConfig, channels: int, rows_total: int) -> int:
        return 4 * channels


@_register
class AbsMaxChannelWindowObserver(Observer):
    """``max_t |x[t, c]|`` per channel and calibration window (for leave-one-window-out range estimates)."""

    name = "absmax_channel_window"

    def __init__(self, cfg: ObserverConfig, channels: int) -> None:
        super().__init__(cfg, channels)
        self.rows: dict[int, np.ndarray] = {}

    def update(self, b: BatchView) -> None:
        prev = self.rows.get(b.window)
        self.rows[b.window] = b.col_absmax.astype(np.float32) if prev is None else np.maximum(prev, b.col_absmax)

    def merge(self, other: Observer) -> None:
        self._check(other)
        assert isinstance(other, AbsMaxChannelWindowObserver)
        for w, row in other.rows.items():
            prev = self.rows.get(w)
            self.rows[w] = row.copy() if prev is None else np.maximum(prev, row)

    def state(self) -> dict[str, np.ndarray]:
        keys = sorted(self.rows)
        absmax = np.stack([self.rows[k] for k in keys]) if keys else np.zeros((0, self.channels), np.float32)
        return {"windows": np.array(keys, dtype=np.int64), "absmax": absmax}

    @staticmethod
    def result(state: Mapping[str, np.ndarray]) -> WindowAbsMax:
        return WindowAbsMax(np.asarray(state["windows"]), np.asarray(state["absmax"]))

    @staticmethod
    def nbytes(cfg: ObserverConfig, channels: int, rows_total: int) -> int:
        return 4 * channels * (rows_total // 64 + 1)


@dataclass(frozen=True)
class WindowAbsMax:
    """``absmax[i, c]``: the channel abs-max of x over calibration window ``windows[i]``."""

    windows: np.ndarray  # int64 [W]
    absmax: np.ndarray  # float32 [W, C]


class _ShardSum(Observer):
    """Float64 sums kept per shard (``shard``) and added into ``acc`` when the shard ends, in shard order, so
    merging shard-aligned splits equals one pass.  Subclasses add into ``shard`` and set ``open``."""

    exact_merge = False

    def _init_sums(self, shape: int | tuple[int, ...]) -> None:
        self.acc = np.zeros(shape, dtype=np.float64)
        self.shard = np.zeros(shape, dtype=np.float64)
        self.open = False

    def end_shard(self) -> None:
        if self.open:
            self.acc += self.shard
            self.shard[:] = 0.0
            self.open = False

    def _merge_sums(self, other: _ShardSum) -> None:
        """Close both shards and add ``other``'s total (the caller has checked ``other``'s type)."""
        self.end_shard()
        other.end_shard()
        self.acc += other.acc


@_register
class MeanAbsChannelObserver(_ShardSum):
    """Σ_t |x[t, c]| in float64: per shard (``shard``), shard sums added into ``acc`` in shard order."""

    name = "mean_abs_channel"

    def __init__(self, cfg: ObserverConfig, channels: int) -> None:
        super().__init__(cfg, channels)
        self._init_sums(channels)
        self.rows = 0

    def update(self, b: BatchView) -> None:
        self.shard += b.absx.sum(axis=0, dtype=np.float64)
        self.open = True
        self.rows += b.rows

    def merge(self, other: Observer) -> None:
        self._check(other)
        assert isinstance(other, MeanAbsChannelObserver)
        self._merge_sums(other)
        self.rows += other.rows

    def state(self) -> dict[str, np.ndarray]:
        self.end_shard()
        return {"sum_abs": self.acc, "rows": np.array(self.rows, dtype=np.int64)}

    @staticmethod
    def result(state: Mapping[str, np.ndarray]) -> np.ndarray:
        return (np.asarray(state["sum_abs"]) / max(int(state["rows"]), 1)).astype(np.float32)

    @staticmethod
    def nbytes(cfg: ObserverConfig, channels: int, rows_total: int) -> int:
        return 8 * channels


class _PerRow(Observer):
    """Keeps one float per row; rows of each batch are remembered to reshape at the end."""

    def __init__(self, cfg: ObserverConfig, channels: int) -> None:
        super().__init__(cfg, channels)
        self.parts: list[np.ndarray] = []

    def _rows_state(self) -> dict[str, np.ndarray]:
        flat = np.concatenate(self.parts) if self.parts else np.zeros(0, np.float32)
        return {"per_row": flat, "rows_per_batch": np.array([len(p) for p in self.parts], dtype=np.int64)}

    def merge(self, other: Observer) -> None:
        self._check(other)
        assert isinstance(other, _PerRow)
        self.parts.extend(other.parts)


def _by_batch(state: Mapping[str, np.ndarray]) -> np.ndarray:
    flat, per = np.asarray(state["per_row"]), np.asarray(state["rows_per_batch"])
    if len(per) and (per == per[0]).all():
        return flat.reshape(len(per), int(per[0]))
    return flat


@_register
class AbsMaxTokenObserver(_PerRow):
    name = "absmax_token"

    def update(self, b: BatchView) -> None:
        self.parts.append(b.row_absmax.astype(np.float32))

    def state(self) -> dict[str, np.ndarray]:
        return self._rows_state()

    @staticmethod
    def result(state: Mapping[str, np.ndarray]) -> np.ndarray:
        return _by_batch(state)

    @staticmethod
    def nbytes(cfg: ObserverConfig, channels: int, rows_total: int) -> int:
        return 4 * rows_total


@_register
class HistogramObserver(Observer):
    name = "histogram"

    def __init__(self, cfg: ObserverConfig, channels: int) -> None:
        super().__init__(cfg, channels)
        self.hist = StreamingHistogram(cfg.histogram_bins)

    def update(self, b: BatchView) -> None:
        self.hist.update(b.x2, b.absmax)

    def merge(self, other: Observer) -> None:
        self._check(other)
        assert isinstance(other, HistogramObserver)
        self.hist.merge(other.hist)

    def state(self) -> dict[str, np.ndarray]:
        return self.hist.state()

    @staticmethod
    def result(state: Mapping[str, np.ndarray]) -> Histogram:
        return Histogram(np.asarray(state["counts"]), float(state["width"]))

    @staticmethod
    def nbytes(cfg: ObserverConfig, channels: int, rows_total: int) -> int:
        return 8 * cfg.histogram_bins


@_register
class LogHistogramObserver(_ShardSum):
    """Per sign and geometric bin of ``|x|``: count (int64, order-free) and ``Σ|x|``, ``Σx²`` (float64, per
    shard, shard sums added in shard order), for :meth:`LogHistogram.static_error` after calibration."""

    name = "log_histogram"

    def __init__(self, cfg: ObserverConfig, channels: int) -> None:
        super().__init__(cfg, channels)
        self.count = np.zeros(2 * LOG_BINS, dtype=np.int64)
        self._init_sums((2, 2 * LOG_BINS))

    def update(self, b: BatchView) -> None:
        x = b.x2.ravel()
        x = x[x != 0]
        if not x.size:
            return
        ax = np.abs(x).astype(np.float64)
        k = log_bin_index(ax) + LOG_BINS * (x > 0)
        self.count += np.bincount(k, minlength=2 * LOG_BINS)
        self.shard[0] += np.bincount(k, weights=ax, minlength=2 * LOG_BINS)
        self.shard[1] += np.bincount(k, weights=ax * ax, minlength=2 * LOG_BINS)
        self.open = True

    def merge(self, other: Observer) -> None:
        self._check(other)
        assert isinstance(other, LogHistogramObserver)
        self._merge_sums(other)
        self.count += other.count

    def state(self) -> dict[str, np.ndarray]:
        self.end_shard()
        return {"count": self.count, "sum_abs": self.acc[0], "sum_sq": self.acc[1]}

    @staticmethod
    def result(state: Mapping[str, np.ndarray]) -> LogHistogram:
        shape = (2, LOG_BINS)
        return LogHistogram(np.asarray(state["count"]).reshape(shape), np.asarray(state["sum_abs"]).reshape(shape),
                            np.asarray(state["sum_sq"]).reshape(shape))

    @staticmethod
    def nbytes(cfg: ObserverConfig, channels: int, rows_total: int) -> int:
        return 40 * 2 * LOG_BINS


@_register
class HessianObserver(Observer):
    """XᵀX: ``syrk`` into the shard accumulator (``hessian_dtype``, upper triangle), shard sums added
    into a float64 total in shard order."""

    name = "hessian"
    exact_merge = False

    def __init__(self, cfg: ObserverConfig, channels: int) -> None:
        super().__init__(cfg, channels)
        self.f64 = cfg.hessian_dtype == "float64"
        self.shard: np.ndarray | None = None  # allocated per shard: a closed shard ships only the total
        self.total = np.zeros((channels, channels), dtype=np.float64, order="F")
        self.open = False
        self.rows = 0

    def update(self, b: BatchView) -> None:
        if not b.rows:
            return
        if self.shard is None:
            self.shard = np.zeros((self.channels, self.channels), dtype=np.float64 if self.f64 else np.float32,
                                  order="F")
        # syrk with trans=0 on A = Xᵀ (Fortran-ordered view, no copy): C ← A·Aᵀ + C = XᵀX + C
        if self.f64:
            blas.dsyrk(1.0, b.x2.T.astype(np.float64, order="F"), beta=1.0, c=self.shard, overwrite_c=1, lower=0)
        else:
            blas.ssyrk(1.0, b.x2.T, beta=1.0, c=self.shard, overwrite_c=1, lower=0)
        self.open = True
        self.rows += b.rows

    def end_shard(self) -> None:
        if self.open and self.shard is not None:
            self.total += self.shard  # both upper-triangular (syrk never writes below the diagonal)
            self.shard = None
            self.open = False

    def merge(self, other: Observer) -> None:
        self._check(other)
        assert isinstance(other, HessianObserver)
        self.end_shard()
        other.end_shard()
        self.total += other.total
        self.rows += other.rows

    def state(self) -> dict[str, np.ndarray]:
        self.end_shard()
        up = np.triu(self.total)
        xtx = (up + np.triu(up, 1).T).astype(np.float32)  # mirror the upper triangle
        return {"xtx": xtx, "rows": np.array(self.rows, dtype=np.int64)}

    @staticmethod
    def result(state: Mapping[str, np.ndarray]) -> Hessian:
        return Hessian(np.asarray(state["xtx"]), int(state["rows"]))

    @staticmethod
    def nbytes(cfg: ObserverConfig, channels: int, rows_total: int) -> int:
        return (16 if cfg.hessian_dtype == "float64" else 12) * channels * channels  # shard + float64 total


@_register
class OutliersObserver(_PerRow):
    name = "outliers"

    def __init__(self, cfg: ObserverConfig, channels: int) -> None:
        super().__init__(cfg, channels)
        self.counts = np.zeros(channels, dtype=np.int64)
        self.rows = 0

    def update(self, b: BatchView) -> None:
        self.counts += np.count_nonzero(b.absx >= self.cfg.outlier_threshold, axis=0)
        self.rows += b.rows
        med = np.median(b.absx, axis=1)
        self.parts.append((b.row_absmax / np.maximum(med, np.finfo(np.float32).tiny)).astype(np.float32))

    def merge(self, other: Observer) -> None:
        super().merge(other)
        assert isinstance(other, OutliersObserver)
        self.counts += other.counts
        self.rows += other.rows

    def state(self) -> dict[str, np.ndarray]:
        return {
            "channel_rows": self.counts,
            "rows": np.array(self.rows, dtype=np.int64),
            "threshold": np.array(self.cfg.outlier_threshold),
            **self._rows_state(),
        }

    @staticmethod
    def result(state: Mapping[str, np.ndarray]) -> Outliers:
        return Outliers(np.asarray(state["channel_rows"]), int(state["rows"]), float(state["threshold"]), _by_batch(state))

    @staticmethod
    def nbytes(cfg: ObserverConfig, channels: int, rows_total: int) -> int:
        return 8 * channels + 4 * rows_total


@_register
class SampleObserver(Observer):
    name = "sample"

    def __init__(self, cfg: ObserverConfig, channels: int) -> None:
        super().__init__(cfg, channels)
        self.rows = np.zeros((0, channels), dtype=np.float32)
        self.index = np.zeros((0, 2), dtype=np.int64)
        self.prio = np.zeros(0, dtype=np.float64)

    def update(self, b: BatchView) -> None:
        k = self.cfg.sample_rows
        prio = np.concatenate([self.prio, b.priorities(self.cfg.seed)])
        keep = np.argpartition(prio, k - 1)[:k] if len(prio) > k else np.arange(len(prio))
        keep.sort()
        old = keep[keep < len(self.prio)]
        new = keep[keep >= len(self.prio)] - len(self.prio)
        idx_new = np.stack([np.full(len(new), b.window, np.int64), new.astype(np.int64)], axis=1)
        self.rows = np.concatenate([self.rows[old], b.x2[new]])
        self.index = np.concatenate([self.index[old], idx_new])
        self.prio = prio[keep]

    def merge(self, other: Observer) -> None:
        """The ``sample_rows`` smallest priorities of the union: the sample one pass would keep."""
        self._check(other)
        assert isinstance(other, SampleObserver)
        k = self.cfg.sample_rows
        prio = np.concatenate([self.prio, other.prio])
        keep = np.argpartition(prio, k - 1)[:k] if len(prio) > k else np.arange(len(prio))
        keep.sort()
        self.rows = np.concatenate([self.rows, other.rows])[keep]
        self.index = np.concatenate([self.index, other.index])[keep]
        self.prio = prio[keep]

    def state(self) -> dict[str, np.ndarray]:
        order = np.lexsort((self.index[:, 1], self.index[:, 0]))
        return {"rows": self.rows[order], "index": self.index[order]}

    @staticmethod
    def result(state: Mapping[str, np.ndarray]) -> Sample:
        return Sample(np.asarray(state["rows"]), np.asarray(state["index"]))

    @staticmethod
    def nbytes(cfg: ObserverConfig, channels: int, rows_total: int) -> int:
        return 2 * min(cfg.sample_rows, rows_total) * (4 * channels + 24)


def check_observers(names: tuple[str, ...] | list[str]) -> None:
    from qcompiler.errors import QCError

    for n in names:
        if n not in OBSERVERS:
            raise QCError(f"unknown observer '{n}'; known: {', '.join(OBSERVERS)}")
