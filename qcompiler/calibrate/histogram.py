"""Streaming histograms of activations and the ranges computed from them.

A histogram has ``n`` (a power of two) equal bins over ``[-H, H]`` with bin width
``w = 2H/n`` a power of two; 0 is always a bin edge, and ``x`` falls in bin
``⌊x/w⌋ + n/2`` (computed in float64, where ``x/w`` is exact for every float32 ``x``).
It is filled batch by batch:

* the first non-empty batch sets ``w`` to the smallest power of two with
  ``w·n/2 > max|x|``;
* a later batch with ``max|x| ≥ H`` *doubles* the range: adjacent pairs of bins are
  merged (``counts'[k] = counts[2k] + counts[2k+1]``) and ``n/4`` empty bins are added
  on each side, so ``H' = 2H``, ``w' = 2w`` and 0 stays an edge.  This is exact:
  ``n/4 + ⌊(⌊x/w⌋ + n/2)/2⌋ = ⌊x/2w⌋ + n/2`` for every real ``x``.

Counts are therefore exactly those of one histogram of *all* activations over the
final bins, whose width depends only on the overall ``max|x|`` (the smallest power
of two with ``w·n/2 > max|x|``, below ``4·max|x|/n``).  Hence the **merge** of two
histograms of disjoint data (:meth:`StreamingHistogram.merge`: coarsen the finer one
to the wider width, add the counts) equals, integer for integer, the histogram of the
union in one pass, in any order and for any split (calibration shards on Ray).
From the folded histogram of ``|x|`` (``n/2`` bins over ``[0, H]``):

* ``percentile(p)``: the p-th percentile of ``|x|``, linear inside the bin (error ≤ w);
* ``entropy_range(bits)``: the threshold ``t`` minimizing ``KL(P‖Q)`` between the
  clipped distribution ``P`` (mass beyond ``t`` folded into the last bin) and its
  quantization ``Q`` onto ``2^(bits−1)`` levels (TensorRT's calibration);
* ``mse_range(bits)``: the ``t`` minimizing the expected squared error of symmetric
  quantization with step ``s = t/(2^(bits−1) − 1)``:
  ``E(t) = N_in·s²/12 + Σ_{c>t} n_c·(c − t)²`` over bin centres ``c``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

_CHUNK = 1 << 20  # values binned at a time (float64 temporaries)


def pow2_width(absmax: float, bins: int) -> float:
    """The smallest power of two ``w`` with ``w·bins/2 > absmax`` (``absmax > 0``)."""
    _, e = math.frexp(absmax / (bins // 2))  # absmax/(n/2) = m·2^e, m ∈ [0.5, 1): 2^e is the answer
    return math.ldexp(1.0, e)


class StreamingHistogram:
    """Accumulates a symmetric histogram with exact range doubling and merging (see module docstring)."""

    def __init__(self, bins: int) -> None:
        if bins < 8 or bins & (bins - 1):
            raise ValueError(f"histogram bins must be a power of two >= 8, got {bins}")
        self.counts = np.zeros(bins, dtype=np.int64)
        self.width = 0.0  # 0 until the first non-zero value
        self._zeros = 0  # values seen while every value so far was 0

    @property
    def half_range(self) -> float:
        return self.width * len(self.counts) / 2

    def _double(self) -> None:
        n = len(self.counts)
        merged = self.counts.reshape(-1, 2).sum(axis=1)
        pad = np.zeros(n // 4, dtype=np.int64)
        self.counts = np.concatenate([pad, merged, pad])
        self.width *= 2.0

    def _grow(self, absmax: float) -> None:
        while absmax >= self.half_range:
            self._double()

    def _start(self, width: float) -> None:
        n = len(self.counts)
        self.width = width
        self.counts[n // 2] += self._zeros
        self._zeros = 0

    def update(self, x: np.ndarray, absmax: float) -> None:
        """Add the values of ``x`` (finite, float32); ``absmax = max|x|``."""
        n = len(self.counts)
        if x.size == 0:
            return
        if self.width == 0.0:
            if absmax == 0.0:
                self._zeros += x.size
                return
            self._start(pow2_width(absmax, n))
        elif absmax >= self.half_range:
            self._grow(absmax)
        inv = 1.0 / self.width  # a power of two: x·inv is exact in float64
        flat = x.reshape(-1)
        for i in range(0, flat.size, _CHUNK):
            idx = np.floor(flat[i : i + _CHUNK].astype(np.float64) * inv).astype(np.int64)
            idx += n // 2
            np.clip(idx, 0, n - 1, out=idx)  # no-op: |x| < H puts every value inside
            self.counts += np.bincount(idx, minlength=n)

    def merge(self, other: StreamingHistogram) -> None:
        """Add the histogram ``other`` (same bins, any data) into this one, exactly (module docstring)."""
        if len(other.counts) != len(self.counts):
            raise ValueError(f"cannot merge histograms of {len(other.counts)} and {len(self.counts)} bins")
        if other.width == 0.0:
            if self.width == 0.0:
                self._zeros += other._zeros
            else:
                self.counts[len(self.counts) // 2] += other._zeros
            return
        if self.width == 0.0:
            self._start(other.width)
        counts = other.counts
        o_width = other.width
        while self.width < o_width:
            self._double()
        if o_width < self.width:
            tmp = StreamingHistogram(len(counts))
            tmp.counts, tmp.width = counts.copy(), o_width
            while tmp.width < self.width:
                tmp._double()
            counts = tmp.counts
        self.counts += counts

    def state(self) -> dict[str, np.ndarray]:
        counts = self.counts.copy()
        if self.width == 0.0:
            counts[len(counts) // 2] += self._zeros
        return {"counts": counts, "width": np.array(self.width, dtype=np.float64)}


@dataclass(frozen=True)
class Histogram:
    """A finished histogram: ``counts[n]`` over ``[-H, H]`` with bin ``width`` (``H = width·n/2``)."""

    counts: np.ndarray
    width: float

    @property
    def bins(self) -> int:
        return len(self.counts)

    @property
    def half_range(self) -> float:
        return self.width * self.bins / 2

    @property
    def total(self) -> int:
        return int(self.counts.sum())

    @property
    def edges(self) -> np.ndarray:
        return -self.half_range + self.width * np.arange(self.bins + 1, dtype=np.float64)

    def abs_counts(self) -> np.ndarray:
        """Histogram of ``|x|``: ``n/2`` bins over ``[0, H]``."""
        h = self.bins // 2
        return self.counts[h:] + self.counts[:h][::-1]

    def percentile(self, p: float) -> float:
        """The ``p``-th percentile (0 < p ≤ 100) of ``|x|``, e.g. 99.99 (error ≤ one bin)."""
        return _quantile(self.abs_counts(), self.width, 0.0, p)

    def percentile_range(self, p: float) -> tuple[float, float]:
        """Two-sided range: the ``(100 − p)``-th and ``p``-th percentiles of ``x``."""
        lo = _quantile(self.counts, self.width, -self.half_range, 100.0 - p)
        hi = _quantile(self.counts, self.width, -self.half_range, p)
        return lo, hi

    def entropy_range(self, bits: int = 8) -> tuple[float, float]:
        """Symmetric ``(-t, t)`` minimizing KL divergence after ``bits``-bit quantization."""
        t = entropy_threshold(self.abs_counts(), self.width, 2 ** (bits - 1))
        return -t, t

    def mse_range(self, bits: int = 8) -> tuple[float, float]:
        """Symmetric ``(-t, t)`` minimizing the expected quantization MSE (see module docstring)."""
        t = mse_threshold(self.abs_counts(), self.width, 2 ** (bits - 1) - 1)
        return -t, t


def _quantile(counts: np.ndarray, width: float, start: float, p: float) -> float:
    if not 0.0 < p <= 100.0:
        raise ValueError(f"percentile must be in (0, 100], got {p}")
    total = counts.sum()
    if total == 0 or width == 0.0:
        return 0.0
    target = p / 100.0 * total
    cum = np.cumsum(counts)
    i = int(np.searchsorted(cum, target, side="left"))
    i = min(i, len(counts) - 1)
    before = cum[i - 1] if i > 0 else 0
    frac = (target - before) / counts[i] if counts[i] else 1.0
    return float(start + (i + frac) * width)


def entropy_threshold(abs_counts: np.ndarray, width: float, levels: int = 128) -> float:
    """TensorRT's KL threshold on a histogram of ``|x|`` (``abs_counts[i]`` over ``[i·w, (i+1)·w)``)."""
    hist = abs_counts.astype(np.float64)
    n = len(hist)
    nz = np.nonzero(hist)[0]
    if width == 0.0 or len(nz) == 0:
        return 0.0
    last = int(nz[-1]) + 1
    if last <= levels:
        return last * width  # every value fits without merging bins: no clipping
    suffix = np.concatenate([np.cumsum(hist[::-1])[::-1], [0.0]])
    best_i, best_kl = last, np.inf
    for i in range(levels, min(last, n) + 1):
        p = hist[:i].copy()
        p[-1] += suffix[i]
        nonzero = p != 0
        # merge the i bins into `levels` chunks (the last one takes the remainder)
        step = i // levels
        bounds = np.arange(levels + 1) * step
        bounds[-1] = i
        sums = np.add.reduceat(hist[:i], bounds[:-1])
        counts_nz = np.add.reduceat(nonzero.astype(np.float64), bounds[:-1])
        per_bin = np.divide(sums, counts_nz, out=np.zeros_like(sums), where=counts_nz > 0)
        q = np.repeat(per_bin, np.diff(bounds)) * nonzero
        kl = _kl(p, q)
        if kl < best_kl:
            best_kl, best_i = kl, i
    return best_i * width


def _kl(p: np.ndarray, q: np.ndarray, eps: float = 1e-4) -> float:
    """KL(p‖q) of unnormalized histograms, q smoothed where p > 0 and q == 0 (TensorRT)."""
    p = p / p.sum()
    qs = q.sum()
    if qs == 0:
        return np.inf
    q = q / qs
    zeros = (q == 0) & (p > 0)
    if zeros.any():
        nz = q > 0
        n_zero, n_nonzero = int(zeros.sum()), int(nz.sum())
        if n_nonzero == 0:
            return np.inf
        q = q.copy()
        q[zeros] = eps
        q[nz] -= eps * n_zero / n_nonzero
        if (q[nz] <= 0).any():
            return np.inf
    m = p > 0
    return float(np.sum(p[m] * np.log(p[m] / q[m])))


def mse_threshold(abs_counts: np.ndarray, width: float, qmax: int = 127) -> float:
    """Argmin over bin edges ``t = k·w`` of ``N_in·(t/qmax)²/12 + Σ_{c>t} n_c (c − t)²``."""
    hist = abs_counts.astype(np.float64)
    if width == 0.0 or hist.sum() == 0:
        return 0.0
    centers = (np.arange(len(hist)) + 0.5) * width
    t = np.arange(1, len(hist) + 1) * width  # candidate thresholds: the upper edge of bin k-1
    # suffix sums over bins k.. of n, n·c, n·c²
    s0 = np.cumsum(hist[::-1])[::-1]
    s1 = np.cumsum((hist * centers)[::-1])[::-1]
    s2 = np.cumsum((hist * centers**2)[::-1])[::-1]
    k = np.arange(1, len(hist) + 1)
    out0 = np.where(k < len(hist), s0[np.minimum(k, len(hist) - 1)], 0.0)
    out1 = np.where(k < len(hist), s1[np.minimum(k, len(hist) - 1)], 0.0)
    out2 = np.where(k < len(hist), s2[np.minimum(k, len(hist) - 1)], 0.0)
    inside = s0[0] - out0
    err = inside * (t / qmax) ** 2 / 12.0 + (out2 - 2 * t * out1 + t**2 * out0)
    return float(t[int(np.argmin(err))])


#: ``log_histogram``: bins per octave of ``|x|`` and the exponent range (``2^LOG_LO ≤ |x| < 2^LOG_HI``; values
#: outside fall into the first / last bin, their sums stay exact)
LOG_PER_OCTAVE = 8
LOG_LO, LOG_HI = -32, 32
LOG_BINS = LOG_PER_OCTAVE * (LOG_HI - LOG_LO)


def log_bin_index(absx: np.ndarray) -> np.ndarray:
    """Bin of each ``|x|`` (> 0): ``⌊8·log2|x|⌋ − 8·LOG_LO``, clipped to ``[0, LOG_BINS)``."""
    k = np.floor(np.log2(absx) * LOG_PER_OCTAVE).astype(np.int64) - LOG_PER_OCTAVE * LOG_LO
    return np.clip(k, 0, LOG_BINS - 1)


@dataclass(frozen=True)
class LogHistogram:
    """Per sign (``[0]`` negative, ``[1]`` positive) and geometric bin of ``|x|`` (8 per octave): the count,
    ``Σ|x|`` and ``Σx²`` of the values in it (zeros are left out: they cost no error and carry no energy).

    :meth:`static_error` estimates the relative error ``‖x − Q(x)‖²/‖x‖²`` of a static quantizer
    ``Q(x) = Δ·(clamp(round(x/Δ) + z, q_lo, q_hi) − z)`` from these sums, whatever ``(Δ, z)`` is
    chosen after calibration.  Its grid is ``Δ·ℤ ∩ [L, U]``, ``L = Δ(q_lo − z) ≤ 0 ≤ U = Δ(q_hi − z)``; per
    bin ``[a, b)`` of one sign (``c`` = the bound on that side, ``U`` or ``|L|``)::

        b ≤ Δ/2          every value rounds to 0:  Σ x²                                   (exact)
        a ≥ c − Δ/2      every value lands on c:   Σ (|x| − c)² = Σx² − 2c·Σ|x| + n·c²     (exact)
        b − a ≥ 2Δ       rounding, many steps:    n·Δ²/12
        otherwise        n · the mean of (|x| − Q(|x|))² over 16 points spread over the bin

    so the two regimes that rank the inputs — values a sink token's range rounds to zero, and
    clipping — are exact, and only the rounding noise of mid-range values is modelled.
    """

    count: np.ndarray  # int64 [2, LOG_BINS]
    sum_abs: np.ndarray  # float64 [2, LOG_BINS]
    sum_sq: np.ndarray  # float64 [2, LOG_BINS]

    @property
    def energy(self) -> float:
        return float(self.sum_sq.sum())

    def static_error(self, scale: float, zero_point: int, q_lo: int, q_hi: int) -> float:
        """``‖x − Q(x)‖²/‖x‖²`` of the static quantizer ``(scale, zero_point)`` on ``[q_lo, q_hi]`` (class docstring)."""
        energy = self.energy
        if energy <= 0.0 or scale <= 0.0:
            return 0.0
        d = float(scale)
        e = np.arange(LOG_BINS + 1, dtype=np.float64) / LOG_PER_OCTAVE + LOG_LO
        a, b = np.exp2(e[:-1]), np.exp2(e[1:])
        a[0] = 0.0
        b[-1] = np.inf
        t = (np.arange(16) + 0.5) / 16
        pts = a[:, None] + np.minimum(b - a, 2 * d)[:, None] * t[None, :]
        err = 0.0
        for side, c in ((0, d * (zero_point - q_lo)), (1, d * (q_hi - zero_point))):
            n, s1, s2 = self.count[side].astype(np.float64), self.sum_abs[side], self.sum_sq[side]
            zero = b <= d / 2
            clip = ~zero & (a >= c - d / 2)
            wide = ~zero & ~clip & (b - a >= 2 * d)
            mid = ~(zero | clip | wide) & (n > 0)
            qp = np.minimum(np.rint(pts[mid] / d) * d, c)
            err += float(s2[zero].sum())
            err += float((s2[clip] - 2 * c * s1[clip] + n[clip] * c * c).sum())
            err += float((n[wide] * d * d / 12).sum())
            err += float((n[mid] * ((pts[mid] - qp) ** 2).mean(axis=1)).sum())
        return max(err, 0.0) / energy
